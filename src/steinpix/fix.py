"""``classify ilastik fix``: bring a pre-trained ilastik project and its crops into steinbock
format, all or nothing.

The work happens in three phases, so that a failure never leaves a half-patched project:

1. **Plan** (read only): read the project's lanes, list the crops, read their headers and
   axis orders, and match every lane to a crop.
2. **Prepare** (temporary files only): patch a copy of the project (checking every label
   block), compare it with the original, make the backups if anything is to change, and write
   the patched crops under hidden temporary names next to the originals.
3. **Swap**: rename the temporary files over the originals. If a rename fails, the originals
   that were already replaced are put back (they are kept as hard links until the end).

On any failure the temporary files and the backups of this run are removed. A project and
crops that are already in steinbock format are left alone: nothing is written, no backup is
made, and ``fix`` succeeds, so running it twice is harmless.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from steinpix import images, progress, project
from steinpix.atomic import create_temporary, temporary_sibling
from steinpix.errors import SteinpixError, first_line, os_error_text, read_error

logger = logging.getLogger(__name__)

# The axis order of steinbock's crops and of the lanes and label blocks that point at them
STEINBOCK_AXES = ("c", "y", "x")
# ilastik's (vigra's) axis keys: time, channel and the three spatial axes
KNOWN_AXES = "tczyx"
# Where damaged HDF5 files raise errors (KeyError, ValueError, ...): elsewhere they are bugs
H5_READERS = ("h5py", "numpy")
EXPORT_WARNING = (
    "When exporting data from the graphical user interface of Ilastik, please manually edit "
    "the export image settings and enable renormalizing [min, max] from [0.0, 1.0] to [0, 65535]"
)
# Suffixes that the IMC segmentation pipeline appends to an image's name: its crops
# (``_x0_y0_w120_h120``) and its scaled copies (``_s2``)
PIPELINE_SUFFIXES = (re.compile(r"_x\d+_y\d+_w\d+_h\d+$"), re.compile(r"_s\d+$"))


@dataclass(frozen=True)
class CropPlan:
    """What ``fix`` will do with one crop file.

    Attributes
    ----------
    path : Path
        The crop file, as listed below the crop folder.
    dataset : str
        The dataset that holds the image.
    axes : str
        Its axis keys (``cyx`` for a steinbock crop).
    source_shape : tuple of int
        The dataset's shape.
    transpose_axes : tuple of int or None
        How to transpose it to C, Y, X (then drop singleton axes); None when the crop is
        already in steinbock format and is kept as it is.
    shape : (C, Y, X)
        The shape of the crop after ``fix``.
    """

    path: Path
    dataset: str
    axes: str
    source_shape: tuple[int, ...]
    transpose_axes: tuple[int, ...] | None
    shape: tuple[int, int, int]

    @property
    def needs_patch(self) -> bool:
        return self.transpose_axes is not None


@dataclass(frozen=True)
class Lane:
    """A lane of the project (``Input Data/infos/laneNNNN``), as recorded before ``fix``.

    Attributes
    ----------
    name : str
        ``laneNNNN``.
    has_raw_data : bool
        Whether the lane has a ``Raw Data`` group (lanes without one are left alone).
    file_path : str or None
        ``Raw Data/filePath``.
    stem : str or None
        The name (without ``.h5``) of the crop file that ``file_path`` names.
    axes : tuple of str or None
        The keys of ``Raw Data/axistags``.
    shape : tuple of int or None
        ``Raw Data/shape``.
    """

    name: str
    has_raw_data: bool
    file_path: str | None = None
    stem: str | None = None
    axes: tuple[str, ...] | None = None
    shape: tuple[int, ...] | None = None

    @property
    def is_steinbock(self) -> bool:
        """Whether the lane already describes a C, Y, X image (a steinbock crop)."""
        return self.axes == STEINBOCK_AXES

    @property
    def cyx_shape(self) -> tuple[int, int, int] | None:
        """The recorded image shape as (C, Y, X), or None when it is not recorded."""
        if self.axes is None or self.shape is None or len(self.axes) != len(self.shape):
            return None
        if "y" not in self.axes or "x" not in self.axes:
            return None
        height = self.shape[self.axes.index("y")]
        width = self.shape[self.axes.index("x")]
        if height * width == 0:
            return None
        return (int(np.prod(self.shape)) // (height * width), height, width)


@dataclass
class FixResult:
    """What ``fix`` did.

    Attributes
    ----------
    crops : list of CropPlan
        Every crop, in sorted order.
    patched_crops : list of Path
        The crops that were rewritten in steinbock format.
    project_changed : bool
        Whether the project file was rewritten.
    backups : list of Path
        The backups that were made (project, crop folder).
    """

    crops: list[CropPlan] = field(default_factory=list)
    patched_crops: list[Path] = field(default_factory=list)
    project_changed: bool = False
    backups: list[Path] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.patched_crops) or self.project_changed


# --- small parsers --------------------------------------------------------------------------


def _natural_key(name: str) -> tuple[int, str]:
    """Sort ``lane2`` before ``lane10`` (ilastik numbers lanes and label sets)."""
    match = re.search(r"(\d+)$", name)
    return (int(match.group(1)) if match else -1, name)


def parse_axis_order(text: str) -> tuple[str, ...]:
    """The ``--axisorder`` option (e.g. ``zyxc``) as axis keys; case-insensitive.

    Raises
    ------
    SteinpixError
        When an axis is unknown, repeated, or x or y is missing.
    """
    axes = tuple(text.strip().lower())
    _check_axes(axes, f"--axisorder {text}")
    return axes


def _check_axes(axes: Sequence[str], where: str) -> None:
    unknown = [a for a in axes if a not in KNOWN_AXES]
    if unknown:
        raise SteinpixError(f"{where}: unknown axis {unknown[0]!r} (axes are t, c, z, y, x)")
    if len(set(axes)) != len(axes):
        raise SteinpixError(f"{where}: an axis appears twice in {''.join(axes)}")
    if "x" not in axes or "y" not in axes:
        raise SteinpixError(f"{where}: the axis order {''.join(axes)} lacks x or y")


def axistags_keys(text: str | bytes, where: str) -> tuple[str, ...]:
    """The axis keys of a vigra ``axistags`` JSON string (``{"axes": [{"key": "z", ...}]}``)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    try:
        keys = tuple(str(axis["key"]) for axis in json.loads(text)["axes"])
    except (ValueError, KeyError, TypeError) as e:
        raise SteinpixError(f"{where}: unreadable axistags ({first_line(e)})") from None
    return keys


