"""Thumbnails and numbers for looking at ilastik's outputs: probabilities coloured as ilastik
shows them, an image's first channel with a robust contrast stretch, uncertainty, per-class
pixel fractions and flags.

Everything is computed from one read of each file, in bands of rows, so that the memory used
besides the input arrays is bounded by the thumbnail size (``--size``), not the image size.
"""

from __future__ import annotations

import functools
import math
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import tifffile

from steinpix.atomic import atomic_output, make_folder
from steinpix.errors import SteinpixError
from steinpix.images import CROP_DATASET, IMG_DATASET

# ilastik's default label colours (volumina's ``default16_new`` without its transparent
# first entry), used when a project stores no PmapColors
DEFAULT_COLORS = (
    (255, 225, 25),
    (0, 130, 200),
    (230, 25, 75),
    (70, 240, 240),
    (60, 180, 75),
    (250, 190, 190),
    (170, 110, 40),
    (145, 30, 180),
    (0, 128, 128),
    (245, 130, 48),
    (240, 50, 230),
    (210, 245, 60),
    (255, 215, 180),
    (230, 190, 255),
    (128, 128, 128),
)

STRETCH_PERCENTILES = (1.0, 99.5)
# rows per band: enough for numpy to be efficient, small enough to bound the temporaries
BAND_PIXELS = 1 << 18

# what a damaged TIFF or its compressed data can raise while being read
TIFF_READ_ERRORS: tuple[type[BaseException], ...] = (
    tifffile.TiffFileError,
    ValueError,
    KeyError,
    IndexError,
    RuntimeError,  # imagecodecs' codec errors (LZW, deflate, ...) derive from it
    zlib.error,
    OSError,
)


@dataclass(frozen=True)
class Classes:
    """A project's classes, in probability-channel order.

    Attributes
    ----------
    names : tuple of str
    colors : (N, 3) uint8 ndarray
        RGB display colours of the probability maps (``PmapColors``).
    default_colors : bool
        True when the project stores no usable colours and ilastik's defaults are used.
    """

    names: tuple[str, ...]
    colors: np.ndarray
    default_colors: bool


def decode_colors(values: np.ndarray) -> np.ndarray | None:
    """Decode colours as ilastik stores them.

    ilastik 1.2+ stores ``(N, 3)`` integer RGB rows; colours added by some code paths (e.g.
    importing labels) are Qt ``QRgb`` values, one uint32 ``0xAARRGGBB`` per class.

    Parameters
    ----------
    values : ndarray
        The dataset's contents.

    Returns
    -------
    colors : (N, 3) uint8 ndarray, or None when ``values`` is neither encoding
    """
    values = np.asarray(values)
    if values.size == 0 or not np.issubdtype(values.dtype, np.integer):
        return None
    if values.ndim == 2 and values.shape[1] in (3, 4):
        if values.min() < 0 or values.max() > 255:
            return None
        return values[:, :3].astype(np.uint8)
    if values.ndim == 1:
        rgb = values.astype(np.uint64)
        return np.stack([(rgb >> 16) & 0xFF, (rgb >> 8) & 0xFF, rgb & 0xFF], axis=1).astype(
            np.uint8
        )
    return None


def _open_h5(path: Path, not_readable: str) -> h5py.File:
    """Open an HDF5 file for reading; a missing or unreadable file is one line naming it
    (``not_readable`` is formatted with h5py's message)."""
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise SteinpixError(f"{path}: file not found") from None
    except OSError as e:
        raise SteinpixError(f"{path}: {not_readable.format(e)}") from None


def _dataset(group: h5py.Group, name: str) -> np.ndarray | None:
    ds = group.get(name)
    if not isinstance(ds, h5py.Dataset) or ds.attrs.get("isEmpty", False):
        return None
    return ds[()]


def read_classes(ilp: str | os.PathLike) -> Classes:
    """Read class names and display colours from a pixel-classification project.

    Parameters
    ----------
    ilp : path-like

    Returns
    -------
    Classes
        Colours fall back to ilastik's defaults (``default_colors`` True) when
        ``PixelClassification/PmapColors`` is missing, empty, of another length or undecodable.

    Raises
    ------
    SteinpixError
        When the file is not HDF5 or has no class names.
    """
    ilp = Path(ilp)
    with _open_h5(ilp, "not an ilastik project (HDF5: {})") as f:
        group = f.get("PixelClassification")
        if not isinstance(group, h5py.Group):
            raise SteinpixError(f"{ilp}: no PixelClassification group (not a pixel classifier)")
        raw_names = _dataset(group, "LabelNames")
        raw_colors = _dataset(group, "PmapColors")
    if raw_names is None or np.ndim(raw_names) != 1 or len(raw_names) == 0:
        raise SteinpixError(f"{ilp}: no PixelClassification/LabelNames (no classes defined)")
    names = tuple(
        n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in raw_names
    )
    colors = None if raw_colors is None else decode_colors(raw_colors)
    if colors is not None and len(colors) == len(names):
        return Classes(names, colors, default_colors=False)
    defaults = np.array(
        [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(len(names))], dtype=np.uint8
    )
    return Classes(names, defaults, default_colors=True)


