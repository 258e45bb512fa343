"""A batch of ``classify ilastik run``: the engine, the pending images, and the tasks that
classify them, on this machine or on a Dask cluster.

The work of a batch is a list of :class:`Task` (one image for the built-in engine, a chunk of
images per ilastik call otherwise). An :data:`Executor` runs :func:`classify_task` on each task
and yields each task's results as it finishes: :func:`run_local` here, one task after the other;
:func:`steinpix.cluster.dask_executor` on a Dask cluster. :func:`run_batch` logs ``[i/n]`` per
finished image and collects the failures, whatever the executor.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from steinpix.atomic import make_folder, remove_stale_temporaries
from steinpix.errors import SteinpixError, first_line, os_error_text, reading
from steinpix.outputs import is_finished, output_path

logger = logging.getLogger("steinpix")

ENGINES = ("auto", "builtin", "ilastik", "docker")
# ilastik's exports besides the probabilities that a batch can write (steinpix.exports)
EXPORT_NAMES = ("uncertainty", "segmentation")
# Projects a process keeps loaded (a Dask worker may serve batches of several projects).
MODEL_CACHE_SIZE = 4


@dataclass(frozen=True)
class Job:
    """What every task of a batch needs. Plain values only, so that it pickles to Dask workers.

    Attributes
    ----------
    ilp : Path
        The trained project.
    out_dir : Path
        Folder of the ``<stem>.tiff`` probabilities.
    engine : {"builtin", "ilastik", "docker"}
        The engine chosen by :func:`choose_engine`.
    threads, mem : int or None
        ``--threads`` and ``--mem`` (MB); None: no limit.
    profile : str
        Arithmetic profile of the built-in engine.
    chunk : int or None
        Images per ilastik call (None: all at once).
    ilastik : Path or None
        The ilastik launcher for ``engine="ilastik"``.
    docker_image : str or None
        The image for ``engine="docker"``.
    exports : tuple of (str, Path)
        ilastik's other exports of every image and their folders: ``("uncertainty", dir)``,
        ``("segmentation", dir)`` (``run --uncertainty/--segmentation``), computed in the same
        pass as the probabilities by the built-in engine, one more ilastik call each otherwise.
    """

    ilp: Path
    out_dir: Path
    engine: str = "builtin"
    threads: int | None = None
    mem: int | None = None
    profile: str = "133"
    chunk: int | None = None
    ilastik: Path | None = None
    docker_image: str | None = None
    exports: tuple[tuple[str, Path], ...] = ()

    def __post_init__(self) -> None:
        check_output_dirs(self.out_dir, self.exports)

    def outputs(self, img_file: str | os.PathLike) -> tuple[Path, ...]:
        """Every file the batch writes for ``img_file``; the first is its probabilities, then
        the other exports in the order of :attr:`exports`."""
        return tuple(output_path(img_file, folder) for folder in self.output_dirs())

    def output_dirs(self) -> tuple[Path, ...]:
        """The folders the outputs go to."""
        return (self.out_dir, *(folder for _, folder in self.exports))

    @property
    def strip_bytes(self) -> int | None:
        """The built-in engine's working-memory budget per strip for ``--mem``."""
        if self.mem is None:
            return None
        # --mem caps the whole process: leave room for the Python/numba runtime (~250 MiB)
        return max(64, self.mem - 256) * 1024**2


@dataclass(frozen=True)
class Task:
    """Images classified together: one for the built-in engine, a chunk for ilastik."""

    files: tuple[Path, ...]
    label: str = ""


@dataclass(frozen=True)
class ImageResult:
    """The outcome of one image: its outputs, or the one-line error that stopped it.

    Attributes
    ----------
    img_file : Path
    outputs : tuple of Path
        As :meth:`Job.outputs`; written only when ``error`` is None.
    error : str or None
        What went wrong, naming the image.
    seconds : float
        Time spent on the image (for a chunk of ilastik images: on the chunk).
    """

    img_file: Path
    outputs: tuple[Path, ...]
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


Executor = Callable[[Job, Sequence[Task]], Iterable[list[ImageResult]]]
"""Runs :func:`classify_task` on every task and yields each one's results as it finishes."""

ResultCallback = Callable[[int, int, ImageResult], None]
"""Called as ``on_result(i, n, result)`` for the i-th finished image of n."""


# --------------------------------------------------------------------------------------------
# Projects, engines, pending images

_models: dict[tuple[str, int, int], tuple] = {}
_models_lock = threading.Lock()


