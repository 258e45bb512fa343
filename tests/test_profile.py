"""``run --profile auto``: the built-in engine follows the ilastik version that saved the project.

A project trained and run in ilastik 1.4.0 (``tests/data/imcseg-ilastik-1.4.0``) is reproduced
bit for bit by a plain ``fix`` + ``run``; steinbock's 1.3.3post3 project keeps the 1.3.3post3
arithmetic (its bit-exact run is in ``test_run_cli.py``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from steinpix import project
from steinpix._cli.main import main

from conftest import EXAMPLE, TEST_DATA

ILASTIK_14 = TEST_DATA / "imcseg-ilastik-1.4.0"
# the one image of the four where the 1.3.3post3 arithmetic flips a tree vote (README there)
DIFFERS_UNDER_133 = "20210305_NE_mockData1_s0_a3_ac_ilastik_s2"


def cli(command: str, *args: str):
    return CliRunner().invoke(main, ["classify", "ilastik", command, *args])


def steinbock_image(pipeline_image: Path, out_file: Path) -> None:
    """The pipeline's ZYXC uint16 image in steinbock's format: float32 CYX dataset ``img``."""
    with h5py.File(pipeline_image, "r") as f:
        (data,) = (ds[()] for ds in f.values())
    with h5py.File(out_file, "w") as f:
        f["img"] = np.moveaxis(data[0], -1, 0).astype(np.float32)


def ilastik_output(name: str) -> np.ndarray:
    return tifffile.imread(ILASTIK_14 / "ilastik" / f"{name}_Probabilities.tiff")


@pytest.fixture
def workdir_14(tmp_path, monkeypatch) -> Path:
    """The ilastik 1.4.0 project and crops, named as steinbock expects, and its 4 images."""
    shutil.copyfile(ILASTIK_14 / "TestData.ilp", tmp_path / "pixel_classifier.ilp")
    shutil.copytree(ILASTIK_14 / "crops", tmp_path / "ilastik_crops", copy_function=shutil.copyfile)
    (tmp_path / "ilastik_img").mkdir()
    for image in sorted((ILASTIK_14 / "ilastik").glob("*_s2.h5")):
        steinbock_image(image, tmp_path / "ilastik_img" / image.name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STEINPIX_ILASTIK", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no ilastik to be found
    return tmp_path


def differing_pixels(out_dir: Path) -> dict[str, int]:
    """Per image: the pixels where ``out_dir``'s output differs from ilastik 1.4.0's."""
    counts = {}
    for out in sorted(out_dir.glob("*.tiff")):
        ours, theirs = tifffile.imread(out), ilastik_output(out.stem)
        assert ours.dtype == theirs.dtype == np.uint16 and ours.shape == theirs.shape
        counts[out.stem] = int(np.any(ours != theirs, axis=-1).sum())
    return counts


def test_fix_and_plain_run_reproduce_ilastik_1_4_0(workdir_14):
    result = cli("fix", "--no-backup")
    assert result.exit_code == 0, result.output
    with h5py.File("pixel_classifier.ilp", "r") as f:
        assert f["ilastikVersion"][()] == b"1.4.0"  # fix keeps it: auto relies on it
    result = cli("run")
    assert result.exit_code == 0, result.output
    engine_lines = [li for li in result.stderr.splitlines() if "Engine:" in li]
    assert len(engine_lines) == 1
    assert engine_lines[0].endswith(
        "Engine: built-in, ilastik 1.4.0 arithmetic (project saved by ilastik 1.4.0)"
    )
    assert "1.3.3" not in result.stderr
    counts = differing_pixels(workdir_14 / "ilastik_probabilities")
    assert len(counts) == 4
    assert counts == dict.fromkeys(counts, 0)  # bit for bit on all 4 images


def test_explicit_profile_133_differs_on_a_1_4_project(workdir_14):
    assert cli("fix", "--no-backup").exit_code == 0
    result = cli("run", "--profile", "133")
    assert result.exit_code == 0, result.output
    assert (
        "Engine: built-in, ilastik 1.3.3post3 arithmetic "
        "(--profile 133; project saved by ilastik 1.4.0)" in result.stderr
    )
    counts = differing_pixels(workdir_14 / "ilastik_probabilities")
    assert counts.pop(DIFFERS_UNDER_133) > 0
    assert counts == dict.fromkeys(counts, 0)


@pytest.fixture
def workdir_133(tmp_path, monkeypatch) -> Path:
    """steinbock's fixed 1.3.3post3 project and the in-repo reference images."""
    shutil.copytree(TEST_DATA / "reference" / "ilastik_img", tmp_path / "ilastik_img")
    shutil.copyfile(EXAMPLE / "pretrained.ilp", tmp_path / "pixel_classifier.ilp")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STEINPIX_ILASTIK", raising=False)
    return tmp_path


