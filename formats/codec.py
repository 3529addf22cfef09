"""One tensor to and from its streams: `raw` (own dtype, zstd) or `shared` (codebook + indices).

A floating tensor with at most 256 distinct nonzero values is weight-shared: its codebook holds
the distinct nonzero bit patterns and each nonzero is an index into it; zero (all bits clear) is
structural. Its positions take the smallest layout (csr.py): dense, capped gaps or escaped gaps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import csr, streams
from .errors import DczError
from .streams import Stream

# name -> (torch dtype, bytes per element); the dtypes a .dcz can hold
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "float64": (torch.float64, 8), "float32": (torch.float32, 4),
    "float16": (torch.float16, 2), "bfloat16": (torch.bfloat16, 2),
    "int64": (torch.int64, 8), "int32": (torch.int32, 4), "int16": (torch.int16, 2),
    "int8": (torch.int8, 1), "uint8": (torch.uint8, 1), "bool": (torch.bool, 1),
    "complex64": (torch.complex64, 8), "complex128": (torch.complex128, 16),
    "float8_e4m3fn": (torch.float8_e4m3fn, 1), "float8_e5m2": (torch.float8_e5m2, 1),
}
DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}
# floating dtypes that may be weight-shared, with the integer type of their bit patterns
SHAREABLE = {"float64": np.int64, "float32": np.int32, "float16": np.int16, "bfloat16": np.int16}
_INT_TORCH = {np.int64: torch.int64, np.int32: torch.int32, np.int16: torch.int16}
MAX_CLUSTERS = 256
_TRY_BOTH_BELOW = 1 << 16  # tensors this small are encoded both ways and the smaller kept
_SAMPLE = 1 << 16
_TRY_PLAIN_BELOW = 1 << 20  # raw tensors up to 1 MB also try unshuffled bytes
_CHUNK = 1 << 20  # larger ones are shuffled and compressed this many bytes at a time


@dataclass
class Encoded:
    """A tensor's header fields (without stream positions) and its encoded streams."""

    fields: dict
    streams: dict[str, Stream]

    @property
    def nbytes(self) -> int:
        """Total payload bytes of the streams."""
        return sum(s.nbytes for s in self.streams.values())


def dtype_name(dtype: torch.dtype) -> str:
    """The .dcz name of a torch dtype; ValueError if a .dcz cannot hold it."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} cannot be stored in a .dcz")
    return DTYPE_NAMES[dtype]


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.numel() == 0:  # empty tensors may carry zero strides that block .view()
        return torch.empty(0, dtype=tensor.dtype)
    return tensor.detach().cpu().contiguous().reshape(-1)


def _flat_bytes(tensor: torch.Tensor) -> np.ndarray:
    return _flat(tensor).view(torch.uint8).numpy()


def encode_raw(tensor: torch.Tensor) -> Encoded:
    """Store the tensor's bytes, byte-shuffled into planes when that compresses better."""
    name = dtype_name(tensor.dtype)
    data = _flat_bytes(tensor)
    itemsize = DTYPES[name][1]
    if itemsize == 1 or data.size == 0:
        return Encoded({"encoding": "raw", "shuffle": False}, {"data": streams.encode_bytes(data)})
    if data.size > _TRY_PLAIN_BELOW:
        return _encode_large_raw(data, itemsize)
    planes = np.ascontiguousarray(data.reshape(-1, itemsize).T).reshape(-1)
    best = Encoded({"encoding": "raw", "shuffle": True}, {"data": streams.encode_bytes(planes)})
    plain = Encoded({"encoding": "raw", "shuffle": False}, {"data": streams.encode_bytes(data)})
    return plain if plain.nbytes < best.nbytes else best


def _encode_large_raw(data: np.ndarray, itemsize: int) -> Encoded:
    """Shuffled planes compressed chunk by chunk, so memory stays near the compressed size
    (no full copy of the planes); incompressible data is stored as it is, without a copy."""
    rows = data.reshape(-1, itemsize)
    step = _CHUNK // itemsize
    chunks = (np.ascontiguousarray(rows[start:start + step, plane])
              for plane in range(itemsize) for start in range(0, rows.shape[0], step))
    pieces = streams.zstd_frame_of_chunks(chunks, data.size)
    if sum(len(p) for p in pieces) < data.size:
        return Encoded({"encoding": "raw", "shuffle": True},
                       {"data": streams.Stream("zstd", data.size, pieces)})
    view = memoryview(data)
    raw = [view[i:i + _CHUNK] for i in range(0, data.size, _CHUNK)]
    return Encoded({"encoding": "raw", "shuffle": False},
                   {"data": streams.Stream("raw", data.size, raw)})


