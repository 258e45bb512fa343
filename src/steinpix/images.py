"""steinbock images: reading TIFFs, building ilastik images, and the steinbock HDF5 format."""

from __future__ import annotations

import functools
import json
import os
import re
import struct
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import tifffile

from steinpix.atomic import atomic_output
from steinpix.errors import SteinpixError, read_error, reading


def img_dtype() -> np.dtype:
    """steinbock's image data type: ``$STEINBOCK_IMG_DTYPE``, float32 by default.

    Read when images are written, not when steinpix is imported: a command that writes none
    (``run``, ``apps``) does not stop on a value it does not use.

    Raises
    ------
    SteinpixError
        When the value is not a numpy integer or floating-point type.
    """
    return _checked_dtype(os.environ.get("STEINBOCK_IMG_DTYPE", "float32"))


@functools.cache
def _checked_dtype(value: str) -> np.dtype:
    try:
        dtype = np.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not (
        np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
    ):
        raise SteinpixError(
            f"STEINBOCK_IMG_DTYPE={value}: not a numpy integer or floating-point type "
            "(steinbock's default: float32)"
        )
    return dtype


IMG_DATASET = "img"
CROP_DATASET = "crop"
DISPLAY_MODE = "grayscale"
# vigra axis tags of a CYX image (typeFlags: 1 = channels, 2 = space), as steinbock writes them
AXISTAGS = json.dumps(
    {
        "axes": [
            {"key": "c", "typeFlags": 1},
            {"key": "y", "typeFlags": 2},
            {"key": "x", "typeFlags": 2},
        ]
    }
)
# ilastik 1.3.3 bundles an old HDF5 library: keep files readable by it
H5_LIBVER = "earliest"


def list_image_files(img_dir: str | os.PathLike) -> list[Path]:
    """steinbock's image files: every ``*.tiff`` below ``img_dir`` (no hidden files), sorted."""
    return sorted(Path(img_dir).rglob("[!.]*.tiff"))


def list_h5_files(h5_dir: str | os.PathLike) -> list[Path]:
    """Every ``*.h5`` below ``h5_dir`` (no hidden files), sorted, as steinbock lists them."""
    return sorted(Path(h5_dir).rglob("[!.]*.h5"))


def with_suffix(path: str | os.PathLike, suffix: str) -> Path:
    """``path`` with its suffix replaced, treating ``.ome.tiff`` as one suffix (as steinbock)."""
    path = Path(path)
    match = re.fullmatch(r"(.+)\.ome\.[^.]+", path.name, flags=re.IGNORECASE)
    if match:
        path = path.with_name(match.group(1) + ".x")
    return path.with_suffix(suffix)


def to_dtype(src: np.ndarray, dst_dtype: np.dtype | None = None) -> np.ndarray:
    """Convert like steinbock: round floats going to integers, clip to the target's range
    (``dst_dtype``: :func:`img_dtype` by default)."""
    dst_dtype = img_dtype() if dst_dtype is None else np.dtype(dst_dtype)
    if src.dtype == dst_dtype:
        return src
    src_is_int = np.issubdtype(src.dtype, np.integer)
    dst_is_int = np.issubdtype(dst_dtype, np.integer)
    if not src_is_int and dst_is_int:
        src = np.around(src)
    src_info = np.iinfo(src.dtype) if src_is_int else np.finfo(src.dtype)
    dst_info = np.iinfo(dst_dtype) if dst_is_int else np.finfo(dst_dtype)
    if src_info.min < dst_info.min or src_info.max > dst_info.max:
        src = np.clip(src, dst_info.min, dst_info.max)
    return src.astype(dst_dtype)


