"""``steinpix classify ilastik preview``: thumbnails, a QC page and a table of the
probabilities (or, with ``--crops``, a contact sheet of the training crops)."""

from __future__ import annotations

from pathlib import Path

import click

from steinpix._cli.utils import one_line_errors, verbosity_option

# used when it exists: the folder docs/preview.md suggests for run --uncertainty
DEFAULT_UNCERTAINTY_DIR = "ilastik_uncertainty"


@click.command(
    name="preview", help="Preview probabilities (or training crops) on a web page with thumbnails"
)
@click.option(
    "--probabilities",
    "probabilities_dir",
    type=click.Path(file_okay=False),
    default="ilastik_probabilities",
    show_default=True,
    help="Path to the Ilastik probabilities directory",
)
@click.option(
    "--img",
    "ilastik_img_dir",
    type=click.Path(file_okay=False),
    default="ilastik_img",
    show_default=True,
    help="Path to the Ilastik image directory",
)
@click.option(
    "--uncertainty",
    "uncertainty_dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help=f"Directory of uncertainty TIFFs (run --uncertainty) shown as a third thumbnail "
    f"[default: {DEFAULT_UNCERTAINTY_DIR} when it exists]",
)
@click.option(
    "--ilp",
    "ilastik_project_file",
    # not exists=True: --crops does not read the project (crops are previewed before training)
    type=click.Path(dir_okay=False),
    default="pixel_classifier.ilp",
    show_default=True,
    help="Path to the Ilastik project file (not needed with --crops)",
)
@click.option(
    "-o",
    "preview_dir",
    type=click.Path(file_okay=False),
    default="ilastik_preview",
    show_default=True,
    help="Path to the preview output directory",
)
@click.option(
    "--size",
    type=click.IntRange(min=16),
    default=1024,
    show_default=True,
    help="Maximum thumbnail side in pixels (block means of whole pixels)",
)
@click.option(
    "--crops",
    "crops",
    is_flag=True,
    default=False,
    help="Preview the training crops (--crop) instead: a contact sheet, crops.html",
)
@click.option(
    "--crop",
    "ilastik_crop_dir",
    type=click.Path(file_okay=False),
    default="ilastik_crops",
    show_default=True,
    help="Path to the Ilastik crop directory (with --crops)",
)
@click.option(
    "--flag-fraction",
    type=click.FloatRange(0, 1),
    default=0.95,
    show_default=True,
    help="Flag images where one class is most probable on more than this fraction of pixels",
)
@click.option(
    "--flag-confidence",
    type=click.FloatRange(0, 1),
    default=0.6,
    show_default=True,
    help="Flag images whose mean maximum class probability is below this",
)
@click.option(
    "--overwrite",
    is_flag=True,
    default=False,
    help="Redraw thumbnails that are up to date",
)
@verbosity_option
@one_line_errors
def preview_cmd(
    probabilities_dir: str,
    ilastik_img_dir: str,
    uncertainty_dir: str | None,
    ilastik_project_file: str,
    preview_dir: str,
    size: int,
    crops: bool,
    ilastik_crop_dir: str,
    flag_fraction: float,
    flag_confidence: float,
    overwrite: bool,
) -> None:
    from steinpix import preview_batch  # imported here so that the other commands start fast

    out_dir = Path(preview_dir)
    if crops:
        result = preview_batch.preview_crops(Path(ilastik_crop_dir), out_dir, size, overwrite)
    else:
        if not Path(ilastik_project_file).exists():  # click's own message for a missing file
            raise click.BadParameter(
                f"File '{ilastik_project_file}' does not exist.", param_hint="'--ilp'"
            )
        unc_dir = Path(uncertainty_dir or DEFAULT_UNCERTAINTY_DIR)
        if uncertainty_dir is None and not unc_dir.is_dir():
            unc_dir = None
        result = preview_batch.preview_images(
            Path(probabilities_dir),
            Path(ilastik_img_dir),
            unc_dir,
            Path(ilastik_project_file),
            out_dir,
            size,
            flag_fraction,
            flag_confidence,
            overwrite,
        )
    click.echo(result.page)
    error = result.error("crops" if crops else "images")
    if error is not None:
        raise error
