"""Time steinpix's TIFF LZW encoder against imagecodecs' on the strips of a probability TIFF.

Example::

    python benchmarks/make_mosaics.py
    python benchmarks/bench_run.py            # writes benchmarks/work/out/mosaic_1.tiff
    python benchmarks/bench_lzw.py

Both encoders run on the same 256 KiB strips, alternating; the best and median of ``--repeat``
runs over the whole image are printed, with the compressed sizes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

from steinpix.lzw import lzw_encode

WORK = Path(__file__).resolve().parents[1] / "benchmarks" / "work"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tiff", nargs="?", type=Path, default=WORK / "out" / "mosaic_1.tiff")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    probs = tifffile.imread(args.tiff)
    rows = max(1, 256 * 1024 // (probs[0].nbytes))
    strips = [np.ascontiguousarray(probs[y:y + rows]) for y in range(0, probs.shape[0], rows)]
    encoders = {
        "steinpix": lzw_encode,
        "imagecodecs": lambda a: imagecodecs.lzw_encode(a.tobytes()),
    }
    lzw_encode(strips[0])  # load the compiled encoder
    times: dict[str, list[float]] = {name: [] for name in encoders}
    sizes = {}
    for _ in range(args.repeat):
        for name, encode in encoders.items():
            t = time.perf_counter()
            sizes[name] = sum(len(encode(s)) for s in strips)
            times[name].append(time.perf_counter() - t)
    mb = probs.nbytes / 1e6
    for name, ts in times.items():
        print(f"{name:12s} best {min(ts):.3f} s ({mb / min(ts):.0f} MB/s), median "
              f"{statistics.median(ts):.3f} s; {sizes[name] / 1e6:.1f} MB compressed")


if __name__ == "__main__":
    main()
