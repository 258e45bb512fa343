"""``classify ilastik fix`` against steinbock 0.16.5's output, and all or nothing.

The shared IMC mock data set holds the pipeline's pre-trained project, its crops and
steinbock's fixed files; those tests skip where it is absent. Everywhere else the pipeline's
layout is rebuilt from the in-repo example project (which is steinbock's fixed project), with
synthetic crops of the right shapes: ``unfix_project`` undoes what steinbock's ``fix`` did.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from steinpix import fix
from steinpix._cli.main import main
from steinpix.errors import SteinpixError

from conftest import EXAMPLE
from h5tree import describe

FIXED_PROJECT = EXAMPLE / "pretrained.ilp"  # steinbock 0.16.5's fix of the pipeline project
PIPELINE_CROP_DIR = "/Users/nils/Github/TestData/datasets/210308_ImcTestData/analysis/crops"
LAST_CROP = "20210305_NE_mockData5_s0_a3_ac_ilastik_x0_y0_w182_h162"


# --- helpers --------------------------------------------------------------------------------


def drop_cli_log_handler() -> None:
    """Remove the CLI's log handler: it writes to the stderr of the call that made it."""
    root = logging.getLogger("steinpix")
    for handler in [h for h in root.handlers if getattr(h, "_steinpix", False)]:
        root.removeHandler(handler)


@pytest.fixture(autouse=True)
def _fresh_log_handler():
    yield
    drop_cli_log_handler()  # leave no handler on a finished CliRunner's stream behind


def run_fix(*args: str):
    drop_cli_log_handler()  # so that this call's logs land in this call's stderr
    return CliRunner().invoke(main, ["classify", "ilastik", "fix", *args])


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (hidden ones too) with the SHA-256 of its bytes, and every
    folder."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "folder"
        for p in sorted(folder.rglob("*"))
    }


def _attr_kinds(obj) -> tuple:
    kinds = []
    for name in sorted(obj.attrs):
        tid = h5py.h5a.open(obj.id, name.encode()).get_type()
        if isinstance(tid, h5py.h5t.TypeStringID):
            kind = (tid.is_variable_str(), tid.get_cset())
        else:
            kind = str(tid.dtype)
        kinds.append((name, kind))
    return tuple(kinds)


def full_tree(path: Path, ignore: tuple[str, ...] = ()) -> dict[str, tuple]:
    """``h5tree.describe`` plus the string type of every attribute."""
    tree = describe(path, ignore=ignore)
    with h5py.File(path, "r") as f:
        tree["/"] = ("root", _attr_kinds(f))
        f.visititems(lambda name, obj: tree.__setitem__(name, (tree[name], _attr_kinds(obj))))
    return tree


def assert_same_tree(ours: Path, ref: Path, ignore: tuple[str, ...] = ()) -> None:
    a, b = full_tree(ours, ignore), full_tree(ref, ignore)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    assert not differ, f"{ours} differs from {ref} at {differ[:5]}"


def vigra_axistags(axes: str) -> str:
    """Axis tags as vigra writes them (and ilastik stores them)."""
    tags = [
        {"key": a, "typeFlags": 1 if a == "c" else 2, "resolution": 0, "description": ""}
        for a in axes
    ]
    return json.dumps({"axes": tags}, indent=2)


def to_axes(cyx: np.ndarray, axes: str) -> np.ndarray:
    """A C, Y, X array in the axis order ``axes`` (other axes of length 1)."""
    others = [a for a in axes if a not in "cyx"]
    expanded = cyx.reshape(cyx.shape + (1,) * len(others))
    source = ["c", "y", "x", *others]
    return expanded.transpose([source.index(a) for a in axes])


def _replace(group: h5py.Group, name: str, data) -> None:
    if name in group:
        del group[name]
    group.create_dataset(name, data=data)


