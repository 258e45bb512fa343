"""``steinpix classify ilastik preview``: thumbnails, a QC page and a table of the
probabilities (or, with ``--crops``, a contact sheet of the training crops)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from steinpix._cli.utils import ilp_option, one_line_errors, verbosity_option
from steinpix.errors import SteinpixError

logger = logging.getLogger("steinpix")

DEFAULT_UNCERTAINTY_DIR = "ilastik_uncertainty"
CAPTIONS = {
    "probabilities": "probabilities",
    "image": "image: first channel, 1st–99.5th percentile",
    "uncertainty": "uncertainty (white = uncertain)",
}


def _listing(folder: Path, pattern: str, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise SteinpixError(f"{folder}: no such folder ({what})")
    return {p.stem: p for p in sorted(folder.glob(pattern)) if p.is_file()}


def _fail_summary(failed: list[str], total: int, what: str, page: Path) -> SteinpixError:
    return SteinpixError(
        f"{len(failed)} of {total} {what} could not be previewed (see above; the others are "
        f"in {page}): " + ", ".join(failed[:5]) + (" ..." if len(failed) > 5 else "")
    )


def preview_images(
    prob_dir: Path,
    img_dir: Path,
    unc_dir: Path | None,
    ilp: Path,
    out_dir: Path,
    size: int,
    max_fraction: float,
    min_confidence: float,
    overwrite: bool,
) -> Path:
    """Preview every image that has probabilities; returns ``index.html``'s path."""
    from steinpix import preview, report
    from steinpix.atomic import remove_stale_temporaries
    from steinpix.images import list_h5_files

    classes = preview.read_classes(ilp)
    if classes.default_colors:
        logger.warning("%s: no usable PmapColors; using ilastik's default colours", ilp)
    probs = _listing(prob_dir, "[!.]*.tiff", "probabilities")
    images = {p.stem: p for p in list_h5_files(img_dir)}
    names = sorted(probs.keys() | images.keys())
    if not names:
        raise SteinpixError(f"{prob_dir}: no *.tiff probabilities to preview")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(exist_ok=True)
    for folder in (out_dir, out_dir / "images"):
        for stale in remove_stale_temporaries(folder):
            logger.info("Removed %s, left by a preview that was killed", stale)
    summary_csv = out_dir / "summary.csv"
    cached = {} if overwrite else report.read_summary_csv(summary_csv, classes.names)
    records, errors, failed, kept = [], [], [], 0
    for i, name in enumerate(names, start=1):
        prob_file, img_file = probs.get(name), images.get(name)
        if prob_file is None:
            errors.append(f"{img_file}: no probabilities ({prob_dir / (name + '.tiff')} missing)")
        elif img_file is None:
            errors.append(f"{prob_file}: no image ({img_dir / (name + '.h5')} missing)")
        if prob_file is None or img_file is None:
            logger.error("[%d/%d] %s", i, len(names), errors[-1])
            failed.append(name)
            continue
        unc_file = None if unc_dir is None else unc_dir / f"{name}.tiff"
        if unc_file is not None and not unc_file.is_file():
            unc_file = None
        kinds = ["probabilities", "image"] + (["uncertainty"] if unc_file else [])
        outputs = [preview.thumbnail_path(out_dir, name, k) for k in kinds]
        inputs = [prob_file, img_file, ilp] + ([unc_file] if unc_file else [])
        record = cached.get(name)
        if (
            record is not None
            and preview.is_up_to_date(outputs, inputs)
            and all(
                preview.png_size(o) == preview.thumbnail_shape(record.height, record.width, size)
                for o in outputs
            )
        ):
            records.append(record)
            kept += 1
            continue
        start = time.perf_counter()
        try:
            record = preview.preview_image(
                name, prob_file, img_file, unc_file, out_dir, classes, size
            )
        except SteinpixError as e:
            errors.append(str(e))
            logger.error("[%d/%d] %s", i, len(names), e)
            failed.append(name)
            continue
        records.append(record)
        logger.info(
            "[%d/%d] %s -> %s (%.2f s)",
            i,
            len(names),
            name,
            ", ".join(o.name for o in outputs),
            time.perf_counter() - start,
        )
    if kept:
        logger.info(
            "%d of %d previews are up to date (newer than their inputs); --overwrite redraws them",
            kept,
            len(names),
        )
    flags = {
        r.name: preview.image_flags(
            r.fractions, r.mean_max_probability, classes.names, max_fraction, min_confidence
        )
        for r in records
    }
    for r in records:
        if flags[r.name]:
            logger.warning("%s: %s", r.name, "; ".join(flags[r.name]))

    def thumbnails(name: str) -> list[tuple[str, str, tuple[int, int]]]:
        found = []
        for kind in preview.THUMBNAIL_KINDS:
            path = preview.thumbnail_path(out_dir, name, kind)
            if kind == "uncertainty" and (
                unc_dir is None or not (unc_dir / f"{name}.tiff").is_file()
            ):
                continue
            shape = preview.png_size(path)
            if shape is not None:
                found.append((path.relative_to(out_dir).as_posix(), CAPTIONS[kind], shape))
        return found

    info = report.PageInfo(
        probabilities=str(prob_dir),
        images=str(img_dir),
        project=str(ilp),
        uncertainty=None if unc_dir is None else str(unc_dir),
        crops_page="crops.html" if (out_dir / "crops.html").is_file() else None,
    )
    report.write_text_if_changed(
        summary_csv, report.render_summary_csv(records, classes.names, flags)
    )
    index = out_dir / "index.html"
    report.write_text_if_changed(
        index, report.render_index(records, classes, flags, thumbnails, errors, info)
    )
    n_flagged = sum(1 for f in flags.values() if f)
    logger.info(
        "Previewed %d of %d images into %s (%d flagged)",
        len(records),
        len(names),
        index,
        n_flagged,
    )
    click.echo(index)
    if failed:
        raise _fail_summary(failed, len(names), "images", index)
    return index