def check_output_dirs(out_dir: Path, exports: Iterable[tuple[str, Path]]) -> None:
    """Fail (exit code 2) unless the probabilities and every export have their own folder:
    all of them name an image's output ``<stem>.tiff``.

    Parameters
    ----------
    out_dir : Path
        The probabilities' folder.
    exports : iterable of (str, Path)
        As :attr:`Job.exports`; names from :data:`EXPORT_NAMES`, each at most once.
    """
    outputs = [("probabilities", Path(out_dir)), *((name, Path(d)) for name, d in exports)]
    names = [name for name, _ in outputs]
    if set(names[1:]) - set(EXPORT_NAMES) or len(set(names)) < len(names):
        raise ValueError(f"exports must be distinct names of {EXPORT_NAMES}, got {names[1:]}")
    seen: dict[Path, str] = {}
    for name, folder in outputs:
        other = seen.setdefault(folder.resolve(), name)
        if other != name:
            raise SteinpixError(
                f"{folder}: would hold both the {other} and the {name} (each named "
                "<image>.tiff); give each output its own folder",
                exit_code=2,
            )


def load_model(ilp: str | os.PathLike) -> tuple:
    """The classifier and feature selection of a project for the built-in engine, loaded once
    per process (again only when the file changes: the cache key is path, mtime and size).

    Returns
    -------
    (Classifier, FeatureSelection)

    Raises
    ------
    SteinpixError
        When the built-in engine does not support the project (the message says why).
    """
    st = os.stat(ilp)
    key = (str(Path(ilp).resolve()), st.st_mtime_ns, st.st_size)
    with _models_lock:  # Dask runs tasks in threads: load each project once, not per thread
        model = _models.get(key)
        if model is None:
            from steinpix.engine import load_selection
            from steinpix.forest import load_supported_classifier

            with reading(ilp):  # what escapes the readers' checks is a bug in steinpix
                model = (load_supported_classifier(ilp), load_selection(ilp))
            while len(_models) >= MODEL_CACHE_SIZE:
                _models.pop(next(iter(_models)))
            _models[key] = model
    return model


def check_project(ilp: Path) -> None:
    """Fail with one line when ``ilp`` is no ilastik pixel-classification project at all (not
    HDF5, or e.g. an image given as ``--ilp``), instead of suggesting another engine for it.

    Raises
    ------
    SteinpixError
        Exit code 2, naming the file and the problem.
    """
    import h5py

    try:
        with h5py.File(ilp, "r") as f:
            is_project = isinstance(f.get("PixelClassification"), h5py.Group)
    except OSError as e:
        raise SteinpixError(
            f"{ilp}: not an ilastik project (cannot open as HDF5: {first_line(e)})", exit_code=2
        ) from None
    if not is_project:
        raise SteinpixError(
            f"{ilp}: not an ilastik pixel-classification project (no 'PixelClassification' "
            "group)",
            exit_code=2,
        )


def choose_engine(
    engine: str, ilp: Path, ilastik: str | None, profile: str = "auto"
) -> tuple[str, str]:
    """Resolve ``--engine auto``: the built-in engine when it supports the project, else a
    local ilastik when one is found; and ``--profile auto``: the arithmetic of the ilastik
    version that saved the project. Log which engine (and arithmetic) runs and why.

    Returns
    -------
    engine : str
        ``"builtin"``, ``"ilastik"`` or ``"docker"``. For ``"builtin"`` the project is loaded
        (:func:`load_model`) and checked.
    profile : {"133", "14x"}
        The built-in engine's arithmetic profile (:func:`steinpix.project.choose_profile`);
        ``"133"`` when another engine runs.
    """
    if engine in ("ilastik", "docker"):
        return engine, "133"
    check_project(ilp)  # no engine runs a file that is no pixel-classification project
    try:
        load_model(ilp)
        why = ""
    except SteinpixError as e:
        why = str(e).removeprefix(f"{ilp}: ")  # messages below name it once
    if engine == "builtin" and why:
        raise SteinpixError(f"{ilp}: {why}")  # each reason says what to do instead
    if not why:
        from steinpix.project import PROFILE_RELEASES, choose_profile, read_ilastik_version

        chosen, reason, warning = choose_profile(profile, read_ilastik_version(ilp))
        if warning:
            logger.warning("%s: %s", ilp, warning)
        logger.info("Engine: built-in, %s arithmetic (%s)", PROFILE_RELEASES[chosen], reason)
        return "builtin", chosen
    from steinpix.runners import find_ilastik

    try:
        binary = find_ilastik(ilastik)
    except SteinpixError:
        raise SteinpixError(
            f"{ilp}: the built-in engine cannot run this project ({why}), and no ilastik "
            "was found (give --ilastik PATH or set STEINPIX_ILASTIK, or use --engine docker)",
            exit_code=2,
        ) from None
    logger.info("Engine: ilastik at %s (built-in engine: %s)", binary, why)
    return "ilastik", "133"


