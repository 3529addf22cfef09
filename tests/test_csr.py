"""Sparse positions: capped and escaped gap streams round trip and reject impossible streams."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepcompress.formats import csr
from deepcompress.formats.errors import DczError


@st.composite
def sparse(draw):
    numel = draw(st.integers(1, 5000))
    density = draw(st.floats(0, 1))
    seed = draw(st.integers(0, 2**32 - 1))
    mask = np.random.default_rng(seed).random(numel) < density
    return numel, np.flatnonzero(mask)


@settings(max_examples=150, deadline=None)
@given(sparse(), st.integers(1, 8))
def test_capped_round_trip(case, g):
    numel, positions = case
    gap = csr.gaps(positions)
    symbols = csr.encode_capped(gap, g)
    assert np.array_equal(np.bincount(symbols, minlength=256), csr.capped_counts(gap, g))
    assert symbols.max(initial=0) < 2**g
    back = csr.decode_capped(symbols, g, positions.size, numel, "t")
    assert np.array_equal(back, positions)


@settings(max_examples=150, deadline=None)
@given(sparse())
def test_escape_round_trip(case):
    numel, positions = case
    gap = csr.gaps(positions)
    symbols, varints = csr.encode_escape(gap)
    counts, nbytes = csr.escape_counts(gap)
    assert np.array_equal(np.bincount(symbols, minlength=256), counts) and nbytes == varints.size
    back = csr.decode_escape(symbols, varints, positions.size, numel, "t")
    assert np.array_equal(back, positions)


@given(st.lists(st.integers(0, 2**63 - 1), max_size=50))
def test_varints_round_trip(values):
    values = np.array(values, dtype=np.uint64)
    data = csr.varint_encode(values)
    assert np.array_equal(csr.varint_decode(data, values.size).astype(np.uint64), values)


def test_paper_filler_example():
    # a gap of 8 with a 3-bit cap: one filler (skip 7), then gap 1
    assert csr.encode_capped(np.array([8]), 3).tolist() == [7, 1]


def test_impossible_streams_are_rejected():
    with pytest.raises(DczError):  # runs past the end
        csr.decode_capped(np.array([5, 5], dtype=np.uint8), 3, 2, 10, "t")
    with pytest.raises(DczError):  # symbol above the cap
        csr.decode_capped(np.array([9], dtype=np.uint8), 3, 1, 100, "t")
    with pytest.raises(DczError):  # ends with a filler
        csr.decode_capped(np.array([1, 7], dtype=np.uint8), 3, 1, 100, "t")
    with pytest.raises(DczError):  # wrong nonzero count
        csr.decode_capped(np.array([1, 1], dtype=np.uint8), 3, 3, 100, "t")
    with pytest.raises(DczError):  # huge escape cannot overflow
        huge = csr.varint_encode(np.array([2**62, 2**62], dtype=np.uint64))
        csr.decode_escape(np.array([255, 255], dtype=np.uint8), huge, 2, 2**40, "t")
    with pytest.raises(DczError):  # truncated varint
        csr.varint_decode(np.array([0x80], dtype=np.uint8), 1)


BOUNDARIES = [2**30 - 1, 2**30, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, 2**32, 2**33 + 7]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(BOUNDARIES), st.lists(st.integers(0, 2**34), min_size=1, max_size=8),
       st.integers(1, 8))
def test_positions_near_2_to_the_31_round_trip_in_range(numel, picks, g):
    positions = np.unique(np.array([p % numel for p in picks] + [numel - 1], dtype=np.int64))
    gap = csr.gaps(positions)
    symbols, varints = csr.encode_escape(gap)
    back = csr.decode_escape(symbols, varints, positions.size, numel, "t")
    assert np.array_equal(back, positions) and back.dtype.itemsize * 8 >= np.log2(numel) + 1
    if numel < 2**31:  # capped streams of huge gaps would be gigabytes of fillers
        back = csr.decode_capped(csr.encode_capped(gap, 8), 8, positions.size, numel, "t")
        assert np.array_equal(back, positions)


@pytest.mark.parametrize("numel", BOUNDARIES)
def test_a_gap_that_would_wrap_32_bits_is_refused(numel):
    # one escape whose long gap is the whole tensor: in int32 it wrapped to a negative position
    symbols = np.array([csr.ESCAPE], dtype=np.uint8)
    for extra in (numel, numel - 255, numel - 256 + 1):
        with pytest.raises(DczError, match="past the end|outside"):
            csr.decode_escape(symbols, csr.varint_encode(np.array([extra])), 1, numel, "t")
    ok = csr.decode_escape(symbols, csr.varint_encode(np.array([numel - 256])), 1, numel, "t")
    assert ok.tolist() == [numel - 1]


def test_fillers_only_with_no_nonzero_is_refused():
    for g in (1, 4, 8):
        fillers = np.full(3, 2**g - 1, dtype=np.uint8)
        with pytest.raises(DczError, match="filler"):
            csr.decode_capped(fillers, g, 0, 1000, "t")
    assert csr.decode_capped(np.zeros(0, np.uint8), 3, 0, 1000, "t").size == 0
