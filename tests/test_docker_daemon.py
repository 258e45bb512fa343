"""The steinpix images, ``--engine docker`` and ``apps ilastik --docker`` against a real daemon.

The daemon is found or started by ``dockerd.py``, the images are built offline from the
repository's Dockerfile by ``docker_images.py`` (slim, and full with the fake ilastik); everything
skips, saying why, where neither can be done. steinpix runs as a real subprocess throughout.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import docker_images
import docker_session
import dockerd
import numpy as np
import pytest
import tifffile
from fake_ilastik import FakeIlastik

from conftest import EXAMPLE, TEST_DATA, copy_example
from h5tree import describe

docker = pytest.importorskip("docker", reason="the Docker SDK (steinpix[docker]) is needed")

REFERENCE_IMG = TEST_DATA / "reference" / "ilastik_img"
REFERENCE_PROBABILITIES = TEST_DATA / "reference" / "ilastik_probabilities"
# a user that exists neither on the host nor in the image, as with `docker run -u` for anybody
OTHER_USER = (1234, 1234)
# what a container sees mounted besides its root and what the test gave it
STEINPIX = [sys.executable, "-m", "steinpix"]
DOCKER_OWN_MOUNTS = {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf"}


@pytest.fixture(scope="session")
def prepared():
    """The daemon (skip without one) and the test images or why they could not be built."""
    try:
        daemon, images = docker_session.prepared()
    except dockerd.NoDaemon as e:
        pytest.skip(str(e))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DOCKER_HOST", daemon.host)
        yield daemon, images


@pytest.fixture(scope="session")
def daemon(prepared) -> dockerd.Daemon:
    return prepared[0]


@pytest.fixture(scope="session")
def images(prepared) -> docker_images.TestImages:
    built = prepared[1]
    if isinstance(built, docker_images.Unavailable):
        pytest.skip(str(built))
    if isinstance(built, BaseException):
        raise built
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in built.timings.items())
    print(f"\nDocker test images ({timings})", file=sys.stderr)
    return built


@pytest.fixture
def client(daemon):
    c = daemon.client()
    yield c
    c.close()


def steinpix(*args: str, cwd: Path, env: dict[str, str] | None = None, **kwargs):
    """``steinpix ARGS`` as a subprocess of this Python."""
    return subprocess.run(
        [*STEINPIX, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def containers_of(client, image: str) -> set[str]:
    """Ids of the containers made from ``image``, running or not."""
    return {c.id for c in client.containers.list(all=True, filters={"ancestor": image})}


@pytest.fixture
def new_containers(client, images):
    """The ids of containers of the test images made since the test began."""
    before = containers_of(client, images.full) | containers_of(client, images.slim)

    def new() -> set[str]:
        return (containers_of(client, images.full) | containers_of(client, images.slim)) - before

    return new


def chown_tree(root: Path, uid: int, gid: int) -> None:
    for path in [root, *root.rglob("*")]:
        os.chown(path, uid, gid)


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# The slim image: prepare and run in a container == the same outside


def docker_run(cli: list[str], image: str, data: Path, user: str, *args: str, name: str):
    """``docker run`` (kept, so that ``docker diff`` can look at it) without network."""
    return subprocess.run(
        [
            *cli,
            "run",
            "--name",
            name,
            "--network",
            "none",
            "-u",
            user,
            "-v",
            f"{data}:/data",
            image,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_slim_image_gives_the_files_of_the_host(images, client, tmp_path):
    host, boxed = tmp_path / "host", tmp_path / "container"
    for folder in (host, boxed):
        copy_example(folder)
    uid, gid = OTHER_USER if os.geteuid() == 0 else (os.getuid(), os.getgid())
    chown_tree(boxed, uid, gid)
    prepare = ["classify", "ilastik", "prepare", "--cropsize", "50", "--seed", "1"]
    run = ["classify", "ilastik", "run", "--ilp", "pretrained.ilp", "-v", "INFO"]
    for args in (prepare, run):
        result = steinpix(*args, cwd=host)
        assert result.returncode == 0, result.stderr

    names = []
    for step, args in (("prepare", prepare), ("run", run)):
        name = f"steinpix-test-{step}-{os.getpid()}"
        names.append(name)
        result = docker_run(images.cli, images.slim, boxed, f"{uid}:{gid}", *args, name=name)
        assert result.returncode == 0, result.stderr
        if step == "run":
            run_log = result.stderr
    try:
        # no compile at start-up: the kernels compiled at build time were used as they are (the
        # container wrote nothing into numba's cache)
        assert "Traceback" not in run_log
        assert "Compiling the built-in engine" not in run_log
        changed = client.containers.get(names[1]).diff() or []
        assert [c["Path"] for c in changed if c["Path"].startswith("/opt/numba-cache")] == []
    finally:
        for name in names:
            client.containers.get(name).remove()

    assert files_under(boxed) == files_under(host)
    for path in [boxed, *boxed.rglob("*")]:
        assert (path.stat().st_uid, path.stat().st_gid) == (uid, gid), path
    for rel in files_under(host):
        ours, theirs = host / rel, boxed / rel
        if rel.endswith(".h5"):
            assert describe(theirs) == describe(ours), rel
        elif rel.endswith(".tiff") and rel.startswith("ilastik_probabilities"):
            np.testing.assert_array_equal(tifffile.imread(theirs), tifffile.imread(ours), rel)
            reference = REFERENCE_PROBABILITIES / Path(rel).name
            np.testing.assert_array_equal(tifffile.imread(theirs), tifffile.imread(reference))
        elif not rel.endswith(".ilp"):
            assert theirs.read_bytes() == ours.read_bytes(), rel
    ilp = "pixel_classifier.ilp"
    ignore = ("time", "datasetId", "filePath", "nickname")
    assert describe(boxed / ilp, ignore) == describe(host / ilp, ignore)


# --------------------------------------------------------------------------------------------
# --engine docker with the fake ilastik in the full image


@pytest.fixture
def data(tmp_path) -> Path:
    """A data folder with three steinbock images and a project, and the fake's folder."""
    folder = tmp_path / "data"
    shutil.copytree(REFERENCE_IMG, folder / "ilastik_img")
    shutil.copy2(EXAMPLE / "pretrained.ilp", folder / "pretrained.ilp")
    past = 1_600_000_000
    for path in [folder / "pretrained.ilp", *(folder / "ilastik_img").iterdir()]:
        os.utime(path, (past, past))
    return folder


