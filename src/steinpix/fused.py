"""Features and forest fused per image row: the built-in engine's inner loop.

:func:`classify` computes the same probabilities as ``predict_proba(compute_features(img))``,
bit for bit, without the (pixels, features) matrix in between: each thread computes the
features of one output row into a (features, x) buffer of about a megabyte, which stays in the
CPU's cache, and classifies that row right away, 32 pixels at a time. That saves writing the
160 features of every pixel to memory and reading them back (2.5 GB per 2000 x 2000 image), the
two transposes around it, and a strip's feature buffer.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import numba
import numpy as np

from steinpix import features
from steinpix.features import FeatureSelection
from steinpix.forest import Classifier, _block_state, _classify_span
from steinpix.kernel_cache import depend_on_sources

__all__ = ["classify", "classify_strips"]


@numba.njit(cache=True, nogil=True)
def _classify_rows(planes, coefs, radius, x_jobs, y_jobs, columns, n_ring, unfused, y0, y1,
                   n_feat, ff, out_channel, out, out_y0, forest, rings):
    """Features and probabilities of output rows y0..y1 (one thread).

    The first eight arguments and ``y0``, ``y1`` are those of ``features._feature_rows``;
    ``ff`` and ``out_channel`` those of ``forest._predict_kernel``. Row ``y``'s probabilities
    go to ``out[y - out_y0]`` ((W, n_outputs) float32). ``forest`` False computes the features
    only (for benchmarks). ``rings``: this thread's ring buffers (``features.ring_shape``).
    """
    width = planes.shape[3]
    scratch, tmp, pad, front = features._row_state(planes, coefs, radius, columns, y0, n_feat)
    state = _block_state(ff, n_feat)
    for y in range(y0, y1):
        features._row_features(planes, coefs, radius, x_jobs, y_jobs, columns, n_ring, unfused,
                               y, rings, scratch, tmp, pad, front)
        if not forest:
            continue
        _classify_span(ff, out_channel, state, scratch.reshape(-1), n_feat, width, 0, width,
                       out[y - out_y0])


# The kernel compiles in the feature and forest code: its cached machine code must be redone
# when their files change, not only when this one does.
depend_on_sources(_classify_rows, inspect.getfile(features._row_features.py_func),
                  inspect.getfile(_classify_span.py_func))


# The buffers of the last finished classify_strips, for the next one: a fresh 100 MB buffer
# costs page faults and the kernel's zeroing of its pages, which a batch of images then pays
# once. One pair is kept (images are classified one after the other); it is as large as the
# strips of the largest image so far, which are within the engine's memory budget.
_SPARE: list[tuple[features.Workspace, features.Workspace]] = []


def _take_workspaces() -> tuple[features.Workspace, features.Workspace]:
    try:
        return _SPARE.pop()  # atomic: two concurrent calls never get the same pair
    except IndexError:
        return features.Workspace(), features.Workspace()


@dataclass
class _Strip:
    """A strip whose presmoothing is queued, and the stage-2 jobs that will follow it."""

    out: np.ndarray
    run: features.Runner
    presmoothing: list[Future]
    rows_args: list[tuple]


def _start(img: np.ndarray, selection: FeatureSelection, classifier: Classifier, profile: str,
           rows: tuple[int, int] | None, out: np.ndarray | None,
           work: features.Workspace | None, temps: features.Workspace | None = None) -> _Strip:
    """Check a strip and queue its presmoothing (its planes in ``work``, its temporary planes
    in ``temps``, default ``work``: a strip's presmoothing must have finished before the next
    one's is queued with the same ``temps``)."""
    img, plan, (r0, r1) = features.prepare(img, selection, profile, rows)
    if plan.n_features != classifier.n_features:
        raise ValueError(f"the selection gives {plan.n_features} feature columns, the "
                         f"classifier expects {classifier.n_features}")
    shape = (r1 - r0, img.shape[2], classifier.n_outputs)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}")
    unfused = profile == "14x"
    run = features.Runner(max(1, min(numba.get_num_threads(), r1 - r0)))
    planes, presmoothing = features.start_presmooth(img, selection, plan, (r0, r1), unfused,
                                                    run, work, temps)
    args = (planes, *features.stage2_args(plan), unfused)
    forest_args = (plan.n_features, classifier.flat, classifier.output_channels, out, r0, True)
    # The ring buffers (10 MB per thread and 2000 pixels of width) are kept with the temporary
    # planes: strips of 77 MB per thread (16,000 pixels) each took fresh memory, 1 GB per image.
    # A strip's rows start after the previous strip's rows are done, so one set serves all.
    rings_from = temps or work or features.Workspace()
    shape = features.ring_shape(planes.shape, plan)
    rows_args = [(*args, a, b, *forest_args, rings_from.array(f"rings{i}", shape))
                 for i, (a, b) in enumerate(run.chunks(r0, r1))]
    return _Strip(out, run, presmoothing, rows_args)


