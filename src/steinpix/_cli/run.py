"""``steinpix classify ilastik run``: batch pixel classification, built-in or real ilastik."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from steinpix._cli.utils import ilastik_binary_option, ilp_option, one_line_errors, verbosity_option
from steinpix.atomic import remove_stale_temporaries
from steinpix.errors import SteinpixError
from steinpix.outputs import is_finished, output_path

logger = logging.getLogger("steinpix")

ENGINES = ("auto", "builtin", "ilastik", "docker")


def pending_images(
    img_files: list[Path], out_dir: Path, ilp: Path, overwrite: bool
) -> tuple[list[Path], int]:
    """The images whose outputs still have to be computed, and how many are finished.

    An output counts as finished when it exists and is newer than both its image and the
    project, so a rerun after an interruption only computes what is missing.
    """
    if overwrite:
        return list(img_files), 0
    pending = [f for f in img_files if not is_finished(f, output_path(f, out_dir), ilp)]
    return pending, len(img_files) - len(pending)


def choose_engine(engine: str, ilp: Path, ilastik: str | None) -> tuple[str, tuple | None]:
    """Resolve ``--engine auto``: the built-in engine when it supports the project, else a
    local ilastik when one is found; log which engine runs and why.

    Returns
    -------
    engine : str
    model : (Classifier, FeatureSelection) or None
        The project's classifier and feature selection, loaded once, for the built-in engine.
    """
    if engine in ("ilastik", "docker"):
        return engine, None
    from steinpix.engine import load_selection
    from steinpix.forest import load_supported_classifier

    try:
        model, why = (load_supported_classifier(ilp), load_selection(ilp)), ""
    except SteinpixError as e:
        model, why = None, str(e).removeprefix(f"{ilp}: ")  # messages below name it once
    if engine == "builtin":
        if model is None:
            raise SteinpixError(f"{ilp}: {why} (the built-in engine does not train classifiers)")
        logger.info("Engine: built-in (reproduces ilastik 1.3.3post3 without ilastik)")
        return "builtin", model
    if model is not None:
        logger.info("Engine: built-in (the project stores vigra random forests)")
        return "builtin", model
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
    return "ilastik", None


def run_builtin(
    model: tuple,
    img_files: list[Path],
    out_dir: Path,
    threads: int | None,
    mem: int | None,
    profile: str,
) -> list[Path]:
    """Classify with the built-in engine, one image at a time; returns the failed images."""
    from steinpix import engine

    engine.set_threads(threads)
    classifier, selection = model
    if not engine.kernels_cached():
        logger.info("Compiling the built-in engine (once after installation: about half a minute)")
    # --mem caps the whole process: leave room for the Python/numba runtime (~250 MiB)
    strip_bytes = None if mem is None else max(64, mem - 256) * 1024**2
    failed = []
    for i, img_file in enumerate(img_files, start=1):
        out_file = output_path(img_file, out_dir)
        start = time.perf_counter()
        try:
            engine.predict_file(
                img_file, out_file, classifier, selection, profile=profile, strip_bytes=strip_bytes
            )
        except SteinpixError as e:
            logger.error("[%d/%d] %s", i, len(img_files), e)
            failed.append(img_file)
            continue
        except OSError as e:  # e.g. a damaged chunk deep inside an HDF5 file
            logger.error("[%d/%d] %s: %s", i, len(img_files), img_file, e.strerror or e)
            failed.append(img_file)
            continue
        logger.info(
            "[%d/%d] %s -> %s (%.1f s)",
            i,
            len(img_files),
            img_file,
            out_file,
            time.perf_counter() - start,
        )
        click.echo(out_file)
    return failed


@click.command(name="run", help="Run a pixel classification batch using Ilastik")
@ilastik_binary_option("Ilastik binary (for --engine ilastik, and auto when needed)")
@ilp_option
@click.option(
    "--img",
    "ilastik_img_dir",
    type=click.Path(exists=True, file_okay=False),
    default="ilastik_img",
    show_default=True,
    help="Path to the Ilastik image directory",
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
    type=click.Choice(ENGINES),
    default="auto",
    show_default=True,
    help="builtin: steinpix's own engine; ilastik: a local ilastik; docker: ilastik in a "
    "container; auto: builtin when it supports the project, else ilastik",
)
@click.option(
    "--profile",
    type=click.Choice(["133", "14x"]),
    default="133",
    show_default=True,
    help="Built-in engine arithmetic: ilastik 1.3.3post3 (steinbock's) or 1.4.x",
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
    ilastik_img_dir: str,
    ilastik_probab_dir: str,
    num_threads: int | None,
    memory_limit: int | None,
    engine: str,
    profile: str,
    chunk: int | None,
    docker_image: str | None,
    overwrite: bool,
) -> None:
    from steinpix import images

    ilp = Path(ilastik_project_file)
    out_dir = Path(ilastik_probab_dir)
    img_files = images.list_h5_files(ilastik_img_dir)
    if not img_files:
        raise SteinpixError(f"{ilastik_img_dir}: no *.h5 images found")
    # steinbock accepts 0 for both; it means "no limit"
    threads = num_threads or None
    mem = memory_limit or None
    chosen, model = choose_engine(engine, ilp, ilastik_binary)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(out_dir):
        logger.info("Removed %s, left by a run that was killed", stale)
    pending, finished = pending_images(img_files, out_dir, ilp, overwrite)
    if finished:
        logger.info(
            "%d of %d outputs are finished already (newer than image and project); "
            "--overwrite recomputes them",
            finished,
            len(img_files),
        )
    if not pending:
        return
    if chosen == "builtin":
        failed = run_builtin(model, pending, out_dir, threads, mem, profile)
    else:
        from steinpix import runners

        if chosen == "ilastik":
            failed = runners.run_ilastik(
                runners.find_ilastik(ilastik_binary),
                ilp,
                pending,
                out_dir,
                threads=threads,
                mem=mem,
                chunk=chunk,
            )
        else:
            failed = runners.run_docker(
                ilp,
                pending,
                out_dir,
                image=docker_image or runners.DEFAULT_DOCKER_IMAGE,
                threads=threads,
                mem=mem,
                chunk=chunk,
            )
        for img_file in pending:
            if img_file not in failed:
                click.echo(output_path(img_file, out_dir))
    done = len(pending) - len(failed)
    logger.info("Classified %d of %d images into %s", done, len(pending), out_dir)
    if failed:
        raise SteinpixError(
            f"{len(failed)} of {len(pending)} images failed: "
            + ", ".join(str(f) for f in failed[:5])
            + (" ..." if len(failed) > 5 else "")
        )
