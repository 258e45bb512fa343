"""The code base stays ruff clean (the project's lint settings are in pyproject.toml)."""

import shutil
import subprocess
import sys

import pytest

from conftest import REPO


def test_ruff_clean():
    if shutil.which("ruff") is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    result = subprocess.run(
        ["ruff", "check", "src", "tests", "benchmarks"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_python_m_steinpix_version():
    result = subprocess.run(
        [sys.executable, "-m", "steinpix", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert result.stdout.startswith("steinpix, version ")
