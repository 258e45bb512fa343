"""Progress bars: drawn on a terminal, absent from logs that are not one."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import h5py
import numpy as np

from conftest import EXAMPLE, TEST_DATA

PREPARE = ["classify", "ilastik", "prepare", "--cropsize", "50", "--seed", "123"]


def run_on_pty(args: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str]:
    """Run steinpix with stderr on a pseudo-terminal; returns its exit code and what the
    terminal showed."""
    leader, follower = pty.openpty()
    # a terminal of 30 rows x 120 columns (a new pseudo-terminal has no size)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "steinpix", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=follower,
    )
    os.close(follower)
    shown = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the terminal closes when the process exits
                break
            if not data:
                break
            shown += data
        elif proc.poll() is not None:
            break
    os.close(leader)
    return proc.wait(timeout=10), shown.decode(errors="replace")


def test_prepare_and_run_show_bars_on_a_terminal(example_dir):
    code, shown = run_on_pty(PREPARE, example_dir)
    assert code == 0, shown
    assert "prepare: 100%" in shown and "3/3" in shown and "image/s" in shown
    # the log lines are still shown, above the bar
    assert "[3/3]" in shown
    code, shown = run_on_pty(["classify", "ilastik", "run", "--ilp", "pretrained.ilp"], example_dir)
    assert code == 0, shown
    assert "run: 100%" in shown and "3/3" in shown


def test_strip_bar_within_a_large_image(tmp_path):
    src = TEST_DATA / "reference" / "ilastik_img" / "20210305_NE_mockData1_001.h5"
    with h5py.File(src, "r") as f:
        big = np.tile(f["img"][()], (1, 6, 12))  # 720 x 1440: strips of 64 MiB (--mem 256)
    (tmp_path / "ilastik_img").mkdir()
    with h5py.File(tmp_path / "ilastik_img" / "big.h5", "w") as f:
        f["img"] = big
    shutil.copy(EXAMPLE / "pretrained.ilp", tmp_path / "pixel_classifier.ilp")
    code, shown = run_on_pty(
        ["classify", "ilastik", "run", "--mem", "256", "--threads", "1"], tmp_path
    )
    assert code == 0, shown
    assert "strips:" in shown and ("strip/s" in shown or "s/strip" in shown)


def test_no_bar_when_stderr_is_not_a_terminal(example_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "steinpix", *PREPARE],
        cwd=example_dir,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[3/3]" in proc.stderr
    assert "\r" not in proc.stderr and "%|" not in proc.stderr and "image/s" not in proc.stderr


def test_verbosity_warning_silences_bars(example_dir):
    code, shown = run_on_pty([*PREPARE, "-v", "WARNING"], example_dir)
    assert code == 0, shown
    assert shown.strip() == ""


def test_fix_shows_a_bar_over_the_crops(tmp_path):
    project_14 = TEST_DATA / "imcseg-ilastik-1.4.0"
    shutil.copyfile(project_14 / "TestData.ilp", tmp_path / "pixel_classifier.ilp")
    shutil.copytree(project_14 / "crops", tmp_path / "ilastik_crops", copy_function=shutil.copyfile)
    code, shown = run_on_pty(["classify", "ilastik", "fix", "--no-backup"], tmp_path)
    assert code == 0, shown
    assert "fix: 100%" in shown and "15/15" in shown and "crop/s" in shown
