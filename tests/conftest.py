"""Shared test fixtures: in-repo data, and the shared IMC data set when it is present."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

# the Docker tests' daemon and images are prepared while the other tests run
from docker_session import pytest_collection_modifyitems, pytest_sessionfinish  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "imc-mock"
TEST_DATA = REPO / "tests" / "data"
# A shell without job control starts background commands with SIGINT ignored, and an ignored
# signal stays ignored in every child: the Ctrl-C tests' subprocesses would then never see the
# SIGINT they are sent. Catching it here gives the children the default, as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

SHARED = Path(os.environ.get("STEINPIX_SHARED", REPO.parent / "shared"))
IMC_MOCK = SHARED / "data" / "imc-mock"


@pytest.fixture
def imc_mock() -> Path:
    """The shared IMC mock data set (read-only); skips when it is not beside the repository."""
    if not IMC_MOCK.is_dir():
        pytest.skip(f"shared IMC mock data set not found at {IMC_MOCK} (only beside the repo)")
    return IMC_MOCK


# What examples/imc-mock holds in git. The README's main job writes its outputs beside them
# (ilastik_img/, ilastik_crops/, ilastik_probabilities/, pixel_classifier.ilp); copies for tests
# leave those out, or a test would start from an earlier run's results.
EXAMPLE_INPUTS = ("README.md", "img", "panel.csv", "pretrained.ilp")


def copy_example(dst: Path) -> Path:
    """Copy the inputs of examples/imc-mock (3 images, panel, pretrained project) to ``dst``."""
    dst.mkdir(parents=True)
    for name in EXAMPLE_INPUTS:
        if (EXAMPLE / name).is_dir():
            shutil.copytree(EXAMPLE / name, dst / name)
        else:
            shutil.copy2(EXAMPLE / name, dst / name)
    return dst


@pytest.fixture
def example_dir(tmp_path: Path) -> Path:
    """A writable copy of examples/imc-mock's inputs."""
    return copy_example(tmp_path / "imc-mock")
