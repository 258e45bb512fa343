"""Damaged inputs and unwritable outputs as a user meets them: the ``steinpix`` command in a
subprocess on copies of the example data, one line naming the right file, nothing half-done."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from conftest import EXAMPLE, copy_example

IMAGE = "20210305_NE_mockData1_002.tiff"


def steinpix(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "steinpix", "classify", "ilastik", *args],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("Error: ")]


def hidden_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.is_file()]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@contextlib.contextmanager
def unwritable(folder: Path) -> Iterator[None]:
    """``folder`` made unwritable: read-only, or immutable for root (who may write anyway)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", folder], capture_output=True).returncode:
        pytest.skip("root, and no immutable folders here (chattr +i)")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", folder], check=True)


def test_prepare_reports_a_tiff_cut_short_between_its_pages(tmp_path):
    # cut after the first channel's page: tifffile only logs the broken chain of pages and reads
    # a one-channel image, which must not pass for an image that disagrees with the panel
    work = copy_example(tmp_path / "data")
    bad = work / "img" / IMAGE
    bad.write_bytes(bad.read_bytes()[:30000])
    result = steinpix(work, "prepare", "--cropsize", "50", "--seed", "1")
    assert result.returncode == 1
    assert f"img/{IMAGE}: not a readable TIFF image (truncated or damaged" in result.stderr
    assert "channels, but" not in result.stderr
    assert error_lines(result) == ["Error: 1 of 3 images could not be prepared (see above)"]
    assert sorted(p.name for p in (work / "ilastik_img").iterdir()) == [
        "20210305_NE_mockData1_001.h5",
        "20210305_NE_mockData1_003.h5",
    ]
    with h5py.File(work / "pixel_classifier.ilp", "r") as f:
        assert len(f["Input Data/infos"]) == 2
    assert hidden_files(work) == []


def test_prepare_refuses_a_negative_seed_as_an_option_error(tmp_path):
    # numpy's default_rng takes no negative seeds: this was an "internal error in steinpix"
    work = copy_example(tmp_path / "data")
    result = steinpix(work, "prepare", "--seed", "-1")
    assert result.returncode == 2
    assert "Error: Invalid value for '--seed': -1 is not in the range x>=0." in result.stderr
    assert "internal error" not in result.stderr
    assert sorted(p.name for p in work.iterdir()) == sorted(
        ["README.md", "img", "panel.csv", "pretrained.ilp"]
    )

def test_a_bad_steinbock_img_dtype_is_the_users_error_not_steinpixs(tmp_path, monkeypatch):
    work = copy_example(tmp_path / "data")
    for value in ("foo", "U8"):
        monkeypatch.setenv("STEINBOCK_IMG_DTYPE", value)
        result = steinpix(work, "prepare", "--cropsize", "50")
        assert result.returncode == 1
        assert error_lines(result) == [
            f"Error: STEINBOCK_IMG_DTYPE={value}: not a numpy integer or floating-point type "
            "(steinbock's default: float32)"
        ]
        assert not (work / "ilastik_img").exists()
    monkeypatch.setenv("STEINBOCK_IMG_DTYPE", "uint16")  # as steinbock: ilastik images in it
    assert steinpix(work, "prepare", "--cropsize", "50").returncode == 0
    with h5py.File(work / "ilastik_img" / "20210305_NE_mockData1_001.h5", "r") as f:
        assert f["img"].dtype == np.uint16

def test_a_bad_steinbock_img_dtype_stops_fix_but_not_run(tmp_path, monkeypatch):
    # fix writes crops in $STEINBOCK_IMG_DTYPE, run writes no steinbock image
    work = copy_example(tmp_path / "data")
    assert steinpix(work, "prepare", "--cropsize", "50").returncode == 0
    before = snapshot(work)
    monkeypatch.setenv("STEINBOCK_IMG_DTYPE", "foo")
    result = steinpix(work, "fix", "--ilp", "pixel_classifier.ilp")
    assert result.returncode == 1
    assert error_lines(result) == [
        "Error: STEINBOCK_IMG_DTYPE=foo: not a numpy integer or floating-point type "
        "(steinbock's default: float32)"
    ]
    assert snapshot(work) == before
    result = steinpix(work, "run", "--ilp", "pretrained.ilp")
    assert result.returncode == 0, result.stderr
    assert len(list((work / "ilastik_probabilities").glob("*.tiff"))) == 3


