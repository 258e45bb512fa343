"""Run the real ilastik for ``classify ilastik run``: a local binary, or the steinpix Docker image.

Both engines run ilastik 1.3.3post3's headless pixel classification with exactly steinbock's
arguments (:func:`headless_args`), optionally in chunks of images. ilastik writes into a hidden
temporary folder inside the output folder, and each finished ``<stem>-img.tiff`` is moved to
``<stem>.tiff`` only after its chunk ended with exit code 0, so an interrupted or failed run never
leaves a partial probability image behind. The files themselves are ilastik's, byte for byte.
ilastik's Uncertainty and Simple Segmentation exports (``run --uncertainty/--segmentation``) are
one more ilastik call each per chunk, moved into their folders the same way
(:data:`EXPORT_ARGS`, :func:`classify_chunk`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

from steinpix.atomic import make_folder
from steinpix.errors import SteinpixError, first_line
from steinpix.outputs import output_name

logger = logging.getLogger("steinpix")

DEFAULT_ILASTIK = "/opt/ilastik/run_ilastik.sh"
# The tag that docs/ilastik-and-docker.md builds this repository's Dockerfile as
# (`docker build -t steinpix .`); published images are passed with --docker-image.
DEFAULT_DOCKER_IMAGE = "steinpix:latest"
ILASTIK_ENV_VAR = "STEINPIX_ILASTIK"
ILASTIK_ON_PATH = "run_ilastik.sh"

# ilastik's bundled Python must not see the calling Python's paths or libraries.
DROPPED_ENV_VARS = ("PYTHONPATH", "PYTHONHOME", "LD_LIBRARY_PATH")

IMG_DATASET = "img"
TEMP_PREFIX = ".steinpix-"

CONTAINER_DATA_DIR = PurePosixPath("/data")
CONTAINER_ILASTIK = DEFAULT_ILASTIK
# The container user is the caller's uid, which has no home in the image.
CONTAINER_HOME = "/tmp"

# Seconds ilastik gets to stop after SIGINT, then again after SIGTERM, before SIGKILL.
STOP_GRACE_S = 10.0

ChunkRunner = Callable[..., int]
"""``run_chunk(files, tmp_dir, export="probabilities")``: runs ilastik's export ``export``
(a key of :data:`EXPORT_ARGS`) of ``files`` into ``tmp_dir``; returns ilastik's exit code."""

# ilastik's export arguments per output: steinbock's for the probabilities, and the same form
# for the uncertainty and the simple segmentation (steinpix.exports says what they hold).
EXPORT_ARGS = {
    "probabilities": (
        "--export_source=Probabilities",
        "--export_dtype=uint16",
        "--pipeline_result_drange=(0.0,1.0)",
        "--export_drange=(0,65535)",
    ),
    "uncertainty": (
        "--export_source=Uncertainty",
        "--export_dtype=uint16",
        "--pipeline_result_drange=(0.0,1.0)",
        "--export_drange=(0,65535)",
    ),
    "segmentation": (
        "--export_source=Simple Segmentation",
        "--export_dtype=uint8",
        "--pipeline_result_drange=(0,255)",
        "--export_drange=(0,255)",
    ),
}


# --------------------------------------------------------------------------------------------
# Binary lookup, environment and arguments


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _not_found(what: str, alternative: str) -> SteinpixError:
    return SteinpixError(
        f"ilastik not found: {what}; install ilastik 1.3.3post3 and pass --ilastik PATH "
        f"(or set ${ILASTIK_ENV_VAR}), or {alternative}",
        exit_code=2,
    )


def _check_given(value: str, source: str, alternative: str) -> Path:
    """Resolve a binary named by the user: a path, or a bare command name looked up on PATH."""
    path = Path(value).expanduser()
    if not path.exists() and os.sep not in value and "/" not in value:
        on_path = shutil.which(value)
        if on_path is not None:
            return Path(on_path)
    if not path.exists():
        raise _not_found(f"{value} ({source}) does not exist", alternative)
    if not _is_executable(path):
        raise _not_found(f"{value} ({source}) is not an executable file", alternative)
    return path