def _to_cyx(img_file: Path, img: np.ndarray) -> np.ndarray:
    """steinbock's accepted shapes: YX, CYX, 1CYX/CYX1, TZCYX and TZCYXS with T = Z = S = 1."""
    if img.ndim == 2:
        return img[np.newaxis, :, :]
    if img.ndim == 3:
        return img
    if img.ndim == 4:
        if img.shape[-1] == 1:
            return img[:, :, :, 0]
        if img.shape[0] == 1:
            return img[0]
        raise SteinpixError(f"{img_file}: unsupported four-dimensional shape {img.shape}")
    if img.ndim == 5:
        if img.shape[0] != 1 or img.shape[1] != 1:
            raise SteinpixError(f"{img_file}: unsupported TZCYX shape {img.shape}")
        return img[0, 0]
    if img.ndim == 6:
        if img.shape[0] != 1 or img.shape[1] != 1 or img.shape[5] != 1:
            raise SteinpixError(f"{img_file}: unsupported TZCYXS shape {img.shape}")
        return img[0, 0, :, :, :, 0]
    raise SteinpixError(f"{img_file}: unsupported number of dimensions ({img.ndim})")


# What tifffile and its codecs raise for damaged or unreadable files (found by fuzzing): the
# file's fault when raised inside them, a bug in steinpix when raised by its own code.
# TiffFileError is a ValueError only in newer tifffile releases; codec errors are RuntimeErrors.
TIFF_READ_ERRORS = (
    tifffile.TiffFileError,
    OSError,
    EOFError,
    ValueError,
    RuntimeError,
    struct.error,
    zlib.error,
    ArithmeticError,
    IndexError,
    KeyError,
    TypeError,
)

TIFF_READERS = ("tifffile", "imagecodecs", "numpy")


@contextmanager
def reading_tiff(img_file: Path) -> Iterator[None]:
    """Report what a damaged or missing TIFF raises inside the block as a one-line
    :class:`SteinpixError` naming ``img_file``, and anything else as a bug in steinpix
    (:class:`~steinpix.errors.InternalError`)."""
    with reading(img_file):
        try:
            yield
        except FileNotFoundError:
            raise SteinpixError(f"{img_file}: file not found") from None
        except MemoryError as e:  # a huge image, or a damaged header that claims one
            raise SteinpixError(f"{img_file}: not enough memory to read it ({e})") from None
        except TIFF_READ_ERRORS as e:
            raise read_error(img_file, e, "not a readable TIFF image", *TIFF_READERS) from e


def check_page_chain(tif: tifffile.TiffFile, img_file: Path) -> None:
    """Raise when the file's chain of pages breaks off: its last readable page points at a
    further page that is not there (a truncated or damaged file).

    tifffile only logs such a break and returns the pages before it, so a five-channel image
    cut short would be read as a one-channel image.

    Raises
    ------
    SteinpixError
        Naming ``img_file``.
    """
    fmt = tif.tiff
    n_pages = len(tif.pages)  # reads every page header it can reach
    if n_pages == 0:
        return
    offset = tif.pages[n_pages - 1].offset
    handle = tif.filehandle
    handle.seek(offset)
    count = handle.read(fmt.tagnosize)
    if len(count) == fmt.tagnosize:
        (n_tags,) = struct.unpack(fmt.tagnoformat, count)
        handle.seek(offset + fmt.tagnosize + n_tags * fmt.tagsize)
        field = handle.read(fmt.offsetsize)
        if len(field) == fmt.offsetsize:
            (next_page,) = struct.unpack(fmt.offsetformat, field)
            if next_page == 0:
                return
    raise SteinpixError(
        f"{img_file}: not a readable TIFF image (truncated or damaged: its list of pages "
        "breaks off)"
    )


def read_image(img_file: str | os.PathLike) -> np.ndarray:
    """Read a steinbock image in its native dtype.

    Returns
    -------
    img : (C, Y, X) ndarray
        The pixels, dtype as stored in the file.

    Raises
    ------
    SteinpixError
        When the file is missing, not a TIFF, truncated, or of an unsupported shape.
    InternalError
        When reading fails for a reason other than the file (a bug in steinpix).
    """
    img_file = Path(img_file)
    with reading_tiff(img_file), tifffile.TiffFile(img_file) as tif:
        check_page_chain(tif, img_file)
        img = tif.asarray(squeeze=False)
    return _to_cyx(img_file, img)


def _unsqueezed_shape(tif: tifffile.TiffFile) -> tuple[int, ...] | None:
    """The shape ``imread(..., squeeze=False)`` returns, from the header only (None: the
    file holds no image).

    tifffile 2026.5.2 dropped ``TiffPageSeries.get_shape`` and made ``TiffFile.series``
    callable (``tif.series(squeeze=False)``); older releases have only the former.
    """
    if callable(tif.series):
        series = tif.series(squeeze=False)
        return tuple(series[0].shape) if len(series) else None
    series = tif.series
    return tuple(series[0].get_shape(False)) if len(series) else None


