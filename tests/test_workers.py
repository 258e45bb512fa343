"""The engine's worker threads (steinpix.workers): computation before encoding, errors, forks,
and the bound on strips waiting to be encoded."""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref

import imagecodecs
import numpy as np
import pytest

from steinpix import engine, workers
from steinpix.features import Runner


def _blocked_pool(n_threads: int) -> tuple[workers.PriorityPool, threading.Event]:
    """A fresh pool whose threads all wait for the returned event."""
    pool = workers.PriorityPool(n_threads)
    release = threading.Event()
    started = threading.Barrier(n_threads + 1)

    def hold() -> None:
        started.wait()
        release.wait()

    for _ in range(n_threads):
        pool.submit(hold)
    started.wait(timeout=10)
    return pool, release


def test_computation_runs_before_encoding_queued_earlier():
    pool, release = _blocked_pool(1)
    order: list[str] = []
    futures = [pool.submit(order.append, "encode 1", priority=workers.ENCODE),
               pool.submit(order.append, "compute 1", priority=workers.COMPUTE),
               pool.submit(order.append, "encode 2", priority=workers.ENCODE),
               pool.submit(order.append, "compute 2")]
    release.set()
    for future in futures:
        future.result(timeout=10)
    assert order == ["compute 1", "compute 2", "encode 1", "encode 2"]


def test_a_job_error_reaches_its_caller_and_the_pool_goes_on():
    pool = workers.PriorityPool(2)

    def fail() -> None:
        raise ValueError("bad strip")

    with pytest.raises(ValueError, match="bad strip"):
        pool.submit(fail).result(timeout=10)
    assert pool.submit(sum, [1, 2, 3]).result(timeout=10) == 6


def test_an_idle_worker_keeps_nothing_of_the_jobs_it_took():
    """A job's arrays are freed when it is done or was cancelled, not when the worker takes
    the next job (which may come much later)."""
    pool, release = _blocked_pool(1)
    strips = [np.zeros(1000), np.zeros(1000)]
    refs = [weakref.ref(strip) for strip in strips]
    done = pool.submit(np.sum, strips[0])
    cancelled = pool.submit(np.sum, strips[1])
    assert cancelled.cancel()
    release.set()
    done.result(timeout=10)
    del strips, done, cancelled
    time.sleep(0.2)  # the worker takes the cancelled job, drops it and waits
    gc.collect()
    assert [ref() for ref in refs] == [None, None]


def test_one_pool_per_thread_count():
    assert workers.pool(2) is workers.pool(2)
    assert workers.pool(3) is not workers.pool(2)
    assert workers.pool(3).n_threads == 3


def test_runner_error_comes_after_every_job_of_the_call_has_stopped():
    finished = []

    def kernel(delay: float, fail: bool) -> None:
        time.sleep(delay)
        if fail:
            raise RuntimeError("kernel failed")
        finished.append(delay)

    with pytest.raises(RuntimeError, match="kernel failed"):
        Runner(2)(kernel, [(0.0, True), (0.3, False)])
    time.sleep(0.01)  # (a job still running would finish well after this)
    # the slow job wrote its result before the error was raised, not into reused buffers later
    assert finished == [0.3]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
# forking a process with threads is the point here (Python 3.12+ warns about it)
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_gets_pools_of_its_own():
    assert workers.pool(2).submit(int, "7").result(timeout=10) == 7
    pid = os.fork()
    if pid == 0:  # child: the parent's pool has no threads here; a new one must start
        code = 1
        try:
            code = 0 if workers.pool(2).submit(int, "5").result(timeout=10) == 5 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_strips_waiting_for_encoding_are_bounded(monkeypatch):
    """When the encoder is behind, the writer stops taking rows (and so, through its queue, the
    computation stops): the rows held stay bounded."""
    monkeypatch.setattr(engine, "MAX_ENCODING", 3)
    pool, release = _blocked_pool(1)
    monkeypatch.setattr(workers, "pool", lambda n: pool)
    rows = [np.full((1, 40, 3), i, dtype=np.uint16) for i in range(10)]
    taken = []

    def source():
        for row in rows:
            taken.append(row)
            yield row

    encoded: list[bytes] = []
    writer = threading.Thread(target=lambda: encoded.extend(engine._tiff_strips(source(), 1, 1)),
                              daemon=True)
    writer.start()
    try:
        time.sleep(0.3)
        assert len(taken) == 3  # the encoder's thread is busy: no more rows are taken
    finally:
        release.set()
        writer.join(timeout=10)
    assert len(taken) == 10
    decoded = [np.frombuffer(imagecodecs.lzw_decode(b), dtype=np.uint16) for b in encoded]
    assert len(decoded) == len(rows)
    assert all(np.array_equal(d.reshape(1, 40, 3), r) for d, r in zip(decoded, rows, strict=True))
