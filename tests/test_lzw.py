"""The TIFF LZW encoder: what it writes decodes to the input (imagecodecs' libtiff-style
decoder), for every code width, table resets and the corner cases of the last code."""

from __future__ import annotations

import imagecodecs
import numpy as np
import pytest
import tifffile

from steinpix import lzw
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


def reference_lzw(data: bytes) -> bytes:
    """Textbook greedy LZW with TIFF's rules, written for clarity, not speed: a dict of byte
    strings; codes written most significant bit first; Clear first; the width grows from 9 to
    12 bits when the next code to assign needs one more bit ("early change"); Clear when that
    code would be 4095; the last code grows the decoder's table once more (so it may widen
    EOI); EOI last; zero bits pad the last byte."""
    codes: list[tuple[int, int]] = [(256, 9)]  # (code, width)
    width, next_code = 9, 258
    table = {bytes([b]): b for b in range(256)}
    start = 0  # the current string is data[start:i]
    for i in range(1, len(data)):
        if data[start:i + 1] in table:
            continue
        codes.append((table[data[start:i]], width))
        table[data[start:i + 1]] = next_code
        next_code += 1
        start = i
        if next_code == 4095:
            codes.append((256, width))
            table = {bytes([b]): b for b in range(256)}
            width, next_code = 9, 258
        elif next_code == 1 << width:
            width += 1
    if data:
        codes.append((table[data[start:]], width))
        next_code += 1
        if next_code == 4095:
            codes.append((256, width))
            width = 9
        elif next_code == 1 << width:
            width += 1
    codes.append((257, width))
    bits = "".join(format(code, f"0{w}b") for code, w in codes)
    bits += "0" * (-len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big")


def reference_table_sizes(data: bytes) -> list[int]:
    """For every length n of ``data``, the next code the reference would assign after the
    last string of ``data[:n]`` (i.e. the table size that decides EOI's width), from one pass."""
    sizes = [258]
    table = set(bytes([b]) for b in range(256))
    next_code, start = 258, 0
    for i in range(1, len(data)):
        if data[start:i + 1] not in table:
            table.add(data[start:i + 1])
            next_code += 1
            start = i
            if next_code == 4095:
                table = set(bytes([b]) for b in range(256))
                next_code = 258
        sizes.append(next_code + 1)
    return sizes


def probability_like(n_pixels: int, seed: int) -> bytes:
    """uint16 probabilities of 3 classes as the forests' votes make them (multiples of 65535 /
    100, summing to 65535), interleaved per pixel, in runs of equal values and noise."""
    rng = np.random.default_rng(seed)
    votes = np.empty((n_pixels, 3), dtype=np.int64)
    i = 0
    while i < n_pixels:
        run = int(rng.geometric(0.05)) if rng.random() < 0.5 else 1
        a = int(rng.integers(0, 101))
        b = int(rng.integers(0, 101 - a))
        votes[i:i + run] = a, b, 100 - a - b
        i += run
    return np.round(votes * 655.35).astype("<u2").tobytes()


def assert_like_reference(data: bytes) -> None:
    encoded = lzw_encode(data)
    assert encoded == reference_lzw(data)
    assert imagecodecs.lzw_decode(encoded) == data


@pytest.mark.parametrize("data", [b"", b"a", b"ab", b"aaaa", b"abababababab", bytes(range(256)),
                                  bytes(5000)])
def test_short_inputs_equal_the_reference(data):
    assert_like_reference(data)


def test_the_last_code_and_eoi_at_every_width_change_equal_the_reference():
    # random bytes add a code for nearly every byte: the table crosses 511/512, 1023/1024,
    # 2047/2048 and its restart at 4095 within 4400 bytes; end the data at, just before and just
    # after each of these table sizes, where the last code and EOI change width or need a Clear
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 4400, dtype=np.uint8).tobytes()
    sizes = reference_table_sizes(data)
    edges = [n for n, size in enumerate(sizes)
             if any(abs(size - edge) <= 2 for edge in (258, 512, 1024, 2048, 4095))]
    assert len(edges) > 20
    for n in edges:
        assert_like_reference(data[:n])


@pytest.mark.parametrize("seed", [0, 1])
def test_probability_like_inputs_equal_the_reference(seed):
    # several table restarts (Clear codes) with long runs and short noise
    assert_like_reference(probability_like(30_000, seed))


def test_real_probabilities_equal_the_reference():
    reference = TEST_DATA / "reference" / "ilastik_probabilities"
    probs = tifffile.imread(sorted(reference.glob("*.tiff"))[1])
    assert_like_reference(probs.tobytes())


@pytest.mark.parametrize("kind", ["sixteen byte values", "long runs"])
def test_inputs_with_few_byte_values_or_long_runs_equal_the_reference(kind):
    # the hash's hard cases: keys that differ in few bits, and strings that grow to thousands of
    # bytes of one value (each still found again after the strings around it were added)
    rng = np.random.default_rng(3)
    if kind == "sixteen byte values":
        data = rng.integers(0, 16, 60_000, dtype=np.uint8).tobytes()
    else:
        values = rng.integers(0, 4, 200, dtype=np.uint8)
        data = np.repeat(values, rng.integers(1, 3000, 200)).tobytes()
    assert_like_reference(data)


def test_every_length_and_start_of_the_unrolled_loop_equals_the_reference():
    # the loop calls its step six times (one per byte of a pixel of three uint16 channels)
    # while a byte follows them, then once per byte for the last bytes: end the data after each
    # call and start it at each of them, so that every call sees strings end and start
    data = probability_like(400, 5) + bytes(range(256)) * 2
    for start in range(7):
        for n in list(range(0, 40)) + [1000 + k for k in range(13)]:
            assert_like_reference(data[start:start + n])


def slot(string: bytes) -> int:
    """The first slot the encoder tries for a string of two or more bytes (its hash)."""
    mask = (1 << 64) - 1
    rolled = (string[0] + 1) * lzw._START & mask
    for byte in string[1:]:
        rolled = (rolled * 33 & mask) ^ byte
    return (rolled * lzw._MIX & mask) >> (64 - lzw._HASH_BITS)


def test_strings_in_the_same_slot_are_probed_like_the_reference():
    # strings whose first slots are the same or next to each other: the later ones go to the
    # following slots, and are found (and found missing) only past the earlier ones
    by_slot: dict[int, list[bytes]] = {}
    for a in range(256):
        for b in range(256):
            by_slot.setdefault(slot(bytes([a, b])), []).append(bytes([a, b]))
    crowded = [s for s, strings in by_slot.items() if len(strings) >= 3
               and (s + 1) % (1 << lzw._HASH_BITS) in by_slot][:20]
    assert len(crowded) == 20
    data = b""
    for s in crowded:
        strings = by_slot[s][:3] + by_slot[(s + 1) % (1 << lzw._HASH_BITS)][:1]
        # each string twice (added, then found), each after a byte that ends the one before
        data += b"".join(string + b"\xff\xfe" for string in strings * 2)
    assert_like_reference(data)
    assert_like_reference(data * 30)  # across table restarts: the slots of the old table
