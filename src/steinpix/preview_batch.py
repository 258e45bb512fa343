"""A preview batch: which images to preview, previewing those whose inputs changed, and
writing the pages (``classify ilastik preview`` and ``preview --crops``)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from steinpix import report
from steinpix.atomic import make_folder, remove_stale_temporaries
from steinpix.errors import SteinpixError
from steinpix.images import list_h5_files
from steinpix.preview import (
    THUMBNAIL_KINDS,
    crop_thumbnail_path,
    image_flags,
    is_up_to_date,
    png_size,
    preview_crop,
    preview_image,
    read_classes,
    thumbnail_path,
    thumbnail_shape,
)

logger = logging.getLogger("steinpix")

CAPTIONS = {
    "probabilities": "probabilities",
    "image": "image: first channel, 1st–99.5th percentile",
    "uncertainty": "uncertainty (white = uncertain)",
}


def _listing(folder: Path, pattern: str, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise SteinpixError(f"{folder}: no such folder ({what})")
    return {p.stem: p for p in sorted(folder.glob(pattern)) if p.is_file()}


@dataclass(frozen=True)
class PreviewResult:
    """The page a preview wrote, and what could not be previewed.

    Attributes
    ----------
    page : Path
        ``index.html`` or ``crops.html``.
    failed : list of str
        Names of the images (or crops) that could not be previewed.
    total : int
        How many there were.
    """

    page: Path
    failed: list[str]
    total: int

    def error(self, what: str) -> SteinpixError | None:
        """One line for the failures (None when there are none)."""
        if not self.failed:
            return None
        where = "none" if len(self.failed) == self.total else "the others"
        return SteinpixError(
            f"{len(self.failed)} of {self.total} {what} could not be previewed (see above; "
            f"{where} are in {self.page}): "
            + ", ".join(self.failed[:5])
            + (" ..." if len(self.failed) > 5 else "")
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
) -> PreviewResult:
    """Preview every image that has probabilities or an ilastik image: thumbnails of those
    whose inputs changed, then ``summary.csv`` and ``index.html``; logs ``[i/n]`` per image.

    Parameters
    ----------
    prob_dir, img_dir : Path
        Probability TIFFs and ilastik images, paired by stem.
    unc_dir : Path or None
        Uncertainty TIFFs, used for the images that have one.
    ilp : Path
        The project (class names and colours).
    out_dir : Path
    size : int
        Maximum thumbnail side.
    max_fraction, min_confidence : float
        Flag thresholds (:func:`steinpix.image_flags`).
    overwrite : bool
        Redraw thumbnails that are up to date.

    Returns
    -------
    PreviewResult
    """

    classes = read_classes(ilp)
    if classes.default_colors:
        logger.warning("%s: no usable PmapColors; using ilastik's default colours", ilp)
    probs = _listing(prob_dir, "[!.]*.tiff", "probabilities")
    images = {p.stem: p for p in list_h5_files(img_dir)}
    names = sorted(probs.keys() | images.keys())
    if not names:
        raise SteinpixError(f"{prob_dir}: no *.tiff probabilities to preview")
    make_folder(out_dir / "images")
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
        outputs = [thumbnail_path(out_dir, name, k) for k in kinds]
        inputs = [prob_file, img_file, ilp] + ([unc_file] if unc_file else [])
        record = cached.get(name)
        if (
            record is not None
            and is_up_to_date(outputs, inputs)
            and all(
                png_size(o) == thumbnail_shape(record.height, record.width, size) for o in outputs
            )
        ):
            records.append(record)
            kept += 1
            continue
        start = time.perf_counter()
        try:
            record = preview_image(name, prob_file, img_file, unc_file, out_dir, classes, size)
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
        r.name: image_flags(
            r.fractions, r.mean_max_probability, classes.names, max_fraction, min_confidence
        )
        for r in records
    }
    for r in records:
        if flags[r.name]:
            logger.warning("%s: %s", r.name, "; ".join(flags[r.name]))

    def thumbnails(name: str) -> list[tuple[str, str, tuple[int, int]]]:
        found = []
        for kind in THUMBNAIL_KINDS:
            path = thumbnail_path(out_dir, name, kind)
            if kind == "uncertainty" and (
                unc_dir is None or not (unc_dir / f"{name}.tiff").is_file()
            ):
                continue
            shape = png_size(path)
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
    return PreviewResult(index, failed, len(names))


def preview_crops(crop_dir: Path, out_dir: Path, size: int, overwrite: bool) -> PreviewResult:
    """Contact sheet of the crops (``crops.html``); thumbnails are rewritten only when their
    crop changed, but every crop is read (crops are small) for its flags."""

    if not crop_dir.is_dir():
        raise SteinpixError(f"{crop_dir}: no such folder (crops)")
    crop_files = list_h5_files(crop_dir)
    if not crop_files:
        raise SteinpixError(f"{crop_dir}: no *.h5 crops to preview")
    make_folder(out_dir / "crops")
    for folder in (out_dir, out_dir / "crops"):
        for stale in remove_stale_temporaries(folder):
            logger.info("Removed %s, left by a preview that was killed", stale)
    records, thumbs, errors, failed = [], {}, [], []
    for i, crop_file in enumerate(crop_files, start=1):
        png = crop_thumbnail_path(out_dir, crop_file.stem)
        stale = overwrite or not is_up_to_date([png], [crop_file])
        try:
            record = preview_crop(crop_file, out_dir, size, write=stale)
        except SteinpixError as e:
            errors.append(str(e))
            logger.error("[%d/%d] %s", i, len(crop_files), e)
            failed.append(crop_file.stem)
            continue
        shape = thumbnail_shape(record.height, record.width, size)
        if not stale and png_size(png) != shape:  # e.g. another --size
            record = preview_crop(crop_file, out_dir, size, write=True)
        records.append(record)
        thumbs[record.name] = (png.relative_to(out_dir).as_posix(), shape)
        for flag in record.flags:
            logger.warning("%s: %s", crop_file, flag)
    page = out_dir / "crops.html"
    report.write_text_if_changed(page, report.render_crops(records, thumbs, errors, str(crop_dir)))
    logger.info("Previewed %d of %d crops into %s", len(records), len(crop_files), page)
    return PreviewResult(page, failed, len(crop_files))
