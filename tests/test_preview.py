"""``classify ilastik preview``: thumbnails, index.html, summary.csv, flags, reruns, errors,
uncertainty and the crops' contact sheet, on ilastik's real outputs for the example data."""

from __future__ import annotations

import csv
import math
import os
import shutil
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import h5py
import imagecodecs
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from steinpix import preview
from steinpix._cli.main import main

from conftest import EXAMPLE, TEST_DATA

REF = TEST_DATA / "reference"
NAMES = sorted(p.stem for p in (REF / "ilastik_probabilities").glob("*.tiff"))
# PmapColors of examples/imc-mock/pretrained.ilp: Nucleus, Cytoplasm, Background
COLORS = np.array([[255, 225, 25], [0, 130, 200], [230, 25, 75]], dtype=np.uint8)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Real ilastik 1.3.3post3 probabilities, their images and the trained project."""
    shutil.copytree(REF / "ilastik_img", tmp_path / "ilastik_img")
    shutil.copytree(REF / "ilastik_probabilities", tmp_path / "ilastik_probabilities")
    shutil.copy(EXAMPLE / "pretrained.ilp", tmp_path / "pixel_classifier.ilp")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(*args: str):
    return CliRunner().invoke(
        main, ["classify", "ilastik", "preview", *args], catch_exceptions=False
    )


def read_png(path: Path) -> np.ndarray:
    return imagecodecs.png_decode(path.read_bytes())


def read_summary(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def uncertainty_of(probs: np.ndarray) -> np.ndarray:
    """1 - (p_max - p_second) as uint16, the way run --uncertainty writes it."""
    top = np.sort(probs.astype(np.int32), axis=-1)
    return (65535 - (top[..., -1] - top[..., -2])).astype(np.uint16)


def uncertain_map(shape: tuple[int, int, int]) -> np.ndarray:
    """Probabilities 0.40 / 0.32 / 0.28, the most probable class changing from pixel to pixel."""
    values = np.array([26000, 21000, 18535], np.uint16)
    order = (np.arange(shape[0] * shape[1]) % 3).reshape(shape[:2])
    return np.stack([values[(order + c) % 3] for c in range(3)], axis=-1)


class PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict] = []
        self.links: list[str] = []
        self.tags: list[str] = []
        self.flagged_rows: list[str] = []
        self._row_class: str | None = None
        self.table_order: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(attrs)
        elif tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
            if attrs["href"].startswith("#"):
                self.table_order.append(attrs["href"][1:])
                if self._row_class == "flagged":
                    self.flagged_rows.append(attrs["href"][1:])
        elif tag == "tr":
            self._row_class = attrs.get("class")


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def test_thumbnails_have_the_expected_size_and_ilastik_colours(workdir):
    result = run()
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["ilastik_preview/index.html"]
    out = workdir / "ilastik_preview" / "images"
    checked = 0
    for name in NAMES:
        probs = tifffile.imread(REF / "ilastik_probabilities" / f"{name}.tiff")
        with h5py.File(REF / "ilastik_img" / f"{name}.h5") as f:
            channel = f["img"][0]
        rgb = read_png(out / f"{name}_probabilities.png")
        gray = read_png(out / f"{name}_image.png")
        # smaller than --size: one thumbnail pixel per pixel
        assert rgb.shape == (*probs.shape[:2], 3) and rgb.dtype == np.uint8
        assert gray.shape == probs.shape[:2] and gray.dtype == np.uint8
        for c, color in enumerate(COLORS):
            others = np.delete(probs, c, axis=-1)
            sure = (probs[..., c] == 65535) & (others == 0).all(axis=-1)
            checked += sure.sum()
            assert (rgb[sure] == color).all()
        expected = np.clip(np.rint(probs / 65535.0 @ COLORS.astype(np.float64)), 0, 255)
        assert np.abs(rgb.astype(int) - expected).max() <= 1
        lo, hi = np.percentile(channel, [1, 99.5])
        expected_gray = np.clip(np.rint((channel - lo) / (hi - lo) * 255), 0, 255)
        assert np.abs(gray.astype(int) - expected_gray).max() <= 1
        assert gray.min() == 0 and gray.max() == 255
    assert checked > 1000  # real pixels where ilastik is sure of one class


def test_size_downsamples_with_block_means(workdir):
    assert run("--size", "50").exit_code == 0
    out = workdir / "ilastik_preview" / "images"
    for name in NAMES:
        probs = tifffile.imread(REF / "ilastik_probabilities" / f"{name}.tiff")
        height, width = probs.shape[:2]
        f = math.ceil(max(height, width) / 50)
        rgb = read_png(out / f"{name}_probabilities.png")
        assert rgb.shape == (math.ceil(height / f), math.ceil(width / f), 3)
        assert max(rgb.shape[:2]) <= 50
        # a full block is the mean colour of its pixels; the edge blocks of what remains
        block = probs[:f, :f].reshape(-1, 3) / 65535.0
        np.testing.assert_allclose(rgb[0, 0], block.mean(axis=0) @ COLORS, atol=0.51)
        edge = probs[(rgb.shape[0] - 1) * f :, (rgb.shape[1] - 1) * f :].reshape(-1, 3) / 65535
        np.testing.assert_allclose(rgb[-1, -1], edge.mean(axis=0) @ COLORS, atol=0.51)


def test_block_mean_matches_numpy_on_uneven_shapes():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 65535, (37, 23, 2), dtype=np.uint16)
    for factor in (1, 2, 5, 40):
        got = preview.block_mean(img, factor)
        expected = np.array(
            [
                [
                    img[y : y + factor, x : x + factor].reshape(-1, 2).mean(axis=0)
                    for x in range(0, 23, factor)
                ]
                for y in range(0, 37, factor)
            ]
        )
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_index_html_parses_and_every_image_exists(workdir):
    # a name with characters that mean something in URLs
    odd = "odd #1 100%"
    for folder, suffix in (("ilastik_img", ".h5"), ("ilastik_probabilities", ".tiff")):
        (workdir / folder / f"{NAMES[0]}{suffix}").rename(workdir / folder / f"{odd}{suffix}")
    assert run().exit_code == 0
    out = workdir / "ilastik_preview"
    page = parse(out / "index.html")
    assert "script" not in page.tags and "link" not in page.tags
    srcs = [img["src"] for img in page.imgs]
    assert len(srcs) == 2 * len(NAMES)
    assert "images/odd%20%231%20100%25_image.png" in srcs
    for src in srcs + [h for h in page.links if not h.startswith("#")]:
        assert "://" not in src and not src.startswith("/")
        assert (out / urllib.parse.unquote(src)).is_file(), src
    for img in page.imgs:
        assert int(img["width"]) > 0 and int(img["height"]) > 0 and img["alt"]
    text = (out / "index.html").read_text()
    for name in ("Nucleus", "Cytoplasm", "Background"):
        assert name in text
    for color in COLORS:
        assert "#{:02x}{:02x}{:02x}".format(*color) in text  # the legend's colours


def test_summary_csv_matches_numpy(workdir):
    assert run().exit_code == 0
    rows = read_summary(workdir / "ilastik_preview" / "summary.csv")
    assert [r["image"] for r in rows] == NAMES
    for row in rows:
        probs = tifffile.imread(REF / "ilastik_probabilities" / f"{row['image']}.tiff")
        assert (int(row["height"]), int(row["width"])) == probs.shape[:2]
        counts = np.bincount(np.argmax(probs, axis=-1).ravel(), minlength=3)
        fractions = counts / counts.sum()
        for name, expected in zip(("Nucleus", "Cytoplasm", "Background"), fractions, strict=True):
            assert float(row[f"fraction_{name}"]) == pytest.approx(expected, abs=1e-6)
        mean_max = probs.max(axis=-1).mean() / 65535
        assert float(row["mean_max_probability"]) == pytest.approx(mean_max, abs=1e-6)


def test_flags_fire_on_all_background_and_uncertain_maps(workdir):
    probs_dir = workdir / "ilastik_probabilities"
    shape = tifffile.imread(probs_dir / f"{NAMES[1]}.tiff").shape
    background = np.zeros(shape, np.uint16)
    background[..., 2] = 65535
    tifffile.imwrite(probs_dir / f"{NAMES[1]}.tiff", background, photometric="rgb")
    shape = tifffile.imread(probs_dir / f"{NAMES[2]}.tiff").shape
    tifffile.imwrite(probs_dir / f"{NAMES[2]}.tiff", uncertain_map(shape), photometric="rgb")
    result = run()
    assert result.exit_code == 0, result.output
    rows = {r["image"]: r for r in read_summary(workdir / "ilastik_preview" / "summary.csv")}
    assert rows[NAMES[1]]["flags"] == "Background on 100.0% of pixels"
    assert rows[NAMES[2]]["flags"] == "uncertain: mean max probability 0.40"
    # ilastik itself finds no nucleus or cytoplasm in the first example image
    assert rows[NAMES[0]]["flags"] == "Background on 100.0% of pixels"
    assert f"{NAMES[1]}: Background on 100.0% of pixels" in result.stderr
    page = parse(workdir / "ilastik_preview" / "index.html")
    assert sorted(page.flagged_rows) == NAMES
    # all background: exactly the background colour everywhere
    rgb = read_png(workdir / "ilastik_preview" / "images" / f"{NAMES[1]}_probabilities.png")
    assert (rgb == COLORS[2]).all()
    # thresholds are options: nothing is flagged when they are relaxed
    assert run("--flag-fraction", "1", "--flag-confidence", "0").exit_code == 0
    rows = read_summary(workdir / "ilastik_preview" / "summary.csv")
    assert all(r["flags"] == "" for r in rows)
    assert parse(workdir / "ilastik_preview" / "index.html").flagged_rows == []


def test_flagged_images_come_first_in_the_summary_table(workdir):
    probs_dir = workdir / "ilastik_probabilities"
    shape = tifffile.imread(probs_dir / f"{NAMES[2]}.tiff").shape
    tifffile.imwrite(probs_dir / f"{NAMES[2]}.tiff", uncertain_map(shape))
    assert run().exit_code == 0
    page = parse(workdir / "ilastik_preview" / "index.html")
    assert page.table_order[: len(NAMES)] == [NAMES[0], NAMES[2], NAMES[1]]


def mtimes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()
    }


def test_rerun_only_rewrites_what_changed(workdir):
    out = workdir / "ilastik_preview"
    assert run().exit_code == 0
    first = mtimes(out)
    assert len(first) == 2 * len(NAMES) + 2
    result = run()
    assert result.exit_code == 0
    assert mtimes(out) == first  # nothing written, not even the page
    assert "3 of 3 previews are up to date" in result.stderr
    # a newer probability map: only its thumbnails are redrawn
    prob = workdir / "ilastik_probabilities" / f"{NAMES[1]}.tiff"
    future = max(first.values()) + 10**9
    os.utime(prob, ns=(future, future))
    result = run()
    assert result.exit_code == 0
    changed = {k for k, v in mtimes(out).items() if v != first[k]}
    assert changed == {f"images/{NAMES[1]}_probabilities.png", f"images/{NAMES[1]}_image.png"}
    # a deleted thumbnail is redrawn; another --size redraws everything
    (out / "images" / f"{NAMES[0]}_image.png").unlink()
    assert run().exit_code == 0
    assert (out / "images" / f"{NAMES[0]}_image.png").is_file()
    before = mtimes(out)
    assert run("--size", "40").exit_code == 0
    after = mtimes(out)
    assert all(after[k] != before[k] for k in before if k.startswith("images/"))
    assert max(read_png(out / "images" / f"{NAMES[0]}_image.png").shape) <= 40
    # --overwrite redraws even what is up to date
    before = mtimes(out)
    assert run("--size", "40", "--overwrite").exit_code == 0
    assert all(mtimes(out)[k] != before[k] for k in before if k.startswith("images/"))


def test_bad_and_missing_files_are_named_and_the_others_previewed(workdir):
    probs_dir = workdir / "ilastik_probabilities"
    (probs_dir / f"{NAMES[0]}.tiff").write_bytes(b"II*\x00 not really a tiff")
    two = tifffile.imread(probs_dir / f"{NAMES[1]}.tiff")[..., :2]
    tifffile.imwrite(probs_dir / f"{NAMES[1]}.tiff", two)
    shutil.copy(probs_dir / f"{NAMES[2]}.tiff", probs_dir / "orphan.tiff")
    result = run()
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 3
    assert f"ilastik_probabilities/{NAMES[0]}.tiff: not a readable probability TIFF" in errors[0]
    assert (
        f"ilastik_probabilities/{NAMES[1]}.tiff: 2 probability channels, but the project has "
        "3 classes" in errors[1]
    )
    assert (
        "ilastik_probabilities/orphan.tiff: no image (ilastik_img/orphan.h5 missing)" in (errors[2])
    )
    assert "Error: 3 of 4 images could not be previewed" in result.stderr
    out = workdir / "ilastik_preview"
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        f"{NAMES[2]}_image.png",
        f"{NAMES[2]}_probabilities.png",
    ]
    assert [r["image"] for r in read_summary(out / "summary.csv")] == [NAMES[2]]
    text = (out / "index.html").read_text()
    assert "Not previewed (3)" in text and "orphan.tiff" in text
    # an image without probabilities is named too
    (probs_dir / f"{NAMES[0]}.tiff").unlink()
    result = run()
    assert f"ilastik_img/{NAMES[0]}.h5: no probabilities" in result.stderr


def test_every_image_failing_says_none_is_on_the_page(workdir):
    for name in NAMES:
        (workdir / "ilastik_probabilities" / f"{name}.tiff").write_bytes(b"")
    result = run()
    assert result.exit_code == 1
    assert (
        f"Error: {len(NAMES)} of {len(NAMES)} images could not be previewed (see above; none "
        "are in ilastik_preview/index.html)" in result.stderr
    )
    assert f"ilastik_probabilities/{NAMES[0]}.tiff: not a readable probability TIFF" in (
        result.stderr
    )


def test_image_of_another_size_is_an_error_for_that_image(workdir):
    img = workdir / "ilastik_img" / f"{NAMES[0]}.h5"
    with h5py.File(img, "a") as f:
        data = f["img"][:, :50, :50]
        del f["img"]
        f["img"] = data
    result = run()
    assert result.exit_code == 1
    assert f"ilastik_img/{NAMES[0]}.h5: image of 50 x 50 pixels" in result.stderr
    assert len(read_summary(workdir / "ilastik_preview" / "summary.csv")) == 2


def write_uncertainty(workdir: Path, folder: str, names: list[str]) -> None:
    (workdir / folder).mkdir()
    for name in names:
        probs = tifffile.imread(REF / "ilastik_probabilities" / f"{name}.tiff")
        tifffile.imwrite(workdir / folder / f"{name}.tiff", uncertainty_of(probs))


def test_uncertainty_is_a_third_thumbnail_when_it_exists(workdir):
    write_uncertainty(workdir, "ilastik_uncertainty", NAMES[:2])  # the default folder
    assert run().exit_code == 0
    out = workdir / "ilastik_preview"
    for name in NAMES[:2]:
        unc = tifffile.imread(workdir / "ilastik_uncertainty" / f"{name}.tiff")
        gray = read_png(out / "images" / f"{name}_uncertainty.png")
        np.testing.assert_array_equal(gray, np.rint(unc / 65535 * 255).astype(np.uint8))
    assert not (out / "images" / f"{NAMES[2]}_uncertainty.png").exists()
    srcs = [img["src"] for img in parse(out / "index.html").imgs]
    assert len(srcs) == 2 * len(NAMES) + 2
    assert f"images/{NAMES[0]}_uncertainty.png" in srcs
    # uncertainty that appears later is added on a rerun
    write_uncertainty(workdir, "unc", NAMES)
    assert run("--uncertainty", "unc").exit_code == 0
    assert (out / "images" / f"{NAMES[2]}_uncertainty.png").is_file()
    assert len(parse(out / "index.html").imgs) == 3 * len(NAMES)


def test_uncertainty_of_another_size_is_an_error(workdir):
    (workdir / "unc").mkdir()
    tifffile.imwrite(workdir / "unc" / f"{NAMES[0]}.tiff", np.zeros((5, 5), np.uint16))
    result = run("--uncertainty", "unc")
    assert result.exit_code == 1
    assert f"unc/{NAMES[0]}.tiff: uncertainty of 5 x 5 pixels" in result.stderr


def test_missing_uncertainty_folder_given_explicitly(workdir):
    result = run("--uncertainty", "nowhere")
    assert result.exit_code == 2 and "nowhere" in result.stderr


def make_project(path: Path, names: list[bytes], colors=None) -> None:
    with h5py.File(path, "w") as f:
        pc = f.create_group("PixelClassification")
        if names:
            pc["LabelNames"] = np.array(names, dtype=h5py.string_dtype("ascii"))
        else:  # how ilastik stores an empty list
            pc["LabelNames"] = np.zeros(1)
            pc["LabelNames"].attrs["isEmpty"] = True
        if colors is not None:
            pc["PmapColors"] = colors


def test_decode_colors_rgb_rows_and_qrgb():
    rows = np.array([[255, 0, 0], [0, 225, 0]], dtype=np.int64)
    np.testing.assert_array_equal(preview.decode_colors(rows), rows.astype(np.uint8))
    qrgb = np.array([0xFFFF0000, 0xFF00E100, 0xFF0082C8], dtype=np.uint32)
    np.testing.assert_array_equal(
        preview.decode_colors(qrgb), [[255, 0, 0], [0, 225, 0], [0, 130, 200]]
    )
    assert preview.decode_colors(np.array([[1.0, 2.0, 3.0]])) is None
    assert preview.decode_colors(np.array([[300, 0, 0]])) is None


def test_classes_from_qrgb_colours_and_the_default_colours(workdir):
    make_project(
        workdir / "qrgb.ilp",
        [b"Nucleus", b"Cytoplasm", b"Background"],
        np.array([0xFFFF0000, 0xFF00FF00, 0xFF0000FF], dtype=np.uint32),
    )
    assert run("--ilp", "qrgb.ilp", "-o", "q").exit_code == 0
    probs = tifffile.imread(REF / "ilastik_probabilities" / f"{NAMES[0]}.tiff")
    rgb = read_png(workdir / "q" / "images" / f"{NAMES[0]}_probabilities.png")
    sure = probs[..., 2] == 65535
    assert sure.any() and (rgb[sure] == [0, 0, 255]).all()
    make_project(workdir / "nocolors.ilp", [b"Nucleus", b"Cytoplasm", b"Background"])
    result = run("--ilp", "nocolors.ilp", "-o", "d")
    assert result.exit_code == 0
    assert "no usable PmapColors; using ilastik's default colours" in result.stderr
    rgb = read_png(workdir / "d" / "images" / f"{NAMES[0]}_probabilities.png")
    assert (rgb[sure] == preview.DEFAULT_COLORS[2]).all()
    assert "ilastik's default colours" in (workdir / "d" / "index.html").read_text()


def test_project_without_classes(workdir):
    make_project(workdir / "empty.ilp", [])
    result = run("--ilp", "empty.ilp")
    assert result.exit_code == 1
    assert "empty.ilp: no PixelClassification/LabelNames" in result.stderr


def test_no_probabilities_folder(workdir):
    result = run("--probabilities", "nothing")
    assert result.exit_code == 1
    assert "nothing: no such folder (probabilities)" in result.stderr


@pytest.fixture
def cropdir(workdir) -> Path:
    shutil.copytree(REF / "prepare" / "ilastik_crops", workdir / "ilastik_crops")
    return workdir


def test_crops_contact_sheet(cropdir):
    crops = sorted((cropdir / "ilastik_crops").glob("*.h5"))
    blank = cropdir / "ilastik_crops" / "blank_x0_y0_w50_h50.h5"
    with h5py.File(blank, "w") as f:
        f["crop"] = np.zeros((4, 50, 50), np.float32)
    result = run("--crops")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["ilastik_preview/crops.html"]
    out = cropdir / "ilastik_preview"
    page = parse(out / "crops.html")
    srcs = [img["src"] for img in page.imgs]
    assert sorted(srcs) == sorted(f"crops/{p.stem}.png" for p in [*crops, blank])
    assert srcs[0] == "crops/blank_x0_y0_w50_h50.png"  # flagged first
    for crop in crops:
        gray = read_png(out / "crops" / f"{crop.stem}.png")
        with h5py.File(crop) as f:
            channel = f["crop"][0]
        assert gray.shape == channel.shape == (50, 50)
        assert gray.min() == 0 and gray.max() == 255
    assert "blank: no contrast" in result.stderr
    text = (out / "crops.html").read_text()
    assert "blank: no contrast" in text
    for crop in crops:
        assert crop.stem in text
    # rerun: nothing rewritten
    first = mtimes(out)
    assert run("--crops").exit_code == 0
    assert mtimes(out) == first
    # the images page links the crops page once both exist
    assert run().exit_code == 0
    assert "crops.html" in parse(out / "index.html").links


def test_crops_need_no_project(cropdir):
    (cropdir / "pixel_classifier.ilp").unlink()  # crops are previewed before training
    result = run("--crops")
    assert result.exit_code == 0, result.output
    assert len(parse(cropdir / "ilastik_preview" / "crops.html").imgs) == 3
    # the probabilities page does need it, and says so as for every other command
    result = run()
    assert result.exit_code == 2
    assert "Invalid value for '--ilp': File 'pixel_classifier.ilp' does not exist." in (
        result.stderr
    )


def test_crop_not_in_steinbock_format(cropdir):
    bad = cropdir / "ilastik_crops" / "pipeline_s2.h5"
    with h5py.File(bad, "w") as f:
        f["pipeline_s2"] = np.zeros((1, 50, 50, 4), np.uint16)
    result = run("--crops")
    assert result.exit_code == 1
    assert (
        "ilastik_crops/pipeline_s2.h5: no 'crop' dataset (a crop not in steinbock format? "
        "see classify ilastik fix)" in result.stderr
    )
    assert len(parse(cropdir / "ilastik_preview" / "crops.html").imgs) == 3


def test_preview_is_listed_after_run():
    result = CliRunner().invoke(main, ["classify", "ilastik", "--help"])
    commands = [
        line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line
    ]
    assert commands.index("preview") == commands.index("run") + 1


def test_preview_of_a_real_run_with_uncertainty(tmp_path, monkeypatch):
    # the README's walkthrough: run with the built-in engine, then preview its uncertainty
    shutil.copytree(REF / "ilastik_img", tmp_path / "ilastik_img")
    shutil.copy(EXAMPLE / "pretrained.ilp", tmp_path / "pretrained.ilp")
    monkeypatch.chdir(tmp_path)
    ran = CliRunner().invoke(
        main,
        [
            "classify",
            "ilastik",
            "run",
            "--ilp",
            "pretrained.ilp",
            "--engine",
            "builtin",
            "--uncertainty",
            "ilastik_uncertainty",
        ],
    )
    assert ran.exit_code == 0, ran.output
    result = run("--ilp", "pretrained.ilp")
    assert result.exit_code == 0, result.output
    out = tmp_path / "ilastik_preview"
    assert len(parse(out / "index.html").imgs) == 3 * len(NAMES)
    for name in NAMES:
        unc = tifffile.imread(tmp_path / "ilastik_uncertainty" / f"{name}.tiff")
        gray = read_png(out / "images" / f"{name}_uncertainty.png")
        np.testing.assert_array_equal(gray, np.rint(unc / 65535 * 255).astype(np.uint8))
