"""Time the whole ``run`` command of several steinpix versions side by side, taking turns.

Example::

    python benchmarks/make_mosaics.py --count 4 --out benchmarks/work/img4
    git archive a57d535 src | tar -x -C /tmp/a57d535          # an older version's sources
    python benchmarks/bench_versions.py --repeat 5 --src /tmp/a57d535/src src \\
        --img benchmarks/work/img benchmarks/work/img4

For every image folder, round after round, each version runs
``steinpix classify ilastik run --engine builtin --threads 2 --overwrite -v WARNING`` in a fresh
process (``PYTHONPATH`` = its ``src``), so a change in the machine's speed hits all versions
alike. Printed per run and as minimum and median: wall time, CPU time (user + system of the
child, ``wait4``) and peak resident memory. Every version's first run fills its own numba cache
(the cache lives beside each source tree): it is a warm-up, not counted. The versions' outputs
are compared byte for byte.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ILP = REPO / "examples" / "imc-mock" / "pretrained.ilp"


def run(src: Path, ilp: Path, img: Path, out: Path, threads: int) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MiB) of one command."""
    env = dict(os.environ, PYTHONPATH=str(src))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installation has its bytecode caches
    cmd = [sys.executable, "-m", "steinpix", "classify", "ilastik", "run", "--engine", "builtin",
           "--ilp", str(ilp), "--img", str(img), "-o", str(out), "--threads", str(threads),
           "--overwrite", "-v", "WARNING"]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{src}: the command failed on {img} (status {status})")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, nargs="+", default=[REPO / "src"],
                        help="source folders holding a steinpix package")
    parser.add_argument("--img", type=Path, nargs="+", default=[REPO / "benchmarks" / "work"
                                                                / "img"])
    parser.add_argument("--ilp", type=Path, default=DEFAULT_ILP)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sources = [src.resolve() for src in args.src]
    with tempfile.TemporaryDirectory() as tmp:
        outs = {(i, j): Path(tmp) / f"img{i}-src{j}" for i in range(len(args.img))
                for j in range(len(sources))}
        for (i, j), out in outs.items():  # warm-up: numba's cache of every version
            run(sources[j], args.ilp, args.img[i], out, args.threads)
        for i, img in enumerate(args.img):
            names = sorted(p.name for p in outs[i, 0].iterdir())
            for j in range(1, len(sources)):
                same = filecmp.cmpfiles(outs[i, 0], outs[i, j], names, shallow=False)[0]
                print(f"{img}: {sources[j]} and {sources[0]} wrote "
                      f"{'the same files' if same == names else 'DIFFERENT files'}")
        results = {key: [] for key in outs}
        for r in range(args.repeat):
            for i, img in enumerate(args.img):
                for j, src in enumerate(sources):
                    wall, cpu, rss = run(src, args.ilp, img, outs[i, j], args.threads)
                    results[i, j].append((wall, cpu, rss))
                    print(f"round {r + 1} {img} {src}: wall {wall:.2f} s, CPU {cpu:.2f} s, "
                          f"peak RSS {rss:.0f} MiB", flush=True)
    for (i, j), values in results.items():
        walls, cpus = [v[0] for v in values], [v[1] for v in values]
        print(f"{args.img[i]} {sources[j]}: wall min {min(walls):.2f} s, median "
              f"{statistics.median(walls):.2f} s; CPU min {min(cpus):.2f} s, median "
              f"{statistics.median(cpus):.2f} s; peak RSS max {max(v[2] for v in values):.0f} MiB")
    print(f"load average {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
