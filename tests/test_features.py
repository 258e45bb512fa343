"""Pixel features (steinpix.features): kernels, filters, layout, tiling, errors, references."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import h5py
import numba
import numpy as np
import pytest

from steinpix.errors import SteinpixError
from steinpix.features import (
    FEATURE_IDS,
    PROFILES,
    FeatureSelection,
    _scalar_133,
    _scalar_spans,
    _seq_padded,
    _span_bounds,
    _ypass_row,
    _ypass_rows,
    compute_features,
    feature_names,
    gaussian_kernel,
    kernel_radius,
)
from steinpix.features import _fma as _fma_f32

REPO = Path(__file__).resolve().parents[1]
TEST_IMG = REPO / "tests" / "data" / "reference" / "ilastik_img"
PRETRAINED = REPO / "examples" / "imc-mock" / "pretrained.ilp"
DEFAULT_SCALES = (0.3, 0.7, 1.0, 1.6, 3.5, 5.0, 10.0)


def selection(ids=FEATURE_IDS, scales=DEFAULT_SCALES, matrix=None, in_2d=True):
    """A FeatureSelection; by default ilastik's ids and scales, all pairs selected."""
    if matrix is None:
        matrix = np.ones((len(ids), len(scales)), dtype=bool)
    return FeatureSelection(tuple(ids), tuple(scales), np.asarray(matrix), (in_2d,) * len(scales))


def pretrained_selection():
    """The pretrained project's selection: all six features at 1.0, 1.6, 3.5, 5.0 and 10.0."""
    matrix = np.zeros((6, 7), dtype=bool)
    matrix[:, 2:] = True
    return selection(matrix=matrix)


def random_image(shape, seed=0):
    """Smooth-ish positive test data like IMC intensities."""
    rng = np.random.default_rng(seed)
    return rng.gamma(2.0, 10.0, shape).astype(np.float32)


# --------------------------------------------------------------------------------------------
# An independent, slow numpy implementation of the spec (sections 2.3-2.5, 5, Appendix A),
# with the spec's FMA emulation f32(f64(p) * f64(c) + f64(acc)). It filters whole planes with
# gathered mirror indices, unlike the row-streaming numba code.
# --------------------------------------------------------------------------------------------

F32 = np.float32


def _fma(p, c, acc):
    return (p.astype(np.float64) * np.float64(c) + acc.astype(np.float64)).astype(F32)


def _conv_last_axis(x, coefs, odd, profile, x_pass):
    """Filter along the last axis; the x-pass uses fastfilters' code regions."""
    k = len(coefs) - 1
    n = x.shape[-1]
    if k == 0:
        return x.copy()
    i = np.arange(n)
    hi = [np.where(i + t >= n, 2 * n - 2 - (i + t), i + t) for t in range(k + 1)]
    lo = [np.abs(i - t) for t in range(k + 1)]
    taps = [x] + [
        (x[..., hi[t]] - x[..., lo[t]]) if odd else (x[..., hi[t]] + x[..., lo[t]])
        for t in range(1, k + 1)
    ]
    m = [(coefs[t] * taps[t]).astype(F32) for t in range(k + 1)]

    def f(t, e):
        return _fma(taps[t], coefs[t], e)

    seq = m[0]
    for t in range(1, k + 1):
        seq = f(t, seq)
    if not x_pass:
        return seq
    avx_end, xa = (n - k) & ~31, (k + 7) & ~7
    region = np.full(n, "tail", dtype="<U5")
    region[:k] = "left"
    if avx_end > ((xa + 31) & ~31):
        region[xa:avx_end] = "simd"
    region[max(k, n - k) :] = "right"
    out = seq.copy()
    if profile == "14x":
        unfused = m[0]
        for t in range(1, k + 1):
            unfused = unfused + m[t]
        out[..., region != "simd"] = unfused[..., region != "simd"]
        return out
    if k > 5:
        return out
    tail = {
        1: lambda: f(0, m[1]),
        2: lambda: f(0, f(1, m[2])),
        3: lambda: (m[0] + m[2]) + (m[1] + m[3]),
        4: lambda: f(0, f(1, m[2]) + f(3, m[4])),
        5: lambda: f(0, m[5]) + (f(1, m[2]) + f(3, m[4])),
    }[k]()
    out[..., region == "tail"] = tail[..., region == "tail"]
    left_at = {2: [1], 3: [2], 5: list(range(5))}.get(k, [])
    if left_at:
        left = {
            2: lambda: f(2, f(0, m[1])),
            3: lambda: f(3, f(2, f(0, m[1]))),
            5: lambda: (f(1, m[0]) + f(3, m[2])) + f(5, m[4]),
        }[k]()
        out[..., left_at] = left[..., left_at]
    if k in (4, 5):
        right = f(2, f(1, m[0])) + f(4, m[3]) if k == 4 else f(3, f(2, f(1, m[0]))) + f(5, m[4])
        out[..., region == "right"] = right[..., region == "right"]
    return out


