"""``prepare`` reads channel groups page by page and writes the upscaled image channel by
channel; its files must be byte-identical to the whole-image path (read the whole stack,
``create_ilastik_image``, write), which equals steinbock's (``test_prepare.py``)."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile

from steinpix import images
from steinpix.errors import SteinpixError
from steinpix.prepare import iter_prepare

CROP = 16


def gather_resize(img: np.ndarray, scale: int) -> np.ndarray:
    """The previous ``resize_linear``: every output position from gathered sources."""
    if scale == 1:
        return img
    work = img.dtype if img.dtype in (np.float32, np.float64) else np.dtype(np.float32)

    def lerp(a, b, t):
        if a.dtype == np.float32:
            diff = (b - a).astype(np.float64)
            return (a.astype(np.float64) + diff * t.astype(np.float64)).astype(np.float32)
        return a + (b - a) * t

    def axis_weights(n):
        pos = (np.arange(n * scale, dtype=np.float64) + 0.5) / scale - 0.5
        lo = np.floor(pos)
        frac = (pos - lo).astype(work)
        lo = lo.astype(np.intp)
        return np.clip(lo, 0, n - 1), np.clip(lo + 1, 0, n - 1), frac

    x0, x1, fx = axis_weights(img.shape[2])
    y0, y1, fy = axis_weights(img.shape[1])
    out = np.empty((img.shape[0], img.shape[1] * scale, img.shape[2] * scale), dtype=work)
    for c, channel in enumerate(img):
        channel = channel.astype(work, copy=False)
        rows = lerp(channel[:, x0], channel[:, x1], fx)
        out[c] = lerp(rows[y0, :], rows[y1, :], fy[:, np.newaxis])
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(img.dtype)
    return out


def random_image(rng, shape, dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    img = rng.gamma(0.6, 4.0, size=shape) * rng.choice([1.0, -1.0, 1e-30, 1e30], size=shape)
    img = img.astype(dtype)
    flat = img.reshape(-1)
    if flat.size > 10:
        flat[rng.integers(flat.size, size=4)] = [np.nan, np.inf, -np.inf, -0.0]
    return img


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN and inf on purpose
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int16, np.uint8])
@pytest.mark.parametrize("scale", [1, 2, 3, 4, 5])
def test_resize_equals_gathering_every_position(dtype, scale):
    rng = np.random.default_rng(scale)
    for shape in ((1, 1, 1), (2, 1, 7), (1, 5, 1), (3, 17, 23), (1, 70, 300), (1, 300, 2)):
        img = random_image(rng, shape, dtype)
        ours, ref = images.resize_linear(img, scale), gather_resize(img, scale)
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        assert ours.tobytes() == ref.tobytes(), (shape, np.count_nonzero(ours != ref))


# --- the page-wise prepare path against the whole-image path, on odd TIFFs ------------------


def write_tiff(path: Path, data: np.ndarray, **kwargs) -> Path:
    tifffile.imwrite(path, data, **kwargs)
    return path


# (name, stored array, imwrite options, channels read page by page?)
ODD_TIFFS = [
    ("uint16_cyx", (7, 40, 33), np.uint16, {}, True),
    ("float64_cyx", (7, 40, 33), np.float64, {}, True),
    ("float32_imagej_tzcyxs", (1, 1, 7, 40, 33, 1), np.float32, {"imagej": True}, True),
    ("uint16_tzcyx_ome", (1, 1, 7, 40, 33), np.uint16, {"ome": True,
                                                       "metadata": {"axes": "TZCYX"}}, True),
    ("float32_zlib", (7, 40, 33), np.float32, {"compression": "zlib"}, True),
    ("uint16_lzw_bigendian", (7, 40, 33), np.uint16, {"compression": "lzw",
                                                       "byteorder": ">"}, True),
    ("uint16_one_page_planar", (7, 40, 33), np.uint16, {"photometric": "minisblack",
                                                         "planarconfig": "separate"}, False),
    ("float32_yx", (40, 33), np.float32, {}, True),
]
# per channel, its group (NaN: unused) for 7 channels, or None for "all channels"
GROUPINGS = {
    "groups": np.array([2, np.nan, 1, 2, np.nan, 1, 2]),
    "one_group": np.array([np.nan, np.nan, 5, np.nan, np.nan, np.nan, np.nan]),
    "all": None,
}


def whole_image_path(img_file, out_dir, groups, aggr, mean, scale, rng):
    """prepare's files the way they were made before: whole stack in, whole image out."""
    ilastik_img = images.create_ilastik_image(
        images.read_image(img_file), groups, aggr, mean, 100.0, scale
    )
    h5 = images.write_steinbock_h5(ilastik_img, out_dir / "img.h5", images.IMG_DATASET)
    x, y = images.draw_crop_position(ilastik_img.shape, CROP, rng)
    crop = ilastik_img[:, y : y + CROP, x : x + CROP]
    return h5, images.write_steinbock_h5(crop, out_dir / "crop.h5", images.CROP_DATASET)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize(("name", "shape", "dtype", "kwargs", "page_wise"), ODD_TIFFS)