def unfix_project(
    dst: Path,
    axes: str = "zyxc",
    lane_path=None,
    block_axes: str | None = None,
    block_tags: bool = False,
) -> dict[str, tuple]:
    """Rebuild the pipeline's project layout from steinbock's fixed example project.

    Lanes name ``<pipeline crops>/<stem>.h5`` (or ``lane_path(stem)``) with ``axes`` axis tags,
    label blocks are stored in ``block_axes`` order (default ``axes``; with their own axistags
    if ``block_tags``), and the export settings are ilastik's.

    Returns
    -------
    shapes : dict
        Crop stem to (C, Y, X), in lane order.
    """
    block_axes = block_axes or axes
    shutil.copyfile(FIXED_PROJECT, dst)
    shapes = {}
    with h5py.File(dst, "r+") as f:
        infos = f["Input Data/infos"]
        for lane in sorted(infos):
            raw = infos[lane]["Raw Data"]
            stem = raw["nickname"][()].decode()
            c, y, x = (int(n) for n in raw["shape"][()])
            shapes[stem] = (c, y, x)
            path = lane_path(stem) if lane_path else f"{PIPELINE_CROP_DIR}/{stem}.h5"
            _replace(raw, "__class__", b"FilesystemDatasetInfo")
            _replace(raw, "axistags", vigra_axistags(axes).encode())
            _replace(raw, "display_mode", b"default")
            _replace(raw, "filePath", path.encode())
            _replace(raw, "nickname", f"{stem}-{stem}".encode())
            sizes = {"c": c, "y": y, "x": x}
            _replace(raw, "shape", np.array([sizes.get(a, 1) for a in axes], dtype=np.int64))
        for group in f["PixelClassification/LabelSets"].values():
            for name in list(group):
                block = group[name]
                parts = block.attrs["blockSlice"].strip("[]").split(",")
                cyx = dict(zip("cyx", parts, strict=True))
                data = to_axes(block[()], block_axes)
                del group[name]
                new = group.create_dataset(name, data=data)
                block_slice = "[" + ",".join(cyx.get(a, "0:1") for a in block_axes) + "]"
                # the pipeline project stores it as variable-length ASCII
                new.attrs.create("blockSlice", block_slice, dtype=h5py.string_dtype("ascii"))
                if block_tags:
                    new.attrs["axistags"] = vigra_axistags(block_axes)
        export = f["Prediction Export"]
        _replace(export, "ExportMin", np.uint16(0))
        _replace(export, "ExportMax", np.uint16(65535))
        _replace(export, "OutputFilenameFormat", b"{dataset_dir}/{nickname}_{result_type}.tiff")
        del export["OutputAxisOrder"]
    return shapes


def write_pipeline_crop(path: Path, cyx: np.ndarray, axes: str = "zyxc", dataset=None, **kw):
    """A crop as the pipeline writes it: uint16, dataset named after the file, axistags."""
    with h5py.File(path, "w") as f:
        ds = f.create_dataset(dataset or path.stem, data=to_axes(cyx, axes), **kw)
        if axes:
            ds.attrs["axistags"] = vigra_axistags(axes)


def synthetic_crop(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 6000, size=shape, dtype=np.uint16)


@pytest.fixture
def pipeline(tmp_path, monkeypatch) -> Path:
    """A folder with the pipeline's project (``pixel_classifier.ilp``) and uint16 ZYXC crops
    (``ilastik_crops/``), rebuilt from the in-repo example; the working directory."""
    work = tmp_path / "work"
    crops = work / "ilastik_crops"
    crops.mkdir(parents=True)
    shapes = unfix_project(work / "pixel_classifier.ilp")
    for i, (stem, shape) in enumerate(shapes.items()):
        write_pipeline_crop(crops / f"{stem}.h5", synthetic_crop(shape, i), chunks=True)
    monkeypatch.chdir(work)
    return work


def expected_crop(pipeline_crop: Path) -> np.ndarray:
    with h5py.File(pipeline_crop, "r") as f:
        (data,) = (ds[()] for ds in f.values())
    return np.transpose(data, (3, 1, 2, 0))[..., 0].astype(np.float32)