def _conv2d(img, cx, ox, cy, oy, profile):
    t = _conv_last_axis(img, cx, ox, profile, True)
    return np.ascontiguousarray(_conv_last_axis(t.T, cy, oy, profile, False).T)


def _eig(xx, yy, xy):
    half = F32(0.5)
    t0, t1 = (xx + yy) * half, (xx - yy) * half
    d = np.sqrt(t1 * t1 + xy * xy)
    return [np.maximum(t0 + d, t0 - d), np.minimum(t0 + d, t0 - d)]


def spec_features(img, sel, profile="133"):
    img = img.astype(F32)
    columns = []
    for i, fid in enumerate(sel.feature_ids):
        for j, s in enumerate(sel.scales):
            if not sel.matrix[i, j]:
                continue
            pre = gaussian_kernel(0, math.sqrt(s * s - 1) if s > 1 else s, 3.5)
            sf = 1.0 if s > 1 else s

            def conv(p, ox, oy, sigma=sf):
                kx = gaussian_kernel(ox, sigma, 2.0)
                ky = gaussian_kernel(oy, sigma, 2.0)
                return _conv2d(p, kx, ox == 1, ky, oy == 1, profile)

            for c in range(img.shape[0]):
                p = _conv2d(img[c], pre, False, pre, False, profile)
                if fid == "GaussianSmoothing":
                    columns.append(conv(p, 0, 0))
                elif fid == "LaplacianOfGaussian":
                    columns.append(conv(p, 0, 2) + conv(p, 2, 0))
                elif fid == "GaussianGradientMagnitude":
                    dx, dy = conv(p, 1, 0), conv(p, 0, 1)
                    columns.append(np.sqrt(dy * dy + dx * dx))
                elif fid == "DifferenceOfGaussians":
                    columns.append(conv(p, 0, 0) - conv(p, 0, 0, 0.66 * sf))
                elif fid == "StructureTensorEigenvalues":
                    gx, gy = conv(p, 1, 0, 0.5 * sf), conv(p, 0, 1, 0.5 * sf)
                    columns += _eig(conv(gx * gx, 0, 0), conv(gy * gy, 0, 0), conv(gx * gy, 0, 0))
                else:
                    columns += _eig(conv(p, 2, 0), conv(p, 0, 2), conv(p, 1, 1))
    return np.stack(columns, axis=-1)


# --------------------------------------------------------------------------------------------
# A float64 reference with scipy.ndimage (same truncated kernels, no float32 rounding)
# --------------------------------------------------------------------------------------------


def _full_kernel(order, sigma, window):
    half = gaussian_kernel(order, sigma, window).astype(np.float64)
    if len(half) == 1:
        return np.ones(1)
    side = -half[:0:-1] if order == 1 else half[:0:-1]
    return np.concatenate([side, [0.0 if order == 1 else half[0]], half[1:]])