def parse_block_slice(text: str | bytes, where: str) -> list[tuple[int, int]]:
    """ilastik's ``blockSlice`` attribute (``"[0:1,8:94,11:121,0:1]"``) as (start, stop) pairs."""
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    try:
        parts = text.strip().strip("[]").split(",")
        return [(int(a), int(b)) for a, b in (part.split(":") for part in parts)]
    except ValueError:
        raise SteinpixError(f"{where}: unreadable blockSlice {text!r}") from None


def lane_file_stem(file_path: str) -> str | None:
    """The stem of the crop file that a lane's ``filePath`` names.

    As steinbock does, the deepest path component that ends in ``.h5`` is the file (the rest
    is the dataset inside it). Other paths name their file by their deepest component with a
    suffix (e.g. ``image.tiff``), else by their last one. Both ``/`` and ``\\`` separate.
    """
    parts = [p for p in re.split(r"[\\/]", file_path.strip()) if p]
    if not parts:
        return None
    for part in reversed(parts):
        if part.lower().endswith(".h5"):
            return part[: -len(".h5")]
    for part in reversed(parts):
        if Path(part).suffix:
            return Path(part).stem
    return parts[-1]


def image_base_name(stem: str) -> str:
    """A crop's or lane's image name without the IMC pipeline's suffixes.

    ``x_ac_ilastik_x0_y0_w120_h120`` and ``x_ac_ilastik_s2`` both give ``x_ac_ilastik``.
    """
    previous = None
    while previous != stem:
        previous = stem
        for suffix in PIPELINE_SUFFIXES:
            stem = suffix.sub("", stem)
    return stem


# --- axis orders ----------------------------------------------------------------------------


def steinbock_transposition(
    axes: Sequence[str], shape: Sequence[int], where: str
) -> tuple[int, ...]:
    """How steinbock transposes an image to C, Y, X, then the other axes in their order.

    The channel axis is ``c`` when it holds ``size // (Y * X)`` values; otherwise (wrong axis
    tags) it is the first other non-spatial axis of that size.

    Returns
    -------
    transpose_axes : tuple of int
        For ``numpy.transpose``; e.g. ``(3, 1, 2, 0)`` for ``zyxc``.

    Raises
    ------
    SteinpixError
        When the axes do not fit the shape or no axis can hold the channels.
    """
    axes = tuple(axes)
    _check_axes(axes, where)
    if len(axes) != len(shape):
        raise SteinpixError(
            f"{where}: the axis order {''.join(axes)} has {len(axes)} axes, "
            f"but the data has {len(shape)} dimensions {tuple(shape)}"
        )
    y, x = axes.index("y"), axes.index("x")
    if shape[y] * shape[x] == 0:
        raise SteinpixError(f"{where}: empty image {tuple(shape)}")
    n_channels = int(np.prod(shape)) // (shape[y] * shape[x])
    if "c" in axes and shape[axes.index("c")] == n_channels:
        channel = axes.index("c")
    else:
        candidates = [i for i, a in enumerate(axes) if a not in "yx" and shape[i] == n_channels]
        if not candidates:
            raise SteinpixError(
                f"{where}: {n_channels} values per pixel, but no axis of {''.join(axes)} "
                f"{tuple(shape)} holds them all (only crops with one plane can be fixed)"
            )
        channel = candidates[0]
    return _channel_y_x_first(len(axes), channel, y, x)


def _channel_y_x_first(ndim: int, channel: int, y: int, x: int) -> tuple[int, ...]:
    return (channel, y, x, *(i for i in range(ndim) if i not in (channel, y, x)))


def transposed_shape(
    shape: Sequence[int],
    transpose_axes: Sequence[int],
    where: str,
    axes: Sequence[str] | None = None,
) -> tuple[int, int, int]:
    """The (C, Y, X) shape after transposing and dropping the other (singleton) axes."""
    for i in transpose_axes[3:]:
        if shape[i] != 1:
            axis = f"{axes[i]} axis" if axes else f"axis {i}"
            raise SteinpixError(
                f"{where}: its {axis} has {shape[i]} planes; only images with one "
                "plane (C, Y, X) can be brought into steinbock format"
            )
    c, y, x = (int(shape[i]) for i in transpose_axes[:3])
    return (c, y, x)


