"""``classify ilastik prepare``: ilastik images, random crops and a fresh project."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steinpix import images
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
    file order, only for images that were written and are at least ``crop_size`` in both
    axes, so a seed gives steinbock's crops. Only one image is held in memory at a time.

    Yields
    ------
    PreparedImage
        Per source image, in order; ``error`` is set when the image could not be prepared.
    """
    rng = np.random.default_rng(seed)
    ilastik_img_dir.mkdir(parents=True, exist_ok=True)
    crop_dir.mkdir(parents=True, exist_ok=True)
    for img_file in img_files:
        result = PreparedImage(img_file)
        if known_errors and img_file in known_errors:
            result.error = known_errors[img_file]
            yield result
            continue
        try:
            img = images.read_image(img_file)
            ilastik_img = images.create_ilastik_image(
                img,
                channel_groups=channel_groups,
                aggr_func=aggr_func,
                prepend_mean=prepend_mean,
                mean_factor=mean_factor,
                scale_factor=scale_factor,
            )
        except SteinpixError as e:
            result.error = str(e)
            yield result
            continue
        except (ValueError, TypeError, MemoryError) as e:  # e.g. an --aggr that takes no axis
            result.error = f"{img_file}: cannot create the ilastik image ({e})"
            yield result
            continue
        del img
        ilastik_img_file = images.with_suffix(ilastik_img_dir / img_file.name, ".h5")
        result.ilastik_img_file = images.write_steinbock_h5(
            ilastik_img, ilastik_img_file, images.IMG_DATASET
        )
        position = images.draw_crop_position(ilastik_img.shape, crop_size, rng)
        if position is None:
            logger.warning(
                "Image %s too small for crop size %d: no crop", ilastik_img_file, crop_size
            )
        else:
            x, y = position
            crop = ilastik_img[:, y : y + crop_size, x : x + crop_size]
            crop_file = crop_dir / images.crop_file_name(ilastik_img_file.stem, x, y, crop_size)
            result.crop_file = images.write_steinbock_h5(crop, crop_file, images.CROP_DATASET)
            result.crop_shape = crop.shape
        yield result
