"""``steinpix apps ilastik``: ilastik's GUI (or any ilastik command line), locally or in Docker."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from steinpix import runners
from steinpix._cli.utils import ilastik_binary_option, one_line_errors, verbosity_option
from steinpix.errors import SteinpixError

logger = logging.getLogger("steinpix")

X11_SOCKET_DIR = "/tmp/.X11-unix"
CONTAINER_XAUTHORITY = "/tmp/.Xauthority"
# Docker Desktop's name for the host, where XQuartz (macOS) or an X server on Windows listens
DOCKER_HOST_DISPLAY = "host.docker.internal:0"
DOCKER_DISPLAY_ENV_VAR = "STEINPIX_DOCKER_DISPLAY"
# Arguments with which ilastik opens no window
NO_WINDOW_ARGS = ("--headless", "--help", "-h")
INTERRUPTED_EXIT_CODE = 130


def _platform() -> str:
    return sys.platform


def _uses_x11(platform: str) -> bool:
    """Linux and the BSDs draw windows through X11 or Wayland; macOS and Windows do not."""
    return not (platform.startswith("darwin") or platform.startswith("win"))


def needs_display(ilastik_args: Sequence[str]) -> bool:
    return not any(arg in NO_WINDOW_ARGS for arg in ilastik_args)


def check_display(env: Mapping[str, str], platform: str) -> None:
    """Fail with one line, instead of a Qt crash, when a Linux GUI has no display to use."""
    if _uses_x11(platform) and not (env.get("DISPLAY") or env.get("WAYLAND_DISPLAY")):
        raise SteinpixError(
            "no display: neither $DISPLAY nor $WAYLAND_DISPLAY is set, so ilastik's GUI cannot "
            "open a window (use a desktop session or ssh -X; for batch work use "
            "steinpix classify ilastik run)",
            exit_code=2,
        )


def exit_code(code: int) -> int:
    """A shell's exit status for a process result: ``128 + n`` when killed by signal ``n``."""
    return 128 - code if code < 0 else code


def run_gui_local(ilastik: str | None, ilastik_args: Sequence[str]) -> int:
    """Run the local ilastik with ``ilastik_args``; return its exit status.

    Lookup and environment are those of ``classify ilastik run`` (:func:`runners.find_ilastik`,
    :func:`runners.ilastik_env`); ilastik's output goes to the terminal as it is.
    """
    binary = runners.find_ilastik(ilastik, alternative="use --docker")
    if needs_display(ilastik_args):
        check_display(os.environ, _platform())
    logger.debug("Running %s %s", binary, " ".join(ilastik_args))
    try:
        code = runners.run_process([binary, *ilastik_args], runners.ilastik_env())
    except KeyboardInterrupt:
        return INTERRUPTED_EXIT_CODE
    except OSError as e:
        raise SteinpixError(f"cannot run ilastik {binary}: {e.strerror or e}", 2) from None
    return exit_code(code)


def _xauthority_file(env: Mapping[str, str]) -> Path | None:
    candidate = Path(env["XAUTHORITY"]) if env.get("XAUTHORITY") else Path.home() / ".Xauthority"
    return candidate if candidate.is_file() else None


