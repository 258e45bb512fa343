"""A command that fails (or is stopped with Ctrl-C) removes the output folders it created and
left empty; folders that existed before, or that hold an output, stay. The ``steinpix``
command in a subprocess on copies of the example data."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from fake_ilastik import FakeIlastik
from test_user_errors import error_lines, hidden_files, steinpix, unwritable

from conftest import EXAMPLE, copy_example

STEMS = [f"20210305_NE_mockData1_00{i}" for i in (1, 2, 3)]


def prepared(tmp_path: Path) -> Path:
    work = copy_example(tmp_path / "data")
    assert steinpix(work, "prepare", "--cropsize", "50").returncode == 0
    return work


def damage_images(work: Path) -> None:
    for f in (work / "ilastik_img").glob("*.h5"):
        f.write_bytes(b"not an HDF5 file")


def start(work: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "steinpix", "classify", "ilastik", *args],
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def interrupt(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 1, stderr
    assert stderr.rstrip().endswith("Aborted!") and "Traceback" not in stderr, stderr
    return stderr


def test_prepare_that_cannot_write_its_images_leaves_no_empty_folders(tmp_path):
    work = copy_example(tmp_path / "data")
    with unwritable(work / "ilastik_img"):
        result = steinpix(
            work, "prepare", "--cropsize", "50", "--cropout", "out/crops", "-o", "p/q/x.ilp"
        )
    assert result.returncode == 1
    assert error_lines(result)[0].startswith("Error: ilastik_img/20210305_NE_mockData1_001.h5")
    # made by this command (with their parents) and empty: gone; ilastik_img existed: stays
    assert sorted(p.name for p in work.iterdir()) == ["README.md", "ilastik_img", "img",
                                                      "panel.csv", "pretrained.ilp"]


def test_prepare_whose_every_image_fails_leaves_no_empty_folders(tmp_path):
    work = copy_example(tmp_path / "data")
    for f in (work / "img").iterdir():
        f.write_bytes(b"not a TIFF")
    result = steinpix(work, "prepare", "--cropout", "out/crops")
    assert result.returncode == 1
    assert error_lines(result) == ["Error: 3 of 3 images could not be prepared (see above)"]
    assert (work / "pixel_classifier.ilp").is_file()  # an output: stays, as before
    assert not (work / "ilastik_img").exists()
    assert not (work / "out").exists()


def test_prepare_keeps_the_folders_of_the_images_it_prepared(tmp_path):
    work = copy_example(tmp_path / "data")
    (work / "img" / f"{STEMS[1]}.tiff").write_bytes(b"not a TIFF")
    result = steinpix(work, "prepare", "--cropsize", "50")
    assert result.returncode == 1
    assert sorted(p.stem for p in (work / "ilastik_img").iterdir()) == [STEMS[0], STEMS[2]]
    assert len(list((work / "ilastik_crops").iterdir())) == 2


def test_prepare_that_succeeds_keeps_an_empty_crop_folder(tmp_path):
    # every image is smaller than the crop: no crop, a warning each, and success (as before)
    work = copy_example(tmp_path / "data")
    result = steinpix(work, "prepare", "--cropsize", "100000", "--cropout", "out/crops")
    assert result.returncode == 0, result.stderr
    assert "too small for crop size" in result.stderr
    assert list((work / "out" / "crops").iterdir()) == []
    assert len(list((work / "ilastik_img").iterdir())) == 3


def test_failed_run_leaves_no_empty_output_folders(tmp_path):
    work = prepared(tmp_path)
    damage_images(work)
    result = steinpix(
        work, "run", "--ilp", "pretrained.ilp", "--engine", "builtin",
        "--uncertainty", "unc/new", "--segmentation", "seg",
    )
    assert result.returncode == 1
    assert error_lines(result)[0].startswith("Error: 3 of 3 images failed: ")
    for folder in ("ilastik_probabilities", "unc", "seg"):
        assert not (work / folder).exists(), folder


def test_failed_run_keeps_the_empty_folders_that_existed_before(tmp_path):
    work = prepared(tmp_path)
    damage_images(work)
    (work / "unc").mkdir()
    result = steinpix(
        work, "run", "--ilp", "pretrained.ilp", "--engine", "builtin", "--uncertainty", "unc"
    )
    assert result.returncode == 1
    assert list((work / "unc").iterdir()) == []
    assert not (work / "ilastik_probabilities").exists()


def test_run_that_fails_on_some_images_keeps_the_folders_it_wrote_into(tmp_path):
    work = prepared(tmp_path)
    (work / "ilastik_img" / f"{STEMS[1]}.h5").write_bytes(b"not an HDF5 file")
    result = steinpix(
        work, "run", "--ilp", "pretrained.ilp", "--engine", "builtin", "--segmentation", "seg"
    )
    assert result.returncode == 1
    for folder in ("ilastik_probabilities", "seg"):
        assert sorted(p.stem for p in (work / folder).iterdir()) == [STEMS[0], STEMS[2]]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_run_stopped_with_ctrl_c_in_ilastik_leaves_no_empty_folders(tmp_path):
    work = prepared(tmp_path)
    fake = FakeIlastik(tmp_path / "ilastik").configure(slow_on=[STEMS[0]])
    proc = start(
        work, "run", "--ilp", "pixel_classifier.ilp", "--engine", "ilastik", "--ilastik",
        str(fake.path), "-o", "out/probabilities", "--uncertainty", "unc",
    )
    try:
        fake.wait_for("started")  # ilastik writes into a hidden folder inside out/probabilities
    finally:
        interrupt(proc)
    assert not (work / "out").exists()
    assert not (work / "unc").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_preview_stopped_with_ctrl_c_leaves_no_empty_folders(tmp_path):
    work = tmp_path / "data"
    (work / "probs").mkdir(parents=True)
    (work / "img").mkdir()
    rng = np.random.default_rng(0)
    probabilities = rng.integers(0, 65535, (4000, 4000, 3), dtype=np.uint16)
    tifffile.imwrite(work / "probs" / "a.tiff", probabilities, photometric="rgb")
    with h5py.File(work / "img" / "a.h5", "w") as f:
        f["img"] = rng.random((1, 4000, 4000), dtype=np.float32)
    proc = start(work, "preview", "--ilp", str(EXAMPLE / "pretrained.ilp"),
                 "--probabilities", "probs", "--img", "img", "-o", "out/preview")
    thumbnails = work / "out" / "preview" / "images"
    deadline = time.monotonic() + 60
    try:
        while not thumbnails.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert thumbnails.exists() and list(thumbnails.iterdir()) == []
    finally:
        interrupt(proc)  # while the one image is read
    assert not (work / "out").exists()
    assert hidden_files(work) == []
