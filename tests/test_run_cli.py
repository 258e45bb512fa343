"""``classify ilastik run`` with the built-in engine, end to end through the CLI."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from steinpix._cli import utils
from steinpix._cli.main import main

from conftest import EXAMPLE, TEST_DATA

REF = TEST_DATA / "reference"


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    shutil.copytree(REF / "ilastik_img", tmp_path / "ilastik_img")
    shutil.copy(EXAMPLE / "pretrained.ilp", tmp_path / "pixel_classifier.ilp")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STEINPIX_ILASTIK", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no run_ilastik.sh to be found
    return tmp_path


def run(*args: str):
    return CliRunner().invoke(main, ["classify", "ilastik", "run", *args], catch_exceptions=False)


def outputs(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / "ilastik_probabilities").iterdir())


def test_default_run_is_bit_identical_to_ilastik(workdir):
    result = run()
    assert result.exit_code == 0, result.output
    assert "Engine: built-in" in result.stderr
    assert outputs(workdir) == sorted(p.name for p in (REF / "ilastik_probabilities").iterdir())
    for out in (workdir / "ilastik_probabilities").iterdir():
        ours, theirs = (
            tifffile.imread(out),
            tifffile.imread(REF / "ilastik_probabilities" / out.name),
        )
        assert ours.dtype == np.uint16 and ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs)
    assert result.stdout.splitlines() == [
        f"ilastik_probabilities/{name}" for name in outputs(workdir)
    ]
    assert "[3/3]" in result.stderr


@pytest.mark.parametrize("project", ["pixel_classifier.ilp", "broken.ilp"])
def test_the_garbage_collector_is_back_after_the_start_up(workdir, project):
    # run pauses the collector while it starts; called from Python (not as the executable),
    # it neither leaves it paused nor freezes the caller's objects, also after an error
    (workdir / "broken.ilp").write_bytes(b"not HDF5")
    frozen = gc.get_freeze_count()
    result = run("--ilp", project)
    assert result.exit_code == (2 if project == "broken.ilp" else 0), result.output
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_rerun_skips_finished_outputs_and_overwrite_recomputes(workdir):
    assert run().exit_code == 0
    out = workdir / "ilastik_probabilities" / "20210305_NE_mockData1_002.tiff"
    before = {p.name: p.stat().st_mtime_ns for p in out.parent.iterdir()}
    out.unlink()  # as if the run had been killed before this image
    result = run()
    assert result.exit_code == 0, result.output
    assert "2 of 3 outputs are finished already" in result.stderr
    assert result.stdout.splitlines() == [f"ilastik_probabilities/{out.name}"]
    after = {p.name: p.stat().st_mtime_ns for p in out.parent.iterdir()}
    assert {k: v for k, v in after.items() if k != out.name} == {
        k: v for k, v in before.items() if k != out.name
    }
    # an image newer than its output is recomputed
    img = workdir / "ilastik_img" / "20210305_NE_mockData1_001.h5"
    os.utime(img, ns=(after["20210305_NE_mockData1_001.tiff"] + 10**9,) * 2)
    assert run().stdout.splitlines() == ["ilastik_probabilities/20210305_NE_mockData1_001.tiff"]
    assert len(run("--overwrite").stdout.splitlines()) == 3


def test_bad_image_is_reported_and_others_still_run(workdir):
    bad = workdir / "ilastik_img" / "20210305_NE_mockData1_002.h5"
    with h5py.File(bad, "w") as f:
        f["other"] = np.zeros((4, 60, 60), np.float32)
    result = run()
    assert result.exit_code == 1
    assert f"ilastik_img/{bad.name}: no 'img' dataset" in result.stderr
    assert "Traceback" not in result.output
    assert outputs(workdir) == [
        "20210305_NE_mockData1_001.tiff",
        "20210305_NE_mockData1_003.tiff",
    ]


def test_image_with_other_channel_count_is_reported(workdir):
    img = workdir / "ilastik_img" / "20210305_NE_mockData1_001.h5"
    with h5py.File(img, "a") as f:
        data = f["img"][()]
        del f["img"]
        f["img"] = data[:3]
    result = run()
    assert result.exit_code == 1
    line = next(li for li in result.stderr.splitlines() if img.name in li and "ERROR" in li)
    assert "3" in line and "4" in line and "channel" in line


def test_project_without_forests(workdir):
    # a fresh project from prepare has no trained classifier
    shutil.copytree(EXAMPLE / "img", workdir / "img")
    shutil.copy(EXAMPLE / "panel.csv", workdir)
    prep = CliRunner().invoke(
        main, ["classify", "ilastik", "prepare", "--cropsize", "50", "-o", "fresh.ilp"]
    )
    assert prep.exit_code == 0, prep.output
    result = run("--ilp", "fresh.ilp", "--engine", "builtin")
    assert result.exit_code != 0
    assert "fresh.ilp" in result.stderr and "--engine ilastik" in result.stderr
    assert "Traceback" not in result.output
    result = run("--ilp", "fresh.ilp")  # auto: no forests and no ilastik either
    assert result.exit_code == 2
    assert "no ilastik was found" in result.stderr


@pytest.mark.parametrize("engine", ["auto", "builtin"])
def test_a_file_that_is_no_project_is_named_as_such(workdir, engine):
    (workdir / "notes.ilp").write_text("not HDF5")
    result = run("--ilp", "notes.ilp", "--engine", engine)
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: notes.ilp: not an ilastik project (cannot open as HDF5")
    assert "ilastik was found" not in result.stderr and "Traceback" not in result.output
    image = "ilastik_img/20210305_NE_mockData1_001.h5"  # an image given as the project
    result = run("--ilp", image, "--engine", engine)
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {image}: not an ilastik pixel-classification project (no "
        "'PixelClassification' group)\n"
    )
    assert not (workdir / "ilastik_probabilities").exists()


def test_empty_image_folder(workdir):
    (workdir / "empty").mkdir()
    result = run("--img", "empty")
    assert result.exit_code == 1 and "empty: no *.h5 images found" in result.stderr


def test_threads_and_mem_options(workdir):
    result = run("--threads", "1", "--mem", "300", "-o", "one")
    assert result.exit_code == 0, result.output
    for name in sorted(p.name for p in (workdir / "one").iterdir()):
        np.testing.assert_array_equal(
            tifffile.imread(workdir / "one" / name),
            tifffile.imread(REF / "ilastik_probabilities" / name),
        )


def test_console_script_runs_the_builtin_engine(workdir):
    # the installed entry point in a real process, as users call it
    result = subprocess.run(
        [sys.executable, "-m", "steinpix", "classify", "ilastik", "run", "-v", "WARNING"],
        capture_output=True,
        text=True,
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3


def test_console_script_failures_keep_their_exit_status_and_message(workdir):
    # the process ends without Python's teardown (_cli.utils.exit_quickly): the status, the
    # one-line error and the images done before the failure must all still come out
    (workdir / "ilastik_img" / "broken.h5").write_bytes(b"not HDF5")
    result = subprocess.run(
        [sys.executable, "-m", "steinpix", "classify", "ilastik", "run", "-v", "WARNING"],
        capture_output=True,
        text=True,
        cwd=workdir,
    )
    assert result.returncode == 1
    assert len(result.stdout.splitlines()) == 3
    assert result.stderr.splitlines()[-1] == "Error: 1 of 4 images failed: ilastik_img/broken.h5"


QUICK_EXIT = """
import atexit, sys, threading, time
from steinpix._cli import utils
atexit.register(lambda: print("atexit ran", flush=True))
utils.allow_quick_exit()
if sys.argv[1] == "thread":  # a live non-daemon thread: Python's own exit waits for it
    threading.Thread(target=time.sleep, args=(0.5,)).start()
