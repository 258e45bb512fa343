"""Run a batch on a Dask cluster (``run --dask``): connect to the scheduler, and the executor
that sends one task per image (a chunk of images for ilastik) to the workers.

Dask (``distributed``, the optional ``dask`` extra) is imported only here, when ``--dask`` or
``--dask-scheduler-file`` is given. The workers need steinpix installed and the project, the
images and the output folder on a file system they share with the client, at the same paths:
paths are made absolute on the client, and each task checks that its worker sees them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from steinpix import atomic, batch
from steinpix.errors import InternalError, SteinpixError, first_line

logger = logging.getLogger("steinpix")

ADDRESS_ENV_VAR = "STEINPIX_DASK"
TIMEOUT_ENV_VAR = "STEINPIX_DASK_TIMEOUT"
# Seconds to wait for the scheduler to answer (STEINPIX_DASK_TIMEOUT overrides it).
CONNECT_TIMEOUT_S = 10.0
INSTALL_HINT = "pip install 'steinpix[dask]'"


class NotVisibleError(SteinpixError):
    """A worker does not see a path of the batch (no shared file system, or another mount)."""

    exit_code = 2


def import_distributed() -> Any:
    """``distributed``, imported on first use (it is the optional ``dask`` extra)."""
    try:
        import distributed
    except ImportError:
        raise SteinpixError(
            f"--dask needs Dask's distributed package: {INSTALL_HINT}", exit_code=2
        ) from None
    return distributed


def read_scheduler_file(path: str | os.PathLike, timeout: float = 0.0) -> str:
    """The scheduler address in a Dask scheduler file (``dask scheduler --scheduler-file``,
    ``dask-mpi``, ``Client.write_scheduler_file``).

    Waits up to ``timeout`` seconds for the file to appear and be complete, since a job script
    may start the scheduler in the background just before steinpix.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path, encoding="utf-8") as f:
                address = json.load(f)["address"]
            break
        except OSError as e:
            problem = f"cannot read the scheduler file ({e.strerror})"
        except (ValueError, KeyError, TypeError):
            problem = "not a Dask scheduler file (a JSON object with an 'address')"
        if time.monotonic() >= deadline:
            raise SteinpixError(f"{path}: {problem}", exit_code=2)
        time.sleep(0.1)
    if not isinstance(address, str) or not address:
        raise SteinpixError(f"{path}: the scheduler file has no address", exit_code=2)
    return address


def connect_timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV_VAR, "")
    try:
        timeout = float(value) if value else CONNECT_TIMEOUT_S
    except ValueError:
        raise SteinpixError(f"${TIMEOUT_ENV_VAR}={value}: not a number of seconds", 2) from None
    if timeout <= 0:
        raise SteinpixError(f"${TIMEOUT_ENV_VAR}={value}: must be positive", exit_code=2)
    return timeout


def connect(address: str, timeout: float | None = None) -> Any:
    """A ``distributed.Client`` connected to the scheduler at ``address``.

    Raises
    ------
    SteinpixError
        (exit code 2) when Dask is not installed or the scheduler does not answer within
        ``timeout`` seconds (default :func:`connect_timeout`).
    """
    distributed = import_distributed()
    timeout = connect_timeout() if timeout is None else timeout
    from distributed.comm.addressing import get_address_host_port

    try:  # checked first: a Client half-built from a malformed address hangs on exit
        get_address_host_port(address)
    except (ValueError, TypeError) as e:
        raise SteinpixError(
            f"Dask scheduler {address}: not a valid address ({first_line(e)})", exit_code=2
        ) from None
    try:
        client = distributed.Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError):  # refused or timed out: Dask retries until the timeout
        raise SteinpixError(
            f"Dask scheduler {address} not reachable within {timeout:g} s", exit_code=2
        ) from None
    except (ValueError, TypeError) as e:  # a malformed address ("unknown address scheme")
        raise SteinpixError(f"Dask scheduler {address}: {first_line(e)}", exit_code=2) from None
    return client


def describe_cluster(client: Any) -> str:
    workers = client.scheduler_info().get("workers", {})
    threads = sum(w.get("nthreads", 0) for w in workers.values())
    return f"{len(workers)} workers, {threads} threads"


# --------------------------------------------------------------------------------------------
# On the workers

_slots: dict[int, threading.Semaphore] = {}
_slots_lock = threading.Lock()


def _worker_slots(n: int) -> threading.Semaphore:
    """A process-wide limit of ``n`` tasks of steinpix running at once."""
    with _slots_lock:
        return _slots.setdefault(n, threading.Semaphore(n))


def _check_visible(paths: Sequence[Path], where: str) -> None:
    for path in paths:
        if not os.path.exists(path):
            raise NotVisibleError(
                f"the Dask worker {where} cannot see {path}: the project, the images and the "
                "output folder must be on a file system shared with every worker, at the same "
                "paths"
            )