def assert_steinbock_crop(path: Path, expected: np.ndarray) -> None:
    with h5py.File(path, "r") as f:
        assert list(f) == ["crop"]
        ds = f["crop"]
        assert ds.dtype == np.float32
        np.testing.assert_array_equal(ds[()], expected)
        assert dict(ds.attrs) == {
            "axistags": fix.images.AXISTAGS,
            "display_mode": "grayscale",
            "steinbock": True,
        }
        assert _attr_kinds(ds) == (
            ("axistags", (True, 0)),
            ("display_mode", (True, 0)),
            ("steinbock", "bool"),
        )


def error_line(result) -> str:
    """The CLI's one error line; fails on tracebacks or multi-line messages."""
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.stderr
    message = lines[0]
    assert result.stderr.rstrip().endswith(message)  # nothing follows it
    return message


# --- steinbock's reference output -----------------------------------------------------------


@pytest.fixture
def steinbock_input(imc_mock, tmp_path, monkeypatch) -> Path:
    """A writable copy of the shared pretrained project and crops, named as steinbock expects."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(imc_mock / "pretrained" / "ilastik.ilp", work / "pixel_classifier.ilp")
    shutil.copytree(
        imc_mock / "pretrained" / "ilastik_crops",
        work / "ilastik_crops",
        copy_function=shutil.copyfile,
    )
    monkeypatch.chdir(work)
    return work


def test_acceptance_matches_steinbock_0_16_5(steinbock_input, imc_mock):
    ref = imc_mock / "reference" / "steinbock-0.16.5" / "fix"
    result = run_fix("--no-backup")
    assert result.exit_code == 0, result.output
    crop_names = sorted(p.name for p in (ref / "ilastik_crops").iterdir())
    assert result.stdout.splitlines() == [
        *(f"ilastik_crops/{name}" for name in crop_names),
        "pixel_classifier.ilp",
    ]
    assert fix.EXPORT_WARNING in result.stderr
    # same tree, types and values; time and datasetId are kept from the input, as steinbock does
    assert_same_tree(steinbock_input / "pixel_classifier.ilp", ref / "pixel_classifier.ilp")
    assert sorted(p.name for p in (steinbock_input / "ilastik_crops").iterdir()) == crop_names
    for name in crop_names:
        assert_same_tree(steinbock_input / "ilastik_crops" / name, ref / "ilastik_crops" / name)
    assert not (steinbock_input / "pixel_classifier.ilp.bak").exists()


def test_acceptance_rerun_changes_nothing(steinbock_input):
    assert run_fix("--no-backup").exit_code == 0
    before = snapshot(steinbock_input)
    result = run_fix()  # default --backup: nothing to fix, so no backup either
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "nothing to fix" in result.stderr
    assert snapshot(steinbock_input) == before


def test_rebuilt_pipeline_project_equals_the_shared_one(imc_mock, tmp_path):
    """The CI fixture (``unfix_project``) rebuilds the pipeline project exactly."""
    unfix_project(tmp_path / "unfixed.ilp")
    assert_same_tree(tmp_path / "unfixed.ilp", imc_mock / "pretrained" / "ilastik.ilp")
    with h5py.File(imc_mock / "pretrained" / "ilastik_crops" / f"{LAST_CROP}.h5", "r") as f:
        ds = f[LAST_CROP]
        assert ds.dtype == np.uint16 and ds.shape == (1, 162, 182, 4)
        assert fix.axistags_keys(ds.attrs["axistags"], "") == ("z", "y", "x", "c")


def test_steinbocks_half_patched_state_is_completed(steinbock_input, imc_mock, tmp_path):
    """steinbock's KeyError crashes leave converted crops and an untouched project."""
    ref = imc_mock / "reference" / "steinbock-0.16.5" / "fix"
    shutil.rmtree(steinbock_input / "ilastik_crops")
    shutil.copytree(
        ref / "ilastik_crops", steinbock_input / "ilastik_crops", copy_function=shutil.copyfile
    )
    result = run_fix("--no-backup")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["pixel_classifier.ilp"]  # crops kept as they are
    assert_same_tree(steinbock_input / "pixel_classifier.ilp", ref / "pixel_classifier.ilp")


