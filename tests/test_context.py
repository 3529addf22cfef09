"""Context-modelled range coding of cluster indices (formats/context.py, SPEC.md 2.5)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from deepcompress.formats import DczError, context

MODELS = [context.Model(False, 0, 0), context.Model(False, 1, 0), context.Model(True, 1, 0),
          context.Model(False, 1, 3), context.Model(True, 2, 1)]


def smooth(rows: int, cols: int, k: int, density: float, seed: int = 0) -> np.ndarray:
    """Values 0..k whose neighbours along a row tend to agree, as pruned smooth weights do."""
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.integers(-1, 2, size=(rows, cols)), axis=1)
    grid = (walk % k + 1).astype(np.uint8)
    grid[rng.random((rows, cols)) > density] = 0
    return grid


@settings(max_examples=60, deadline=None)
@given(grid=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, max_side=24),
                       elements=st.integers(0, 16)),
       dense=st.booleans(), model=st.sampled_from(MODELS))
def test_round_trip(grid, dense, model):
    k = max(int(grid.max()), 1)
    coded = np.ones(grid.shape, dtype=bool) if dense else grid != 0
    payload = context.encode(grid, coded, k, dense, model)
    back = context.decode(payload, coded, k, dense, model, "t")
    assert np.array_equal(back, grid)
    assert back.dtype == np.uint8


def test_dense_round_trip_keeps_zeros_and_sparse_codes_only_nonzeros():
    grid = smooth(30, 50, 8, 0.3)
    coded = grid != 0
    sparse = context.encode(grid, coded, 8, False, MODELS[1])
    dense = context.encode(grid, np.ones_like(coded), 8, True, MODELS[1])
    assert np.array_equal(context.decode(sparse, coded, 8, False, MODELS[1], "t"), grid)
    assert np.array_equal(context.decode(dense, np.ones_like(coded), 8, True, MODELS[1], "t"),
                          grid)


def test_context_pays_when_neighbours_agree():
    grid = smooth(64, 256, 8, 0.5)
    coded = grid != 0
    plain = context.encode(grid, coded, 8, False, context.Model(False, 0, 0))
    left = context.encode(grid, coded, 8, False, context.Model(False, 1, 0))
    assert len(left) < 0.8 * len(plain)


def test_one_cluster_codes_nothing():
    grid = np.ones((4, 5), dtype=np.uint8)
    payload = context.encode(grid, grid != 0, 1, False, MODELS[1])
    assert payload == b""
    assert np.array_equal(context.decode(payload, grid != 0, 1, False, MODELS[1], "t"), grid)


def test_long_lines_are_coded_in_chunks():
    grid = smooth(40000, 2, 4, 0.9)
    coded = grid != 0
    model = context.Model(False, 1, 0)
    payload = context.encode(grid, coded, 4, False, model)
    assert np.array_equal(context.decode(payload, coded, 4, False, model, "t"), grid)


def test_best_picks_the_smallest_candidate():
    grid = smooth(20, 100, 8, 0.6)
    coded = grid != 0
    model, payload = context.best(grid, coded, 8, False, (20, 100))
    for m in context.candidates((20, 100), 20, 100):
        assert len(payload) <= len(context.encode(grid, coded, 8, False, m))
    assert context.best(grid, coded, 17, False, (20, 100)) is None  # too many clusters


def test_candidates_follow_the_shape():
    conv = context.candidates((50, 20, 5, 5), 50, 500)
    assert context.Model(False, 1, 5) in conv and context.Model(False, 1, 25) in conv
    image = context.candidates((300, 784), 300, 784)
    assert context.Model(False, 1, 28) in image


def test_garbage_payload_decodes_to_valid_symbols_or_fails_typed():
    rng = np.random.default_rng(1)
    coded = np.ones((8, 8), dtype=bool)
    for _ in range(50):
        payload = rng.integers(0, 256, size=4 * int(rng.integers(0, 6)), dtype=np.uint8).tobytes()
        try:
            grid = context.decode(payload, coded, 5, True, MODELS[2], "t")
        except DczError:
            continue
        assert grid.max() <= 5


def test_a_payload_other_than_the_encoders_is_refused():
    rng = np.random.default_rng(2)
    grid = rng.integers(0, 6, size=(40, 50)).astype(np.uint8)
    coded = np.ones(grid.shape, dtype=bool)
    payload = context.encode(grid, coded, 5, True, MODELS[1])
    assert np.array_equal(context.decode(payload, coded, 5, True, MODELS[1], "t"), grid)
    words = len(payload) // 4
    for forged in (payload[:-4], payload[:4 * (words // 2)], payload + b"\x00" * 4,
                   payload + payload[-4:], payload[:-4] + bytes(4)):
        with pytest.raises(DczError, match="t: context-coded"):
            context.decode(forged, coded, 5, True, MODELS[1], "t")


def test_payload_must_be_whole_words():
    with pytest.raises(DczError, match="32-bit words"):
        context.decode(b"\x00\x01\x02", np.ones((2, 2), dtype=bool), 3, True, MODELS[0], "t")


@pytest.mark.parametrize("rows, cols, k, model", [
    (4, 4, 17, MODELS[0]),  # too many clusters
    (1, (1 << 16) + 1, 2, MODELS[0]),  # too many lines along the step axis
    ((1 << 16) + 1, 1, 2, MODELS[2]),  # the same, transposed
    (1 << 13, 1 << 12, 2, MODELS[0]),  # too many elements
    (4, 4, 2, context.Model(False, 256, 0)),  # offset out of range
])
def test_limits(rows, cols, k, model):
    with pytest.raises(DczError):
        context.check(rows, cols, k, model, "t")