def scipy_features(img, fid, s):
    """One (feature, scale) block of one channel in float64 with scipy's mode="mirror"."""
    ndimage = pytest.importorskip("scipy.ndimage")

    def conv(a, ox, oy, sigma, window=2.0):
        a = ndimage.correlate1d(a, _full_kernel(ox, sigma, window), axis=1, mode="mirror")
        return ndimage.correlate1d(a, _full_kernel(oy, sigma, window), axis=0, mode="mirror")

    def eig(xx, yy, xy):
        d = np.sqrt(((xx - yy) / 2) ** 2 + xy**2)
        return [(xx + yy) / 2 + d, (xx + yy) / 2 - d]

    sf = 1.0 if s > 1 else s
    p = conv(img.astype(np.float64), 0, 0, math.sqrt(s * s - 1) if s > 1 else s, 3.5)
    if fid == "GaussianSmoothing":
        return [conv(p, 0, 0, sf)]
    if fid == "LaplacianOfGaussian":
        return [conv(p, 2, 0, sf) + conv(p, 0, 2, sf)]
    if fid == "GaussianGradientMagnitude":
        return [np.hypot(conv(p, 1, 0, sf), conv(p, 0, 1, sf))]
    if fid == "DifferenceOfGaussians":
        return [conv(p, 0, 0, sf) - conv(p, 0, 0, 0.66 * sf)]
    if fid == "StructureTensorEigenvalues":
        gx, gy = conv(p, 1, 0, sf / 2), conv(p, 0, 1, sf / 2)
        return eig(conv(gx * gx, 0, 0, sf), conv(gy * gy, 0, 0, sf), conv(gx * gy, 0, 0, sf))
    return eig(conv(p, 2, 0, sf), conv(p, 0, 2, sf), conv(p, 1, 1, sf))


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def test_constants():
    assert FEATURE_IDS == (
        "GaussianSmoothing",
        "LaplacianOfGaussian",
        "GaussianGradientMagnitude",
        "DifferenceOfGaussians",
        "StructureTensorEigenvalues",
        "HessianOfGaussianEigenvalues",
    )
    assert PROFILES == ("133", "14x")


@pytest.mark.parametrize(
    "sigma, window, radius",
    [
        (1.0, 2.0, 2),
        (0.7, 2.0, 1),
        (0.3, 2.0, 1),
        (0.198, 2.0, 0),  # DoG at scale 0.3
        (0.15, 2.0, 0),  # structure tensor gradients at scale 0.3
        (1.0, 3.5, 4),
        (math.sqrt(1.6**2 - 1), 3.5, 4),
        (math.sqrt(3.5**2 - 1), 3.5, 12),
        (math.sqrt(5.0**2 - 1), 3.5, 17),
        (math.sqrt(10.0**2 - 1), 3.5, 35),
        (1e-7, 3.5, 0),
    ],
)
def test_kernel_radius(sigma, window, radius):
    assert kernel_radius(sigma, window) == radius
    assert len(gaussian_kernel(0, sigma, window)) == radius + 1


@pytest.mark.parametrize("sigma, window", [(0.3, 2.0), (1.0, 2.0), (1.0, 3.5), (9.95, 3.5)])
def test_smoothing_kernel_is_normalised_gaussian(sigma, window):
    assert gaussian_kernel(0, sigma, window).dtype == np.float32
    c = gaussian_kernel(0, sigma, window).astype(np.float64)
    assert abs(c[0] + 2 * c[1:].sum() - 1.0) < 1e-6
    t = np.arange(len(c))
    g = np.exp(-(t**2) / (2 * sigma**2))
    np.testing.assert_allclose(c, g / (g[0] + 2 * g[1:].sum()), rtol=1e-6)


@pytest.mark.parametrize("sigma", [0.35, 0.5, 0.7, 1.0])
def test_derivative_kernels_are_normalised(sigma):
    c1 = gaussian_kernel(1, sigma, 2.0).astype(np.float64)
    t = np.arange(len(c1))
    # applied as sum c_t (x[i+t] - x[i-t]): the derivative of a unit ramp is 1
    assert abs(2 * (t * c1).sum() - 1.0) < 1e-6
    # 0 * g (g < 0) is -0.0, divided by the positive normaliser and negated: +0.0, as in
    # fastfilters' C code. The sign of this zero cannot change any result.
    assert c1[0] == 0.0
    assert (c1[1:] > 0).all()
    c2 = gaussian_kernel(2, sigma, 2.0).astype(np.float64)
    # second derivative of x^2 / 2 is 1, and the DC part is removed
    assert abs((t**2 * c2).sum() - 1.0) < 1e-6
    assert abs(c2[0] + 2 * c2[1:].sum()) < 1e-6


