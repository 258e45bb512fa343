"""Time the built-in engine end to end (process start, read, features, forest, TIFF write).

Example::

    python benchmarks/make_mosaics.py
    python benchmarks/bench_run.py                    # threads 1 and all, both mosaics
    python benchmarks/bench_run.py --command --repeat 5   # the steinpix command itself

Each configuration runs in a fresh Python process, like one ``steinpix classify ilastik run``:
the reported wall time includes interpreter start, imports and loading numba's cached
machine code; the peak RSS is the process's maximum resident set size. ``--command`` times
``steinpix classify ilastik run --engine builtin --overwrite`` as a user runs it. Outputs go to
``benchmarks/work/out``. Minimum and median are over ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numba

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "work"
DEFAULT_ILP = REPO / "examples" / "imc-mock" / "pretrained.ilp"


def worker(ilp: Path, images: list[Path], out_dir: Path, threads: int, profile: str) -> None:
    """Run inside the measured process: classify ``images``, print per-file times as JSON."""
    start = time.perf_counter()
    from steinpix import engine  # timed: imports and numba cache loading are part of a run

    engine.set_threads(threads)
    classifier, selection = engine.load_project(ilp)
    out_dir.mkdir(parents=True, exist_ok=True)
    times = {"setup_s": time.perf_counter() - start, "files": {}}
    for img in images:
        t = time.perf_counter()
        engine.predict_file(img, engine.output_path(img, out_dir), classifier, selection, profile)
        times["files"][img.name] = time.perf_counter() - t
    print(json.dumps(times))


def measure(ilp: Path, images: list[Path], out_dir: Path, threads: int, profile: str,
            command: bool = False) -> dict:
    """Run :func:`worker` (or the ``run`` command) in a child process; wall time and that
    child's peak RSS."""
    if command:
        if len({img.parent for img in images}) != 1:
            raise SystemExit("--command needs images in one folder")
        cmd = [sys.executable, "-m", "steinpix", "classify", "ilastik", "run", "--engine",
               "builtin", "--ilp", str(ilp), "--img", str(images[0].parent), "-o", str(out_dir),
               "--threads", str(threads), "--profile", profile, "--overwrite", "-v", "WARNING"]
    else:
        cmd = [sys.executable, __file__, "--worker", "--ilp", str(ilp), "--threads",
               str(threads), "--profile", profile, "--out", str(out_dir), *map(str, images)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    output = child.stdout.read().decode()
    child.stdout.close()
    if status != 0:
        raise SystemExit(f"worker failed (status {status}): {output}")
    result = {"setup_s": float("nan"), "files": {}} if command else json.loads(
        output.strip().splitlines()[-1])
    result.update(wall_s=wall, peak_rss_mib=usage.ru_maxrss / 1024, threads=threads)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", type=Path,
                        help="steinbock HDF5 images (default: benchmarks/work/img/*.h5)")
    parser.add_argument("--ilp", type=Path, default=DEFAULT_ILP)
    parser.add_argument("--threads", type=int, nargs="+",
                        default=sorted({1, numba.config.NUMBA_NUM_THREADS}))
    parser.add_argument("--profile", default="133", choices=["133", "14x"])
    parser.add_argument("--out", type=Path, default=WORK / "out")
    parser.add_argument("--repeat", type=int, default=1, help="runs per thread count")
    parser.add_argument("--command", action="store_true",
                        help="time the steinpix run command (images: one folder)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    images = args.images or sorted((WORK / "img").glob("*.h5"))
    if not images:
        raise SystemExit("no images: run benchmarks/make_mosaics.py first")
    if args.worker:
        worker(args.ilp, images, args.out, args.threads[0], args.profile)
        return
    print(f"{len(images)} images, project {args.ilp.name}, profile {args.profile}"
          + (", whole command" if args.command else ""))
    for threads in args.threads:
        walls, rss = [], []
        for _ in range(args.repeat):
            r = measure(args.ilp, images, args.out, threads, args.profile, args.command)
            walls.append(r["wall_s"])
            rss.append(r["peak_rss_mib"])
            per_file = ", ".join(f"{name} {t:.2f} s" for name, t in r["files"].items())
            detail = "" if args.command else f" (setup {r['setup_s']:.2f} s; {per_file})"
            print(f"threads {threads}: wall {r['wall_s']:.2f} s{detail}, "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
        if args.repeat > 1:
            print(f"threads {threads}: wall min {min(walls):.2f} s, median "
                  f"{statistics.median(walls):.2f} s; peak RSS max {max(rss):.0f} MiB")
    print(f"load average {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")

if __name__ == "__main__":
    main()
