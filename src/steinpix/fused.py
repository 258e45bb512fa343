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

import numba
import numpy as np

from steinpix import features
from steinpix.features import FeatureSelection
from steinpix.forest import Classifier, _block_state, _classify_span
from steinpix.kernel_cache import depend_on_sources

__all__ = ["classify"]


@numba.njit(cache=True, nogil=True)
def _classify_rows(planes, coefs, radius, x_jobs, y_jobs, columns, n_ring, unfused, y0, y1,
                   n_feat, ff, out_channel, out, out_y0, forest):
    """Features and probabilities of output rows y0..y1 (one thread).

    The first eight arguments and ``y0``, ``y1`` are those of ``features._feature_rows``;
    ``ff`` and ``out_channel`` those of ``forest._predict_kernel``. Row ``y``'s probabilities
    go to ``out[y - out_y0]`` ((W, n_outputs) float32). ``forest`` False computes the features
    only (for benchmarks).
    """
    width = planes.shape[3]
    rings, scratch, tmp, pad, front = features._row_state(planes, coefs, radius, columns,
                                                          n_ring, y0, n_feat)
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
    with features.Runner(max(1, min(numba.get_num_threads(), r1 - r0))) as run:
        planes = features.presmooth(img, selection, plan, (r0, r1), unfused, run, work)
        args = (planes, *features.stage2_args(plan), unfused)
        forest_args = (plan.n_features, classifier.flat, classifier.output_channels, out, r0, True)
        run(_classify_rows, [(*args, a, b, *forest_args) for a, b in run.chunks(r0, r1)])
    return out