def test_kernel_with_zero_radius_is_identity():
    for order in (0, 1, 2):
        assert gaussian_kernel(order, 0.15, 2.0).tolist() == [1.0]
    img = random_image((1, 20, 20))
    # scale 0.3: DoG's smaller Gaussian (sigma 0.198) has radius 0, so it subtracts the
    # presmoothed image itself
    sel = selection(("DifferenceOfGaussians", "GaussianSmoothing"), (0.3,))
    dog, gs = np.moveaxis(compute_features(img, sel), -1, 0)
    pre = gaussian_kernel(0, 0.3, 3.5)
    presmoothed = _conv2d(img[0], pre, False, pre, False, "133")
    assert np.array_equal(dog, gs - presmoothed)


# --------------------------------------------------------------------------------------------
# Filters against references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.7, 1.0, 1.6, 3.5])
@pytest.mark.parametrize("fid", FEATURE_IDS)
def test_matches_float64_scipy_with_mirror_border(fid, scale):
    """Same math as scipy.ndimage in float64 with mode="mirror", up to float32 rounding."""
    img = random_image((1, 41, 53), seed=1)
    ours = compute_features(img, selection((fid,), (scale,)))
    refs = scipy_features(img[0], fid, scale)
    assert ours.shape == (41, 53, len(refs))
    for k, ref in enumerate(refs):
        # float32 rounding is relative to the filtered values, i.e. to the image (or, for the
        # structure tensor, to the squared gradients), not to the result: LoG and DoG cancel
        if fid == "StructureTensorEigenvalues":
            atol = 1e-5 * np.abs(ref).max()
        else:
            atol = 1e-6 * np.abs(img).max()
        np.testing.assert_allclose(ours[..., k], ref, rtol=0, atol=atol)


def test_derivative_directions_and_eigenvalue_order():
    """A ramp along x: gradient magnitude = slope, Hessian ~ 0, structure tensor [slope^2, 0]."""
    ramp = np.tile(np.arange(60, dtype=np.float32) * 0.5, (40, 1))[None]
    ids = (
        "GaussianGradientMagnitude",
        "StructureTensorEigenvalues",
        "HessianOfGaussianEigenvalues",
    )
    out = compute_features(ramp, selection(ids, (1.6,)))[10:-10, 10:-10]
    np.testing.assert_allclose(out[..., 0], 0.5, rtol=1e-5)
    np.testing.assert_allclose(out[..., 1], 0.25, rtol=1e-4)
    np.testing.assert_allclose(out[..., 2:], 0.0, atol=1e-5)
    eigenvalues = compute_features(random_image((1, 30, 30)), selection(ids[1:], (1.0,)))
    assert (eigenvalues[..., ::2] >= eigenvalues[..., 1::2]).all()  # [e_big, e_small]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize(
    "shape, scales",
    [
        ((1, 3, 4), (0.3,)),  # the smallest image ilastik accepts at scale 0.3
        ((3, 38, 37), DEFAULT_SCALES[:4]),  # rows too short for the SIMD region: all scalar code
        ((1, 45, 100), DEFAULT_SCALES[:5]),  # left, tail, SIMD and right regions
        ((1, 40, 75), (0.5, 1.3, 1.8, 2.3, 2.6)),  # presmoothing radii 2, 3, 5, 7, 8 (K 3, 5, 6-10)
    ],
)
def test_bit_identical_to_spec_reference(shape, scales, profile):
    """Every rounding step as the spec describes it, against a plain numpy implementation."""
    img = random_image(shape, seed=2)
    sel = selection(scales=scales)
    ours = compute_features(img, sel, profile)
    ref = spec_features(img, sel, profile)
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    assert ours.shape == ref.shape == shape[1:] + (sel.n_features(shape[0]),)
    assert np.array_equal(ours, ref)