def find_ilastik(
    explicit: str | os.PathLike | None = None, alternative: str = "use --engine builtin"
) -> Path:
    """The ilastik launcher to run, as steinpix looks it up.

    Order: ``explicit`` (``--ilastik PATH``), then ``$STEINPIX_ILASTIK``, then
    ``/opt/ilastik/run_ilastik.sh`` (where steinbock's and steinpix's Docker images have it), then
    ``run_ilastik.sh`` on ``PATH``. A bare name such as ``ilastik`` given explicitly is also looked
    up on ``PATH``. ``alternative`` ends the not-found message (what else the user can do).

    Raises
    ------
    SteinpixError
        With exit code 2 when the chosen file is missing or not executable, or nothing is found.
    """
    if explicit is not None and str(explicit) != "":
        return _check_given(str(explicit), "--ilastik", alternative)
    from_env = os.environ.get(ILASTIK_ENV_VAR, "")
    if from_env:
        return _check_given(from_env, f"${ILASTIK_ENV_VAR}", alternative)
    if _is_executable(Path(DEFAULT_ILASTIK)):
        return Path(DEFAULT_ILASTIK)
    on_path = shutil.which(ILASTIK_ON_PATH)
    if on_path is not None:
        return Path(on_path)
    raise _not_found(f"neither {DEFAULT_ILASTIK} nor {ILASTIK_ON_PATH} on PATH", alternative)


def lazyflow_env(threads: int | None = None, mem: int | None = None) -> dict[str, str]:
    """ilastik's resource limits: ``LAZYFLOW_THREADS`` and ``LAZYFLOW_TOTAL_RAM_MB`` (MiB).

    Only the limits that are given are set; ilastik's defaults (all cores, all memory) apply
    otherwise.
    """
    env = {}
    if threads is not None:
        env["LAZYFLOW_THREADS"] = str(int(threads))
    if mem is not None:
        env["LAZYFLOW_TOTAL_RAM_MB"] = str(int(mem))
    return env


def ilastik_env(
    threads: int | None = None,
    mem: int | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment to run ilastik in.

    A copy of ``base`` (default: ``os.environ``) without ``PYTHONPATH``, ``PYTHONHOME`` and
    ``LD_LIBRARY_PATH``, which would make ilastik's bundled Python load the caller's modules and
    libraries, plus :func:`lazyflow_env`. Variables the user set (including their own
    ``LAZYFLOW_*``) are otherwise kept.
    """
    env = dict(os.environ if base is None else base)
    for name in DROPPED_ENV_VARS:
        env.pop(name, None)
    env.update(lazyflow_env(threads, mem))
    return env


def _join(path: str | os.PathLike, name: str) -> PurePath:
    # keep the path's flavour: container paths stay POSIX on any host
    return path / name if isinstance(path, PurePath) else Path(path) / name


def headless_args(
    ilp: str | os.PathLike,
    img_files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    export: str = "probabilities",
) -> list[str]:
    """ilastik's command-line arguments (without the binary), exactly as steinbock builds them.

    Probabilities of each ``<file>.h5/img`` are exported as YXC uint16 TIFFs
    ``<out_dir>/<stem>-img.tiff`` (``{nickname}`` is ``<stem>-img``), scaled from (0, 1) to
    (0, 65535). ``export="uncertainty"`` or ``"segmentation"`` asks for ilastik's
    ``Uncertainty`` (uint16, scaled the same way) or ``Simple Segmentation`` (uint8 labels)
    instead, with the same file names (:data:`EXPORT_ARGS`).
    """
    source, dtype, pipeline_drange, export_drange = EXPORT_ARGS[export]
    args = [
        "--headless",
        f"--project={ilp}",
        "--readonly",
        "--input_axes=cyx",
        source,
        "--output_format=tiff",
        f"--output_filename_format={_join(out_dir, '{nickname}.tiff')}",
        dtype,
        "--output_axis_order=yxc",
        pipeline_drange,
        export_drange,
    ]
    args += [str(_join(img_file, IMG_DATASET)) for img_file in img_files]
    return args


def ilastik_output_name(img_file: str | os.PathLike) -> str:
    """The file name ilastik exports for ``<stem>.h5``: ``<stem>-img.tiff``."""
    return f"{PurePath(img_file).stem}-{IMG_DATASET}.tiff"


# --------------------------------------------------------------------------------------------
# Processes and signals


@contextlib.contextmanager
def _termination_interrupts() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt while ilastik runs.

    ilastik runs in its own session (see :func:`run_process`), so a ``kill`` of steinpix, a batch
    system's cancel or a closed terminal would otherwise leave it running and its temporary
    files behind. Signal handlers can only be set from the main thread; elsewhere this does
    nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    wanted = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {signum: signal.signal(signum, interrupt) for signum in wanted}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _signal_group(proc: subprocess.Popen, signum: int) -> bool:
    """Send ``signum`` to ilastik's process group; False when nothing is left in it."""
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signum)
        elif signum == signal.SIGINT:
            proc.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_process(proc: subprocess.Popen, grace: float | None = None) -> None:
    """Stop ilastik and everything it started: SIGINT, then SIGTERM, then SIGKILL.

    ``run_ilastik.sh`` is a shell script that runs ilastik's Python as a child, so the whole
    process group is signalled, not only the script. Each step waits ``grace`` seconds (default
    :data:`STOP_GRACE_S`); a second Ctrl-C skips straight to SIGKILL.
    """
    grace = STOP_GRACE_S if grace is None else grace
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            if proc.poll() is not None or not _signal_group(proc, signum):
                break
            try:
                proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
    except KeyboardInterrupt:
        pass
    # whatever is left of the group (the script's children, or an ilastik that ignores signals)
    if os.name == "posix":
        _signal_group(proc, signal.SIGKILL)
    elif proc.poll() is None:
        proc.kill()
    proc.wait()