# --- crops ----------------------------------------------------------------------------------


def _crop_dataset(f: h5py.File, crop_file: Path) -> h5py.Dataset:
    """steinbock's choice: dataset ``crop``, else the one named like the file, else the only one."""
    for name in (images.CROP_DATASET, crop_file.stem):
        obj = f.get(name)
        if isinstance(obj, h5py.Dataset):
            return obj
    if len(f) == 1:
        obj = f[next(iter(f))]
        if isinstance(obj, h5py.Dataset):
            return obj
    raise SteinpixError(
        f"{crop_file}: no dataset '{images.CROP_DATASET}' or '{crop_file.stem}', "
        f"and not exactly one dataset ({len(f)} objects)"
    )


def plan_crop(crop_file: Path, axis_order: tuple[str, ...] | None = None) -> CropPlan:
    """Read a crop's header and decide how to bring it into steinbock format.

    Parameters
    ----------
    crop_file : Path
    axis_order : tuple of str, optional
        ``--axisorder``; overrides the dataset's ``axistags``.

    Raises
    ------
    SteinpixError
        When the file is not HDF5, has no usable dataset, or its axis order is unknown or
        does not fit the data.
    """
    try:
        with h5py.File(crop_file, "r") as f:
            ds = _crop_dataset(f, crop_file)
            if bool(ds.attrs.get("steinbock", False)):
                return _plan_steinbock_crop(crop_file, ds)
            if axis_order is not None:
                axes = axis_order
            elif "axistags" in ds.attrs:
                axes = axistags_keys(ds.attrs["axistags"], str(crop_file))
            else:
                raise SteinpixError(
                    f"{crop_file}: unknown axis order (dataset '{ds.name.lstrip('/')}' has no "
                    "axistags attribute; give it with --axisorder, e.g. --axisorder zyxc)"
                )
            transpose_axes = steinbock_transposition(axes, ds.shape, str(crop_file))
            shape = transposed_shape(ds.shape, transpose_axes, str(crop_file), axes)
            return CropPlan(
                crop_file, ds.name, "".join(axes), tuple(ds.shape), transpose_axes, shape
            )
    except SteinpixError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        raise read_error(crop_file, e, "not a readable HDF5 file", *H5_READERS) from e


def _plan_steinbock_crop(crop_file: Path, ds: h5py.Dataset) -> CropPlan:
    # kept as it is: the lanes point at '<file>/crop' and describe it as C, Y, X
    if ds.name != f"/{images.CROP_DATASET}" or ds.ndim != 3:
        raise SteinpixError(
            f"{crop_file}: marked as steinbock format, but has no three-dimensional "
            f"'{images.CROP_DATASET}' dataset"
        )
    shape = tuple(int(n) for n in ds.shape)
    return CropPlan(crop_file, ds.name, "cyx", shape, None, shape)  # type: ignore[arg-type]


def common_transposition(crops: Sequence[CropPlan]) -> tuple[int, ...] | None:
    """The one transposition shared by every crop that needs patching (None if none does).

    Raises
    ------
    SteinpixError
        When two crops need different transpositions (steinbock's "Inconsistent axis orders
        across crops"), naming both.
    """
    first = None
    for crop in crops:
        if not crop.needs_patch:
            continue
        if first is None:
            first = crop
        elif crop.transpose_axes != first.transpose_axes:
            raise SteinpixError(
                f"{crop.path}: Inconsistent axis orders across crops ({crop.axes} "
                f"{crop.source_shape} here, {first.axes} {first.source_shape} in {first.path})"
            )
    return None if first is None else first.transpose_axes


def write_patched_crop(crop: CropPlan, dst: Path) -> None:
    """Write ``crop`` transposed to C, Y, X as a float32 steinbock crop to ``dst``."""
    assert crop.transpose_axes is not None
    try:
        with h5py.File(crop.path, "r") as f:
            data = f[crop.dataset][()]
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        raise read_error(crop.path, e, "cannot read the crop", *H5_READERS) from e
    patched = np.transpose(data, crop.transpose_axes).reshape(crop.shape)
    images.write_steinbock_h5(patched, dst, images.CROP_DATASET)


# --- the project ----------------------------------------------------------------------------


_text = project.scalar_text


def _read_lane(name: str, group: h5py.Group) -> Lane:
    raw = group.get("Raw Data")
    if not isinstance(raw, h5py.Group):
        return Lane(name, has_raw_data=False)
    file_path = _text(raw.get("filePath"))
    axes = None
    tags = _text(raw.get("axistags"))
    if tags is not None:
        with contextlib.suppress(SteinpixError):
            axes = axistags_keys(tags, name)
    shape = None
    if isinstance(raw.get("shape"), h5py.Dataset):
        shape = tuple(int(n) for n in np.ravel(raw["shape"][()]))
    stem = lane_file_stem(file_path) if file_path else None
    return Lane(name, True, file_path, stem, axes, shape)


