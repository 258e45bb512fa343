"""The engine's worker threads: the computation first, TIFF encoding in what time is left.

The features, the forests and the LZW encoding of the output all run nogil numba kernels. If
the encoder had threads of its own, the operating system would share the cores between them
and the computation's threads, and a computation thread paused for an encoder would leave the
others waiting at the end of the stage. Here they all take jobs from one queue of
``numba.get_num_threads()`` threads, computation jobs before encoding jobs: the encoding runs
when the computation leaves a core free (at the end of a stage, while a strip is read, while
the next image is opened) or when the writer, too far behind, makes it wait. Nothing is
lowered in the operating system's priorities, so other programs on the machine do not starve
the encoder.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future

__all__ = ["COMPUTE", "ENCODE", "PriorityPool", "pool"]

COMPUTE = 0  # features and forests: the critical path
ENCODE = 1  # TIFF compression: whenever a thread would otherwise wait


class PriorityPool:
    """A fixed number of daemon threads running submitted calls, lowest priority value first
    (first come, first served within a priority).

    Jobs must not wait for other jobs of the same pool: a pool of n threads runs at most n at
    once.

    Parameters
    ----------
    n_threads : int
        Number of threads (at least 1).
    """

    def __init__(self, n_threads: int) -> None:
        if n_threads < 1:
            raise ValueError(f"a pool needs at least one thread, got {n_threads}")
        self.n_threads = n_threads
        self._jobs: list[tuple[int, int, Future, Callable, tuple]] = []
        self._order = itertools.count()
        self._ready = threading.Condition(threading.Lock())
        self._threads = [
            threading.Thread(target=self._work, name=f"steinpix-worker-{i}", daemon=True)
            for i in range(n_threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable, *args: object, priority: int = COMPUTE) -> Future:
        """Run ``fn(*args)`` in a thread of the pool; its future."""
        future: Future = Future()
        with self._ready:
            heapq.heappush(self._jobs, (priority, next(self._order), future, fn, args))
            self._ready.notify()
        return future

    def _work(self) -> None:
        while True:
            # the job's tuple lives only during the call: nothing of it (its arrays) stays
            # referenced while this thread waits for the next one
            self._run(*self._next())

    def _next(self) -> tuple[Future, Callable, tuple]:
        with self._ready:
            while not self._jobs:
                self._ready.wait()
            return heapq.heappop(self._jobs)[2:]

    @staticmethod
    def _run(future: Future, fn: Callable, args: tuple) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args)
        except BaseException as exc:  # the caller gets it from the future
            future.set_exception(exc)
        else:
            future.set_result(result)


_pools: dict[int, PriorityPool] = {}
_pools_lock = threading.Lock()


def pool(n_threads: int) -> PriorityPool:
    """The process's pool of ``n_threads`` threads, started on first use.

    One pool per thread count, so that ``--threads 2`` means two threads of computation and
    encoding together, whatever else ran before in the process.
    """
    with _pools_lock:
        found = _pools.get(n_threads)
        if found is None:
            found = _pools[n_threads] = PriorityPool(n_threads)
        return found


def _forget_pools() -> None:
    # a forked child has the pools' queues but not their threads
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)
