"""ilastik's Uncertainty and Simple Segmentation exports, from the built-in engine."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from steinpix import engine, exports
from steinpix.errors import SteinpixError

from conftest import EXAMPLE, TEST_DATA

PROJECT = EXAMPLE / "pretrained.ilp"
REFERENCE = TEST_DATA / "reference"
IN_REPO_IMAGES = sorted((REFERENCE / "ilastik_img").glob("*.h5"))


def ilastik_uncertainty(probs: np.ndarray) -> np.ndarray:
    """ilastik 1.3.3post3 step by step, as written there: OpEnsembleMargin (sort along the
    channels, highest minus second highest, 1 - that), then OpFormattedDataExport's
    ``asarray(0 + (a - 0.0) * f32(65535 / 1.0), uint16)``."""
    pmap = np.sort(probs, axis=-1)
    res = pmap[..., -1] - pmap[..., -2]
    margin = 1 - res
    assert margin.dtype == np.float32
    frac = np.float32(np.float64(65535) / np.float64(1.0))
    return np.asarray(0 + (margin - 0.0) * frac, np.uint16)


@pytest.fixture(scope="module")
def project():
    return engine.load_project(PROJECT)


def test_uncertainty_is_one_minus_the_margin_of_the_two_largest():
    probs = np.array(
        [[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.7, 0.1], [0.0, 0.0, 0.0], [0.3, 0.3, 0.4]]],
        dtype=np.float32,
    )
    got = exports.uncertainty(probs)
    assert got.dtype == np.uint16 and got.shape == (1, 5)
    # 1 - (0.7 - 0.2) = 0.5 and 1 - (0.4 - 0.3) = 0.9 in float32: 32767.5 and 58981.5
    # scaled, truncated (not rounded) to uint16
    assert got.tolist() == [[0, 65535, 32767, 65535, 58981]]
    np.testing.assert_array_equal(got, ilastik_uncertainty(probs))


def test_uncertainty_matches_ilastiks_arithmetic_on_random_probabilities():
    rng = np.random.default_rng(7)
    for n_classes in (2, 3, 5):
        raw = rng.random((64, 50, n_classes)).astype(np.float32)
        probs = (raw / raw.sum(axis=-1, keepdims=True)).astype(np.float32)
        # tree votes: multiples of 1/100 with ties, as pure-leaf forests give
        votes = (np.round(probs * 100) / np.float32(100)).astype(np.float32)
        for p in (probs, votes):
            np.testing.assert_array_equal(exports.uncertainty(p), ilastik_uncertainty(p))


def test_uncertainty_of_one_class_is_zero():
    probs = np.full((3, 4, 1), 0.25, dtype=np.float32)
    np.testing.assert_array_equal(exports.uncertainty(probs), np.zeros((3, 4), np.uint16))
    np.testing.assert_array_equal(exports.segmentation(probs), np.ones((3, 4), np.uint8))


def test_segmentation_takes_the_first_of_tied_classes():
    probs = np.array(
        [[[0.4, 0.4, 0.2], [0.2, 0.4, 0.4], [0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3], [0, 0, 0]]],
        dtype=np.float32,
    )
    got = exports.segmentation(probs)
    assert got.dtype == np.uint8 and got.shape == (1, 5)
    assert got.tolist() == [[1, 2, 3, 1, 1]]


def test_segmentation_of_many_classes():
    probs = np.zeros((1, 2, 255), dtype=np.float32)
    probs[0, 0, 254] = 1
    assert exports.segmentation(probs).tolist() == [[255, 1]]
    with pytest.raises(ValueError, match="255"):
        exports.segmentation(np.zeros((1, 1, 256), dtype=np.float32))


def test_export_uint16_is_the_engines():
    assert engine.export_uint16 is exports.export_uint16


def predict_with_exports(img_file: Path, out_dir: Path, project, **kwargs) -> dict[str, Path]:
    classifier, selection = project
    paths = {name: out_dir / name / f"{img_file.stem}.tiff"
             for name in ("probabilities", "uncertainty", "segmentation")}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    engine.predict_file(
        img_file,
        paths["probabilities"],
        classifier,
        selection,
        exports={"uncertainty": paths["uncertainty"], "segmentation": paths["segmentation"]},
        **kwargs,
    )
    return paths


def float_probabilities(img_file: Path, project) -> np.ndarray:
    """The engine's float32 probabilities, collected through the per-strip hook."""
    classifier, selection = project
    strips: list[np.ndarray] = []
    img = engine.read_image(img_file)
    for _ in engine.iter_strips(img, classifier, selection, on_strip=lambda p: strips.append(
            p.copy())):
        pass
    return np.concatenate(strips, axis=0)