def _has_hdf5_signature(path: Path) -> bool:
    """Whether the file starts with HDF5's signature (at 0, 512, 1024, ... bytes)."""
    signature = b"\x89HDF\r\n\x1a\n"
    with contextlib.suppress(OSError), open(path, "rb") as stream:
        offset = 0
        while True:
            stream.seek(offset)
            head = stream.read(8)
            if len(head) < 8:
                return False
            if head == signature:
                return True
            offset = 512 if offset == 0 else offset * 2
    return False


def read_lanes(project_file: Path) -> list[Lane]:
    """The project's lanes, in ilastik's order.

    Raises
    ------
    SteinpixError
        When the file is not HDF5 or not an ilastik project.
    """
    try:
        f = h5py.File(project_file, "r")
    except OSError as e:
        # e.g. locked by an ilastik that has the project open
        problem = (
            "cannot open the project"
            if _has_hdf5_signature(project_file)
            else ("not an HDF5 file, so not an ilastik project")
        )
        raise SteinpixError(f"{project_file}: {problem} ({first_line(e)})") from None
    with f:
        infos = f.get("Input Data/infos")
        if not isinstance(infos, h5py.Group):
            raise SteinpixError(
                f"{project_file}: not an ilastik project (no 'Input Data/infos' group)"
            )
        version = _text(f.get("ilastikVersion")) or "unknown"
        workflow = _text(f.get("workflowName"))
        if workflow is not None and workflow != "Pixel Classification":
            logger.warning("%s: a %r project, not Pixel Classification", project_file, workflow)
        lanes = [_read_lane(name, infos[name]) for name in sorted(infos, key=_natural_key)]
    logger.info("%s: ilastik %s project with %d lanes", project_file, version, len(lanes))
    return lanes


def match_lanes(
    lanes: Sequence[Lane], crops: Sequence[CropPlan], project_file: Path, crop_dir: Path
) -> dict[str, CropPlan]:
    """Find each lane's crop.

    A lane's crop is the crop file with the lane's file name. When there is none, it is the
    one crop that no other lane uses, whose image name is the lane's up to the IMC pipeline's
    suffixes (``_s2``, ``_x0_y0_w120_h120``, see :func:`image_base_name`), and whose
    (C, Y, X) shape after ``fix`` is the lane's recorded shape.

    Returns
    -------
    matches : dict
        Lane name to crop, for every lane with ``Raw Data``.

    Raises
    ------
    SteinpixError
        When a lane has no crop or several, listing those lanes and the unused crops.
    """
    by_stem: dict[str, list[CropPlan]] = {}
    for crop in crops:
        by_stem.setdefault(crop.path.stem, []).append(crop)
    matches: dict[str, CropPlan] = {}
    problems: dict[str, str] = {}
    pending = []
    for lane in lanes:
        if not lane.has_raw_data:
            continue
        if lane.stem is None:
            problems[lane.name] = "its Raw Data has no filePath"
            continue
        named = by_stem.get(lane.stem, [])
        if len(named) == 1:
            matches[lane.name] = named[0]
            _warn_if_shape_differs(lane, named[0])
        elif len(named) > 1:
            problems[lane.name] = f"{lane.stem}.h5 is ambiguous ({_names(named, crop_dir)})"
        else:
            pending.append(lane)
    claimed = {id(crop) for crop in matches.values()}
    similar: dict[str, list[CropPlan]] = {}
    for lane in pending:
        similar[lane.name] = [
            crop
            for crop in crops
            if id(crop) not in claimed
            and image_base_name(crop.path.stem) == image_base_name(lane.stem)
            and lane.cyx_shape is not None
            and crop.shape == lane.cyx_shape
        ]
    # a crop that could stand for two lanes stands for neither
    wanted: dict[int, int] = {}
    for candidates in similar.values():
        for crop in candidates:
            wanted[id(crop)] = wanted.get(id(crop), 0) + 1
    for lane in pending:
        candidates = similar[lane.name]
        if len(candidates) == 1 and wanted[id(candidates[0])] == 1:
            matches[lane.name] = candidates[0]
            logger.info(
                "%s names %s.h5, which is not in %s: using %s (same image name and shape)",
                lane.name,
                lane.stem,
                crop_dir,
                candidates[0].path.name,
            )
        elif candidates:
            problems[lane.name] = (
                f"{lane.stem}.h5 not found and several crops fit ({_names(candidates, crop_dir)})"
            )
        else:
            shape = "unknown shape" if lane.cyx_shape is None else f"shape {lane.cyx_shape}"
            problems[lane.name] = (
                f"{lane.stem}.h5 not found, and no unused crop has its image name and {shape}"
            )
    used = {id(crop) for crop in matches.values()}
    unused = [crop for crop in crops if id(crop) not in used]
    if problems:
        listing = "; ".join(f"{name}: {why}" for name, why in problems.items())
        raise SteinpixError(
            f"{project_file}: cannot match lanes to crops in {crop_dir}: {listing}; "
            f"crops not matched to a lane: {_names(unused, crop_dir) or 'none'}"
        )
    if unused:
        # steinbock converts every crop in the folder; so does fix
        logger.info(
            "Crops that no lane uses (converted all the same): %s", _names(unused, crop_dir)
        )
    return matches


def _names(crops: Iterable[CropPlan], crop_dir: Path) -> str:
    return ", ".join(Path(os.path.relpath(c.path, crop_dir)).as_posix() for c in crops)