def run_process(
    args: Sequence[str | os.PathLike],
    env: Mapping[str, str] | None = None,
    *,
    stdout: int | None = None,
    grace: float | None = None,
) -> int:
    """Run a command to completion, its output live on the terminal; return its exit code.

    The command gets its own session (process group), so steinpix decides how it is stopped: on
    Ctrl-C (KeyboardInterrupt), SIGTERM or SIGHUP it is stopped with :func:`stop_process` and
    KeyboardInterrupt is raised again. A command killed by a signal returns ``-signum``.

    Parameters
    ----------
    args
        The command and its arguments.
    env
        Its environment (default: inherited).
    stdout
        File descriptor for its standard output (default: inherited); standard error is inherited.
    grace
        Seconds to wait at each stop step (default :data:`STOP_GRACE_S`).
    """
    popen_kwargs: dict[str, Any] = {}
    if os.name == "posix":
        popen_kwargs["start_new_session"] = True
    else:
        popen_kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
    with _termination_interrupts():
        proc = subprocess.Popen(
            [str(a) for a in args],
            env=None if env is None else dict(env),
            stdout=stdout,
            **popen_kwargs,
        )
        try:
            return proc.wait()
        except KeyboardInterrupt:
            logger.warning("Interrupted: stopping %s", Path(str(args[0])).name)
            stop_process(proc, grace)
            raise


def _stderr_fd() -> int | None:
    """ilastik's log goes to steinpix's stderr, keeping stdout for the list of outputs."""
    try:
        os.fstat(2)
    except OSError:
        return None
    return 2


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# --------------------------------------------------------------------------------------------
# Chunks and outputs


def split_chunks(items: Sequence[Path], chunk: int | None) -> list[list[Path]]:
    """``items`` in consecutive groups of at most ``chunk`` (None: one group with everything)."""
    items = list(items)
    if chunk is not None and chunk < 1:
        raise SteinpixError(f"--chunk {chunk}: must be at least 1", exit_code=2)
    if chunk is None or chunk >= len(items):
        return [items] if items else []
    return [items[i : i + chunk] for i in range(0, len(items), chunk)]


def check_unique_stems(img_files: Sequence[Path]) -> None:
    """Fail when two images would write the same output (outputs are named after the stem).

    Images in different subfolders with the same name would overwrite each other's
    probabilities (steinbock loses one silently).
    """
    seen: dict[str, Path] = {}
    for img_file in img_files:
        other = seen.setdefault(img_file.stem, img_file)
        if other != img_file:
            raise SteinpixError(
                f"{other} and {img_file} would both be written as {output_name(img_file)}; "
                "rename one of them"
            )


def _names(files: Sequence[Path]) -> str:
    return ", ".join(f.name for f in files)


