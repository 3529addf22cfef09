"""One tensor to and from its streams: `raw` (own dtype, zstd) or `shared` (codebook + indices).

A floating tensor with at most 256 distinct nonzero values is weight-shared: its codebook holds
the distinct nonzero bit patterns and each nonzero is an index into it; zero (all bits clear) is
structural. One with more, but at most 256 per row (a model quantized per output channel), gets
one codebook per row (grouped sharing, SPEC.md 2.1). A quantizer can declare its codebooks
(`Shared`) instead of having them found. Positions take the smallest layout (csr.py): dense,
capped gaps or escaped gaps, over the whole tensor or over its alive rows and columns only
(dead lines, SPEC.md 2.5); the indices of small tensors are context coded (context.py) when
that is smaller.
"""

from __future__ import annotations

import math
import mmap
import sys
from dataclasses import dataclass

import numpy as np
import torch

from . import context, csr, streams
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
GROUP_CHUNK = 1 << 20  # grouped tensors are detected and decoded this many elements at a time
_SAMPLE_ROWS = 8  # rows looked at before grouped detection runs over a whole tensor
_HUGE_FROM = 1 << 22  # outputs this large are mapped with transparent huge pages where possible


# the order of a shared entry's streams in the file (SPEC.md 2.4)
STREAM_ORDER = ("codebook", "index", "gaps", "long_gaps", "rows", "cols")


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


