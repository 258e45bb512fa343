"""``steinpix classify ilastik run``: batch pixel classification, built-in or real ilastik."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from steinpix import batch
from steinpix._cli.utils import ilastik_binary_option, ilp_option, one_line_errors, verbosity_option
from steinpix.errors import SteinpixError

logger = logging.getLogger("steinpix")


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
    uncertainty_dir: str | None,
    segmentation_dir: str | None,
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
    img_files = images.list_h5_files(ilastik_img_dir)
    if not img_files:
        raise SteinpixError(f"{ilastik_img_dir}: no *.h5 images found")
    requested = {"uncertainty": uncertainty_dir, "segmentation": segmentation_dir}
    exports = tuple((name, Path(d)) for name, d in requested.items() if d is not None)
    batch.check_output_dirs(Path(ilastik_probab_dir), exports)
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
    if not pending:
        return

    def report(i: int, n: int, result: batch.ImageResult) -> None:
        if result.ok:
            for output in result.outputs:
                click.echo(output)

    failed = batch.run_batch(job, pending, on_result=report)
    if failed:
        raise batch.failure_error(failed, len(pending))
