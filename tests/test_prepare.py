"""``classify ilastik prepare`` against steinbock's own outputs and against the rules."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from skimage.transform import resize

from steinpix._cli.main import main
from steinpix.images import read_image, read_image_shape

from conftest import EXAMPLE, TEST_DATA
from h5tree import describe

REF = TEST_DATA / "reference"
IGNORE = ("time", "datasetId")


def run_prepare(workdir: Path, *args: str):
    result = CliRunner().invoke(
        main, ["classify", "ilastik", "prepare", *args], catch_exceptions=False, env={}
    )
    return result


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    shutil.copytree(EXAMPLE / "img", tmp_path / "img")
    shutil.copy(EXAMPLE / "panel.csv", tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def read_h5(path: Path, name: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[name][()]


def assert_same_image_file(ours: Path, ref: Path, name: str) -> None:
    """Same HDF5 layout, types and attributes; values equal to float32 rounding."""
    assert describe(ours, ignore=(name,)) == describe(ref, ignore=(name,))
    a, b = read_h5(ours, name), read_h5(ref, name)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    # OpenCV's vectorised bilinear interpolation rounds a few values differently (<= 2 ulp)
    np.testing.assert_allclose(a, b, rtol=3e-7, atol=0)


def assert_project_matches(ours: Path, ref: Path, n_lanes: int) -> None:
    """Our project equals steinbock's, lane for lane, apart from uuid, time and the
    feature pre-selection (steinbock leaves FeatureSelections empty)."""
    a = describe(ours, ignore=IGNORE)
    b = describe(ref, ignore=IGNORE)

    def keep(tree, lanes):
        return {
            k: v
            for k, v in tree.items()
            if not k.startswith("FeatureSelections/")
            and not any(k.startswith(f"Input Data/infos/lane{i:04d}") for i in range(lanes, 99))
        }

    assert keep(a, n_lanes) == keep(b, n_lanes)
    with h5py.File(ours, "r") as f:
        lanes = f["Input Data/infos"]
        assert len(lanes) == n_lanes
        ids = {lanes[f"{k}/Raw Data/datasetId"][()] for k in lanes}
        assert len(ids) == 1  # one uuid per project, shared by its lanes
        fs = f["FeatureSelections"]
        np.testing.assert_array_equal(fs["Scales"][()], [0.3, 0.7, 1.0, 1.6, 3.5, 5.0, 10.0])
        assert fs["SelectionMatrix"][()].sum(axis=0).tolist() == [0, 0, 6, 6, 6, 6, 6]


def test_prepare_example_matches_steinbock(workdir):
    result = run_prepare(workdir, "--cropsize", "50", "--seed", "123")
    assert result.exit_code == 0, result.output
    ref_crops = sorted((REF / "prepare" / "ilastik_crops").iterdir())
    crops = sorted((workdir / "ilastik_crops").iterdir())
    assert [c.name for c in crops] == [c.name for c in ref_crops]
    for ours, ref in zip(crops, ref_crops, strict=True):
        assert_same_image_file(ours, ref, "crop")
    imgs = sorted((workdir / "ilastik_img").iterdir())
    assert [p.name for p in imgs] == [p.name for p in sorted((REF / "ilastik_img").iterdir())]
    for ours in imgs:
        assert_same_image_file(ours, REF / "ilastik_img" / ours.name, "img")
    assert_project_matches(
        workdir / "pixel_classifier.ilp", REF / "prepare" / "pixel_classifier.ilp", n_lanes=3
    )
    # steinbock prints every output path
    assert "ilastik_crops/20210305_NE_mockData1_001_x1_y47_w50_h50.h5" in result.stdout
    assert result.stdout.strip().endswith("pixel_classifier.ilp")


def test_prepare_all_shared_images_match_steinbock(imc_mock, tmp_path, monkeypatch):
    shutil.copytree(imc_mock / "img", tmp_path / "img")
    shutil.copy(imc_mock / "panel.csv", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert run_prepare(tmp_path, "--cropsize", "50", "--seed", "123").exit_code == 0
    ref = imc_mock / "reference"
    for ours in sorted((tmp_path / "ilastik_img").iterdir()):
        assert_same_image_file(ours, ref / "ilastik_img" / ours.name, "img")
    ref_crops = sorted((ref / "steinbock-0.16.5" / "prepare" / "ilastik_crops").iterdir())
    crops = sorted((tmp_path / "ilastik_crops").iterdir())
    assert [c.name for c in crops] == [c.name for c in ref_crops]
    for ours, theirs in zip(crops, ref_crops, strict=True):
        assert_same_image_file(ours, theirs, "crop")
    assert_project_matches(
        tmp_path / "pixel_classifier.ilp",
        ref / "steinbock-0.16.5" / "prepare" / "pixel_classifier.ilp",
        n_lanes=9,
    )


# --- other option values, against outputs derived by hand from steinbock's rules -----------


def expected_image(img, groups, aggr, mean, factor, scale):
    """steinbock's rules, written out plainly: group, aggregate, prepend mean, upscale."""
    if groups is not None:
        chans = [
            aggr(img[[i for i, g in enumerate(groups) if g == v]], axis=0)
            for v in sorted({g for g in groups if g == g})
        ]
        img = np.stack(chans)
    if mean:
        img = np.concatenate([img.mean(axis=0, keepdims=True) * factor, img])
    if scale > 1:
        # skimage's order-1 resize is pixel-centre aligned with replicated edges, like OpenCV
        img = resize(
            img.astype(np.float64),
            (img.shape[0], img.shape[1] * scale, img.shape[2] * scale),
            order=1,
            mode="edge",
            anti_aliasing=False,
        )
    return img.astype(np.float32)


