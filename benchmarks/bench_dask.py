"""Throughput of ``run --dask`` with 1 and 2 single-threaded workers, beside local runs.

Example::

    python benchmarks/bench_dask.py                   # 8 mosaics of 1000 x 1000, 2 repeats

Builds the images once (tiles of the IMC mock reference images, as ``make_mosaics.py``) in
``benchmarks/work/dask_img``, then for each configuration times one batch of all images with
``steinpix.batch.run_batch``, in this process (so only the batch is timed, not imports):

- local, ``--threads 1`` and ``--threads 2`` (the built-in engine in this process);
- Dask, a ``dask scheduler`` and 1 or 2 ``dask worker --nthreads 1`` processes on 127.0.0.1,
  warmed up first (each worker has imported steinpix and loaded the compiled kernels).

The configurations take turns, ``--repeat`` times. Reports the best and median wall time,
images per minute, the least CPU time of a batch (this process's, or the workers' together),
the workers' peak resident memory, and the machine's load average before and after (other
processes share the cores).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "work"
ILP = REPO / "examples" / "imc-mock" / "pretrained.ilp"

sys.path.insert(0, str(Path(__file__).parent))


def make_images(folder: Path, count: int, size: int) -> list[Path]:
    import make_mosaics

    folder.mkdir(parents=True, exist_ok=True)
    sources = make_mosaics.source_images()
    paths = []
    for i in range(count):
        path = folder / f"mosaic_{size}_{i + 1}.h5"
        if not path.exists():
            img = make_mosaics.mosaic(sources, size, 80, seed=100 + i)
            make_mosaics.write_steinbock_image(path, img)
        paths.append(path)
    return paths


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


class LocalDaskCluster:
    """``dask scheduler`` and ``n`` ``dask worker --nthreads 1`` processes on 127.0.0.1."""

    def __init__(self, n_workers: int, folder: Path) -> None:
        self.procs: list[subprocess.Popen] = []
        sched_file = folder / "scheduler.json"
        common = ["--no-dashboard"]
        self._start(
            ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0"]
            + ["--scheduler-file", str(sched_file), *common],
            folder / "scheduler.log",
        )
        while not sched_file.exists():
            time.sleep(0.05)
        time.sleep(0.2)
        from steinpix.cluster import read_scheduler_file

        self.address = read_scheduler_file(sched_file)
        for i in range(n_workers):
            self._start(
                ["distributed.cli.dask_worker", "--scheduler-file", str(sched_file)]
                + ["--nthreads", "1", "--host", "127.0.0.1", *common]
                + ["--local-directory", str(folder / f"worker{i}")],
                folder / f"worker{i}.log",
            )

    def _start(self, args: list[str], log: Path) -> None:
        with open(log, "wb") as f:
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", *args],
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _warm_up(ilp: str, img: str, out_dir: str) -> int:
    """On a worker: load steinpix and its compiled kernels by classifying one small image."""
    from steinpix import batch

    job = batch.Job(ilp=Path(ilp), out_dir=Path(out_dir), threads=1)
    batch.classify_task(job, batch.Task((Path(img),)))
    return os.getpid()


def _peak_rss_mib() -> float:
    """On a worker: the process's peak resident memory (VmHWM, in KiB; unlike ``ru_maxrss``,
    which exec carries over from the process that started this one, it restarts at exec).
    Not ``bench_preview.peak_rss_mib``: a function of this script reaches the workers by value,
    one imported from another script by name, which they cannot import."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds() -> float:
    """User and system CPU time of this process, all threads."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_batch(job, images, executor, client=None) -> tuple[float, float]:
    """Wall and CPU seconds of one batch (CPU: of this process, or of the Dask workers)."""
    from steinpix import batch

    def cpu() -> float:
        if client is None:
            return _cpu_seconds()
        return sum(client.run(_cpu_seconds).values())

    cpu0, start = cpu(), time.perf_counter()
    failed = batch.run_batch(job, images, executor)
    wall = time.perf_counter() - start
    if failed:
        raise SystemExit(f"{len(failed)} images failed: {failed[0].error}")
    return wall, cpu() - cpu0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=8, help="number of images")
    parser.add_argument("--size", type=int, default=1000, help="image height and width")
    parser.add_argument("--repeat", type=int, default=2, help="batches per configuration")
    args = parser.parse_args()

    from steinpix import batch, cluster

    images = make_images(WORK / "dask_img", args.count, args.size)
    small = REPO / "tests" / "data" / "reference" / "ilastik_img" / "20210305_NE_mockData1_001.h5"
    out_dir = WORK / "dask_out"
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"{cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()}")
    print(f"{args.count} images of {args.size} x {args.size}, best/median of {args.repeat}")
    configs = {}  # name -> (job, executor, client)
    for threads in (1, 2):
        job = batch.Job(ilp=ILP, out_dir=out_dir, threads=threads)
        batch.classify_task(job, batch.Task((small,)))  # warm: kernels loaded
        configs[f"local, --threads {threads}"] = (job, batch.run_local, None)
    with contextlib.ExitStack() as stack:
        for n in (1, 2):
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            dask = LocalDaskCluster(n, tmp)
            stack.callback(dask.close)
            client = stack.enter_context(
                contextlib.closing(cluster.connect(dask.address, timeout=60))
            )
            client.wait_for_workers(n, timeout=120)
            client.run(_warm_up, str(ILP), str(small), str(out_dir))
            job = batch.Job(ilp=ILP, out_dir=out_dir)
            configs[f"Dask, {n} worker(s) x 1 thread"] = (
                job,
                cluster.dask_executor(client),
                client,
            )
        # configurations take turns, so that a change of the machine's load hits them alike
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
        for _ in range(args.repeat):
            for name, (job, executor, client) in configs.items():
                results[name].append(time_batch(job, images, executor, client))
        for name, (_, _, client) in configs.items():
            if client is not None:
                peaks = sorted(client.run(_peak_rss_mib).values())
                print(f"{name}: peak RSS per worker " + ", ".join(f"{p:.0f} MiB" for p in peaks))
    header = f"{'configuration':32} {'best s':>8} {'median s':>9} {'images/min':>11} {'CPU s':>7}"
    print(header)
    for name, runs in results.items():
        walls = [wall for wall, _ in runs]
        best = min(walls)
        cpu = min(c for _, c in runs)
        print(
            f"{name:32} {best:8.1f} {statistics.median(walls):9.1f} "
            f"{60 * args.count / best:11.1f} {cpu:7.1f}"
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
