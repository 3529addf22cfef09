"""Canonical Huffman coding of byte symbols (0..255), built on bitarray's C implementation.

A code is described by its length per symbol alone (canonical form): symbols are ordered by
(length, symbol) and given consecutive codes. Lengths are 0 (unused) or 1..MAX_LENGTH.
"""

from __future__ import annotations

import numpy as np
from bitarray import bitarray
from bitarray.util import canonical_decode, canonical_huffman

from .errors import DczError

MAX_LENGTH = 31  # bitarray's decoder limit
ALPHABET = 256


def code_lengths(counts: np.ndarray) -> np.ndarray | None:
    """Canonical Huffman code length per symbol for these counts; None if the code needs > 31 bits.

    Needs at least two used symbols (one symbol is coded as a constant, not a Huffman code).
    """
    counts = np.asarray(counts, dtype=np.int64)
    used = {int(s): int(c) for s, c in enumerate(counts) if c > 0}
    if len(used) < 2:
        raise ValueError("a Huffman code needs at least two used symbols")
    codes, _, _ = canonical_huffman(used)
    lengths = np.zeros(len(counts), dtype=np.uint8)
    longest = max(len(c) for c in codes.values())
    if longest > MAX_LENGTH:
        return None
    for s, c in codes.items():
        lengths[s] = len(c)
    return lengths


def encoded_bits(counts: np.ndarray, lengths: np.ndarray) -> int:
    """Number of bits the symbols with these counts take under these code lengths."""
    n = min(len(counts), len(lengths))
    return int(np.dot(np.asarray(counts[:n], np.int64), np.asarray(lengths[:n], np.int64)))


def _canonical_tables(lengths: np.ndarray) -> tuple[list[int], list[int]]:
    """bitarray's (count per length, symbols in canonical order) for a length table."""
    used = np.flatnonzero(lengths)
    order = used[np.lexsort((used, lengths[used]))]
    count = np.bincount(lengths[used], minlength=int(lengths.max()) + 1).tolist()
    count[0] = 0
    return count, order.tolist()


def _codebook(lengths: np.ndarray) -> dict[int, bitarray]:
    """The canonical code of every used symbol."""
    count, symbols = _canonical_tables(lengths)
    codes: dict[int, bitarray] = {}
    code = 0
    it = iter(symbols)
    for length in range(1, len(count)):
        for _ in range(count[length]):
            codes[next(it)] = bitarray(format(code, f"0{length}b"), endian="big")
            code += 1
        code <<= 1
    return codes


def check_lengths(lengths: np.ndarray) -> None:
    """Raise DczError unless the lengths describe a complete prefix code of >= 2 symbols."""
    if lengths.size > ALPHABET or lengths.max(initial=0) > MAX_LENGTH:
        raise DczError("huffman table: alphabet or code length out of range")
    used = lengths[lengths > 0].astype(np.int64)
    if used.size < 2 or int(np.sum(np.int64(1) << (MAX_LENGTH - used))) != 1 << MAX_LENGTH:
        raise DczError("huffman table: code lengths do not form a complete prefix code")


def encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    """The bitstream of the symbols, MSB first, zero-padded to whole bytes."""
    bits = bitarray(endian="big")
    bits.encode(_codebook(lengths), np.asarray(symbols).tolist())
    bits.fill()
    return bits.tobytes()


def decode(data: bytes, lengths: np.ndarray, count: int) -> np.ndarray:
    """Decode exactly `count` symbols; the stream must end with fewer than 8 zero padding bits."""
    check_lengths(lengths)
    bits = bitarray(endian="big")
    bits.frombytes(data)
    table_count, table_symbols = _canonical_tables(lengths)
    try:
        out = np.fromiter(canonical_decode(bits, table_count, table_symbols),
                          dtype=np.uint8, count=count)
    except ValueError as exc:  # too few symbols, or an invalid code at the end
        raise DczError(f"huffman stream: cannot decode {count} symbols ({exc})") from None
    used_bits = encoded_bits(np.bincount(out, minlength=ALPHABET), lengths)
    if (used_bits + 7) // 8 != len(data) or bits[used_bits:].any():
        raise DczError("huffman stream: length or padding does not match the symbol count")
    return out
