"""Damaged inputs and unwritable outputs as a user meets them: the ``steinpix`` command in a
subprocess on copies of the example data, one line naming the right file, nothing half-done."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py

from conftest import copy_example

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
