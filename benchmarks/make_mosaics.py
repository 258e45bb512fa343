"""Build large steinbock images for benchmarks by tiling the IMC mock reference images.

Example::

    python benchmarks/make_mosaics.py            # benchmarks/work/mosaic_1.h5, mosaic_2.h5

Each mosaic is a 2000 x 2000, 4-channel float32 ``img`` dataset (CYX, steinbock attributes)
made of 80 x 80 tiles cut at random places from the 9 ``reference/ilastik_img`` images of the
shared data set (or from the 3 in ``tests/data`` when the shared data is absent), randomly
flipped, so that the pixel statistics and the random forest's paths are those of real data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "work"
SOURCES = [
    REPO.parent / "shared" / "data" / "imc-mock" / "reference" / "ilastik_img",
    REPO / "tests" / "data" / "reference" / "ilastik_img",
]
AXISTAGS = (
    b'{"axes": [{"key": "c", "typeFlags": 1}, {"key": "y", "typeFlags": 2}, '
    b'{"key": "x", "typeFlags": 2}]}'
)


def source_images() -> list[np.ndarray]:
    """The reference ``img`` arrays (C, Y, X) of the first source folder that has any."""
    for folder in SOURCES:
        files = sorted(folder.glob("*.h5"))
        if files:
            images = []
            for path in files:
                with h5py.File(path, "r") as h5:
                    images.append(h5["img"][()])
            return images
    raise SystemExit(f"no reference images found in {[str(s) for s in SOURCES]}")


def mosaic(images: list[np.ndarray], size: int, tile: int, seed: int) -> np.ndarray:
    """A (C, size, size) float32 image of randomly placed, randomly flipped tiles."""
    rng = np.random.default_rng(seed)
    n_channels = images[0].shape[0]
    out = np.empty((n_channels, size, size), dtype=np.float32)
    for y in range(0, size, tile):
        for x in range(0, size, tile):
            img = images[rng.integers(len(images))]
            _, height, width = img.shape
            oy, ox = rng.integers(height - tile + 1), rng.integers(width - tile + 1)
            piece = img[:, oy:oy + tile, ox:ox + tile]
            if rng.integers(2):
                piece = piece[:, ::-1]
            if rng.integers(2):
                piece = piece[:, :, ::-1]
            h, w = min(tile, size - y), min(tile, size - x)
            out[:, y:y + h, x:x + w] = piece[:, :h, :w]
    return out


def write_steinbock_image(path: Path, img: np.ndarray) -> None:
    with h5py.File(path, "w") as h5:
        dataset = h5.create_dataset("img", data=img)
        dataset.attrs["axistags"] = AXISTAGS
        dataset.attrs["display_mode"] = b"grayscale"
        dataset.attrs["steinbock"] = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2000, help="height and width (pixels)")
    parser.add_argument("--count", type=int, default=2, help="number of mosaics")
    parser.add_argument("--tile", type=int, default=80, help="tile size (pixels)")
    parser.add_argument("--out", type=Path, default=WORK / "img", help="output folder")
    args = parser.parse_args()
    images = source_images()
    args.out.mkdir(parents=True, exist_ok=True)
    for i in range(args.count):
        path = args.out / f"mosaic_{i + 1}.h5"
        write_steinbock_image(path, mosaic(images, args.size, args.tile, seed=i + 1))
        print(path)


if __name__ == "__main__":
    main()