EXAMPLE_GROUPS = [1, None, None, 2, 3]


@pytest.mark.parametrize(
    "args, aggr, mean, factor, scale",
    [
        (["--scale", "1"], np.mean, True, 100.0, 1),
        (["--scale", "3"], np.mean, True, 100.0, 3),
        (["--aggr", "max", "--no-mean"], np.max, False, 100.0, 2),
        (["--aggr", "median", "--meanfactor", "7.5"], np.median, True, 7.5, 2),
    ],
)
def test_option_values(workdir, args, aggr, mean, factor, scale):
    # two channels per group, so that the aggregation really aggregates
    (workdir / "panel.csv").write_text(
        "channel,name,keep,ilastik\nA,a,1,2\nB,b,1,1\nC,c,1,\nD,d,1,2\nE,e,1,1\n"
    )
    result = run_prepare(workdir, "--cropsize", "20", "--seed", "7", *args)
    assert result.exit_code == 0, result.output
    for img_file in sorted((workdir / "img").iterdir()):
        img = read_image(img_file)
        groups = [2, 1, None, 2, 1]
        ours = read_h5(workdir / "ilastik_img" / f"{img_file.stem}.h5", "img")
        want = expected_image(
            img, [g if g is not None else np.nan for g in groups], aggr, mean, factor, scale
        )
        assert ours.shape == want.shape
        np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_panel_without_ilastik_column_uses_all_channels(workdir):
    (workdir / "panel.csv").write_text("channel,name\nA,a\nB,b\nC,c\nD,d\nE,e\n")
    assert run_prepare(workdir, "--scale", "1", "--cropsize", "10").exit_code == 0
    img_file = sorted((workdir / "img").iterdir())[0]
    img = read_image(img_file)
    ours = read_h5(workdir / "ilastik_img" / f"{img_file.stem}.h5", "img")
    assert ours.shape == (6, *img.shape[1:])
    np.testing.assert_allclose(ours[0], img.mean(axis=0) * 100, rtol=1e-6)
    np.testing.assert_array_equal(ours[1:], img)


