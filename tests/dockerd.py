"""A real Docker daemon for the tests: the one that answers, or one started here.

:func:`connect_or_start` uses the daemon named by ``$DOCKER_HOST`` or listening on
``/var/run/docker.sock`` when it answers. Otherwise, as root with ``dockerd`` installed (Debian's
``docker.io``; ``.ci/run`` installs it), it starts a private daemon: its own socket, exec root
and pid file in a temporary folder, no iptables, no IP forwarding, no bridge, storage driver
overlay2 (vfs where overlay2 does not work). Its data root (images and build cache) lives under
``~/.cache/steinpix-tests/`` so that later runs reuse the images, guarded by a lock that the
daemon itself holds; a second session at the same time gets a temporary data root.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("STEINPIX_TEST_CACHE") or Path.home() / ".cache" / "steinpix-tests")
DEFAULT_SOCKET = "/var/run/docker.sock"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
STORAGE_DRIVERS = ("overlay2", "vfs")
# debootstrap and pip run beside the other tests at a lower priority (not the daemon: the tests
# wait for its answers)
NICE = ["nice", "-n", "10"] if shutil.which("nice") else []


class NoDaemon(Exception):
    """No daemon answers and none can be started here; the message says why."""


@dataclass
class Daemon:
    """A daemon that answers at ``host`` (a ``DOCKER_HOST`` value)."""

    host: str
    process: subprocess.Popen | None = None  # set when the tests started it
    workdir: Path | None = None
    log: Path | None = None
    storage_driver: str = ""
    notes: list[str] = field(default_factory=list)

    def client(self):
        import docker

        return docker.DockerClient(base_url=self.host, timeout=120)

    def stop(self) -> None:
        """Stop a daemon the tests started (its containers with it) and remove its folders."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log is not None and self.log.exists():
            # kept for a look after a failed run
            shutil.copy2(self.log, CACHE / "dockerd-last.log")
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def answers(host: str, timeout: float = 5.0) -> bool:
    import docker

    try:
        client = docker.DockerClient(base_url=host, timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # any failure to connect or to get an answer: no daemon there
        return False


def _lock(path: Path) -> int | None:
    """An open file descriptor holding an exclusive lock on ``path``, or None if it is taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _start(dockerd: str, driver: str, data_root: Path, workdir: Path, lock_fd: int | None):
    sock = workdir / "docker.sock"
    log = workdir / f"dockerd-{driver}.log"
    args = [
        dockerd,
        f"--data-root={data_root}",
        f"--exec-root={workdir / 'exec'}",
        f"--pidfile={workdir / 'dockerd.pid'}",
        f"--host=unix://{sock}",
        "--iptables=false",
        "--ip-forward=false",
        "--ip-masq=false",
        "--bridge=none",
        f"--storage-driver={driver}",
    ]
    with open(log, "wb") as out:
        # the daemon inherits the lock on its data root and holds it as long as it runs
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=() if lock_fd is None else (lock_fd,),
        )
    host = f"unix://{sock}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None, log
        if sock.exists() and answers(host, timeout=2.0):
            return Daemon(host, process, workdir, log, driver), log
        time.sleep(0.2)
    process.kill()
    process.wait()
    return None, log


def _last_error(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    for line in reversed(lines):
        match = re.search(r'level=(?:error|fatal) msg="([^"]*)"', line)
        if match:
            return match.group(1)
    return lines[-1] if lines else "no output"


def connect_or_start() -> Daemon:
    """A daemon that answers; see the module's docstring.

    Raises
    ------
    NoDaemon
        With the reason, when none answers and none can be started.
    """
    for host in (os.environ.get("DOCKER_HOST"), f"unix://{DEFAULT_SOCKET}"):
        if host and answers(host):
            return Daemon(host)
    tried = "no Docker daemon answers at $DOCKER_HOST or " + DEFAULT_SOCKET
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise NoDaemon(f"{tried}, and dockerd is not installed (apt-get install docker.io)")
    if os.geteuid() != 0:
        raise NoDaemon(f"{tried}, and starting dockerd needs root")
    # short path: the daemon's sockets live in here
    workdir = Path(tempfile.mkdtemp(prefix="steinpix-dockerd-", dir="/tmp"))
    failures = []
    for driver in STORAGE_DRIVERS:
        lock_fd = _lock(CACHE / f"dockerd-{driver}.lock")
        data_root = CACHE / f"dockerd-{driver}" if lock_fd is not None else workdir / "data"
        try:
            daemon, log = _start(dockerd, driver, data_root, workdir, lock_fd)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)
        if daemon is not None:
            if lock_fd is None:
                daemon.notes.append(f"{CACHE} is in use by another daemon: cold caches")
            return daemon
        failures.append(f"{driver}: {_last_error(log)}")
    with contextlib.suppress(OSError):
        shutil.rmtree(workdir)
    raise NoDaemon(f"{tried}, and dockerd did not start ({'; '.join(failures)})")
