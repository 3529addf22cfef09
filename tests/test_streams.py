"""Byte streams: every coding round trips, and sizes are checked before anything is allocated."""
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from deepcompress.formats import streams
from deepcompress.formats.errors import DczError


@settings(max_examples=80, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 255))
def test_every_coding_round_trips(data, skew):
    symbols = np.frombuffer(data, dtype=np.uint8) % skew
    for s in (streams.encode(symbols), streams.encode_bytes(symbols)):
        assert np.array_equal(streams.decode(s.coding, s.count, b"".join(s.chunks()), "t"),
                              symbols)


def test_a_skippable_frame_is_not_a_zstd_stream():
    skippable = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"\x00\x00\x00\x00"
    with pytest.raises(DczError, match="not a zstd frame"):
        streams.decode("zstd", 4, skippable, "t")


def test_a_frame_cannot_declare_more_than_it_can_hold():
    frame = zstandard.ZstdCompressor().compress(bytes(100))
    with pytest.raises(DczError, match="cannot hold"):  # 2^40 bytes: refused, not allocated
        streams.decode("zstd", 1 << 40, frame, "t")
    with pytest.raises(DczError, match="declares"):
        streams.decode("zstd", 99, frame, "t")
    big = zstandard.ZstdCompressor(level=19).compress(bytes(1 << 24))  # the densest frames
    assert streams.decode("zstd", 1 << 24, big, "t").size == 1 << 24


def test_a_short_huffman_bitstream_cannot_declare_many_symbols():
    table = bytes([1, 1, 1])  # two symbols of one bit each
    with pytest.raises(DczError, match="too short"):
        streams.decode("huffman", 1 << 40, table + b"\x00\x00\x00\x00", "t")
    assert streams.decode("huffman", 32, table + b"\x00\x00\x00\x00", "t").size == 32
