"""Outputs appear complete or not at all, whatever happens while they are written."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import tifffile

from steinpix.atomic import atomic_output, remove_stale_temporaries, temporary_sibling

from conftest import EXAMPLE, TEST_DATA


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "out.tiff"
    target.write_bytes(b"old")
    with pytest.raises(error), atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise error()
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path):
    stale = tmp_path / f".a.tiff.{dead_pid()}.tmp"
    stale.write_bytes(b"half")
    ours = temporary_sibling(tmp_path / "b.tiff")  # this process is alive
    ours.write_bytes(b"in progress")
    other = tmp_path / ".notes.txt"
    other.write_text("user file")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ours.name, other.name])


def test_interrupted_run_leaves_only_complete_outputs_and_a_rerun_finishes(tmp_path):
    # many small images, and the interrupt sent as soon as the first output is reported on
    # stdout, so that the run is still busy when it is interrupted however fast the engine or
    # however loaded the machine is
    n = 24
    src = TEST_DATA / "reference" / "ilastik_img" / "20210305_NE_mockData1_001.h5"
    with h5py.File(src, "r") as f:
        tile = np.tile(f["img"][()], (1, 2, 2))
    (tmp_path / "ilastik_img").mkdir()
    for i in range(n):
        with h5py.File(tmp_path / "ilastik_img" / f"img{i:02d}.h5", "w") as f:
            f["img"] = tile
    shutil.copy(EXAMPLE / "pretrained.ilp", tmp_path / "pixel_classifier.ilp")
    out = tmp_path / "ilastik_probabilities"
    out.mkdir()
    (out / f".img{n - 1:02d}.tiff.{dead_pid()}.tmp").write_bytes(b"left by a killed run")
    cmd = [sys.executable, "-m", "steinpix", "classify", "ilastik", "run", "--threads", "1"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    first = proc.stdout.readline()  # the first finished output's path
    assert first.strip().endswith(".tiff"), proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    finished = sorted(out.glob("*.tiff"))
    assert 1 <= len(finished) < n, "the run was not interrupted in the middle"
    assert proc.returncode != 0
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    for path in finished:
        assert tifffile.imread(path).shape == tile.shape[1:] + (3,)
    mtimes = {p.name: p.stat().st_mtime_ns for p in finished}
    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert len(list(out.glob("*.tiff"))) == n
    assert {p.name: p.stat().st_mtime_ns for p in finished} == mtimes
    assert f"{len(finished)} of {n} outputs are finished already" in rerun.stderr
    # identical images give identical outputs, whichever run wrote them
    reference = tifffile.imread(finished[0])
    for path in out.glob("*.tiff"):
        np.testing.assert_array_equal(tifffile.imread(path), reference)
