"""What ``run --uncertainty --segmentation`` costs the built-in engine: side by side, one process.

Example::

    python benchmarks/make_mosaics.py
    python benchmarks/bench_exports.py                # both mosaics, 3 rounds

Each round classifies every image twice, alternating which goes first: probabilities only,
then probabilities plus the uncertainty and simple segmentation exports. The first image is
classified once before timing (numba's cache and the page cache warm). Prints the median time
per image of both and their ratio. Outputs go to ``benchmarks/work/exports``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "work"
DEFAULT_ILP = REPO / "examples" / "imc-mock" / "pretrained.ilp"


def classify(engine, model, img: Path, out: Path, with_exports: bool) -> float:
    """Seconds to classify ``img`` (and write its exports when ``with_exports``)."""
    classifier, selection = model
    folders = {name: out / name for name in ("probabilities", "uncertainty", "segmentation")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    exports = None
    if with_exports:
        exports = {name: folders[name] / f"{img.stem}.tiff" for name in engine.EXPORTS}
    start = time.perf_counter()
    engine.predict_file(img, folders["probabilities"] / f"{img.stem}.tiff", classifier,
                        selection, exports=exports)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", type=Path,
                        help="steinbock HDF5 images (default: benchmarks/work/img/*.h5)")
    parser.add_argument("--ilp", type=Path, default=DEFAULT_ILP)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=WORK / "exports")
    args = parser.parse_args()
    images = args.images or sorted((WORK / "img").glob("*.h5"))
    if not images:
        raise SystemExit("no images: run benchmarks/make_mosaics.py first")
    from steinpix import engine

    model = engine.load_project(args.ilp)
    classify(engine, model, images[0], args.out, True)  # warm-up, not timed
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.rounds):
        for img in images:
            for with_exports in ((False, True) if i % 2 == 0 else (True, False)):
                times[with_exports].append(classify(engine, model, img, args.out, with_exports))
    plain, full = statistics.median(times[False]), statistics.median(times[True])
    print(f"{len(images)} images x {args.rounds} rounds, project {args.ilp.name}")
    print(f"probabilities only: median {plain:.2f} s per image")
    print(f"with uncertainty and segmentation: median {full:.2f} s per image "
          f"({full / plain:.3f} x)")


if __name__ == "__main__":
    main()