def read_image_shape(img_file: str | os.PathLike) -> tuple[int, int, int]:
    """The (C, Y, X) shape of a steinbock image, read from its header only (raises as
    :func:`read_image`)."""
    img_file = Path(img_file)
    with reading_tiff(img_file), tifffile.TiffFile(img_file) as tif:
        check_page_chain(tif, img_file)
        shape = _unsqueezed_shape(tif)
    if shape is None:
        raise SteinpixError(f"{img_file}: not a readable TIFF image (it holds no image)")
    return _to_cyx(img_file, np.empty(shape, dtype=np.uint8)).shape


class ImageChannels:
    """The channels of a steinbock image, read a few at a time (a context manager).

    IMC TIFFs store one page per channel: then :meth:`read` decodes only the pages asked for,
    so an image is never held whole. Other layouts (several channels in one page, e.g.
    planar-separate samples) are read whole on the first :meth:`read` and sliced. Either way
    :meth:`read` returns what ``read_image(img_file)[indices]`` returns.

    Attributes
    ----------
    shape : (C, Y, X)
    page_wise : bool
        Whether channels are read page by page.

    Raises
    ------
    SteinpixError
        When the file is missing, not a TIFF, of an unsupported shape, or shorter than its
        pages' data.
    """

    def __init__(self, img_file: str | os.PathLike) -> None:
        self.img_file = Path(img_file)
        self._whole: np.ndarray | None = None
        with reading_tiff(self.img_file):
            self._tif = tifffile.TiffFile(self.img_file)
        try:
            with reading_tiff(self.img_file):
                self._pages, self.shape = self._layout()
        except BaseException:
            self.close()
            raise
        self.page_wise = self._pages is not None

    def _layout(self) -> tuple[list | None, tuple[int, int, int]]:
        """The series' pages if page ``i`` is channel ``i`` (else None), and (C, Y, X)."""
        check_page_chain(self._tif, self.img_file)
        series_shape = _unsqueezed_shape(self._tif)
        if series_shape is None:
            raise SteinpixError(f"{self.img_file}: not a readable TIFF image (it holds no image)")
        shape = _to_cyx(self.img_file, np.empty(series_shape, dtype=np.uint8)).shape
        pages = list(self._tif.series[0].pages)
        size = self._tif.filehandle.size
        for page in pages:
            if page is None or any(
                o + n > size for o, n in zip(page.dataoffsets, page.databytecounts, strict=True)
            ):
                raise SteinpixError(f"{self.img_file}: truncated (pixel data beyond the end)")
        # tifffile stacks a series' pages in order in front of the page shape: with one (Y, X)
        # page per channel, page i is channel i
        if len(pages) == shape[0] and {tuple(p.shape) for p in pages} == {shape[1:]}:
            return pages, shape
        return None, shape

    def read(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """Channels ``indices`` (in that order) as a C-contiguous (n, Y, X) array, native dtype."""
        indices = np.asarray(indices, dtype=np.intp)
        with reading_tiff(self.img_file):
            if self._pages is None:
                if self._whole is None:
                    self._whole = _to_cyx(self.img_file, self._tif.asarray(squeeze=False))
                return self._whole[indices]
            out = None
            for k, i in enumerate(indices):
                page = self._pages[i].asarray()
                if out is None:
                    out = np.empty((len(indices), *page.shape), dtype=page.dtype)
                out[k] = page
            return out if out is not None else np.empty((0, *self.shape[1:]))

    def close(self) -> None:
        self._tif.close()
        self._whole = None

    def __enter__(self) -> ImageChannels:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _lerp(a: np.ndarray, diff: np.ndarray, t: np.ndarray, out: np.ndarray) -> None:
    """``out = a + diff * t`` with ``diff = b - a`` already rounded to the work dtype.

    For float32 the multiply-add is evaluated in float64 and rounded once to float32 (a fused
    multiply-add, emulated in float64), which is what OpenCV's vectorised float path computes:
    it matches steinbock's images to within 2 ulp (56 of 1.3 M values differ on the mock data,
    the rest are bit-identical). numpy casts the float32 operands inside the ufunc loops, in
    small buffers, so no full-size float64 copies are made.
    """
    if t.size and np.all(t == t.flat[0]):
        t = t.flat[0]  # same products; numpy broadcasts a scalar much faster than a column
    if out.dtype == np.float32:
        wide = np.multiply(diff, t, dtype=np.float64)
        np.add(a, wide, out=wide)
        out[...] = wide
    else:
        np.multiply(diff, t, out=out)
        np.add(a, out, out=out)


def _axis_weights(n: int, scale: int, work: np.dtype) -> tuple[np.ndarray, ...]:
    """Source indices and weights of the ``n * scale`` output positions along one axis.

    Pixel centres are aligned (source coordinate ``(d + 0.5) / scale - 0.5``) and edges are
    replicated: output ``d`` is ``src[x0[d]] + (src[x1[d]] - src[x0[d]]) * frac[d]``.
    """
    pos = (np.arange(n * scale, dtype=np.float64) + 0.5) / scale - 0.5
    lo = np.floor(pos)
    frac = (pos - lo).astype(work)
    lo = lo.astype(np.intp)
    return np.clip(lo, 0, n - 1), np.clip(lo + 1, 0, n - 1), frac


# elements of the float64 temporaries per block: small enough to stay in the CPU's caches
_BLOCK_ELEMENTS = 1 << 17


@dataclass(frozen=True)
class _Phase:
    """Output positions ``d = scale * k + j`` of one phase ``j`` along an axis.

    For ``k`` in ``k0:k1`` they read the contiguous sources ``k + off`` and ``k + off + 1``
    (weights ``t``); the others (the replicated edges, where both sources coincide) are listed
    with their gathered sources ``edge_lo``, ``edge_hi`` and weights ``edge_t``.
    """

    j: int
    k0: int
    k1: int
    off: int
    t: np.ndarray
    edge_d: np.ndarray
    edge_lo: np.ndarray
    edge_hi: np.ndarray
    edge_t: np.ndarray


def _phases(n: int, scale: int, work: np.dtype) -> list[_Phase]:
    x0, x1, frac = _axis_weights(n, scale, work)
    phases = []
    for j in range(scale):
        d = np.arange(j, n * scale, scale)
        lo, hi = x0[d], x1[d]
        inner = np.flatnonzero(hi == lo + 1)
        if inner.size and (
            inner[-1] - inner[0] + 1 != inner.size
            or np.any(lo[inner] - inner != lo[inner[0]] - inner[0])
        ):
            inner = inner[:0]  # not slices (never seen): gather every position
        k0, k1 = (int(inner[0]), int(inner[-1]) + 1) if inner.size else (0, 0)
        off = int(lo[k0] - k0) if inner.size else 0
        edges = np.setdiff1d(np.arange(n), inner, assume_unique=True)
        phases.append(
            _Phase(j, k0, k1, off, frac[d[k0:k1]], d[edges], lo[edges], hi[edges], frac[d[edges]])
        )
    return phases


def _upscale_columns(src: np.ndarray, scale: int, out: np.ndarray) -> None:
    """Interpolate the 2-D ``src`` (R, n) along its columns into ``out`` (R, n * scale)."""
    n_rows, n = src.shape
    step = max(1, _BLOCK_ELEMENTS // n)
    for p in _phases(n, scale, src.dtype):
        cols = slice(p.j + scale * p.k0, p.j + scale * (p.k1 - 1) + 1, scale)
        for r0 in range(0, n_rows if p.k1 > p.k0 else 0, step):
            rows = slice(r0, min(n_rows, r0 + step))
            a = src[rows, p.k0 + p.off : p.k1 + p.off]
            b = src[rows, p.k0 + p.off + 1 : p.k1 + p.off + 1]
            _lerp(a, np.subtract(b, a), p.t, out[rows, cols])
        if p.edge_d.size:
            a, b = src[:, p.edge_lo], src[:, p.edge_hi]
            dst = np.empty(a.shape, dtype=out.dtype)
            _lerp(a, np.subtract(b, a), p.edge_t, dst)
            out[:, p.edge_d] = dst


def _upscale_rows(src: np.ndarray, scale: int, out: np.ndarray) -> None:
    """Interpolate the 2-D ``src`` (n, W) along its rows into ``out`` (n * scale, W)."""
    n, width = src.shape
    step = max(1, _BLOCK_ELEMENTS // width)
    for p in _phases(n, scale, src.dtype):
        for k in range(p.k0, p.k1, step):
            k_end = min(p.k1, k + step)
            a = src[k + p.off : k_end + p.off]
            b = src[k + p.off + 1 : k_end + p.off + 1]
            dst = out[p.j + scale * k : p.j + scale * (k_end - 1) + 1 : scale]
            _lerp(a, np.subtract(b, a), p.t[k - p.k0 : k_end - p.k0, np.newaxis], dst)
        if p.edge_d.size:
            a, b = src[p.edge_lo], src[p.edge_hi]
            dst = np.empty(a.shape, dtype=out.dtype)
            _lerp(a, np.subtract(b, a), p.edge_t[:, np.newaxis], dst)
            out[p.edge_d] = dst


def resize_linear(img: np.ndarray, scale: int) -> np.ndarray:
    """Upscale Y and X by an integer factor like OpenCV's ``resize(..., INTER_LINEAR)``.

    Pixel centres are aligned (source coordinate ``(d + 0.5) / scale - 0.5``) and edges are
    replicated. Rows are interpolated first, then columns. Floating-point images are
    interpolated in their own precision; integer images in float32, then rounded to the
    nearest integer as OpenCV's saturating cast does.

    Parameters
    ----------
    img : (C, Y, X) ndarray
    scale : int
        Factor >= 1; 1 returns ``img`` unchanged.

    Returns
    -------
    scaled : (C, Y * scale, X * scale) ndarray
        Same dtype as ``img``.
    """
    if scale == 1:
        return img
    out = np.empty((img.shape[0], img.shape[1] * scale, img.shape[2] * scale), dtype=img.dtype)
    for c, channel in enumerate(img):
        out[c] = resize_channel(channel, scale)
    return out


def resize_channel(channel: np.ndarray, scale: int) -> np.ndarray:
    """One (Y, X) channel of :func:`resize_linear`: (Y * scale, X * scale), same dtype."""
    if scale == 1:
        return channel
    work = channel.dtype if channel.dtype in (np.float32, np.float64) else np.dtype(np.float32)
    src = np.ascontiguousarray(channel, dtype=work)
    rows = np.empty((src.shape[0], src.shape[1] * scale), dtype=work)
    _upscale_columns(src, scale, rows)
    out = np.empty((src.shape[0] * scale, src.shape[1] * scale), dtype=work)
    _upscale_rows(rows, scale, out)
    if np.issubdtype(channel.dtype, np.integer):
        info = np.iinfo(channel.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(channel.dtype)
    return out


AggregationFunction = Callable[..., np.ndarray]


def aggregation_function(name: str) -> AggregationFunction:
    """The numpy function called ``name`` (e.g. ``mean``, ``max``, ``median``) for ``--aggr``."""
    func = getattr(np, name, None) if name and not name.startswith("_") else None
    if not callable(func):
        raise SteinpixError(f"--aggr {name}: not a numpy function (try mean, max or median)")
    # checked once here, so that preparing an image need not catch what a wrong function raises
    try:
        reduced = np.asarray(func(np.ones((2, 3, 4), dtype=np.float32), axis=0))
    except (TypeError, ValueError) as e:
        raise SteinpixError(f"--aggr {name}: not a reduction over channels ({e})") from None
    if reduced.shape != (3, 4):
        raise SteinpixError(
            f"--aggr {name}: not a reduction over channels (gives shape {reduced.shape} "
            "for 2 channels of 3 x 4 pixels)"
        )
    return func


def aggregate_channels(
    read: Callable[[np.ndarray], np.ndarray],
    n_channels: int,
    channel_groups: np.ndarray | None = None,
    aggr_func: AggregationFunction = np.mean,
    prepend_mean: bool = True,
    mean_factor: float = 100.0,
) -> np.ndarray:
    """The ilastik image before scaling: aggregated channel groups, their mean first.

    Channels are aggregated per group (sorted group values; channels whose group is NaN are
    dropped), and the mean of the resulting channels times ``mean_factor`` is prepended, in
    the image's native dtype (numpy's rules), as steinbock does. Only one group's channels are
    read at a time.

    Parameters
    ----------
    read : callable
        ``read(indices)`` returns those channels as an (n, Y, X) array
        (:meth:`ImageChannels.read`, or indexing a whole image).
    n_channels : int
        C, the image's channel count.
    channel_groups : (C,) float ndarray or None
        The panel's ``ilastik`` column; None uses all channels as they are.
    aggr_func : callable
        numpy reduction called as ``aggr_func(channels, axis=0)``.
    prepend_mean, mean_factor
        As the ``prepare`` options ``--mean`` and ``--meanfactor``.

    Returns
    -------
    ilastik_img : (C', Y, X) ndarray
        Dtype as numpy's arithmetic gives it (e.g. float64 for the mean of uint16 channels).
    """
    if channel_groups is None:
        ilastik_img = read(np.arange(n_channels))
    else:
        groups = np.unique(channel_groups[~np.isnan(channel_groups)])
        ilastik_img = np.stack(
            [
                np.asarray(aggr_func(read(np.flatnonzero(channel_groups == group)), axis=0))
                for group in groups
            ]
        )
    if prepend_mean:
        mean_img = ilastik_img.mean(axis=0, keepdims=True) * mean_factor
        ilastik_img = np.concatenate((mean_img, ilastik_img))
    return ilastik_img


def check_ilastik_image(ilastik_img: np.ndarray, scale_factor: int) -> None:
    """Raise what :func:`create_ilastik_image` would raise for this aggregated image, before
    :func:`write_ilastik_image` writes anything: ValueError or TypeError when it is not
    (C', Y, X) or its upscaled dtype cannot be converted to float32."""
    if ilastik_img.ndim != 3 or 0 in ilastik_img.shape:
        raise ValueError(f"the channel groups aggregate to shape {ilastik_img.shape}")
    _, height, width = ilastik_img.shape
    itemsize = max(img_dtype().itemsize, ilastik_img.dtype.itemsize)
    channel_bytes = height * width * scale_factor**2 * itemsize
    memory = physical_memory()
    if memory is not None and channel_bytes > memory:
        # a typo such as --scale 200000000: say so before the upscaling's index arrays alone
        # take all the memory (the kernel then kills the process)
        raise MemoryError(
            f"one channel upscaled {scale_factor}x would take {channel_bytes / 2**30:.3g} GiB, "
            f"more than this machine's {memory / 2**30:.3g} GiB"
        )
    to_dtype(resize_channel(ilastik_img[0, :1, :1], scale_factor))


def physical_memory() -> int | None:
    """The machine's physical memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def create_ilastik_image(
    img: np.ndarray,
    channel_groups: np.ndarray | None = None,
    aggr_func: AggregationFunction = np.mean,
    prepend_mean: bool = True,
    mean_factor: float = 100.0,
    scale_factor: int = 1,
) -> np.ndarray:
    """Turn a whole steinbock image into the image that ilastik classifies, as steinbock does.

    :func:`aggregate_channels`, then bilinear upscaling, and the result is converted to
    float32 at the end, as in steinbock. ``prepare`` does the same channel by channel
    (:func:`write_ilastik_image`) without holding the image or the result whole.

    Parameters
    ----------
    img : (C, Y, X) ndarray
    channel_groups, aggr_func, prepend_mean, mean_factor
        As :func:`aggregate_channels`.
    scale_factor : int
        As the ``prepare`` option ``--scale``.

    Returns
    -------
    ilastik_img : (C', Y * scale_factor, X * scale_factor) float32 ndarray
    """
    ilastik_img = aggregate_channels(
        lambda indices: img[indices], img.shape[0], channel_groups, aggr_func, prepend_mean,
        mean_factor,
    )
    if scale_factor > 1:
        ilastik_img = resize_linear(ilastik_img, scale_factor)
    return to_dtype(ilastik_img)


def draw_crop_position(
    shape: tuple[int, ...], crop_size: int, rng: np.random.Generator
) -> tuple[int, int] | None:
    """The (x, y) corner of an image's random crop, drawing from ``rng`` as steinbock does.

    ``x`` is drawn first (only when the image is wider than the crop), then ``y`` (only when it
    is taller). An image smaller than the crop in either axis gets no crop and draws nothing.

    Parameters
    ----------
    shape : (C, Y, X)
    crop_size : int
    rng : numpy.random.Generator
        One generator for the whole data set, ``numpy.random.default_rng(seed)``.
    """
    height, width = shape[-2], shape[-1]
    if height < crop_size or width < crop_size:
        return None
    x = int(rng.integers(width - crop_size)) if width > crop_size else 0
    y = int(rng.integers(height - crop_size)) if height > crop_size else 0
    return x, y


def crop_file_name(img_stem: str, x: int, y: int, crop_size: int) -> str:
    return f"{img_stem}_x{x}_y{y}_w{crop_size}_h{crop_size}.h5"


@contextmanager
def steinbock_h5_dataset(
    h5_file: str | os.PathLike, dataset: str, shape: tuple[int, ...]
) -> Iterator[h5py.Dataset]:
    """An empty float32 dataset in a new steinbock HDF5 file, to fill in parts; atomic.

    The file holds one dataset with the attributes ``display_mode``, ``axistags`` (ASCII
    strings) and ``steinbock`` (True), in the oldest HDF5 format, as steinbock writes it. It is
    renamed into place when the block ends without an exception.
    """
    with atomic_output(Path(h5_file)) as tmp, h5py.File(tmp, "w", libver=H5_LIBVER) as f:
        ds = f.create_dataset(dataset, shape=shape, dtype=img_dtype())
        yield ds
        ds.attrs["display_mode"] = DISPLAY_MODE.encode("ascii")
        ds.attrs["axistags"] = AXISTAGS.encode("ascii")
        ds.attrs["steinbock"] = True


def write_steinbock_h5(img: np.ndarray, h5_file: str | os.PathLike, dataset: str) -> Path:
    """Write a CYX image as steinbock does (``img`` for images, ``crop`` for crops), atomically
    (see :func:`steinbock_h5_dataset`)."""
    img = to_dtype(img)
    with steinbock_h5_dataset(h5_file, dataset, img.shape) as ds:
        ds[...] = img
    return Path(h5_file)


def write_ilastik_image(
    ilastik_img: np.ndarray,
    scale_factor: int,
    h5_file: str | os.PathLike,
    crop: tuple[int, int, int] | None = None,
) -> np.ndarray | None:
    """Upscale and write an aggregated image (:func:`aggregate_channels`) one channel at a time.

    The file equals ``write_steinbock_h5(create_ilastik_image(...), h5_file, "img")``; only one
    upscaled channel is held at a time.

    Parameters
    ----------
    ilastik_img : (C', Y, X) ndarray
    scale_factor : int
    h5_file : path
        The ilastik image to write (dataset ``img``).
    crop : (x, y, size), optional
        A square of the upscaled image to return as well.

    Returns
    -------
    crop : (C', size, size) float32 ndarray or None
    """
    n, height, width = ilastik_img.shape
    shape = (n, height * scale_factor, width * scale_factor)
    crop_img = None if crop is None else np.empty((n, crop[2], crop[2]), dtype=img_dtype())

    def upscale(c: int) -> np.ndarray:
        return to_dtype(resize_channel(ilastik_img[c], scale_factor))

    # numpy releases the GIL in its loops: upscale the next channel(s) on another core while
    # this thread writes; at most ``workers`` upscaled channels wait, so memory stays bounded
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = max(1, min(n, cores or 1, 2))
    with steinbock_h5_dataset(h5_file, IMG_DATASET, shape) as ds, ThreadPoolExecutor(
        workers
    ) as pool:
        pending = deque(pool.submit(upscale, c) for c in range(min(n, workers)))
        for c in range(n):
            channel = pending.popleft().result()
            if c + workers < n:
                pending.append(pool.submit(upscale, c + workers))
            ds[c] = channel
            if crop_img is not None:
                x, y, size = crop
                crop_img[c] = channel[y : y + size, x : x + size]
            del channel
    return crop_img