def assert_equals_ilastik_133(out_dir: Path) -> None:
    ref = TEST_DATA / "reference" / "ilastik_probabilities"
    outputs = sorted(out_dir.glob("*.tiff"))
    assert [p.name for p in outputs] == sorted(p.name for p in ref.iterdir())
    for out in outputs:
        np.testing.assert_array_equal(tifffile.imread(out), tifffile.imread(ref / out.name))


def test_1_3_3post3_project_picks_133(workdir_133):
    result = cli("run")
    assert result.exit_code == 0, result.output
    assert (
        "Engine: built-in, ilastik 1.3.3post3 arithmetic "
        "(project saved by ilastik 1.3.3post3)" in result.stderr
    )
    assert_equals_ilastik_133(workdir_133 / "ilastik_probabilities")


@pytest.mark.parametrize("value", [None, b"not-a-version"])
def test_missing_or_unparsable_version_warns_and_takes_133(workdir_133, value):
    with h5py.File("pixel_classifier.ilp", "r+") as f:
        del f["ilastikVersion"]
        if value is not None:
            f["ilastikVersion"] = value
    result = cli("run")
    assert result.exit_code == 0, result.output
    warning = next(li for li in result.stderr.splitlines() if "WARNING" in li)
    assert "pixel_classifier.ilp" in warning
    assert ("'not-a-version'" if value else "no ilastikVersion") in warning
    assert "--profile 14x" in warning
    assert "Engine: built-in, ilastik 1.3.3post3 arithmetic" in result.stderr
    assert_equals_ilastik_133(workdir_133 / "ilastik_probabilities")


@pytest.mark.parametrize(
    ("version", "profile"),
    [
        ("1.3.3post3", "133"),
        ("1.3.3post2", "133"),
        ("1.3.3", "133"),
        ("1.3.2post1", "133"),
        ("1.2.2post2", "133"),
        ("1.4.0", "14x"),
        ("1.4.0b7", "14x"),
        ("1.4.0rc2", "14x"),
        ("1.4.1", "14x"),
        ("1.4.1.post1", "14x"),
        ("1.5.0", "14x"),
        (" 1.4.0\n", "14x"),
        ("", None),
        ("unknown", None),
        ("1", None),
        (None, None),
    ],
)
def test_profile_for_version(version, profile):
    assert project.profile_for_version(version) == profile


def test_choose_profile_explicit_overrides_and_says_so():
    assert project.choose_profile("133", "1.4.0") == (
        "133",
        "--profile 133; project saved by ilastik 1.4.0",
        None,
    )
    assert project.choose_profile("14x", None)[:2] == (
        "14x",
        "--profile 14x; project has no ilastikVersion",
    )
    auto = project.choose_profile("auto", "1.4.1")
    assert auto == ("14x", "project saved by ilastik 1.4.1", None)
    profile, _, warning = project.choose_profile("auto", "garbage")
    assert profile == "133" and "'garbage'" in warning