def test_profile_14x_differs_only_at_rounding_level():
    img = random_image((2, 60, 120), seed=3)
    sel = pretrained_selection()
    a, b = compute_features(img, sel, "133"), compute_features(img, sel, "14x")
    assert not np.array_equal(a, b)  # the scalar code regions round differently
    assert np.abs(a - b).max() <= 1e-6 * np.abs(img).max()


def test_input_dtype_is_converted_like_astype_float32():
    img = (random_image((2, 40, 40)) * 100).astype(np.uint16)
    sel = selection(scales=(1.0,))
    assert np.array_equal(compute_features(img, sel), compute_features(img.astype(np.float32), sel))
    assert np.array_equal(
        compute_features(img.astype(np.float64), sel), compute_features(img.astype(np.float32), sel)
    )


# --------------------------------------------------------------------------------------------
# Layout, tiling, threads, buffers
# --------------------------------------------------------------------------------------------


def test_column_order_follows_ilp_order():
    """Columns: feature ids and scales in .ilp order, then channels, then eigenvalues."""
    img = random_image((2, 30, 31), seed=4)
    ids = ("HessianOfGaussianEigenvalues", "GaussianSmoothing")
    scales = (1.6, 0.7)
    sel = selection(ids, scales)
    out = compute_features(img, sel)
    expected = []
    for fid in ids:
        for s in scales:
            block = compute_features(img, selection((fid,), (s,)))
            expected.append(block)
    assert np.array_equal(out, np.concatenate(expected, axis=-1))
    # within a block: channel-major, then [e_big, e_small]
    hog = compute_features(img[1:], selection((ids[0],), (1.6,)))
    assert np.array_equal(out[..., 2:4], hog)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("sel", [pretrained_selection(), selection(scales=(0.3, 0.7, 1.0))])
def test_strips_with_halo_are_bit_identical(sel, profile):
    """The engine's tiling: full-width strips with halo() rows of context on each side."""
    img = random_image((3, 157, 83), seed=5)
    whole = compute_features(img, sel, profile)
    halo, height = sel.halo(), img.shape[1]
    step = max(sel.min_size(), 23)
    for y0 in range(0, height, step):
        y1 = min(height, y0 + step)
        a, b = max(0, y0 - halo), min(height, y1 + halo)
        strip = compute_features(img[:, a:b], sel, profile)
        assert np.array_equal(strip[y0 - a : y1 - a], whole[y0:y1]), (y0, y1)
        # only the strip's own rows, as the engine asks for them
        rows = compute_features(img[:, a:b], sel, profile, rows=(y0 - a, y1 - a))
        assert np.array_equal(rows, whole[y0:y1]), (y0, y1)


def test_halo_and_sizes_of_the_pretrained_selection():
    sel = pretrained_selection()
    # scale 10: presmoothing radius 35, structure tensor 1 + 2
    assert sel.halo() == 38
    assert sel.min_size() == 36  # ceil(3.5 * 10) + 1
    assert sel.n_features(4) == 160
    small = selection(("GaussianSmoothing",), (0.3, 0.7))
    assert small.halo() == 2 + 1 and small.min_size() == 4 and small.n_features(1) == 2


def test_thread_count_does_not_change_results():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two numba threads")
    one, two = with_one_and_two_threads(random_image((2, 77, 50), seed=6), pretrained_selection())
    assert np.array_equal(one, two)


def with_one_and_two_threads(img, sel):
    """compute_features with one numba thread, then with two."""
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = compute_features(img, sel)
        numba.set_num_threads(2)
        return one, compute_features(img, sel)
    finally:
        numba.set_num_threads(before)


