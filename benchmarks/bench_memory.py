"""What fresh memory costs the engine: system time per image, and the machine's first touch.

Example::

    python benchmarks/make_mosaics.py --count 4 --out benchmarks/work/img4
    git archive 729ce05 src | tar -x -C /tmp/729ce05         # an older version's sources
    python benchmarks/bench_memory.py --src /tmp/729ce05/src src --img benchmarks/work/img4

Two measurements:

- *first touch*: a fresh process writes to 256 MiB it has just allocated, once right after
  the previous process freed its memory and once after ``--pause`` seconds of idling. On a
  virtual machine whose host takes back the guest's free memory (e.g. virtio-balloon free page
  reporting, as on this project's machine kind), the second costs a host fault per page;
  elsewhere both cost only the kernel's zeroing.
- *per image*: for every ``--src`` source tree in turns (``--repeat`` rounds), a fresh process
  (``PYTHONPATH`` = that tree) runs :func:`steinpix.engine.predict_file` on each image of the
  folder one after the other, after ``--pause`` seconds of idling, and prints each image's wall
  time, user and system CPU time and minor page faults (``getrusage`` of the process). The
  first image pays for every buffer the engine touches for the first time; the following ones
  show what a batch pays per image.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ILP = REPO / "examples" / "imc-mock" / "pretrained.ilp"

TOUCH = """
import time, numpy as np
start = time.perf_counter()
a = np.empty(64 * 2**20, np.float32)
a.fill(1)
print(f"{time.perf_counter() - start:.3f}")
"""

PER_IMAGE = """
import os, resource, sys, time
from pathlib import Path
from steinpix import batch, engine
ilp, out, threads, *images = sys.argv[1:]
_, profile = batch.choose_engine("builtin", ilp, None, "auto")
classifier, selection = engine.load_project(ilp)
engine.set_threads(int(threads))
def usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt
for image in images:
    u0, s0, f0 = usage()
    start = time.perf_counter()
    engine.predict_file(image, Path(out) / (Path(image).stem + ".tiff"), classifier, selection,
                        profile)
    wall = time.perf_counter() - start
    u1, s1, f1 = usage()
    print(f"{Path(image).name} {wall:.3f} {u1 - u0:.3f} {s1 - s0:.3f} {f1 - f0}")
"""


def first_touch(pause: float) -> tuple[float, float]:
    """Seconds to write 256 MiB in a fresh process: right after the last one, and after a pause."""
    python = [sys.executable, "-c", TOUCH]
    subprocess.run(python, check=True, capture_output=True)  # leaves freed pages behind
    hot = float(subprocess.run(python, check=True, capture_output=True, text=True).stdout)
    time.sleep(pause)
    cold = float(subprocess.run(python, check=True, capture_output=True, text=True).stdout)
    return hot, cold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, nargs="+", default=[REPO / "src"])
    parser.add_argument("--img", type=Path, default=REPO / "benchmarks" / "work" / "img")
    parser.add_argument("--ilp", type=Path, default=DEFAULT_ILP)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pause", type=float, default=4.0,
                        help="seconds of idling before each fresh process")
    args = parser.parse_args()
    images = sorted(str(p) for p in args.img.glob("*.h5"))
    if not images:
        raise SystemExit(f"{args.img}: no *.h5 images (run make_mosaics.py)")
    load = os.getloadavg()[0]
    print(f"{len(images)} images in {args.img}, {args.threads} threads, load average {load:.2f}")
    for _ in range(args.repeat):
        hot, cold = first_touch(args.pause)
        print(f"first touch of 256 MiB: {hot:.3f} s right after another process, "
              f"{cold:.3f} s after {args.pause:g} s idle")
    rows: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as out:
        for i in range(args.repeat):
            for src in args.src:
                time.sleep(args.pause)
                env = dict(os.environ, PYTHONPATH=str(src))
                env.pop("PYTHONDONTWRITEBYTECODE", None)
                done = subprocess.run([sys.executable, "-c", PER_IMAGE, str(args.ilp), out,
                                       str(args.threads), *images], env=env, check=True,
                                      capture_output=True, text=True)
                for line in done.stdout.splitlines():
                    name, wall, user, system, faults = line.split()
                    print(f"round {i + 1} {src} {name}: wall {wall} s, user {user} s, "
                          f"system {system} s, {faults} minor faults")
                    rows.setdefault((str(src), name), []).append(
                        (float(wall), float(user), float(system)))
    print("minimum and median (wall / user / system):")
    for (src, name), values in rows.items():
        parts = []
        for k, label in enumerate(("wall", "user", "system")):
            column = [v[k] for v in values]
            parts.append(f"{label} {min(column):.2f} / {statistics.median(column):.2f}")
        print(f"  {src} {name}: " + ", ".join(parts))


if __name__ == "__main__":
    main()
