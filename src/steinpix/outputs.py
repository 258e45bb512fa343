"""Where a batch writes each image's probabilities, and which outputs a rerun can keep.

Shared by every engine (built-in, ilastik, Docker), and light to import: no numpy, no numba.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath


def output_name(img_file: str | os.PathLike) -> str:
    """The file name of an image's probabilities, as steinbock names them: ``<stem>.tiff``."""
    return f"{PurePath(img_file).stem}.tiff"


def output_path(img_file: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """``<out_dir>/<image stem>.tiff``."""
    return Path(out_dir) / output_name(img_file)


def is_finished(
    img_file: str | os.PathLike, out_file: str | os.PathLike, ilp: str | os.PathLike
) -> bool:
    """Whether an output can be kept on a rerun: it exists and is newer than the image and
    the project.

    Parameters
    ----------
    img_file, out_file, ilp : path-like

    Returns
    -------
    bool
    """
    try:
        done = os.stat(out_file).st_mtime_ns
    except FileNotFoundError:
        return False
    inputs = [os.stat(p).st_mtime_ns for p in (img_file, ilp)]
    return done > max(inputs)