def _collect_outputs(
    files: Sequence[Path], tmp_dirs: Mapping[str, Path], out_dirs: Mapping[str, Path]
) -> dict[Path, list[str]]:
    """Move the outputs of every image that got all of them into place; return the others
    with the outputs they lack."""
    missing = {}
    for img_file in files:
        produced = {name: tmp_dirs[name] / ilastik_output_name(img_file) for name in tmp_dirs}
        lacking = [name for name, path in produced.items() if not path.is_file()]
        if lacking:
            missing[img_file] = lacking
            continue
        for name, path in produced.items():
            # same folder, so the rename is atomic: <out>/<stem>.tiff is either old or complete
            os.replace(path, out_dirs[name] / output_name(img_file))
    for img_file, lacking in missing.items():
        logger.error(
            "ilastik exited with code 0 but wrote no %s for %s", " or ".join(lacking), img_file.name
        )
    return missing


def classify_chunk(
    files: Sequence[Path],
    out_dir: str | os.PathLike,
    run_chunk: ChunkRunner,
    *,
    label: str = "chunk",
    engine: str = "ilastik",
    exports: Mapping[str, str | os.PathLike] | None = None,
) -> dict[Path, str]:
    """Run ilastik once per output on a chunk and move the finished outputs into place.

    ``run_chunk(files, tmp_dir)`` exports the probabilities, then ``run_chunk(files, tmp_dir,
    name)`` each of ``exports`` (one more ilastik call each). Every call writes into a fresh
    hidden folder ``<its output folder>/.steinpix-<pid>-XXXX/`` that is removed afterwards in
    all cases (failure, Ctrl-C). A call that returns non-zero fails the chunk for all its
    images (ilastik may have stopped in the middle of writing one), and nothing of the chunk
    is moved into place; nor is anything of an image that lacks one of its outputs.

    Parameters
    ----------
    files
        The images of this chunk.
    out_dir
        An existing folder for the ``<stem>.tiff`` outputs.
    run_chunk
        A :data:`ChunkRunner`.
    label, engine
        Name the chunk and the engine in the log.
    exports
        More outputs: ``{"uncertainty": folder, "segmentation": folder}`` (either or both;
        existing folders).

    Returns
    -------
    failed : dict of Path to str
        The images without an output, with the reason (failures are logged, not raised).
    """
    files = [Path(f) for f in files]
    out_dirs = {"probabilities": Path(out_dir), **{k: Path(v) for k, v in (exports or {}).items()}}
    logger.info("%s: %s (%d images: %s)", engine, label, len(files), _names(files))
    tmp_dirs: dict[str, Path] = {}
    try:
        for name, folder in out_dirs.items():
            tmp_dirs[name] = Path(
                tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=folder)
            )
            if name == "probabilities":
                code = run_chunk(files, tmp_dirs[name])
            else:
                logger.info("%s: %s, %s export", engine, label, name)
                code = run_chunk(files, tmp_dirs[name], name)
            if code != 0:
                what = "" if name == "probabilities" else f"{name} export, "
                logger.error(
                    "%s failed on %s (%s%s); nothing written for %s",
                    engine,
                    label,
                    what,
                    describe_exit(code),
                    _names(files),
                )
                reason = f"{engine} failed on {label} ({what}{describe_exit(code)})"
                return {f: reason for f in files}
        missing = _collect_outputs(files, tmp_dirs, out_dirs)
        return {
            f: f"{engine} exited with code 0 but wrote no {' or '.join(lacking)}"
            for f, lacking in missing.items()
        }
    finally:
        for tmp_dir in tmp_dirs.values():
            shutil.rmtree(tmp_dir, ignore_errors=True)


def run_chunks(
    img_files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    run_chunk: ChunkRunner,
    *,
    chunk: int | None = None,
    engine: str = "ilastik",
    exports: Mapping[str, str | os.PathLike] | None = None,
) -> list[Path]:
    """:func:`classify_chunk` for each chunk of ``img_files``; returns the failed images.

    The output folders (``out_dir`` and those of ``exports``) are created if missing.
    """
    img_files = [Path(f) for f in img_files]
    groups = split_chunks(img_files, chunk)
    if not groups:
        return []
    check_unique_stems(img_files)
    out_dir = Path(out_dir)
    for folder in (out_dir, *(exports or {}).values()):
        make_folder(folder)
    failed: list[Path] = []
    for i, files in enumerate(groups, start=1):
        failed += classify_chunk(
            files,
            out_dir,
            run_chunk,
            label=f"chunk {i}/{len(groups)}",
            engine=engine,
            exports=exports,
        )
    return failed


