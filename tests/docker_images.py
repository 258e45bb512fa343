"""The steinpix images for the Docker tests, built offline from this repository's Dockerfile.

Nothing is pulled: containers and builds here reach no registry and no PyPI. The Dockerfile's
build arguments take local images instead (see its header):

- ``BASE_IMAGE``: Debian bookworm with ``python3`` and ``python3-venv`` from ``debootstrap
  --variant=minbase`` with the Debian mirror apt uses, imported with ``docker import`` (or
  ``$STEINPIX_TEST_BASE_IMAGE``, or ``python:3.11-slim-bookworm`` where the daemon has it or
  can pull it);
- ``WHEELS_IMAGE``: steinpix's dependencies as CPython 3.11 wheels (``pip download`` on the host,
  which reaches PyPI) in ``/wheels``, with ``PIP_NO_INDEX=1``;
- ``ILASTIK_IMAGE`` (full image only): the repository's fake ilastik as
  ``/opt/ilastik/run_ilastik.sh``, which keeps its configuration and call log in
  ``/data/fake_ilastik`` (:data:`FAKE_DIR`), the data folder the runners mount.

The debootstrap root file system and the wheels are cached under ``~/.cache/steinpix-tests/``
(keyed by what they are made from) and the images in the daemon; everything is rebuilt when a
cache is missing. BuildKit's own cache makes a rebuild of unchanged sources take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dockerd import CACHE, NICE
from fake_ilastik import SOURCE as FAKE_SOURCE

REPO = Path(__file__).resolve().parents[1]
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv")
# bookworm's python3, and the official python:3.11-slim-bookworm
CONTAINER_PYTHON = "3.11"
OFFICIAL_BASE = "python:3.11-slim-bookworm"
FAKE_DIR = "/data/fake_ilastik"
BUILD_TIMEOUT_S = 1800


class Unavailable(Exception):
    """An input of the test images cannot be made here; the message says why."""


@dataclass
class TestImages:
    slim: str
    full: str  # with the fake ilastik
    cli: list[str]
    timings: dict[str, float] = field(default_factory=dict)


def _key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def _run(args: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, **kwargs)
    if result.returncode != 0:
        out = (result.stdout or b"") + (result.stderr or b"")
        tail = out.decode(errors="replace")[-3000:]
        raise RuntimeError(f"{what} failed ({' '.join(args[:4])} ...):\n{tail}")
    return result


# --------------------------------------------------------------------------------------------
# The docker command line


def _client_version(cli: str) -> tuple[int, ...]:
    result = subprocess.run(
        [cli, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True
    )
    numbers = re.findall(r"\d+", result.stdout)[:2]
    return tuple(int(n) for n in numbers) if numbers else ()


def buildkit_cli() -> list[str]:
    """A ``docker`` command that builds with BuildKit (the Dockerfile needs ``RUN --mount``).

    Docker 23+ builds with BuildKit through the buildx plugin; older clients (Debian's docker.io
    20.10) have it built in.
    """
    candidates = dict.fromkeys(
        c for c in (shutil.which("docker"), "/usr/bin/docker", "/usr/local/bin/docker") if c
    )
    for cli in candidates:
        if not os.access(cli, os.X_OK):
            continue
        if subprocess.run([cli, "buildx", "version"], capture_output=True).returncode == 0:
            return [cli]
        version = _client_version(cli)
        if version and version < (23,):
            return [cli]
    raise Unavailable(
        "no docker client that builds with BuildKit (install the buildx plugin or docker.io)"
    )


def image_exists(cli: list[str], name: str) -> bool:
    return subprocess.run([*cli, "image", "inspect", name], capture_output=True).returncode == 0


def _import_tar(cli: list[str], tar_path: Path, name: str) -> None:
    with open(tar_path, "rb") as f:
        _run([*cli, "import", "-", name], f"docker import {name}", stdin=f)


# --------------------------------------------------------------------------------------------
# Base image


def debian_mirror() -> str:
    """The Debian mirror apt is configured with (deb822 ``.sources`` or ``sources.list``)."""
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if path.suffix in (".list", ".sources") and path.is_file():
            texts.append(path.read_text(errors="replace"))
    for text in texts:
        for uri in re.findall(r"^URIs:\s*(\S+)", text, re.M) + re.findall(
            r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)", text, re.M
        ):
            if re.search(r"/debian/?$", uri):
                return uri
    return "http://deb.debian.org/debian"


def _debootstrap_tar() -> Path:
    mirror = debian_mirror()
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True
    ).stdout.strip()
    tar_path = CACHE / f"base-{SUITE}-{arch}-{_key(SUITE, BASE_PACKAGES, mirror, arch)}.tar"
    if tar_path.exists():
        return tar_path
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="steinpix-rootfs-", dir=CACHE) as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run(
            [
                *NICE,
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                SUITE,
                str(rootfs),
                mirror,
            ],
            "debootstrap",
        )
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        partial = Path(tmp) / "rootfs.tar"
        _run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."], "tar")
        os.replace(partial, tar_path)
    return tar_path


def base_image(cli: list[str]) -> str:
    """A local image to build on (see the module's docstring)."""
    given = os.environ.get("STEINPIX_TEST_BASE_IMAGE")
    if given:
        return given
    if shutil.which("debootstrap") and os.geteuid() == 0:
        tar_path = _debootstrap_tar()
        name = f"steinpix-test-base:{tar_path.stem.rsplit('-', 1)[1]}"
        if not image_exists(cli, name):
            _import_tar(cli, tar_path, name)
        return name
    if image_exists(cli, OFFICIAL_BASE):
        return OFFICIAL_BASE
    if subprocess.run([*cli, "pull", OFFICIAL_BASE], capture_output=True).returncode == 0:
        return OFFICIAL_BASE
    raise Unavailable(
        "no base image: debootstrap (as root) is not available, and "
        f"{OFFICIAL_BASE} cannot be pulled; set STEINPIX_TEST_BASE_IMAGE"
    )


# --------------------------------------------------------------------------------------------
# Wheels


def requirements() -> list[str]:
    """steinpix's own dependencies (no extras), from the installed package's metadata."""
    return [r for r in importlib.metadata.requires("steinpix") or [] if "extra ==" not in r]


def _platforms() -> list[str]:
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    # bookworm has glibc 2.36
    return [f"manylinux_2_{minor}_{arch}" for minor in range(36, 16, -1)] + [
        f"manylinux2014_{arch}"
    ]


def wheels_dir() -> Path:
    """CPython 3.11 Linux wheels of steinpix's dependencies and setuptools (its build backend)."""
    wanted = ["setuptools>=64", *requirements()]
    target = CACHE / f"wheels-cp311-{_key(wanted, _platforms())}"
    if target.is_dir():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix="wheels-", dir=CACHE))
    platforms = [arg for p in _platforms() for arg in ("--platform", p)]
    try:
        _run(
            [
                *NICE,
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--only-binary=:all:",
                "--implementation=cp",
                f"--python-version={CONTAINER_PYTHON}",
                "--abi=cp311",
                *platforms,
                f"--dest={partial}",
                *wanted,
            ],
            "pip download (the wheels for the image)",
        )
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _tar_of(members: dict[str, tuple[bytes | Path, int]], tar_path: Path) -> None:
    """A tar archive of ``{name: (content or file, mode)}``, with its parent folders."""
    with tarfile.open(tar_path, "w") as tar:
        folders = sorted({str(parent) for n in members for parent in Path(n).parents[:-1]})
        for folder in folders:
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, (content, mode) in members.items():
            data = content.read_bytes() if isinstance(content, Path) else content
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))