# --- the same, anywhere ---------------------------------------------------------------------


def test_fix_gives_steinbocks_project_and_crops(pipeline):
    originals = {p.name: expected_crop(p) for p in (pipeline / "ilastik_crops").iterdir()}
    result = run_fix("--no-backup")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        *(f"ilastik_crops/{name}" for name in sorted(originals)),
        "pixel_classifier.ilp",
    ]
    assert fix.EXPORT_WARNING in result.stderr
    assert "[15/15]" in result.stderr
    assert_same_tree(pipeline / "pixel_classifier.ilp", FIXED_PROJECT)
    for name, expected in originals.items():
        assert_steinbock_crop(pipeline / "ilastik_crops" / name, expected)


def test_rerun_changes_nothing_and_needs_no_backup(pipeline):
    result = run_fix()
    assert result.exit_code == 0, result.output
    before = snapshot(pipeline)
    assert (
        "pixel_classifier.ilp.bak" in before and "ilastik_crops.bak/" + LAST_CROP + ".h5" in before
    )
    for args in ((), ("--no-backup",)):
        result = run_fix(*args)
        assert result.exit_code == 0, result.output
        assert result.stdout == ""
        assert "nothing to fix" in result.stderr
        assert snapshot(pipeline) == before


def test_backup_holds_the_originals(pipeline):
    before = snapshot(pipeline)
    result = run_fix()
    assert result.exit_code == 0, result.output
    after = snapshot(pipeline)
    assert after["pixel_classifier.ilp.bak"] == before["pixel_classifier.ilp"]
    for name, digest in before.items():
        if name.startswith("ilastik_crops/"):
            assert after[name.replace("ilastik_crops/", "ilastik_crops.bak/")] == digest
            assert after[name] != digest  # patched
    assert len(after) == 2 * len(before)  # the originals and their backups, nothing else
    assert_same_tree(pipeline / "pixel_classifier.ilp", FIXED_PROJECT)


@pytest.mark.parametrize("existing", ["pixel_classifier.ilp.bak", "ilastik_crops.bak"])
def test_existing_backup_is_refused(pipeline, existing):
    if existing.endswith(".ilp.bak"):
        (pipeline / existing).write_bytes(b"an older backup")
    else:
        (pipeline / existing).mkdir()
    before = snapshot(pipeline)
    message = error_line(run_fix())
    assert existing in message and "--no-backup" in message
    assert snapshot(pipeline) == before


# --- all or nothing -------------------------------------------------------------------------


@pytest.mark.parametrize("backup", ["--backup", "--no-backup"])
def test_corrupt_crop_changes_nothing(pipeline, backup):
    crop = pipeline / "ilastik_crops" / f"{LAST_CROP}.h5"
    crop.write_bytes(b"\0" * 64 + crop.read_bytes()[64:])  # sorted last, signature destroyed
    before = snapshot(pipeline)
    message = error_line(run_fix(backup))
    assert f"{LAST_CROP}.h5" in message and "not a readable HDF5 file" in message
    assert snapshot(pipeline) == before


@pytest.mark.parametrize("backup", ["--backup", "--no-backup"])
def test_unreadable_crop_data_changes_nothing(pipeline, backup):
    """The header reads, the pixels do not: the 14 crops before it were converted already."""
    crop = pipeline / "ilastik_crops" / f"{LAST_CROP}.h5"
    write_pipeline_crop(crop, synthetic_crop((4, 162, 182), 0), compression="gzip", chunks=True)
    with h5py.File(crop, "r") as f:
        chunk = f[LAST_CROP].id.get_chunk_info(0)
    with open(crop, "r+b") as stream:
        stream.seek(chunk.byte_offset)
        stream.write(b"\xff" * chunk.size)
    before = snapshot(pipeline)
    result = run_fix(backup)
    message = error_line(result)
    assert f"{LAST_CROP}.h5" in message and "cannot read the crop" in message
    assert "[14/15]" in result.stderr  # really failed half-way
    assert snapshot(pipeline) == before


