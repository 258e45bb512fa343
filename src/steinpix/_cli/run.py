"""``steinpix classify ilastik run``: batch pixel classification, built-in or real ilastik."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from steinpix import batch, progress
from steinpix._cli.utils import (
    allow_quick_exit,
    collector_paused,
    ilastik_binary_option,
    ilp_option,
    keep_freed_memory,
    numpy_without_huge_pages,
    one_line_errors,
    verbosity_option,
)
from steinpix.errors import SteinpixError

logger = logging.getLogger("steinpix")

DEFAULT_IMG_DIR = "ilastik_img"
IMG_DIR_TYPE = click.Path(exists=True, file_okay=False)


def image_files(files: tuple[str, ...], img_dir: str | None, ctx: click.Context) -> list[Path]:
    """The images of the batch: the files given as arguments, else ``*.h5`` in ``--img``."""
    from steinpix import images

    if files:
        if img_dir is not None:
            raise SteinpixError(f"give image files or --img {img_dir}, not both", exit_code=2)
        return list(dict.fromkeys(Path(f) for f in files))
    if img_dir is None:  # checked as click checks a given --img, with the same message
        param = next(p for p in ctx.command.params if p.name == "ilastik_img_dir")
        img_dir = IMG_DIR_TYPE.convert(DEFAULT_IMG_DIR, param, ctx)
    img_files = images.list_h5_files(img_dir)
    if not img_files:
        raise SteinpixError(f"{img_dir}: no *.h5 images found")
    return img_files


def import_numba() -> None:
    """Import numba (for the built-in engine) without what it costs at start-up but a run does
    not use: scipy, which numba imports to check its version (and later only for linear
    algebra, which the engine does not use), PyYAML, which it uses only to read a
    ``.numba_config.yaml`` in the current folder (so it stays when there is one), and the
    threads of numpy's OpenBLAS, which start spinning at numpy's import (0.07 s of CPU) for
    matrix products the engine never computes (``OPENBLAS_NUM_THREADS`` is set for numpy's
    import only, where neither it nor numpy is set up yet, so the subprocesses of other
    engines inherit the environment as it was). 10 to 70 ms where they are installed; scipy
    and PyYAML import normally again afterwards. ``importlib.metadata`` (with ``email`` and
    ``socket``, 0.015-0.03 s), which numba imports for the plugins it looks up only when it
    compiles, is loaded on first use instead (importlib's ``LazyLoader``).
    """
    if "numba" in sys.modules:
        return
    if "importlib.metadata" not in sys.modules:
        _load_on_first_use("importlib.metadata")
    blocked = [name for name in ("scipy", "yaml") if name not in sys.modules]
    if os.path.isfile(".numba_config.yaml") and "yaml" in blocked:
        blocked.remove("yaml")
    one_blas_thread = "numpy" not in sys.modules and "OPENBLAS_NUM_THREADS" not in os.environ
    for name in blocked:
        sys.modules[name] = None  # makes `import name` raise ImportError at once
    if one_blas_thread:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import numba  # noqa: F401
    finally:
        if one_blas_thread:
            del os.environ["OPENBLAS_NUM_THREADS"]
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def _load_on_first_use(name: str) -> None:
    """Import the module ``name`` so that its code runs only when an attribute is first used."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    spec.loader.exec_module(module)


def dask_address(address: str | None, scheduler_file: str | None) -> str | None:
    """The scheduler to run on: ``--dask`` (or $STEINPIX_DASK), or ``--dask-scheduler-file``."""
    if scheduler_file is None:
        return address or None
    ctx = click.get_current_context()
    if address and ctx.get_parameter_source("dask_address_option") != ParameterSource.ENVIRONMENT:
        raise SteinpixError("give --dask or --dask-scheduler-file, not both", exit_code=2)
    from steinpix.cluster import connect_timeout, read_scheduler_file

    return read_scheduler_file(scheduler_file, timeout=connect_timeout())


@click.command(name="run", help="Run a pixel classification batch using Ilastik")
@ilastik_binary_option("Ilastik binary (for --engine ilastik, and auto when needed)")
@ilp_option
@click.argument(
    "img_files",
    nargs=-1,
    type=click.Path(exists=True, dir_okay=False),
    metavar="[IMAGES]...",
)
@click.option(
    "--img",
    "ilastik_img_dir",
    type=IMG_DIR_TYPE,
    default=None,
    show_default=DEFAULT_IMG_DIR,
    help="Path to the Ilastik image directory (when no IMAGES are given)",
)
@click.option(
    "-o",
    "ilastik_probab_dir",
    type=click.Path(file_okay=False),
    default="ilastik_probabilities",
    show_default=True,
    help="Path to the Ilastik probabilities output directory",
)
@click.option(
    "--uncertainty",
    "uncertainty_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Also write ilastik's Uncertainty export (uint16, Y x X) into this directory",
)
@click.option(
    "--segmentation",
    "segmentation_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Also write ilastik's Simple Segmentation export (uint8 labels 1..classes, Y x X) "
    "into this directory",
)
@click.option(
    "--threads",
    "num_threads",
    type=click.IntRange(min=0),
    help="Maximum number of threads to use (default: all cores)",
)
@click.option(
    "--mem",
    "memory_limit",
    type=click.IntRange(min=0),
    help="Memory limit (in megabytes)",
)
@click.option(
    "--engine",
    type=click.Choice(batch.ENGINES),
    default="auto",
    show_default=True,
    help="builtin: steinpix's own engine; ilastik: a local ilastik; docker: ilastik in a "
    "container; auto: builtin when it supports the project, else ilastik",
)
@click.option(
    "--profile",
    type=click.Choice(["auto", "133", "14x"]),
    default="auto",
    show_default=True,
    help="Built-in engine arithmetic: 133 = ilastik 1.3.3post3 (steinbock's), 14x = ilastik "
    "1.4.0; auto: the one of the ilastik version that saved the project",
)
@click.option(
    "--chunk",
    type=click.IntRange(min=1),
    default=None,
    help="Images per ilastik call (ilastik/docker engines; default: all at once)",
)
@click.option(
    "--docker-image",
    default=None,
    help="Image for --engine docker (default: the steinpix image with ilastik)",
)
@click.option(
    "--dask",
    "dask_address_option",
    envvar="STEINPIX_DASK",
    default=None,
    metavar="ADDRESS",
    help="Run on the Dask cluster whose scheduler is at ADDRESS (e.g. tcp://host:8786; "
    "default: $STEINPIX_DASK)",
)
@click.option(
    "--dask-scheduler-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Run on the Dask cluster described by this scheduler file",
)
@click.option(
    "--overwrite",
    is_flag=True,
    default=False,
    help="Recompute outputs that are already finished",
)
@verbosity_option
@one_line_errors
def run_cmd(
    ilastik_binary: str | None,
    ilastik_project_file: str,
    img_files: tuple[str, ...],
    ilastik_img_dir: str | None,
    ilastik_probab_dir: str,
    uncertainty_dir: str | None,
    segmentation_dir: str | None,
    num_threads: int | None,
    memory_limit: int | None,
    engine: str,
    profile: str,
    chunk: int | None,
    docker_image: str | None,
    dask_address_option: str | None,
    dask_scheduler_file: str | None,
    overwrite: bool,
) -> None:
    ilp = Path(ilastik_project_file)
    with collector_paused():  # the start-up: imports, the project, numba's runtime
        if engine in ("builtin", "auto"):
            import_numba()
            keep_freed_memory()
            numpy_without_huge_pages()
        img_files = image_files(img_files, ilastik_img_dir, click.get_current_context())
        requested = {"uncertainty": uncertainty_dir, "segmentation": segmentation_dir}
        exports = tuple((name, Path(d)) for name, d in requested.items() if d is not None)
        batch.check_output_dirs(Path(ilastik_probab_dir), exports)
        address = dask_address(dask_address_option, dask_scheduler_file)
        if address is not None and engine == "docker":
            raise SteinpixError(
                "--engine docker does not run on Dask workers; use --engine builtin, or "
                "ilastik installed on every worker",
                exit_code=2,
            )
        chosen, profile = batch.choose_engine(engine, ilp, ilastik_binary, profile)
        binary = None
        if chosen == "ilastik":
            from steinpix.runners import find_ilastik

            binary = find_ilastik(ilastik_binary)
        job = batch.Job(
            ilp=ilp,
            out_dir=Path(ilastik_probab_dir),
            engine=chosen,
            # steinbock accepts 0 for both; it means "no limit"
            threads=num_threads or None,
            mem=memory_limit or None,
            profile=profile,
            chunk=chunk,
            ilastik=binary,
            docker_image=docker_image,
            exports=exports,
        )
        batch.prepare_outputs(job)
        pending = batch.pending_images(job, img_files, overwrite)
        if pending and chosen == "builtin" and address is None:
            from steinpix import engine as builtin

            builtin.init_numba()  # lets the kernels load without numba's whole target
    if not pending:
        return

    def report(i: int, n: int, result: batch.ImageResult) -> None:
        progress.advance()
        if result.ok:
            for output in result.outputs:
                click.echo(output)

    with progress.bar("run", total=len(pending)):
        failed = _run(job, pending, address, report)
    if failed:
        raise batch.failure_error(failed, len(pending))


def _run(
    job: batch.Job, pending: list[Path], address: str | None, report
) -> list[batch.ImageResult]:
    """The batch, locally or on the Dask cluster at ``address``; returns the failed images."""
    if address is None:
        allow_quick_exit()  # nothing of this process outlives the batch
        failed = batch.run_batch(job, pending, on_result=report)
    else:
        from steinpix import cluster

        client = cluster.connect(address)
        with contextlib.closing(client):
            logger.info("Dask: %s (%s)", address, cluster.describe_cluster(client))
            failed = batch.run_batch(job, pending, cluster.dask_executor(client), report)
        batch.prepare_outputs(job)  # temporaries of workers killed during the batch
    return failed