def _warn_if_shape_differs(lane: Lane, crop: CropPlan) -> None:
    if lane.cyx_shape is not None and lane.cyx_shape != crop.shape:
        logger.warning(
            "%s: recorded shape %s (C, Y, X), but crop %s has %s",
            lane.name,
            lane.cyx_shape,
            crop.path,
            crop.shape,
        )


def _patch_lanes(
    f: h5py.File, lanes: Sequence[Lane], matches: dict[str, CropPlan], project_dir: Path
) -> None:
    infos = f["Input Data/infos"]
    for lane in lanes:
        if not lane.has_raw_data:
            continue
        crop = matches[lane.name]
        raw = infos[lane.name]["Raw Data"]
        project.write_raw_data_info(
            raw,
            file_path=f"{project.relative_posix(crop.path, project_dir)}/{images.CROP_DATASET}",
            nickname=crop.path.stem,
            shape=crop.shape,
        )
        # ilastik 1.4 can store a region of interest in the lane's old axis order
        if "subvolume_roi" in raw and not lane.is_steinbock:
            del raw["subvolume_roi"]
            logger.warning("%s: removed its subvolume_roi (old axis order)", lane.name)


def _clear_group(group: h5py.Group | None) -> None:
    if isinstance(group, h5py.Group):
        for name in list(group):
            del group[name]


def _copy_attr(src: h5py.HLObject, dst: h5py.HLObject, name: str) -> None:
    """Copy an attribute with its exact type (e.g. variable-length ASCII stays ASCII)."""
    dtype = h5py.h5a.open(src.id, name.encode()).dtype
    dst.attrs.create(name, src.attrs[name], dtype=dtype)


# --- label blocks ---------------------------------------------------------------------------

# The axis orders ilastik's pixel classification workflow allows; an image is reordered to the
# shortest one that holds all its axes longer than 1 (Y, X, C for a 2-D image)
ILASTIK_PIXEL_ORDERS = (
    "yxc",
    "xyc",
    *("".join(p) + "c" for p in itertools.permutations("tzyx", 3)),
    *("".join(p) + "c" for p in itertools.permutations("tzyx", 4)),
)
# Projects saved by these ilastik versions store label blocks in the image's original axis
# order; all others in the order ilastik reorders the image to (and ilastik >= 1.4 adds the
# block's axistags)
ORIGINAL_ORDER_VERSIONS = ((1, 3, 3, 1, 2), (1, 4, 0, -2, 7))  # 1.3.3post2 to 1.4.0b7
version_key = project.version_key


def labels_in_original_order(version: str | None) -> bool:
    """Whether a project saved by ilastik ``version`` stores label blocks in the image's
    original axis order (1.3.3post2 to 1.4.0b7, e.g. 1.3.3post3, steinbock's ilastik).

    An unknown version is taken for steinbock's 1.3.3post3.
    """
    key = version_key(version) if version else None
    if key is None:
        return True
    return ORIGINAL_ORDER_VERSIONS[0] <= key <= ORIGINAL_ORDER_VERSIONS[1]


def ilastik_image_order(axes: Sequence[str], shape: Sequence[int]) -> tuple[str, ...]:
    """The axis order ilastik's pixel classification reorders an image to (``yxc`` in 2-D)."""
    longer = {a for a, n in zip(axes, shape, strict=True) if n > 1} | {"c"}
    return tuple(min((o for o in ILASTIK_PIXEL_ORDERS if longer <= set(o)), key=len))


def _order_to(keys: Sequence[str], target: Sequence[str], where: str) -> tuple[int, ...]:
    """The transposition from axis keys ``keys`` to ``target``, then the other axes."""
    missing = [a for a in target if a not in keys]
    if missing or len(set(keys)) != len(keys):
        raise SteinpixError(f"{where}: cannot reorder axes {''.join(keys)} to {''.join(target)}")
    first = [keys.index(a) for a in target]
    return (*first, *(i for i in range(len(keys)) if i not in first))


@dataclass(frozen=True)
class _BlockOrder:
    """How a label block is reordered: ``transpose_axes``, and its own axis tags if any."""

    transpose_axes: tuple[int, ...]
    own_tags: list | None = None


def _block_order(
    block: h5py.Dataset,
    lane: Lane | None,
    crop_transposition: tuple[int, ...] | None,
    original_order: bool,
    target: tuple[str, ...],
    where: str,
) -> _BlockOrder:
    """The axis order a label block is stored in, as a transposition to ``target``.

    In priority: the block's own ``axistags`` (ilastik >= 1.4 writes them); its lane's recorded
    axis tags (what ilastik saved the block in: the original order, or the order ilastik
    reorders that image to, depending on the version); the crops' transposition (steinbock's
    rule, for lanes without axis tags).
    """
    if "axistags" in block.attrs:
        text = block.attrs["axistags"]
        keys = axistags_keys(text, where)
        return _BlockOrder(_order_to(keys, target, where), list(json.loads(text)["axes"]))
    if lane is not None and lane.axes is not None and lane.shape is not None:
        if len(lane.axes) == len(lane.shape):
            keys = lane.axes if original_order else ilastik_image_order(lane.axes, lane.shape)
            if len(keys) == block.ndim:
                return _BlockOrder(_order_to(keys, target, where))
    if crop_transposition is not None and len(crop_transposition) == block.ndim:
        cyx = dict(zip(STEINBOCK_AXES, crop_transposition[:3], strict=True))
        return _BlockOrder((*(cyx[a] for a in target), *crop_transposition[3:]))
    raise SteinpixError(
        f"{where}: unknown axis order of a {block.ndim}-dimensional label block "
        "(no axistags, and its lane records none that fit)"
    )