def classify(
    img: np.ndarray,
    selection: FeatureSelection,
    classifier: Classifier,
    profile: str = "133",
    rows: tuple[int, int] | None = None,
    out: np.ndarray | None = None,
    work: features.Workspace | None = None,
) -> np.ndarray:
    """Class probabilities of the pixels of an image (or of some of its rows).

    Equal, bit for bit, to ``predict_proba(classifier, compute_features(img, selection,
    profile, rows=rows).reshape(-1, F))`` reshaped to rows x width.

    Parameters
    ----------
    img : (C, Y, X) ndarray, any real dtype
        The image (converted to float32 as ilastik does).
    selection : FeatureSelection
        The project's feature selection.
    classifier : Classifier
        The project's classifier; its feature columns must be the selection's.
    profile : {"133", "14x"}, optional
        Arithmetic profile of the feature filters.
    rows : (int, int), optional
        Only classify output rows ``rows[0] .. rows[1] - 1`` (default: all); the filters still
        see the whole of ``img``, as in :func:`steinpix.features.compute_features`.
    out : (R, X, n_outputs) C-contiguous ndarray of float32, optional
        Buffer for the result.
    work : steinpix.features.Workspace, optional
        Buffers to reuse from the previous call (e.g. the previous strip of the image).

    Returns
    -------
    (R, X, n_outputs) ndarray of float32
        The probabilities (``n_outputs`` = number of label names), before the uint16 export.

    Raises
    ------
    SteinpixError
        As :func:`steinpix.features.compute_features`.
    """
    strip = _start(img, selection, classifier, profile, rows, out, work)
    strip.run.wait(strip.presmoothing)
    strip.run(_classify_rows, strip.rows_args)
    return strip.out


def classify_strips(
    strips: Iterable[tuple[np.ndarray, tuple[int, int], np.ndarray]],
    selection: FeatureSelection,
    classifier: Classifier,
    profile: str = "133",
    overlap: bool = True,
) -> Iterator[np.ndarray]:
    """:func:`classify` of one strip after the other, the next one's presmoothing queued
    behind this one's rows.

    With :func:`classify` per strip, a thread that has finished its rows waits for the others,
    and all wait while the caller reads the next strip and writes this one. Here it goes on
    with the next strip's presmoothing (two sets of planes take turns). The results are those
    of :func:`classify`, bit for bit.

    Parameters
    ----------
    strips : iterable of (img, rows, out)
        As :func:`classify`'s arguments, in turn. The next strip is taken from it while this
        one's rows are computed. Every strip may have the same ``out``: a strip's is written
        only after the previous strip was yielded and the caller asked for the next.
    selection, classifier, profile
        As for :func:`classify`.
    overlap : bool
        False: one strip after the other, as :func:`classify` (one set of planes: for strips
        so wide that two sets would not fit the memory budget).

    Yields
    ------
    (R, X, n_outputs) ndarray of float32
        Each strip's ``out``, filled.
    """
    first, second = _take_workspaces()  # first's temporary planes serve both: see _start
    works = (first, second if overlap else first)
    strips = iter(strips)
    queued: list[Future] = []  # jobs to stop and wait for if the caller stops early

    def start(k: int) -> _Strip | None:
        item = next(strips, None)
        if item is None:
            return None
        img, rows, out = item
        strip = _start(img, selection, classifier, profile, rows, out, works[k % 2], first)
        queued.extend(strip.presmoothing)
        return strip

    try:
        strip, k = start(0), 0
        while strip is not None:
            strip.run.wait(strip.presmoothing)
            rows_jobs = strip.run.submit(_classify_rows, strip.rows_args)
            queued[:] = rows_jobs
            following = start(k + 1) if overlap else None
            strip.run.wait(rows_jobs)
            if not overlap:
                following = start(k + 1)
            queued[:] = [] if following is None else following.presmoothing
            yield strip.out
            strip, k = following, k + 1
    finally:
        features.Runner.wait_quietly(queued)
        _SPARE.append((first, second))
        del _SPARE[:-1]