@pytest.mark.parametrize("backup", ["--backup", "--no-backup"])
def test_failed_rename_puts_everything_back(pipeline, backup, monkeypatch):
    """The last rename (the project's) fails after all crops were replaced."""
    before = snapshot(pipeline)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).name == "pixel_classifier.ilp" and ".tmp" in Path(src).name:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    message = error_line(run_fix(backup))
    assert "pixel_classifier.ilp: fix failed, nothing changed" in message
    assert snapshot(pipeline) == before


def test_unmatched_lane_lists_lanes_and_crops(pipeline):
    crops = pipeline / "ilastik_crops"
    (crops / f"{LAST_CROP}.h5").rename(crops / "someone_elses_image.h5")
    before = snapshot(pipeline)
    message = error_line(run_fix())
    assert message.startswith("Error: pixel_classifier.ilp: cannot match lanes to crops")
    assert f"lane0014: {LAST_CROP}.h5 not found" in message
    assert "crops not matched to a lane: someone_elses_image.h5" in message
    assert snapshot(pipeline) == before


def s2_name(stem: str) -> str:
    """The pipeline's full-size scaled copy of the image a crop was cut from."""
    return stem.split("_x0_y0_")[0] + "_s2.h5"


def test_pipeline_s2_copies_are_matched(pipeline):
    crops = pipeline / "ilastik_crops"
    for crop in sorted(crops.iterdir()):
        crop.rename(crops / s2_name(crop.stem))  # same images, under the pipeline's other name
    originals = {p.name: expected_crop(p) for p in crops.iterdir()}
    result = run_fix("--no-backup")
    assert result.exit_code == 0, result.output
    assert "using " + s2_name(LAST_CROP) in result.stderr
    with h5py.File(pipeline / "pixel_classifier.ilp", "r") as f:
        for lane in f["Input Data/infos"].values():
            raw = lane["Raw Data"]
            nickname = raw["nickname"][()].decode()
            assert nickname.endswith("_s2")
            assert raw["filePath"][()].decode() == f"ilastik_crops/{nickname}.h5/crop"
    for name, expected in originals.items():
        assert_steinbock_crop(crops / name, expected)
    # apart from the names, steinbock's project
    renamed = full_tree(pipeline / "pixel_classifier.ilp", ignore=("filePath", "nickname"))
    assert renamed == full_tree(FIXED_PROJECT, ignore=("filePath", "nickname"))
    assert run_fix().stdout == ""  # and a rerun finds nothing to do


def test_ambiguous_copies_are_refused(pipeline):
    crops = pipeline / "ilastik_crops"
    crop = crops / f"{LAST_CROP}.h5"
    base = LAST_CROP.split("_x0_y0_")[0]
    shutil.copyfile(crop, crops / f"{base}_s2.h5")
    crop.rename(crops / f"{base}_s4.h5")
    before = snapshot(pipeline)
    message = error_line(run_fix())
    assert f"lane0014: {LAST_CROP}.h5 not found and several crops fit" in message
    assert f"{base}_s2.h5, {base}_s4.h5" in message
    assert snapshot(pipeline) == before


def test_different_shape_is_not_a_match(pipeline):
    crops = pipeline / "ilastik_crops"
    (crops / f"{LAST_CROP}.h5").unlink()
    base = LAST_CROP.split("_x0_y0_")[0]
    write_pipeline_crop(crops / f"{base}_s2.h5", synthetic_crop((4, 100, 100), 1))
    message = error_line(run_fix())
    assert "no unused crop has its image name and shape (4, 162, 182)" in message