# --------------------------------------------------------------------------------------------
# Local engine


def run_ilastik(
    ilastik: str | os.PathLike,
    ilp: str | os.PathLike,
    img_files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    threads: int | None = None,
    mem: int | None = None,
    chunk: int | None = None,
    exports: Mapping[str, str | os.PathLike] | None = None,
) -> list[Path]:
    """Classify ``img_files`` (steinbock ``.h5`` images) with a local ilastik binary.

    Parameters
    ----------
    ilastik
        The launcher, e.g. from :func:`find_ilastik`.
    ilp
        The trained pixel classification project.
    img_files
        The images to classify (only those still pending).
    out_dir
        Where ``<stem>.tiff`` probabilities go; created if missing.
    threads, mem
        ``LAZYFLOW_THREADS`` and ``LAZYFLOW_TOTAL_RAM_MB`` (MiB), when given.
    chunk
        Images per ilastik call; None runs all in one call, like steinbock.
    exports
        More outputs, each one more ilastik call per chunk: ``{"uncertainty": folder,
        "segmentation": folder}`` (either or both), see :func:`classify_chunk`.

    Returns
    -------
    failed : list of Path
        The images that got no output (their chunk failed). Failures are logged, not raised.

    Raises
    ------
    SteinpixError
        When ilastik cannot be started at all (exit code 2).
    KeyboardInterrupt
        After ilastik was stopped and the temporary files removed.
    """
    run_chunk = ilastik_chunk_runner(ilastik, ilp, threads=threads, mem=mem)
    return run_chunks(
        img_files, out_dir, run_chunk, chunk=chunk, engine="ilastik", exports=exports
    )


def ilastik_chunk_runner(
    ilastik: str | os.PathLike,
    ilp: str | os.PathLike,
    *,
    threads: int | None = None,
    mem: int | None = None,
) -> ChunkRunner:
    """A :data:`ChunkRunner` that runs a local ilastik binary (see :func:`run_ilastik`)."""
    env = ilastik_env(threads, mem)
    # absolute paths: ilastik resolves a relative export path against the project's folder
    ilp_abs = Path(ilp).absolute()

    def run_chunk(files: list[Path], tmp_dir: Path, export: str = "probabilities") -> int:
        args = headless_args(ilp_abs, [f.absolute() for f in files], tmp_dir.absolute(), export)
        logger.debug("Running %s %s", ilastik, " ".join(args))
        try:
            return run_process([ilastik, *args], env, stdout=_stderr_fd())
        except OSError as e:
            raise SteinpixError(f"cannot run ilastik {ilastik}: {e.strerror or e}", 2) from None

    return run_chunk


# --------------------------------------------------------------------------------------------
# Docker engine


def import_docker() -> Any:
    """The Docker SDK for Python, imported on first use (it is the optional ``docker`` extra)."""
    try:
        import docker
    except ImportError:
        raise SteinpixError(
            "the Docker engine needs the Docker SDK for Python: pip install 'steinpix[docker]'",
            exit_code=2,
        ) from None
    return docker


def docker_client(client: Any = None) -> Any:
    """A Docker client that answers: ``client`` if given, else ``docker.from_env()``.

    Raises
    ------
    SteinpixError
        (exit code 2) when the SDK is missing or no Docker daemon can be reached.
    """
    docker = import_docker()
    hint = "start Docker (or set DOCKER_HOST), or use --engine ilastik or builtin"
    if client is None:
        try:
            client = docker.from_env()
        except docker.errors.DockerException as e:
            raise SteinpixError(
                f"Docker daemon not reachable ({first_line(e)}); {hint}", 2
            ) from None
    try:
        client.ping()
    except (docker.errors.DockerException, OSError) as e:  # requests' errors are OSErrors
        raise SteinpixError(f"Docker daemon not reachable ({first_line(e)}); {hint}", 2) from None
    return client


