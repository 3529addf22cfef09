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


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=5000), st.integers(1, 255), st.integers(1, 700),
       st.sampled_from(["raw", "zstd", "huffman", "const"]))
def test_decode_chunks_gives_the_stream_a_chunk_at_a_time(data, skew, chunk, coding):
    symbols = np.frombuffer(data, dtype=np.uint8) % skew
    if coding == "const":
        symbols = np.full(len(data) or 1, skew, dtype=np.uint8)
        payload = bytes([skew])
    elif coding == "zstd":
        payload = zstandard.ZstdCompressor().compress(symbols.tobytes())
    elif coding == "huffman":
        s = streams.encode(np.concatenate((symbols, [0, 1])).astype(np.uint8))
        if s.coding != "huffman":
            return
        symbols, payload = np.concatenate((symbols, [0, 1])).astype(np.uint8), s.payload
    else:
        payload = symbols.tobytes()
    parts = [c.copy() for c in streams.decode_chunks(coding, symbols.size, payload, "t", chunk)]
    assert all(0 < p.size <= chunk for p in parts)
    got = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    assert np.array_equal(got, symbols)


@pytest.mark.parametrize("fault", ["truncated", "trailing", "short", "long", "skippable"])
def test_decode_chunks_refuses_what_decode_refuses(fault):
    data = np.random.default_rng(0).integers(0, 16, 300_000).astype(np.uint8).tobytes()
    frame, count = zstandard.ZstdCompressor().compress(data), len(data)
    if fault == "truncated":
        frame = frame[:-5]
    elif fault == "trailing":
        frame += b"\x00"
    elif fault == "short":
        count -= 1
    elif fault == "long":
        count += 1
    else:
        frame = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + bytes(4)
    for call in (lambda: streams.decode("zstd", count, frame, "t"),
                 lambda: [c for c in streams.decode_chunks("zstd", count, frame, "t", 1 << 16)]):
        with pytest.raises(DczError):
            call()


def test_a_large_noisy_stream_takes_zstd_close_to_huffman():
    rng = np.random.default_rng(1)
    p = np.exp(-np.arange(17) / 3.0)
    symbols = rng.choice(17, size=1 << 20, p=p / p.sum()).astype(np.uint8)
    s = streams.encode(symbols)
    assert s.coding == "zstd"  # zstd's literal coder alone: fast to decode, nearly Huffman
    assert s.nbytes <= streams.huffman_size(np.bincount(symbols)) * (1 + streams.FAST_TOLERANCE)
    assert np.array_equal(streams.decode(s.coding, s.count, s.payload, "t"), symbols)