def classify_on_worker(job: batch.Job, task: batch.Task) -> list[batch.ImageResult]:
    """:func:`steinpix.batch.classify_task` on a Dask worker.

    Checks that the worker sees the paths of the task; uses the worker's threads (``dask
    worker --nthreads``) per task unless ``--threads`` is given, and runs at most
    ``nthreads // threads`` tasks of the process at once, so a worker uses its threads and the
    memory of that many strips, no more. Failed images carry the worker's address.
    """
    from distributed import get_worker

    worker = get_worker()
    needed = [job.ilp, *job.output_dirs(), *task.files]
    if job.engine == "ilastik" and job.ilastik is not None:
        needed.append(job.ilastik)
    _check_visible(needed, worker.address)
    nthreads = max(1, worker.state.nthreads)
    threads = job.threads or nthreads
    with _worker_slots(max(1, nthreads // threads)):
        results = batch.classify_task(replace(job, threads=threads), task)
    return [
        r if r.ok else replace(r, error=f"{r.error} (worker {worker.address})") for r in results
    ]


# --------------------------------------------------------------------------------------------
# On the client


def absolute_job(job: batch.Job) -> batch.Job:
    """``job`` with absolute paths (the workers' working directories are not the client's)."""
    return replace(
        job,
        ilp=job.ilp.resolve(),
        out_dir=job.out_dir.resolve(),
        exports=tuple((name, folder.resolve()) for name, folder in job.exports),
        ilastik=None if job.ilastik is None else job.ilastik.resolve(),
    )


def _task_error(distributed: Any, error: BaseException) -> str:
    if isinstance(error, distributed.KilledWorker):
        return (
            "its task ended the worker process several times (killed, out of memory?); "
            "Dask gave up on it"
        )
    return f"worker error: {type(error).__name__}: {error}"


def dask_executor(client: Any) -> batch.Executor:
    """An :data:`~steinpix.batch.Executor` that runs every task on the cluster of ``client``.

    Tasks are submitted at once and reported as they finish, in any order. A task whose
    worker dies is rerun by Dask on another worker (its output is written under a temporary
    name until complete, so nothing half-written is left). Problems of the whole batch
    (a worker that cannot see the files, ilastik that cannot start) cancel the remaining tasks
    and are raised; Ctrl-C cancels them too (tasks already running finish their image, so the
    output folders stay even if empty: :func:`steinpix.atomic.forget_new_folders`).
    """
    distributed = import_distributed()

    def execute(job: batch.Job, tasks: Sequence[batch.Task]) -> Iterator[list[batch.ImageResult]]:
        remote_job = absolute_job(job)
        remote_tasks = [batch.Task(tuple(f.resolve() for f in t.files), t.label) for t in tasks]
        run_id = uuid.uuid4().hex[:8]
        futures = {}
        try:  # a Ctrl-C while tasks are submitted cancels those submitted already
            for i, (task, remote) in enumerate(zip(tasks, remote_tasks, strict=True)):
                key = f"steinpix-{task.files[0].stem}-{i}-{run_id}"
                future = client.submit(classify_on_worker, remote_job, remote, key=key, pure=False)
                futures[future] = task
            if not client.scheduler_info().get("workers"):
                logger.warning("Dask: the scheduler has no workers yet; waiting for some")
            for future in distributed.as_completed(list(futures), loop=client.loop):
                task = futures[future]
                if future.status == "finished":
                    remote_results = future.result()
                    yield [
                        replace(r, img_file=f, outputs=job.outputs(f))
                        for f, r in zip(task.files, remote_results, strict=True)
                    ]
                    continue
                if future.status == "cancelled":
                    raise SteinpixError(
                        "Dask cancelled the batch (lost the scheduler?); run the same command "
                        "again to finish it",
                        exit_code=2,
                    )
                error = future.exception()
                if isinstance(error, (SteinpixError, InternalError)):
                    raise error  # the whole batch cannot run there, or a bug in steinpix
                if isinstance(error, ImportError):
                    raise SteinpixError(
                        f"the Dask workers cannot run steinpix ({error}); install steinpix on "
                        "every worker, the same version as here",
                        exit_code=2,
                    )
                message = _task_error(distributed, error)
                yield [batch.ImageResult(f, job.outputs(f), f"{f}: {message}") for f in task.files]
        finally:
            unfinished = [f for f in futures if not f.done()]
            if unfinished:
                logger.warning("Cancelling %d Dask tasks", len(unfinished))
                # a task already running is not stopped: its output folders must stay
                atomic.forget_new_folders()
                with contextlib.suppress(Exception):  # the scheduler may be gone already
                    client.cancel(unfinished)

    return execute