def test_paths_are_relative_to_the_project(pipeline):
    """Lanes and export settings name files relative to the project's folder; crops in
    subfolders keep their subfolder."""
    (pipeline / "project").mkdir()
    (pipeline / "pixel_classifier.ilp").rename(pipeline / "project" / "p.ilp")
    sub = pipeline / "ilastik_crops" / "sub"
    sub.mkdir()
    (pipeline / "ilastik_crops" / f"{LAST_CROP}.h5").rename(sub / f"{LAST_CROP}.h5")
    result = run_fix("--ilp", "project/p.ilp", "--probabs", "out/probs")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-2:] == [
        f"ilastik_crops/sub/{LAST_CROP}.h5",
        "project/p.ilp",
    ]
    with h5py.File(pipeline / "project" / "p.ilp", "r") as f:
        paths = [lane["Raw Data/filePath"][()].decode() for lane in f["Input Data/infos"].values()]
        export = f["Prediction Export/OutputFilenameFormat"][()]
    assert all(path.startswith("../ilastik_crops/") for path in paths)
    assert paths[-1] == f"../ilastik_crops/sub/{LAST_CROP}.h5/crop"
    assert export == b"../out/probs/{nickname}.tiff"
    assert (pipeline / "project" / "p.ilp.bak").is_file()
    assert (pipeline / "ilastik_crops.bak" / "sub" / f"{LAST_CROP}.h5").is_file()


# --- other layouts --------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.4.1", "1.4.0", "1.3.3"])
def test_projects_with_yxc_label_blocks(pipeline, version):
    """Projects saved by ilastik >= 1.4.0 (or <= 1.3.3post1) store label blocks in the order
    ilastik reorders a 2-D image to: Y, X, C (with their axistags since 1.4). They already
    are in the order ilastik expects of the fixed lanes, so fix keeps them."""
    project = pipeline / "pixel_classifier.ilp"
    is_1_4 = version.startswith("1.4")
    unfix_project(
        project,
        lane_path=lambda stem: f"crops/{stem}.h5/{stem}",
        block_axes="yxc",
        block_tags=is_1_4,
    )
    with h5py.File(project, "r+") as f:
        f["ilastikVersion"][()] = version.encode()
        for lane in f["Input Data/infos"].values():
            raw = lane["Raw Data"]
            if is_1_4:  # DatasetInfo.to_json_data of ilastik 1.4.1
                raw["__class__"][()] = b"RelativeFilesystemDatasetInfo"
                raw.create_dataset("working_scale", data=b"")
                raw.create_dataset("scale_locked", data=False)
    blocks_before = {k: v for k, v in full_tree(project).items() if "/block" in k}
    assert len(blocks_before) == 6
    result = run_fix("--no-backup")
    assert result.exit_code == 0, result.output
    assert "Label blocks: yxc order" in result.stderr
    ignore = ("working_scale", "scale_locked", "ilastikVersion")
    ours, ref = full_tree(project, ignore), full_tree(FIXED_PROJECT, ignore)
    assert {k: v for k, v in full_tree(project).items() if "/block" in k} == blocks_before
    extra = {k for k in ours if k.endswith(("working_scale", "scale_locked"))}
    assert len(extra) == (30 if is_1_4 else 0)  # kept as they were
    assert {k: v for k, v in ours.items() if "/block" not in k and k not in extra} == {
        k: v for k, v in ref.items() if "/block" not in k
    }
    with h5py.File(project, "r") as f:
        assert f["ilastikVersion"][()] == version.encode()
    assert run_fix().stdout == ""


