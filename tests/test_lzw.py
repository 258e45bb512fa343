"""The TIFF LZW encoder: what it writes decodes to the input (imagecodecs' libtiff-style
decoder), for every code width, table resets and the corner cases of the last code."""

from __future__ import annotations

import imagecodecs
import numpy as np
import pytest
import tifffile

from steinpix.lzw import lzw_encode

from conftest import TEST_DATA


def roundtrip(data: bytes) -> bytes:
    return imagecodecs.lzw_decode(lzw_encode(data))


@pytest.mark.parametrize("data", [b"", b"a", b"ab", b"aaaa", b"abababababab", bytes(range(256))])
def test_short_inputs(data):
    assert roundtrip(data) == data


def test_every_length_around_the_code_width_changes():
    # low-entropy data grows the table slowly: lengths up to 20,000 cross the 9/10/11/12-bit
    # changes and the table reset at 4094 codes at every offset of the last code
    rng = np.random.default_rng(1)
    data = rng.integers(0, 3, 20_000, dtype=np.uint8).tobytes()
    for n in list(range(0, 2000, 7)) + list(range(2000, 20_000, 97)):
        assert roundtrip(data[:n]) == data[:n], n
    # random bytes fill the table after about 3900 bytes: end just before, at and after it
    data = rng.integers(0, 256, 4400, dtype=np.uint8).tobytes()
    for n in range(3700, 4400):
        assert roundtrip(data[:n]) == data[:n], n


@pytest.mark.parametrize("kind", ["random", "zeros", "ramp"])
def test_long_inputs(kind):
    rng = np.random.default_rng(2)
    data = {
        "random": rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes(),
        "zeros": bytes(500_000),
        "ramp": np.arange(200_000, dtype=np.uint16).tobytes(),
    }[kind]
    assert roundtrip(data) == data


def test_probabilities_compress_like_imagecodecs():
    reference = TEST_DATA / "reference" / "ilastik_probabilities"
    probs = tifffile.imread(sorted(reference.glob("*.tiff"))[0])
    data = np.ascontiguousarray(probs[:40]).tobytes()
    encoded = lzw_encode(probs[:40])
    assert imagecodecs.lzw_decode(encoded) == data
    # the same algorithm as libtiff's: within a few bytes of imagecodecs' encoder
    assert abs(len(encoded) - len(imagecodecs.lzw_encode(data))) <= 0.01 * len(encoded)
