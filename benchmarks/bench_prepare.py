"""``classify ilastik prepare`` side by side with steinbock: wall time and peak memory.

Example::

    python benchmarks/bench_prepare.py                       # steinpix only
    python benchmarks/bench_prepare.py --steinbock /work/venv-steinbock/bin/python

Builds (once) ``benchmarks/work/prepare/img``: 4 IMC-like images of 40 x 1000 x 1000 float32,
written as steinbock writes images (ImageJ hyperstack, one page per channel), and a 40-channel
``panel.csv`` whose ``ilastik`` column puts 12 channels into 3 groups (the rest unused). Then
runs ``classify ilastik prepare --seed 1`` (defaults otherwise: mean, --scale 2, --cropsize 512)
``--repeat`` times per tool, the tools taking turns so that load on the machine hits both alike,
each run a fresh process in a fresh output folder. Wall time includes interpreter start-up; peak
memory is the process's maximum resident set size (``wait4``). Finally the two tools' last
outputs are compared value by value.

steinbock 0.16.5 from PyPI (``pip install steinbock==0.16.5 readimc`` in its own venv; pass
that venv's Python as ``--steinbock``): its CLI imports napari at start-up, for ``steinbock
view`` only, and napari is not installed by ``pip install steinbock``. The benchmark starts
steinbock's own click group with an empty stand-in module for napari, so steinbock's time does
not include napari's import (installing ``steinbock[napari]`` would only make it slower).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_preview import peak_rss_mib  # benchmarks/ is on sys.path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "work" / "prepare"
N_IMAGES, N_CHANNELS, SIZE = 4, 40, 1000
# channel -> ilastik group: 2 nuclear, 6 membrane and 4 cytoplasm channels, 28 unused
GROUPS = {0: 1, 1: 1, **{c: 2 for c in range(2, 8)}, **{c: 3 for c in range(8, 12)}}


# steinbock's CLI with an empty stand-in for napari (imported by `steinbock view` only)
STEINBOCK_LAUNCHER = (
    "import sys, types; napari = sys.modules['napari'] = types.ModuleType('napari'); "
    "napari.Viewer = object; from steinbock._cli import steinbock_cmd_group; "
    "sys.argv[0] = 'steinbock'; steinbock_cmd_group()"
)


def build_set(work: Path) -> Path:
    """Write the images and panel (once); returns the folder holding ``img/`` and ``panel.csv``."""
    import tifffile

    img_dir = work / "img"
    if img_dir.is_dir() and len(list(img_dir.glob("*.tiff"))) == N_IMAGES:
        return work
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(1, N_IMAGES + 1):
        # IMC counts: mostly small, a few bright pixels; float32 like steinbock's images
        img = rng.gamma(0.6, 4.0, size=(N_CHANNELS, SIZE, SIZE)).astype(np.float32)
        img[rng.random(img.shape) < 0.3] = 0
        # steinbock's io.write_image: TZCYXS hyperstack, ImageJ metadata for float32
        tifffile.imwrite(
            img_dir / f"bench_{i:03d}.tiff",
            img[np.newaxis, np.newaxis, :, :, :, np.newaxis],
            imagej=True,
        )
    lines = ["channel,name,keep,ilastik,deepcell,cellpose"]
    for c in range(N_CHANNELS):
        lines.append(f"Ch{c:02d},Marker{c:02d},1,{GROUPS.get(c, '')},,")
    (work / "panel.csv").write_text("\n".join(lines) + "\n")
    return work


def run_once(cmd: list[str], cwd: Path) -> tuple[float, int, float]:
    """Run ``cmd`` in ``cwd`` as a fresh process; wall seconds, peak RSS in bytes and CPU
    seconds (user + system, all threads)."""
    for name in ("ilastik_img", "ilastik_crops", "pixel_classifier.ilp", ".steinbock"):
        path = cwd / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    err = child.stderr.read().decode(errors="replace")
    child.stderr.close()
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime  # ru_maxrss: KiB


def compare_outputs(a: Path, b: Path) -> dict:
    """Dataset by dataset: identical bytes, or how many values differ and by how many ulp."""
    import h5py

    result = {"files": 0, "identical": 0, "differing_values": 0, "max_ulp": 0}
    for sub in ("ilastik_img", "ilastik_crops"):
        names_a = sorted(p.name for p in (a / sub).glob("*.h5"))
        names_b = sorted(p.name for p in (b / sub).glob("*.h5"))
        if names_a != names_b:
            raise SystemExit(f"different {sub} files: {names_a} vs {names_b}")
        for name in names_a:
            with h5py.File(a / sub / name, "r") as fa, h5py.File(b / sub / name, "r") as fb:
                (da,), (db,) = (list(f.values()) for f in (fa, fb))
                va, vb = da[()], db[()]
            result["files"] += 1
            if va.dtype == vb.dtype and va.shape == vb.shape and va.tobytes() == vb.tobytes():
                result["identical"] += 1
                continue
            ia, ib = va.view(np.int32).astype(np.int64), vb.view(np.int32).astype(np.int64)
            result["differing_values"] += int(np.count_nonzero(ia != ib))
            result["max_ulp"] = max(result["max_ulp"], int(np.abs(ia - ib).max()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--steinbock", help="the Python of a venv with steinbock 0.16.5")
    parser.add_argument(
        "--steinpix", default=str(Path(sys.executable).with_name("steinpix")),
        help="steinpix executable (default: next to this Python)",
    )
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--json", type=Path, help="also write the summary to this file")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only:
        build_set(args.work)
        return

    # Linux hands a child the peak RSS of the process it was spawned from (exec keeps the old
    # memory's high-water mark in ru_maxrss, and subprocess uses vfork), so the set is built in
    # a process of its own: built here, its 650 MiB would be every tool's "peak".
    subprocess.run([sys.executable, __file__, "--build-only", "--work", str(args.work)], check=True)
    work = args.work
    floor = peak_rss_mib()
    args_common = ["classify", "ilastik", "prepare", "--seed", "1"]
    tools = {"steinpix": [args.steinpix, *args_common]}
    if args.steinbock:
        tools["steinbock"] = [args.steinbock, "-c", STEINBOCK_LAUNCHER, *args_common]
    dirs = {}
    for name in tools:
        dirs[name] = args.work / f"run-{name}"
        dirs[name].mkdir(exist_ok=True)
        for f in ("img", "panel.csv"):
            link = dirs[name] / f
            if not link.exists():
                link.symlink_to(work / f)
    results = {name: {"wall_s": [], "peak_mib": [], "cpu_s": []} for name in tools}
    for _ in range(args.repeat):
        for name, cmd in tools.items():
            wall, peak, cpu = run_once(cmd, dirs[name])
            results[name]["wall_s"].append(round(wall, 3))
            results[name]["peak_mib"].append(round(peak / 2**20, 1))
            results[name]["cpu_s"].append(round(cpu, 3))
            print(f"{name:9s} {wall:6.2f} s {peak / 2**20:7.1f} MiB {cpu:6.2f} s CPU", flush=True)
    summary = {
        name: {
            "median_wall_s": statistics.median(r["wall_s"]),
            "median_cpu_s": statistics.median(r["cpu_s"]),
            "median_peak_mib": statistics.median(r["peak_mib"]),
            "max_peak_mib": max(r["peak_mib"]),
            **r,
        }
        for name, r in results.items()
    }
    if "steinbock" in summary:
        ours, theirs = summary["steinpix"], summary["steinbock"]
        summary["ratio"] = {
            "wall": round(ours["median_wall_s"] / theirs["median_wall_s"], 3),
            "peak": round(ours["max_peak_mib"] / theirs["median_peak_mib"], 3),
            "cpu": round(ours["median_cpu_s"] / theirs["median_cpu_s"], 3),
        }
        summary["outputs"] = compare_outputs(dirs["steinpix"], dirs["steinbock"])
    summary["benchmark_process_peak_mib"] = round(floor, 1)  # a lower bound of every peak
    print(json.dumps(summary, indent=2))
    with open(os.devnull if args.json is None else args.json, "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
