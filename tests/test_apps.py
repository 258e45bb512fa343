"""``steinpix apps ilastik``: passthrough to a fake ilastik, display checks, GUI in Docker."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner
from fake_ilastik import FakeIlastik, StandInDockerClient

from steinpix import runners
from steinpix._cli import apps
from steinpix._cli.main import main
from steinpix.errors import SteinpixError


@pytest.fixture
def fake(tmp_path: Path) -> FakeIlastik:
    return FakeIlastik(tmp_path / "ilastik")


@pytest.fixture
def linux_desktop(monkeypatch):
    monkeypatch.setattr(apps, "_platform", lambda: "linux")
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)


def invoke(*args: str, env: dict[str, str | None] | None = None):
    return CliRunner().invoke(main, ["apps", "ilastik", *args], env=env, catch_exceptions=False)


# --------------------------------------------------------------------------------------------
# local ilastik


def test_passes_arguments_and_cleaned_environment(fake, linux_desktop, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/not/for/ilastik")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/not/for/ilastik")
    result = invoke("--ilastik", str(fake.path), "--project=my project.ilp", "--debug", "x.h5")
    assert result.exit_code == 0, result.output
    (call,) = fake.calls()
    assert call["argv"] == ["--project=my project.ilp", "--debug", "x.h5"]
    assert "PYTHONPATH" not in call["env"] and "LD_LIBRARY_PATH" not in call["env"]
    assert call["env"]["DISPLAY"] == ":0"
    assert not any(name.startswith("LAZYFLOW_") for name in call["env"])


def test_help_goes_to_ilastik_like_steinbock(fake, linux_desktop):
    result = invoke("--ilastik", str(fake.path), "--help")
    assert result.exit_code == 0
    assert fake.calls()[0]["argv"] == ["--help"]


def test_binary_from_environment_and_exit_code(fake, linux_desktop, monkeypatch):
    monkeypatch.setenv(runners.ILASTIK_ENV_VAR, str(fake.path))
    fake.configure(exit_code=3)
    result = invoke("--new_project=x.ilp")
    assert result.exit_code == 3
    assert fake.calls()[0]["argv"] == ["--new_project=x.ilp"]


def test_missing_display_is_one_line(fake, monkeypatch):
    monkeypatch.setattr(apps, "_platform", lambda: "linux")
    result = invoke("--ilastik", str(fake.path), env={"DISPLAY": None, "WAYLAND_DISPLAY": None})
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: no display")
    assert fake.calls() == []


def test_wayland_or_headless_need_no_x11(fake, monkeypatch):
    monkeypatch.setattr(apps, "_platform", lambda: "linux")
    result = invoke("--ilastik", str(fake.path), env={"DISPLAY": None, "WAYLAND_DISPLAY": "w-0"})
    assert result.exit_code == 0
    result = invoke("--ilastik", str(fake.path), "--headless", env={"DISPLAY": None})
    assert result.exit_code == 0
    assert len(fake.calls()) == 2


def test_macos_needs_no_display_variable(fake, monkeypatch):
    monkeypatch.setattr(apps, "_platform", lambda: "darwin")
    result = invoke("--ilastik", str(fake.path), env={"DISPLAY": None, "WAYLAND_DISPLAY": None})
    assert result.exit_code == 0


def test_ilastik_not_found(tmp_path, linux_desktop):
    result = invoke("--ilastik", str(tmp_path / "missing.sh"))
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "or use --docker" in result.output


def test_exit_code_of_a_killed_ilastik():
    assert apps.exit_code(-9) == 137
    assert apps.exit_code(4) == 4


# --------------------------------------------------------------------------------------------
# GUI from the Docker image, against a stand-in client


@pytest.fixture
def docker_sdk():
    return pytest.importorskip("docker", reason="the Docker SDK (steinpix[docker]) is needed")


def test_docker_gui_linux_settings(docker_sdk, tmp_path, monkeypatch):
    xauthority = tmp_path / "xauth"
    xauthority.write_bytes(b"cookie")
    env = {"DISPLAY": ":1", "XAUTHORITY": str(xauthority), "PYTHONPATH": "/host"}
    client = StandInDockerClient(images=("my/steinpix:1",), log_chunks=[b"qt says hi\n"])
    code = apps.run_gui_docker(
        ["--project=p.ilp"],
        "my/steinpix:1",
        client=client,
        env=env,
        platform="linux",
        data_dir=tmp_path,
    )
    assert code == 0
    (container,) = client.containers.created
    s = container.settings
    assert s["image"] == "my/steinpix:1"
    assert s["entrypoint"] == ["/opt/ilastik/run_ilastik.sh"]
    assert s["command"] == ["--project=p.ilp"]
    assert s["user"] == f"{os.getuid()}:{os.getgid()}"
    assert s["working_dir"] == "/data"
    assert s["environment"] == {
        "DISPLAY": ":1",
        "HOME": "/tmp",
        "QT_X11_NO_MITSHM": "1",
        "XAUTHORITY": "/tmp/.Xauthority",
    }
    volumes = s["volumes"]
    assert volumes[str(tmp_path.resolve())] == {"bind": "/data", "mode": "rw"}
    assert volumes[str(xauthority)] == {"bind": "/tmp/.Xauthority", "mode": "ro"}
    if Path("/tmp/.X11-unix").is_dir():
        assert volumes["/tmp/.X11-unix"] == {"bind": "/tmp/.X11-unix", "mode": "rw"}
    assert s["hostname"] == socket.gethostname() and s["network_mode"] == "none"
    assert container.events == ["start", "logs", "wait", "remove(force=True)"]


@pytest.mark.parametrize("display", [":0", "unix:0", ":1.0"])
def test_docker_gui_local_display_needs_no_network(tmp_path, display):
    settings = apps.docker_gui_settings({"DISPLAY": display}, "linux", tmp_path)
    assert settings["network_mode"] == "none" and settings["environment"]["DISPLAY"] == display


def test_docker_gui_over_ssh_uses_host_network(docker_sdk, tmp_path):
    client = StandInDockerClient(images=(runners.DEFAULT_DOCKER_IMAGE,))
    apps.run_gui_docker(
        [], client=client, env={"DISPLAY": "localhost:10.0"}, platform="linux", data_dir=tmp_path
    )
    (container,) = client.containers.created
    assert container.settings["network_mode"] == "host"
    assert "hostname" not in container.settings
    assert container.settings["environment"]["DISPLAY"] == "localhost:10.0"


def test_docker_gui_macos_uses_xquartz_on_the_host(docker_sdk, tmp_path):
    client = StandInDockerClient(images=(runners.DEFAULT_DOCKER_IMAGE,))
    apps.run_gui_docker([], client=client, env={}, platform="darwin", data_dir=tmp_path)
    (container,) = client.containers.created
    assert container.settings["environment"]["DISPLAY"] == "host.docker.internal:0"
    assert list(container.settings["volumes"]) == [str(tmp_path.resolve())]


def test_docker_gui_without_display(docker_sdk, tmp_path):
    client = StandInDockerClient(images=(runners.DEFAULT_DOCKER_IMAGE,))
    with pytest.raises(SteinpixError, match="no X11 display") as info:
        apps.run_gui_docker([], client=client, env={}, platform="linux", data_dir=tmp_path)
    assert info.value.exit_code == 2
    assert client.containers.created == []


def test_docker_gui_ctrl_c(docker_sdk, tmp_path):
    client = StandInDockerClient(
        images=(runners.DEFAULT_DOCKER_IMAGE,), log_chunks=[KeyboardInterrupt()]
    )
    code = apps.run_gui_docker(
        [], client=client, env={"DISPLAY": ":0"}, platform="linux", data_dir=tmp_path
    )
    assert code == 130
    assert client.containers.created[0].events[-1] == "remove(force=True)"
    assert any(e.startswith("stop") for e in client.containers.created[0].events)


def test_docker_option_on_the_command_line(docker_sdk, tmp_path, monkeypatch, linux_desktop):
    client = StandInDockerClient(images=("img:1",), exit_codes=[5])
    monkeypatch.setattr(docker_sdk, "from_env", lambda: client)
    monkeypatch.chdir(tmp_path)
    result = invoke("--docker", "--docker-image", "img:1", "--project=a.ilp")
    assert result.exit_code == 5, result.output
    (container,) = client.containers.created
    assert container.settings["image"] == "img:1"
    assert container.settings["command"] == ["--project=a.ilp"]


def test_docker_image_missing_on_the_command_line(docker_sdk, tmp_path, monkeypatch, linux_desktop):
    monkeypatch.setattr(docker_sdk, "from_env", lambda: StandInDockerClient())
    monkeypatch.chdir(tmp_path)
    result = invoke("--docker")
    assert result.exit_code == 2
    assert result.output.startswith("Error: Docker image steinpix:latest not found")