def test_ilastik_1_4_blocks_in_another_order_are_reordered(pipeline):
    """A block's own axistags say how it is stored (here Z, Y, X, C); it is brought into the
    order ilastik 1.4 expects (Y, X, C), and its axistags with it."""
    project = pipeline / "pixel_classifier.ilp"
    unfix_project(project, block_axes="zyxc", block_tags=True)
    with h5py.File(project, "r+") as f:
        f["ilastikVersion"][()] = b"1.4.1"
    result = run_fix("--no-backup")
    assert result.exit_code == 0, result.output
    expected = Path("expected.ilp")
    unfix_project(expected, block_axes="yxc", block_tags=True)
    with h5py.File(project, "r") as f, h5py.File(expected, "r") as g:
        blocks = [b for s in f["PixelClassification/LabelSets"].values() for b in s.values()]
        assert len(blocks) == 6
        for block in blocks:
            ref = g[block.name]
            np.testing.assert_array_equal(block[()], ref[()])
            assert block.attrs["blockSlice"] == ref.attrs["blockSlice"]
            assert fix.axistags_keys(block.attrs["axistags"], "") == ("y", "x", "c")


def test_yxc_crops_with_three_dimensional_label_blocks(tmp_path, monkeypatch):
    """Label blocks that already have three axes still need transposing (Y, X, C here)."""
    crops = tmp_path / "ilastik_crops"
    crops.mkdir()
    shapes = unfix_project(tmp_path / "pixel_classifier.ilp", axes="yxc")
    for i, (stem, shape) in enumerate(shapes.items()):
        write_pipeline_crop(crops / f"{stem}.h5", synthetic_crop(shape, i), axes="yxc")
    monkeypatch.chdir(tmp_path)
    result = run_fix("--no-backup")
    assert result.exit_code == 0, result.output
    assert_same_tree(tmp_path / "pixel_classifier.ilp", FIXED_PROJECT)


def test_axisorder_option(pipeline):
    for crop in (pipeline / "ilastik_crops").iterdir():
        with h5py.File(crop, "r+") as f:
            del f[crop.stem].attrs["axistags"]
    before = snapshot(pipeline)
    message = error_line(run_fix())
    assert "unknown axis order" in message and "--axisorder" in message
    assert snapshot(pipeline) == before
    result = run_fix("--no-backup", "--axisorder", "ZYXC")
    assert result.exit_code == 0, result.output
    assert_same_tree(pipeline / "pixel_classifier.ilp", FIXED_PROJECT)


# --- one-line errors ------------------------------------------------------------------------


def test_missing_project(pipeline):
    (pipeline / "pixel_classifier.ilp").unlink()
    assert "pixel_classifier.ilp" in error_line(run_fix())


def test_not_an_hdf5_file(pipeline):
    (pipeline / "other.ilp").write_text("not a project")
    message = error_line(run_fix("--ilp", "other.ilp"))
    assert message.startswith("Error: other.ilp: not an HDF5 file")


def test_truncated_project(pipeline):
    project = pipeline / "pixel_classifier.ilp"
    project.write_bytes(project.read_bytes()[:50_000])
    before = snapshot(pipeline)
    message = error_line(run_fix())
    assert message.startswith("Error: pixel_classifier.ilp: cannot open the project (")
    assert snapshot(pipeline) == before


def test_not_an_ilastik_project(pipeline):
    with h5py.File(pipeline / "other.ilp", "w") as f:
        f["data"] = 1
    message = error_line(run_fix("--ilp", "other.ilp"))
    assert message == "Error: other.ilp: not an ilastik project (no 'Input Data/infos' group)"


def test_no_crops(pipeline):
    (pipeline / "empty").mkdir()
    assert error_line(run_fix("--crop", "empty")) == "Error: empty: no *.h5 crops found"


def test_inconsistent_axis_orders(pipeline):
    crop = pipeline / "ilastik_crops" / f"{LAST_CROP}.h5"
    write_pipeline_crop(crop, synthetic_crop((4, 162, 182), 0), axes="yxzc")
    before = snapshot(pipeline)
    message = error_line(run_fix())
    assert f"{LAST_CROP}.h5: Inconsistent axis orders across crops" in message
    assert "yxzc" in message and "zyxc" in message
    assert snapshot(pipeline) == before


def test_unknown_axis_in_option(pipeline):
    assert "unknown axis 'q'" in error_line(run_fix("--axisorder", "qyxc"))