print("unflushed", end="")
utils.exit_quickly(int(sys.argv[2]))
print(" exited normally", end="")
sys.exit(int(sys.argv[2]))
"""


@pytest.mark.parametrize("thread, status", [("", 0), ("", 3), ("thread", 3)])
def test_exit_quickly_runs_atexit_flushes_and_keeps_the_status(thread, status):
    result = subprocess.run([sys.executable, "-c", QUICK_EXIT, thread, str(status)],
                            capture_output=True, text=True)
    assert result.returncode == status
    normal = " exited normally" if thread else ""
    assert result.stdout == f"unflushed{normal}atexit ran\n"


FREED_MEMORY = """
import resource, sys
import numpy as np
from steinpix._cli import utils
if sys.argv[1] == "keep":
    assert utils.set_malloc_thresholds()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # two strips' worth of buffers, freed and taken again
    a = np.ones(2 * 1024**2, np.float32)
    b = np.ones(2 * 1024**2, np.float32)
    del a, b
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(script: str, mode: str) -> int:
    """Minor page faults of ``script``'s measured part (it prints them), in a fresh process."""
    result = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                            check=True)
    return int(result.stdout)


@pytest.mark.skipif(not utils.on_glibc(), reason="the thresholds are glibc's malloc's")
def test_freed_memory_is_reused_not_faulted_in_again():
    faults = {mode: page_faults(FREED_MEMORY, mode) for mode in ("default", "keep")}
    # 16 MiB are 4096 pages: with glibc's defaults the 20 rounds touch fresh pages each time
    assert faults["keep"] < 2 * 4096
    assert faults["default"] > 4 * faults["keep"]
    # in-process callers (here: pytest) keep their own malloc settings
    assert utils.keep_freed_memory() is False


