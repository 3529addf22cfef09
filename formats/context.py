"""Context-modelled range coding of cluster indices (SPEC.md 2.6): each index is coded with an
adaptive model chosen by the values of two earlier neighbours, which the decoder already has.

The tensor is viewed as a matrix (rows = its first dimension) holding a value per cell: 0 for a
zero, c + 1 for cluster c. The coder walks the matrix one line at a time along a step axis
(columns, or rows when transposed) and codes the coded cells of a line in one vectorised
range-coder call: the context of cell (i, j) is the pair of values at (i, j - near) and
(i, j - far). Counts adapt between lines, so the decoder rebuilds each line's probabilities
before decoding it. The range coder is `constriction`'s.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import constriction
import numpy as np

from .errors import DczError

MAX_CLUSTERS = 16  # contexts (clusters + 1)^2 and their counts stay a small table
MAX_STEPS = 1 << 16  # lines along the step axis: bounds the decoder's loop
MAX_CELLS = 1 << 24
MAX_OFFSET = 255
WRITER_MAX_CELLS = 1 << 20  # the writer tries context coding on tensors up to this size
WRITER_MAX_CODED = 1 << 17  # whose index streams have at most this many symbols (decode speed)
CHUNK = 1 << 14  # cells of a line coded per range-coder call: bounds the probability tables
_CATEGORICAL = constriction.stream.model.Categorical(perfect=False)


@dataclass(frozen=True)
class Model:
    """Where a context-coded index stream takes its contexts from."""

    transpose: bool  # step along rows instead of columns
    near: int  # offset of the first neighbour along the step axis, 0 for none
    far: int  # offset of the second, 0 for none


def matrix_shape(shape: list[int] | tuple[int, ...], numel: int) -> tuple[int, int]:
    """The (rows, columns) a tensor of this shape is viewed as (rows = the first dimension)."""
    rows = shape[0] if len(shape) else 1
    return rows, numel // rows if rows else 0


def check(rows: int, cols: int, clusters: int, model: Model, what: str) -> None:
    """DczError unless a tensor of this geometry may have a context-coded index stream."""
    if not (0 <= model.near <= MAX_OFFSET and 0 <= model.far <= MAX_OFFSET):
        raise DczError(f"{what}: context offsets must be 0..{MAX_OFFSET}")
    steps = rows if model.transpose else cols
    if clusters > MAX_CLUSTERS or steps > MAX_STEPS or rows * cols > MAX_CELLS:
        raise DczError(f"{what}: context coding is limited to {MAX_CLUSTERS} clusters, "
                       f"{MAX_STEPS} lines along its axis and {MAX_CELLS} elements")


def _lines(coded: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(line, rows coded in it) for each line of an oriented mask that codes a cell."""
    line, rows = np.nonzero(coded.T)  # by line, then by row
    starts = np.flatnonzero(np.diff(line, prepend=-1))
    ends = np.append(starts[1:], line.size)
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        yield int(line[a]), rows[a:b]


def _context(grid: np.ndarray, rows: np.ndarray, j: int, model: Model, values: int
             ) -> np.ndarray:
    ctx = np.zeros(rows.size, dtype=np.int64)
    if model.near and j >= model.near:
        ctx += grid[rows, j - model.near].astype(np.int64) * values
    if model.far and j >= model.far:
        ctx += grid[rows, j - model.far]
    return ctx


def _frequencies(values: int, alphabet: int) -> np.ndarray:
    """The table of integer frequencies 2n + 1 (Krichevsky-Trofimov) per context and symbol, as
    floats (exact): the range coder's quantization (SPEC.md 2.6) normalizes them itself."""
    return np.ones((values * values, alphabet), dtype=np.float64)


def _count(freq: np.ndarray, ctx: np.ndarray, symbols: np.ndarray) -> None:
    np.add.at(freq.reshape(-1), ctx * freq.shape[1] + symbols, 2.0)


def _orient(a: np.ndarray, model: Model) -> np.ndarray:
    return np.ascontiguousarray(a.T) if model.transpose else a