def prepare_outputs(job: Job) -> None:
    """Create the output folders and remove the temporaries of killed runs from them."""
    for folder in job.output_dirs():
        make_folder(folder)
        for stale in remove_stale_temporaries(folder):
            logger.info("Removed %s, left by a run that was killed", stale)


def pending_images(job: Job, img_files: Sequence[Path], overwrite: bool = False) -> list[Path]:
    """The images whose outputs still have to be computed (logs how many are finished).

    An image is finished when every one of its outputs (:meth:`Job.outputs`) exists and is
    newer than both the image and the project, so a rerun after an interruption only computes
    what is missing; ``overwrite`` recomputes everything.
    """
    if overwrite:
        return list(img_files)
    pending = [
        f for f in img_files if not all(is_finished(f, out, job.ilp) for out in job.outputs(f))
    ]
    finished = len(img_files) - len(pending)
    if finished:
        logger.info(
            "%d of %d outputs are finished already (newer than image and project); "
            "--overwrite recomputes them",
            finished,
            len(img_files),
        )
    return pending


# --------------------------------------------------------------------------------------------
# Tasks


def make_tasks(job: Job, img_files: Sequence[Path]) -> list[Task]:
    """One task per image for the built-in engine; chunks of ``job.chunk`` images for ilastik."""
    if job.engine == "builtin":
        return [Task((Path(f),)) for f in img_files]
    from steinpix.runners import split_chunks

    groups = split_chunks([Path(f) for f in img_files], job.chunk)
    return [Task(tuple(g), f"chunk {i}/{len(groups)}") for i, g in enumerate(groups, start=1)]


_compile_notice = threading.Event()


class _Started:
    """An image whose probabilities are computed and whose files are still being written."""

    def __init__(self, img_file: Path, outputs: tuple[Path, ...], pending, seconds: float):
        self.img_file, self.outputs, self.pending = img_file, outputs, pending
        self.seconds = seconds  # of the computation; the next image's is not counted

    def finish(self) -> ImageResult:
        """Put the files in place; a failure to write them (e.g. a full disk) is the image's
        error."""
        start = time.perf_counter()
        try:
            with reading(self.img_file):
                self.pending.finish()
        except (SteinpixError, OSError) as e:
            return _failed(self.img_file, self.outputs, e)
        seconds = self.seconds + time.perf_counter() - start
        return ImageResult(self.img_file, self.outputs, None, seconds)


def _failed(img_file: Path, outputs: tuple[Path, ...], error: Exception) -> ImageResult:
    """The result of an image stopped by a SteinpixError or an OSError (e.g. a damaged chunk
    deep inside an HDF5 file, a full disk)."""
    if isinstance(error, SteinpixError):
        return ImageResult(img_file, outputs, str(error))
    if error.filename and error.strerror and Path(error.filename) != img_file:  # an output's
        return ImageResult(img_file, outputs, f"{img_file}: {os_error_text(error)}")
    return ImageResult(img_file, outputs, f"{img_file}: {error.strerror or error}")


def _start_builtin(job: Job, img_file: Path) -> _Started | ImageResult:
    """Compute one image with the built-in engine; its files are finished by the caller."""
    from steinpix import engine

    outputs = job.outputs(img_file)
    start = time.perf_counter()
    try:
        classifier, selection = load_model(job.ilp)
        with reading(img_file):  # a bug (not the image's fault) ends the batch
            pending = engine.start_file(
                img_file,
                outputs[0],
                classifier,
                selection,
                profile=job.profile,
                strip_bytes=job.strip_bytes,
                exports={name: output_path(img_file, folder) for name, folder in job.exports},
            )
    except (SteinpixError, OSError) as e:
        return _failed(img_file, outputs, e)
    return _Started(img_file, outputs, pending, time.perf_counter() - start)


def _classify_builtin(job: Job, img_file: Path) -> ImageResult:
    started = _start_builtin(job, img_file)
    return started if isinstance(started, ImageResult) else started.finish()


def _prepare_builtin(job: Job) -> None:
    from steinpix import engine

    engine.set_threads(job.threads)
    if not engine.kernels_cached() and not _compile_notice.is_set():
        _compile_notice.set()
        logger.info("Compiling the built-in engine (once after installation: about half a minute)")


