"""Time the fixed cost of ``steinpix classify ilastik run --engine builtin``: everything a
command does before the first image's compute starts.

Example::

    python benchmarks/bench_startup.py --repeat 7
    python benchmarks/bench_startup.py --repeat 7 --compare /tmp/old/src  # and another version

Fresh processes, taking turns (A/B/C/D, A/B/C/D, ...), minimum and median over ``--repeat``:

- ``python -c pass``: the interpreter alone (the floor);
- ``steinpix --help``;
- with ``--compare SRC``, ``steinpix --help``, ``run`` and the phases also for the steinpix
  package in ``SRC`` (e.g. ``git archive <commit> src | tar -x -C /tmp/old``), in turns;
- ``run``: the whole command (``--engine builtin --overwrite -v WARNING``) on a 120 x 120
  image of the test data, whose compute and TIFF write take a few milliseconds (the ``compute``
  phase below): its wall time is the fixed cost of a command plus that;
- ``phases``: one process doing what the command does, step by step, with a clock after each:
  ``cli imports`` (click and the command modules), ``engine imports`` (numpy, h5py, numba
  as ``run`` imports it, tifffile, the engine's modules; since ``collector_paused``, with
  Python's garbage collector paused as ``run`` pauses it), ``numba init`` (what ``run`` calls
  before the batch), ``project`` (``batch.choose_engine``: opening, checking and loading the
  project), ``kernels`` (the first image minus the second: loading numba's cached machine
  code) and
  ``compute`` (the second image: compute and TIFF write). ``start`` is the time from the
  process's start (taken by this script just before it spawns it) to the probe's first line.

The machine must be warm (numba's cache filled): a first run of the command fills it. Python
writes bytecode caches as a normal installation has them (``PYTHONDONTWRITEBYTECODE`` is
dropped for the children). CPU time is user + system of the child (``wait4``).
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

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "work" / "startup"
DEFAULT_ILP = REPO / "examples" / "imc-mock" / "pretrained.ilp"
DEFAULT_IMAGE = (REPO / "tests" / "data" / "reference" / "ilastik_img"
                 / "20210305_NE_mockData1_001.h5")
PHASES = ("start", "cli imports", "engine imports", "numba init", "project", "kernels", "compute")


# Runs in the measured process, with nothing imported before its first line but `time` and
# `sys`: the command's steps, a clock reading after each. argv: spawn time, project, image, out.
PROBE = """
import time
first = time.time()
import sys
marks = {"start": first - float(sys.argv[1])}
last = time.perf_counter()
def mark(name):
    global last
    now = time.perf_counter()
    marks[name] = now - last
    last = now
import steinpix._cli.main
import steinpix._cli.run
mark("cli imports")
import contextlib
from pathlib import Path
from steinpix._cli import utils
startup = contextlib.ExitStack()
if hasattr(utils, "collector_paused"):  # as run_cmd does (the checks: trees of other versions)
    utils.in_executable()
    startup.enter_context(utils.collector_paused())
if hasattr(steinpix._cli.run, "import_numba"):
    steinpix._cli.run.import_numba()
from steinpix import batch, engine
mark("engine imports")
try:  # as run does before a local batch
    engine.init_numba()
except TypeError:  # before 706dc56
    engine.init_numba(linalg=False)
mark("numba init")
ilp, img, out_dir = map(Path, sys.argv[2:5])
chosen, profile = batch.choose_engine("builtin", ilp, None, "auto")
startup.close()
mark("project")
job = batch.Job(ilp=ilp, out_dir=out_dir, engine=chosen, profile=profile)
batch.prepare_outputs(job)
first = batch.classify_task(job, batch.Task((img,)))
after_first = time.perf_counter()
second = batch.classify_task(job, batch.Task((img,)))
marks["compute"] = time.perf_counter() - after_first
if not (first[0].ok and second[0].ok):
    raise SystemExit(f"classification failed: {first[0].error or second[0].error}")