def test_axis_order_that_does_not_fit(pipeline):
    message = error_line(run_fix("--axisorder", "yxc"))
    assert "yxc has 3 axes, but the data has 4 dimensions" in message


def test_crop_with_several_planes(pipeline):
    crop = pipeline / "ilastik_crops" / f"{LAST_CROP}.h5"
    with h5py.File(crop, "w") as f:
        ds = f.create_dataset(LAST_CROP, data=np.zeros((3, 162, 182, 4), np.uint16))
        ds.attrs["axistags"] = vigra_axistags("zyxc")
    message = error_line(run_fix())
    assert "12 values per pixel, but no axis of zyxc (3, 162, 182, 4) holds them all" in message


# --- the rules, one by one ------------------------------------------------------------------


def test_steinbock_transposition():
    assert fix.steinbock_transposition("zyxc", (1, 120, 120, 4), "") == (3, 1, 2, 0)
    assert fix.steinbock_transposition("yxc", (86, 100, 4), "") == (2, 0, 1)
    assert fix.steinbock_transposition("cyx", (4, 86, 100), "") == (0, 1, 2)
    assert fix.steinbock_transposition("tzyxc", (1, 1, 5, 6, 3), "") == (4, 2, 3, 0, 1)
    # the c axis does not hold the channels: the first other non-spatial axis that does
    assert fix.steinbock_transposition("zyxc", (4, 120, 120, 1), "") == (0, 1, 2, 3)
    assert fix.steinbock_transposition("zyx", (2, 5, 5), "") == (0, 1, 2)
    with pytest.raises(SteinpixError, match="6 values per pixel, but no axis of tzyx"):
        fix.steinbock_transposition("tzyx", (2, 3, 5, 5), "")
    with pytest.raises(SteinpixError, match="lacks x or y"):
        fix.steinbock_transposition("zxc", (1, 5, 3), "")


def test_label_block_order_by_version():
    for version in ("1.3.3post2", "1.3.3post3", "1.4.0a1", "1.4.0b7", None, "unknown"):
        assert fix.labels_in_original_order(version), version
    for version in ("1.3.2", "1.3.3", "1.3.3post1", "1.4.0b8", "1.4.0rc1", "1.4.0", "1.4.1.post1"):
        assert not fix.labels_in_original_order(version), version
    assert fix.version_key("1.4.0b7") == (1, 4, 0, -2, 7)
    assert fix.ilastik_image_order("zyxc", (1, 120, 120, 4)) == ("y", "x", "c")
    assert fix.ilastik_image_order("cyx", (1, 120, 120)) == ("y", "x", "c")
    assert fix.ilastik_image_order("zyxc", (5, 120, 120, 4)) == ("z", "y", "x", "c")
    assert fix.ilastik_image_order("tyx", (3, 120, 120)) == ("t", "y", "x", "c")


def test_image_base_name():
    assert fix.image_base_name("a_ac_ilastik_x0_y0_w120_h120") == "a_ac_ilastik"
    assert fix.image_base_name("a_ac_ilastik_s2") == "a_ac_ilastik"
    assert fix.image_base_name("a_ac_ilastik_s2_x10_y5_w50_h50") == "a_ac_ilastik"
    assert fix.image_base_name("a_s0_a1_ac") == "a_s0_a1_ac"


def test_lane_file_stem():
    assert fix.lane_file_stem("/data/crops/a_x0_y0_w1_h1.h5") == "a_x0_y0_w1_h1"
    assert fix.lane_file_stem("ilastik_crops/a.h5/crop") == "a"
    assert fix.lane_file_stem("C:\\data\\crops\\a.h5\\a") == "a"
    assert fix.lane_file_stem("images/a.tiff") == "a"


def test_backup_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fix.backup_paths(Path("p.ilp"), Path("crops/")) == (Path("p.ilp.bak"), Path("crops.bak"))
    assert fix.backup_paths(Path("p.ilp"), Path("."))[1] == tmp_path.with_name(
        tmp_path.name + ".bak"
    )
