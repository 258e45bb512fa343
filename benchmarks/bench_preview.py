"""Time ``classify ilastik preview`` per image (read, stats, thumbnails, PNG writes).

Example::

    python benchmarks/bench_preview.py                 # 1000 x 1000, best of 5
    python benchmarks/bench_preview.py --side 3000 --repeat 3

Builds, in ``benchmarks/work/preview/``, one image of ``--side`` x ``--side`` pixels made of
tiles of the real IMC mock outputs (``tests/data/reference``: the probability TIFFs ilastik
wrote and the steinbock images they came from, cut at the same places, randomly flipped), so
that the TIFF compresses like real probabilities. Writes the probabilities as ilastik does
(uint16, Y x X x 3, LZW), the image as steinbock does (float32 C x Y x X HDF5), and an
uncertainty TIFF (uint16 Y x X). Then times :func:`steinpix.preview.preview_image` with and
without the uncertainty (``--size 1024``, the default) in this process, and measures the
peak RSS of a fresh process that previews the image once. CPU time is reported beside wall
time because on a shared machine the wall time depends on the others' load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
REF = REPO / "tests" / "data" / "reference"
WORK = REPO / "benchmarks" / "work" / "preview"
ILP = REPO / "examples" / "imc-mock" / "pretrained.ilp"


def build(side: int, tile: int = 40, seed: int = 0) -> dict[str, Path]:
    """Write the mosaic's probabilities, image and uncertainty; return their paths."""
    rng = np.random.default_rng(seed)
    sources = []
    for prob_file in sorted((REF / "ilastik_probabilities").glob("*.tiff")):
        with h5py.File(REF / "ilastik_img" / f"{prob_file.stem}.h5", "r") as h5:
            sources.append((tifffile.imread(prob_file), h5["img"][()]))
    probs = np.empty((side, side, 3), np.uint16)
    img = np.empty((sources[0][1].shape[0], side, side), np.float32)
    for y in range(0, side, tile):
        for x in range(0, side, tile):
            p, im = sources[rng.integers(len(sources))]
            oy, ox = rng.integers(p.shape[0] - tile + 1), rng.integers(p.shape[1] - tile + 1)
            pp, ii = p[oy : oy + tile, ox : ox + tile], im[:, oy : oy + tile, ox : ox + tile]
            if rng.integers(2):
                pp, ii = pp[::-1], ii[:, ::-1]
            h, w = min(tile, side - y), min(tile, side - x)
            probs[y : y + h, x : x + w] = pp[:h, :w]
            img[:, y : y + h, x : x + w] = ii[:, :h, :w]
    top2 = np.sort(probs, axis=-1)[..., -2:].astype(np.int32)
    unc = (65535 - (top2[..., 1] - top2[..., 0])).astype(np.uint16)
    WORK.mkdir(parents=True, exist_ok=True)
    paths = {
        "probs": WORK / f"mosaic_{side}.tiff",
        "img": WORK / f"mosaic_{side}.h5",
        "unc": WORK / f"mosaic_{side}_uncertainty.tiff",
    }
    rows = max(1, 65536 // (side * 6))
    tifffile.imwrite(paths["probs"], probs, compression="lzw", photometric="rgb", rowsperstrip=rows)
    tifffile.imwrite(paths["unc"], unc, compression="lzw", rowsperstrip=rows)
    with h5py.File(paths["img"], "w") as h5:
        h5.create_dataset("img", data=img)
    return paths


def run_once(paths: dict[str, Path], out: Path, uncertainty: bool) -> tuple[float, float]:
    """Preview the mosaic once; returns (wall seconds, CPU seconds of this process)."""
    from steinpix import preview

    classes = preview.read_classes(ILP)
    wall, cpu = time.perf_counter(), time.process_time()
    preview.preview_image(
        "mosaic",
        paths["probs"],
        paths["img"],
        paths["unc"] if uncertainty else None,
        out,
        classes,
        1024,
    )
    return time.perf_counter() - wall, time.process_time() - cpu


def child(side: int) -> None:
    """Inside a fresh process: preview once (with uncertainty), print peak RSS as JSON."""
    paths = {
        k: WORK / v
        for k, v in (
            ("probs", f"mosaic_{side}.tiff"),
            ("img", f"mosaic_{side}.h5"),
            ("unc", f"mosaic_{side}_uncertainty.tiff"),
        )
    }
    import imagecodecs  # noqa: F401  (imports are not part of the peak we care about)

    import steinpix.preview  # noqa: F401

    base = peak_rss_mib()
    seconds = run_once(paths, WORK / "out", uncertainty=True)[0]
    print(json.dumps({"seconds": seconds, "rss_before_mib": base, "rss_peak_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it restarts at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.side)
        return
    paths = build(args.side)
    size_mb = paths["probs"].stat().st_size / 1e6
    print(f"{args.side} x {args.side} px; probability TIFF {size_mb:.1f} MB (LZW)")
    out = WORK / "out"
    run_once(paths, out, uncertainty=False)  # warm up imports and the file cache
    for uncertainty in (False, True):
        times = [run_once(paths, out, uncertainty) for _ in range(args.repeat)]
        label = "with uncertainty" if uncertainty else "probabilities + image"
        print(
            f"preview_image, {label}: best of {args.repeat}: "
            f"{min(t[0] for t in times):.3f} s wall, {min(t[1] for t in times):.3f} s CPU"
        )
    result = subprocess.run(
        [sys.executable, __file__, "--child", "--side", str(args.side)],
        capture_output=True,
        text=True,
        check=True,
    )
    peak = json.loads(result.stdout)
    print(
        f"fresh process, with uncertainty: {peak['seconds']:.3f} s, peak RSS "
        f"{peak['rss_peak_mib']:.0f} MiB (after imports {peak['rss_before_mib']:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