def preview_crops(crop_dir: Path, out_dir: Path, size: int, overwrite: bool) -> Path:
    """Contact sheet of the crops; returns ``crops.html``'s path."""
    from steinpix import preview, report
    from steinpix.atomic import remove_stale_temporaries
    from steinpix.images import list_h5_files

    if not crop_dir.is_dir():
        raise SteinpixError(f"{crop_dir}: no such folder (crops)")
    crop_files = list_h5_files(crop_dir)
    if not crop_files:
        raise SteinpixError(f"{crop_dir}: no *.h5 crops to preview")
    (out_dir / "crops").mkdir(parents=True, exist_ok=True)
    for folder in (out_dir, out_dir / "crops"):
        for stale in remove_stale_temporaries(folder):
            logger.info("Removed %s, left by a preview that was killed", stale)
    records, thumbs, errors, failed = [], {}, [], []
    for i, crop_file in enumerate(crop_files, start=1):
        png = preview.crop_thumbnail_path(out_dir, crop_file.stem)
        stale = overwrite or not preview.is_up_to_date([png], [crop_file])
        try:
            record = preview.preview_crop(crop_file, out_dir, size, write=stale)
        except SteinpixError as e:
            errors.append(str(e))
            logger.error("[%d/%d] %s", i, len(crop_files), e)
            failed.append(crop_file.stem)
            continue
        shape = preview.thumbnail_shape(record.height, record.width, size)
        if not stale and preview.png_size(png) != shape:  # e.g. another --size
            record = preview.preview_crop(crop_file, out_dir, size, write=True)
        records.append(record)
        thumbs[record.name] = (png.relative_to(out_dir).as_posix(), shape)
        for flag in record.flags:
            logger.warning("%s: %s", crop_file, flag)
    page = out_dir / "crops.html"
    report.write_text_if_changed(page, report.render_crops(records, thumbs, errors, str(crop_dir)))
    logger.info("Previewed %d of %d crops into %s", len(records), len(crop_files), page)
    click.echo(page)
    if failed:
        raise _fail_summary(failed, len(crop_files), "crops", page)
    return page


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
@ilp_option
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
    out_dir = Path(preview_dir)
    if crops:
        preview_crops(Path(ilastik_crop_dir), out_dir, size, overwrite)
        return
    unc_dir = Path(uncertainty_dir) if uncertainty_dir else Path(DEFAULT_UNCERTAINTY_DIR)
    if uncertainty_dir is None and not unc_dir.is_dir():
        unc_dir = None
    preview_images(
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