def _chunk_runner(job: Job, files: Sequence[Path]):
    from steinpix import runners

    if job.engine == "ilastik":
        binary = job.ilastik if job.ilastik is not None else runners.find_ilastik()
        runner = runners.ilastik_chunk_runner(binary, job.ilp, threads=job.threads, mem=job.mem)
        return runner, "ilastik"
    runner = runners.docker_chunk_runner(
        job.ilp,
        files,
        job.output_dirs(),
        image=job.docker_image or runners.DEFAULT_DOCKER_IMAGE,
        threads=job.threads,
        mem=job.mem,
    )
    return runner, "ilastik (Docker)"


def classify_task(job: Job, task: Task) -> list[ImageResult]:
    """Classify the images of one task and write their outputs (atomically).

    The same function runs in a local batch and on Dask workers. An image that cannot be
    classified (a damaged file, a failed ilastik chunk) is a result with an error, not an
    exception; exceptions mean the whole batch cannot go on (e.g. ilastik cannot be started).

    Returns
    -------
    list of ImageResult
        One per image of the task, in its order.
    """
    if job.engine == "builtin":
        _prepare_builtin(job)
        return [_classify_builtin(job, f) for f in task.files]
    from steinpix import runners

    runner, name = _chunk_runner(job, task.files)
    start = time.perf_counter()
    failed = runners.classify_chunk(
        task.files,
        job.out_dir,
        runner,
        label=task.label or "chunk",
        engine=name,
        exports=dict(job.exports),
    )
    seconds = time.perf_counter() - start
    return [
        ImageResult(
            f,
            job.outputs(f),
            f"{f}: {failed[f]}" if f in failed else None,
            seconds,
        )
        for f in task.files
    ]


# --------------------------------------------------------------------------------------------
# Running a batch


def check_job(job: Job, img_files: Sequence[Path]) -> None:
    """Checks of the whole batch before any task runs (one-line errors).

    Outputs are named after the image's stem only (as steinbock names them): two images with
    one stem, e.g. given as files from two folders, would overwrite each other. Docker sees
    only the current folder: every path must lie inside it.
    """
    from steinpix import runners

    runners.check_unique_stems([Path(f) for f in img_files])
    if job.engine == "docker":
        mount = runners.DataMount()
        for path in (job.ilp, *job.output_dirs(), *img_files):
            mount.container_path(path)


def run_local(job: Job, tasks: Sequence[Task]) -> Iterator[list[ImageResult]]:
    """The local :data:`Executor`: one task after the other in this process.

    With the built-in engine, an image's last rows are LZW-encoded and written while the next
    image is computed; its result comes when its files are in place, and results keep the
    order of the tasks. When the batch stops early (Ctrl-C, an error), the files of the image
    still being written are removed, like those of an image being computed.
    """
    if job.engine != "builtin":
        for task in tasks:
            yield classify_task(job, task)
        return
    _prepare_builtin(job)
    writing: _Started | None = None
    try:
        for task in tasks:
            for img_file in task.files:
                started = _start_builtin(job, img_file)
                previous = writing
                writing = started if isinstance(started, _Started) else None
                if previous is not None:
                    yield [previous.finish()]
                if isinstance(started, ImageResult):
                    yield [started]
        if writing is not None:
            previous, writing = writing, None
            yield [previous.finish()]
    finally:
        if writing is not None:
            writing.pending.abort()


def run_batch(
    job: Job,
    img_files: Sequence[Path],
    executor: Executor = run_local,
    on_result: ResultCallback | None = None,
) -> list[ImageResult]:
    """Classify ``img_files`` (the pending ones) with ``executor``.

    Logs ``[i/n]`` per finished image (its outputs, or its error), then calls
    ``on_result(i, n, result)``; failed images do not stop the others.

    Returns
    -------
    failed : list of ImageResult
        The images that got no output, in the order they finished.
    """
    check_job(job, img_files)
    n = len(img_files)
    failed = []
    i = 0
    for results in executor(job, make_tasks(job, img_files)):
        for result in results:
            i += 1
            if result.ok:
                logger.info(
                    "[%d/%d] %s -> %s (%.1f s)",
                    i,
                    n,
                    result.img_file,
                    ", ".join(str(p) for p in result.outputs),
                    result.seconds,
                )
            else:
                logger.error("[%d/%d] %s", i, n, result.error)
                failed.append(result)
            if on_result is not None:
                on_result(i, n, result)
    logger.info("Classified %d of %d images into %s", n - len(failed), n, job.out_dir)
    return failed


def failure_error(failed: Sequence[ImageResult], total: int) -> SteinpixError:
    """The one-line error that ends a batch with failed images (exit code 1)."""
    names = ", ".join(str(r.img_file) for r in failed[:5])
    return SteinpixError(
        f"{len(failed)} of {total} images failed: {names}" + (" ..." if len(failed) > 5 else "")
    )