def test_page_wise_files_equal_whole_image_files(
    tmp_path, name, shape, dtype, kwargs, page_wise, grouping
):
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    img_file = write_tiff(tmp_path / f"{name}.tiff", random_image(rng, shape, dtype), **kwargs)
    n_channels = 1 if len(shape) == 2 else 7
    groups = GROUPINGS[grouping] if n_channels == 7 else None
    with images.ImageChannels(img_file) as channels:
        assert channels.shape == images.read_image_shape(img_file)
        assert channels.page_wise is page_wise
    for aggr, mean, scale in ((np.mean, True, 2), (np.median, False, 3), (np.max, True, 1)):
        seed = scale
        ours = tmp_path / f"ours_{scale}"
        (result,) = iter_prepare(
            [img_file], groups, aggr, mean, 100.0, scale, CROP, ours / "img", ours / "crops",
            seed,
        )
        assert result.error is None, result.error
        ref_dir = tmp_path / f"ref_{scale}"
        ref_dir.mkdir()
        ref_img, ref_crop = whole_image_path(
            img_file, ref_dir, groups, aggr, mean, scale, np.random.default_rng(seed)
        )
        # same bytes: the HDF5 datasets, their attributes and the file layout
        assert sha256(result.ilastik_img_file) == sha256(ref_img)
        assert sha256(result.crop_file) == sha256(ref_crop)


def test_pixel_data_beyond_the_end_is_reported_even_in_unused_channels(tmp_path):
    """A file cut short where only an unused channel's pixels are missing is still an error
    (as when the whole stack is read), before anything is written."""
    img = np.arange(7 * 40 * 33, dtype=np.uint16).reshape(7, 40, 33)
    img_file = write_tiff(tmp_path / "a.tiff", img)
    with tifffile.TiffFile(img_file) as tif:
        (offset,) = tif.pages[-1].dataoffsets
        size = tif.filehandle.size
    # point the last page's strip past the end of the file (its IFD stays readable)
    entry = struct.pack("<HHII", 273, 4, 1, offset)  # StripOffsets, LONG, 1 value
    data = img_file.read_bytes()
    assert data.count(entry) == 1
    img_file.write_bytes(data.replace(entry, struct.pack("<HHII", 273, 4, 1, size + 10)))
    with pytest.raises(SteinpixError, match="a.tiff: truncated"):
        images.ImageChannels(img_file)
    groups = np.array([1, 1, 2, np.nan, np.nan, np.nan, np.nan])  # last channel unused
    (result,) = iter_prepare(
        [img_file], groups, np.mean, True, 100.0, 2, CROP, tmp_path / "i", tmp_path / "c", 1
    )
    assert result.error is not None and "truncated" in result.error
    assert not any((tmp_path / "i").iterdir())