def _codebook(bits: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(codebook bit patterns in value order, index per nonzero), or None if > 256 values."""
    values = np.unique(bits[:_SAMPLE])
    if values.size > MAX_CLUSTERS:
        return None
    index = np.searchsorted(values, bits).clip(0, values.size - 1)
    if not np.array_equal(values[index], bits):
        values, index = np.unique(bits, return_inverse=True)
        if values.size > MAX_CLUSTERS:
            return None
    as_float = torch.from_numpy(values.copy()).view(DTYPES[dtype][0]).double().numpy()
    order = np.argsort(as_float, kind="stable")  # by value, NaN last: readable codebooks
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return values[order], rank[index].astype(np.uint8)


def encode_shared(tensor: torch.Tensor) -> Encoded | None:
    """Codebook + indices + positions, or None when the tensor has more than 256 values."""
    name = dtype_name(tensor.dtype)
    if name not in SHAREABLE:
        return None
    bits = _flat(tensor).view(_INT_TORCH[SHAREABLE[name]]).numpy()
    head = bits[: 4 * _SAMPLE]
    if np.unique(head[head != 0]).size > MAX_CLUSTERS:  # most unshared tensors stop here, cheaply
        return None
    positions = np.flatnonzero(bits)
    found = _codebook(bits[positions], name)
    if found is None:
        return None
    codebook, index = found
    k, numel, nonzero = codebook.size, bits.size, positions.size
    index_counts = np.bincount(index, minlength=256)
    layouts: dict[tuple[str, int], int] = {}
    if k < MAX_CLUSTERS:
        dense_counts = np.concatenate(([numel - nonzero], index_counts[:255]))
        layouts[("dense", 0)] = streams.stream_size(dense_counts)
    if nonzero:
        gap = csr.gaps(positions)
        index_size = streams.stream_size(index_counts)
        hist = csr.gap_histogram(gap)
        for g in range(1, 9):
            counts = csr.capped_counts(gap, g, hist)
            layouts[("capped", g)] = streams.stream_size(counts) + index_size
        esc_counts, varint_bytes = csr.escape_counts(gap)
        layouts[("escape", 0)] = streams.stream_size(esc_counts) + varint_bytes + index_size
    layout, g = min(layouts, key=layouts.get)
    fields = {"encoding": "shared", "layout": layout, "nonzero": int(nonzero), "clusters": int(k)}
    out = {"codebook": streams.encode_bytes(codebook.view(np.uint8))}
    if layout == "dense":
        symbols = np.zeros(numel, dtype=np.uint8)
        symbols[positions] = index + 1
        out["index"] = streams.encode(symbols)
    else:
        out["index"] = streams.encode(index)
        if layout == "capped":
            fields["gap_bits"] = g
            out["gaps"] = streams.encode(csr.encode_capped(gap, g))
        else:
            symbols, varints = csr.encode_escape(gap)
            out["gaps"] = streams.encode(symbols)
            out["long_gaps"] = streams.encode_bytes(varints)
    return Encoded(fields, out)


def encode_tensor(tensor: torch.Tensor) -> Encoded:
    """The smallest encoding of a tensor: shared when it has <= 256 distinct nonzero values."""
    shared = encode_shared(tensor)
    if shared is not None and tensor.numel() >= _TRY_BOTH_BELOW:
        return shared
    raw = encode_raw(tensor)
    return shared if shared is not None and shared.nbytes <= raw.nbytes else raw


def stream_names(fields: dict) -> set[str]:
    """The streams an entry with these fields must have."""
    if fields["encoding"] == "raw":
        return {"data"}
    return {"dense": {"codebook", "index"}, "capped": {"codebook", "index", "gaps"},
            "escape": {"codebook", "index", "gaps", "long_gaps"}}[fields["layout"]]


def decode_tensor(fields: dict, dtype: str, shape: list[int], payloads: dict[str, tuple],
                  what: str) -> torch.Tensor:
    """Rebuild a tensor from validated fields and its streams' (coding, count, payload)."""
    torch_dtype, itemsize = DTYPES[dtype]
    numel = math.prod(shape)

    def stream(key: str) -> np.ndarray:
        coding, count, payload = payloads[key]
        return streams.decode(coding, count, payload, f"{what} {key} stream")

    if numel == 0:  # the header checked every count is 0; the codings are checked here
        for key in payloads:
            stream(key)
        return torch.empty(shape, dtype=torch_dtype)  # a shape may hold huge dims beside a 0
    if fields["encoding"] == "raw":
        data = stream("data")
        if data.size != numel * itemsize:
            raise DczError(f"{what}: data stream has {data.size} bytes, expected {numel * itemsize}")
        if dtype == "bool" and int(data.max()) > 1:
            raise DczError(f"{what}: a bool element is neither 0 nor 1")
        if fields["shuffle"]:
            data = np.ascontiguousarray(data.reshape(itemsize, -1).T).reshape(-1)
        elif not data.flags.writeable:
            data = data.copy()
        return torch.from_numpy(data).view(torch_dtype).reshape(shape)

    int_type = SHAREABLE[dtype]
    k, nonzero = fields["clusters"], fields["nonzero"]
    codebook = stream("codebook")
    if codebook.size != k * itemsize:
        raise DczError(f"{what}: codebook has {codebook.size} bytes, expected {k * itemsize}")
    codebook = codebook.view(int_type) if codebook.size else np.zeros(0, int_type)
    if np.count_nonzero(codebook) != k or np.unique(codebook).size != k:
        raise DczError(f"{what}: codebook values must be distinct and nonzero")
    index = stream("index")
    layout = fields["layout"]
    expected = numel if layout == "dense" else nonzero
    if index.size != expected:
        raise DczError(f"{what}: index stream has {index.size} symbols, expected {expected}")
    limit = k if layout == "dense" else k - 1
    if index.size and int(index.max()) > limit:
        raise DczError(f"{what}: an index points past the codebook ({k} clusters)")
    if layout == "dense":
        if np.count_nonzero(index) != nonzero:
            raise DczError(f"{what}: dense index stream holds a different number of nonzeros")
        table = np.concatenate((np.zeros(1, int_type), codebook))
        out = table[index]
    else:
        if layout == "capped":
            positions = csr.decode_capped(stream("gaps"), fields["gap_bits"], nonzero, numel, what)
        else:
            positions = csr.decode_escape(stream("gaps"), stream("long_gaps"), nonzero, numel,
                                          what)
        out = np.zeros(numel, dtype=int_type)
        out[positions] = codebook[index]
    return torch.from_numpy(out).view(torch_dtype).reshape(shape)
