"""``steinpix classify ilastik fix``."""

from __future__ import annotations

import logging

import click

from steinpix._cli.utils import ilp_option, one_line_errors, verbosity_option

logger = logging.getLogger("steinpix")


@click.command(name="fix", help="Fix existing Ilastik training data (experimental)")
@ilp_option
@click.option(
    "--crop",
    "ilastik_crop_dir",
    type=click.Path(exists=True, file_okay=False),
    default="ilastik_crops",
    show_default=True,
    help="Path to the Ilastik crop directory",
)
@click.option(
    "--probabs",
    "ilastik_probabilities_dir",
    type=click.Path(file_okay=False),
    default="ilastik_probabilities",
    show_default=True,
    help="Path to the Ilastik probabilities directory",
)
@click.option(
    "--backup/--no-backup",
    "backup",
    default=True,
    show_default=True,
    help="Backup the project file and the crop directory (<name>.bak) before fixing them",
)
@click.option(
    "--axisorder",
    "axis_order",
    type=click.STRING,
    help="Axis order of the crops, e.g. zyxc (default: their axistags attribute)",
)
@verbosity_option
@one_line_errors
def fix_cmd(
    ilastik_project_file: str,
    ilastik_crop_dir: str,
    ilastik_probabilities_dir: str,
    backup: bool,
    axis_order: str | None,
) -> None:
    from steinpix import fix, progress  # imported here so that the other commands start fast

    with progress.bar("fix", unit="crop"):
        result = fix.fix(
            ilastik_project_file,
            ilastik_crop_dir,
            ilastik_probabilities_dir,
            backup=backup,
            axis_order=axis_order,
        )
    # like steinbock: each rewritten crop, then the project (only what was written)
    for crop_file in result.patched_crops:
        click.echo(crop_file)
    if result.project_changed:
        click.echo(ilastik_project_file)