def require_image(client: Any, image: str) -> None:
    """Fail with one line when ``image`` is not on the Docker host (steinpix does not pull it)."""
    docker = import_docker()
    try:
        client.images.get(image)
    except docker.errors.NotFound:
        raise SteinpixError(
            f"Docker image {image} not found; build it (docker build -t {image} .) "
            "or pull it (docker pull IMAGE) and pass --docker-image",
            exit_code=2,
        ) from None
    except docker.errors.APIError as e:
        raise SteinpixError(f"Docker image {image}: {first_line(e)}", exit_code=2) from None


class DataMount:
    """The one host folder a container sees, at ``/data``, and path translation into it.

    Paths are compared after resolving symbolic links, so a link that leads out of the folder
    is reported instead of silently dangling inside the container.
    """

    def __init__(self, data_dir: str | os.PathLike | None = None) -> None:
        self.host = Path(data_dir if data_dir is not None else Path.cwd()).resolve()

    def container_path(self, path: str | os.PathLike) -> PurePosixPath:
        resolved = Path(path).resolve()
        try:
            rel = resolved.relative_to(self.host)
        except ValueError:
            raise SteinpixError(
                f"{path} lies outside the data directory {self.host}, the only folder the "
                "container sees (at /data); run steinpix from a folder that contains the "
                "project, the images and the output folder",
                exit_code=2,
            ) from None
        return CONTAINER_DATA_DIR.joinpath(*rel.parts)

    def volumes(self) -> dict[str, dict[str, str]]:
        return {str(self.host): {"bind": str(CONTAINER_DATA_DIR), "mode": "rw"}}


def _is_rootless(client: Any) -> bool:
    docker = import_docker()
    try:
        options = client.info().get("SecurityOptions") or []
    except (docker.errors.DockerException, OSError):  # no answer: assume the usual rootful one
        return False
    return any("rootless" in str(option) for option in options)


def container_user(client: Any = None) -> str | None:
    """The container user: ``uid:gid`` of the caller, so that the files it writes are theirs.

    ``0:0`` with rootless Docker or Podman: there the container's root is the calling user, and
    any other uid maps to a subordinate id that cannot write the caller's files. None (the
    image's user) on Windows.
    """
    if not (hasattr(os, "getuid") and hasattr(os, "getgid")):
        return None
    if client is not None and _is_rootless(client):
        return "0:0"
    return f"{os.getuid()}:{os.getgid()}"


def _write_bytes(stream: Any, data: bytes) -> None:
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        buffer.write(data)
    else:
        stream.write(data.decode("utf-8", errors="replace"))
    stream.flush()


def stop_container(container: Any, grace: float | None = None) -> None:
    """``docker stop`` (SIGTERM, SIGKILL after ``grace`` s); ``docker kill`` if that fails."""
    grace = STOP_GRACE_S if grace is None else grace
    errors = (import_docker().errors.DockerException, OSError)  # the daemon's, not steinpix's
    try:
        container.stop(timeout=max(1, math.ceil(grace)))
    except (*errors, KeyboardInterrupt):
        with contextlib.suppress(*errors):
            container.kill()


def run_container(
    client: Any,
    image: str,
    *,
    entrypoint: Sequence[str],
    command: Sequence[str],
    volumes: Mapping[str, Mapping[str, str]],
    environment: Mapping[str, str],
    user: str | None,
    working_dir: str = str(CONTAINER_DATA_DIR),
    output: Any = None,
    **create_kwargs: Any,
) -> int:
    """Run a container to completion with its log streamed live; return its exit code.

    The container runs with an init process (so signals reach ilastik), is stopped on Ctrl-C
    (then KeyboardInterrupt is raised again) and removed afterwards in all cases.

    Parameters
    ----------
    output
        Where the log goes (default: ``sys.stderr`` at call time).
    create_kwargs
        More settings for ``client.containers.create`` (e.g. ``network_mode``).
    """
    docker = import_docker()
    try:
        container = client.containers.create(
            image,
            command=list(command),
            entrypoint=list(entrypoint),
            volumes={k: dict(v) for k, v in volumes.items()},
            environment=dict(environment),
            user=user,
            working_dir=working_dir,
            init=True,
            detach=True,
            **create_kwargs,
        )
    except docker.errors.DockerException as e:
        raise SteinpixError(
            f"cannot create a container from {image}: {first_line(e)}", 2
        ) from None
    try:
        with _termination_interrupts():
            try:
                container.start()
                for data in container.logs(stream=True, follow=True):
                    _write_bytes(output if output is not None else sys.stderr, data)
                result = container.wait()
            except KeyboardInterrupt:
                logger.warning("Interrupted: stopping container %s", getattr(container, "id", ""))
                stop_container(container)
                raise
            except docker.errors.DockerException as e:
                raise SteinpixError(f"Docker: {first_line(e)}", exit_code=2) from None
    finally:
        with contextlib.suppress(docker.errors.DockerException, OSError):
            container.remove(force=True)
    return int(result.get("StatusCode", 1)) if isinstance(result, Mapping) else int(result)