def test_out_buffer_is_filled_and_returned():
    img = random_image((2, 40, 40))
    sel = selection(scales=(1.0, 1.6))
    out = np.full((40, 40, sel.n_features(2)), np.nan, dtype=np.float32)
    assert compute_features(img, sel, out=out) is out
    assert np.array_equal(out, compute_features(img, sel))
    with pytest.raises(ValueError, match="out must be"):
        compute_features(img, sel, out=np.empty((40, 40, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="out must be"):
        compute_features(img, sel, out=out.astype(np.float64))


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_too_small_image_raises_with_size_and_scale():
    sel = pretrained_selection()
    with pytest.raises(SteinpixError, match=r"35x200 pixels.*scale 10\.0.*at least 36"):
        compute_features(random_image((1, 35, 200)), sel)
    with pytest.raises(SteinpixError, match=r"scale 5\.0.*at least 19"):
        compute_features(random_image((1, 100, 18)), sel)
    compute_features(random_image((1, 36, 36)), sel)  # the smallest allowed size works


def test_unknown_profile_raises():
    with pytest.raises(SteinpixError, match="profile"):
        compute_features(random_image((1, 20, 20)), selection(scales=(1.0,)), profile="15")


def test_invalid_selections_raise():
    with pytest.raises(SteinpixError, match="unknown feature id 'Foo'"):
        selection(("Foo",), (1.0,))
    with pytest.raises(SteinpixError, match="shape"):
        selection(matrix=np.ones((6, 3), dtype=bool))
    with pytest.raises(SteinpixError, match="no features are selected"):
        selection(matrix=np.zeros((6, 7), dtype=bool))
    with pytest.raises(SteinpixError, match="scale"):
        selection(scales=(0.0,))


# --------------------------------------------------------------------------------------------
# Reading the selection and naming the features
# --------------------------------------------------------------------------------------------


def write_selection(path, ids=FEATURE_IDS, scales=DEFAULT_SCALES, matrix=None, in_2d=True):
    with h5py.File(path, "w") as f:
        g = f.create_group("FeatureSelections")
        if ids is not None:
            g["FeatureIds"] = np.array([i.encode() for i in ids], dtype="S28")
        if scales is not None:
            g["Scales"] = np.asarray(scales, dtype=np.float64)
        if matrix is not None:
            g["SelectionMatrix"] = matrix
        if in_2d is not None:
            g["ComputeIn2d"] = np.full(len(scales), in_2d)
        g["StorageVersion"] = b"0.1"


def read_selection(path):
    with h5py.File(path, "r") as f:
        return FeatureSelection.from_h5(f["FeatureSelections"], str(path))


def test_from_h5(tmp_path):
    matrix = np.zeros((6, 7), dtype=bool)
    matrix[:, 2:] = True
    write_selection(tmp_path / "a.ilp", matrix=matrix)
    sel = read_selection(tmp_path / "a.ilp")
    assert sel == pretrained_selection() and hash(sel) == hash(pretrained_selection())
    assert sel.feature_ids == FEATURE_IDS and sel.scales == DEFAULT_SCALES
    assert sel.matrix.dtype == bool and sel.compute_in_2d == (True,) * 7
    write_selection(tmp_path / "b.ilp", matrix=matrix, in_2d=None)
    assert read_selection(tmp_path / "b.ilp").compute_in_2d == (False,) * 7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"matrix": None}, "has no SelectionMatrix"),
        ({"ids": None}, "has no FeatureIds"),
        ({"ids": ("GaussianSmoothing", "Bogus")}, "unknown feature id 'Bogus'"),
        ({"matrix": np.ones((6, 6), dtype=bool)}, r"shape \(6, 6\)"),
        ({"matrix": np.zeros((6, 7), dtype=bool)}, "no features are selected"),
    ],
)
def test_from_h5_errors_name_the_file(tmp_path, kwargs, message):
    args = {"matrix": np.ones((6, 7), dtype=bool), **kwargs}
    if "ids" in kwargs and kwargs["ids"] is not None:
        args["matrix"] = np.ones((len(kwargs["ids"]), 7), dtype=bool)
    write_selection(tmp_path / "p.ilp", **args)
    with pytest.raises(SteinpixError, match=f"p.ilp: .*{message}"):
        read_selection(tmp_path / "p.ilp")