def test_crops_larger_than_some_images(workdir):
    # scaled sizes (Y, X): 120x120, 102x128, 86x100; a 110 crop fits only the first
    result = run_prepare(workdir, "--cropsize", "110", "--seed", "5")
    assert result.exit_code == 0, result.output
    rng = np.random.default_rng(5)
    x, y = int(rng.integers(120 - 110)), int(rng.integers(120 - 110))
    crops = sorted(p.name for p in (workdir / "ilastik_crops").iterdir())
    assert crops == [f"20210305_NE_mockData1_001_x{x}_y{y}_w110_h110.h5"]
    assert "too small for crop size" in result.stderr
    img = read_h5(workdir / "ilastik_img" / "20210305_NE_mockData1_001.h5", "img")
    crop = read_h5(workdir / "ilastik_crops" / crops[0], "crop")
    np.testing.assert_array_equal(crop, img[:, y : y + 110, x : x + 110])
    with h5py.File(workdir / "pixel_classifier.ilp", "r") as f:
        assert list(f["Input Data/infos"]) == ["lane0000"]


def test_crop_equal_to_image_size_draws_nothing_on_that_axis(workdir):
    # 128 wide, 102 tall: x is drawn, y is 0 when the crop is exactly as tall
    for p in sorted((workdir / "img").iterdir())[::2]:
        p.unlink()
    result = run_prepare(workdir, "--cropsize", "102", "--seed", "1")
    assert result.exit_code == 0, result.output
    x = int(np.random.default_rng(1).integers(128 - 102))
    assert [p.name for p in (workdir / "ilastik_crops").iterdir()] == [
        f"20210305_NE_mockData1_002_x{x}_y0_w102_h102.h5"
    ]


def test_same_seed_same_crops_and_no_seed_runs(workdir):
    run_prepare(workdir, "--cropsize", "30", "--seed", "42", "--cropout", "a")
    run_prepare(workdir, "--cropsize", "30", "--seed", "42", "--cropout", "b")
    assert sorted(p.name for p in (workdir / "a").iterdir()) == sorted(
        p.name for p in (workdir / "b").iterdir()
    )
    assert run_prepare(workdir, "--cropsize", "30", "--cropout", "c").exit_code == 0
    assert len(list((workdir / "c").iterdir())) == 3


@pytest.mark.parametrize(
    "shape, dtype",
    [((60, 50), np.uint16), ((5, 60, 50), np.uint16), ((1, 1, 5, 60, 50), np.float64)],
)
def test_image_shapes_and_dtypes(tmp_path, monkeypatch, shape, dtype):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    img = rng.integers(0, 1000, size=shape).astype(dtype)
    tifffile.imwrite(tmp_path / "img" / "a.tiff", img)
    n = 1 if len(shape) == 2 else 5
    (tmp_path / "panel.csv").write_text(
        "channel,name\n" + "".join(f"C{i},c{i}\n" for i in range(n))
    )
    result = run_prepare(tmp_path, "--scale", "1", "--cropsize", "10")
    assert result.exit_code == 0, result.output
    ours = read_h5(tmp_path / "ilastik_img" / "a.h5", "img")
    cyx = img.reshape((n, 60, 50))
    # integers are averaged in float64 (numpy's mean), then stored as float32
    np.testing.assert_array_equal(ours[0], (cyx.mean(axis=0) * 100).astype(np.float32))
    np.testing.assert_array_equal(ours[1:], cyx.astype(np.float32))


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((60, 50), {}),
        ((5, 60, 50), {}),
        ((1, 5, 60, 50), {}),
        ((5, 60, 50, 1), {}),
        ((1, 1, 5, 60, 50), {"imagej": True}),
        ((1, 1, 5, 60, 50), {"metadata": {"axes": "TZCYX"}, "ome": True}),
    ],
)
def test_header_shape_is_the_shape_read(tmp_path, shape, kwargs):
    """``read_image_shape`` (header only) agrees with the pixels, whatever tifffile release."""
    path = tmp_path / "a.tiff"
    tifffile.imwrite(path, np.zeros(shape, dtype=np.uint16), **kwargs)
    assert read_image_shape(path) == read_image(path).shape == (5 if len(shape) > 2 else 1, 60, 50)


