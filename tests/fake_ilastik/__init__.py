"""Test doubles for the real ilastik and the Docker daemon (importable from the tests folder).

- :class:`FakeIlastik` installs ``fake_ilastik.py`` as an executable ``run_ilastik.sh`` with a
  ``#!`` line naming the running Python, optionally behind a shell wrapper that runs it as a
  child, as ilastik's own ``run_ilastik.sh`` does.
- :class:`StandInDockerClient` records what ``runners`` asks of the Docker SDK.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

SOURCE = Path(__file__).with_name("fake_ilastik.py")


def write_probabilities_tiff(path: Path, seed: int = 0) -> Path:
    """A tiny YXC uint16 TIFF like ilastik's exports (3 classes)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 65535, size=(4, 5, 3), dtype=np.uint16)
    tifffile.imwrite(path, data, photometric="rgb")
    return path


def write_export_tiffs(directory: Path, seed: int = 0) -> dict[str, Path]:
    """Tiny Y x X TIFFs like ilastik's Uncertainty (uint16) and Simple Segmentation (uint8)
    exports, by export source."""
    rng = np.random.default_rng(seed)
    uncertainty = directory / "uncertainty.tiff"
    tifffile.imwrite(uncertainty, rng.integers(0, 65535, size=(4, 5), dtype=np.uint16))
    segmentation = directory / "segmentation.tiff"
    tifffile.imwrite(segmentation, rng.integers(1, 4, size=(4, 5), dtype=np.uint8))
    return {"Uncertainty": uncertainty, "Simple Segmentation": segmentation}


def _make_executable(path: Path) -> None:
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


class FakeIlastik:
    """A fake ilastik installed in ``directory``.

    Parameters
    ----------
    directory
        Created if missing; holds the executable, its config and its call log.
    wrapper
        When True, ``path`` is a bash script that runs the Python fake as a child process
        (without ``exec``), like ilastik's ``run_ilastik.sh``.
    """

    def __init__(self, directory: Path, wrapper: bool = False) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        program = self.dir / "fake_ilastik.py"
        program.write_text(f"#!{sys.executable}\n" + SOURCE.read_text(encoding="utf-8"))
        _make_executable(program)
        if wrapper:
            self.path = self.dir / "run_ilastik.sh"
            self.path.write_text(
                "#!/bin/bash\n# like ilastik's launcher: Python runs as a child, no exec\n"
                '"$(dirname "$0")/fake_ilastik.py" "$@"\n'
                "exit $?\n"
            )
            _make_executable(self.path)
        else:
            self.path = program
        self.tiff = write_probabilities_tiff(self.dir / "probabilities.tiff")
        self.tiffs = {"Probabilities": self.tiff, **write_export_tiffs(self.dir)}
        self.configure()

    def configure(self, **config: Any) -> FakeIlastik:
        """Set the behaviours (see fake_ilastik.py); resets the ones not given."""
        # relative to the fake's folder, which a container sees elsewhere
        tiffs = {source: path.name for source, path in self.tiffs.items()}
        config = {"tiff": self.tiff.name, "tiffs": tiffs, **config}
        (self.dir / "fake_ilastik.json").write_text(json.dumps(config), encoding="utf-8")
        return self

    def calls(self) -> list[dict[str, Any]]:
        log = self.dir / "calls.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]

    def markers(self, kind: str) -> list[Path]:
        return sorted(self.dir.glob(f"{kind}-*"))

    def wait_for(self, kind: str, timeout: float = 30.0) -> list[Path]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.markers(kind)
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"fake ilastik never wrote a {kind} marker in {self.dir}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still exists and is not a zombie (Linux reads /proc)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat_file = Path(f"/proc/{pid}/stat")
    if stat_file.exists():
        try:
            return stat_file.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    return True


# --------------------------------------------------------------------------------------------
# Docker


class StandInContainer:
    """Records start/logs/wait/stop/kill/remove; its log and exit code are set by the client."""

    def __init__(self, client: StandInDockerClient, settings: dict[str, Any]) -> None:
        self.client = client
        self.settings = settings
        self.id = f"standin{len(client.containers.created)}"
        self.events: list[str] = []

    def start(self) -> None:
        self.events.append("start")
        if self.client.on_start is not None:
            self.client.on_start(self)

    def logs(self, stream: bool = False, follow: bool = False, **kwargs: Any):
        self.events.append("logs")
        assert stream and follow, "logs must be streamed live"
        for chunk in self.client.log_chunks:
            if isinstance(chunk, BaseException):
                raise chunk
            yield chunk

    def wait(self, **kwargs: Any) -> dict[str, int]:
        self.events.append("wait")
        return {"StatusCode": self.client.exit_codes.pop(0) if self.client.exit_codes else 0}

    def stop(self, timeout: int | None = None) -> None:
        self.events.append(f"stop(timeout={timeout})")

    def kill(self, signal: str | None = None) -> None:
        self.events.append("kill")

    def remove(self, force: bool = False, **kwargs: Any) -> None:
        self.events.append(f"remove(force={force})")


def check_create_kwargs(image: str, command: Any, kwargs: dict[str, Any]) -> None:
    """Let the real SDK translate the settings, so a misspelt or unknown one fails the test."""
    try:
        from docker.models.containers import _create_container_args
    except ImportError:  # private helper of the SDK: skip the check if it moves
        return
    _create_container_args({"image": image, "command": command, "version": "1.45", **kwargs})


class StandInContainers:
    def __init__(self, client: StandInDockerClient) -> None:
        self.client = client
        self.created: list[StandInContainer] = []

    def create(self, image: str, command: Any = None, **kwargs: Any) -> StandInContainer:
        check_create_kwargs(image, command, kwargs)
        container = StandInContainer(self.client, {"image": image, "command": command, **kwargs})
        self.created.append(container)
        return container

    def run(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("runners create and start containers themselves")


class StandInImages:
    def __init__(self, client: StandInDockerClient) -> None:
        self.client = client

    def get(self, name: str) -> dict[str, str]:
        import docker.errors

        if name not in self.client.available_images:
            raise docker.errors.ImageNotFound(f"No such image: {name}")
        return {"name": name}


class StandInDockerClient:
    """Enough of ``docker.DockerClient`` for ``runners``; no daemon involved.

    Parameters
    ----------
    images
        Image names that "exist".
    reachable
        When False, ``ping`` fails as with no daemon.
    log_chunks
        What each container's log yields (bytes; an exception instance is raised instead).
    exit_codes
        Exit codes of the containers in creation order (0 when exhausted).
    on_start
        Called with each container when it starts (tests write outputs from here, as ilastik
        would inside the container).
    """

    def __init__(
        self,
        images: tuple[str, ...] = (),
        reachable: bool = True,
        log_chunks: list[Any] | None = None,
        exit_codes: list[int] | None = None,
        on_start: Any = None,
    ) -> None:
        self.available_images = set(images)
        self.reachable = reachable
        self.log_chunks = list(log_chunks or [])
        self.exit_codes = list(exit_codes or [])
        self.on_start = on_start
        self.containers = StandInContainers(self)
        self.images = StandInImages(self)
        self.pings = 0

    def info(self) -> dict[str, Any]:
        return {"SecurityOptions": ["name=seccomp,profile=builtin"]}

    def ping(self) -> bool:
        self.pings += 1
        if not self.reachable:
            raise ConnectionError("Connection refused")
        return True
