"""Rebuild the preview screenshots in docs/ from the example data.

Example (from the repository root, with steinpix installed and Chromium on PATH)::

    python docs/make_screenshot.py            # docs/preview.png, docs/preview-crops.png

Runs the README's walkthrough on a copy of ``examples/imc-mock`` in a temporary folder
(``prepare --cropsize 50 --seed 123``, ``run --ilp pretrained.ilp``, with ``--uncertainty``
when ``run`` offers it), then ``preview`` and ``preview --crops``, and saves each page as a
full-page screenshot from headless Chromium (driven as in the browser test,
``tests/chromium.py``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from chromium import Chromium, find_chromium  # noqa: E402

WIDTH = 1060


def steinpix(cwd: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "steinpix", "classify", "ilastik", *args, "-v", "WARNING"],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        sys.exit(f"steinpix {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    binary = find_chromium()
    if binary is None:
        sys.exit("no Chromium found (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="steinpix-screenshot-") as tmp:
        work = Path(tmp) / "imc-mock"
        shutil.copytree(REPO / "examples" / "imc-mock", work)
        steinpix(work, "prepare", "--cropsize", "50", "--seed", "123")
        run_args = ["run", "--ilp", "pretrained.ilp"]
        if "--uncertainty" in steinpix(work, "run", "--help"):
            run_args += ["--uncertainty", "ilastik_uncertainty"]
        steinpix(work, *run_args)
        steinpix(work, "preview", "--crops")
        steinpix(work, "preview", "--ilp", "pretrained.ilp")
        with Chromium(binary) as browser:
            for page, png in (("index.html", "preview.png"), ("crops.html", "preview-crops.png")):
                browser.load(work / "ilastik_preview" / page, width=WIDTH)
                browser.screenshot(args.out / png)
                print(args.out / png)


if __name__ == "__main__":
    main()
