"""Canonical Huffman: round trips, canonical form, and rejection of malformed tables/streams."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepcompress.formats import huffman
from deepcompress.formats.errors import DczError


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=2, max_size=3000))
def test_round_trip(symbols):
    symbols = np.array(symbols, dtype=np.uint8)
    counts = np.bincount(symbols, minlength=256)
    if np.count_nonzero(counts) < 2:
        symbols = np.append(symbols, (int(symbols[0]) + 1) % 256).astype(np.uint8)
        counts = np.bincount(symbols, minlength=256)
    lengths = huffman.code_lengths(counts)
    data = huffman.encode(symbols, lengths)
    assert len(data) == (huffman.encoded_bits(counts, lengths) + 7) // 8
    assert np.array_equal(huffman.decode(data, lengths, symbols.size), symbols)


def test_lengths_are_optimal_and_canonical():
    counts = np.zeros(256, dtype=np.int64)
    counts[[3, 7, 9, 200]] = [50, 25, 15, 10]
    lengths = huffman.code_lengths(counts)
    assert lengths[[3, 7, 9, 200]].tolist() == [1, 2, 3, 3]
    huffman.check_lengths(lengths)
    # canonical: among equal lengths the smaller symbol gets the smaller code
    data = huffman.encode(np.array([9, 200], dtype=np.uint8), lengths)
    assert format(data[0], "08b")[:6] == "110111"


def test_single_symbol_is_rejected_by_the_builder():
    with pytest.raises(ValueError):
        huffman.code_lengths(np.array([0, 5]))


@pytest.mark.parametrize("lengths", [[1, 1, 1], [2, 2, 2], [1], [0, 0], [32, 1]])
def test_incomplete_or_invalid_tables_are_rejected(lengths):
    with pytest.raises(DczError):
        huffman.check_lengths(np.array(lengths, dtype=np.uint8))


def test_truncated_stream_and_bad_padding_are_rejected():
    symbols = np.array([0, 1, 2, 3] * 10, dtype=np.uint8)
    counts = np.bincount(symbols, minlength=256)
    lengths = huffman.code_lengths(counts)[:4]
    data = huffman.encode(symbols, lengths)
    with pytest.raises(DczError):
        huffman.decode(data[:-1], lengths, symbols.size)
    with pytest.raises(DczError):
        huffman.decode(data + b"\x00", lengths, symbols.size)
    with pytest.raises(DczError):  # fewer symbols than the stream holds: length mismatch
        huffman.decode(data, lengths, 30)


def test_too_skewed_counts_give_no_code():
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    assert huffman.code_lengths(np.array(fib[:40])) is None