def block_factor(height: int, width: int, size: int) -> int:
    """The smallest integer factor that brings the long side to at most ``size`` pixels."""
    return max(1, math.ceil(max(height, width) / size))


def thumbnail_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """The (height, width) of a thumbnail: block means of ``block_factor`` pixels per side;
    blocks at the bottom and right edges may be smaller."""
    f = block_factor(height, width, size)
    return -(-height // f), -(-width // f)


def _bands(height: int, width: int, factor: int) -> list[tuple[int, int]]:
    rows = max(factor, (BAND_PIXELS // max(width, 1)) // factor * factor)
    return [(y, min(y + rows, height)) for y in range(0, height, rows)]


def _block_sums(band: np.ndarray, factor: int) -> np.ndarray:
    """Sums over ``factor`` x ``factor`` blocks of a (Y, X[, C]) band (float64, small)."""
    acc = np.uint64 if np.issubdtype(band.dtype, np.integer) else np.float64
    rows = np.add.reduceat(band, np.arange(0, band.shape[0], factor), axis=0, dtype=acc)
    return np.add.reduceat(rows, np.arange(0, band.shape[1], factor), axis=1, dtype=acc)


def _block_counts(y0: int, y1: int, width: int, factor: int) -> np.ndarray:
    ny = np.minimum(factor, y1 - np.arange(y0, y1, factor))
    nx = np.minimum(factor, width - np.arange(0, width, factor))
    return np.outer(ny, nx).astype(np.float64)


def block_mean(img: np.ndarray, factor: int) -> np.ndarray:
    """Downsample by averaging ``factor`` x ``factor`` blocks (edge blocks may be smaller).

    Works band by band, so no full-size float copy is made.

    Parameters
    ----------
    img : (Y, X) or (Y, X, C) ndarray
    factor : int >= 1

    Returns
    -------
    (ceil(Y / factor), ceil(X / factor)[, C]) float32 ndarray
    """
    height, width = img.shape[:2]
    if factor == 1:
        return img.astype(np.float32)
    out = np.empty((-(-height // factor), -(-width // factor), *img.shape[2:]), np.float32)
    for y0, y1 in _bands(height, width, factor):
        counts = _block_counts(y0, y1, width, factor)
        if img.ndim == 3:
            counts = counts[:, :, np.newaxis]
        out[y0 // factor : -(-y1 // factor)] = _block_sums(img[y0:y1], factor) / counts
    return out


def probability_scale(dtype: np.dtype) -> float:
    """The stored value of probability 1: 65535 for steinbock's uint16, 255 for uint8, 1 for
    floating point."""
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


@dataclass(frozen=True)
class ProbabilitySummary:
    """What a probability map says, from one pass over it.

    Attributes
    ----------
    counts : (C,) int64 ndarray
        Pixels whose most probable class is each class (ties go to the first class).
    mean_max_probability : float
        Mean over pixels of the largest class probability (1 / C: uncertain everywhere).
    thumbnail : (h, w, C) float32 ndarray
        Block means of the probabilities, in [0, 1].
    """

    counts: np.ndarray
    mean_max_probability: float
    thumbnail: np.ndarray


def summarize_probabilities(probs: np.ndarray, size: int) -> ProbabilitySummary:
    """Class counts, mean maximum probability and a block-mean thumbnail, in one pass.

    Parameters
    ----------
    probs : (Y, X, C) ndarray
        Probabilities as exported (uint16 0-65535, uint8 0-255, or float 0-1).
    size : int
        Maximum thumbnail side.

    Returns
    -------
    ProbabilitySummary
    """
    height, width, n_classes = probs.shape
    factor = block_factor(height, width, size)
    scale = probability_scale(probs.dtype)
    counts = np.zeros(n_classes, dtype=np.int64)
    max_sum = 0.0
    thumb = np.empty((*thumbnail_shape(height, width, size), n_classes), dtype=np.float32)
    for y0, y1 in _bands(height, width, factor):
        band = probs[y0:y1]
        best = np.argmax(band, axis=-1)
        counts += np.bincount(best.ravel(), minlength=n_classes)
        max_sum += float(np.take_along_axis(band, best[..., np.newaxis], -1).sum(dtype=np.float64))
        rows = slice(y0 // factor, -(-y1 // factor))
        if factor == 1:
            thumb[rows] = band
        else:
            sums = _block_sums(band, factor)
            thumb[rows] = sums / _block_counts(y0, y1, width, factor)[:, :, np.newaxis]
    thumb /= scale
    return ProbabilitySummary(counts, max_sum / scale / max(height * width, 1), thumb)


def color_probabilities(probs: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Colour probabilities as ilastik does: each class's colour weighted by its probability.

    Parameters
    ----------
    probs : (h, w, C) float ndarray in [0, 1]
    colors : (C, 3) uint8 ndarray

    Returns
    -------
    rgb : (h, w, 3) uint8 ndarray
        A pixel of probability 1 for one class has exactly that class's colour.
    """
    rgb = probs.astype(np.float32, copy=False) @ colors.astype(np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def stretch_limits(channel: np.ndarray) -> tuple[float, float]:
    """The 1st and 99.5th percentiles of the finite pixels (the robust contrast range).

    ``channel`` is partitioned in place (its order is lost) to avoid a full copy.
    """
    flat = channel.reshape(-1)
    finite = np.isfinite(flat)
    if not finite.all():
        flat = flat[finite]
    if flat.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(flat, STRETCH_PERCENTILES, overwrite_input=True)
    return float(lo), float(hi)


def stretch(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``lo``..``hi`` linearly to 0..255 (clipped); a constant image becomes black."""
    if not hi > lo:
        return np.zeros(img.shape, dtype=np.uint8)
    out = (img.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(np.rint(np.nan_to_num(out, nan=0.0)), 0, 255).astype(np.uint8)


def channel_thumbnail(channel: np.ndarray, size: int) -> tuple[np.ndarray, tuple[float, float]]:
    """A stretched, block-mean thumbnail of one channel; the stretch limits come from the full
    resolution pixels. ``channel`` is reordered in place.

    Returns
    -------
    thumb : (h, w) uint8 ndarray
    limits : (lo, hi)
    """
    factor = block_factor(*channel.shape, size)
    thumb = block_mean(channel, factor)
    limits = stretch_limits(channel)
    return stretch(thumb, *limits), limits


def uncertainty_thumbnail(uncertainty: np.ndarray, size: int) -> np.ndarray:
    """Uncertainty (uint16 0-65535 for 0-1) as a grey thumbnail: white = uncertain."""
    factor = block_factor(*uncertainty.shape, size)
    thumb = block_mean(uncertainty, factor) * np.float32(
        255.0 / probability_scale(uncertainty.dtype)
    )
    return np.clip(np.rint(thumb), 0, 255).astype(np.uint8)


def _read_tiff(path: Path, what: str) -> np.ndarray:
    try:
        pixels = tifffile.imread(path)
    except FileNotFoundError:
        raise SteinpixError(f"{path}: file not found") from None
    except TIFF_READ_ERRORS as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SteinpixError(f"{path}: not a readable {what} TIFF ({reason})") from None
    if pixels.size == 0:
        raise SteinpixError(f"{path}: not a readable {what} TIFF (no pixels)")
    return pixels


def read_probabilities(path: str | os.PathLike, n_classes: int) -> np.ndarray:
    """Read a probability TIFF as ilastik and steinbock write it.

    Parameters
    ----------
    path : path-like
    n_classes : int
        The project's number of classes; the TIFF must have as many channels.

    Returns
    -------
    probs : (Y, X, C) ndarray, uint16 (or uint8 / float, as stored)

    Raises
    ------
    SteinpixError
        Unreadable file, wrong shape or dtype, or a class count unlike the project's.
    """
    path = Path(path)
    probs = _read_tiff(path, "probability")
    if probs.ndim == 2:
        probs = probs[:, :, np.newaxis]
    if probs.ndim != 3:
        raise SteinpixError(f"{path}: probabilities of shape {probs.shape}, expected Y x X x C")
    if not (
        np.issubdtype(probs.dtype, np.unsignedinteger) or np.issubdtype(probs.dtype, np.floating)
    ):
        raise SteinpixError(f"{path}: probabilities of type {probs.dtype}, expected uint16")
    if probs.shape[2] != n_classes:
        raise SteinpixError(
            f"{path}: {probs.shape[2]} probability channels, but the project has "
            f"{n_classes} classes"
        )
    return probs


def read_uncertainty(path: str | os.PathLike) -> np.ndarray:
    """Read an uncertainty TIFF (uint16 Y x X, 0-65535 for 0-1)."""
    path = Path(path)
    unc = _read_tiff(path, "uncertainty")
    if unc.ndim == 3 and unc.shape[2] == 1:
        unc = unc[:, :, 0]
    if unc.ndim != 2 or not (
        np.issubdtype(unc.dtype, np.unsignedinteger) or np.issubdtype(unc.dtype, np.floating)
    ):
        raise SteinpixError(
            f"{path}: uncertainty of {unc.dtype} {unc.shape}, expected uint16 Y x X"
        )
    return unc


def read_first_channel(path: str | os.PathLike, dataset: str = IMG_DATASET) -> np.ndarray:
    """Read channel 0 (steinbock's mean channel) of a steinbock HDF5 image or crop.

    Parameters
    ----------
    path : path-like
    dataset : str
        ``img`` for images, ``crop`` for crops.

    Returns
    -------
    channel : (Y, X) float32 ndarray
    """
    path = Path(path)
    with _open_h5(path, "not an HDF5 image ({})") as f:
        ds = f.get(dataset)
        if not isinstance(ds, h5py.Dataset):
            hint = (
                " (a crop not in steinbock format? see classify ilastik fix)"
                if (dataset == CROP_DATASET)
                else ""
            )
            raise SteinpixError(f"{path}: no '{dataset}' dataset{hint}")
        if ds.ndim != 3 or ds.shape[0] == 0:
            raise SteinpixError(
                f"{path}: the '{dataset}' dataset has shape {ds.shape}, expected C x Y x X"
            )
        try:
            return np.asarray(ds[0], dtype=np.float32)
        except OSError as e:  # a damaged chunk
            raise SteinpixError(f"{path}: cannot read '{dataset}' ({e})") from None


def image_flags(
    fractions: Sequence[float],
    mean_max_probability: float,
    names: Sequence[str],
    max_fraction: float = 0.95,
    min_confidence: float = 0.6,
) -> list[str]:
    """Short reasons why an image's probabilities look wrong (empty list: nothing seen).

    Parameters
    ----------
    fractions : (C,) floats
        Fraction of pixels whose most probable class is each class.
    mean_max_probability : float
    names : class names
    max_fraction : float
        Flag a class covering more than this fraction of the pixels.
    min_confidence : float
        Flag a mean maximum probability below this (uncertain everywhere).
    """
    flags = [
        f"{name} on {fraction:.1%} of pixels"
        for name, fraction in zip(names, fractions, strict=True)
        if fraction > max_fraction
    ]
    if mean_max_probability < min_confidence:
        flags.append(f"uncertain: mean max probability {mean_max_probability:.2f}")
    return flags


@functools.cache
def _png_encoder() -> Callable[[np.ndarray], bytes]:
    """imagecodecs' PNG encoder with the fast settings where the release has them (2023+)."""
    import imagecodecs

    def fast(pixels: np.ndarray) -> bytes:
        return imagecodecs.png_encode(pixels, level=1, strategy=3, filter=16)

    def plain(pixels: np.ndarray) -> bytes:
        return imagecodecs.png_encode(pixels, level=1)

    try:  # older releases take no strategy or filter: same image, a little slower
        fast(np.zeros((1, 1), np.uint8))
    except TypeError:
        return plain
    return fast


def write_png(path: str | os.PathLike, pixels: np.ndarray) -> None:
    """Write a (h, w) grey or (h, w, 3) RGB uint8 image as PNG, atomically.

    Uses libpng through imagecodecs (already needed for LZW TIFFs) with its fast settings
    (zlib level 1, run-length strategy, SUB filter): about twice as fast as Pillow's level 1,
    which matters for 1024-pixel thumbnails.
    """
    data = _png_encoder()(np.ascontiguousarray(pixels))
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def png_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(height, width) of a PNG from its header, or None when it is not a readable PNG."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return height, width


@dataclass(frozen=True)
class ImageRecord:
    """An image's numbers in the preview (one row of ``summary.csv``).

    Attributes
    ----------
    name : str
        The image's stem.
    height, width : int
        Size of the probability map, in pixels.
    fractions : tuple of float
        Fraction of pixels whose most probable class is each class.
    mean_max_probability : float
    """

    name: str
    height: int
    width: int
    fractions: tuple[float, ...]
    mean_max_probability: float


THUMBNAIL_KINDS = ("probabilities", "image", "uncertainty")


def thumbnail_path(out_dir: str | os.PathLike, name: str, kind: str) -> Path:
    """``<out_dir>/images/<name>_<kind>.png``; kind is one of :data:`THUMBNAIL_KINDS`."""
    return Path(out_dir) / "images" / f"{name}_{kind}.png"


def preview_image(
    name: str,
    prob_file: str | os.PathLike,
    img_file: str | os.PathLike,
    uncertainty_file: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    classes: Classes,
    size: int,
) -> ImageRecord:
    """Write an image's thumbnails and return its numbers.

    Every input is read (once) and checked before anything is written, so a bad file leaves
    no new output behind.

    Parameters
    ----------
    name : str
        The image's stem (names the thumbnails).
    prob_file : path-like
        Probability TIFF (Y x X x classes).
    img_file : path-like
        The steinbock HDF5 image the probabilities were computed from (same Y x X).
    uncertainty_file : path-like or None
        Uncertainty TIFF (Y x X), or None for no uncertainty thumbnail.
    out_dir : path-like
        Thumbnails go to ``out_dir/images/``.
    classes : Classes
    size : int
        Maximum thumbnail side.

    Returns
    -------
    ImageRecord
    """
    probs = read_probabilities(prob_file, len(classes.names))
    height, width = probs.shape[:2]
    channel = read_first_channel(img_file)
    if channel.shape != (height, width):
        raise SteinpixError(
            f"{img_file}: image of {channel.shape[1]} x {channel.shape[0]} pixels, but its "
            f"probabilities {prob_file} are {width} x {height}"
        )
    unc = None
    if uncertainty_file is not None:
        unc = read_uncertainty(uncertainty_file)
        if unc.shape != (height, width):
            raise SteinpixError(
                f"{uncertainty_file}: uncertainty of {unc.shape[1]} x {unc.shape[0]} pixels, "
                f"but the probabilities {prob_file} are {width} x {height}"
            )
    summary = summarize_probabilities(probs, size)
    del probs
    rgb = color_probabilities(summary.thumbnail, classes.colors)
    gray, _ = channel_thumbnail(channel, size)
    del channel
    make_folder(Path(out_dir) / "images")
    write_png(thumbnail_path(out_dir, name, "probabilities"), rgb)
    write_png(thumbnail_path(out_dir, name, "image"), gray)
    if unc is not None:
        write_png(thumbnail_path(out_dir, name, "uncertainty"), uncertainty_thumbnail(unc, size))
    n_pixels = max(height * width, 1)
    return ImageRecord(
        name,
        height,
        width,
        tuple(float(c) / n_pixels for c in summary.counts),
        summary.mean_max_probability,
    )


def is_up_to_date(
    outputs: Sequence[str | os.PathLike], inputs: Sequence[str | os.PathLike]
) -> bool:
    """Whether every output exists and is newer than every input (the rerun rule of ``run``)."""
    try:
        oldest = min(os.stat(p).st_mtime_ns for p in outputs)
    except FileNotFoundError:
        return False
    return oldest > max(os.stat(p).st_mtime_ns for p in inputs)


@dataclass(frozen=True)
class CropRecord:
    """A crop on the contact sheet: name, size, contrast limits and flags."""

    name: str
    height: int
    width: int
    limits: tuple[float, float]
    flags: tuple[str, ...]


def crop_thumbnail_path(out_dir: str | os.PathLike, name: str) -> Path:
    """``<out_dir>/crops/<name>.png``."""
    return Path(out_dir) / "crops" / f"{name}.png"


def preview_crop(
    crop_file: str | os.PathLike, out_dir: str | os.PathLike, size: int, write: bool = True
) -> CropRecord:
    """Read a steinbock crop's first channel; write its stretched thumbnail when ``write``.

    Returns
    -------
    CropRecord
        Flags a crop without contrast (its 1st and 99.5th percentiles are equal: blank).
    """
    crop_file = Path(crop_file)
    channel = read_first_channel(crop_file, CROP_DATASET)
    height, width = channel.shape
    gray, limits = channel_thumbnail(channel, size)
    flags = () if limits[1] > limits[0] else ("blank: no contrast in the first channel",)
    if write:
        make_folder(Path(out_dir) / "crops")
        write_png(crop_thumbnail_path(out_dir, crop_file.stem), gray)
    return CropRecord(crop_file.stem, height, width, limits, flags)
