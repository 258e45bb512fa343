"""ilastik 1.3.3post3's pixel features, computed bit for bit like its fastfilters build.

This module reproduces ``OpPixelFeaturesPresmoothed`` as the ilastik binaries run it (spec
``ilastik-1.3.3-prediction.md``, sections 2, 5 and 6, and Appendix A): every selected scale is
presmoothed with a Gaussian of window 3.5, and the six features are then computed on the
presmoothed image with window 2.0. All arithmetic is float32 in fastfilters' order, with its
fused multiply-adds (FMA) where it has them: the SIMD x-pass and every y-pass in sequential
order, the scalar x-pass code reassociated as GCC compiled it (profile "133") or in order
without FMA (profile "14x").

Performance notes. The filters are numba kernels (``fastmath`` off: it would let LLVM reorder
the float32 sums) whose inner loops run along x, so that LLVM vectorises them. An FMA is
LLVM's ``llvm.fma.f32``, a single hardware instruction (the spec's double-precision emulation
gives the same values, apart from double-rounding events too rare to have been seen, but it is
three times slower). The work is split in two stages, each run on row chunks by a thread pool of
``numba.get_num_threads()`` threads:

1. presmoothing: one full plane per (channel, scale);
2. all features, streamed row by row through small ring buffers of x-filtered rows. The
   feature rows of all (channel, scale) pairs are collected in a (features, x) scratch buffer
   and transposed into the caller's (Y, X, F) array with 8x8 vector blocks.

The presmoothing's large kernels run explicit vector code (:func:`_taps_row`: taps innermost,
eight 8-lane accumulators in registers). In the common case of stage 2 (all six features of a
scale at feature sigma 1: radii 2 and 1) the six x-passes of a row and the ten y-passes with
the features' arithmetic run as a few fused loops (:func:`_x_six`, :func:`_full_row`). Either
way every pixel sees the same operations in the same order as the plain loops.

The results do not depend on the thread count or on how the rows are chunked.
"""

from __future__ import annotations

import concurrent.futures
import math
import queue
from concurrent.futures import Future
from dataclasses import dataclass

import h5py
import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from steinpix import project, workers
from steinpix.errors import SteinpixError

__all__ = [
    "FEATURE_IDS",
    "PROFILES",
    "FeatureSelection",
    "Workspace",
    "compute_features",
    "feature_names",
    "gaussian_kernel",
    "kernel_radius",
]

# the six ids in ilastik's default order, as the project file stores them
FEATURE_IDS: tuple[str, ...] = project.FEATURE_IDS

#: Arithmetic profiles (spec section 5): "133" is ilastik 1.3.3post3 (fastfilters built with
#: ``-Ofast``, reassociated scalar code), "14x" is ilastik 1.4.x (scalar code unfused, in order).
PROFILES: tuple[str, ...] = ("133", "14x")

_DISPLAY_NAMES = {
    "GaussianSmoothing": "Gaussian Smoothing",
    "LaplacianOfGaussian": "Laplacian of Gaussian",
    "GaussianGradientMagnitude": "Gaussian Gradient Magnitude",
    "DifferenceOfGaussians": "Difference of Gaussians",
    "StructureTensorEigenvalues": "Structure Tensor Eigenvalues",
    "HessianOfGaussianEigenvalues": "Hessian of Gaussian Eigenvalues",
}
_N_OUT = {fid: 2 if fid.endswith("Eigenvalues") else 1 for fid in FEATURE_IDS}

# Window ratios (kernel radius = floor(window * sigma + 0.5)) of the presmoothing and the features.
_PRESMOOTH_WINDOW = 3.5
_FEATURE_WINDOW = 2.0
_DOG_FACTOR = 0.66  # DifferenceOfGaussians subtracts the smoothing at 0.66 * sigma
_STE_GRADIENT_FACTOR = 0.5  # the structure tensor's gradients use sigma / 2 (swapped scales)

# Feature codes (rows of the per-scale column table) in FEATURE_IDS order.
_GS, _LOG, _GGM, _DOG, _STE, _HOG = range(6)
# Kernels of one scale, in the order of the plan's kernel table.
_K_G0, _K_G1, _K_G2, _K_DOG, _K_GRAD0, _K_GRAD1 = range(6)
# Ring buffers of one (channel, scale): x-filtered rows of the presmoothed image and the
# x-smoothed structure-tensor products.
_R_X0, _R_X1, _R_X2, _R_XDOG, _R_XGRAD0, _R_XGRAD1, _R_SXX, _R_SYY, _R_SXY = range(9)
_N_RINGS = 9
# x-pass producing each ring of the presmoothed image: (kernel, odd).
_X_JOBS = {
    _R_X0: (_K_G0, False),
    _R_X1: (_K_G1, True),
    _R_X2: (_K_G2, False),
    _R_XDOG: (_K_DOG, False),
    _R_XGRAD0: (_K_GRAD0, False),
    _R_XGRAD1: (_K_GRAD1, True),
}
# Row temporaries of one output row: y-pass results (_T_*), then the structure tensor's
# gradients and products.
_T_GS, _T_YY, _T_XX, _T_XY, _T_DX, _T_DY, _T_DOG, _T_SXX, _T_SYY, _T_SXY = range(10)
_T_GX, _T_GY, _T_PXX, _T_PYY, _T_PXY = range(10, 15)
_N_TMP = 15
# y-pass producing each temporary row: (ring, kernel, odd). conv2d(x: a, y: b) is the y-pass
# with b of the ring filtered along x with a.
_Y_JOBS = {
    _T_GS: (_R_X0, _K_G0, False),  # x: g0, y: g0
    _T_YY: (_R_X0, _K_G2, False),  # x: g0, y: g2
    _T_XX: (_R_X2, _K_G0, False),  # x: g2, y: g0
    _T_XY: (_R_X1, _K_G1, True),  # x: g1, y: g1
    _T_DX: (_R_X1, _K_G0, False),  # x: g1, y: g0
    _T_DY: (_R_X0, _K_G1, True),  # x: g0, y: g1
    _T_DOG: (_R_XDOG, _K_DOG, False),  # both at 0.66 sigma
    _T_SXX: (_R_SXX, _K_G0, False),
    _T_SYY: (_R_SYY, _K_G0, False),
    _T_SXY: (_R_SXY, _K_G0, False),
}
# Temporaries each feature combines.
_FEATURE_TMP = {
    _GS: (_T_GS,),
    _LOG: (_T_YY, _T_XX),
    _GGM: (_T_DX, _T_DY),
    _DOG: (_T_GS, _T_DOG),
    _STE: (_T_SXX, _T_SYY, _T_SXY),
    _HOG: (_T_XX, _T_YY, _T_XY),
}


# --------------------------------------------------------------------------------------------
# Feature selection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSelection:
    """Which (feature, scale) pairs an ilastik project computes.

    Attributes
    ----------
    feature_ids : tuple of str
        Row labels of ``matrix``, in the project's ``FeatureSelections/FeatureIds`` order.
    scales : tuple of float
        Column labels of ``matrix``, in the project's ``FeatureSelections/Scales`` order.
    matrix : (n_ids, n_scales) ndarray of bool
        ``matrix[i, j]`` is True when feature ``feature_ids[i]`` is computed at ``scales[j]``.
    compute_in_2d : tuple of bool
        Per scale; only changes the feature names (2-D images are always filtered in 2-D).
    """

    feature_ids: tuple[str, ...]
    scales: tuple[float, ...]
    matrix: np.ndarray
    compute_in_2d: tuple[bool, ...]

    def __post_init__(self) -> None:
        # Normalise the fields so that equal selections compare and hash equal, and make the
        # matrix read-only: the dataclass is frozen and its hash depends on the matrix.
        matrix = np.array(self.matrix, dtype=bool)
        matrix.flags.writeable = False
        object.__setattr__(self, "feature_ids", tuple(str(f) for f in self.feature_ids))
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        object.__setattr__(self, "compute_in_2d", tuple(bool(b) for b in self.compute_in_2d))
        object.__setattr__(self, "matrix", matrix)
        _validate(self.feature_ids, self.scales, matrix, self.compute_in_2d, "feature selection")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeatureSelection):
            return NotImplemented
        return (
            self.feature_ids == other.feature_ids
            and self.scales == other.scales
            and self.compute_in_2d == other.compute_in_2d
            and np.array_equal(self.matrix, other.matrix)
        )

    def __hash__(self) -> int:
        return hash((self.feature_ids, self.scales, self.compute_in_2d, self.matrix.tobytes()))

    @classmethod
    def from_h5(cls, group: h5py.Group, source: str) -> FeatureSelection:
        """Read a project's ``FeatureSelections`` group.

        Parameters
        ----------
        group : h5py.Group
            The ``FeatureSelections`` group of an ``.ilp`` file.
        source : str
            Name of the file, used as the prefix of error messages.

        Returns
        -------
        FeatureSelection
            The selection, with ``compute_in_2d`` all False when ``ComputeIn2d`` is missing.

        Raises
        ------
        SteinpixError
            When a dataset is missing or invalid, a feature id is unknown, the shapes disagree
            or nothing is selected.
        """
        where = f"{source}: {group.name}"
        for name in ("FeatureIds", "Scales", "SelectionMatrix"):
            if name not in group:
                raise SteinpixError(
                    f"{where} has no {name}: no features were selected in ilastik "
                    "(open the project in ilastik and select features first)"
                )
        try:
            raw_ids = np.asarray(group["FeatureIds"][()]).reshape(-1)
            ids = tuple(v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in raw_ids)
            scales = np.asarray(group["Scales"][()], dtype=np.float64).reshape(-1)
            matrix = np.asarray(group["SelectionMatrix"][()])
            if "ComputeIn2d" in group:
                in_2d = np.asarray(group["ComputeIn2d"][()]).reshape(-1)
            else:
                in_2d = np.zeros(len(scales), dtype=bool)
        except (TypeError, ValueError, UnicodeDecodeError) as e:
            raise SteinpixError(f"{where}: unreadable feature selection ({e})") from e
        if matrix.dtype != np.bool_ and not np.isin(matrix, (0, 1)).all():
            raise SteinpixError(f"{where}/SelectionMatrix is not boolean")
        if matrix.shape != (len(ids), len(scales)):
            raise SteinpixError(
                f"{where}/SelectionMatrix has shape {matrix.shape}, but there are "
                f"{len(ids)} feature ids and {len(scales)} scales"
            )
        if len(in_2d) != len(scales):
            raise SteinpixError(
                f"{where}/ComputeIn2d has {len(in_2d)} values for {len(scales)} scales"
            )
        scales_t = tuple(float(v) for v in scales)
        in_2d_t = tuple(bool(b) for b in in_2d)
        _validate(ids, scales_t, matrix.astype(bool), in_2d_t, where)
        return cls(ids, scales_t, matrix.astype(bool), in_2d_t)

    def selected_scales(self) -> list[int]:
        """Indices of the scales that have at least one selected feature, in project order."""
        return [j for j in range(len(self.scales)) if self.matrix[:, j].any()]

    def n_features(self, n_channels: int) -> int:
        """Number of feature columns for an image with ``n_channels`` channels."""
        per_channel = sum(
            _N_OUT[fid] * int(self.matrix[i].sum()) for i, fid in enumerate(self.feature_ids)
        )
        return per_channel * n_channels

    def halo(self) -> int:
        """Rows of context a strip needs on each side to match a whole-image computation.

        Returns
        -------
        int
            The largest sum of the radii of the chained 1-D filters (presmoothing, then the
            feature's own filters) over all selected (feature, scale) pairs.
        """
        halo = 0
        for i, fid in enumerate(self.feature_ids):
            for j, scale in enumerate(self.scales):
                if self.matrix[i, j]:
                    halo = max(halo, _presmooth_radius(scale) + _feature_chain_radius(fid, scale))
        return halo

    def min_size(self) -> int:
        """Smallest Y and X ilastik accepts: ``max(ceil(3.5 * s) + 1)`` over selected scales."""
        return max(_min_size_for_scale(self.scales[j]) for j in self.selected_scales())