def test_feature_names():
    sel = pretrained_selection()
    names = feature_names(sel, 4)
    assert len(names) == sel.n_features(4) == 160
    assert names[0] == "Gaussian Smoothing (σ=1.0) in 2D [0]"
    assert names[4] == "Gaussian Smoothing (σ=1.6) in 2D [0]"
    assert names[80 + 5] == "Structure Tensor Eigenvalues (σ=1.0) in 2D [5]"
    assert names[-1] == "Hessian of Gaussian Eigenvalues (σ=10.0) in 2D [7]"
    one = feature_names(
        selection(("GaussianSmoothing", "HessianOfGaussianEigenvalues"), (0.7,), in_2d=False), 1
    )
    assert one == [
        "Gaussian Smoothing (σ=0.7)",
        "Hessian of Gaussian Eigenvalues (σ=0.7) [0]",
        "Hessian of Gaussian Eigenvalues (σ=0.7) [1]",
    ]


def test_feature_names_equal_the_pretrained_projects():
    with h5py.File(PRETRAINED, "r") as f:
        sel = FeatureSelection.from_h5(f["FeatureSelections"], str(PRETRAINED))
        stored = [n.decode() for n in f["PixelClassification/ClassifierForests/feature_names"][()]]
    assert feature_names(sel, 4) == stored


# Features of tests/data/reference/ilastik_img/20210305_NE_mockData1_003.h5 with the pretrained
# project, as computed when this implementation reproduced all reference probabilities of the
# IMC mock data set bit for bit (0 differing pixels in 9 images, profile 133).
REGRESSION_SHA256 = {
    "133": "64916ff934548d8d0f934fb51aa967ba88a1d2c79e680d3bff379b5be2dd8b06",
    "14x": "6dc88ff3bf150e8c752935a65bce535cf71d60444ad2bb6142f7da67b036445c",
}


@pytest.mark.parametrize("profile", PROFILES)
def test_reference_image_regression(profile):
    with h5py.File(TEST_IMG / "20210305_NE_mockData1_003.h5", "r") as f:
        img = f["img"][()]
    with h5py.File(PRETRAINED, "r") as f:
        sel = FeatureSelection.from_h5(f["FeatureSelections"], str(PRETRAINED))
    feats = compute_features(img, sel, profile)
    assert feats.shape == (86, 100, 160)
    assert hashlib.sha256(feats.tobytes()).hexdigest() == REGRESSION_SHA256[profile]


def test_shared_project_feature_names(imc_mock):
    ilp = imc_mock / "reference" / "steinbock-0.16.5" / "fix" / "pixel_classifier.ilp"
    with h5py.File(ilp, "r") as f:
        sel = FeatureSelection.from_h5(f["FeatureSelections"], str(ilp))
        stored = [n.decode() for n in f["PixelClassification/ClassifierForests/feature_names"][()]]
    for path in sorted((imc_mock / "reference" / "ilastik_img").glob("*.h5")):
        with h5py.File(path, "r") as f:
            assert feature_names(sel, f["img"].shape[0]) == stored


# --------------------------------------------------------------------------------------------
# Register-blocked filter loops against the plain loops they replace
# --------------------------------------------------------------------------------------------


