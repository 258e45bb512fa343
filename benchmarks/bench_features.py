"""Time steinpix.features.compute_features on a large image, and the features in the engine.

Example::

    python benchmarks/bench_features.py --size 2000 --threads 1 2

``compute_features`` writes the (Y, X, features) matrix. The engine (``steinpix.fused``) never
does: it computes one row's features at a time into a buffer that stays in the cache and
classifies them at once; "engine, features only" times that without the classification,
strip by strip as ``predict_file`` runs it.

The image is the IMC mock data tiled to the requested size when the shared data is present,
random data otherwise. The selection is the pretrained project's (all six features at scales
1.0, 1.6, 3.5, 5.0, 10.0) unless ``--ilp`` names another project.
"""

from __future__ import annotations

import argparse
import glob
import time
from pathlib import Path

import h5py
import numba
import numpy as np

from steinpix import features as feat
from steinpix import fused
from steinpix.engine import STRIP_PIXELS
from steinpix.features import FEATURE_IDS, FeatureSelection, compute_features
from steinpix.forest import load_classifier
from steinpix.project import SCALES, SELECTED_SCALES

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "imc-mock"
DEFAULT_ILP = Path(__file__).resolve().parents[1] / "examples" / "imc-mock" / "pretrained.ilp"


def default_selection() -> FeatureSelection:
    """All six features at sigma 1.0 to 10.0, as the pretrained IMC projects select them."""
    matrix = np.zeros((len(FEATURE_IDS), len(SCALES)), dtype=bool)
    matrix[:, [SCALES.index(s) for s in SELECTED_SCALES]] = True
    return FeatureSelection(FEATURE_IDS, SCALES, matrix, (True,) * len(SCALES))


def make_image(size: int, channels: int) -> np.ndarray:
    files = sorted(glob.glob(str(SHARED / "reference" / "ilastik_img" / "*.h5")))
    if not files:
        rng = np.random.default_rng(0)
        return rng.gamma(1.0, 10.0, (channels, size, size)).astype(np.float32)
    with h5py.File(files[3]) as f:
        tile = f["img"][()][:channels]
    reps = (1, -(-size // tile.shape[1]), -(-size // tile.shape[2]))
    return np.ascontiguousarray(np.tile(tile, reps)[:, :size, :size])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2000, help="image height and width")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--strip", type=int, default=0, help="rows per strip (0: whole image)")
    parser.add_argument("--profile", default="133")
    parser.add_argument("--ilp", type=Path, default=None)
    args = parser.parse_args()

    if args.ilp is not None or DEFAULT_ILP.exists():
        with h5py.File(args.ilp or DEFAULT_ILP, "r") as f:
            selection = FeatureSelection.from_h5(f["FeatureSelections"], str(args.ilp))
    else:
        selection = default_selection()
    img = make_image(args.size, args.channels)
    n_feat = selection.n_features(img.shape[0])
    print(f"image {img.shape}, {n_feat} features, halo {selection.halo()}")

    t0 = time.perf_counter()
    compute_features(img[:, :64, :64], selection, args.profile)
    print(f"first call (compile or cache load): {time.perf_counter() - t0:.2f} s")

    # A reused output buffer, touched once, as the engine would keep it: a fresh 2.5 GB array
    # per call would add its page faults (about 0.5 s) to every timing.
    out = None
    if not args.strip:
        out = np.zeros((img.shape[1], img.shape[2], n_feat), dtype=np.float32)
        out.fill(0.0)
    for threads in args.threads:
        numba.set_num_threads(threads)
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            if args.strip:
                run_strips(img, selection, args.profile, args.strip)
            else:
                compute_features(img, selection, args.profile, out=out)
            best = min(best, time.perf_counter() - t0)
        print(f"{threads} thread(s): {best:.2f} s per image (best of {args.repeat})")
    if args.ilp is not None or DEFAULT_ILP.exists():
        classifier = load_classifier(args.ilp or DEFAULT_ILP)
        rows = args.strip or max(1, STRIP_PIXELS // img.shape[2])
        for threads in args.threads:
            numba.set_num_threads(threads)
            best, median = engine_times(img, selection, classifier, args.profile, rows, False,
                                        args.repeat)
            print(f"{threads} thread(s), engine, features only: {best:.2f} s per image best, "
                  f"{median:.2f} s median")


def engine_times(img: np.ndarray, selection: FeatureSelection, classifier, profile: str,
                 rows: int, forest: bool, repeat: int) -> tuple[float, float]:
    """Best and median time of the engine's fused kernel over an image, strip by strip (rows
    per strip, with the halo), with or without the classification."""
    height, width = img.shape[1:]
    halo = selection.halo()
    out = np.zeros((rows, width, classifier.n_outputs), dtype=np.float32)
    times = []
    work = feat.Workspace()  # reused by every strip, as iter_strips does
    for _ in range(repeat + 1):  # the first run loads the kernels
        t0 = time.perf_counter()
        for y0 in range(0, height, rows):
            y1 = min(height, y0 + rows)
            a, b = max(0, y0 - halo), min(height, y1 + halo)
            strip, plan, (r0, r1) = feat.prepare(img[:, a:b], selection, profile, (y0 - a, y1 - a))
            run = feat.Runner(numba.get_num_threads())
            planes = feat.presmooth(strip, selection, plan, (r0, r1), profile == "14x", run,
                                     work)
            args = (planes, *feat.stage2_args(plan), profile == "14x")
            extra = (plan.n_features, classifier.flat, classifier.output_channels, out, r0,
                     forest)
            shape = feat.ring_shape(planes.shape, plan)
            run(fused._classify_rows, [(*args, a, b, *extra, work.array(f"rings{i}", shape))
                                       for i, (a, b) in enumerate(run.chunks(r0, r1))])
        times.append(time.perf_counter() - t0)
    return min(times[1:]), float(np.median(times[1:]))


def run_strips(img: np.ndarray, selection: FeatureSelection, profile: str, rows: int) -> None:
    """Like the engine: strips of full width with a halo, one reused output buffer."""
    height = img.shape[1]
    halo = selection.halo()
    n_feat = selection.n_features(img.shape[0])
    buf = None
    for y0 in range(0, height, rows):
        y1 = min(height, y0 + rows)
        a, b = max(0, y0 - halo), min(height, y1 + halo)
        shape = (b - a, img.shape[2], n_feat)
        if buf is None or buf.shape != shape:
            buf = np.empty(shape, dtype=np.float32)
        compute_features(img[:, a:b], selection, profile, out=buf)


if __name__ == "__main__":
    main()