def docker_gui_settings(
    env: Mapping[str, str],
    platform: str,
    data_dir: Path,
) -> dict[str, Any]:
    """Container settings for ilastik's GUI, following steinbock's documented X11 setup.

    Linux: ``$DISPLAY`` is passed on, ``/tmp/.X11-unix`` and the X authority file (read-only)
    are mounted, and the container gets the host's name so that the authority cookie applies,
    and no network; a display reached over TCP (``ssh -X``, ``localhost:10.0``) needs the host's
    network instead. macOS (XQuartz) and Windows: the X server on the host is reached at
    ``host.docker.internal:0``. ``$STEINPIX_DOCKER_DISPLAY`` overrides the display everywhere.

    Returns
    -------
    settings : dict
        ``volumes``, ``environment`` and further ``containers.create`` keywords.
    """
    volumes = runners.DataMount(data_dir).volumes()
    environment = {"HOME": runners.CONTAINER_HOME, "QT_X11_NO_MITSHM": "1"}
    extra: dict[str, Any] = {}
    display = env.get(DOCKER_DISPLAY_ENV_VAR, "")
    if _uses_x11(platform):
        display = display or env.get("DISPLAY", "")
        if not display:
            raise SteinpixError(
                "no X11 display: $DISPLAY is not set, so ilastik's GUI cannot open a window "
                "from the container (use a desktop session or ssh -X)",
                exit_code=2,
            )
        if Path(X11_SOCKET_DIR).is_dir():
            volumes[X11_SOCKET_DIR] = {"bind": X11_SOCKET_DIR, "mode": "rw"}
        xauthority = _xauthority_file(env)
        if xauthority is not None:
            volumes[str(xauthority)] = {"bind": CONTAINER_XAUTHORITY, "mode": "ro"}
            environment["XAUTHORITY"] = CONTAINER_XAUTHORITY
        if display.split(":", 1)[0] not in ("", "unix"):
            # host:N is a TCP display (ssh -X): only the host's network reaches it
            extra["network_mode"] = "host"
        else:
            # the X server's socket is a file in the mounted /tmp/.X11-unix: no network needed
            extra["network_mode"] = "none"
            extra["hostname"] = socket.gethostname()
    else:
        display = display or DOCKER_HOST_DISPLAY
    environment["DISPLAY"] = display
    return {"volumes": volumes, "environment": environment, **extra}


def run_gui_docker(
    ilastik_args: Sequence[str],
    image: str = runners.DEFAULT_DOCKER_IMAGE,
    *,
    client: Any = None,
    env: Mapping[str, str] | None = None,
    platform: str | None = None,
    data_dir: Path | None = None,
) -> int:
    """Run ilastik with ``ilastik_args`` from the steinpix image; return its exit status.

    The current directory is mounted at ``/data`` (ilastik's working directory), the container
    runs as the caller's ``uid:gid``, streams its output to stdout and is removed afterwards.
    """
    env = os.environ if env is None else env
    platform = _platform() if platform is None else platform
    data_dir = Path.cwd() if data_dir is None else data_dir
    settings = (
        docker_gui_settings(env, platform, data_dir)
        if needs_display(ilastik_args)
        else {
            "volumes": runners.DataMount(data_dir).volumes(),
            "environment": {"HOME": runners.CONTAINER_HOME},
            "network_mode": "none",
        }
    )
    client = runners.docker_client(client)
    runners.require_image(client, image)
    try:
        code = runners.run_container(
            client,
            image,
            entrypoint=[runners.CONTAINER_ILASTIK],
            command=list(ilastik_args),
            user=runners.container_user(client),
            output=sys.stdout,
            **settings,
        )
    except KeyboardInterrupt:
        return INTERRUPTED_EXIT_CODE
    return exit_code(code)


@click.group(name="apps", help="Third-party applications")
def apps_group() -> None:
    pass


@apps_group.command(
    name="ilastik",
    context_settings={"ignore_unknown_options": True},
    help="Run Ilastik GUI",
    # like steinbock: --help goes to ilastik; docs/ilastik-and-docker.md lists these options
    add_help_option=False,
)
@ilastik_binary_option("Ilastik binary")
@click.option(
    "--docker",
    "use_docker",
    is_flag=True,
    default=False,
    help="Run ilastik from the steinpix Docker image (X11)",
)
@click.option(
    "--docker-image",
    default=runners.DEFAULT_DOCKER_IMAGE,
    show_default=True,
    help="Image for --docker",
)
@click.argument("ilastik_args", nargs=-1, type=click.UNPROCESSED)
@verbosity_option
@one_line_errors
def ilastik_cmd(
    ilastik_binary: str | None,
    use_docker: bool,
    docker_image: str,
    ilastik_args: tuple[str, ...],
) -> None:
    if use_docker:
        code = run_gui_docker(ilastik_args, docker_image)
    else:
        code = run_gui_local(ilastik_binary, ilastik_args)
    sys.exit(code)