@dataclass(eq=False)
class Shared:
    """A declared weight-shared tensor: codebook[index], index -1 meaning zero. A [G, K] codebook
    holds one codebook per group of `group_rows` rows (of the tensor viewed as [shape[0], -1]),
    and each index points into its own group's codebook."""

    codebook: torch.Tensor
    index: torch.Tensor
    group_rows: int = 1

    @property
    def shape(self) -> torch.Size:
        """The tensor's shape (the index's)."""
        return self.index.shape

    @property
    def dtype(self) -> torch.dtype:
        """The tensor's dtype (the codebook's)."""
        return self.codebook.dtype

    def check(self) -> None:
        """ValueError unless codebook, index and group_rows describe a tensor a .dcz can share."""
        cb, idx = self.codebook, self.index
        if DTYPE_NAMES.get(cb.dtype) not in SHAREABLE or cb.dim() not in (1, 2):
            raise ValueError(f"a shared codebook must be a 1-D or 2-D float tensor, got "
                             f"{cb.dtype} of shape {tuple(cb.shape)}")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise ValueError(f"a shared index must be an integer tensor, got {idx.dtype}")
        if idx.numel() and not (-1 <= int(idx.min()) and int(idx.max()) < cb.shape[-1]):
            raise ValueError(f"a shared index must lie in -1..{cb.shape[-1] - 1}")
        if cb.dim() == 2:
            rows = idx.shape[0] if idx.dim() else 0
            if (type(self.group_rows) is not int or self.group_rows < 1 or idx.dim() == 0
                    or cb.shape[0] != -(-rows // self.group_rows)):
                raise ValueError(f"a [G, K] codebook needs G = ceil(rows / group_rows) groups; "
                                 f"got G = {cb.shape[0]}, index shape {tuple(idx.shape)}, "
                                 f"group_rows {self.group_rows!r}")

    def dense(self) -> torch.Tensor:
        """The tensor it stands for."""
        self.check()
        cb, idx = self.codebook.detach().cpu(), self.index.detach().cpu().long()
        if idx.numel() == 0:
            return torch.zeros(self.shape, dtype=cb.dtype)
        if cb.dim() == 1:
            return torch.cat((cb.new_zeros(1), cb))[idx + 1]
        groups, k = cb.shape
        table = torch.cat((cb.new_zeros(groups, 1), cb), dim=1).reshape(-1)
        rows = idx.shape[0]
        offset = (torch.arange(rows) // self.group_rows) * (k + 1)
        flat = idx.reshape(rows, -1) + 1 + offset[:, None]
        return table[flat].reshape(self.shape)


def _key(bits: np.ndarray) -> np.ndarray:
    """Bit patterns mapped to integers in the order of their float values (an involution):
    negative floats get their magnitude bits flipped; zero stays 0, nonzero stays nonzero."""
    mask = np.array(np.iinfo(bits.dtype).max, dtype=bits.dtype)
    return bits ^ ((bits >> (8 * bits.itemsize - 1)) & mask)


def _by_value(values: np.ndarray, dtype: str) -> np.ndarray:
    """The order that sorts distinct bit patterns by float value, NaN last (v1 codebooks)."""
    as_float = torch.from_numpy(values.copy()).view(DTYPES[dtype][0]).double().numpy()
    return np.argsort(as_float, kind="stable")


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
    order = _by_value(values, dtype)  # by value, NaN last: readable codebooks
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return values[order], rank[index].astype(np.uint8)


def _distinct_marks(s: np.ndarray) -> np.ndarray:
    """For rows sorted along axis 1: True at the first of each run of a nonzero value."""
    marks = np.empty(s.shape, dtype=bool)
    marks[:, :1] = True
    np.not_equal(s[:, 1:], s[:, :-1], out=marks[:, 1:])
    marks &= s != 0
    return marks


def _row_codebooks(bits: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-row codebooks ([rows, K] bit patterns, each row's values in value order, zero-padded)
    and every element's index into its row's, or None when a row has more than 256 values or
    sharing would not pay (its estimate for a sample of rows is no smaller than raw bytes)."""
    cols = bits.size // rows
    table = bits.reshape(rows, cols)
    sample = table[np.unique(np.linspace(0, rows - 1, min(rows, _SAMPLE_ROWS)).astype(np.int64)),
                   :_SAMPLE]
    per_row = _distinct_marks(np.sort(_key(sample), axis=1)).sum(axis=1)
    if per_row.max() > MAX_CLUSTERS:
        return None  # an unshared tensor stops here, cheaply
    # the sample's codebooks plus fixed-length indices, against its raw bytes
    estimate = (per_row * bits.itemsize).sum() + (
        np.count_nonzero(sample, axis=1) * np.log2(per_row + 1)).sum() / 8
    if estimate >= sample.size * bits.itemsize:
        return None
    index = np.empty(bits.size, dtype=np.uint8)
    counts = np.empty(rows, dtype=np.int64)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    step = max(1, GROUP_CHUNK // max(cols, 1))
    for start in range(0, rows, step):  # blocks of rows, about GROUP_CHUNK elements each
        keys = _key(table[start:start + step])
        order = np.argsort(keys, axis=1)
        s = np.take_along_axis(keys, order, axis=1)
        marks = _distinct_marks(s)
        k = marks.sum(axis=1)
        if k.max() > MAX_CLUSTERS:
            return None
        counts[start:start + k.size] = k
        rank = np.cumsum(marks, axis=1, dtype=np.int16) - 1  # zeros get a meaningless rank
        block = np.empty(keys.shape, dtype=np.uint8)
        np.put_along_axis(block, order, rank.clip(0).astype(np.uint8), axis=1)
        index[start * cols:(start + k.size) * cols] = block.reshape(-1)
        r, c = np.nonzero(marks)
        found.append((r + start, rank[r, c], s[r, c]))
    k = int(counts.max())
    codebook = np.zeros((rows, k), dtype=bits.dtype)
    for r, c, v in found:
        codebook[r, c] = _key(v)
    return codebook, index


def _grouped_declared(codebook: np.ndarray, index: np.ndarray, rows: int, group_rows: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A declared [G, K0] codebook and index (-1 = zero) normalized as detection would find them:
    (codebook [G, K], zero-padded, values in value order, unused/zero/repeated entries dropped;
    flat nonzero positions; their uint8 indices), or None if a group keeps over 256 values."""
    groups, k0 = codebook.shape
    cols = index.size // rows if rows else 0
    gid = np.repeat(np.arange(rows, dtype=np.int64) // group_rows, cols)
    code = np.where(index >= 0, index + gid * k0, -1)
    del gid
    flat = codebook.reshape(-1)
    used = np.flatnonzero((np.bincount(code + 1, minlength=flat.size + 1)[1:] > 0) & (flat != 0))
    group, keys = used // max(k0, 1), _key(flat[used])
    order = np.lexsort((keys, group))
    group, keys = group[order], keys[order]
    new = np.ones(order.size, dtype=bool)
    new[1:] = (group[1:] != group[:-1]) | (keys[1:] != keys[:-1])
    distinct = np.cumsum(new) - 1
    starts = np.ones(order.size, dtype=bool)
    starts[1:] = group[1:] != group[:-1]
    first = distinct[np.flatnonzero(starts)]  # the first distinct value of each present group
    rank = distinct - first[np.cumsum(starts) - 1]
    sizes = np.bincount(group[new], minlength=groups)
    k = int(sizes.max()) if sizes.size else 0
    if k > MAX_CLUSTERS:
        return None
    out = np.zeros((groups, k), dtype=codebook.dtype)
    out[group[new], rank[new]] = _key(keys[new])
    remap = np.full(flat.size + 1, -1, dtype=np.int16)
    remap[used[order] + 1] = rank
    mapped = remap[code + 1]
    positions = np.flatnonzero(mapped >= 0)
    return out, positions, mapped[positions].astype(np.uint8)


def _layouts(positions: np.ndarray, index_counts: np.ndarray, numel: int, k: int
             ) -> dict[tuple[str, int], int]:
    """Estimated bytes of the positions and indices in each layout."""
    nonzero = positions.size
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
    return layouts


def _lines_of(positions: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Which rows and which columns of the matrix view hold a nonzero."""
    alive_rows = np.zeros(rows, dtype=bool)
    alive_cols = np.zeros(cols, dtype=bool)
    alive_rows[positions // cols] = True
    alive_cols[positions % cols] = True
    return alive_rows, alive_cols


def _compact(positions: np.ndarray, alive_rows: np.ndarray, alive_cols: np.ndarray
             ) -> np.ndarray:
    """Positions in the matrix of the alive rows and columns only (still row-major, sorted)."""
    cols = alive_cols.size
    row_rank = np.cumsum(alive_rows) - 1
    col_rank = np.cumsum(alive_cols) - 1
    return row_rank[positions // cols] * int(alive_cols.sum()) + col_rank[positions % cols]


def _expand(sub: np.ndarray, alive: tuple[np.ndarray, np.ndarray], cols: int) -> np.ndarray:
    """Positions in the whole matrix of positions in the alive submatrix (rows, cols indices)."""
    rows_at, cols_at = alive
    width = cols_at.size
    return rows_at[sub // width] * cols + cols_at[sub % width]


def _shared_streams(codebook: np.ndarray, positions: np.ndarray, index: np.ndarray,
                    shape: tuple[int, ...], grouping: tuple[int, int] | None = None) -> Encoded:
    """The entry of a shared tensor from its codebook bit patterns (flat, or [G, K] with
    grouping = (G, group_rows)), its nonzero positions and their indices: the smallest layout,
    with dead rows and columns left out and the indices context-coded where that is smaller
    (neither for grouped codebooks)."""
    k, nonzero = codebook.shape[-1] if codebook.ndim else 0, positions.size
    numel = math.prod(shape)
    rows, cols = context.matrix_shape(shape, numel)
    index_counts = np.bincount(index, minlength=256)
    layouts = {(name, g, False): size
               for (name, g), size in _layouts(positions, index_counts, numel, k).items()}
    alive = None
    if grouping is None and nonzero:
        alive_rows, alive_cols = _lines_of(positions, rows, cols)
        if not (alive_rows.all() and alive_cols.all()):
            alive = (alive_rows, alive_cols)
            bitmaps = [streams.encode_bytes(np.packbits(a)) for a in alive]
            sub = _compact(positions, alive_rows, alive_cols)
            cells = int(alive_rows.sum()) * int(alive_cols.sum())
            extra = sum(b.nbytes for b in bitmaps)
            for (name, g), size in _layouts(sub, index_counts, cells, k).items():
                layouts[(name, g, True)] = size + extra
    layout, g, lines = min(layouts, key=layouts.get)
    fields = {"encoding": "shared", "layout": layout, "nonzero": int(nonzero), "clusters": int(k)}
    if grouping is not None:
        fields.update(groups=int(grouping[0]), group_rows=int(grouping[1]))
    out = {"codebook": streams.encode_bytes(np.ascontiguousarray(codebook).view(np.uint8))}
    where, cells = positions, numel
    if lines:
        fields["lines"] = True
        out["rows"], out["cols"] = bitmaps
        where, cells = sub, int(alive[0].sum()) * int(alive[1].sum())
    if layout == "dense":
        symbols = np.zeros(cells, dtype=np.uint8)
        symbols[where] = index + 1
        out["index"] = streams.encode(symbols)
    else:
        out["index"] = streams.encode(index)
        gap = csr.gaps(where)
        if layout == "capped":
            fields["gap_bits"] = g
            out["gaps"] = streams.encode(csr.encode_capped(gap, g))
        else:
            symbols, varints = csr.encode_escape(gap)
            out["gaps"] = streams.encode(symbols)
            out["long_gaps"] = streams.encode_bytes(varints)
    if grouping is None and numel <= context.WRITER_MAX_CELLS:
        _try_context(fields, out, positions, index, shape, (rows, cols),
                     alive if lines else None)
    return Encoded(fields, {k: out[k] for k in STREAM_ORDER if k in out})


def _try_context(fields: dict, out: dict[str, Stream], positions: np.ndarray, index: np.ndarray,
                 shape: tuple[int, ...], matrix: tuple[int, int],
                 alive: tuple[np.ndarray, np.ndarray] | None) -> None:
    """Replace the index stream by its context-coded form (context.py) if that is smaller."""
    dense = fields["layout"] == "dense"
    grid = np.zeros(matrix, dtype=np.uint8)
    grid.reshape(-1)[positions] = index + 1
    if not dense:
        coded = grid != 0
    elif alive is None:
        coded = np.ones(matrix, dtype=bool)
    else:
        coded = np.outer(alive[0], alive[1])
    found = context.best(grid, coded, fields["clusters"], dense, shape)
    if found is not None and len(found[1]) < out["index"].nbytes:
        model, payload = found
        fields["context"] = [int(model.transpose), model.near, model.far]
        out["index"] = Stream("context", out["index"].count, payload)


def encode_shared(tensor: torch.Tensor) -> Encoded | None:
    """Codebook + indices + positions, found by looking at the values: one codebook when the
    tensor has at most 256 distinct nonzero values, else one per row when every row has at most
    256; None otherwise."""
    name = dtype_name(tensor.dtype)
    if name not in SHAREABLE:
        return None
    bits = _flat(tensor).view(_INT_TORCH[SHAREABLE[name]]).numpy()
    head = bits[: 4 * _SAMPLE]
    if np.unique(head[head != 0]).size <= MAX_CLUSTERS:  # most unshared tensors fail, cheaply
        positions = np.flatnonzero(bits)
        found = _codebook(bits[positions], name)
        if found is not None:
            return _shared_streams(found[0], positions, found[1], tuple(tensor.shape))
    rows = tensor.shape[0] if tensor.dim() else 1
    if rows < 2 or bits.size < 2 * rows:  # a single row, or rows of one element
        return None
    grouped = _row_codebooks(bits, rows)
    if grouped is None:
        return None
    codebook, index = grouped
    positions = np.flatnonzero(bits)
    return _shared_streams(codebook, positions, index[positions], tuple(tensor.shape),
                           (rows, 1))


def encode_declared(shared: Shared) -> Encoded | None:
    """The entry of a declared shared tensor, without looking at its values: the bytes
    detection would give for the same tensor (unused, zero and repeated codebook entries are
    dropped, values sorted). None if a codebook keeps more than 256 values."""
    shared.check()
    name = dtype_name(shared.dtype)
    int_torch = _INT_TORCH[SHAREABLE[name]]
    codebook = _flat(shared.codebook).view(int_torch).numpy().reshape(shared.codebook.shape)
    index = _flat(shared.index).to(torch.int64).numpy()
    if codebook.ndim == 2:
        rows = shared.shape[0]
        found = _grouped_declared(codebook, index, rows, shared.group_rows)
        if found is None:
            return None
        grouped, positions, symbols = found
        return _shared_streams(grouped, positions, symbols, tuple(shared.shape),
                               (grouped.shape[0], shared.group_rows))
    counts = np.bincount(index + 1, minlength=codebook.size + 1)[1:]
    used = np.flatnonzero((counts > 0) & (codebook != 0))
    values, inverse = np.unique(codebook[used], return_inverse=True)
    if values.size > MAX_CLUSTERS:
        return None
    order = _by_value(values, name)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    remap = np.full(codebook.size + 1, -1, dtype=np.int16)
    remap[used + 1] = rank[inverse.reshape(-1)]
    mapped = remap[index + 1]
    positions = np.flatnonzero(mapped >= 0)
    return _shared_streams(values[order], positions, mapped[positions].astype(np.uint8),
                           tuple(shared.shape))


def encode_tensor(tensor: torch.Tensor | Shared) -> Encoded:
    """The smallest encoding of a tensor or a declared `Shared` one: shared when it has <= 256
    distinct nonzero values (per row, if not overall), raw otherwise or when that is smaller."""
    if isinstance(tensor, Shared):
        shared = encode_declared(tensor)
        if shared is None:
            return encode_tensor(tensor.dense())
        numel, dense = tensor.index.numel(), tensor.dense
    else:
        shared, numel = encode_shared(tensor), tensor.numel()
        dense = lambda: tensor  # noqa: E731
    itemsize = DTYPES[dtype_name(tensor.dtype)][1]
    if shared is not None and numel >= _TRY_BOTH_BELOW and (
            "groups" not in shared.fields or 2 * shared.nbytes <= numel * itemsize):
        return shared  # a grouped entry that saves less than half is checked against raw
    raw = encode_raw(dense())
    return shared if shared is not None and shared.nbytes <= raw.nbytes else raw


def stream_names(fields: dict) -> set[str]:
    """The streams an entry with these fields must have."""
    if fields["encoding"] == "raw":
        return {"data"}
    names = {"dense": {"codebook", "index"}, "capped": {"codebook", "index", "gaps"},
             "escape": {"codebook", "index", "gaps", "long_gaps"}}[fields["layout"]]
    return names | {"rows", "cols"} if fields.get("lines") else names


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
    groups = fields.get("groups")
    slots = k if groups is None else groups * k
    codebook = stream("codebook")
    if codebook.size != slots * itemsize:
        raise DczError(f"{what}: codebook has {codebook.size} bytes, expected {slots * itemsize}")
    codebook = codebook.view(int_type) if codebook.size else np.zeros(0, int_type)
    if groups is None:
        if np.count_nonzero(codebook) != k or np.unique(codebook).size != k:
            raise DczError(f"{what}: codebook values must be distinct and nonzero")
        sizes = None
    else:
        sizes = _group_sizes(codebook.reshape(groups, k), what)
    layout = fields["layout"]
    rows, cols = context.matrix_shape(shape, numel)
    alive = _alive(stream("rows"), stream("cols"), rows, cols, what) if fields.get("lines") else None
    cells = numel if alive is None else alive[0].size * alive[1].size
    expected = cells if layout == "dense" else nonzero
    if payloads["index"][1] != expected:
        raise DczError(f"{what}: index stream has {payloads['index'][1]} symbols, "
                       f"expected {expected}")
    if layout == "dense" and sizes is None and alive is None and "context" not in fields:
        out = _decode_dense(codebook, nonzero, payloads["index"], numel, what)
        return torch.from_numpy(out).view(torch_dtype).reshape(shape)
    positions = None
    if layout == "capped":
        positions = csr.decode_capped(stream("gaps"), fields["gap_bits"], nonzero, cells, what)
    elif layout == "escape":
        positions = csr.decode_escape(stream("gaps"), stream("long_gaps"), nonzero, cells, what)
    if positions is not None and alive is not None:
        _check_lines_used(positions, alive, what)
        positions = _expand(positions, alive, cols)
    if "context" in fields:
        index = _context_index(fields, payloads["index"], positions, alive, (rows, cols), what)
    else:
        index = stream("index")
        limit = k if layout == "dense" else k - 1
        if index.size and int(index.max()) > limit:
            raise DczError(f"{what}: an index points past the codebook ({k} clusters)")
    if layout == "dense":
        if np.count_nonzero(index) != nonzero:
            raise DczError(f"{what}: dense index stream holds a different number of nonzeros")
        if sizes is None:  # lines or context: the nonzeros' places, then their indices
            positions = np.flatnonzero(index)
            index = index[positions] - 1
            if alive is not None:
                _check_lines_used(positions, alive, what)
                positions = _expand(positions, alive, cols)
    if sizes is not None:
        out = _decode_grouped(codebook, sizes, k, fields["group_rows"] * (numel // shape[0]),
                              index, positions, numel, what)
    else:
        out = zeroed(numel, int_type)
        out[positions] = np.take(codebook, index, mode="wrap")  # indices checked above
    return torch.from_numpy(out).view(torch_dtype).reshape(shape)


def _alive(row_bits: np.ndarray, col_bits: np.ndarray, rows: int, cols: int, what: str
           ) -> tuple[np.ndarray, np.ndarray]:
    """The indices of the alive rows and columns from their bitmaps (SPEC.md 2.5)."""
    out = []
    for bits, n, kind in ((row_bits, rows, "rows"), (col_bits, cols, "cols")):
        if bits.size != (n + 7) // 8:
            raise DczError(f"{what}: {kind} bitmap has {bits.size} bytes, expected {(n + 7) // 8}")
        flags = np.unpackbits(bits)
        if flags[n:].any():
            raise DczError(f"{what}: {kind} bitmap has padding bits set")
        out.append(np.flatnonzero(flags[:n]))
    return out[0], out[1]


def _check_lines_used(sub: np.ndarray, alive: tuple[np.ndarray, np.ndarray], what: str) -> None:
    """Every row and column a bitmap marks alive holds a nonzero."""
    width = alive[1].size
    if (np.unique(sub // width).size != alive[0].size
            or np.unique(sub % width).size != width):
        raise DczError(f"{what}: a row or column marked alive holds no nonzero")


def _context_index(fields: dict, index: tuple, positions: np.ndarray | None,
                   alive: tuple[np.ndarray, np.ndarray] | None, matrix: tuple[int, int],
                   what: str) -> np.ndarray:
    """The index symbols of a context-coded stream, in the order of the other codings."""
    coding, _, payload = index
    if coding != "context":
        raise DczError(f"{what}: an entry with a context model has an index stream coded "
                       f"{coding!r}, not 'context'")
    transpose, near, far = fields["context"]
    model = context.Model(bool(transpose), near, far)
    k = fields["clusters"]
    context.check(*matrix, k, model, what)
    if positions is not None:
        coded = np.zeros(matrix, dtype=bool)
        coded.reshape(-1)[positions] = True
        grid = context.decode(payload, coded, k, False, model, what)
        return grid.reshape(-1)[positions] - 1
    if alive is None:
        coded = np.ones(matrix, dtype=bool)
        return context.decode(payload, coded, k, True, model, what).reshape(-1)
    coded = np.zeros(matrix, dtype=bool)
    coded[np.ix_(*alive)] = True
    grid = context.decode(payload, coded, k, True, model, what)
    return grid[np.ix_(*alive)].reshape(-1)


def zeroed(numel: int, dtype: type) -> np.ndarray:
    """A zero-filled output array; a large one is a fresh anonymous mapping advised to use huge
    pages (first-touch page faults are most of the cost of writing out a large tensor)."""
    nbytes = numel * np.dtype(dtype).itemsize
    if nbytes < _HUGE_FROM or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.zeros(numel, dtype=dtype)
    area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(area, dtype=dtype)  # the array keeps the mapping alive


_PAIRS_FROM = 1 << 18  # tensors this large are looked up a pair of symbols at a time
_PAIR_TYPES = {1: np.uint16, 2: np.uint32, 4: np.uint64}
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _pair_table(table: np.ndarray) -> np.ndarray | None:
    """For the values of a lookup table (more than 256: None), the table of every pair of them indexed
    by the little-endian uint16 of the two symbols: entry a + 256 b holds table[a] then table[b]
    as one unsigned word (None for 8-byte values: no wider word)."""
    word = _PAIR_TYPES.get(table.dtype.itemsize)
    if word is None or table.size > 256 or sys.byteorder != "little":
        return None
    bits = np.zeros(256, dtype=word)
    bits[:table.size] = table.view(_UNSIGNED[table.dtype.itemsize])
    shift = word(8 * table.dtype.itemsize)
    return ((bits[:, None] << shift) | bits[None, :]).reshape(-1)


def _decode_dense(codebook: np.ndarray, nonzero: int, index: tuple, numel: int, what: str
                  ) -> np.ndarray:
    """A dense-layout tensor's bit patterns, decoded straight into the output a chunk of index
    symbols at a time (each chunk checked, then looked up while it is in cache)."""
    k = codebook.size
    table = np.zeros(k + 1, dtype=codebook.dtype)
    table[1:] = codebook
    out = zeroed(numel, codebook.dtype)
    pairs = _pair_table(table) if numel >= _PAIRS_FROM else None
    coding, count, payload = index
    at = found = 0
    for symbols in streams.decode_chunks(coding, count, payload, f"{what} index stream"):
        if int(symbols.max()) > k:
            raise DczError(f"{what}: an index points past the codebook ({k} clusters)")
        found += int(np.count_nonzero(symbols))
        chunk = out[at:at + symbols.size]
        even = symbols.size & ~1 if pairs is not None and at % 2 == 0 else 0
        if even:  # two symbols at a time: the uint16 of a byte pair indexes both values
            np.take(pairs, symbols[:even].view(np.uint16), out=chunk[:even].view(pairs.dtype),
                    mode="wrap")  # checked: both bytes <= k
        np.take(table, symbols[even:], out=chunk[even:], mode="wrap")  # checked: <= k
        at += symbols.size
    if found != nonzero:
        raise DczError(f"{what}: dense index stream holds a different number of nonzeros")
    return out


def _group_sizes(codebook: np.ndarray, what: str) -> np.ndarray:
    """Each group's number of values K_g, after checking its K slots: K_g distinct nonzero bit
    patterns, then zeros (padding) only, and some group using all K slots."""
    groups, k = codebook.shape
    present = codebook != 0
    sizes = present.sum(axis=1)
    if not np.array_equal(present, np.arange(k) < sizes[:, None]):
        raise DczError(f"{what}: a group's codebook has a zero slot before a value (zero slots "
                       "only pad the end)")
    if groups and k and int(sizes.max()) != k:
        raise DczError(f"{what}: no group's codebook fills all {k} slots")
    ordered = np.sort(codebook, axis=1)
    if ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != 0)).any():
        raise DczError(f"{what}: a group's codebook repeats a value")
    return sizes


def _decode_grouped(codebook: np.ndarray, sizes: np.ndarray, k: int, group_size: int,
                    index: np.ndarray, positions: np.ndarray | None, numel: int, what: str
                    ) -> np.ndarray:
    """A grouped tensor's bit patterns, GROUP_CHUNK elements (or nonzeros) at a time, checking
    that every index lies within its own group's codebook (element e is in group e // size)."""
    groups = sizes.size
    if positions is None:  # dense: symbol 0 is zero, s >= 1 the group's value s - 1
        table = np.zeros((groups, k + 1), dtype=codebook.dtype)
        table[:, 1:] = codebook.reshape(groups, k)
        table = table.reshape(-1)
        out = np.empty(numel, dtype=codebook.dtype)
        for a in range(0, numel, GROUP_CHUNK):
            b = min(a + GROUP_CHUNK, numel)
            gid = np.arange(a, b, dtype=np.int64) // group_size
            symbols = index[a:b]
            if (symbols > sizes[gid]).any():
                raise DczError(f"{what}: an index points past its group's codebook")
            out[a:b] = table[gid * (k + 1) + symbols]
        return out
    out = np.zeros(numel, dtype=codebook.dtype)
    for a in range(0, positions.size, GROUP_CHUNK):
        where = positions[a:a + GROUP_CHUNK]
        gid = where.astype(np.int64) // group_size
        symbols = index[a:a + GROUP_CHUNK]
        if (symbols >= sizes[gid]).any():
            raise DczError(f"{what}: an index points past its group's codebook")
        out[where] = codebook[gid * k + symbols]
    return out
