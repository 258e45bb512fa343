"""pytest plugin: the Docker tests' daemon and images, prepared while the other tests run.

Building the images from scratch takes minutes (debootstrap, pip, compiling the numba kernels),
most of it waiting on the network and on one core. When the session collects
``test_docker_daemon.py``, its tests are moved to the end and a background thread finds or
starts the daemon and builds the images meanwhile; :func:`prepared` waits for that. A daemon the
thread started is stopped when the session ends.
"""

from __future__ import annotations

import concurrent.futures
import time

import docker_images
import dockerd

MODULE = "test_docker_daemon.py"

_executor: concurrent.futures.ThreadPoolExecutor | None = None
_daemon: concurrent.futures.Future | None = None
_images: concurrent.futures.Future | None = None


def _build(daemon_future: concurrent.futures.Future) -> docker_images.TestImages:
    daemon = daemon_future.result()
    return docker_images.build_test_images(daemon.host)


def start() -> None:
    """Start finding the daemon and building the images (once per session)."""
    global _executor, _daemon, _images
    if _executor is not None:
        return
    _executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="docker-images")
    _daemon = _executor.submit(dockerd.connect_or_start)
    _images = _executor.submit(_build, _daemon)


def prepared() -> tuple[dockerd.Daemon, docker_images.TestImages | BaseException]:
    """The daemon and the images (or why they could not be built); waits for :func:`start`.

    Raises
    ------
    dockerd.NoDaemon
        When no daemon answers and none can be started.
    """
    start()
    daemon = _daemon.result()
    start_wait = time.monotonic()
    try:
        images = _images.result()
    except Exception as e:  # handed to the fixture: a skip (Unavailable) or an error
        images = e
    else:
        images.timings["waited for by the tests"] = time.monotonic() - start_wait
    return daemon, images


def pytest_collection_modifyitems(session, config, items) -> None:
    ours = [item for item in items if item.path.name == MODULE]
    if not ours:
        return
    items[:] = [item for item in items if item.path.name != MODULE] + ours
    start()


def pytest_sessionfinish(session, exitstatus) -> None:
    if _daemon is None:
        return
    _images.cancel()
    concurrent.futures.wait([_daemon])
    if _daemon.exception() is None:
        # also ends a build still running (after pytest -x, say)
        _daemon.result().stop()
    _executor.shutdown(wait=True)
