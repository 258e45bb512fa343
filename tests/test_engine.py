"""The built-in engine end to end: bit-identical to real ilastik 1.3.3post3 output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numba
import numpy as np
import pytest
import tifffile

from steinpix import engine
from steinpix.errors import SteinpixError

from conftest import EXAMPLE, SHARED, TEST_DATA

PROJECT = EXAMPLE / "pretrained.ilp"
REFERENCE = TEST_DATA / "reference"
IN_REPO_IMAGES = sorted((REFERENCE / "ilastik_img").glob("*.h5"))
SHARED_REFERENCE = SHARED / "data" / "imc-mock" / "reference"


@pytest.fixture(scope="module")
def project():
    return engine.load_project(PROJECT)


def reference_of(img_file: Path) -> np.ndarray:
    ref_dir = img_file.parent.parent / "ilastik_probabilities"
    return tifffile.imread(ref_dir / f"{img_file.stem}.tiff")


def differing_pixels(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.any(a != b, axis=-1).sum())


def write_image(path: Path, img: np.ndarray, name: str = "img") -> Path:
    with h5py.File(path, "w") as h5:
        h5[name] = img
    return path


@pytest.mark.parametrize("img_file", IN_REPO_IMAGES, ids=lambda p: p.stem)
def test_builtin_engine_is_bit_identical_to_ilastik(tmp_path, project, img_file):
    classifier, selection = project
    out_file = engine.output_path(img_file, tmp_path)
    engine.predict_file(img_file, out_file, classifier, selection)
    got = tifffile.imread(out_file)
    want = reference_of(img_file)
    assert got.dtype == np.uint16 and got.shape == want.shape
    assert differing_pixels(got, want) == 0


def test_all_shared_reference_images_are_bit_identical(project):
    if not SHARED.is_dir():
        pytest.skip(f"the shared data set is not beside the repository ({SHARED})")
    images = sorted((SHARED_REFERENCE / "ilastik_img").glob("*.h5"))
    assert len(images) == 9
    classifier, selection = project
    for img_file in images:
        got = engine.predict_image(engine.read_image(img_file), classifier, selection)
        assert differing_pixels(got, reference_of(img_file)) == 0, img_file.name


def test_profile_14x_differs_at_most_by_single_tree_votes(project):
    # The 1.4.x arithmetic is a prediction (spec §5): on these images it moves one pixel of
    # mockData1_002 by one tree vote.
    classifier, selection = project
    total = 0
    for img_file in IN_REPO_IMAGES:
        got = engine.predict_image(engine.read_image(img_file), classifier, selection, "14x")
        want = reference_of(img_file)
        total += differing_pixels(got, want)
        assert np.abs(got.astype(int) - want).max() <= 2 * 655 + 2
    assert total <= 3


def test_strips_give_the_same_result_as_one_strip(project):
    classifier, selection = project
    img = engine.read_image(IN_REPO_IMAGES[0])
    whole = engine.predict_image(img, classifier, selection)
    # the smallest strips: one row each, computed from the row and its halo of context
    strips = engine.predict_image(img, classifier, selection, max_pixels_per_strip=1)
    assert img.shape[1] > 3 * selection.min_size() > 0
    np.testing.assert_array_equal(strips, whole)
    # a tall image cut into several strips equals the same image classified in one piece
    tall = np.concatenate([img, img[:, ::-1], img], axis=1)
    strip = (2 * selection.min_size() + 5) * tall.shape[2]
    np.testing.assert_array_equal(
        engine.predict_image(tall, classifier, selection, max_pixels_per_strip=strip),
        engine.predict_image(tall, classifier, selection, max_pixels_per_strip=10**9),
    )


def strip_bytes(rows: int, width: int, halo: int, in_flight: int = 1) -> int:
    """Working memory of the strips of the pretrained project (4 channels, 5 scales, 3
    labels): probabilities (float32 and uint16) of the output rows; of the rows with their
    halo, the input and the presmoothed planes of each strip in flight and one temporary plane
    per thread; per thread one row of 160 features and 9 ring buffers of 7 rows per (channel,
    scale)."""
    threads = numba.config.NUMBA_NUM_THREADS
    output_rows = rows * width * 6 * 3
    halo_rows = (rows + 2 * halo) * width * 4 * (in_flight * 4 * (5 + 1) + threads)
    return output_rows + halo_rows + width * 4 * (160 + 20 * 9 * 7) * numba.config.NUMBA_NUM_THREADS


def test_wide_images_fit_the_memory_budget(project):
    classifier, selection = project
    # 25,000 pixels wide: thin strips, still within the budget, never below one row
    rows = engine.strip_rows(3000, 25_000, 4, selection, 3)
    assert 1 <= rows < selection.min_size()
    assert strip_bytes(rows, 25_000, selection.halo()) <= engine.STRIP_BYTES
    assert engine.strip_rows(3000, 25_000, 4, selection, 3, max_bytes=1) == 1


def test_strip_rows_fit_the_memory_budget(project):
    classifier, selection = project
    rows = engine.strip_rows(8000, 2000, 4, selection, 3)
    assert selection.min_size() <= rows < 8000
    assert strip_bytes(rows, 2000, selection.halo()) <= engine.STRIP_BYTES
    rows2 = engine.strip_rows(8000, 2000, 4, selection, 3, in_flight=2)
    assert selection.min_size() <= rows2 < rows
    assert strip_bytes(rows2, 2000, selection.halo(), in_flight=2) <= engine.STRIP_BYTES
    assert engine.strip_rows(8000, 2000, 4, selection, 3, max_bytes=engine.STRIP_BYTES // 4) < rows
    assert engine.strip_rows(100, 120, 4, selection, 3) == 100


def test_channel_count_mismatch_is_reported(tmp_path, project):
    classifier, selection = project
    img_file = write_image(tmp_path / "three.h5", np.ones((3, 80, 80), np.float32))
    with pytest.raises(SteinpixError, match="3 channels") as info:
        engine.predict_file(img_file, tmp_path / "three.tiff", classifier, selection)
    message = str(info.value)
    assert str(img_file) in message and "expects 4 channels" in message
    assert not (tmp_path / "three.tiff").exists()


def test_too_small_image_is_reported(tmp_path, project):
    classifier, selection = project
    img_file = write_image(tmp_path / "small.h5", np.ones((4, 20, 200), np.float32))
    with pytest.raises(SteinpixError, match="smaller than") as info:
        engine.predict_file(img_file, tmp_path / "small.tiff", classifier, selection)
    assert str(img_file) in str(info.value) and "20 x 200" in str(info.value)


def test_missing_img_dataset_is_reported(tmp_path):
    img_file = write_image(tmp_path / "crop.h5", np.ones((4, 50, 50), np.float32), name="crop")
    with pytest.raises(SteinpixError, match="no 'img' dataset") as info:
        engine.read_image(img_file)
    assert str(img_file) in str(info.value)


def test_not_hdf5_and_missing_files_are_reported(tmp_path):
    text = tmp_path / "image.h5"
    text.write_text("hello")
    with pytest.raises(SteinpixError, match="not an HDF5 image") as info:
        engine.read_image(text)
    assert str(text) in str(info.value)
    with pytest.raises(SteinpixError, match="no such image"):
        engine.read_image(tmp_path / "missing.h5")
    flat = write_image(tmp_path / "flat.h5", np.ones((50, 50), np.float32))
    with pytest.raises(SteinpixError, match="shape"):
        engine.read_image(flat)


def test_written_tiff_is_uint16_rgb_lzw(tmp_path):
    probs = np.arange(5 * 7 * 3, dtype=np.uint16).reshape(5, 7, 3) * 600
    out_file = tmp_path / "p.tiff"
    engine.write_probabilities(out_file, probs)
    with tifffile.TiffFile(out_file) as tif:
        page = tif.pages[0]
        assert page.photometric == 2  # RGB
        assert page.compression == 5  # LZW; tifffile < 2022.7 has no top-level enums
        data = tif.asarray()
    assert data.dtype == np.uint16 and data.shape == (5, 7, 3)
    np.testing.assert_array_equal(data, probs)
    assert [p.name for p in tmp_path.iterdir()] == ["p.tiff"]  # no temporary file left


def test_tiff_is_written_in_strips_from_blocks_of_any_height(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.integers(0, 65535, (1000, 90, 3)).astype(np.uint16)
    blocks = [probs[a:b] for a, b in [(0, 7), (7, 500), (500, 501), (501, 1000)]]
    engine._write_tiff(tmp_path / "s.tiff", probs.shape, iter(blocks))
    with tifffile.TiffFile(tmp_path / "s.tiff") as tif:
        assert len(tif.pages[0].dataoffsets) > 1  # several TIFF strips
        np.testing.assert_array_equal(tif.asarray(), probs)


def test_tiff_rows_inside_a_block_are_not_copied():
    probs = np.arange(1000 * 4 * 3, dtype=np.uint16).reshape(1000, 4, 3)
    blocks = [probs[a:b].copy() for a, b in [(0, 7), (7, 500), (500, 501), (501, 1000)]]
    chunks = list(engine._row_chunks(iter(blocks), 21))
    assert [c.shape[0] for c in chunks] == [21] * 47 + [13]
    np.testing.assert_array_equal(np.concatenate(chunks), probs)
    assert all(c.flags.c_contiguous for c in chunks)
    # rows 21..482 lie inside the second block: views of it, not copies of whole strips
    inside = [c for c in chunks[1:] if np.shares_memory(c, blocks[1])]
    assert len(inside) == (500 - 21) // 21
    assert not any(np.shares_memory(chunks[0], b) for b in blocks)  # rows of two blocks


def test_written_tiff_with_other_channel_counts(tmp_path):
    for n in (1, 2, 4):
        probs = np.full((6, 5, n), 1234, dtype=np.uint16)
        engine.write_probabilities(tmp_path / f"{n}.tiff", probs)
        back = tifffile.imread(tmp_path / f"{n}.tiff")
        np.testing.assert_array_equal(back.reshape(probs.shape), probs)


def test_export_normalisation_truncates_in_float32():
    p = np.array([0.0, 0.01, 0.5, 1 / 3, 0.99999994, 1.0], dtype=np.float32)
    got = engine.export_uint16(p)
    assert got.dtype == np.uint16
    assert list(got) == [0, 655, 32767, 21845, 65534, 65535]
    out = np.zeros(6, dtype=np.uint16)
    assert engine.export_uint16(p, out=out) is out and list(out) == list(got)
    scratch = p.copy()
    assert list(engine.export_uint16(scratch, overwrite_input=True)) == list(got)
    np.testing.assert_array_equal(scratch, p * np.float32(65535))  # scaled in place


def test_output_path_and_rerun_rule(tmp_path):
    img_file = tmp_path / "img" / "a.h5"
    img_file.parent.mkdir()
    img_file.write_bytes(b"x")
    ilp = tmp_path / "p.ilp"
    ilp.write_bytes(b"x")
    out_file = engine.output_path(img_file, tmp_path / "out")
    assert out_file == tmp_path / "out" / "a.tiff"
    assert not engine.is_finished(img_file, out_file, ilp)
    out_file.parent.mkdir()
    out_file.write_bytes(b"x")
    os.utime(img_file, ns=(1_000_000_000, 1_000_000_000))
    os.utime(ilp, ns=(2_000_000_000, 2_000_000_000))
    os.utime(out_file, ns=(3_000_000_000, 3_000_000_000))
    assert engine.is_finished(img_file, out_file, ilp)
    os.utime(ilp, ns=(4_000_000_000, 4_000_000_000))  # project saved after the output
    assert not engine.is_finished(img_file, out_file, ilp)
    os.utime(ilp, ns=(2_000_000_000, 2_000_000_000))
    os.utime(img_file, ns=(3_000_000_000, 3_000_000_000))  # same time: not newer
    assert not engine.is_finished(img_file, out_file, ilp)


def test_set_threads():
    before = numba.get_num_threads()
    try:
        assert engine.set_threads(1) == 1 and numba.get_num_threads() == 1
        assert engine.set_threads(None) == numba.config.NUMBA_NUM_THREADS
        assert engine.set_threads(10_000) == numba.config.NUMBA_NUM_THREADS
        with pytest.raises(ValueError):
            engine.set_threads(0)
    finally:
        numba.set_num_threads(before)


def test_one_thread_gives_the_same_result(project):
    classifier, selection = project
    img = engine.read_image(IN_REPO_IMAGES[1])
    before = numba.get_num_threads()
    try:
        engine.set_threads(1)
        single = engine.predict_image(img, classifier, selection)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(single, reference_of(IN_REPO_IMAGES[1]))


def test_kernels_cached_is_false_for_an_empty_numba_cache(tmp_path):
    # the "Compiling ..." notice depends on it; the Docker image test checks the other side
    code = "from steinpix import engine; print(engine.kernels_cached())"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


LOAD_CACHED = """
import sys
from steinpix import engine
cached = engine.kernels_cached()
engine.init_numba()
classifier, selection = engine.load_project(sys.argv[1])
for profile in ("133", "14x"):
    engine.predict_file(sys.argv[2], f"{sys.argv[3]}/{profile}.tiff", classifier, selection,
                        profile, exports={"uncertainty": f"{sys.argv[3]}/u{profile}.tiff"})