@pytest.fixture
def fake(data) -> FakeIlastik:
    return FakeIlastik(data / Path(docker_images.FAKE_DIR).name)


def engine_docker(image: str, *args: str) -> list[str]:
    """``classify ilastik run --engine docker`` on the data folder's project."""
    run = "classify ilastik run --engine docker --ilp pretrained.ilp".split()
    return [*run, "--docker-image", image, *args]


def host_mounts(call: dict) -> set[str]:
    """What a container call saw mounted apart from its root, /proc, /sys, /dev and Docker's."""
    return {
        m
        for m in call["mounts"]
        if m != "/"
        and m.split("/")[1] not in ("proc", "sys", "dev")
        and m not in DOCKER_OWN_MOUNTS
        and not m.endswith("/docker-init")  # --init: /sbin or /usr/sbin
    }


def test_engine_docker_chunks_failures_and_cleanup(images, new_containers, data, fake):
    fake.configure(fail_on=["20210305_NE_mockData1_002"])
    result = steinpix(*engine_docker(images.full, "--chunk", "1"), cwd=data)
    assert result.returncode != 0
    assert "1 of 3 images failed" in result.stderr + result.stdout
    assert "20210305_NE_mockData1_002" in result.stderr

    out = data / "ilastik_probabilities"
    assert sorted(p.name for p in out.iterdir()) == [
        "20210305_NE_mockData1_001.tiff",
        "20210305_NE_mockData1_003.tiff",
    ]
    for path in out.iterdir():
        assert path.read_bytes() == fake.tiff.read_bytes()
    calls = fake.calls()
    assert len(calls) == 3
    for call in calls:
        assert (call["uid"], call["gid"]) == (os.getuid(), os.getgid())
        assert host_mounts(call) == {"/data"}
        assert call["cwd"] == "/data"
        assert call["argv"][1] == "--project=/data/pretrained.ilp"
        assert call["argv"][-1].startswith("/data/ilastik_img/")
        assert call["env"]["HOME"] == "/tmp"
    assert new_containers() == set()

    fake.configure()  # the rerun only classifies the failed image
    result = steinpix(*engine_docker(images.full, "--chunk", "1"), cwd=data)
    assert result.returncode == 0, result.stderr
    assert len(fake.calls()) == 4 and len(list(out.iterdir())) == 3
    assert new_containers() == set()