marks["kernels"] = after_first - last - marks["compute"]
import json
print(json.dumps(marks))
"""


def child_env(src: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(src), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def timed(cmd: list[str], src: Path) -> tuple[float, float]:
    """Wall and CPU time (user + system) of a fresh process running ``cmd`` with steinpix
    from ``src``."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=child_env(src))
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    err = child.stderr.read().decode()
    child.stderr.close()
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (status {status}): {err[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def phases(ilp: Path, img: Path, out_dir: Path, src: Path) -> dict[str, float]:
    """The probe's phases, in a fresh process."""
    cmd = [sys.executable, "-c", PROBE, repr(time.time()), str(ilp), str(img), str(out_dir)]
    child = subprocess.run(cmd, capture_output=True, env=child_env(src), check=False)
    if child.returncode != 0:
        raise SystemExit(f"probe failed: {child.stderr.decode()[-2000:]}")
    return json.loads(child.stdout.decode().strip().splitlines()[-1])


def summary(values: list[float]) -> str:
    return f"min {min(values):.3f} s, median {statistics.median(values):.3f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", type=Path, default=DEFAULT_IMAGE,
                        help="steinbock HDF5 image (default: a 120 x 120 test image)")
    parser.add_argument("--ilp", type=Path, default=DEFAULT_ILP)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=WORK / "out")
    parser.add_argument("--compare", type=Path, metavar="SRC",
                        help="also time the steinpix package in SRC (another version's src/ "
                        "folder), taking turns with this one")
    args = parser.parse_args()
    img_dir = WORK / "img"  # the command's --img folder holds just this image
    shutil.rmtree(img_dir, ignore_errors=True)
    img_dir.mkdir(parents=True)
    img = img_dir / args.image.name
    shutil.copyfile(args.image, img)
    trees = {"": REPO / "src"}
    if args.compare is not None:
        trees = {" (this)": REPO / "src", " (other)": args.compare.resolve()}
    steinpix = [sys.executable, "-m", "steinpix"]
    commands = {"python -c pass": ([sys.executable, "-c", "pass"], REPO / "src")}
    for label, src in trees.items():
        commands[f"steinpix --help{label}"] = ([*steinpix, "--help"], src)
    for label, src in trees.items():
        commands[f"run{label}"] = (
            [*steinpix, "classify", "ilastik", "run", "--engine", "builtin", "--ilp",
             str(args.ilp), "--img", str(img_dir), "-o", str(args.out), "--overwrite",
             "-v", "WARNING"], src)
    for label, src in trees.items():  # warm-up: bytecode and numba's caches, the page cache
        timed(commands[f"run{label}"][0], src)
    walls: dict[str, list[float]] = {name: [] for name in commands}
    cpus: dict[str, list[float]] = {name: [] for name in commands}
    steps = {label: {name: [] for name in PHASES} for label in trees}
    for _ in range(args.repeat):
        for name, (cmd, src) in commands.items():
            wall, cpu = timed(cmd, src)
            walls[name].append(wall)
            cpus[name].append(cpu)
        for label, src in trees.items():
            for name, seconds in phases(args.ilp, img, args.out, src).items():
                steps[label][name].append(seconds)
    print(f"image {args.image.name}, project {args.ilp.name}, {args.repeat} runs each")
    width = max(map(len, commands))
    for name in commands:
        print(f"{name:{width}s} wall {summary(walls[name])}; CPU {summary(cpus[name])}")
    for label, src in trees.items():
        print(f"phases of one process{label} (each: min, median), {src}:")
        for name in PHASES:
            print(f"  {name:16s} {summary(steps[label][name])}")
        before = [steps[label][name] for name in PHASES if name != "compute"]
        total = [sum(run) for run in zip(*before, strict=True)]
        print(f"  {'before compute':16s} {summary(total)}")
    print(f"load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
