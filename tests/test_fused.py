"""The engine's fused kernel (features and forest per image row) against the two-step path.

``fused.classify`` must equal ``predict_proba(compute_features(img))`` bit for bit, including
blocks cut short at the end of a row and pixels whose features hold NaN (which get zeros).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from test_forest import random_tree, write_project

from steinpix import engine, fused
from steinpix.features import compute_features
from steinpix.forest import load_classifier, predict_proba

from conftest import EXAMPLE, TEST_DATA

PROJECT = EXAMPLE / "pretrained.ilp"
IMAGE = TEST_DATA / "reference" / "ilastik_img" / "20210305_NE_mockData1_003.h5"  # 86 x 100


@pytest.fixture(scope="module")
def image_and_features():
    classifier, selection = engine.load_project(PROJECT)
    img = engine.read_image(IMAGE).astype(np.float32)
    img[2, 30, 98] = np.nan  # in the last, partial block of its rows
    img[0, 70, 5] = np.nan
    features = compute_features(img, selection)
    return classifier, selection, img, features


def two_step(classifier, features):
    flat = features.reshape(-1, features.shape[-1])
    return predict_proba(classifier, flat).reshape(*features.shape[:2], -1)


def test_fused_equals_features_then_forest_on_the_real_project(image_and_features):
    classifier, selection, img, features = image_and_features
    assert img.shape[2] % 16 != 0
    got = fused.classify(img, selection, classifier)
    np.testing.assert_array_equal(got, two_step(classifier, features))
    zero = np.all(got == 0, axis=-1)
    assert zero[30, 98] and zero[70, 5] and not zero[0, 0]
    assert np.array_equal(zero, np.isnan(features).any(axis=-1))


@pytest.mark.parametrize("pure", [True, False])
def test_fused_equals_features_then_forest_with_walked_trees(tmp_path, image_and_features, pure):
    classifier, selection, img, features = image_and_features
    rng = np.random.default_rng(30 + pure)
    n_features = features.shape[-1]
    values = features.reshape(-1, n_features)[::97]
    values = values[~np.isnan(values).any(axis=1)]
    sizes = [[1, 20, 33, 70, 9], [200, 31, 64]]
    forests = [[random_tree(rng, n_features, 3, n, pure, values) for n in s] for s in sizes]
    synthetic = load_classifier(write_project(tmp_path / "p.ilp", forests, n_features, 3))
    assert synthetic.flat.votes == pure and synthetic.flat.walked.size == 2
    got = fused.classify(img, selection, synthetic)
    np.testing.assert_array_equal(got, two_step(synthetic, features))


@pytest.mark.parametrize("overlap", [True, False])
def test_strips_one_after_the_other_equal_the_whole_image(image_and_features, overlap):
    """classify_strips (the next strip presmoothed while this one's rows are computed, two sets
    of planes taking turns, one output buffer for all) gives the whole image's bits."""
    classifier, selection, img, features = image_and_features
    halo, height = selection.halo(), img.shape[1]
    buffer = np.full((30, img.shape[2], classifier.n_outputs), np.nan, dtype=np.float32)
    cuts = [0, 30, 47, 77, height]  # uneven strips, each with its halo clipped at the border

    def strips():
        for y0, y1 in zip(cuts, cuts[1:], strict=False):
            a, b = max(0, y0 - halo), min(height, y1 + halo)
            yield img[:, a:b].copy(), (y0 - a, y1 - a), buffer[:y1 - y0]

    got = [out.copy() for out in fused.classify_strips(strips(), selection, classifier,
                                                        overlap=overlap)]
    np.testing.assert_array_equal(np.concatenate(got), two_step(classifier, features))


def test_a_bad_strip_stops_the_strips_with_its_error(image_and_features):
    classifier, selection, img, _ = image_and_features
    good = (img, (0, 20), np.empty((20, img.shape[2], classifier.n_outputs), np.float32))
    bad = (img[:3], (0, 20), good[2])  # a channel missing: the features do not match
    strips = fused.classify_strips(iter([good, bad]), selection, classifier)
    with pytest.raises(ValueError, match="feature columns"):
        list(strips)


def test_only_strips_that_fit_the_budget_twice_are_overlapped():
    classifier, selection = engine.load_project(PROJECT)
    assert engine._strip_height((4, 2000, 2000), classifier, selection, None) == (250, True)
    rows, overlap = engine._strip_height((4, 3000, 25_000), classifier, selection, None)
    assert not overlap and rows == engine.strip_rows(3000, 25_000, 4, selection, 3)


def test_default_strips_of_wide_images_are_several_halos_tall():
    """500,000 pixels of an 8000-pixel-wide image would be 62 rows, less than the 2 x 38 halo
    rows presmoothed with them; default strips are at least two halos (evened out)."""
    classifier, selection = engine.load_project(PROJECT)
    halo = selection.halo()
    rows, _ = engine._strip_height((4, 2000, 8000), classifier, selection, None)
    n_strips = -(-2000 // (engine.MIN_STRIP_HALOS * halo))
    assert rows == -(-2000 // n_strips) and rows > engine.STRIP_PIXELS // 8000
    # an explicit size is taken as it is
    assert engine._strip_height((4, 2000, 8000), classifier, selection, 80_000)[0] == 10


def test_the_next_image_reuses_the_buffers_of_the_last(image_and_features, monkeypatch):
    """A batch pays the page faults of the presmoothed planes once, not per image; the reused
    (and grown) buffers give the same bits."""
    classifier, selection, img, features = image_and_features
    monkeypatch.setattr(fused, "_SPARE", [])  # not the buffers of the tests before
    height = img.shape[1]

    def run(image):
        out = np.empty((image.shape[1], image.shape[2], classifier.n_outputs), np.float32)
        return next(fused.classify_strips(iter([(image, (0, image.shape[1]), out)]), selection,
                                          classifier))

    def rings(work):  # the stage-2 threads' ring buffers, one per thread
        return {k: v.ctypes.data for k, v in work._buffers.items() if k.startswith("rings")}

    small = run(img[:, : height // 2].copy())
    pair = fused._SPARE[-1]
    planes = pair[0]._buffers["planes"]
    kept = rings(pair[0])
    assert len(kept) == min(numba.get_num_threads(), height // 2) and not rings(pair[1])
    got = run(img)  # taller: the planes grow; as wide: the same ring buffers
    assert fused._SPARE == [pair] and pair[0]._buffers["planes"].size > planes.size
    assert rings(pair[0]) == kept
    np.testing.assert_array_equal(got, two_step(classifier, features))
    grown = pair[0]._buffers["planes"].ctypes.data
    again = run(img)
    assert fused._SPARE == [pair] and pair[0]._buffers["planes"].ctypes.data == grown
    assert rings(pair[0]) == kept
    np.testing.assert_array_equal(again, got)
    assert small.shape[0] == height // 2