def run_docker(
    ilp: str | os.PathLike,
    img_files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    image: str = DEFAULT_DOCKER_IMAGE,
    threads: int | None = None,
    mem: int | None = None,
    chunk: int | None = None,
    client: Any = None,
    data_dir: str | os.PathLike | None = None,
    exports: Mapping[str, str | os.PathLike] | None = None,
) -> list[Path]:
    """Classify ``img_files`` with ilastik inside the steinpix Docker image.

    The data directory (default: the current directory) is mounted at ``/data`` and nothing
    else; the project, the images and the output folder must lie inside it. The container runs
    ``/opt/ilastik/run_ilastik.sh`` with :func:`headless_args` as the caller's ``uid:gid``, with
    only the ``LAZYFLOW_*`` limits (and ``HOME``) set and without network, and is removed
    afterwards.

    Parameters
    ----------
    image
        The Docker image (default :data:`DEFAULT_DOCKER_IMAGE`).
    client
        A Docker client (default ``docker.from_env()``); tests pass a stand-in.
    data_dir
        The folder to mount at ``/data``.
    ilp, img_files, out_dir, threads, mem, chunk, exports
        As for :func:`run_ilastik`; the export folders must lie inside the data directory too.

    Returns
    -------
    failed : list of Path
        The images that got no output.

    Raises
    ------
    SteinpixError
        (exit code 2) without the Docker SDK, without a reachable daemon, when the image is
        missing, or when a path lies outside the data directory.
    """
    img_files = [Path(f) for f in img_files]
    if not img_files:
        return []
    run_chunk = docker_chunk_runner(
        ilp,
        img_files,
        [out_dir, *(exports or {}).values()],
        image=image,
        threads=threads,
        mem=mem,
        client=client,
        data_dir=data_dir,
    )
    return run_chunks(
        img_files, out_dir, run_chunk, chunk=chunk, engine="ilastik (Docker)", exports=exports
    )


def docker_chunk_runner(
    ilp: str | os.PathLike,
    img_files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    image: str = DEFAULT_DOCKER_IMAGE,
    threads: int | None = None,
    mem: int | None = None,
    client: Any = None,
    data_dir: str | os.PathLike | None = None,
) -> ChunkRunner:
    """A :data:`ChunkRunner` that runs ilastik in a container (see :func:`run_docker`), for
    chunks of ``img_files``; checks the paths, the daemon and the image first. ``out_dir`` may
    be a list of output folders (probabilities and other exports)."""
    img_files = [Path(f) for f in img_files]
    mount = DataMount(data_dir)
    c_ilp = mount.container_path(ilp)
    c_imgs = {f: mount.container_path(f) for f in img_files}
    out_dirs = [out_dir] if isinstance(out_dir, (str, os.PathLike)) else list(out_dir)
    for folder in out_dirs:
        mount.container_path(folder)  # only checked here: the caller creates them
    client = docker_client(client)
    require_image(client, image)
    environment = {"HOME": CONTAINER_HOME, **lazyflow_env(threads, mem)}
    user = container_user(client)

    def run_chunk(files: list[Path], tmp_dir: Path, export: str = "probabilities") -> int:
        c_tmp = mount.container_path(tmp_dir)
        args = headless_args(c_ilp, [c_imgs[f] for f in files], c_tmp, export)
        logger.debug("Running %s in %s: %s", CONTAINER_ILASTIK, image, " ".join(args))
        return run_container(
            client,
            image,
            entrypoint=[CONTAINER_ILASTIK],
            command=args,
            volumes=mount.volumes(),
            environment=environment,
            user=user,
            # headless ilastik needs no network; a daemon without a bridge network has no other
            network_mode="none",
        )

    return run_chunk
