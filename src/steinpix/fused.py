"""Features and forest fused per image row: the built-in engine's inner loop.

:func:`classify` computes the same probabilities as ``predict_proba(compute_features(img))``,
bit for bit, without the (pixels, features) matrix in between: each thread computes the
features of one output row into a (features, x) buffer of about a megabyte, which stays in the
CPU's cache, and classifies that row right away, 16 pixels at a time. That saves writing the
160 features of every pixel to memory and reading them back (2.5 GB per 2000 x 2000 image), the
two transposes around it, and a strip's feature buffer.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from steinpix import features
from steinpix.features import FeatureSelection
from steinpix.forest import LANES, Classifier, _block_state, _classify_block

__all__ = ["classify"]

_U = np.uint64


@numba.njit(cache=True, nogil=True)
def _load_columns(scratch, x0, m, xt, nan):
    """Pixels ``x0 .. x0 + m`` (m < LANES, the end of a row) of a (features, x) row into the
    block layout ``xt[feature * LANES + lane]``; ``nan[lane]`` flags pixels with a NaN feature
    (vigra gives them zeros) and the padding lanes."""
    n_feat = scratch.shape[0]
    for lane in range(LANES):
        for j in range(n_feat):
            v = scratch[j, x0 + lane] if lane < m else np.float32(0.0)
            xt[_U(j) * _U(LANES) + _U(lane)] = v
        bad = lane >= m
        for j in range(n_feat):
            bad |= np.isnan(xt[_U(j) * _U(LANES) + _U(lane)])
        nan[lane] = bad


@intrinsic
def _copy_block(typingctx, flat, x0, width, n_feat, xt):
    """``xt[j * LANES + lane] = flat[j * width + x0 + lane]`` for j < n_feat, lane < LANES.

    Vector loads and stores (numba leaves this loop scalar); the loads of all features are
    independent, so the CPU fetches a block's features from the cache in parallel rather than
    one at a time inside the forest's dependent loop.
    """
    if not all(isinstance(t, types.Array) and t.dtype == types.float32 for t in (flat, xt)):
        return None
    sig = types.void(flat, types.int64, types.int64, types.int64, xt)

    def codegen(context, builder, signature, args):
        src = context.make_array(signature.args[0])(context, builder, args[0]).data
        dst = context.make_array(signature.args[4])(context, builder, args[4]).data
        x0, width, n = args[1], args[2], args[3]
        i64 = ir.IntType(64)
        vec = ir.VectorType(ir.FloatType(), 8)
        with cgutils.for_range(builder, n) as loop:
            j = loop.index
            row = builder.add(builder.mul(j, width), x0)
            out = builder.mul(j, i64(LANES))
            for g in range(0, LANES, 8):
                p = builder.bitcast(builder.gep(src, [builder.add(row, i64(g))]), vec.as_pointer())
                q = builder.bitcast(builder.gep(dst, [builder.add(out, i64(g))]), vec.as_pointer())
                builder.store(builder.load(p, align=4), q, align=4)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True, nogil=True)
def _nan_lanes(scratch, x0, nan):
    """``nan[lane]``: whether pixel ``x0 + lane`` of a (features, x) row has a NaN feature."""
    for lane in range(LANES):
        bad = False
        for j in range(scratch.shape[0]):
            bad |= np.isnan(scratch[j, x0 + lane])
        nan[lane] = bad


@numba.njit(cache=True, nogil=True)
def _any_nan(flat):
    """Whether a float32 array (1-D) holds a NaN."""
    bad = False
    for i in range(flat.shape[0]):
        bad |= flat[i] != flat[i]
    return bad


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
        row = out[y - out_y0]
        # The forest reads whole blocks straight from the row; only the last, partial block
        # is copied (and padded). NaN features are rare: look for them once per row.
        flat = scratch.reshape(-1)
        any_nan = _any_nan(flat)
        nan = state[1]
        nan[:] = False
        full = width - width % LANES
        for x0 in range(0, full, LANES):
            if any_nan:
                _nan_lanes(scratch, x0, nan)
            _copy_block(flat, x0, width, n_feat, state[0])
            _classify_block(ff, out_channel, state, state[0], 0, LANES, x0, LANES, row)
        if full < width:
            _load_columns(scratch, full, width - full, state[0], nan)
            _classify_block(ff, out_channel, state, state[0], 0, LANES, full, width - full,
                            row)


def classify(
    img: np.ndarray,
    selection: FeatureSelection,
    classifier: Classifier,
    profile: str = "133",
    rows: tuple[int, int] | None = None,
    out: np.ndarray | None = None,
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
        planes = features.presmooth(img, selection, plan, (r0, r1), unfused, run)
        args = (planes, *features.stage2_args(plan), unfused)
        forest_args = (plan.n_features, classifier.flat, classifier.output_channels, out, r0, True)
        run(_classify_rows, [(*args, a, b, *forest_args) for a, b in run.chunks(r0, r1)])
    return out