# --- better than steinbock: errors are one line, name the file, and nothing half-written ---


def assert_one_line_error(result, *parts: str) -> None:
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if "Error" in line or "ERROR" in line]
    assert lines, result.stderr
    assert "Traceback" not in result.output
    for part in parts:
        assert any(part in line for line in lines), (part, result.stderr)


def test_panel_channel_count_mismatch_stops_before_writing(workdir):
    (workdir / "panel.csv").write_text("channel,name\nA,a\nB,b\n")
    result = run_prepare(workdir, "--cropsize", "50")
    assert_one_line_error(result, "img/20210305_NE_mockData1_001.tiff", "panel.csv", "5 channels")
    assert not (workdir / "ilastik_img").exists()
    assert not (workdir / "pixel_classifier.ilp").exists()


def test_panel_missing_column_and_duplicates(workdir):
    (workdir / "panel.csv").write_text("channel,keep\nA,1\n")
    assert_one_line_error(run_prepare(workdir), "panel.csv: missing 'name' column")
    (workdir / "panel.csv").write_text("channel,name\nA,a\nA,b\n")
    assert_one_line_error(run_prepare(workdir), "panel.csv: duplicated values")


def test_corrupt_tiff_is_reported_and_others_are_prepared(workdir):
    bad = workdir / "img" / "20210305_NE_mockData1_002.tiff"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated
    result = run_prepare(workdir, "--cropsize", "50", "--seed", "123")
    assert result.exit_code == 1
    assert "20210305_NE_mockData1_002.tiff" in result.stderr
    assert "Traceback" not in result.output
    assert sorted(p.name for p in (workdir / "ilastik_img").iterdir()) == [
        "20210305_NE_mockData1_001.h5",
        "20210305_NE_mockData1_003.h5",
    ]
    with h5py.File(workdir / "pixel_classifier.ilp", "r") as f:
        assert len(f["Input Data/infos"]) == 2


def test_bad_aggr_and_no_images(workdir):
    assert_one_line_error(run_prepare(workdir, "--aggr", "nosuchfunc"), "--aggr nosuchfunc")
    for p in (workdir / "img").iterdir():
        p.unlink()
    assert_one_line_error(run_prepare(workdir), "img: no *.tiff images found")


def test_no_temporary_files_left(workdir):
    assert run_prepare(workdir, "--cropsize", "50").exit_code == 0
    leftovers = [p for p in workdir.rglob(".*") if p.is_file()]
    assert leftovers == []


def test_project_in_another_folder_points_at_the_crops(workdir):
    # steinbock raises ValueError here (Path.relative_to); lanes must be relative to the project
    result = run_prepare(workdir, "--cropsize", "50", "--seed", "123", "-o", "sub/p.ilp")
    assert result.exit_code == 0, result.output
    with h5py.File(workdir / "sub" / "p.ilp", "r") as f:
        path = f["Input Data/infos/lane0000/Raw Data/filePath"][()].decode()
    assert path == "../ilastik_crops/20210305_NE_mockData1_001_x1_y47_w50_h50.h5/crop"
    assert (workdir / "sub" / path.rsplit("/", 1)[0]).is_file()


def test_unwritable_output_folder_is_one_line(workdir):
    (workdir / "blocker").write_text("a file where a folder should go")
    result = run_prepare(workdir, "--cropsize", "50", "--imgout", "blocker/ilastik_img")
    assert_one_line_error(result, "blocker/ilastik_img")
    assert "Traceback" not in result.output