def _patch_block(group: h5py.Group, name: str, order: _BlockOrder, where: str) -> None:
    """Reorder one label block (to C, Y, X or Y, X, C) and its ``blockSlice`` alike."""
    block = group[name]
    transpose_axes = order.transpose_axes
    if transpose_axes == (0, 1, 2):
        return  # already in the target order
    keys = [str(a.get("key")) for a in order.own_tags] if order.own_tags else None
    transposed_shape(block.shape, transpose_axes, where, keys)
    slice_attr = block.attrs.get("blockSlice")
    if slice_attr is None:
        raise SteinpixError(f"{where}: no blockSlice attribute")
    text = slice_attr.decode() if isinstance(slice_attr, bytes) else str(slice_attr)
    parts = text.strip().strip("[]").split(",")
    if len(parts) != block.ndim:
        raise SteinpixError(f"{where}: blockSlice {text} does not fit {block.shape}")
    new_slice = "[" + ",".join(parts[i].strip() for i in transpose_axes[:3]) + "]"
    data = np.transpose(block[()], transpose_axes)
    data = data.reshape(data.shape[:3])
    options = {}
    if block.compression:
        options = {"compression": block.compression, "compression_opts": block.compression_opts}
    tmp_name = f".{name}.steinpix"
    new = group.create_dataset(tmp_name, data=data, **options)
    for attr in block.attrs:
        if attr == "blockSlice":
            # written back as the same Python type as read (str, as steinbock does; or bytes)
            new.attrs[attr] = new_slice.encode() if isinstance(slice_attr, bytes) else new_slice
        elif attr == "axistags" and order.own_tags is not None:
            tags = [order.own_tags[i] for i in transpose_axes[:3]]
            new.attrs[attr] = json.dumps({"axes": tags}, indent=2)
        else:
            _copy_attr(block, new, attr)
    del group[name]
    group.move(tmp_name, name)


def _check_block(
    block: h5py.Dataset, crop: CropPlan | None, target: tuple[str, ...], where: str
) -> None:
    """A patched label block has the target's three axes, one channel, and lies inside its
    lane's crop."""
    slices = parse_block_slice(block.attrs.get("blockSlice", ""), where)
    if block.ndim != 3 or len(slices) != 3:
        raise SteinpixError(
            f"{where}: label block {block.shape} is not {', '.join(target).upper()} after fix"
        )
    if any(stop - start != n for (start, stop), n in zip(slices, block.shape, strict=True)):
        raise SteinpixError(f"{where}: blockSlice {slices} does not match its shape {block.shape}")
    by_axis = dict(zip(target, slices, strict=True))
    inside = by_axis["c"] == (0, 1) and all(start >= 0 for start, _ in slices)
    if crop is not None:
        inside &= by_axis["y"][1] <= crop.shape[1] and by_axis["x"][1] <= crop.shape[2]
    if not inside:
        of_crop = "" if crop is None else f" of crop {crop.path} {crop.shape}"
        raise SteinpixError(
            f"{where}: labels at {block.attrs['blockSlice']} lie outside the image{of_crop} "
            f"({''.join(target)}); the labels and the crops disagree about the axis order"
        )


def _patch_label_sets(
    f: h5py.File,
    lanes: Sequence[Lane],
    matches: dict[str, CropPlan],
    crop_transposition: tuple[int, ...] | None,
    project_file: Path,
) -> None:
    label_sets = f.get("PixelClassification/LabelSets")
    if not isinstance(label_sets, h5py.Group):
        return
    version = _text(f.get("ilastikVersion"))
    original_order = labels_in_original_order(version)
    # what ilastik expects of the fixed lanes: their original order (the crops' C, Y, X), or
    # the order it reorders a C, Y, X crop to
    target = STEINBOCK_AXES if original_order else ilastik_image_order(STEINBOCK_AXES, (2, 2, 2))
    logger.info(
        "Label blocks: %s order (ilastik %s)", "".join(target), version or "version unknown"
    )
    # ilastik maps the n-th label set (in numerical order) to the n-th lane
    for index, set_name in enumerate(sorted(label_sets, key=_natural_key)):
        group = label_sets[set_name]
        if not isinstance(group, h5py.Group):
            continue
        lane = lanes[index] if index < len(lanes) else None
        crop = matches.get(lane.name) if lane is not None else None
        for name in sorted(group):
            where = f"{project_file}: {group.name}/{name}"
            block = group[name]
            if not isinstance(block, h5py.Dataset):
                raise SteinpixError(f"{where}: not a dataset (unsupported label block layout)")
            order = _block_order(block, lane, crop_transposition, original_order, target, where)
            _patch_block(group, name, order, where)
            _check_block(group[name], crop, target, where)


