"""Positions of the nonzeros of a flattened tensor as relative gaps (the paper's CSR variant).

A gap is the number of zeros skipped before a nonzero. Two gap alphabets (SPEC.md, "Layouts"):
- capped with g bits: symbols 0..M-1 (M = 2^g - 1) are gaps; symbol M is a filler that skips
  M zeros and places no nonzero (the paper's filler, without spending an index symbol);
- escape: symbols 0..254 are gaps; 255 is an escape whose gap is 255 + a LEB128 varint
  taken, in order, from a separate byte stream.
"""

from __future__ import annotations

import numpy as np

from .errors import DczError

ESCAPE = 255
MAX_VARINT_BYTES = 9  # 63 bits


def gaps(positions: np.ndarray) -> np.ndarray:
    """The gap before each nonzero, given its sorted flat positions."""
    positions = np.asarray(positions, dtype=np.int64)
    return np.diff(positions, prepend=np.int64(-1)) - 1


def encode_capped(gap: np.ndarray, g: int) -> np.ndarray:
    """Gap symbols with a g-bit cap (1 <= g <= 8), fillers inserted for long gaps."""
    m = (1 << g) - 1
    fillers = gap // m
    ends = np.cumsum(fillers + 1) - 1
    out = np.full(int(ends[-1]) + 1 if ends.size else 0, m, dtype=np.uint8)
    out[ends] = gap % m
    return out


def gap_histogram(gap: np.ndarray, size: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Counts of each gap below `size`, and the gaps at or above it (for cheap layout sizing)."""
    return np.bincount(np.minimum(gap, size - 1), minlength=size)[:size - 1], gap[gap >= size - 1]


def capped_counts(gap: np.ndarray, g: int,
                  hist: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Symbol counts of encode_capped(gap, g), without building the stream."""
    m = (1 << g) - 1
    counts_by_gap, tail = hist if hist is not None else gap_histogram(gap)
    values = np.arange(counts_by_gap.size)
    counts = np.bincount(values % m, weights=counts_by_gap, minlength=256).astype(np.int64)
    np.add.at(counts, tail % m, 1)
    counts[m] += int(np.dot(values // m, counts_by_gap)) + int((tail // m).sum())
    return counts


def encode_escape(gap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gap symbols with escapes, and the LEB128 varint bytes of (gap - 255) for each escape."""
    symbols = np.minimum(gap, ESCAPE).astype(np.uint8)
    return symbols, varint_encode(gap[gap >= ESCAPE] - ESCAPE)


def escape_counts(gap: np.ndarray) -> tuple[np.ndarray, int]:
    """Symbol counts of encode_escape(gap) and the number of varint bytes."""
    counts = np.bincount(np.minimum(gap, ESCAPE), minlength=256)
    extra = gap[gap >= ESCAPE] - ESCAPE
    return counts, int(varint_lengths(extra).sum())


def varint_lengths(values: np.ndarray) -> np.ndarray:
    """Bytes of each non-negative value as LEB128."""
    values = np.asarray(values, dtype=np.uint64)
    n = np.ones(values.shape, dtype=np.int64)
    for k in range(1, MAX_VARINT_BYTES):
        n += values >= (np.uint64(1) << np.uint64(7 * k))
    return n


def varint_encode(values: np.ndarray) -> np.ndarray:
    """LEB128 bytes of non-negative values below 2^63."""
    values = np.asarray(values, dtype=np.uint64)
    lengths = varint_lengths(values)
    starts = np.cumsum(lengths) - lengths
    out = np.zeros(int(lengths.sum()), dtype=np.uint8)
    for k in range(MAX_VARINT_BYTES):
        sel = lengths > k
        if not sel.any():
            break
        byte = (values[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (lengths[sel] > k + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + k] = (byte | more).astype(np.uint8)
    return out


def varint_decode(data: np.ndarray, count: int) -> np.ndarray:
    """Exactly `count` LEB128 values filling `data`; raises DczError otherwise."""
    data = np.asarray(data, dtype=np.uint8)
    ends = np.flatnonzero(data < 0x80)
    if ends.size != count or (count and ends[-1] != data.size - 1):
        raise DczError(f"long gaps: expected {count} varints in {data.size} bytes")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.concatenate(([0], ends[:-1] + 1))
    if int((ends - starts).max()) >= MAX_VARINT_BYTES:
        raise DczError("long gaps: varint longer than 9 bytes")
    group = np.repeat(np.arange(count), ends - starts + 1)
    shift = (np.arange(data.size) - starts[group]).astype(np.uint64) * np.uint64(7)
    parts = (data & 0x7F).astype(np.uint64) << shift
    return np.add.reduceat(parts, starts).astype(np.int64)


def _index_type(numel: int) -> type:
    # an advance is at most numel + 256 and the checked sum at most numel + 1: int32 cannot wrap
    return np.int32 if numel < (1 << 30) else np.int64


def _positions(advance: np.ndarray, keep: np.ndarray | None, nonzero: int, numel: int,
               what: str) -> np.ndarray:
    # float sum first: adversarial gaps must not overflow the exact integer cumsum
    if advance.size and float(advance.sum(dtype=np.float64)) > numel + 1:
        raise DczError(f"{what}: gaps run past the end of the tensor ({numel} elements)")
    if keep is not None and keep.size and not keep[-1]:
        raise DczError(f"{what}: gap stream ends with a filler")
    ends = np.cumsum(advance, dtype=advance.dtype)
    ends -= 1
    positions = ends if keep is None else ends[keep]
    if positions.size != nonzero:
        raise DczError(f"{what}: gaps place {positions.size} nonzeros, header says {nonzero}")
    # every advance is >= 1, so positions rise strictly; a wrapped sum would break the ends
    if positions.size and not (0 <= positions[0] and positions[-1] < numel):
        raise DczError(f"{what}: gaps place a nonzero outside the tensor ({numel} elements)")
    return positions


def decode_capped(symbols: np.ndarray, g: int, nonzero: int, numel: int, what: str) -> np.ndarray:
    """Flat positions from capped gap symbols; raises DczError if they do not fit the tensor."""
    m = (1 << g) - 1
    if symbols.size and int(symbols.max()) > m:
        raise DczError(f"{what}: gap symbol above the {g}-bit cap")
    keep = symbols < m
    advance = symbols.astype(_index_type(numel))
    advance += keep  # a gap s advances s + 1; the filler M advances M
    return _positions(advance, keep, nonzero, numel, what)


def decode_escape(symbols: np.ndarray, varints: np.ndarray, nonzero: int, numel: int,
                  what: str) -> np.ndarray:
    """Flat positions from escape-coded gap symbols and their long-gap varints."""
    escapes = symbols == ESCAPE
    extra = varint_decode(varints, int(escapes.sum()))
    if extra.size and int(extra.max()) > numel:
        raise DczError(f"{what}: a long gap exceeds the tensor")
    advance = symbols.astype(_index_type(numel))
    advance += 1
    advance[escapes] += extra.astype(advance.dtype)
    return _positions(advance, None, nonzero, numel, what)