@pytest.mark.parametrize("img_file", IN_REPO_IMAGES, ids=lambda p: p.stem)
def test_engine_exports_agree_with_ilastiks_probabilities(tmp_path, project, img_file):
    paths = predict_with_exports(img_file, tmp_path, project)
    reference = tifffile.imread(REFERENCE / "ilastik_probabilities" / f"{img_file.stem}.tiff")
    np.testing.assert_array_equal(tifffile.imread(paths["probabilities"]), reference)

    unc = tifffile.imread(paths["uncertainty"])
    seg = tifffile.imread(paths["segmentation"])
    assert unc.dtype == np.uint16 and unc.shape == reference.shape[:2]
    assert seg.dtype == np.uint8 and seg.shape == reference.shape[:2]

    # exactly ilastik's operators on the float32 probabilities that reproduce the reference
    probs = float_probabilities(img_file, project)
    np.testing.assert_array_equal(engine.export_uint16(probs), reference)
    np.testing.assert_array_equal(unc, ilastik_uncertainty(probs))
    np.testing.assert_array_equal(seg, np.argmax(probs, axis=-1) + 1)

    # and consistent with ilastik's own uint16 file: the argmax wherever it has no tie ...
    ranked = np.sort(reference, axis=-1).astype(np.int64)
    tied = ranked[..., -1] == ranked[..., -2]
    first_max = np.argmax(reference, axis=-1) + 1
    np.testing.assert_array_equal(seg[~tied], first_max[~tied])
    # ... where equal uint16 values come from equal votes, so the first class wins there too
    np.testing.assert_array_equal(seg[tied], first_max[tied])
    # the margin read from the uint16 file is off by at most the two truncations
    from_file = 65535 - (ranked[..., -1] - ranked[..., -2])
    assert np.abs(unc.astype(np.int64) - from_file).max() <= 2


def test_exports_do_not_depend_on_strips(tmp_path, project):
    img_file = IN_REPO_IMAGES[1]
    whole = predict_with_exports(img_file, tmp_path / "whole", project)
    strips = predict_with_exports(img_file, tmp_path / "strips", project, strip_bytes=1)
    for name in whole:
        with tifffile.TiffFile(strips[name]) as tif:
            if name != "probabilities":
                page = tif.pages[0]
                assert page.shape == tif.series[0].shape and len(page.shape) == 2
                assert page.compression == 5  # LZW; tifffile < 2022.7 has no top-level enums
                assert page.photometric == 1  # MINISBLACK
            np.testing.assert_array_equal(tif.asarray(), tifffile.imread(whole[name]))


def test_an_export_that_cannot_be_written_leaves_no_output(tmp_path, project):
    classifier, selection = project
    out = tmp_path / "probabilities.tiff"
    seg = tmp_path / "segmentation.tiff"
    with pytest.raises(OSError):
        engine.predict_file(
            IN_REPO_IMAGES[2],
            out,
            classifier,
            selection,
            exports={"segmentation": seg, "uncertainty": tmp_path / "no" / "such" / "dir.tiff"},
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_bad_image_writes_no_export(tmp_path, project):
    classifier, selection = project
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(SteinpixError):
        engine.predict_file(bad, tmp_path / "p.tiff", classifier, selection,
                            exports={"uncertainty": tmp_path / "u.tiff"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5"]
    with pytest.raises(ValueError, match="unknown exports"):
        engine.predict_file(IN_REPO_IMAGES[0], tmp_path / "p.tiff", classifier, selection,
                            exports={"features": tmp_path / "f.tiff"})


ILASTIK_14 = TEST_DATA / "imcseg-ilastik-1.4.0"


@pytest.mark.parametrize(
    "pipeline_image",
    sorted((ILASTIK_14 / "ilastik").glob("*_s2.h5")),
    ids=lambda p: p.stem,
)
def test_exports_follow_the_profile_on_an_ilastik_1_4_project(tmp_path, pipeline_image):
    """ilastik 1.4.0's own probabilities of its project: the 14x exports agree with them."""
    with h5py.File(pipeline_image, "r") as f:
        (data,) = (ds[()] for ds in f.values())
    img_file = tmp_path / "img" / pipeline_image.name
    img_file.parent.mkdir()
    with h5py.File(img_file, "w") as f:
        f["img"] = np.moveaxis(data[0], -1, 0).astype(np.float32)
    model = engine.load_project(ILASTIK_14 / "TestData.ilp")
    paths = predict_with_exports(img_file, tmp_path, model, profile="14x")
    reference = tifffile.imread(
        ILASTIK_14 / "ilastik" / f"{pipeline_image.stem}_Probabilities.tiff"
    )
    np.testing.assert_array_equal(tifffile.imread(paths["probabilities"]), reference)
    seg = tifffile.imread(paths["segmentation"])
    unc = tifffile.imread(paths["uncertainty"]).astype(np.int64)
    np.testing.assert_array_equal(seg, np.argmax(reference, axis=-1) + 1)
    ranked = np.sort(reference, axis=-1).astype(np.int64)
    assert np.abs(unc - (65535 - (ranked[..., -1] - ranked[..., -2]))).max() <= 2