def _awkward_values(shape, seed):
    """Random float32 with NaN, infinities, denormals, zeros and huge values sprinkled in."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 100.0, shape).astype(np.float32)
    flat = a.reshape(-1)
    special = np.array([np.nan, np.inf, -np.inf, 1e-40, -3e-42, 0.0, -0.0, 3e38, -3e38],
                       dtype=np.float32)
    where = rng.choice(flat.size, size=max(1, flat.size // 50), replace=False)
    flat[where] = rng.choice(special, size=where.size)
    return a


@numba.njit(cache=True)
def _plain_taps(p, k, coefs, odd, n):
    """dst[x] = sequential FMA over taps, pixel by pixel (what _seq_padded must equal)."""
    dst = np.empty(n, dtype=np.float32)
    for x in range(n):
        acc = coefs[0] * p[x + k]
        for t in range(1, k + 1):
            a, b = p[x + k + t], p[x + k - t]
            acc = _fma_f32(a - b if odd else a + b, coefs[t], acc)
        dst[x] = acc
    return dst


def _same(a, b):
    """Bit-identical floats, except that NaN payloads are not compared."""
    nan = np.isnan(a)
    return np.array_equal(nan, np.isnan(b)) and np.array_equal(
        a.view(np.uint32)[~nan], b.view(np.uint32)[~nan]
    )


@pytest.mark.parametrize("odd", [False, True])
def test_blocked_x_taps_equal_the_plain_loop(odd):
    """_seq_padded for radii 0-40 and widths around the vector block sizes."""
    rng = np.random.default_rng(11)
    for k in range(41):
        coefs = rng.normal(0.0, 1.0, k + 1).astype(np.float32)
        for n in (1, 7, 8, 9, 63, 64, 65, 127, 200, 333):
            p = _awkward_values(n + 2 * k, seed=k * 1000 + n)
            dst = np.full(n, 7.0, dtype=np.float32)
            _seq_padded(p, k, coefs, odd, dst)
            assert _same(dst, _plain_taps(p, k, coefs, odd, n)), (k, n)


@pytest.mark.parametrize("odd", [False, True])
def test_small_radius_spans_equal_the_general_scalar_code(odd):
    """_scalar_spans' direct path for K = 1, 2 (1.3.3) against _scalar_133 span by span, for
    widths where the spans are degenerate, short, or as in a long row."""
    rng = np.random.default_rng(13)
    for k in (1, 2):
        coefs = rng.normal(0.0, 1.0, 3).astype(np.float32)
        for n in (*range(k + 1, 80), 127, 128, 129, 2000):
            p = _awkward_values(n + 2 * k, seed=k * 10000 + n)
            seq = rng.normal(0.0, 1.0, n).astype(np.float32)  # stands for the SEQ values
            ours = seq.copy()
            _scalar_spans(p, k, coefs, odd, False, ours)
            ref = seq.copy()
            s0, s1 = _span_bounds(n, k)
            _scalar_133(p, k, coefs, odd, 0, s0, ref)
            _scalar_133(p, k, coefs, odd, s1, n, ref)
            assert _same(ours, ref), (k, n)
            assert not _same(ref, seq) or n <= k + 2, (k, n)  # the spans were redone


@pytest.mark.parametrize("odd", [False, True])
def test_blocked_y_pass_equals_row_by_row(odd):
    """_ypass_rows (column blocks, taps innermost) against _ypass_row one row at a time."""
    rng = np.random.default_rng(12)
    for k in (0, 1, 2, 3, 4, 5, 9, 12, 17, 23, 35, 40):
        coefs = rng.normal(0.0, 1.0, k + 1).astype(np.float32)
        for height, width in ((k + 1, 9), (k + 7, 200), (2 * k + 30, 131), (90, 64)):
            if height <= k:
                continue
            plane = _awkward_values((height, width), seed=k + height + width)
            y0, y1 = height // 5, height - height // 7
            ours = np.full((height, width), 7.0, dtype=np.float32)
            _ypass_rows(plane, coefs, k, odd, y0, y1, ours)
            ref = ours.copy()
            for y in range(y0, y1):
                _ypass_row(plane, height, y, height, coefs, k, odd, ref[y])
            assert _same(ours, ref), (k, height, width)
            assert (ours[:y0] == 7.0).all() and (ours[y1:] == 7.0).all()


def test_one_plane_shared_by_threads_equals_one_thread():
    """Presmoothing with fewer planes than twice the threads splits each plane's rows."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two numba threads")
    img = random_image((1, 90, 70), seed=7)
    sel = selection(scales=(3.5,))
    one, two = with_one_and_two_threads(img, sel)
    assert np.array_equal(one, two)
    assert np.array_equal(one, spec_features(img, sel))
