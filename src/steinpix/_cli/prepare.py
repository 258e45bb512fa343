"""``steinpix classify ilastik prepare``."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from steinpix import progress
from steinpix._cli.utils import one_line_errors, verbosity_option
from steinpix.errors import SteinpixError

logger = logging.getLogger("steinpix")


@click.command(name="prepare", help="Prepare an Ilastik project file, images and crops")
@click.option(
    "-o",
    "ilastik_project_file",
    type=click.Path(dir_okay=False),
    default="pixel_classifier.ilp",
    show_default=True,
    help="Path to the Ilastik project output file",
)
@click.option(
    "--img",
    "img_dir",
    type=click.Path(exists=True, file_okay=False),
    default="img",
    show_default=True,
    help="Path to the image directory",
)
@click.option(
    "--panel",
    "panel_file",
    type=click.Path(exists=True, dir_okay=False),
    default="panel.csv",
    show_default=True,
    help="Path to the panel file",
)
@click.option(
    "--aggr",
    "aggr_func_name",
    type=click.STRING,
    default="mean",
    show_default=True,
    help="Numpy function for aggregating channel pixels",
)
@click.option(
    "--mean/--no-mean",
    "prepend_mean",
    default=True,
    show_default=True,
    help="Prepend mean of all channels as a new channel",
)
@click.option(
    "--meanfactor",
    "mean_factor",
    type=click.FLOAT,
    default=100.0,
    show_default=True,
    help="Factor to multiply the channels mean with",
)
@click.option(
    "--scale",
    "scale_factor",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Ilastik image scale factor",
)
@click.option(
    "--cropsize",
    "crop_size",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Ilastik crop size (in pixels)",
)
@click.option(
    "--imgout",
    "ilastik_img_dir",
    type=click.Path(file_okay=False),
    default="ilastik_img",
    show_default=True,
    help="Path to the Ilastik image output directory",
)
@click.option(
    "--cropout",
    "crop_dir",
    type=click.Path(file_okay=False),
    default="ilastik_crops",
    show_default=True,
    help="Path to the Ilastik crop output directory",
)
@click.option("--seed", "seed", type=click.IntRange(min=0), help="Random seed")
@verbosity_option
@one_line_errors
def prepare_cmd(
    ilastik_project_file: str,
    img_dir: str,
    panel_file: str,
    aggr_func_name: str,
    prepend_mean: bool,
    mean_factor: float,
    scale_factor: int,
    crop_size: int,
    ilastik_img_dir: str,
    crop_dir: str,
    seed: int | None,
) -> None:
    # imported here so that `steinpix --help` and the other commands start fast
    from steinpix import images, panel, project
    from steinpix.prepare import check_channels, check_outputs, iter_prepare

    aggr_func = images.aggregation_function(aggr_func_name)
    panel_df = panel.read_panel(panel_file)
    groups = panel.channel_groups(panel_df, panel_file)
    img_files = images.list_image_files(img_dir)
    if not img_files:
        raise SteinpixError(f"{img_dir}: no *.tiff images found")
    unreadable = check_channels(img_files, len(panel_df), panel_file)
    check_outputs(img_files, Path(ilastik_img_dir), Path(ilastik_project_file))
    crop_files, crop_shapes, failed = [], [], 0
    prepared = iter_prepare(
        img_files,
        channel_groups=groups,
        aggr_func=aggr_func,
        prepend_mean=prepend_mean,
        mean_factor=mean_factor,
        scale_factor=scale_factor,
        crop_size=crop_size,
        ilastik_img_dir=Path(ilastik_img_dir),
        crop_dir=Path(crop_dir),
        seed=seed,
        known_errors=unreadable,
    )
    with progress.bar("prepare", total=len(img_files)):
        for i, result in enumerate(prepared, start=1):
            progress.advance()
            if result.error is not None:
                failed += 1
                logger.error("[%d/%d] %s", i, len(img_files), result.error)
                continue
            logger.info(
                "[%d/%d] %s -> %s", i, len(img_files), result.img_file, result.ilastik_img_file
            )
            click.echo(result.ilastik_img_file)
            if result.crop_file is not None:
                click.echo(result.crop_file)
                crop_files.append(result.crop_file)
                crop_shapes.append(result.crop_shape)
    project.create_project(ilastik_project_file, crop_files, crop_shapes)
    click.echo(ilastik_project_file)
    logger.info(
        "Prepared %d of %d images, %d crops, project %s",
        len(img_files) - failed,
        len(img_files),
        len(crop_files),
        ilastik_project_file,
    )
    if failed:
        raise SteinpixError(
            f"{failed} of {len(img_files)} images could not be prepared (see above)"
        )