def patch_project(
    project_copy: Path,
    project_file: Path,
    lanes: Sequence[Lane],
    matches: dict[str, CropPlan],
    crop_transposition: tuple[int, ...] | None,
    probabilities_dir: Path,
) -> None:
    """Patch ``project_copy`` (a copy of ``project_file``) in place, as steinbock does.

    Every lane's ``Raw Data`` points at its crop (relative to ``project_file``'s folder),
    ``Input Data/local_data`` is emptied, label blocks are reordered to what ilastik expects of
    the fixed lanes, and the prediction export gets steinbock's settings. Forests and feature
    selection are untouched.
    """
    project_dir = project_file.parent
    try:
        with h5py.File(project_copy, "r+") as f:
            _patch_lanes(f, lanes, matches, project_dir)
            _clear_group(f.get("Input Data/local_data"))
            _patch_label_sets(f, lanes, matches, crop_transposition, project_file)
            project.write_prediction_export(
                f.require_group("Prediction Export"),
                project.relative_posix(probabilities_dir, project_dir),
                export_min_dtype=np.uint16,
            )
    except SteinpixError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as e:
        raise read_error(project_file, e, "cannot patch the project", *H5_READERS) from e


# --- comparing, backing up and swapping files -----------------------------------------------


def _type_signature(tid: h5py.h5t.TypeID) -> tuple:
    if isinstance(tid, h5py.h5t.TypeStringID):
        return ("string", tid.is_variable_str(), tid.get_cset(), tid.get_size())
    return ("type", str(tid.dtype))


def _value_signature(value) -> object:
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return (value.shape, tuple(value.ravel().tolist()))
        return (str(value.dtype), value.shape, value.tobytes())
    if isinstance(value, np.generic):
        return (str(value.dtype), value.tobytes())
    return repr(value)


def _attr_signatures(obj: h5py.HLObject) -> tuple:
    signatures = []
    for name in sorted(obj.attrs):
        aid = h5py.h5a.open(obj.id, name.encode())
        signatures.append(
            (name, _type_signature(aid.get_type()), aid.shape, _value_signature(obj.attrs[name]))
        )
    return tuple(signatures)


def h5_contents(path: Path) -> dict[str, tuple]:
    """Every group, dataset and attribute of an HDF5 file with its type and value."""
    contents: dict[str, tuple] = {}
    with h5py.File(path, "r") as f:
        contents["/"] = ("group", _attr_signatures(f))

        def visit(name: str, obj) -> None:
            if isinstance(obj, h5py.Dataset):
                contents[name] = (
                    "dataset",
                    _type_signature(obj.id.get_type()),
                    obj.shape,
                    _value_signature(obj[()]),
                    _attr_signatures(obj),
                )
            else:
                contents[name] = ("group", _attr_signatures(obj))

        f.visititems(visit)
    return contents


def backup_paths(project_file: Path, crop_dir: Path) -> tuple[Path, Path]:
    """``<project>.bak`` and ``<crop folder>.bak`` (names as steinbock gives them)."""
    crop_dir = Path(os.path.normpath(crop_dir))
    if crop_dir.name in ("", "..") or str(crop_dir) == ".":
        crop_dir = Path(os.path.abspath(crop_dir))
    return (
        project_file.with_name(project_file.name + ".bak"),
        crop_dir.with_name(crop_dir.name + ".bak"),
    )


def check_backups_absent(project_file: Path, crop_dir: Path) -> None:
    for path in backup_paths(project_file, crop_dir):
        if path.exists() or path.is_symlink():
            raise SteinpixError(
                f"{path}: a backup already exists; move it away or run with --no-backup "
                "(nothing was changed)"
            )


def make_backups(project_file: Path, crop_dir: Path, skip: Sequence[Path] = ()) -> list[Path]:
    """Copy the project and the crop folder to their ``.bak`` names (each via a temporary name,
    so that a backup is either complete or absent).

    ``skip`` lists files (our own temporary files) left out of the crop folder's copy.
    """
    ilp_bak, crop_bak = backup_paths(project_file, crop_dir)
    skipped = {Path(os.path.abspath(p)) for p in skip}

    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if Path(os.path.abspath(os.path.join(folder, n))) in skipped]

    made: list[Path] = []
    try:
        tmp = temporary_sibling(ilp_bak)
        shutil.copy2(project_file, tmp)
        os.replace(tmp, ilp_bak)
        made.append(ilp_bak)
        tmp_dir = temporary_sibling(crop_bak)
        shutil.copytree(crop_dir, tmp_dir, ignore=ignore)
        os.rename(tmp_dir, crop_bak)
        made.append(crop_bak)
    except BaseException:
        remove_paths([*made, temporary_sibling(ilp_bak), temporary_sibling(crop_bak)])
        raise
    return made


def remove_paths(paths: Iterable[Path]) -> None:
    """Remove files and folders, ignoring those that do not exist."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _keep_original(target: Path) -> Path:
    """A hidden second name for ``target``'s current content (a hard link, else a copy)."""
    keep = target.with_name(f".{target.name}.{os.getpid()}.orig")
    try:
        os.link(target, keep)
    except OSError:
        shutil.copy2(target, keep)
    return keep


