"""Time steinpix's TIFF LZW encoder against imagecodecs' on the strips of a probability TIFF.

Example::

    python benchmarks/make_mosaics.py
    python benchmarks/bench_run.py            # writes benchmarks/work/out/mosaic_1.tiff
    python benchmarks/bench_lzw.py

    # against another version of the encoder, e.g. main's:
    mkdir -p /tmp/lzw-old && git archive main src | tar -x -C /tmp/lzw-old
    python benchmarks/bench_lzw.py --compare /tmp/lzw-old/src

The encoders run on the same 256 KiB strips (the engine's TIFF strips), in turns, in this
thread; the minimum and median of ``--repeat`` turns over the whole image are printed, in CPU
time of this thread (steadier than wall time when other jobs share the machine), with the
compressed sizes. With ``--compare SRC``, the ``steinpix/lzw.py`` under ``SRC`` is timed too,
and its output is checked to be byte for byte the same as this version's.

``--data`` replaces the TIFF's strips by as many strips of made-up bytes, for the encoder's hard
cases: ``zeros`` (strings thousands of bytes long), ``sixteen`` (random bytes below 16: keys that
differ in few bits) and ``random`` (incompressible: every second byte ends a string).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

from steinpix.lzw import lzw_encode

WORK = Path(__file__).resolve().parents[1] / "benchmarks" / "work"


def load_encoder(src: Path):
    """``lzw_encode`` of the ``steinpix/lzw.py`` under ``src``, imported under another name.

    It is imported from a copy under ``benchmarks/work/compared/``: numba caches a kernel beside
    its file, under the name of the module, so importing ``src``'s own file under another name
    would leave a cache there that ``src``'s ``steinpix`` cannot load any more.
    """
    code = (src / "steinpix" / "lzw.py").read_bytes()
    copy = WORK / "compared" / hashlib.sha256(code).hexdigest()[:16] / "lzw_compared.py"
    if not copy.exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(code)
    spec = importlib.util.spec_from_file_location("lzw_compared", copy)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # numba's cache finds the module of its kernels by name
    spec.loader.exec_module(module)
    return module.lzw_encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tiff", nargs="?", type=Path, default=WORK / "out" / "mosaic_1.tiff")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--data", choices=["tiff", "zeros", "sixteen", "random"], default="tiff",
                        help="encode the TIFF's strips (default) or made-up ones of the same size")
    parser.add_argument("--compare", type=Path, metavar="SRC",
                        help="also time the encoder in SRC/steinpix/lzw.py")
    args = parser.parse_args()
    probs = tifffile.imread(args.tiff)
    rows = max(1, 256 * 1024 // (probs[0].nbytes))
    strips = [np.ascontiguousarray(probs[y:y + rows]) for y in range(0, probs.shape[0], rows)]
    rng = np.random.default_rng(0)
    made_up = {
        "zeros": lambda s: np.zeros_like(s),
        "sixteen": lambda s: rng.integers(0, 16, s.shape + (2,), dtype=np.uint8),
        "random": lambda s: rng.integers(0, 256, s.shape + (2,), dtype=np.uint8),
    }
    if args.data != "tiff":
        strips = [made_up[args.data](s) for s in strips]
    encoders = {"steinpix": lzw_encode}
    if args.compare:
        encoders[f"{args.compare}"] = load_encoder(args.compare)
    encoders["imagecodecs"] = lambda a: imagecodecs.lzw_encode(a.tobytes())
    for name, encode in encoders.items():  # load the compiled encoders, check the outputs
        if name != "imagecodecs" and any(encode(s) != lzw_encode(s) for s in strips):
            raise SystemExit(f"{name}: not the same bytes as steinpix's encoder")
    times: dict[str, list[float]] = {name: [] for name in encoders}
    sizes = {}
    for _ in range(args.repeat):
        for name, encode in encoders.items():
            t = time.thread_time()
            sizes[name] = sum(len(encode(s)) for s in strips)
            times[name].append(time.thread_time() - t)
    mb = probs.nbytes / 1e6
    best = min(times["steinpix"])
    for name, ts in times.items():
        print(f"{name:20s} best {min(ts):.3f} s ({mb / min(ts):.0f} MB/s), median "
              f"{statistics.median(ts):.3f} s; {sizes[name] / 1e6:.2f} MB compressed; "
              f"steinpix x{min(ts) / best:.2f} faster")


if __name__ == "__main__":
    main()