from numba.core import entrypoints
print(cached, "numba.np.linalg" in sys.modules or "numba.np.arrayobj" in sys.modules
      or entrypoints._already_initialized)
"""


LINK_LAZILY = """
import numba
from steinpix import engine, features
engine.init_numba()
print(features._mirror(-3, 10), features._mirror(12, 10))  # from numba's cache when warm
library = next(iter(features._mirror.overloads.values())).library
@numba.njit
def twice(j, n):  # compiled here: links against the cached kernel's library
    return features._mirror(j, n) * 2
print(twice(-3, 10), type(library).__name__.startswith("Lazy"))
"""


def test_a_kernel_loaded_without_its_link_module_can_be_linked_against():
    # kernel_cache.prepare_lazy_loading: the bitcode is parsed when a compilation needs it
    for _ in range(2):  # the first may compile (a cold cache): nothing is loaded lazily then
        out = subprocess.run([sys.executable, "-c", LINK_LAZILY], capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stderr
        if out.stdout.split()[-1] == "True":
            break
    assert out.stdout.split() == ["3", "6", "6", "True"]


SAVE_AFTER_LAZY_LOADING = """
import sys
sys.path.insert(0, sys.argv[1])
from numba.core import environment
from steinpix import engine, features
engine.init_numba()
features._mirror(-3, 10)  # loaded lazily from numba's cache when warm
import user_kernel  # compiled and saved into numba's cache by this process
print(user_kernel.total(3), environment._rebuild_env.__module__)
"""


def test_caches_written_after_lazy_loading_are_numba_s_own(tmp_path):
    # kernel_cache.loading_lazily puts its _rebuild_env into numba's module only while it
    # loads: a kernel compiled and cached later must not refer to steinpix's function (its
    # cache would not load where steinpix's lazy loading is not set up)
    (tmp_path / "user_kernel.py").write_text(
        "import numba\n\n@numba.njit(cache=True)\ndef total(n):\n    return sum(range(n))\n"
    )
    out = subprocess.run([sys.executable, "-c", SAVE_AFTER_LAZY_LOADING, str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "numba.core.environment"]
    (data,) = (tmp_path / "__pycache__").glob("user_kernel.total-*.nbc")
    assert b"numba.core.environment" in data.read_bytes()
    assert b"kernel_cache" not in data.read_bytes()


def test_init_numba_runs_the_cached_kernels_without_numba_s_whole_target(tmp_path, project):
    # run's start-up: numba loads the engine's machine code from its cache without importing
    # and registering everything it could compile (numba.np.linalg is one of those modules),
    # without initialising the numba extensions of every installed package, and without
    # importing the modules of the numba functions compiled into them (numba.np.arrayobj)
    img = IN_REPO_IMAGES[0]
    (tmp_path / "sub").mkdir()
    for _ in range(2):  # the first may compile (a cold cache), which needs the whole target
        out = subprocess.run(
            [sys.executable, "-c", LOAD_CACHED, str(PROJECT), str(img), str(tmp_path / "sub")],
            capture_output=True, text=True,
        )
        assert out.returncode == 0, out.stderr
        cached, whole_target = out.stdout.split()
        if cached == "True":
            break
    assert whole_target == "False"
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "sub" / "133.tiff"),
                                  reference_of(img))
    classifier, selection = project  # the same files from numba's usual start in this process
    for profile in ("133", "14x"):
        engine.predict_file(img, tmp_path / f"{profile}.tiff", classifier, selection, profile,
                            exports={"uncertainty": tmp_path / f"u{profile}.tiff"})
        for name in (f"{profile}.tiff", f"u{profile}.tiff"):
            np.testing.assert_array_equal(tifffile.imread(tmp_path / "sub" / name),
                                          tifffile.imread(tmp_path / name))