def swap_in(pairs: Sequence[tuple[Path, Path]]) -> None:
    """Rename each temporary file over its target; if any rename fails, restore every target.

    Parameters
    ----------
    pairs : sequence of (temporary file, target)
        In the same folder each, so every rename is atomic.
    """
    kept: list[tuple[Path, Path]] = []
    replaced: list[tuple[Path, Path]] = []
    try:
        for _, target in pairs:
            kept.append((_keep_original(target), target))
        for (tmp, target), (keep, _) in zip(pairs, kept, strict=True):
            shutil.copymode(keep, tmp)  # the patched file keeps the original's permissions
            os.replace(tmp, target)
            replaced.append((keep, target))
    except BaseException:
        for keep, target in reversed(replaced):
            os.replace(keep, target)
        raise
    finally:
        remove_paths(keep for keep, _ in kept)


# --- the whole fix --------------------------------------------------------------------------


def plan_crops(crop_dir: Path, axis_order: tuple[str, ...] | None) -> list[CropPlan]:
    crop_files = images.list_h5_files(crop_dir)
    if not crop_files:
        raise SteinpixError(f"{crop_dir}: no *.h5 crops found")
    return [plan_crop(crop_file, axis_order) for crop_file in crop_files]


def fix(
    project_file: str | os.PathLike,
    crop_dir: str | os.PathLike,
    probabilities_dir: str | os.PathLike,
    backup: bool = True,
    axis_order: str | None = None,
) -> FixResult:
    """Bring a pre-trained project and its crops into steinbock format, all or nothing.

    Parameters
    ----------
    project_file : path
        The ilastik project (``--ilp``).
    crop_dir : path
        The folder of the images the project was trained on (``--crop``); every ``*.h5``
        below it is a crop.
    probabilities_dir : path
        Where ``run`` writes probabilities (``--probabs``); stored in the export settings
        relative to the project's folder.
    backup : bool
        Copy the project and the crop folder to ``.bak`` names before changing them.
    axis_order : str, optional
        The crops' axis order (``--axisorder``, e.g. ``zyxc``); default: their ``axistags``.

    Returns
    -------
    FixResult

    Raises
    ------
    SteinpixError
        On any problem; then the project, the crops and the backups are as they were.
    """
    project_file, crop_dir = Path(project_file), Path(crop_dir)
    axes = parse_axis_order(axis_order) if axis_order else None
    images.img_dtype()  # the crops are written in it: a bad $STEINBOCK_IMG_DTYPE stops now
    lanes = read_lanes(project_file)
    crops = plan_crops(crop_dir, axes)
    crop_transposition = common_transposition(crops)
    matches = match_lanes(lanes, crops, project_file, crop_dir)
    result = FixResult(crops=crops)
    project_tmp = temporary_sibling(project_file)
    crop_tmps = {crop.path: temporary_sibling(crop.path) for crop in crops if crop.needs_patch}
    try:
        # created first, so that an unwritable folder is named (not a temporary file in it)
        for path in [project_file, *crop_tmps]:
            create_temporary(path)
        shutil.copyfile(project_file, project_tmp)
        patch_project(
            project_tmp, project_file, lanes, matches, crop_transposition, Path(probabilities_dir)
        )
        result.project_changed = h5_contents(project_tmp) != h5_contents(project_file)
        if not crop_tmps and not result.project_changed:
            logger.info(
                "%s and the %d crops in %s are in steinbock format: nothing to fix, "
                "nothing written%s",
                project_file,
                len(crops),
                crop_dir,
                ", no backup needed" if backup else "",
            )
            return result
        if backup:
            check_backups_absent(project_file, crop_dir)
            # before the patched crops are written into the crop folder
            result.backups = make_backups(
                project_file, crop_dir, skip=[project_tmp, *crop_tmps.values()]
            )
        try:
            _prepare_crops(crops, crop_tmps)
            pairs = [(crop_tmps[path], path) for path in crop_tmps]
            if result.project_changed:
                pairs.append((project_tmp, project_file))
            swap_in(pairs)
        except BaseException:
            remove_paths(result.backups)
            raise
    except OSError as e:
        raise SteinpixError(
            f"{project_file}: fix failed, nothing changed ({os_error_text(e)})"
        ) from None
    finally:
        remove_paths([project_tmp, *crop_tmps.values()])
    result.patched_crops = list(crop_tmps)
    _log_summary(result, project_file)
    return result


def _prepare_crops(crops: Sequence[CropPlan], crop_tmps: dict[Path, Path]) -> None:
    progress.set_total(len(crops))
    for i, crop in enumerate(crops, start=1):
        progress.advance()
        if crop.needs_patch:
            write_patched_crop(crop, crop_tmps[crop.path])
            logger.info(
                "[%d/%d] %s: %s %s -> cyx %s float32",
                i,
                len(crops),
                crop.path,
                crop.axes,
                crop.source_shape,
                crop.shape,
            )
        else:
            logger.info("[%d/%d] %s: already in steinbock format, kept", i, len(crops), crop.path)


def _log_summary(result: FixResult, project_file: Path) -> None:
    for path in result.backups:
        logger.info("Backup: %s", path)
    logger.info(
        "Fixed %d of %d crops; project %s %s",
        len(result.patched_crops),
        len(result.crops),
        project_file,
        "patched" if result.project_changed else "unchanged (already in steinbock format)",
    )
    if result.project_changed:
        logger.warning(EXPORT_WARNING)