def test_engine_docker_ctrl_c_stops_and_removes_the_container(images, new_containers, data, fake):
    fake.configure(slow_on=["20210305_NE_mockData1_001"])
    proc = subprocess.Popen(
        [*STEINPIX, *engine_docker(images.full)],
        cwd=data,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        fake.wait_for("started", timeout=120)
        assert len(new_containers()) == 1
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert time.monotonic() - start < 30
    assert "Interrupted: stopping container" in stderr
    assert new_containers() == set()
    out = data / "ilastik_probabilities"
    assert not out.exists() or list(out.iterdir()) == []


def test_engine_docker_missing_image(images, data):
    result = steinpix(*engine_docker("steinpix-test:does-not-exist"), cwd=data)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("Error: Docker image steinpix-test:does-not-exist not found")


def test_engine_docker_daemon_not_running(data, tmp_path):
    result = steinpix(
        *engine_docker("steinpix-test:slim"),
        cwd=data,
        env={"DOCKER_HOST": f"unix://{tmp_path}/not-running.sock"},
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("Error: Docker daemon not reachable")


# --------------------------------------------------------------------------------------------
# apps ilastik --docker


def test_apps_ilastik_docker_passes_arguments_and_x11(images, new_containers, data, fake, tmp_path):
    fake.configure(exit_code=3)
    xauthority = tmp_path / "xauth"
    xauthority.write_bytes(b"cookie")
    args = ["--project=pretrained.ilp", "--new_project_name=x"]
    result = steinpix(
        "apps",
        "ilastik",
        "--docker",
        "--docker-image",
        images.full,
        *args,
        cwd=data,
        env={"DISPLAY": ":7", "XAUTHORITY": str(xauthority)},
    )
    assert result.returncode == 3, result.stderr
    assert "fake ilastik: GUI" in result.stdout
    (call,) = fake.calls()
    assert call["argv"] == args
    assert call["cwd"] == "/data"
    assert (call["uid"], call["gid"]) == (os.getuid(), os.getgid())
    assert call["env"]["DISPLAY"] == ":7"
    assert call["env"]["XAUTHORITY"] == "/tmp/.Xauthority"
    assert call["env"]["QT_X11_NO_MITSHM"] == "1"
    assert call["hostname"] == socket.gethostname()
    expected = {"/data", "/tmp/.Xauthority"} | (
        {"/tmp/.X11-unix"} if Path("/tmp/.X11-unix").is_dir() else set()
    )
    assert host_mounts(call) == expected
    assert new_containers() == set()


def test_full_image_entry_point_and_ilastik(images, client):
    output = client.containers.run(images.full, ["--version"], remove=True, network_mode="none")
    assert output.decode().startswith("steinpix, version")
    listing = client.containers.run(
        images.full,
        ["-c", "ls /opt/ilastik"],
        entrypoint=["/bin/sh"],
        remove=True,
        network_mode="none",
    )
    assert listing.decode().split() == ["fake_ilastik.py", "run_ilastik.sh"]