def _validate(
    ids: tuple[str, ...],
    scales: tuple[float, ...],
    matrix: np.ndarray,
    in_2d: tuple[bool, ...],
    where: str,
) -> None:
    """Raise SteinpixError when a selection is not something ilastik could have written."""
    unknown = [f for f in ids if f not in _N_OUT]
    if unknown:
        raise SteinpixError(
            f"{where}: unknown feature id {unknown[0]!r} (known: {', '.join(FEATURE_IDS)})"
        )
    if len(set(ids)) != len(ids):
        raise SteinpixError(f"{where}: feature ids are not unique: {list(ids)}")
    if matrix.shape != (len(ids), len(scales)):
        raise SteinpixError(
            f"{where}: selection matrix has shape {matrix.shape}, but there are "
            f"{len(ids)} feature ids and {len(scales)} scales"
        )
    if len(in_2d) != len(scales):
        raise SteinpixError(f"{where}: {len(in_2d)} ComputeIn2d values for {len(scales)} scales")
    bad = [s for j, s in enumerate(scales) if matrix[:, j].any() and not 0 < s < 1e4]
    if bad:
        raise SteinpixError(f"{where}: invalid feature scale {bad[0]} (must be > 0 and finite)")
    if not matrix.any():
        raise SteinpixError(f"{where}: no features are selected")


def feature_names(selection: FeatureSelection, n_channels: int) -> list[str]:
    """ilastik's names of the feature columns (``ClassifierForests/feature_names``).

    Parameters
    ----------
    selection : FeatureSelection
        The project's feature selection.
    n_channels : int
        Number of image channels.

    Returns
    -------
    list of str
        One name per column of :func:`compute_features`' output, e.g.
        ``"Structure Tensor Eigenvalues (σ=1.0) in 2D [5]"``.
    """
    names = []
    for i, fid in enumerate(selection.feature_ids):
        for j, scale in enumerate(selection.scales):
            if not selection.matrix[i, j]:
                continue
            block = f"{_DISPLAY_NAMES[fid]} (σ={scale})"
            if selection.compute_in_2d[j]:
                block += " in 2D"
            n_block = n_channels * _N_OUT[fid]
            if n_block > 1:
                names.extend(f"{block} [{m}]" for m in range(n_block))
            else:
                names.append(block)
    return names


# --------------------------------------------------------------------------------------------
# Kernels (fastfilters_kernel_fir_gaussian, spec 2.4)
# --------------------------------------------------------------------------------------------


def kernel_radius(sigma: float, window: float) -> int:
    """Radius K of a fastfilters Gaussian kernel: ``floor(window * sigma + 0.5)``.

    Parameters
    ----------
    sigma : float
        Standard deviation in pixels.
    window : float
        Window ratio (2.0 for features, 3.5 for presmoothing); rounded to float32 like
        fastfilters stores it.

    Returns
    -------
    int
        The kernel radius; 0 means the filter is an identity copy.
    """
    if abs(sigma) < 1e-6:
        return 0
    return int(math.floor(float(np.float32(window)) * sigma + 0.5))


def gaussian_kernel(order: int, sigma: float, window: float) -> np.ndarray:
    """Half of a fastfilters Gaussian (derivative) kernel, coefficients 0..K.

    Built in double precision with float32 stores at the points fastfilters stores them.
    Symmetric kernels (order 0 and 2) are applied as ``c0*x[i] + sum c_t*(x[i+t] + x[i-t])``,
    the antisymmetric one (order 1) as ``c0*x[i] + sum c_t*(x[i+t] - x[i-t])``.

    Parameters
    ----------
    order : int
        Derivative order, 0, 1 or 2.
    sigma : float
        Standard deviation in pixels.
    window : float
        Window ratio, see :func:`kernel_radius`.

    Returns
    -------
    (K + 1,) ndarray of float32
        The coefficients. For K = 0 the filter is an identity copy and ``[1.0]`` is returned.
    """
    if order not in (0, 1, 2):
        raise ValueError(f"derivative order must be 0, 1 or 2, not {order}")
    radius = kernel_radius(sigma, window)
    if radius == 0:
        return np.ones(1, dtype=np.float32)
    a = -0.5 / sigma / sigma
    if order == 0:
        norm = 1.0 / (math.sqrt(2.0 * math.pi) * sigma)
    else:
        norm = -1.0 / (math.sqrt(2.0 * math.pi) * math.pow(sigma, 3))
    coefs = np.empty(radius + 1, dtype=np.float32)
    for t in range(radius + 1):
        g = norm * math.exp(float(t * t) * a)
        if order == 0:
            coefs[t] = g
        elif order == 1:
            coefs[t] = t * g
        else:
            coefs[t] = (1.0 - (t / sigma) * (t / sigma)) * g
    c = [float(v) for v in coefs]  # the stored float32 values, as doubles
    if order == 2:
        # Remove the DC part, in double from the float32 coefficients.
        dc = c[0]
        for t in range(1, radius + 1):
            dc += 2.0 * c[t]
        dc /= 2.0 * radius + 1.0
        coefs[:] = [v - dc for v in c]
        c = [float(v) for v in coefs]
    if order == 0:
        total = c[0]
        for t in range(1, radius + 1):
            total += 2.0 * c[t]
    else:
        # sum_t c_t * (-t)^o / o! + sign * c_t * t^o / o!, sign = -1 for the odd kernel
        faculty = float(math.factorial(order))
        sign = 1.0 if order == 2 else -1.0
        total = 0.0
        for t in range(1, radius + 1):
            total += c[t] * math.pow(-float(t), order) / faculty
            total += (sign * c[t]) * math.pow(float(t), order) / faculty
    coefs[:] = [v / total for v in c]
    if order == 1:
        coefs = -coefs  # c0 = -(-0.0 / S) = +0.0, as in fastfilters; its sign never matters
    return coefs


def _presmooth_sigma(scale: float) -> float:
    """Sigma of the presmoothing at ``scale``: sqrt(s^2 - 1) above 1, else s itself."""
    return math.sqrt(scale**2 - 1.0) if scale > 1.0 else scale


def _feature_sigma(scale: float) -> float:
    """Sigma of the feature filters applied to the presmoothed image."""
    return 1.0 if scale > 1.0 else scale


def _presmooth_radius(scale: float) -> int:
    return kernel_radius(_presmooth_sigma(scale), _PRESMOOTH_WINDOW)


def _feature_chain_radius(fid: str, scale: float) -> int:
    """Sum of the radii of the 1-D filters a feature chains after the presmoothing."""
    sigma = _feature_sigma(scale)
    radius = kernel_radius(sigma, _FEATURE_WINDOW)
    if fid == "DifferenceOfGaussians":
        return max(radius, kernel_radius(_DOG_FACTOR * sigma, _FEATURE_WINDOW))
    if fid == "StructureTensorEigenvalues":
        return kernel_radius(_STE_GRADIENT_FACTOR * sigma, _FEATURE_WINDOW) + radius
    return radius


def _min_size_for_scale(scale: float) -> int:
    return math.ceil(3.5 * scale) + 1