def test_prepare_refuses_a_scale_no_memory_could_hold_before_allocating(tmp_path):
    # --scale 10**9 (a typo) had the upscaling's index arrays take all memory until the kernel
    # killed the process; the address space is capped here so that a regression fails quickly
    import resource

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))

    work = copy_example(tmp_path / "data")
    result = subprocess.run(
        [sys.executable, "-m", "steinpix", "classify", "ilastik", "prepare", "--scale",
         str(10**9), "--cropsize", "50"],
        cwd=work, capture_output=True, text=True, timeout=600, preexec_fn=cap_memory,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert (
        f"img/{IMAGE}: not enough memory to create the ilastik image (one channel upscaled "
        "1000000000x would take " in result.stderr
    )
    assert error_lines(result) == ["Error: 3 of 3 images could not be prepared (see above)"]
    assert not (work / "ilastik_img").exists()  # made, empty: removed

def test_prepare_names_the_output_its_folder_refuses(tmp_path):
    work = copy_example(tmp_path / "data")
    with unwritable(work / "ilastik_img"):
        result = steinpix(work, "prepare", "--cropsize", "50")
    assert result.returncode == 1
    line = "Error: ilastik_img/20210305_NE_mockData1_001.h5: cannot write it ("
    assert [e[: len(line)] for e in error_lines(result)] == [line]
    assert not (work / "pixel_classifier.ilp").exists()
    assert hidden_files(work) == []


def test_prepare_checks_the_project_folder_before_any_image(tmp_path):
    work = copy_example(tmp_path / "data")
    with unwritable(work / "out"):
        result = steinpix(work, "prepare", "--cropsize", "50", "-o", "out/p.ilp")
    assert result.returncode == 1
    assert error_lines(result)[0].startswith("Error: out/p.ilp: cannot write it (")
    assert not (work / "ilastik_img").exists() or not any((work / "ilastik_img").iterdir())
    assert hidden_files(work) == []


def test_prepare_refuses_two_images_that_share_an_output_name(tmp_path):
    # steinbock overwrites the first one's ilastik image and keeps both crops
    work = copy_example(tmp_path / "data")
    (work / "img" / "sub").mkdir()
    shutil.copy(work / "img" / IMAGE, work / "img" / "sub" / IMAGE)
    result = steinpix(work, "prepare", "--cropsize", "50")
    assert result.returncode == 1
    assert error_lines(result) == [
        f"Error: img/{IMAGE} and img/sub/{IMAGE} would both be written as "
        "ilastik_img/20210305_NE_mockData1_002.h5; rename one of them"
    ]
    assert not (work / "ilastik_img").exists()
    assert not (work / "pixel_classifier.ilp").exists()


def test_run_names_the_output_its_folder_refuses_not_the_image(tmp_path):
    work = copy_example(tmp_path / "data")
    assert steinpix(work, "prepare", "--cropsize", "50").returncode == 0
    before = snapshot(work)
    with unwritable(work / "ilastik_probabilities"):
        result = steinpix(work, "run", "--ilp", "pretrained.ilp", "--engine", "builtin")
    assert result.returncode == 1
    stem = "20210305_NE_mockData1_001"
    assert (
        f"ilastik_img/{stem}.h5: ilastik_probabilities/{stem}.tiff: cannot write it ("
        in result.stderr
    )
    assert snapshot(work) == before


def test_fix_names_the_crop_its_folder_refuses(imc_mock, tmp_path):
    work = tmp_path / "data"
    shutil.copytree(imc_mock / "pretrained" / "ilastik_crops", work / "ilastik_crops")
    shutil.copyfile(imc_mock / "pretrained" / "ilastik.ilp", work / "pixel_classifier.ilp")
    before = snapshot(work)
    with unwritable(work / "ilastik_crops"):
        result = steinpix(work, "fix", "--no-backup")
    assert result.returncode == 1
    first = sorted((work / "ilastik_crops").iterdir())[0].name
    [line] = error_lines(result)
    assert line.startswith(
        "Error: pixel_classifier.ilp: fix failed, nothing changed "
        f"(ilastik_crops/{first}: cannot write it ("
    )
    assert ".tmp" not in line
    assert snapshot(work) == before


def test_prepare_stops_at_every_ctrl_c(tmp_path):
    """Python drops a KeyboardInterrupt that lands in a weakref callback, which h5py runs after
    its calls: a Ctrl-C while an HDF5 file was written was lost (printed as 'Exception ignored'
    and the batch went on to exit 0) about every third time. Several tries, since where the
    signal lands is up to chance."""
    rng = np.random.default_rng(0)
    work = tmp_path / "data"
    (work / "img").mkdir(parents=True)
    shutil.copy(EXAMPLE / "panel.csv", work)
    for i in range(6):
        img = rng.random((5, 1000, 1000), dtype=np.float32)
        tifffile.imwrite(work / "img" / f"i{i}.tiff", img[None, None, :, :, :, None], imagej=True)
    first = work / "ilastik_img" / "i0.h5"
    for _ in range(8):
        for folder in ("ilastik_img", "ilastik_crops"):
            shutil.rmtree(work / folder, ignore_errors=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "steinpix", "classify", "ilastik", "prepare", "--scale", "3"],
            cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 120
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1, stderr
        assert stderr.rstrip().endswith("Aborted!")
        assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
        assert not (work / "pixel_classifier.ilp").exists()
        assert len(list((work / "ilastik_img").iterdir())) < 6
        assert hidden_files(work) == []
