"""Damaged input is the user's problem (one line naming the file); a bug in steinpix says so."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from steinpix import images
from steinpix._cli.main import main
from steinpix.errors import InternalError, SteinpixError, raised_inside, read_error

from conftest import EXAMPLE

BUG = "'TiffPageSeries' object has no attribute 'get_shape'"


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    shutil.copytree(EXAMPLE / "img", tmp_path / "img")
    shutil.copy(EXAMPLE / "panel.csv", tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def prepare(*args: str):
    return CliRunner().invoke(main, ["classify", "ilastik", "prepare", "--cropsize", "50", *args])


def broken_reader(tif):
    """What the tifffile 2026.5 API change did to steinpix: a programming error."""
    raise AttributeError(BUG)


def test_bug_while_reading_is_an_internal_error_not_a_damaged_file(workdir, monkeypatch):
    monkeypatch.setattr(images, "_unsqueezed_shape", broken_reader)
    result = prepare()
    assert result.exit_code == 1
    first = "img/20210305_NE_mockData1_001.tiff"
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: internal error in steinpix while reading {first}: AttributeError: {BUG} "
        "(please report)"
    )
    assert "not a readable TIFF" not in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / "pixel_classifier.ilp").exists()


def test_bug_while_reading_shows_its_traceback_with_debug(workdir, monkeypatch):
    monkeypatch.setattr(images, "_unsqueezed_shape", broken_reader)
    result = prepare("-v", "DEBUG")
    assert result.exit_code == 1
    assert isinstance(result.exception, InternalError)
    assert isinstance(result.exception.__cause__, AttributeError)
    assert str(result.exception.__cause__) == BUG


def test_bug_outside_reading_is_an_internal_error_too(workdir, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr(images, "aggregate_channels", broken)
    result = prepare()
    assert result.exit_code == 1
    assert "Error: internal error in steinpix" in result.stderr
    assert "KeyError: 'oops' (please report)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("cut", [8, 300, 5000])
def test_truncated_tiff_is_the_files_fault(workdir, cut):
    bad = workdir / "img" / "20210305_NE_mockData1_002.tiff"
    bad.write_bytes(bad.read_bytes()[:cut])
    result = prepare()
    assert result.exit_code == 1
    assert "img/20210305_NE_mockData1_002.tiff: not a readable TIFF image (" in result.stderr
    assert "internal error" not in result.stderr


def test_damaged_compressed_tiff_is_the_files_fault(tmp_path):
    path = tmp_path / "a.tiff"
    tifffile.imwrite(
        path, np.arange(5 * 60 * 50, dtype=np.uint16).reshape(5, 60, 50), compression="zlib"
    )
    data = bytearray(path.read_bytes())
    data[200:260] = bytes(60)  # inside the first compressed strip
    path.write_bytes(bytes(data))
    with pytest.raises(SteinpixError, match="a.tiff: not a readable TIFF image"):
        images.read_image(path)


def test_a_tiff_without_images_is_the_files_fault(tmp_path):
    path = tmp_path / "a.tiff"
    path.write_bytes(b"II*\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # header, empty IFD
    with pytest.raises(SteinpixError, match=r"a\.tiff: (not a readable TIFF|unsupported)"):
        images.read_image_shape(path)


def test_errors_are_blamed_by_where_they_were_raised():
    try:
        json.loads("{")
    except ValueError as e:
        assert raised_inside(e, "json")
        assert not raised_inside(e, "tifffile", "h5py")
        assert isinstance(read_error("x.json", e, "unreadable", "json"), SteinpixError)
        internal = read_error("x.json", e, "unreadable", "h5py")
        assert isinstance(internal, InternalError)
        assert str(internal).startswith("internal error in steinpix while reading x.json: ")
    assert isinstance(read_error("x", FileNotFoundError(2, "gone"), "unreadable"), SteinpixError)


def test_errors_of_compiled_codecs_are_theirs():
    """imagecodecs' Cython frames need not carry their module's name (newer Cython)."""
    import imagecodecs

    with pytest.raises(RuntimeError) as info:
        imagecodecs.zlib_decode(b"x\x9c" + bytes(20))
    assert raised_inside(info.value, "imagecodecs")
    assert not raised_inside(info.value, "tifffile", "steinpix")


def test_internal_errors_pickle_to_and_from_workers():
    error = InternalError.reading("a.h5", AttributeError("x"))
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is InternalError and str(copy) == str(error)