HUGE_PAGES = """
import resource, sys
import numpy as np
from steinpix._cli import utils
assert utils.set_numpy_huge_pages(sys.argv[1] == "huge")
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(16 * 1024**2, np.float32)  # 64 MiB
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def transparent_huge_pages() -> str:
    try:
        setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return setting.split("[", 1)[-1].split("]", 1)[0]


@pytest.mark.skipif(transparent_huge_pages() != "madvise",
                    reason="numpy's advice matters only where huge pages are on madvise")
def test_numpy_huge_pages_can_be_turned_off():
    faults = {mode: page_faults(HUGE_PAGES, mode) for mode in ("huge", "small")}
    # 64 MiB: 16,384 pages of 4 KiB, or a few dozen of 2 MiB
    assert faults["small"] > 16 * 1024 * 0.9
    assert faults["huge"] < faults["small"] / 4
    assert utils.numpy_without_huge_pages() is False  # in-process callers keep numpy's


def test_uncertainty_and_segmentation_in_the_same_run(workdir):
    result = run("--uncertainty", "unc", "--segmentation", "seg")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (REF / "ilastik_probabilities").iterdir())
    assert result.stdout.splitlines() == [
        f"{folder}/{name}" for name in names for folder in ("ilastik_probabilities", "unc", "seg")
    ]
    for name in names:
        probs = tifffile.imread(workdir / "ilastik_probabilities" / name)
        np.testing.assert_array_equal(probs, tifffile.imread(REF / "ilastik_probabilities" / name))
        unc = tifffile.imread(workdir / "unc" / name)
        seg = tifffile.imread(workdir / "seg" / name)
        assert unc.dtype == np.uint16 and seg.dtype == np.uint8
        assert unc.shape == seg.shape == probs.shape[:2]
        # the most probable class of ilastik's own probabilities, the first one on ties
        np.testing.assert_array_equal(seg, np.argmax(probs, axis=-1) + 1)
        ranked = np.sort(probs, axis=-1).astype(np.int64)
        assert np.abs(unc - (65535 - (ranked[..., -1] - ranked[..., -2]))).max() <= 2


def test_rerun_rule_covers_every_requested_output(workdir):
    args = ("--uncertainty", "unc", "--segmentation", "seg")
    assert run(*args).exit_code == 0
    name = "20210305_NE_mockData1_003.tiff"
    stale = workdir / "unc" / name
    img = workdir / "ilastik_img" / name.replace(".tiff", ".h5")
    os.utime(stale, ns=(img.stat().st_mtime_ns - 10**9,) * 2)  # older than its image
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"ilastik_probabilities/{name}", f"unc/{name}", f"seg/{name}"
    ]
    (workdir / "seg" / name).unlink()
    assert run("--uncertainty", "unc").stdout == ""  # the segmentation is not asked for
    assert len(run(*args).stdout.splitlines()) == 3


def test_export_folder_must_not_be_the_probabilities_folder(workdir):
    result = run("--uncertainty", "ilastik_probabilities")
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "own folder" in result.output
    assert not (workdir / "ilastik_probabilities").exists()


def test_image_files_as_arguments(workdir):
    names = ["20210305_NE_mockData1_001", "20210305_NE_mockData1_003"]
    result = run(*(f"ilastik_img/{n}.h5" for n in names))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"ilastik_probabilities/{n}.tiff" for n in names]
    assert outputs(workdir) == [f"{n}.tiff" for n in names]
    for name in outputs(workdir):
        np.testing.assert_array_equal(
            tifffile.imread(workdir / "ilastik_probabilities" / name),
            tifffile.imread(REF / "ilastik_probabilities" / name),
        )
    # a file elsewhere, with no ilastik_img folder where steinpix runs
    shutil.move(workdir / "ilastik_img", workdir / "elsewhere")
    result = run("elsewhere/20210305_NE_mockData1_002.h5", "-o", "out")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["out/20210305_NE_mockData1_002.tiff"]


def test_image_files_and_img_folder_together_is_an_error(workdir):
    result = run("ilastik_img/20210305_NE_mockData1_001.h5", "--img", "ilastik_img")
    assert result.exit_code == 2
    assert result.output == "Error: give image files or --img ilastik_img, not both\n"
    assert not (workdir / "ilastik_probabilities").exists()


def test_missing_default_image_folder(workdir):
    shutil.rmtree(workdir / "ilastik_img")
    result = run()
    assert result.exit_code == 2
    assert "Invalid value for '--img': Directory 'ilastik_img' does not exist." in result.output
    result = run("missing.h5")
    assert result.exit_code == 2 and "'missing.h5' does not exist" in result.output


def test_two_images_with_one_name_are_an_error(workdir):
    (workdir / "other").mkdir()
    shutil.copy(workdir / "ilastik_img" / "20210305_NE_mockData1_001.h5", workdir / "other")
    result = run("ilastik_img/20210305_NE_mockData1_001.h5", "other/20210305_NE_mockData1_001.h5")
    assert result.exit_code == 1
    assert "would both be written as 20210305_NE_mockData1_001.tiff" in result.output
    assert not (workdir / "ilastik_probabilities").exists()  # made, empty: removed


IMPORT_NUMBA = """
import os, sys, threading
from steinpix._cli.run import import_numba
import_numba()
import numba
left_out = [name for name in ("scipy", "yaml") if name in sys.modules]
import scipy, yaml  # both still import afterwards
assert "OPENBLAS_NUM_THREADS" not in os.environ
# importlib.metadata is loaded when first used, not by numba's import
assert "email.message" not in sys.modules, "importlib.metadata was run"
from importlib import metadata
assert metadata.version("numba") == numba.__version__ and "email.message" in sys.modules
print(" ".join(left_out) or "-", numba.config.BOUNDSCHECK, len(os.listdir("/proc/self/task")))
"""


def test_numba_is_imported_without_scipy_and_yaml_unless_a_numba_config_needs_it(tmp_path):
    """Nor importlib.metadata, until something uses it."""
    pytest.importorskip("scipy")
    pytest.importorskip("yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    run_it = [sys.executable, "-c", IMPORT_NUMBA]
    env.pop("OPENBLAS_NUM_THREADS", None)
    out = subprocess.run(run_it, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    # no OpenBLAS threads were started (numpy's import would start one per further core)
    assert out.stdout.split() == ["-", "None", "1"]
    (tmp_path / ".numba_config.yaml").write_text("boundscheck: 1\n")  # numba reads it with yaml
    out = subprocess.run(run_it, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == ["yaml", "1"]
