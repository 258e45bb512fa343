"""examples/workflows/Snakefile: prepare once, one `run` job per image, collect (real Snakemake)."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from steinpix._cli.main import main

from conftest import REPO

SNAKEFILE = REPO / "examples" / "workflows" / "Snakefile"


@pytest.mark.skipif(
    importlib.util.find_spec("snakemake") is None,
    reason="Snakemake is not installed (pip install snakemake; it needs Python >= 3.11)",
)
def test_snakefile_runs_one_job_per_image(example_dir, monkeypatch):
    env = dict(os.environ)  # the jobs call `steinpix`: the one installed with this Python
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    args = ["--cores", "2", "--snakefile", str(SNAKEFILE), "--directory", str(example_dir)]
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", *args, "--config", "ilp=pretrained.ilp"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    stems = sorted(p.stem for p in (example_dir / "img").glob("*.tiff"))
    assert log.count("rule run:") == len(stems) and log.count("rule prepare:") == 1

    # the same files as one `run` over the whole folder
    monkeypatch.chdir(example_dir)
    whole = CliRunner().invoke(
        main,
        ["classify", "ilastik", "run", "--ilp", "pretrained.ilp"]
        + ["-o", "whole", "-v", "WARNING"],
    )
    assert whole.exit_code == 0, whole.output
    jobs = example_dir / "ilastik_probabilities"
    assert sorted(p.name for p in jobs.iterdir()) == [f"{s}.tiff" for s in stems]
    for name in (p.name for p in jobs.iterdir()):
        assert (jobs / name).read_bytes() == (example_dir / "whole" / name).read_bytes()

    with open(example_dir / "ilastik_probabilities.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == stems
    for row in rows:  # three classes whose mean probabilities add up to one
        total = sum(float(row[f"class_{c}"]) for c in (1, 2, 3))
        assert abs(total - 1) < 0.01
