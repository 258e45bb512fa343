"""The preview pages in a real browser (headless Chromium): every image is shown.

Skips when no Chromium is installed (Debian: ``apt-get install chromium``; CI installs it).
"""

from __future__ import annotations

import json
import shutil
import urllib.parse

import imagecodecs
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from steinpix._cli.main import main

from chromium import Chromium, find_chromium
from conftest import EXAMPLE, TEST_DATA

REF = TEST_DATA / "reference"
IMAGES = (
    "JSON.stringify(Array.from(document.images, i => "
    "[i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight, "
    "i.getBoundingClientRect().width]))"
)


@pytest.fixture(scope="module")
def browser():
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium installed (apt-get install chromium)")
    with Chromium(binary) as chromium:
        yield chromium


def shown_images(browser, page) -> list[list]:
    browser.load(page)
    return json.loads(browser.evaluate(IMAGES))


def test_index_shows_every_image(browser, tmp_path, monkeypatch):
    shutil.copytree(REF / "ilastik_img", tmp_path / "ilastik_img")
    shutil.copytree(REF / "ilastik_probabilities", tmp_path / "ilastik_probabilities")
    shutil.copytree(REF / "prepare" / "ilastik_crops", tmp_path / "ilastik_crops")
    shutil.copy(EXAMPLE / "pretrained.ilp", tmp_path / "pixel_classifier.ilp")
    # a name with characters that mean something in URLs must still load
    for folder, suffix in (("ilastik_img", ".h5"), ("ilastik_probabilities", ".tiff")):
        (tmp_path / folder / f"20210305_NE_mockData1_001{suffix}").rename(
            tmp_path / folder / f"odd #1 100%{suffix}"
        )
    (tmp_path / "ilastik_uncertainty").mkdir()
    for prob in (tmp_path / "ilastik_probabilities").iterdir():
        top = np.sort(tifffile.imread(prob).astype(np.int32), axis=-1)
        unc = (65535 - (top[..., -1] - top[..., -2])).astype(np.uint16)
        tifffile.imwrite(tmp_path / "ilastik_uncertainty" / prob.name, unc)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for args in (["--crops"], []):
        result = runner.invoke(main, ["classify", "ilastik", "preview", *args])
        assert result.exit_code == 0, result.output
    out = tmp_path / "ilastik_preview"
    for page, expected in (("index.html", 9), ("crops.html", 3)):
        images = shown_images(browser, out / page)
        assert len(images) == expected
        for src, complete, width, height, shown in images:
            # a broken image has no natural size; a shown one has its PNG's
            png = imagecodecs.png_decode((out / urllib.parse.unquote(src)).read_bytes())
            assert complete and (height, width) == png.shape[:2], src
            assert shown >= 100, src
    # a missing PNG is caught the same way (the check can fail)
    (out / "images" / "20210305_NE_mockData1_002_image.png").unlink()
    images = shown_images(browser, out / "index.html")
    assert [src for src, _, width, _, _ in images if width == 0] == [
        "images/20210305_NE_mockData1_002_image.png"
    ]
