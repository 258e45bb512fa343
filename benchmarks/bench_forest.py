"""Time steinpix.forest.predict_proba (pixels per second) and numba's compile/first call.

Example::

    python benchmarks/make_mosaics.py
    python benchmarks/bench_forest.py --rows 250 --threads 1 2

The features are those of the first ``--rows`` rows of ``benchmarks/work/img/mosaic_1.h5``
(real IMC statistics, so the trees take realistic paths), computed once. ``--compile`` also
measures, in fresh processes, the first ``predict_proba`` call with an empty numba cache
(compilation) and with the cache the first run left behind.

``predict_proba`` classifies a (pixels, features) matrix. The engine (``steinpix.fused``)
classifies each image row right after computing its features, from the cache; its forest time
is the engine's time with the classification minus its time without it, over the same rows
(noisy: a difference of two larger times). "fused forest alone" times the engine's per-row
classification (``forest._classify_span`` on (features, x) rows, one row per work item) by
itself, on the first 8 rows' features in that layout, cycled through so that they stay in the
CPU's cache as a freshly computed row does; with one thread it is CPU time, the steadiest
figure. ``--parts`` times the steps of that classification one by one, single-threaded, on
the first 256 pixels of one row (they stay in the L2 cache): QuickScorer alone, QuickScorer
with the vote counting, copying a block's features, the probabilities from the votes, the
stores, and the whole per-row classification, in microseconds per block of 32 pixels.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
from bench_features import engine_times

from steinpix.engine import STRIP_PIXELS
from steinpix.forest import (
    LANES,
    _block_state,
    _classify_span,
    _copy_block,
    _qs_votes,
    _quickscorer,
    _store_block,
    _vote_probs,
)

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "work"
DEFAULT_ILP = REPO / "examples" / "imc-mock" / "pretrained.ilp"

FIRST_CALL = """
import time, numpy as np
t = time.perf_counter()
from steinpix.forest import load_classifier, predict_proba
c = load_classifier({ilp!r})
t1 = time.perf_counter()
predict_proba(c, np.zeros((16, c.n_features), np.float32))
print(f"import+load {{t1 - t:.2f}} s, first predict_proba {{time.perf_counter() - t1:.2f}} s")
"""


def first_call(ilp: Path, cache_dir: str | None) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    result = subprocess.run([sys.executable, "-c", FIRST_CALL.format(ilp=str(ilp))], env=env,
                            capture_output=True, text=True, check=True)
    return result.stdout.strip()


@numba.njit(parallel=True, nogil=True)
def _fused_forest(rows, n_rows, ff, out_channel, out):
    """The engine's classification of ``n_rows`` rows, cycling through ``rows``
    ((R, features, width) float32), into ``out`` ((n_rows, width, n_outputs))."""
    n_feat, width = rows.shape[1], rows.shape[2]
    for y in numba.prange(n_rows):
        r = y % rows.shape[0]
        state = _block_state(ff, n_feat)
        _classify_span(ff, out_channel, state, rows[r].reshape(-1), n_feat, width, 0, width,
                       out[y])


def fused_forest_times(features: np.ndarray, classifier, n_rows: int,
                       repeat: int) -> tuple[float, float]:
    """Best and median time of :func:`_fused_forest` (CPU time with one thread, else wall)."""
    rows = np.ascontiguousarray(features[:8].transpose(0, 2, 1))
    out = np.empty((n_rows, rows.shape[2], classifier.n_outputs), dtype=np.float32)
    args = (rows, n_rows, classifier.flat, classifier.output_channels, out)
    clock = time.process_time if numba.get_num_threads() == 1 else time.perf_counter
    _fused_forest(*args)
    times = []
    for _ in range(repeat):
        t = clock()
        _fused_forest(*args)
        times.append(clock() - t)
    return min(times), float(np.median(times))


@numba.njit(nogil=True)
def _parts(which, blocks, row, ff, out_channel, reps, state, out):
    """One step of the per-row classification ``reps`` times over every block (see --parts)."""
    xt, nan, bits, res, counts = state[0], state[1], state[2], state[6], state[7]
    n_classes = ff.leaf_f32.shape[1]
    n_feat, width = row.shape
    flat = row.reshape(-1)
    for _ in range(reps):
        for i in range(blocks.shape[0]):
            if which == 0:
                _quickscorer(blocks[i], bits, ff.qs_slot_start, ff.qs_entries)
            elif which == 1:
                _qs_votes(blocks[i], counts, ff.tree_slot_start, ff.forest_start,
                          ff.qs_slot_start, ff.qs_entries, ff.qs_vote_mask, n_classes)
            elif which == 2:
                _copy_block(flat, i * LANES, width, n_feat, xt, nan)
            elif which == 3:
                _vote_probs(counts, ff.forest_start, res, n_classes, ff.combine,
                            ff.total_tree_count)
            elif which == 4:
                _store_block(res, nan, out_channel, i * LANES, LANES, out)
        if which == 5:
            _classify_span(ff, out_channel, state, flat, n_feat, width, 0, width, out)


PARTS = ("quickscorer", "quickscorer + votes", "copy features", "vote probabilities",
         "store", "whole classification")


def part_times(features: np.ndarray, classifier, repeat: int) -> None:
    """Print the per-block time of each step (one thread, CPU time, best of ``repeat``)."""
    ff = classifier.flat
    if not ff.votes:
        print("--parts: this project's leaves are not pure votes; skipped")
        return
    width = 256
    row = np.ascontiguousarray(features[0, :width].T)  # (features, x), as the engine's rows
    blocks = np.ascontiguousarray(
        row.reshape(row.shape[0], -1, LANES).transpose(1, 0, 2)).reshape(-1, row.shape[0] * LANES)
    state = _block_state(ff, row.shape[0])
    state[1][:] = 0  # no NaN
    state[7][:] = 1  # some votes
    out = np.empty((width, classifier.n_outputs), dtype=np.float32)
    args = (blocks, row, ff, classifier.output_channels)
    reps = 2000
    for which in range(len(PARTS)):
        _parts(which, *args, 1, state, out)
    best = [np.inf] * len(PARTS)
    for _ in range(repeat):  # the steps in turns, so that the machine's changes hit all alike
        for which in range(len(PARTS)):
            t = time.process_time()
            _parts(which, *args, reps, state, out)
            best[which] = min(best[which], time.process_time() - t)
    n_entries = ff.qs_entries.size // 3
    for name, seconds in zip(PARTS, best, strict=True):
        per_block = seconds / (reps * blocks.shape[0])
        print(f"  {name}: {per_block * 1e6:.2f} us per block of {LANES} pixels")
    print(f"  ({n_entries} QuickScorer entries: "
          f"{best[0] / (reps * blocks.shape[0]) / n_entries * 1e9:.2f} ns per entry)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=WORK / "img" / "mosaic_1.h5")
    parser.add_argument("--ilp", type=Path, default=DEFAULT_ILP)
    parser.add_argument("--rows", type=int, default=250, help="image rows to classify")
    parser.add_argument("--threads", type=int, nargs="+",
                        default=sorted({1, numba.config.NUMBA_NUM_THREADS}))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="measure compile/first call")
    parser.add_argument("--parts", action="store_true",
                        help="time the steps of the classification (one thread) and stop")
    args = parser.parse_args()

    from steinpix import engine
    from steinpix.features import compute_features
    from steinpix.forest import predict_proba

    if args.compile:
        with tempfile.TemporaryDirectory() as cache:
            print("empty numba cache: ", first_call(args.ilp, cache))
            print("warm numba cache:  ", first_call(args.ilp, cache))

    classifier, selection = engine.load_project(args.ilp)
    img = engine.read_image(args.image)[:, :args.rows]
    if args.parts:
        engine.set_threads(1)
        print("one thread, steps of the per-row classification (best CPU time):")
        part_times(compute_features(img, selection), classifier, args.repeat)
        return
    features = compute_features(img, selection).reshape(-1, classifier.n_features)
    n = features.shape[0]
    out = np.empty((n, classifier.n_outputs), dtype=np.float32)
    print(f"{n} pixels x {classifier.n_features} features, {classifier.flat.tree_root.size} trees")
    predict_proba(classifier, features[:16])
    for threads in args.threads:
        engine.set_threads(threads)
        predict_proba(classifier, features[:1000], out=out[:1000])
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            predict_proba(classifier, features, out=out)
            times.append(time.perf_counter() - t)
        best, median = min(times), float(np.median(times))
        print(f"threads {threads}: {n / best / 1e6:.2f} Mpixel/s best, "
              f"{n / median / 1e6:.2f} median ({best:.3f} s best)", flush=True)
    per_row = features.reshape(img.shape[1], img.shape[2], classifier.n_features)
    for threads in args.threads:
        engine.set_threads(threads)
        best, median = fused_forest_times(per_row, classifier, img.shape[1], args.repeat)
        print(f"threads {threads}, fused forest alone: {n / best / 1e6:.2f} Mpixel/s best, "
              f"{n / median / 1e6:.2f} median ({best:.3f} s best)", flush=True)
    rows = max(1, STRIP_PIXELS // img.shape[2])
    for threads in args.threads:
        engine.set_threads(threads)
        with_forest = engine_times(img, selection, classifier, "133", rows, True, args.repeat)
        without = engine_times(img, selection, classifier, "133", rows, False, args.repeat)
        best = with_forest[0] - without[0]
        median = with_forest[1] - without[1]
        print(f"threads {threads}, engine (fused): {n / best / 1e6:.2f} Mpixel/s best, "
              f"{n / median / 1e6:.2f} median ({best:.3f} s best)", flush=True)


if __name__ == "__main__":
    main()