def _image_from(cli: list[str], prefix: str, members: dict[str, tuple[bytes | Path, int]]) -> str:
    digest = hashlib.sha256()
    for name, (content, mode) in sorted(members.items()):
        digest.update(f"{name}:{mode}:".encode())
        digest.update(content.read_bytes() if isinstance(content, Path) else content)
    name = f"{prefix}:{digest.hexdigest()[:12]}"
    if not image_exists(cli, name):
        with tempfile.TemporaryDirectory(prefix="steinpix-tar-") as tmp:
            tar_path = Path(tmp) / "image.tar"
            _tar_of(members, tar_path)
            _import_tar(cli, tar_path, name)
    return name


def wheels_image(cli: list[str]) -> str:
    wheels = sorted(wheels_dir().glob("*.whl"))
    members = {f"wheels/{w.name}": (w, 0o644) for w in wheels}
    return _image_from(cli, "steinpix-test-wheels", members)


# --------------------------------------------------------------------------------------------
# Fake ilastik


FAKE_LAUNCHER = f"""#!/bin/bash
# The tests' stand-in for ilastik's run_ilastik.sh: runs the fake as a child (no exec), like the
# real launcher. Its configuration and call log are in the mounted data folder.
export FAKE_ILASTIK_DIR={FAKE_DIR}
"$(dirname "$0")/fake_ilastik.py" "$@"
exit $?
"""


