"""Shared test fixtures: in-repo data, and the shared IMC data set when it is present."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# the Docker tests' daemon and images are prepared while the other tests run
from docker_session import pytest_collection_modifyitems, pytest_sessionfinish  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "imc-mock"
TEST_DATA = REPO / "tests" / "data"
SHARED = Path(os.environ.get("STEINPIX_SHARED", REPO.parent / "shared"))
IMC_MOCK = SHARED / "data" / "imc-mock"


@pytest.fixture
def imc_mock() -> Path:
    """The shared IMC mock data set (read-only); skips when it is not beside the repository."""
    if not IMC_MOCK.is_dir():
        pytest.skip(f"shared IMC mock data set not found at {IMC_MOCK} (only beside the repo)")
    return IMC_MOCK


@pytest.fixture
def example_dir(tmp_path: Path) -> Path:
    """A writable copy of examples/imc-mock (3 images, panel, pretrained project)."""
    dst = tmp_path / "imc-mock"
    shutil.copytree(EXAMPLE, dst)
    return dst
