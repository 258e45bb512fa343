"""The ilastik pixel-classification project file (``.ilp``, HDF5) that steinbock writes.

``prepare`` builds a fresh project here; ``fix`` reuses the lane and export writers to patch a
pre-trained one. String types follow steinbock's files exactly: most strings are
variable-length ASCII (written from ``bytes``), a few are variable-length UTF-8 (``str``).
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from steinpix.atomic import atomic_output, make_folder
from steinpix.errors import SteinpixError
from steinpix.images import AXISTAGS, CROP_DATASET, DISPLAY_MODE, H5_LIBVER

ILASTIK_VERSION = "1.3.3post3"

# The classifier factory ilastik 1.3.3 stores for its default parallel vigra random forest
# (100 trees, 8 forests), as protocol-0 pickle text. It is written verbatim and never unpickled;
# ilastik >= 1.4.1 checks it against an allow-list that requires VERSION 2.
CLASSIFIER_FACTORY = (
    b"ccopy_reg\n_reconstructor\np0\n"
    b"(clazyflow.classifiers.parallelVigraRfLazyflowClassifier\n"
    b"ParallelVigraRfLazyflowClassifierFactory\np1\nc__builtin__\nobject\np2\nNtp3\nRp4\n"
    b"(dp5\nVVERSION\np6\nI2\nsV_num_trees\np7\nI100\nsV_label_proportion\np8\n"
    b"NsV_variable_importance_path\np9\nNsV_variable_importance_enabled\np10\nI00\n"
    b"sV_kwargs\np11\n(dp12\nsV_num_forests\np13\nI8\nsb."
)

LABEL_NAMES = ("Nucleus", "Cytoplasm", "Background")
LABEL_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))
PMAP_COLORS = ((255, 0, 0), (0, 225, 0), (0, 0, 255))

FEATURE_IDS = (
    "GaussianSmoothing",
    "LaplacianOfGaussian",
    "GaussianGradientMagnitude",
    "DifferenceOfGaussians",
    "StructureTensorEigenvalues",
    "HessianOfGaussianEigenvalues",
)
SCALES = (0.3, 0.7, 1.0, 1.6, 3.5, 5.0, 10.0)
# steinbock's documentation recommends all six features at sigma >= 1 for IMC images
SELECTED_SCALES = (1.0, 1.6, 3.5, 5.0, 10.0)


# --- the ilastik version that saved a project, and the arithmetic that reproduces it -----------

_STAGES = {"dev": -4, "a": -3, "alpha": -3, "b": -2, "beta": -2, "c": -1, "rc": -1, "post": 1}

#: The built-in engine's arithmetic profiles (``--profile``), by the ilastik release each
#: reproduces bit for bit (``features.PROFILES``)
PROFILE_RELEASES = {"133": "ilastik 1.3.3post3", "14x": "ilastik 1.4.0"}


def scalar_text(obj) -> str | None:
    """The text of a scalar string dataset (bytes or str), or None."""
    if not isinstance(obj, h5py.Dataset) or obj.shape != ():
        return None
    value = obj[()]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else None


def version_key(version: str) -> tuple[int, int, int, int, int] | None:
    """``1.4.0b7`` as ``(1, 4, 0, -2, 7)`` (pre-releases sort before, post-releases after).

    Returns None when ``version`` does not start with ``major.minor``.
    """
    match = re.match(
        r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?(?:[.-]?(dev|alpha|beta|a|b|rc|c|post)[.-]?(\d*))?",
        version.lower(),
    )
    if not match:
        return None
    major, minor, micro, stage, number = match.groups()
    return (int(major), int(minor), int(micro or 0), _STAGES.get(stage or "", 0), int(number or 0))


def read_ilastik_version(project_file: str | os.PathLike) -> str | None:
    """The ``ilastikVersion`` a project was saved with, as text.

    Parameters
    ----------
    project_file : path
        An ilastik project (``.ilp``).

    Returns
    -------
    version : str or None
        E.g. ``"1.4.0"`` or ``"1.3.3post3"``; None when the project has no scalar string
        ``ilastikVersion``.

    Raises
    ------
    SteinpixError
        When the file cannot be opened as HDF5.
    """
    try:
        with h5py.File(project_file, "r") as f:
            return scalar_text(f.get("ilastikVersion"))
    except OSError as e:
        raise SteinpixError(f"{project_file}: not an ilastik project ({e})") from None


def profile_for_version(version: str | None) -> str | None:
    """The arithmetic profile that reproduces a project saved by ilastik ``version``.

    ilastik 1.3.x (and older) ran fastfilters built with ``-Ofast``; ilastik 1.4 builds it
    without, which rounds differently (``features.py``, spec section 5). The 1.4.0 pre-releases
    belong to the 1.4 builds.

    Parameters
    ----------
    version : str or None
        The project's ``ilastikVersion``.

    Returns
    -------
    profile : {"133", "14x"} or None
        ``"133"`` below 1.4, ``"14x"`` from 1.4.0 (pre-releases included) on; None when
        ``version`` is missing or not a version.
    """
    key = version_key(version) if version else None
    if key is None:
        return None
    return "14x" if key[:2] >= (1, 4) else "133"


def choose_profile(requested: str, version: str | None) -> tuple[str, str, str | None]:
    """Resolve ``--profile auto|133|14x`` for a project saved by ilastik ``version``.

    Parameters
    ----------
    requested : {"auto", "133", "14x"}
    version : str or None
        The project's ``ilastikVersion`` (:func:`read_ilastik_version`).

    Returns
    -------
    profile : {"133", "14x"}
    reason : str
        Why, for the log: e.g. ``"project saved by ilastik 1.4.0"``.
    warning : str or None
        Set when ``auto`` could not read a version and fell back to ``"133"``.
    """
    saved = f"project saved by ilastik {version}" if version else "project has no ilastikVersion"
    automatic = profile_for_version(version)
    if requested != "auto":
        return requested, f"--profile {requested}; {saved}", None
    if automatic is not None:
        return automatic, saved, None
    what = "no ilastikVersion" if version is None else f"ilastikVersion {version!r}, not a version"
    warning = (
        f"the project has {what}: assuming {PROFILE_RELEASES['133']} "
        "(pass --profile 14x for a project saved by ilastik 1.4 or later)"
    )
    return "133", f"{saved}, taken for {PROFILE_RELEASES['133']}", warning


def _replace(group: h5py.Group, name: str, data) -> h5py.Dataset:
    if name in group:
        del group[name]
    return group.create_dataset(name, data=data)


def write_raw_data_info(
    raw_data: h5py.Group,
    file_path: str,
    nickname: str,
    shape: Sequence[int],
    dataset_id: str | None = None,
) -> None:
    """Describe a lane's steinbock-format crop in its ``Raw Data`` group (as steinbock does).

    Parameters
    ----------
    raw_data : h5py.Group
        ``Input Data/infos/laneNNNN/Raw Data``.
    file_path : str
        ``<crop dir relative to the project>/<crop file>.h5/crop``, with ``/`` separators.
    nickname : str
        The crop file's stem.
    shape : (C, Y, X)
    dataset_id : str, optional
        A uuid1 string shared by all lanes; None keeps the group's own.
    """
    _replace(raw_data, "__class__", b"RelativeFilesystemDatasetInfo")
    _replace(raw_data, "allowLabels", True)
    _replace(raw_data, "axistags", AXISTAGS.encode("ascii"))
    if dataset_id is not None:
        _replace(raw_data, "datasetId", dataset_id.encode("ascii"))
    _replace(raw_data, "display_mode", DISPLAY_MODE.encode("ascii"))
    _replace(raw_data, "filePath", file_path.encode("utf-8"))
    _replace(raw_data, "location", b"FileSystem")
    _replace(raw_data, "nickname", nickname.encode("utf-8"))
    _replace(raw_data, "normalizeDisplay", False)
    _replace(raw_data, "shape", np.asarray(shape, dtype=np.int64))


def write_prediction_export(
    export: h5py.Group, probabilities_dir: str, export_min_dtype: type = np.uint16
) -> None:
    """steinbock's ``Prediction Export`` settings: uint16 YXC TIFFs scaled from [0, 1].

    Parameters
    ----------
    export : h5py.Group
        The project's ``Prediction Export`` group.
    probabilities_dir : str
        Output folder relative to the project's folder (``/`` separators).
    export_min_dtype : numpy scalar type
        ``ExportMin``'s type: float32 in a fresh steinbock project, uint16 after ``fix``.
    """
    is_fix = export_min_dtype is np.uint16
    # fix stores one-element arrays, a fresh project scalars: both as steinbock does
    _replace(export, "ExportMin", np.array([0] if is_fix else 0, dtype=export_min_dtype))
    _replace(export, "ExportMax", np.array([65535] if is_fix else 65535, dtype=np.uint16))
    _replace(export, "ExportDtype", "uint16")
    _replace(export, "OutputAxisOrder", b"yxc")
    _replace(export, "OutputFormat", b"tiff")
    _replace(export, "OutputFilenameFormat", f"{probabilities_dir}/{{nickname}}.tiff".encode())
    _replace(export, "OutputInternalPath", b"exported_data")
    _replace(export, "StorageVersion", "0.1")


def write_feature_selection(group: h5py.Group, selected_scales: Sequence[float]) -> None:
    """Pre-select all six features at ``selected_scales`` (the layout ilastik 1.3.3 saves)."""
    matrix = np.zeros((len(FEATURE_IDS), len(SCALES)), dtype=bool)
    matrix[:, [SCALES.index(s) for s in selected_scales]] = True
    _replace(group, "FeatureIds", np.array([f.encode() for f in FEATURE_IDS], dtype="S28"))
    _replace(group, "Scales", np.array(SCALES, dtype=np.float64))
    _replace(group, "SelectionMatrix", matrix)
    _replace(group, "ComputeIn2d", np.ones(len(SCALES), dtype=bool))
    _replace(group, "StorageVersion", "0.1")


def relative_posix(path: str | os.PathLike, start: str | os.PathLike) -> str:
    """``path`` relative to the folder ``start``, with ``/`` separators (as ilastik stores it)."""
    return Path(os.path.relpath(Path(path).absolute(), Path(start).absolute())).as_posix()


def create_project(
    project_file: str | os.PathLike,
    crop_files: Sequence[str | os.PathLike],
    crop_shapes: Sequence[Sequence[int]],
    preselect_features: bool = True,
) -> Path:
    """Write a fresh pixel-classification project with one lane per crop, atomically.

    Parameters
    ----------
    project_file : path
        The ``.ilp`` to create (replaced if it exists).
    crop_files : sequence of paths
        steinbock-format crops, in lane order; stored relative to the project's folder.
    crop_shapes : sequence of (C, Y, X)
        The shape of each crop's ``crop`` dataset.
    preselect_features : bool
        Select all six features at scales 1.0 to 10.0, as the pretrained IMC projects do
        (steinbock leaves ``FeatureSelections`` empty).

    Returns
    -------
    project_file : Path
    """
    project_file = Path(project_file)
    project_dir = project_file.parent
    dataset_id = str(uuid.uuid1())
    make_folder(project_dir)
    with atomic_output(project_file) as tmp, h5py.File(tmp, "w", libver=H5_LIBVER) as f:
        features = f.create_group("FeatureSelections")
        if preselect_features:
            write_feature_selection(features, SELECTED_SCALES)
        input_data = f.create_group("Input Data")
        input_data.create_dataset(
            "Role Names", data=np.array([b"Raw Data", b"Prediction Mask"], dtype="S15")
        )
        input_data.create_dataset("StorageVersion", data="0.2")
        infos = input_data.create_group("infos")
        for i, (crop_file, shape) in enumerate(zip(crop_files, crop_shapes, strict=True)):
            lane = infos.create_group(f"lane{i:04d}")
            lane.create_group("Prediction Mask")
            write_raw_data_info(
                lane.create_group("Raw Data"),
                file_path=f"{relative_posix(crop_file, project_dir)}/{CROP_DATASET}",
                nickname=Path(crop_file).stem,
                shape=shape,
                dataset_id=dataset_id,
            )
        input_data.create_group("local_data")
        pc = f.create_group("PixelClassification")
        pc.create_dataset("ClassifierFactory", data=CLASSIFIER_FACTORY)
        for name, values, dtype in (
            ("LabelColors", LABEL_COLORS, np.int64),
            ("LabelNames", [n.encode() for n in LABEL_NAMES], "S17"),
            ("PmapColors", PMAP_COLORS, np.int64),
        ):
            pc.create_dataset(name, data=np.array(values, dtype=dtype)).attrs["isEmpty"] = False
        pc.create_dataset("StorageVersion", data="0.1")
        export = f.create_group("Prediction Export")
        export.create_dataset("InputMin", data=np.float32(0.0))
        export.create_dataset("InputMax", data=np.float32(1.0))
        write_prediction_export(export, "ilastik_probabilities", export_min_dtype=np.float32)
        f.create_dataset("currentApplet", data=np.int64(1))
        f.create_dataset("ilastikVersion", data=ILASTIK_VERSION.encode())
        f.create_dataset("time", data=time.ctime().encode())
        f.create_dataset("workflowName", data=b"Pixel Classification")
    return project_file
