"""``classify ilastik prepare``: ilastik images, random crops and a fresh project."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steinpix import images
from steinpix.atomic import create_temporary, make_folder
from steinpix.errors import SteinpixError

logger = logging.getLogger(__name__)


@dataclass
class PreparedImage:
    """What ``prepare`` did with one source image."""

    img_file: Path
    ilastik_img_file: Path | None = None
    crop_file: Path | None = None
    crop_shape: tuple[int, int, int] | None = None
    error: str | None = None


def check_channels(
    img_files: list[Path], n_panel_channels: int | None, panel_file: str | os.PathLike
) -> dict[Path, str]:
    """Read every image's header; stop when one disagrees with the panel's channel count.

    Returns
    -------
    errors : dict
        Unreadable images and why (they are reported and skipped later, in order).

    Raises
    ------
    SteinpixError
        When a readable image has another number of channels than the panel (steinbock would
        silently skip every image).
    """
    errors = {}
    for img_file in img_files:
        try:
            n_channels = images.read_image_shape(img_file)[0]
        except SteinpixError as e:
            errors[img_file] = str(e)
            continue
        if n_panel_channels is not None and n_channels != n_panel_channels:
            # a damaged file can have a readable but wrong header: only a fully readable
            # image that disagrees with the panel stops the whole run
            try:
                n_channels = images.read_image(img_file).shape[0]
            except SteinpixError as e:
                errors[img_file] = str(e)
                continue
        if n_panel_channels is not None and n_channels != n_panel_channels:
            raise SteinpixError(
                f"{img_file}: {n_channels} channels, but {panel_file} lists "
                f"{n_panel_channels} channels to keep"
            )
    return errors


def ilastik_image_path(img_file: Path, ilastik_img_dir: Path) -> Path:
    """``<ilastik_img_dir>/<image name>.h5``: steinbock writes every image's ilastik image into
    one folder, named after the image (``.ome.tiff`` counts as one suffix)."""
    return images.with_suffix(ilastik_img_dir / img_file.name, ".h5")


def check_outputs(img_files: list[Path], ilastik_img_dir: Path, project_file: Path) -> None:
    """Stop before anything is written when the run could not finish as asked.

    Raises
    ------
    SteinpixError
        When two images (e.g. in different subfolders) would be written as the same ilastik
        image, whose crops would then describe an image that is gone (steinbock overwrites one
        silently).
        Also when ``$STEINBOCK_IMG_DTYPE`` is not a numeric type (:func:`images.img_dtype`).
    OSError
        When the project's folder cannot be written (naming the project), found now rather
        than after every image has been prepared.
    """
    images.img_dtype()
    seen: dict[Path, Path] = {}
    for img_file in img_files:
        out = ilastik_image_path(img_file, ilastik_img_dir)
        other = seen.setdefault(out, img_file)
        if other != img_file:
            raise SteinpixError(
                f"{other} and {img_file} would both be written as {out}; rename one of them"
            )
    make_folder(project_file.parent)
    create_temporary(project_file).unlink()


def iter_prepare(
    img_files: list[Path],
    channel_groups: np.ndarray | None,
    aggr_func: images.AggregationFunction,
    prepend_mean: bool,
    mean_factor: float,
    scale_factor: int,
    crop_size: int,
    ilastik_img_dir: Path,
    crop_dir: Path,
    seed: int | None,
    known_errors: dict[Path, str] | None = None,
) -> Iterator[PreparedImage]:
    """Prepare one image at a time: ilastik image, then its crop (steinbock's random draws).

    Crop positions come from one ``numpy.random.default_rng(seed)`` that draws, in sorted
    file order, only for images that were aggregated and are at least ``crop_size`` in both
    axes, so a seed gives steinbock's crops. An image is read one channel group at a time
    (page by page: IMC TIFFs store one page per channel) and upscaled and written one channel
    at a time, so neither the image nor the ilastik image is ever held whole; the files are
    the same as from the whole image (:func:`steinpix.images.create_ilastik_image`).

    Yields
    ------
    PreparedImage
        Per source image, in order; ``error`` is set when the image could not be prepared.
    """
    rng = np.random.default_rng(seed)
    make_folder(ilastik_img_dir)
    make_folder(crop_dir)
    for img_file in img_files:
        result = PreparedImage(img_file)
        if known_errors and img_file in known_errors:
            result.error = known_errors[img_file]
            yield result
            continue
        try:
            with images.ImageChannels(img_file) as channels:
                aggregated = images.aggregate_channels(
                    channels.read,
                    channels.shape[0],
                    channel_groups=channel_groups,
                    aggr_func=aggr_func,
                    prepend_mean=prepend_mean,
                    mean_factor=mean_factor,
                )
            images.check_ilastik_image(aggregated, scale_factor)
        except SteinpixError as e:
            result.error = str(e)
            yield result
            continue
        except MemoryError as e:
            why = f" ({e})" if str(e) else ""
            result.error = f"{img_file}: not enough memory to create the ilastik image{why}"
            yield result
            continue
        ilastik_img_file = ilastik_image_path(img_file, ilastik_img_dir)
        _, height, width = aggregated.shape
        shape = (aggregated.shape[0], height * scale_factor, width * scale_factor)
        position = images.draw_crop_position(shape, crop_size, rng)
        crop = None if position is None else (*position, crop_size)
        crop_img = images.write_ilastik_image(aggregated, scale_factor, ilastik_img_file, crop)
        del aggregated
        result.ilastik_img_file = ilastik_img_file
        if crop is None:
            logger.warning(
                "Image %s too small for crop size %d: no crop", ilastik_img_file, crop_size
            )
        else:
            x, y, _ = crop
            crop_file = crop_dir / images.crop_file_name(ilastik_img_file.stem, x, y, crop_size)
            result.crop_file = images.write_steinbock_h5(crop_img, crop_file, images.CROP_DATASET)
            result.crop_shape = crop_img.shape
        yield result