def encode(grid: np.ndarray, coded: np.ndarray, clusters: int, dense: bool, model: Model
           ) -> bytes:
    """The payload coding the `coded` cells of `grid` (rows x cols values 0..clusters): a
    cell's symbol is its value when dense (zero included), else value - 1."""
    values = clusters + 1
    grid = _orient(np.asarray(grid, dtype=np.uint8), model)
    coded = _orient(coded, model)
    freq = _frequencies(values, values if dense else clusters)
    coder = constriction.stream.queue.RangeEncoder()
    if freq.shape[1] < 2:  # a one-symbol alphabet codes nothing
        return b""
    for j, rows in _lines(coded):
        ctx = _context(grid, rows, j, model, values)
        symbols = grid[rows, j].astype(np.int32) - (0 if dense else 1)
        for a in range(0, rows.size, CHUNK):
            coder.encode(symbols[a:a + CHUNK], _CATEGORICAL, freq[ctx[a:a + CHUNK]])
        _count(freq, ctx, symbols)
    return coder.get_compressed().astype("<u4").tobytes()


def decode(payload: bytes | memoryview, coded: np.ndarray, clusters: int, dense: bool,
           model: Model, what: str) -> np.ndarray:
    """The value grid (rows x cols, uint8) of a payload, given the cells it codes; zero
    elsewhere. A sparse grid's coded cells decode to nonzero values."""
    if len(payload) % 4:
        raise DczError(f"{what}: a context-coded payload is whole 32-bit words")
    values = clusters + 1
    coded = _orient(coded, model)
    grid = np.zeros(coded.shape, dtype=np.uint8)
    freq = _frequencies(values, values if dense else clusters)
    if freq.shape[1] < 2:  # a one-symbol alphabet codes nothing: every symbol is 0
        grid[coded] = 0 if dense else 1
        return _orient(grid, model)
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
    try:
        decoder = constriction.stream.queue.RangeDecoder(words)
        again = constriction.stream.queue.RangeEncoder()  # the canonical payload, for the check
        for j, rows in _lines(coded):
            ctx = _context(grid, rows, j, model, values)
            symbols = np.empty(rows.size, dtype=np.int32)
            for a in range(0, rows.size, CHUNK):
                probabilities = freq[ctx[a:a + CHUNK]]
                symbols[a:a + CHUNK] = decoder.decode(_CATEGORICAL, probabilities)
                again.encode(symbols[a:a + CHUNK], _CATEGORICAL, probabilities)
            grid[rows, j] = symbols + (0 if dense else 1)
            _count(freq, ctx, symbols)
        canonical = np.array_equal(again.get_compressed(), words)
    except (ValueError, RuntimeError, OverflowError, AssertionError) as exc:
        # constriction reports a payload no encoder could have written as AssertionError
        raise DczError(f"{what}: corrupt context-coded stream ({exc})") from None
    if not canonical:  # truncated, extended or altered: the range decoder alone cannot tell
        raise DczError(f"{what}: context-coded stream is not the encoder's payload for the "
                       "symbols it decodes to (truncated, extended or altered)")
    return _orient(grid, model)


def candidates(shape: list[int] | tuple[int, ...], rows: int, cols: int) -> list[Model]:
    """The models the writer tries for a tensor of this shape: no context, the previous element
    along either axis, and with it the element one kernel row, one kernel or one image row back."""
    far = set()
    if len(shape) >= 3:
        far |= {shape[-1], shape[-1] * shape[-2]}
    side = math.isqrt(cols)
    if side * side == cols:
        far.add(side)  # a flattened square image: the pixel above
    out = [Model(False, 0, 0), Model(False, 1, 0), Model(True, 1, 0)]
    out += [Model(False, 1, f) for f in sorted(far) if 1 < f <= min(MAX_OFFSET, cols - 1)]
    return [m for m in out if (rows if m.transpose else cols) <= MAX_STEPS]


def best(grid: np.ndarray, coded: np.ndarray, clusters: int, dense: bool,
         shape: list[int] | tuple[int, ...]) -> tuple[Model, bytes] | None:
    """The smallest of the candidate models' payloads, or None when context coding does not
    apply (too many clusters, too large a tensor for the writer to try)."""
    rows, cols = grid.shape
    if (not 1 <= clusters <= MAX_CLUSTERS or rows * cols > WRITER_MAX_CELLS
            or not 0 < np.count_nonzero(coded) <= WRITER_MAX_CODED):
        return None
    found = None
    for model in candidates(shape, rows, cols):
        payload = encode(grid, coded, clusters, dense, model)
        if found is None or len(payload) < len(found[1]):
            found = (model, payload)
    return found