def fake_ilastik_image(cli: list[str]) -> str:
    program = b"#!/usr/bin/env python3\n" + FAKE_SOURCE.read_bytes()
    return _image_from(
        cli,
        "steinpix-test-fake-ilastik",
        {
            "opt/ilastik/run_ilastik.sh": (FAKE_LAUNCHER.encode(), 0o755),
            "opt/ilastik/fake_ilastik.py": (program, 0o755),
        },
    )


# --------------------------------------------------------------------------------------------
# Builds


def _image_id(cli: list[str], name: str) -> str:
    result = subprocess.run(
        [*cli, "image", "inspect", "--format", "{{.Id}}", name], capture_output=True, text=True
    )
    return result.stdout.strip() if result.returncode == 0 else ""


def build(cli: list[str], tag: str, target: str, args: dict[str, str]) -> None:
    """``docker build`` of the repository; the image the tag named before is removed."""
    build_args = [a for k, v in args.items() for a in ("--build-arg", f"{k}={v}")]
    previous = _image_id(cli, tag)
    _run(
        # offline, and the test daemon has no bridge network
        [*cli, "build", "--network=none", "--target", target, "--tag", tag, *build_args, str(REPO)],
        f"docker build --target {target}",
        env={**os.environ, "DOCKER_BUILDKIT": "1"},
        timeout=BUILD_TIMEOUT_S,
    )
    if previous and previous != _image_id(cli, tag):
        # only this tag's own old image, and only if nothing else uses it
        subprocess.run([*cli, "image", "rm", previous], capture_output=True)


def build_test_images(host: str) -> TestImages:
    """Build ``steinpix-test:slim`` and ``steinpix-test:full`` (the latter with the fake ilastik)
    with the daemon at ``host`` (a ``DOCKER_HOST`` value).

    Raises
    ------
    Unavailable
        When an input cannot be made here.
    """
    cli = [*buildkit_cli(), "--host", host]
    timings = {}
    start = time.monotonic()
    base = base_image(cli)
    timings["base image"] = time.monotonic() - start
    start = time.monotonic()
    wheels = wheels_image(cli)
    ilastik = fake_ilastik_image(cli)
    timings["wheels and fake ilastik images"] = time.monotonic() - start
    common = {"BASE_IMAGE": base, "WHEELS_IMAGE": wheels, "PIP_NO_INDEX": "1"}
    images = TestImages("steinpix-test:slim", "steinpix-test:full", cli, timings)
    start = time.monotonic()
    build(cli, images.slim, "slim", common)
    timings["slim build"] = time.monotonic() - start
    start = time.monotonic()
    # no Debian mirror in builds: the fake ilastik needs no GUI libraries
    build(cli, images.full, "full", {**common, "ILASTIK_IMAGE": ilastik, "GUI_PACKAGES": ""})
    timings["full build"] = time.monotonic() - start
    # containers that a killed session left behind (a running one may be another session's)
    for image in (images.slim, images.full):
        listed = subprocess.run(
            [*cli, "ps", "-aq", "--filter", f"ancestor={image}", "--filter", "status=exited"],
            capture_output=True,
            text=True,
        )
        if listed.stdout.split():
            subprocess.run([*cli, "rm", *listed.stdout.split()], capture_output=True)
    return images
