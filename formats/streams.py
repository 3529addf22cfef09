"""Byte-symbol streams: each is stored as the smallest (or fastest, when nearly as small) coding.

Codings (SPEC.md, "Streams"): `raw` (the bytes), `const` (one byte, repeated), `zstd` (a zstd
frame of the bytes) and `huffman` (a code-length table, then a canonical Huffman bitstream).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import zstandard

from . import huffman
from .errors import DczError

CODINGS = ("raw", "const", "zstd", "huffman")
# Streams this long may take zstd (about 50x faster to decode) when within this fraction of
# Huffman's size; shorter streams always take the smallest coding.
FAST_MIN_COUNT = 1 << 16
FAST_TOLERANCE = 0.01

_ZSTD_SMALL = zstandard.ZstdCompressionParameters.from_level(
    19, write_content_size=True, write_checksum=False, write_dict_id=False)
# large streams: a fast pass first; low-entropy streams, where fast matching loses up to 30%,
# take a second pass with the optimal parser over a small window (close to Huffman, ~5 MB/s)
_ZSTD_FAST = zstandard.ZstdCompressionParameters.from_level(
    1, min_match=7, write_content_size=True, write_checksum=False, write_dict_id=False)
_ZSTD_STRONG = zstandard.ZstdCompressionParameters(
    strategy=zstandard.STRATEGY_BTULTRA, window_log=17, chain_log=16, hash_log=16, search_log=1,
    min_match=3, target_length=16, write_content_size=True, write_checksum=False,
    write_dict_id=False)
# and a nearly match-free pass: on noisy low-entropy symbols (k-means indices), zstd's literal
# Huffman coder alone is within a fraction of a percent of a whole-stream Huffman code, and
# it decodes at about 1 GB/s (128 KiB blocks, each with its own table; matches rarely found)
_ZSTD_LITERAL = zstandard.ZstdCompressionParameters(
    strategy=zstandard.STRATEGY_FAST, window_log=17, hash_log=6, min_match=7,
    write_content_size=True, write_checksum=False, write_dict_id=False)
# decoding chunk: symbols decoded this many at a time stay in cache while they are used
CHUNK = 1 << 16


@dataclass
class Stream:
    """An encoded stream: its coding, its symbol count and its payload (bytes, or a list of
    byte chunks that are written one after the other, so large payloads are never joined)."""

    coding: str
    count: int
    payload: bytes | list[bytes]

    @property
    def nbytes(self) -> int:
        """Payload length."""
        if isinstance(self.payload, list):
            return sum(len(c) for c in self.payload)
        return len(self.payload)

    def chunks(self) -> list[bytes]:
        """The payload as a list of chunks."""
        return self.payload if isinstance(self.payload, list) else [self.payload]


def zstd_compress(data: bytes | np.ndarray, strong: bool = False, literal: bool = False) -> bytes:
    """A zstd frame of data: level 19 for small inputs, else a fast (or a strong, or a nearly
    match-free) setting."""
    params = (_ZSTD_SMALL if memoryview(data).nbytes <= FAST_MIN_COUNT
              else _ZSTD_STRONG if strong else _ZSTD_LITERAL if literal else _ZSTD_FAST)
    return zstandard.ZstdCompressor(compression_params=params).compress(data)


def zstd_frame_of_chunks(chunks: Iterable[np.ndarray], size: int) -> list[bytes]:
    """One zstd frame (content size `size`) over chunks produced one at a time, as its pieces."""
    cobj = zstandard.ZstdCompressor(compression_params=_ZSTD_FAST).compressobj(size=size)
    pieces = [cobj.compress(c) for c in chunks]
    pieces.append(cobj.flush())
    return [p for p in pieces if p]


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# the format's own bound: a 4-byte RLE block is the densest, and expands to at most 128 KiB
MAX_ZSTD_RATIO = 1 << 15


def zstd_frame_length(frame: bytes | bytearray, what: str) -> int:
    """The bytes of the zstd frame that starts `frame`, found by walking its block headers."""
    try:
        at = zstandard.frame_header_size(bytes(frame[:18]))
    except zstandard.ZstdError as exc:
        raise DczError(f"{what}: corrupt zstd frame header ({exc})") from None
    view = memoryview(frame)
    while True:
        if at + 3 > len(view):
            raise DczError(f"{what}: zstd frame truncated")
        head = int.from_bytes(view[at:at + 3], "little")
        kind = (head >> 1) & 3
        if kind == 3:
            raise DczError(f"{what}: zstd frame uses the reserved block type")
        at += 3 + (1 if kind == 1 else head >> 3)  # an RLE block stores one byte
        if head & 1:
            break
    return at + (4 if frame[4] & 4 else 0)  # the descriptor's content-checksum flag


def _zstd_check(frame: bytes | bytearray, size: int, what: str) -> None:
    """The checks made before a frame is decompressed (SPEC 3): magic, the expansion bound, one
    frame filling the payload, and a declared content size equal to `size`."""
    if bytes(frame[:4]) != ZSTD_MAGIC:
        raise DczError(f"{what}: not a zstd frame (wrong magic; skippable frames are refused)")
    if size > len(frame) * MAX_ZSTD_RATIO:
        raise DczError(f"{what}: a {len(frame)}-byte zstd frame cannot hold {size} bytes")
    if zstd_frame_length(frame, what) != len(frame):
        raise DczError(f"{what}: bytes after the zstd frame (one frame, nothing else, allowed)")
    try:
        declared = zstandard.get_frame_parameters(frame).content_size
    except zstandard.ZstdError as exc:
        raise DczError(f"{what}: corrupt zstd frame ({exc})") from None
    if declared != size:
        raise DczError(f"{what}: zstd frame declares {declared} bytes, expected {size}")


def _zstd_fill(frame: bytes | bytearray, views: Iterator[memoryview], size: int, what: str,
               dictionary: zstandard.ZstdCompressionDict | None) -> Iterator[int]:
    """Decompress a checked frame into each view in turn, yielding the bytes put in each; the
    frame must hold exactly `size` bytes."""
    try:
        dctx = zstandard.ZstdDecompressor(dict_data=dictionary)
        reader = dctx.stream_reader(frame, read_across_frames=False)
        filled = 0
        for view in views:
            got, want = 0, len(view)
            while got < want:
                n = reader.readinto(view[got:])
                if n == 0:
                    break
                got += n
            filled += got
            if got < want:
                break
            yield got
        if filled != size or reader.read(1):
            raise DczError(f"{what}: zstd frame does not hold exactly {size} bytes")
    except zstandard.ZstdError as exc:
        raise DczError(f"{what}: corrupt zstd frame ({exc})") from None


def zstd_decompress(frame: bytes | bytearray, size: int, what: str,
                    dictionary: zstandard.ZstdCompressionDict | None = None) -> bytearray:
    """Decompress a frame that must hold exactly `size` bytes, into a writable buffer.

    The frame header is read and the declared size checked (equal to `size`, and within what
    the frame's length can expand to) before anything is allocated.
    """
    _zstd_check(frame, size, what)
    out = bytearray(size)
    for _ in _zstd_fill(frame, iter([memoryview(out)]), size, what, dictionary):
        pass
    return out


def _huffman_payload(symbols: np.ndarray, counts: np.ndarray) -> bytes | None:
    lengths = huffman.code_lengths(counts)
    if lengths is None:
        return None
    used = int(np.flatnonzero(counts).max()) + 1
    table = bytes([used - 1]) + lengths[:used].tobytes()
    return table + huffman.encode(symbols, lengths[:used])


def huffman_size(counts: np.ndarray) -> int | None:
    """Bytes a huffman-coded stream with these symbol counts takes (table included)."""
    lengths = huffman.code_lengths(counts)
    if lengths is None:
        return None
    used = int(np.flatnonzero(counts).max()) + 1
    return 1 + used + (huffman.encoded_bits(counts, lengths) + 7) // 8


def stream_size(counts: np.ndarray) -> int:
    """Estimated bytes of the stream with these symbol counts (for choosing between layouts)."""
    n = int(counts.sum())
    if np.count_nonzero(counts) <= 1:
        return 1 if n else 0
    size = huffman_size(counts)
    return n if size is None else min(size, n)


def encode(symbols: np.ndarray) -> Stream:
    """Encode a uint8 symbol array as the best coding."""
    symbols = np.ascontiguousarray(symbols, dtype=np.uint8)
    n = symbols.size
    if n == 0:
        return Stream("raw", 0, b"")
    counts = np.bincount(symbols, minlength=256)
    if np.count_nonzero(counts) == 1:
        return Stream("const", n, bytes([int(symbols[0])]))
    raw = symbols.tobytes()
    candidates = [Stream("raw", n, raw), Stream("zstd", n, zstd_compress(raw))]
    if n >= FAST_MIN_COUNT:
        candidates.append(Stream("zstd", n, zstd_compress(raw, literal=True)))
    hsize = huffman_size(counts)
    if hsize is None or hsize >= min(len(c.payload) for c in candidates):
        return min(candidates, key=lambda c: len(c.payload))
    if n >= FAST_MIN_COUNT:
        fast_enough = hsize * (1 + FAST_TOLERANCE)
        if len(candidates[1].payload) > fast_enough:
            candidates.append(Stream("zstd", n, zstd_compress(raw, strong=True)))
        best_zstd = min(candidates[1:], key=lambda c: len(c.payload))
        if len(best_zstd.payload) <= fast_enough:
            return best_zstd
    candidates.append(Stream("huffman", n, _huffman_payload(symbols, counts)))
    return min(candidates, key=lambda c: len(c.payload))


def encode_bytes(data: np.ndarray) -> Stream:
    """Encode arbitrary bytes (tensor data, codebooks, varints): raw, const or zstd."""
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    if data.size == 0:
        return Stream("raw", 0, b"")
    if data.size > 1 and not (data != data[0]).any():
        return Stream("const", data.size, bytes([int(data[0])]))
    packed = zstd_compress(data)  # numpy buffers go to zstd without a copy
    return Stream("zstd", data.size, packed) if len(packed) < data.size else Stream(
        "raw", data.size, data.tobytes())


def decode(coding: str, count: int, payload: bytes, what: str) -> np.ndarray:
    """The `count` uint8 symbols of a stream; raises DczError naming `what` if malformed."""
    if coding == "raw":
        if len(payload) != count:
            raise DczError(f"{what}: raw stream has {len(payload)} bytes, expected {count}")
        return np.frombuffer(payload, dtype=np.uint8)
    if coding == "const":
        if len(payload) != 1 or count < 1:
            raise DczError(f"{what}: const stream must be one byte with a positive count")
        return np.full(count, payload[0], dtype=np.uint8)
    if coding == "zstd":
        return np.frombuffer(zstd_decompress(payload, count, what), dtype=np.uint8)
    if coding == "huffman":
        return _huffman_decode(count, payload, what)
    raise DczError(f"{what}: unknown coding {coding!r}")


def decode_chunks(coding: str, count: int, payload: bytes, what: str, chunk: int = CHUNK
                  ) -> Iterator[np.ndarray]:
    """The `count` symbols of a stream as consecutive uint8 arrays of at most `chunk` symbols,
    checked as `decode` checks them. A zstd stream is decompressed a chunk at a time into one
    reused buffer: each array is only valid until the next one is asked for."""
    if coding != "zstd":
        symbols = decode(coding, count, payload, what)
        for a in range(0, count, chunk):
            yield symbols[a:a + chunk]
        return
    _zstd_check(payload, count, what)
    buf = np.empty(min(chunk, count), dtype=np.uint8)
    view = memoryview(buf)
    sizes = (min(chunk, count - a) for a in range(0, count, chunk))
    for got in _zstd_fill(payload, (view[:n] for n in sizes), count, what, None):
        yield buf[:got]  # with count 0 the loop still runs the frame's checks to its end


def _huffman_decode(count: int, payload: bytes, what: str) -> np.ndarray:
    """The symbols of a `huffman` payload (table, then bitstream), checked."""
    if len(payload) < 1 or len(payload) < 1 + payload[0] + 1:
        raise DczError(f"{what}: huffman table truncated")
    if count > 8 * (len(payload) - 1 - payload[0] - 1):  # every code takes at least one bit
        raise DczError(f"{what}: huffman bitstream too short for {count} symbols")
    used = payload[0] + 1
    lengths = np.frombuffer(payload, dtype=np.uint8, count=used, offset=1)
    if lengths[-1] == 0:
        raise DczError(f"{what}: huffman table has trailing unused symbols")
    try:
        return huffman.decode(payload[1 + used:], lengths, count)
    except DczError as exc:
        raise DczError(f"{what}: {exc}") from None