# --------------------------------------------------------------------------------------------
# Plan: everything the numba kernels need, as flat arrays
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Kernels, jobs and output columns of one (selection, channel count), for numba."""

    pre_coefs: np.ndarray  # (S, KP + 1) float32, presmoothing kernel per selected scale
    pre_radius: np.ndarray  # (S,) int64
    coefs: np.ndarray  # (S, 6, KF + 1) float32, feature kernels (_K_* order)
    radius: np.ndarray  # (S, 6) int64
    x_jobs: np.ndarray  # (S, 6, 3) int64: ring, kernel, odd; ring -1 ends the list
    y_jobs: np.ndarray  # (S, 10, 4) int64: tmp row, ring, kernel, odd; tmp -1 ends the list
    columns: np.ndarray  # (S, 6, C, 2) int64 output column per (feature, channel, eigenvalue)
    ring_rows: int  # rows per ring buffer
    n_features: int


def _make_plan(selection: FeatureSelection, n_channels: int) -> _Plan:
    """Kernels, x-/y-pass jobs, output columns and ring size for the numba stages.

    Parameters
    ----------
    selection : FeatureSelection
        The project's feature selection.
    n_channels : int
        Number of image channels.

    Returns
    -------
    _Plan
        Arrays indexed by selected scale (scales without any selected feature are dropped).
    """
    scale_idx = selection.selected_scales()
    n_sel = len(scale_idx)
    pre = [
        gaussian_kernel(0, _presmooth_sigma(selection.scales[j]), _PRESMOOTH_WINDOW)
        for j in scale_idx
    ]
    kernels = []
    for j in scale_idx:
        sigma = _feature_sigma(selection.scales[j])
        grad_sigma = _STE_GRADIENT_FACTOR * sigma
        kernels.append(
            [
                gaussian_kernel(0, sigma, _FEATURE_WINDOW),
                gaussian_kernel(1, sigma, _FEATURE_WINDOW),
                gaussian_kernel(2, sigma, _FEATURE_WINDOW),
                gaussian_kernel(0, _DOG_FACTOR * sigma, _FEATURE_WINDOW),
                gaussian_kernel(0, grad_sigma, _FEATURE_WINDOW),
                gaussian_kernel(1, grad_sigma, _FEATURE_WINDOW),
            ]
        )
    pre_coefs = np.zeros((n_sel, max(len(k) for k in pre)), dtype=np.float32)
    pre_radius = np.zeros(n_sel, dtype=np.int64)
    for s, k in enumerate(pre):
        pre_coefs[s, : len(k)] = k
        pre_radius[s] = len(k) - 1
    kf = max(len(k) for ks in kernels for k in ks)
    coefs = np.zeros((n_sel, 6, kf), dtype=np.float32)
    radius = np.zeros((n_sel, 6), dtype=np.int64)
    for s, ks in enumerate(kernels):
        for k, kern in enumerate(ks):
            coefs[s, k, : len(kern)] = kern
            radius[s, k] = len(kern) - 1

    columns = np.full((n_sel, 6, n_channels, 2), -1, dtype=np.int64)
    col = 0
    for i, fid in enumerate(selection.feature_ids):
        code = FEATURE_IDS.index(fid)
        for s, j in enumerate(scale_idx):
            if selection.matrix[i, j]:
                for c in range(n_channels):
                    for e in range(_N_OUT[fid]):
                        columns[s, code, c, e] = col
                        col += 1

    x_jobs = np.full((n_sel, len(_X_JOBS), 3), -1, dtype=np.int64)
    y_jobs = np.full((n_sel, len(_Y_JOBS), 4), -1, dtype=np.int64)
    ring_rows = 1
    for s in range(n_sel):
        features = [f for f in range(6) if columns[s, f, 0, 0] >= 0]
        tmps = sorted({t for f in features for t in _FEATURE_TMP[f]})
        for n, t in enumerate(tmps):
            y_jobs[s, n] = (t, *_Y_JOBS[t])
        rings = {_Y_JOBS[t][0] for t in tmps} & set(_X_JOBS)
        if _STE in features:
            rings |= {_R_XGRAD0, _R_XGRAD1}
        for n, r in enumerate(sorted(rings)):
            x_jobs[s, n] = (r, *_X_JOBS[r])
        # The x-filtered rows run up to `ahead` rows in front of the output row y (the
        # structure tensor needs gradient rows up to y + K + Kg) and are read back down to
        # y - K, or, for the tensor rows that prime a chunk, to y - K - Kg.
        k, kd, kg = radius[s, _K_G0], radius[s, _K_DOG], radius[s, _K_GRAD0]
        ahead = max(k, kd, k + kg)
        ring_rows = max(ring_rows, ahead + 1 + max(k, kd) + kg)
    return _Plan(pre_coefs, pre_radius, coefs, radius, x_jobs, y_jobs, columns, int(ring_rows), col)


N_RINGS = _N_RINGS


def ring_rows(selection: FeatureSelection, n_channels: int) -> int:
    """Rows of each of the ``N_RINGS`` ring buffers per (channel, scale) that a thread of the
    feature stage keeps (for memory budgets)."""
    return _make_plan(selection, n_channels).ring_rows


# --------------------------------------------------------------------------------------------
# numba kernels: 1-D convolution with fastfilters' rounding
# --------------------------------------------------------------------------------------------
# The stage kernels (_xpass_rows, _ypass_rows, _feature_rows) are nogil functions that
# compute_features runs on row chunks from a thread pool; no numba parallel=True, which would
# add a lot of compile time.

_jit = njit(cache=True, nogil=True)


@intrinsic
def _fma(typingctx, p, c, acc):
    """fma(p, c, acc) on float32 values with a single rounding (LLVM's ``llvm.fma.f32``).

    This is the operation that fastfilters' AVX+FMA code and GCC's contracted scalar code
    execute. LLVM emits the hardware instruction (vectorised as ``vfmadd...ps``) on CPUs with
    FMA and a correctly rounded ``fmaf`` call elsewhere. The spec's numpy emulation
    ``f32(f64(p) * f64(c) + f64(acc))`` gives the same value except after a rare double
    rounding, where this is the value ilastik computed.
    """
    if not all(t == types.float32 for t in (p, c, acc)):
        return None
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType()] * 3)
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.f32")
        return builder.call(fn, args)

    return sig, codegen


# Width of the register-blocked tap loops: _VECS accumulators of 8 float32 lanes. Zen 3 (and
# most FMA CPUs) can start two FMAs per cycle with a latency of 4, so 8 independent chains
# keep both pipes busy; the loads of the two taps per FMA are the real bound.
_VECS = 8
_BLOCK = 8 * _VECS


def _make_taps(n_vec):
    """An intrinsic computing 8 * n_vec pixels of a sequential-FMA filter, taps innermost."""

    @intrinsic
    def taps(typingctx, src, offs, x, k, coefs, odd, dst, dst_pos):
        """``dst[dst_pos + i]`` for i < 8 * n_vec: ``acc = c0 * src[offs[0] + x + i]``, then
        ``acc = fma(src[offs[2t - 1] + x + i] +/- src[offs[2t] + x + i], c_t, acc)`` for
        t = 1..k (minus for ``odd``). Every pixel keeps its own accumulator and the order of
        its FMAs, so the result equals the scalar loop bit for bit; only the loop nest
        differs (taps inside, n_vec independent vector accumulators in registers), which
        needs two loads per FMA instead of three loads and a store.
        """
        arrays = (src, offs, coefs, dst)
        if not all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
                   for a in arrays):
            return None
        if not (src.dtype == coefs.dtype == dst.dtype == types.float32
                and offs.dtype == types.int64):
            return None
        sig = types.void(src, offs, types.intp, types.intp, coefs, types.boolean, dst,
                         types.intp)

        def codegen(context, builder, signature, args):
            data = [
                context.make_array(signature.args[i])(context, builder, args[i]).data
                for i in (0, 1, 4, 6)
            ]
            src_p, offs_p, coef_p, dst_p = data
            x, k, odd, dst_pos = args[2], args[3], args[5], args[7]
            i32, i64 = ir.IntType(32), ir.IntType(64)
            vec = ir.VectorType(ir.FloatType(), 8)
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vec, [vec] * 3), "llvm.fma.v8f32"
            )
            zeros = ir.Constant(ir.VectorType(i32, 8), [0] * 8)

            def splat(value):
                one = builder.insert_element(ir.Constant(vec, ir.Undefined), value, i32(0))
                return builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined), zeros)

            def load(base, b):
                ptr = builder.gep(src_p, [builder.add(base, i64(8 * b))])
                return builder.load(builder.bitcast(ptr, vec.as_pointer()), align=4)

            def offset(j):
                return builder.add(builder.load(builder.gep(offs_p, [j])), x)

            c0 = splat(builder.load(coef_p))
            mid = offset(i64(0))
            accs = [cgutils.alloca_once(builder, vec) for _ in range(n_vec)]
            for b, acc in enumerate(accs):
                builder.store(builder.fmul(c0, load(mid, b)), acc)

            def tap_loop(combine):
                with cgutils.for_range(builder, k) as loop:
                    t = builder.add(loop.index, i64(1))
                    ct = splat(builder.load(builder.gep(coef_p, [t])))
                    hi = offset(builder.sub(builder.add(t, t), i64(1)))
                    lo = offset(builder.add(t, t))
                    for b, acc in enumerate(accs):
                        pair = combine(load(hi, b), load(lo, b))
                        builder.store(builder.call(fma, [pair, ct, builder.load(acc)]), acc)

            with builder.if_else(odd) as (then, otherwise):
                with then:
                    tap_loop(builder.fsub)
                with otherwise:
                    tap_loop(builder.fadd)
            for b, acc in enumerate(accs):
                ptr = builder.gep(dst_p, [builder.add(dst_pos, i64(8 * b))])
                builder.store(builder.load(acc), builder.bitcast(ptr, vec.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return taps


_taps_block = _make_taps(_VECS)
_taps_vec = _make_taps(1)


@_jit
def _taps_row(src, offs, k, coefs, odd, dst, dst_pos, x0, x1):
    """``_taps_block`` for pixels x0..x1 (to ``dst[dst_pos + x - x0]``): blocks of _BLOCK
    pixels, then of 8, then scalar code with the same operations."""
    x = x0
    while x + _BLOCK <= x1:
        _taps_block(src, offs, x, k, coefs, odd, dst, dst_pos + x - x0)
        x += _BLOCK
    while x + 8 <= x1:
        _taps_vec(src, offs, x, k, coefs, odd, dst, dst_pos + x - x0)
        x += 8
    c0 = coefs[0]
    for i in range(x, x1):
        acc = c0 * src[offs[0] + i]
        for t in range(1, k + 1):
            a, b = src[offs[2 * t - 1] + i], src[offs[2 * t] + i]
            acc = _fma(a - b if odd else a + b, coefs[t], acc)
        dst[dst_pos + i - x0] = acc


@_jit
def _mirror(j, n):
    """Mirror index without repeating the edge (scipy's mode="mirror"); needs |overshoot| < n."""
    if j < 0:
        return -j
    if j >= n:
        return 2 * n - 2 - j
    return j


@_jit
def _copy(src, dst):
    for x in range(dst.shape[0]):
        dst[x] = src[x]


@_jit
def _pad_row(src, radius, pad):
    """pad[radius + i] = src[mirror(i)] for i in [-radius, n + radius)."""
    n = src.shape[0]
    _copy(src, pad[radius : radius + n])
    for t in range(1, radius + 1):
        pad[radius - t] = src[t]
        pad[radius + n - 1 + t] = src[n - 1 - t]


@_jit
def _border_133(p, j, k, coefs, sgn, left):
    """One left (or right) border pixel of the 1.3.3 scalar code, K = 2..5 (Appendix A)."""
    zero = np.float32(0.0)
    p0 = p[j]
    p1 = p[j + 1] + sgn * p[j - 1]
    p2 = p[j + 2] + sgn * p[j - 2]
    p3 = p[j + 3] + sgn * p[j - 3] if k >= 3 else zero
    p4 = p[j + 4] + sgn * p[j - 4] if k >= 4 else zero
    p5 = p[j + 5] + sgn * p[j - 5] if k >= 5 else zero
    c0, c1, c2 = coefs[0], coefs[1], coefs[2]
    c3 = coefs[3] if k >= 3 else zero
    c4 = coefs[4] if k >= 4 else zero
    c5 = coefs[5] if k >= 5 else zero
    if left:
        if k == 2:  # pixel 1
            return _fma(p2, c2, _fma(p0, c0, c1 * p1))
        if k == 3:  # pixel 2
            return _fma(p3, c3, _fma(p2, c2, _fma(p0, c0, c1 * p1)))
        s = _fma(p1, c1, c0 * p0) + _fma(p3, c3, c2 * p2)  # K = 5
        return s + _fma(p5, c5, c4 * p4)
    if k == 4:
        return _fma(p2, c2, _fma(p1, c1, c0 * p0)) + _fma(p4, c4, c3 * p3)
    s = _fma(p3, c3, _fma(p2, c2, _fma(p1, c1, c0 * p0)))  # K = 5
    return s + _fma(p5, c5, c4 * p4)


@_jit
def _scalar_133(p, radius, coefs, odd, lo, hi, dst):
    """Pixels lo..hi of fastfilters' scalar x-pass code in the 1.3.3 build (Appendix A).

    GCC reassociated the code specialised for radius K <= 5; where the table says SEQ,
    ``dst`` keeps the sequential FMA value it already holds. ``p`` is the mirror-padded row
    (pixel i at p[i + K]).

    The "tail" pixels are read through views indexed from 0, so that numba adds no
    negative-index checks and the loops vectorise. The odd kernel's ``a - b`` is written as
    ``a + (-1) * b``, which is exact.
    """
    k = radius
    n = dst.shape[0]
    if k > 5 or hi <= lo:
        return
    sgn = np.float32(-1.0) if odd else np.float32(1.0)
    # left border: only these pixels differ from SEQ
    for i in range(lo, min(hi, k)):
        if (k == 2 and i == 1) or (k == 3 and i == 2) or k == 5:
            dst[i] = _border_133(p, i + k, k, coefs, sgn, True)
    if k >= 4:  # right border
        for i in range(max(lo, n - k, k), hi):
            dst[i] = _border_133(p, i + k, k, coefs, sgn, False)
    t0, t1 = max(lo, k), min(hi, n - k)
    if t1 <= t0:
        return
    m = t1 - t0
    d = dst[t0:t1]
    c0, c1 = coefs[0], coefs[1]
    v0 = p[t0 + k : t1 + k]
    a1, b1 = p[t0 + k + 1 : t1 + k + 1], p[t0 + k - 1 : t1 + k - 1]
    if k == 1:
        for x in range(m):
            d[x] = _fma(v0[x], c0, c1 * (a1[x] + sgn * b1[x]))
        return
    c2 = coefs[2]
    a2, b2 = p[t0 + k + 2 : t1 + k + 2], p[t0 + k - 2 : t1 + k - 2]
    if k == 2:
        for x in range(m):
            p1, p2 = a1[x] + sgn * b1[x], a2[x] + sgn * b2[x]
            d[x] = _fma(v0[x], c0, _fma(p1, c1, c2 * p2))
        return
    c3 = coefs[3]
    a3, b3 = p[t0 + k + 3 : t1 + k + 3], p[t0 + k - 3 : t1 + k - 3]
    if k == 3:
        for x in range(m):
            p1, p2, p3 = a1[x] + sgn * b1[x], a2[x] + sgn * b2[x], a3[x] + sgn * b3[x]
            d[x] = (c0 * v0[x] + c2 * p2) + (c1 * p1 + c3 * p3)
        return
    c4 = coefs[4]
    a4, b4 = p[t0 + k + 4 : t1 + k + 4], p[t0 + k - 4 : t1 + k - 4]
    if k == 4:
        for x in range(m):
            p1, p2, p3 = a1[x] + sgn * b1[x], a2[x] + sgn * b2[x], a3[x] + sgn * b3[x]
            p4 = a4[x] + sgn * b4[x]
            d[x] = _fma(v0[x], c0, _fma(p1, c1, c2 * p2) + _fma(p3, c3, c4 * p4))
        return
    c5 = coefs[5]
    a5, b5 = p[t0 + k + 5 : t1 + k + 5], p[t0 + k - 5 : t1 + k - 5]
    for x in range(m):
        p1, p2, p3 = a1[x] + sgn * b1[x], a2[x] + sgn * b2[x], a3[x] + sgn * b3[x]
        p4, p5 = a4[x] + sgn * b4[x], a5[x] + sgn * b5[x]
        b = _fma(p1, c1, c2 * p2) + _fma(p3, c3, c4 * p4)
        d[x] = _fma(v0[x], c0, c5 * p5) + b


@_jit
def _scalar_14x(p, radius, coefs, odd, lo, hi, dst):
    """Pixels lo..hi of the 1.4.x build's scalar code: in order, no FMA (spec section 5)."""
    k = radius
    m = hi - lo
    if m <= 0:
        return
    d = dst[lo:hi]
    v0 = p[lo + k : hi + k]
    c0 = coefs[0]
    for x in range(m):
        d[x] = c0 * v0[x]
    for t in range(1, k + 1):
        ct = coefs[t]
        a = p[lo + k + t : hi + k + t]
        b = p[lo + k - t : hi + k - t]
        if odd:
            for x in range(m):
                d[x] = d[x] + ct * (a[x] - b[x])
        else:
            for x in range(m):
                d[x] = d[x] + ct * (a[x] + b[x])


@_jit
def _seq_padded(p, radius, coefs, odd, dst):
    """Sequential FMA, F(K, ... F(1, m_0)), for every pixel of a mirror-padded row.

    Radii 1 and 2 (all feature filters) are loops over x that LLVM vectorises; larger radii
    (the presmoothing) run the register-blocked :func:`_taps_row`.
    """
    n = dst.shape[0]
    k = radius
    c0 = coefs[0]
    if k == 1:
        c1 = coefs[1]
        if odd:
            for x in range(n):
                dst[x] = _fma(p[x + 2] - p[x], c1, c0 * p[x + 1])
        else:
            for x in range(n):
                dst[x] = _fma(p[x + 2] + p[x], c1, c0 * p[x + 1])
        return
    if k == 2:
        c1, c2 = coefs[1], coefs[2]
        if odd:
            for x in range(n):
                acc = _fma(p[x + 3] - p[x + 1], c1, c0 * p[x + 2])
                dst[x] = _fma(p[x + 4] - p[x], c2, acc)
        else:
            for x in range(n):
                acc = _fma(p[x + 3] + p[x + 1], c1, c0 * p[x + 2])
                dst[x] = _fma(p[x + 4] + p[x], c2, acc)
        return
    offs = np.empty(2 * k + 1, dtype=np.int64)
    offs[0] = k
    for t in range(1, k + 1):
        offs[2 * t - 1] = k + t
        offs[2 * t] = k - t
    _taps_row(p, offs, k, coefs, odd, dst, 0, 0, n)


@_jit
def _xpass_padded(padded, margin, coefs, radius, odd, unfused, dst):
    """Convolve one row along x like fastfilters' AVX "inner" filter (spec 2.5).

    Parameters
    ----------
    padded : (n + 2 * margin,) ndarray of float32
        The mirror-padded input row (see :func:`_pad_row`); it may be padded more than the
        kernel needs, so that one padding serves several kernels.
    margin : int
        Padding on each side, >= radius.
    coefs : (>= radius + 1,) ndarray of float32
        Kernel half, see :func:`gaussian_kernel`.
    radius : int
        Kernel radius K (< n); 0 copies the row.
    odd : bool
        True for the antisymmetric (first-derivative) kernel.
    unfused : bool
        Profile 14x: scalar regions in order and without FMA.
    dst : (n,) ndarray of float32
        Output row.
    """
    n = dst.shape[0]
    k = radius
    if k == 0:
        _copy(padded[margin : margin + n], dst)
        return
    p = padded[margin - k : margin + n + k]
    # Every pixel first gets the SIMD code's order (sequential FMA); the pixels that
    # fastfilters computes with scalar code are then redone where its order differs.
    _seq_padded(p, k, coefs, odd, dst)
    _scalar_spans(p, k, coefs, odd, unfused, dst)


@_jit
def _span_bounds(n, k):
    """``(s0, s1)``: fastfilters computes pixels 0..s0 and s1..n of a row of ``n`` pixels with
    scalar code for radius ``k``; its vector loop covers 8 pixels at a time from an aligned
    start to an end rounded down to 32 (none at all on short rows)."""
    avx_end = (n - k) & ~31
    xa = (k + 7) & ~7
    if avx_end > (xa + 31) & ~31:
        return xa, avx_end
    return n - k, n - k


@_jit
def _scalar_spans(p, k, coefs, odd, unfused, dst):
    """Redo the pixels of a row that fastfilters computes with scalar code (``p`` padded by
    exactly k): the spans of :func:`_span_bounds`."""
    n = dst.shape[0]
    s0, s1 = _span_bounds(n, k)
    if k <= 2 and not unfused:
        _spans_133_small(p, k, coefs, odd, s0, s1, dst)
        return
    for span in range(2):
        lo, hi = (0, s0) if span == 0 else (s1, n)
        if unfused:
            _scalar_14x(p, k, coefs, odd, lo, hi, dst)
        else:
            _scalar_133(p, k, coefs, odd, lo, hi, dst)


@_jit
def _spans_133_small(p, k, coefs, odd, s0, s1, dst):
    """:func:`_scalar_133` of the spans 0..s0 and s1..n for K = 1 or 2, reading ``p`` directly.

    The same operations for every pixel; but these spans are some twenty pixels, for which the
    views and vector loops of the general code cost more than the pixels (stage 2 redoes them
    nine times per row, channel and scale: 4 % of the compute).
    """
    n = dst.shape[0]
    sgn = np.float32(-1.0) if odd else np.float32(1.0)
    c0, c1 = coefs[0], coefs[1]
    c2 = coefs[2] if k == 2 else np.float32(0.0)
    for span in range(2):
        lo, hi = (0, s0) if span == 0 else (s1, n)
        if hi <= lo:
            continue
        if k == 2 and lo <= 1 < hi:  # the left border's only pixel that differs from SEQ
            dst[1] = _border_133(p, 1 + k, k, coefs, sgn, True)
        for x in range(max(lo, k), min(hi, n - k)):
            j = x + k
            if k == 1:
                dst[x] = _fma(p[j], c0, c1 * (p[j + 1] + sgn * p[j - 1]))
            else:
                p1 = p[j + 1] + sgn * p[j - 1]
                p2 = p[j + 2] + sgn * p[j - 2]
                dst[x] = _fma(p[j], c0, _fma(p1, c1, c2 * p2))


@_jit
def _ypass_row(rows, n_ring, y, height, coefs, radius, odd, dst):
    """One output row of a y-pass (sequential FMA everywhere, mirrored at 0 and height-1).

    Parameters
    ----------
    rows : (n_ring, W) ndarray of float32
        Source rows; image row r is ``rows[r % n_ring]`` (a ring buffer, or a whole plane with
        ``n_ring == height``).
    n_ring : int
        Number of rows in ``rows``.
    y : int
        Output row.
    height : int
        Image height (for the mirror border); radius < height.
    coefs, radius, odd
        Kernel, see :func:`_xpass_padded`.
    dst : (W,) ndarray of float32
        Output row.
    """
    w = dst.shape[0]
    k = radius
    mid = rows[y % n_ring]
    if k == 0:
        _copy(mid, dst)
        return
    c0 = coefs[0]
    hi1 = rows[_mirror(y + 1, height) % n_ring]
    lo1 = rows[_mirror(y - 1, height) % n_ring]
    c1 = coefs[1]
    if k == 1:
        if odd:
            for x in range(w):
                dst[x] = _fma(hi1[x] - lo1[x], c1, c0 * mid[x])
        else:
            for x in range(w):
                dst[x] = _fma(hi1[x] + lo1[x], c1, c0 * mid[x])
        return
    if k == 2:
        hi2 = rows[_mirror(y + 2, height) % n_ring]
        lo2 = rows[_mirror(y - 2, height) % n_ring]
        c2 = coefs[2]
        if odd:
            for x in range(w):
                acc = _fma(hi1[x] - lo1[x], c1, c0 * mid[x])
                dst[x] = _fma(hi2[x] - lo2[x], c2, acc)
        else:
            for x in range(w):
                acc = _fma(hi1[x] + lo1[x], c1, c0 * mid[x])
                dst[x] = _fma(hi2[x] + lo2[x], c2, acc)
        return
    for x in range(w):
        dst[x] = c0 * mid[x]
    for t in range(1, k + 1):
        ct = coefs[t]
        hi = rows[_mirror(y + t, height) % n_ring]
        lo = rows[_mirror(y - t, height) % n_ring]
        if odd:
            for x in range(w):
                dst[x] = _fma(hi[x] - lo[x], ct, dst[x])
        else:
            for x in range(w):
                dst[x] = _fma(hi[x] + lo[x], ct, dst[x])


# --------------------------------------------------------------------------------------------
# Stage 1: presmoothing
# --------------------------------------------------------------------------------------------


@_jit
def _xpass_rows(plane, coefs, radius, odd, unfused, y0, y1, out):
    """x-pass of rows y0..y1 of a (H, W) plane into ``out``."""
    pad = np.empty(plane.shape[1] + 2 * radius, dtype=np.float32)
    for y in range(y0, y1):
        _pad_row(plane[y], radius, pad)
        _xpass_padded(pad, radius, coefs, radius, odd, unfused, out[y])


@_jit
def _ypass_rows(plane, coefs, radius, odd, y0, y1, out):
    """y-pass of output rows y0..y1 of a whole (H, W) plane into ``out`` (C-contiguous)."""
    height, w = plane.shape
    k = radius
    if k <= 2:
        for y in range(y0, y1):
            _ypass_row(plane, height, y, height, coefs, radius, odd, out[y])
        return
    # offs[y - y0]: where each tap's source row starts (mirrored at the borders)
    offs = np.empty((y1 - y0, 2 * k + 1), dtype=np.int64)
    for y in range(y0, y1):
        o = offs[y - y0]
        o[0] = y * w
        for t in range(1, k + 1):
            o[2 * t - 1] = _mirror(y + t, height) * w
            o[2 * t] = _mirror(y - t, height) * w
    src, dst = plane.reshape(-1), out.reshape(-1)
    # Large kernels: one column block after the other, down all rows, so that the block's
    # 2K + 1 source rows stay in the L1 cache from one output row to the next (which then
    # loads one new row). Small kernels stream whole rows.
    width = _BLOCK if k > 16 else 2 * _BLOCK if k > 8 else w
    for x0 in range(0, w, width):
        x1 = min(w, x0 + width)
        for y in range(y0, y1):
            _taps_row(src, offs[y - y0], k, coefs, odd, dst, y * w + x0, x0, x1)


@_jit
def _presmooth_plane(img, coefs, radius, unfused, p0, p1, tmp, out):
    """Stage 1 of one (channel, scale): rows p0..p1 of ``out`` from a whole (H, W) channel.

    ``tmp`` (H, W) receives the x-filtered rows p0 - radius .. p1 + radius.
    """
    height = img.shape[0]
    y0, y1 = max(0, p0 - radius), min(height, p1 + radius)
    _xpass_rows(img, coefs, radius, False, unfused, y0, y1, tmp)
    _ypass_rows(tmp, coefs, radius, False, p0, p1, out)


# --------------------------------------------------------------------------------------------
# Stage 2: features, streamed row by row
# --------------------------------------------------------------------------------------------


@_jit
def _advance_x(plane, rings, coefs, radius, x_jobs, front, upto, n_ring, pad, unfused):
    """x-filter rows ``front[0] .. upto`` of a presmoothed plane into the ring buffers."""
    stop = min(upto, plane.shape[0] - 1)
    margin = 0
    for kern in range(radius.shape[0]):
        margin = max(margin, radius[kern])
    full = _x_full(x_jobs, radius)
    n = plane.shape[1]
    while front[0] <= stop:
        r = front[0]
        _pad_row(plane[r], margin, pad)  # once for all kernels
        if full:
            slot = r % n_ring
            _x_six(pad, coefs, rings, slot, n)
            for j in range(6):
                kern, odd = x_jobs[j, 1], x_jobs[j, 2] != 0
                k = radius[kern]
                _scalar_spans(pad[margin - k : margin + n + k], k, coefs[kern], odd, unfused,
                              rings[j, slot])
            front[0] = r + 1
            continue
        for j in range(x_jobs.shape[0]):
            ring, kern, odd = x_jobs[j, 0], x_jobs[j, 1], x_jobs[j, 2] != 0
            if ring < 0:
                break
            dst = rings[ring, r % n_ring]
            _xpass_padded(pad, margin, coefs[kern], radius[kern], odd, unfused, dst)
        front[0] = r + 1


@_jit
def _x_full(x_jobs, radius):
    """Whether the x-passes are all six rings with radii 2 (feature Gaussians) and 1 (the
    others), the case of :func:`_x_six`."""
    if x_jobs.shape[0] < 6:
        return False
    for j in range(6):
        if x_jobs[j, 0] != j:
            return False
    return (radius[_K_G0] == 2 and radius[_K_G1] == 2 and radius[_K_G2] == 2
            and radius[_K_DOG] == 1 and radius[_K_GRAD0] == 1 and radius[_K_GRAD1] == 1)


@_jit
def _x_six(pad, coefs, rings, slot, n):
    """The sequential-FMA x-passes of the six rings (see :func:`_x_full`) from one row padded
    by 2, as :func:`_seq_padded` computes them, in two loops over x instead of six."""
    g00, g01, g02 = coefs[_K_G0, 0], coefs[_K_G0, 1], coefs[_K_G0, 2]
    g10, g11, g12 = coefs[_K_G1, 0], coefs[_K_G1, 1], coefs[_K_G1, 2]
    g20, g21, g22 = coefs[_K_G2, 0], coefs[_K_G2, 1], coefs[_K_G2, 2]
    gd0, gd1 = coefs[_K_DOG, 0], coefs[_K_DOG, 1]
    ga0, ga1 = coefs[_K_GRAD0, 0], coefs[_K_GRAD0, 1]
    gb0, gb1 = coefs[_K_GRAD1, 0], coefs[_K_GRAD1, 1]
    q0, q1, q2, q3, q4 = pad[0:n], pad[1 : n + 1], pad[2 : n + 2], pad[3 : n + 3], pad[4 : n + 4]
    o0, o1, o2 = rings[_R_X0, slot], rings[_R_X1, slot], rings[_R_X2, slot]
    for x in range(n):
        o0[x] = _fma(q4[x] + q0[x], g02, _fma(q3[x] + q1[x], g01, g00 * q2[x]))
        o1[x] = _fma(q4[x] - q0[x], g12, _fma(q3[x] - q1[x], g11, g10 * q2[x]))
        o2[x] = _fma(q4[x] + q0[x], g22, _fma(q3[x] + q1[x], g21, g20 * q2[x]))
    o3, o4, o5 = rings[_R_XDOG, slot], rings[_R_XGRAD0, slot], rings[_R_XGRAD1, slot]
    for x in range(n):
        o3[x] = _fma(q3[x] + q1[x], gd1, gd0 * q2[x])
        o4[x] = _fma(q3[x] + q1[x], ga1, ga0 * q2[x])
        o5[x] = _fma(q3[x] - q1[x], gb1, gb0 * q2[x])


@_jit
def _advance_tensor(plane, rings, coefs, radius, front, upto, n_ring, tmp, pad, unfused):
    """Structure tensor rows ``front[1] .. upto``: gradients, their products, x-smoothing.

    The x-filtered gradient rows up to ``upto + Kg`` must be in the rings already.
    """
    height = plane.shape[0]
    stop = min(upto, height - 1)
    kg = radius[_K_GRAD0]
    gx, gy = tmp[_T_GX], tmp[_T_GY]
    k = radius[_K_G0]
    n = plane.shape[1]
    if kg == 1 and k == 2:
        # the common case in fewer loops, the products straight into padded rows
        while front[1] <= stop:
            r = front[1]
            slot = r % n_ring
            _tensor_products(rings, n_ring, r, height, coefs, pad, n)
            for j in range(3):
                p = pad[1 + j, : n + 4]
                for t in range(1, 3):  # mirror, as _pad_row
                    p[2 - t] = p[2 + t]
                    p[n + 1 + t] = p[n + 1 - t]
            _x_three(pad, coefs[_K_G0], rings, slot, n)
            for j in range(3):
                _scalar_spans(pad[1 + j, : n + 4], 2, coefs[_K_G0], j < 0, unfused,
                              rings[_R_SXX + j, slot])
            front[1] = r + 1
        return
    while front[1] <= stop:
        r = front[1]
        # gx = conv(x: g1, y: g0) and gy = conv(x: g0, y: g1), both at sigma / 2
        for j in range(2):
            ring = _R_XGRAD1 if j == 0 else _R_XGRAD0
            kern = _K_GRAD0 if j == 0 else _K_GRAD1
            _ypass_row(rings[ring], n_ring, r, height, coefs[kern], kg, j == 1, tmp[_T_GX + j])
        pxx, pyy, pxy = tmp[_T_PXX], tmp[_T_PYY], tmp[_T_PXY]
        for x in range(gx.shape[0]):
            pxx[x] = gx[x] * gx[x]
            pyy[x] = gy[x] * gy[x]
            pxy[x] = gx[x] * gy[x]
        for j in range(3):  # smooth the products along x with g0(sigma)
            _pad_row(tmp[_T_PXX + j], k, pad[0])
            # `j < 0` is False, but as a run-time bool: a literal False would make numba
            # compile a second specialisation of _xpass_padded and everything it calls.
            dst = rings[_R_SXX + j, r % n_ring]
            _xpass_padded(pad[0], k, coefs[_K_G0], k, j < 0, unfused, dst)
        front[1] = r + 1


@_jit
def _tensor_products(rings, n_ring, r, height, coefs, pad, n):
    """Row r of the gradients (y-passes of radius 1) and their products, as
    :func:`_advance_tensor` computes them, into ``pad[1 + j, 2 : n + 2]`` (xx, yy, xy)."""
    lo, hi, mid = _mirror(r - 1, height) % n_ring, _mirror(r + 1, height) % n_ring, r % n_ring
    # gx = conv(x: g1, y: g0) and gy = conv(x: g0, y: g1), both at sigma / 2
    a_lo, a_mid, a_hi = rings[_R_XGRAD1, lo], rings[_R_XGRAD1, mid], rings[_R_XGRAD1, hi]
    b_lo, b_mid, b_hi = rings[_R_XGRAD0, lo], rings[_R_XGRAD0, mid], rings[_R_XGRAD0, hi]
    a0, a1 = coefs[_K_GRAD0, 0], coefs[_K_GRAD0, 1]
    b0, b1 = coefs[_K_GRAD1, 0], coefs[_K_GRAD1, 1]
    pxx, pyy, pxy = pad[1, 2 : n + 2], pad[2, 2 : n + 2], pad[3, 2 : n + 2]
    for x in range(n):
        gx = _fma(a_hi[x] + a_lo[x], a1, a0 * a_mid[x])
        gy = _fma(b_hi[x] - b_lo[x], b1, b0 * b_mid[x])
        pxx[x] = gx * gx
        pyy[x] = gy * gy
        pxy[x] = gx * gy


@_jit
def _x_three(pad, coefs, rings, slot, n):
    """The sequential-FMA x-passes (radius 2) of the three padded product rows
    ``pad[1 + j]`` into the rings of the structure tensor, as :func:`_seq_padded`."""
    c0, c1, c2 = coefs[0], coefs[1], coefs[2]
    for j in range(3):
        p = pad[1 + j]
        q0, q1, q2, q3, q4 = p[0:n], p[1 : n + 1], p[2 : n + 2], p[3 : n + 3], p[4 : n + 4]
        out = rings[_R_SXX + j, slot]
        for x in range(n):
            out[x] = _fma(q4[x] + q0[x], c2, _fma(q3[x] + q1[x], c1, c0 * q2[x]))


@_jit
def _eigenpair(xx, yy, xy):
    """Both eigenvalues of one pixel, in :func:`_eigenvalues`' order of operations."""
    half = np.float32(0.5)
    t0 = (xx + yy) * half
    t1 = (xx - yy) * half
    t1 = t1 * t1
    d = np.sqrt(t1 + xy * xy)
    return t0 + d, t0 - d


@_jit
def _eigenvalues(xx, yy, xy, big, small):
    """Eigenvalues of [[xx, xy], [xy, yy]] per pixel, in fastfilters' float32 order."""
    for x in range(xx.shape[0]):
        # d >= 0 and rounding is monotonic, so t0 + d is max(t0 + d, t0 - d).
        big[x], small[x] = _eigenpair(xx[x], yy[x], xy[x])


@_jit
def _combine(cols, tmp, scratch):
    """Turn the y-pass rows of one (channel, scale) into its feature rows in ``scratch``."""
    w = scratch.shape[1]
    if cols[_GS, 0] >= 0:
        _copy(tmp[_T_GS], scratch[cols[_GS, 0]])
    if cols[_LOG, 0] >= 0:
        log, yy, xx = scratch[cols[_LOG, 0]], tmp[_T_YY], tmp[_T_XX]
        for x in range(w):
            log[x] = yy[x] + xx[x]
    if cols[_GGM, 0] >= 0:
        ggm, dx, dy = scratch[cols[_GGM, 0]], tmp[_T_DX], tmp[_T_DY]
        for x in range(w):
            ggm[x] = np.sqrt(dy[x] * dy[x] + dx[x] * dx[x])
    if cols[_DOG, 0] >= 0:
        dog, gs, small = scratch[cols[_DOG, 0]], tmp[_T_GS], tmp[_T_DOG]
        for x in range(w):
            dog[x] = gs[x] - small[x]
    for f in (_STE, _HOG):
        if cols[f, 0] >= 0:
            if f == _STE:
                xx, yy, xy = tmp[_T_SXX], tmp[_T_SYY], tmp[_T_SXY]
            else:
                xx, yy, xy = tmp[_T_XX], tmp[_T_YY], tmp[_T_XY]
            _eigenvalues(xx, yy, xy, scratch[cols[f, 0]], scratch[cols[f, 1]])


@_jit
def _feature_row(
    plane, rings, coefs, radius, x_jobs, y_jobs, cols, front, y, n_ring, scratch, tmp, pad, unfused
):
    """All selected features of one (channel, scale) for output row ``y``, into ``scratch``.

    ``cols`` is the (6, 2) table of output columns (-1 when not selected); the features are
    written to ``scratch[col]``.
    """
    height = plane.shape[0]
    k, kd, kg = radius[_K_G0], radius[_K_DOG], radius[_K_GRAD0]
    ste = cols[_STE, 0] >= 0
    ahead = max(k, kd, k + kg) if ste else max(k, kd)
    _advance_x(plane, rings, coefs, radius, x_jobs, front, y + ahead, n_ring, pad[0], unfused)
    if ste:
        _advance_tensor(plane, rings, coefs, radius, front, y + k, n_ring, tmp, pad, unfused)
    if _is_full(cols, radius):
        _full_row(rings, n_ring, y, height, coefs, cols, scratch)
        return
    for j in range(y_jobs.shape[0]):
        t, ring, kern, odd = y_jobs[j, 0], y_jobs[j, 1], y_jobs[j, 2], y_jobs[j, 3] != 0
        if t < 0:
            break
        _ypass_row(rings[ring], n_ring, y, height, coefs[kern], radius[kern], odd, tmp[t])
    _combine(cols, tmp, scratch)


@_jit
def _is_full(cols, radius):
    """Whether a scale has all six features and the radii of every scale >= 1 (2 for the
    feature Gaussians and their derivatives, 1 for the smaller one of the difference of
    Gaussians), the case that :func:`_full_row` handles in one loop."""
    for f in range(6):
        if cols[f, 0] < 0:
            return False
    return (radius[_K_G0] == 2 and radius[_K_G1] == 2 and radius[_K_G2] == 2
            and radius[_K_DOG] == 1)


@_jit
def _rows5(rings, ring, m2, m1, r0, p1, p2):
    """Rows y - 2 .. y + 2 of a ring (slots given)."""
    return rings[ring, m2], rings[ring, m1], rings[ring, r0], rings[ring, p1], rings[ring, p2]


@_jit
def _full_row(rings, n_ring, y, height, coefs, cols, scratch):
    """The ten y-passes and the six features of one (channel, scale), in three loops.

    Exactly the operations of the ``_ypass_row`` calls and :func:`_combine` that they
    replace, in the same order for every pixel, but without writing the ten filtered rows to
    memory and reading them back. Only for the case of :func:`_is_full`. (Three loops, not
    one: LLVM vectorises a loop only while it can check the overlap of few arrays.)
    """
    m2, m1 = _mirror(y - 2, height) % n_ring, _mirror(y - 1, height) % n_ring
    p1, p2 = _mirror(y + 1, height) % n_ring, _mirror(y + 2, height) % n_ring
    r0 = y % n_ring
    g0, g1, g2 = coefs[_K_G0], coefs[_K_G1], coefs[_K_G2]
    g00, g01, g02 = g0[0], g0[1], g0[2]
    g10, g11, g12 = g1[0], g1[1], g1[2]
    g20, g21, g22 = g2[0], g2[1], g2[2]
    gd0, gd1 = coefs[_K_DOG, 0], coefs[_K_DOG, 1]
    w = scratch.shape[1]
    # Gaussian smoothing, Laplacian and Hessian eigenvalues
    am2, am1, a0, ap1, ap2 = _rows5(rings, _R_X0, m2, m1, r0, p1, p2)
    bm2, bm1, b0, bp1, bp2 = _rows5(rings, _R_X2, m2, m1, r0, p1, p2)
    cm2, cm1, c0, cp1, cp2 = _rows5(rings, _R_X1, m2, m1, r0, p1, p2)
    gs_out, log_out = scratch[cols[_GS, 0]], scratch[cols[_LOG, 0]]
    big, small = scratch[cols[_HOG, 0]], scratch[cols[_HOG, 1]]
    for x in range(w):
        gs_out[x] = _fma(ap2[x] + am2[x], g02, _fma(ap1[x] + am1[x], g01, g00 * a0[x]))
        yy = _fma(ap2[x] + am2[x], g22, _fma(ap1[x] + am1[x], g21, g20 * a0[x]))
        xx = _fma(bp2[x] + bm2[x], g02, _fma(bp1[x] + bm1[x], g01, g00 * b0[x]))
        xy = _fma(cp2[x] - cm2[x], g12, _fma(cp1[x] - cm1[x], g11, g10 * c0[x]))
        log_out[x] = yy + xx
        big[x], small[x] = _eigenpair(xx, yy, xy)
    # gradient magnitude and difference of Gaussians
    dm1, d0, dp1 = rings[_R_XDOG, m1], rings[_R_XDOG, r0], rings[_R_XDOG, p1]
    ggm_out, dog_out = scratch[cols[_GGM, 0]], scratch[cols[_DOG, 0]]
    for x in range(w):
        dy = _fma(ap2[x] - am2[x], g12, _fma(ap1[x] - am1[x], g11, g10 * a0[x]))
        dx = _fma(cp2[x] + cm2[x], g02, _fma(cp1[x] + cm1[x], g01, g00 * c0[x]))
        ggm_out[x] = np.sqrt(dy * dy + dx * dx)
        dog_out[x] = gs_out[x] - _fma(dp1[x] + dm1[x], gd1, gd0 * d0[x])
    # structure tensor eigenvalues
    am2, am1, a0, ap1, ap2 = _rows5(rings, _R_SXX, m2, m1, r0, p1, p2)
    bm2, bm1, b0, bp1, bp2 = _rows5(rings, _R_SYY, m2, m1, r0, p1, p2)
    cm2, cm1, c0, cp1, cp2 = _rows5(rings, _R_SXY, m2, m1, r0, p1, p2)
    big, small = scratch[cols[_STE, 0]], scratch[cols[_STE, 1]]
    for x in range(w):
        sxx = _fma(ap2[x] + am2[x], g02, _fma(ap1[x] + am1[x], g01, g00 * a0[x]))
        syy = _fma(bp2[x] + bm2[x], g02, _fma(bp1[x] + bm1[x], g01, g00 * b0[x]))
        sxy = _fma(cp2[x] + cm2[x], g02, _fma(cp1[x] + cm1[x], g01, g00 * c0[x]))
        big[x], small[x] = _eigenpair(sxx, syy, sxy)


@intrinsic
def _transpose8(typingctx, src, src_off, src_stride, dst, dst_off, dst_stride):
    """Transpose an 8x8 float32 block between two flat arrays with LLVM vector shuffles.

    Reads rows ``src[src_off + i * src_stride : ... + 8]`` for i < 8 and writes column i of
    that block to ``dst[dst_off + i * dst_stride : ... + 8]``. numba does not vectorise a
    transpose by itself; this is about six times faster than a scalar loop.
    """
    if not all(isinstance(t, types.Array) and t.dtype == types.float32 for t in (src, dst)):
        return None
    sig = types.void(src, types.intp, types.intp, dst, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        src_data = context.make_array(signature.args[0])(context, builder, args[0]).data
        dst_data = context.make_array(signature.args[3])(context, builder, args[3]).data
        intp = context.get_value_type(types.intp)
        vec = ir.VectorType(ir.FloatType(), 8)

        def mask(m):
            return ir.Constant(ir.VectorType(ir.IntType(32), 8), m)

        def address(data, off, stride, i):
            pos = builder.add(off, builder.mul(stride, ir.Constant(intp, i)))
            return builder.bitcast(builder.gep(data, [pos]), vec.as_pointer())

        rows = [builder.load(address(src_data, args[1], args[2], i), align=4) for i in range(8)]
        # Interleave pairs of rows, then pairs of pairs, then swap 128-bit halves.
        pairs = []
        for i in range(0, 8, 2):
            pairs.append(
                builder.shuffle_vector(rows[i], rows[i + 1], mask([0, 8, 1, 9, 4, 12, 5, 13]))
            )
            pairs.append(
                builder.shuffle_vector(rows[i], rows[i + 1], mask([2, 10, 3, 11, 6, 14, 7, 15]))
            )
        quads = []
        for h in (0, 4):
            lo01, hi01, lo23, hi23 = pairs[h : h + 4]
            quads.append(builder.shuffle_vector(lo01, lo23, mask([0, 1, 8, 9, 4, 5, 12, 13])))
            quads.append(builder.shuffle_vector(lo01, lo23, mask([2, 3, 10, 11, 6, 7, 14, 15])))
            quads.append(builder.shuffle_vector(hi01, hi23, mask([0, 1, 8, 9, 4, 5, 12, 13])))
            quads.append(builder.shuffle_vector(hi01, hi23, mask([2, 3, 10, 11, 6, 7, 14, 15])))
        # quads[j] (rows 0-3) and quads[4 + j] (rows 4-7) hold columns j and j + 4.
        for j in range(4):
            low = builder.shuffle_vector(quads[j], quads[4 + j], mask([0, 1, 2, 3, 8, 9, 10, 11]))
            high = builder.shuffle_vector(
                quads[j], quads[4 + j], mask([4, 5, 6, 7, 12, 13, 14, 15])
            )
            builder.store(low, address(dst_data, args[4], args[5], j), align=4)
            builder.store(high, address(dst_data, args[4], args[5], j + 4), align=4)
        return context.get_dummy_value()

    return sig, codegen


@_jit
def _transpose_row(scratch, out_row):
    """out_row[x, f] = scratch[f, x]: 8x8 vector blocks, scalar code for the remainders."""
    n_feat, w = scratch.shape
    src = scratch.reshape(n_feat * w)
    dst = out_row.reshape(w * n_feat)
    w8, f8 = w - w % 8, n_feat - n_feat % 8
    for x0 in range(0, w8, 8):
        for f0 in range(0, f8, 8):
            _transpose8(src, f0 * w + x0, w, dst, x0 * n_feat + f0, n_feat)
        for f in range(f8, n_feat):
            for x in range(x0, x0 + 8):
                out_row[x, f] = scratch[f, x]
    for x in range(w8, w):
        for f in range(n_feat):
            out_row[x, f] = scratch[f, x]


@_jit
def _row_state(planes, coefs, radius, columns, y0, n_feat):
    """Scratch space of stage 2 for output rows from ``y0`` on, for one thread, beside its ring
    buffers of x-filtered rows (shape :func:`ring_shape`, kept by the caller).

    Returns ``(scratch, tmp, pad, front)``: the (features, x) rows of one output row, the row
    temporaries, four padded rows and, per (channel, scale), the next x-filtered and
    structure-tensor rows. The fronts start far enough above y0 for every row the first output
    row depends on.
    """
    n_channels, n_scales, _, width = planes.shape
    scratch = np.empty((n_feat, width), dtype=np.float32)
    tmp = np.empty((_N_TMP, width), dtype=np.float32)
    pad = np.empty((4, width + 2 * coefs.shape[2]), dtype=np.float32)
    front = np.empty((n_channels, n_scales, 2), dtype=np.int64)
    for s in range(n_scales):
        k, kd, kg = radius[s, _K_G0], radius[s, _K_DOG], radius[s, _K_GRAD0]
        first_x = y0 - max(k, kd)
        if columns[s, _STE, 0, 0] >= 0:
            first_x = min(first_x, y0 - k - kg)
        for c in range(n_channels):
            front[c, s, 0] = max(0, first_x)
            front[c, s, 1] = max(0, y0 - k)
    return scratch, tmp, pad, front


@_jit
def _row_features(
    planes, coefs, radius, x_jobs, y_jobs, columns, n_ring, unfused, y, rings, scratch, tmp,
    pad, front
):
    """Every feature of every (channel, scale) of output row ``y`` into ``scratch[f, x]``.

    Rows must be visited in increasing order after :func:`_row_state`.
    """
    n_channels, n_scales = planes.shape[0], planes.shape[1]
    for c in range(n_channels):
        for s in range(n_scales):
            _feature_row(
                planes[c, s],
                rings[c, s],
                coefs[s],
                radius[s],
                x_jobs[s],
                y_jobs[s],
                columns[s, :, c, :],
                front[c, s],
                y,
                n_ring,
                scratch,
                tmp,
                pad,
                unfused,
            )


@_jit
def _feature_rows(
    planes, coefs, radius, x_jobs, y_jobs, columns, n_ring, unfused, y0, y1, out, out_y0
):
    """Stage 2 for output rows y0..y1: every feature of every (channel, scale).

    Parameters
    ----------
    planes : (C, S, H, W) ndarray of float32
        Presmoothed images.
    coefs : (S, 6, KF + 1) ndarray of float32
    radius : (S, 6) ndarray of int64
    x_jobs : (S, 6, 3) ndarray of int64
    y_jobs : (S, 10, 4) ndarray of int64
    columns : (S, 6, C, 2) ndarray of int64
    n_ring : int
        Rows per ring buffer.
    unfused : bool
    y0, y1 : int
        Output rows; the ring buffers are primed with the rows above y0 that they need.
    out : (R, W, F) ndarray of float32
        Row ``y`` of the image goes to ``out[y - out_y0]``.
    out_y0 : int
    """
    n_channels, n_scales, _, width = planes.shape
    rings = np.empty((n_channels, n_scales, _N_RINGS, n_ring, width), dtype=np.float32)
    scratch, tmp, pad, front = _row_state(planes, coefs, radius, columns, y0, out.shape[2])
    for y in range(y0, y1):
        _row_features(planes, coefs, radius, x_jobs, y_jobs, columns, n_ring, unfused, y,
                      rings, scratch, tmp, pad, front)
        _transpose_row(scratch, out[y - out_y0])


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def compute_features(
    img: np.ndarray,
    selection: FeatureSelection,
    profile: str = "133",
    out: np.ndarray | None = None,
    rows: tuple[int, int] | None = None,
) -> np.ndarray:
    """Compute ilastik's pixel features of one 2-D multichannel image.

    Parameters
    ----------
    img : (C, Y, X) ndarray, any real dtype
        The image; converted with ``astype(float32)`` like ilastik does.
    selection : FeatureSelection
        The project's feature selection.
    profile : {"133", "14x"}, optional
        Arithmetic profile: ilastik 1.3.3post3 (default) or 1.4.x (spec section 5).
    out : (R, X, F) ndarray of float32, optional
        C-contiguous buffer for the result (R = number of output rows).
    rows : (int, int), optional
        Only compute output rows ``rows[0] .. rows[1] - 1`` of ``img`` (default: all). The
        filters still see the whole of ``img``; rows outside the range are only presmoothed
        as far as the range needs, which is what makes strips with a halo cheap.

    Returns
    -------
    (R, X, F) ndarray of float32
        C-contiguous; columns in ``feature_names(selection, C)`` order, so that
        ``reshape(-1, F)`` gives one row per pixel.

    Raises
    ------
    SteinpixError
        When the image is smaller than ``selection.min_size()`` in Y or X, or ``profile`` is
        unknown.

    Notes
    -----
    Uses ``numba.get_num_threads()`` threads. A strip ``img[:, y0 - h : y1 + h]`` (clipped at
    the image border) with ``h = selection.halo()`` gives rows ``y0 .. y1`` bit-identical to a
    whole-image call: the x-passes see whole rows, and every y-pass is the same sequential FMA.
    Besides ``out``, the call allocates ``C * S`` planes of Y x X float32 (S = number of
    selected scales), one more per thread and a few rows per thread.
    """
    img, plan, (r0, r1) = prepare(img, selection, profile, rows)
    shape = (r1 - r0, img.shape[2], plan.n_features)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be a C-contiguous float32 array of shape {shape}, "
            f"not {out.dtype} {out.shape}"
        )
    unfused = profile == "14x"
    run = Runner(max(1, min(numba.get_num_threads(), r1 - r0)))
    planes = presmooth(img, selection, plan, (r0, r1), unfused, run)
    args = (planes, *stage2_args(plan), unfused)
    run(_feature_rows, [(*args, a, b, out, r0) for a, b in run.chunks(r0, r1)])
    return out


def prepare(
    img: np.ndarray, selection: FeatureSelection, profile: str, rows: tuple[int, int] | None
) -> tuple[np.ndarray, _Plan, tuple[int, int]]:
    """Check the arguments of :func:`compute_features`.

    Returns
    -------
    img : (C, Y, X) C-contiguous ndarray of float32
    plan : _Plan
        Kernels and output columns of the selection for C channels.
    rows : (int, int)
        The output rows r0..r1 (default: all).
    """
    if profile not in PROFILES:
        raise SteinpixError(f"unknown arithmetic profile {profile!r} (choose from {PROFILES})")
    img = np.ascontiguousarray(img, dtype=np.float32)
    if img.ndim != 3:
        raise ValueError(f"expected a (C, Y, X) image, got shape {img.shape}")
    n_channels, height, width = img.shape
    _check_size(selection, height, width)
    r0, r1 = (0, height) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= r0 < r1 <= height:
        raise ValueError(f"rows {rows} outside the image's {height} rows")
    return img, _make_plan(selection, n_channels), (r0, r1)


def ring_shape(planes_shape: tuple[int, ...], plan: _Plan) -> tuple[int, int, int, int, int]:
    """Shape of one stage-2 thread's ring buffers for planes of ``planes_shape`` (C, S, H, W).

    Returns
    -------
    tuple of int
        (C, S, N_RINGS, ring rows, W): about 10 MB per thread for four channels, five scales
        and 2000 pixels of width, so callers that run stage 2 strip after strip keep it.
    """
    n_channels, n_scales, _, width = planes_shape
    return (n_channels, n_scales, _N_RINGS, plan.ring_rows, width)


def stage2_args(plan: _Plan) -> tuple:
    """The plan's arrays in the order the stage-2 kernels take them (after the planes)."""
    return plan.coefs, plan.radius, plan.x_jobs, plan.y_jobs, plan.columns, plan.ring_rows


def presmooth(img: np.ndarray, selection: FeatureSelection, plan: _Plan, rows: tuple[int, int],
              unfused: bool, run: Runner, work: Workspace | None = None) -> np.ndarray:
    """Stage 1: the presmoothed planes that the feature filters of output ``rows`` read.

    :func:`start_presmooth`, waiting for its jobs.
    """
    planes, jobs = start_presmooth(img, selection, plan, rows, unfused, run, work)
    run.wait(jobs)
    return planes


def start_presmooth(img: np.ndarray, selection: FeatureSelection, plan: _Plan,
                    rows: tuple[int, int], unfused: bool, run: Runner,
                    work: Workspace | None = None,
                    temps: Workspace | None = None) -> tuple[np.ndarray, list[Future]]:
    """Stage 1, queued: the planes of :func:`presmooth` and the jobs that fill them.

    Parameters
    ----------
    img : (C, Y, X) C-contiguous ndarray of float32
    selection, plan
        The feature selection and its :func:`_make_plan`.
    rows : (int, int)
        Output rows r0..r1.
    unfused : bool
        Profile 14x.
    run : Runner
    work : Workspace, optional
        Buffers to reuse (the planes returned are one of them); default: fresh ones.
    temps : Workspace, optional
        Where the temporary planes are taken from (default ``work``); free again once the
        jobs are done.

    Returns
    -------
    planes : (C, S, Y, X) ndarray of float32
        Planes per channel and selected scale; only the rows the features of r0..r1 read
        (r0 - margin .. r1 + margin) are computed.
    jobs : list of Future
        The planes are ready when these are done (:meth:`Runner.wait`); until then ``work``
        must not be used again.
    """
    n_channels, height, width = img.shape
    r0, r1 = rows
    # presmoothed rows that the feature filters of rows r0..r1 read (mirrored reads included)
    margin = _feature_margin(selection)
    p0, p1 = max(0, r0 - margin), min(height, r1 + margin)
    work = Workspace() if work is None else work
    n_scales = len(plan.pre_radius)
    planes = work.array("planes", (n_channels, n_scales, height, width))
    # largest kernels first, so that the threads finish together
    jobs = sorted(((c, s) for c in range(n_channels) for s in range(n_scales)),
                  key=lambda job: -plan.pre_radius[job[1]])
    if run.n_threads == 1 or len(jobs) >= 2 * run.n_threads:
        # one (channel, scale) per job, each with a temporary plane of its own: no barriers
        temps = (work if temps is None else temps).array("temps",
                                                         (run.n_threads, height, width))
        free = queue.SimpleQueue()
        for tmp in temps:
            free.put(tmp)

        def one_plane(c: int, s: int) -> None:
            tmp = free.get()
            try:
                _presmooth_plane(img[c], plan.pre_coefs[s], int(plan.pre_radius[s]), unfused,
                                 p0, p1, tmp, planes[c, s])
            finally:
                free.put(tmp)

        return planes, run.submit(one_plane, jobs)
    # few planes: every plane's rows are shared by the threads
    tmp = work.array("temps", (1, height, width))[0]
    for c, s in jobs:
        coefs, k = plan.pre_coefs[s], int(plan.pre_radius[s])
        x_rows = run.chunks(max(0, p0 - k), min(height, p1 + k))
        run(_xpass_rows, [(img[c], coefs, k, False, unfused, a, b, tmp) for a, b in x_rows])
        y_rows = run.chunks(p0, p1)
        run(_ypass_rows, [(tmp, coefs, k, False, a, b, planes[c, s]) for a, b in y_rows])
    return planes, []


class Workspace:
    """Float32 buffers kept from one call to the next (e.g. one strip after the other).

    A fresh buffer of ~100 MB costs page faults and the kernel's zeroing of every page it
    touches; a reused one does not. Buffers grow (with 25% slack, which costs address space
    only) and are never shared between concurrent calls: use one workspace per thread.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """An uninitialised C-contiguous float32 array of ``shape``, the buffer ``name``."""
        size = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.size < size:
            self._buffers.pop(name, None)
            raw = np.empty(size + size // 4 + 16, dtype=np.float32)
            # aligned to 64 bytes: rows of a multiple of 16 pixels then start on cache lines,
            # and the y-passes' vector loads do not straddle two lines
            start = -raw.ctypes.data % 64 // 4
            buf = self._buffers[name] = raw[start : start + size + size // 4]
        return buf[:size].reshape(shape)


def _feature_margin(selection: FeatureSelection) -> int:
    """Rows of presmoothed context the feature filters need around an output row."""
    return max(
        _feature_chain_radius(fid, scale)
        for i, fid in enumerate(selection.feature_ids)
        for j, scale in enumerate(selection.scales)
        if selection.matrix[i, j]
    )


class Runner:
    """Run a nogil kernel on several argument tuples at once, in the engine's worker threads
    (:mod:`steinpix.workers`), ahead of any TIFF encoding queued there."""

    def __init__(self, n_threads: int) -> None:
        self.n_threads = n_threads
        self._pool = workers.pool(n_threads) if n_threads > 1 else None

    def chunks(self, a: int, b: int) -> list[tuple[int, int]]:
        """Rows a..b cut into one contiguous chunk per thread."""
        n = self.n_threads
        return [(a + i * (b - a) // n, a + (i + 1) * (b - a) // n) for i in range(n)]

    def submit(self, kernel, arg_tuples: list[tuple]) -> list[Future]:
        """Queue ``kernel(*args)`` for each tuple (with one thread: run them now); the jobs."""
        if self._pool is not None:
            return [self._pool.submit(kernel, *args) for args in arg_tuples]
        for args in arg_tuples:
            kernel(*args)
        return []

    @staticmethod
    def wait(jobs: list[Future]) -> None:
        """Wait for the jobs; raise the first one's error once none of them runs any more."""
        try:
            for job in jobs:
                job.result()
        finally:  # on an error, no job may still write into the caller's buffers afterwards
            Runner.wait_quietly(jobs)

    @staticmethod
    def wait_quietly(jobs: list[Future]) -> None:
        """Drop the jobs not started yet and wait for the others, ignoring their errors."""
        for job in jobs:
            job.cancel()
        concurrent.futures.wait(jobs)

    def __call__(self, kernel, arg_tuples: list[tuple]) -> None:
        self.wait(self.submit(kernel, arg_tuples))


def _check_size(selection: FeatureSelection, height: int, width: int) -> None:
    """ilastik's DatasetConstraintError: every selected scale needs ceil(3.5*s)+1 pixels."""
    for j in sorted(selection.selected_scales(), key=lambda j: selection.scales[j]):
        need = _min_size_for_scale(selection.scales[j])
        if height < need or width < need:
            raise SteinpixError(
                f"image of {height}x{width} pixels (YxX) is too small for the feature scale "
                f"{selection.scales[j]}: it needs at least {need} pixels in Y and in X "
                f"(all selected scales need {selection.min_size()})"
            )
