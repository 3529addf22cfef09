"""Grouped codebooks (format version 2), per-row detection and declared sharing (codec.Shared)."""
import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepcompress.formats import DczError, DczFile, codec, dcz, read, streams, write

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DATA = Path(__file__).parent / "data"
LENET = Path(__file__).parents[2] / "shared" / "data" / "lenet"


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def digest(state: dict) -> str:
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(repr((name, str(t.dtype), tuple(t.shape))).encode())
        h.update(bits(t))
    return h.hexdigest()[:16]


def per_row(rows: int, cols: int, k: int, dtype: torch.dtype = torch.float32, density: float = 1.0,
            seed: int = 0) -> torch.Tensor:
    """rows x cols with k distinct nonzero values per row (each row its own scale)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, 1, generator=g, dtype=torch.float64) + 0.5
    levels = torch.arange(1, k + 1, dtype=torch.float64) - (k + 1) / 2 + 0.25
    idx = torch.randint(0, k, (rows, cols), generator=g)
    w = (levels[idx] * scale).to(dtype)
    return torch.where(torch.rand(rows, cols, generator=g) < density, w, torch.zeros((), dtype=dtype))


def round_trip(tmp_path: Path, sd: dict) -> tuple[dict, DczFile]:
    path = tmp_path / "m.dcz"
    write(path, sd)
    f = DczFile(path)
    back = f.load()
    for name, t in sd.items():
        want = t.dense() if isinstance(t, codec.Shared) else t
        assert back[name].dtype == want.dtype and back[name].shape == want.shape, name
        assert bits(back[name]) == bits(want), name
    return back, f


# --- the target ----------------------------------------------------------------------------------

def test_16_values_per_row_take_at_most_0_6_bytes_per_weight(tmp_path):
    w = per_row(512, 1024, 16)
    assert torch.unique(w).numel() > 256  # one codebook cannot hold it
    size = write(tmp_path / "m.dcz", {"w": w})
    assert size / w.numel() <= 0.6, size / w.numel()
    _, f = round_trip(tmp_path, {"w": w})
    e = f.entries["w"]
    assert f.version == 3 and e["groups"] == 512 and e["group_rows"] == 1 and e["clusters"] == 16


def test_int8_per_channel_is_grouped_and_smaller_than_raw(tmp_path):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (256, 576), generator=g).float()
    w = q * (torch.rand(256, 1, generator=g) * 0.01)
    _, f = round_trip(tmp_path, {"w": w})
    assert f.entries["w"]["encoding"] == "shared" and f.entries["w"]["groups"] == 256
    assert f.file_bytes < 0.75 * 4 * w.numel()  # 254 values per row of 576


def test_unshared_tensors_are_rejected_cheaply(tmp_path):
    g = torch.Generator().manual_seed(2)
    for shape in [(2048, 1024), (4096, 128), (100_000, 3)]:
        w = torch.randn(shape, generator=g)
        start = time.perf_counter()
        assert codec.encode_shared(w) is None, shape
        assert time.perf_counter() - start < 1.0, shape


def test_grouped_sharing_that_does_not_pay_is_stored_raw(tmp_path):
    g = torch.Generator().manual_seed(3)  # rows of 4 distinct values: a codebook per row
    w = torch.rand(300, 1, generator=g) * torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # costs more
    _, f = round_trip(tmp_path, {"w": w})
    assert f.entries["w"]["encoding"] == "raw" and f.version == 3


# --- round trips ---------------------------------------------------------------------------------

@st.composite
def grouped_tensors(draw):
    dtype = draw(st.sampled_from(FLOATS))
    rows = draw(st.integers(0, 40))
    cols = draw(st.integers(0, 60))
    k = draw(st.integers(1, 40))
    density = draw(st.sampled_from([0.0, 0.02, 0.3, 1.0]))
    w = per_row(rows, cols, k, dtype, density, draw(st.integers(0, 2**31)))
    if rows and draw(st.booleans()):
        w[draw(st.integers(0, rows - 1))] = 0  # an all-zero row: an empty group
    extra = draw(st.sampled_from([(), (1,), (2, 1)]))
    return w.reshape(rows, *extra, cols) if extra == (1,) else w


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(grouped_tensors(), min_size=1, max_size=3))
def test_grouped_round_trip_is_bit_exact(tmp_path_factory, tensors):
    round_trip(tmp_path_factory.mktemp("g"), {f"t{i}": t for i, t in enumerate(tensors)})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grouped_tensors())
def test_row_detection_encodes_what_it_finds(tensor):
    rows = tensor.shape[0]
    if rows < 2 or tensor.numel() < 2 * rows:
        return
    name = codec.dtype_name(tensor.dtype)
    b = codec._flat(tensor).view(codec._INT_TORCH[codec.SHAREABLE[name]]).numpy()
    found = codec._row_codebooks(b, rows)
    if found is None:
        return
    codebook, index = found
    table = np.concatenate((np.zeros((rows, 1), b.dtype), codebook), axis=1)
    symbol = np.where(b != 0, index.astype(np.int64) + 1, 0)
    assert np.array_equal(table[np.repeat(np.arange(rows), b.size // rows), symbol], b)


def test_many_dtypes_grouped_and_special_values(tmp_path):
    sd = {str(d).split(".")[1]: per_row(40, 300, 10, d, 0.5, seed=i) for i, d in enumerate(FLOATS)}
    special = per_row(40, 400, 8, seed=9)
    special[3, :5] = torch.tensor([-0.0, float("nan"), float("inf"), -float("inf"), -0.0])
    sd["special"] = special
    _, f = round_trip(tmp_path, sd)
    assert all(f.entries[n].get("groups") == 40 for n in ("float32", "float64"))
    assert f.entries["special"]["groups"] == 40


def test_empty_and_single_row_tensors(tmp_path):
    sd = {"empty_rows": torch.zeros(0, 7), "empty_cols": torch.zeros(5, 0),
          "one_row": per_row(1, 5000, 16), "scalar": torch.tensor(1.5),
          "all_zero": torch.zeros(64, 64)}
    _, f = round_trip(tmp_path, sd)
    assert "groups" not in f.entries["one_row"]  # a single row gets one ordinary codebook


@pytest.mark.parametrize("layout_density", [1.0, 0.1, 0.0005])
def test_grouped_sparse_layouts(tmp_path, layout_density):
    w = per_row(300, 2000, 12, density=layout_density)
    w[7] = 0
    _, f = round_trip(tmp_path, {"w": w})
    e = f.entries["w"]
    assert e.get("groups") == 300 or e["encoding"] == "raw" or "groups" not in e
    if layout_density < 0.01:
        assert e["layout"] in ("capped", "escape")


# --- declared sharing ----------------------------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(FLOATS), shape=st.lists(st.integers(0, 30), max_size=3),
       k=st.integers(1, 256), seed=st.integers(0, 2**31), zero=st.booleans(), dup=st.booleans())
def test_declared_gives_the_bytes_detection_gives(tmp_path_factory, dtype, shape, k, seed, zero, dup):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(k, generator=g, dtype=torch.float64).to(dtype)
    if zero:
        codebook[0] = 0.0  # a centroid at zero: its members are structural zeros
    if dup and k > 1:
        codebook[-1] = codebook[-2]  # two equal centroids: one value
    index = torch.randint(-1, k, shape, generator=g)
    shared = codec.Shared(codebook, index)
    path = tmp_path_factory.mktemp("d")
    write(path / "declared.dcz", {"w": shared})
    write(path / "detected.dcz", {"w": shared.dense()})
    assert (path / "declared.dcz").read_bytes() == (path / "detected.dcz").read_bytes()
    assert bits(read(path / "declared.dcz")["w"]) == bits(shared.dense())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(FLOATS), rows=st.integers(0, 20), cols=st.integers(0, 30),
       group_rows=st.integers(1, 7), k=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_declared_grouped_round_trip(tmp_path_factory, dtype, rows, cols, group_rows, k, seed):
    group_rows = min(group_rows, max(rows, 1))
    g = torch.Generator().manual_seed(seed)
    groups = -(-rows // group_rows)
    codebook = torch.randn(groups, k, generator=g, dtype=torch.float64).to(dtype)
    if groups and k > 2:
        codebook[0, 1] = 0.0
        codebook[-1, 2] = codebook[-1, 0]
    index = torch.randint(-1, k, (rows, cols), generator=g)
    shared = codec.Shared(codebook, index, group_rows)
    _, f = round_trip(tmp_path_factory.mktemp("dg"), {"w": shared})
    e = f.entries["w"]
    if e["encoding"] == "shared" and "groups" in e:
        assert e["group_rows"] == group_rows and e["groups"] == groups


def test_declared_per_row_equals_detection(tmp_path):
    rows, cols, k = 64, 2000, 16
    g = torch.Generator().manual_seed(4)
    codebook = torch.randn(rows, k, generator=g)
    shared = codec.Shared(codebook, torch.randint(0, k, (rows, cols), generator=g))
    write(tmp_path / "a.dcz", {"w": shared})
    write(tmp_path / "b.dcz", {"w": shared.dense()})
    assert (tmp_path / "a.dcz").read_bytes() == (tmp_path / "b.dcz").read_bytes()


def test_declared_values_are_checked():
    with pytest.raises(ValueError, match="index"):
        codec.Shared(torch.ones(3), torch.tensor([0, 3])).check()
    with pytest.raises(ValueError, match="integer"):
        codec.Shared(torch.ones(3), torch.tensor([0.0])).check()
    with pytest.raises(ValueError, match="groups"):
        codec.Shared(torch.ones(3, 2), torch.zeros(7, 2, dtype=torch.long), 2).check()
    with pytest.raises(ValueError, match="float"):
        codec.Shared(torch.ones(3, dtype=torch.int32), torch.zeros(2, dtype=torch.long)).check()


def test_declared_tensors_keep_their_ties(tmp_path):
    shared = codec.Shared(torch.tensor([1.0, 2.0]), torch.tensor([[0, 1], [1, -1]]))
    write(tmp_path / "m.dcz", {"a": shared, "b": shared})
    with DczFile(tmp_path / "m.dcz") as f:
        assert f.entries["b"]["encoding"] == "alias" and f["a"] is f["b"]


def test_a_declared_codebook_over_256_values_falls_back_to_detection(tmp_path):
    shared = codec.Shared(torch.arange(1, 301).float(), torch.arange(300).repeat(40))
    _, f = round_trip(tmp_path, {"w": shared})
    assert f.entries["w"]["encoding"] == "raw"


# --- versions ------------------------------------------------------------------------------------

def test_a_version_1_file_of_the_old_writer_still_loads():
    with DczFile(DATA / "v1-layouts.dcz") as f:
        assert f.version == 1
        assert {e.get("layout", e["encoding"]) for e in f.entries.values()} >= {
            "dense", "capped", "escape", "alias", "raw"}
        state = f.load()
    assert digest(state) == "64a33e0489e4f9a8"  # as the version 1 reader decoded it
    assert state["dense"] is state["dense_tied"]


def test_the_writer_rewrites_a_version_1_file_no_larger_stream_by_stream(tmp_path):
    """Version 3 rewrites the same weights bit-exactly, each tensor's streams no larger (dead
    lines and context coding only replace a layout or coding when they are smaller)."""
    with DczFile(DATA / "v1-layouts.dcz") as f:
        state, meta, entries = f.load(), f.metadata, f.entries
    write(tmp_path / "again.dcz", state, meta)
    with DczFile(tmp_path / "again.dcz") as g:
        assert g.version == 3 and g.metadata == meta
        assert g.overhead_bytes < f.overhead_bytes
        assert digest(g.load()) == digest(state)
        for name, e in entries.items():
            size = sum(s["length"] for s in e.get("streams", {}).values())
            assert sum(s["length"] for s in g.entries[name].get("streams", {}).values()) <= size
            assert g.entries[name]["encoding"] == e["encoding"], name


@pytest.mark.skipif(not LENET.is_dir(), reason="shared LeNet files not present")
@pytest.mark.parametrize("name,expected", [("lenet300-v1.dcz", "c4f23bb0670dba4e"),
                                           ("lenet5-v1.dcz", "9e00ee5e7dba00a4")])
def test_the_shared_lenet_v1_files_load_bit_exactly(name, expected):
    assert digest(read(LENET / name)) == expected  # digests from the version 1 reader


def test_the_writer_writes_version_3_grouped_or_not(tmp_path):
    write(tmp_path / "plain.dcz", {"w": per_row(10, 10, 3), "b": torch.randn(5)})
    write(tmp_path / "grouped.dcz", {"w": per_row(64, 1024, 16)})
    assert (tmp_path / "plain.dcz").read_bytes()[8:12] == b"\x03\x00\x00\x00"
    assert (tmp_path / "grouped.dcz").read_bytes()[8:12] == b"\x03\x00\x00\x00"
    with DczFile(tmp_path / "grouped.dcz") as f:
        assert f.version == 3 and f.entries["w"]["groups"] == 64


def test_decode_cost_bounds_a_grouped_decode(tmp_path):
    import tracemalloc

    w = per_row(256, 4096, 16, density=0.05)
    write(tmp_path / "m.dcz", {"w": w})
    with DczFile(tmp_path / "m.dcz") as f:
        cost = dcz.decode_cost(f.entries["w"])
        tracemalloc.start()
        f.decode("w")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= cost, (peak, cost)


def test_a_grouped_decode_over_budget_is_refused(tmp_path):
    write(tmp_path / "m.dcz", {"w": per_row(256, 4096, 16)})
    with pytest.raises(DczError, match="memory budget"):
        read(tmp_path / "m.dcz", max_bytes=1 << 20)


def test_a_large_dense_tensor_decodes_into_its_output(tmp_path):
    g = torch.Generator().manual_seed(3)
    codebook = torch.linspace(-1, 1, 15)
    w = codebook[torch.randint(0, 15, (1200, 1500), generator=g)]  # 7.2 MB: a mapped output
    w[::7] = 0
    write(tmp_path / "big.dcz", {"w": w})
    with DczFile(tmp_path / "big.dcz") as f:
        assert f.entries["w"]["layout"] == "dense"
        got = f.load()["w"]
    assert bits(got) == bits(w)
    got += 1  # an ordinary writable tensor
    assert torch.equal(got, w + 1)


def _dense_fields(symbols: np.ndarray, k: int) -> tuple[dict, dict]:
    s = streams.encode(symbols)
    fields = {"encoding": "shared", "layout": "dense", "clusters": k,
              "nonzero": int(np.count_nonzero(symbols))}
    cb = np.arange(1, k + 1, dtype=np.float32).view(np.uint8).tobytes()
    return fields, {"codebook": ("raw", len(cb), cb), "index": (s.coding, s.count, s.payload)}


@pytest.mark.parametrize("where", [0, 70_000, 299_999])
def test_a_dense_symbol_past_the_codebook_is_refused_in_any_chunk(where):
    symbols = np.random.default_rng(0).integers(0, 5, 300_000).astype(np.uint8)
    symbols[where] = 5  # K = 4: symbols 0..4 only
    fields, payloads = _dense_fields(symbols, 4)
    with pytest.raises(DczError, match="past the codebook"):
        codec.decode_tensor(fields, "float32", [300_000], payloads, "t")
    fields["nonzero"] -= 1
    symbols[where] = 0
    fields, payloads = _dense_fields(symbols, 4)
    fields["nonzero"] += 1
    with pytest.raises(DczError, match="different number of nonzeros"):
        codec.decode_tensor(fields, "float32", [300_000], payloads, "t")


# --- dead lines and context-coded indices (SPEC.md, version 3) -----------------------------------

def pruned_smooth(rows: int, cols: int, k: int = 8, density: float = 0.3, dead_rows: int = 0,
                  dead_cols: int = 0, seed: int = 0) -> torch.Tensor:
    """k values whose neighbours along a row tend to agree, pruned, with whole dead lines."""
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.integers(-1, 2, size=(rows, cols)), axis=1) % k
    w = (walk - k / 2 + 0.5) / k
    w[rng.random((rows, cols)) > density] = 0
    w[rng.choice(rows, dead_rows, replace=False)] = 0
    w[:, rng.choice(cols, dead_cols, replace=False)] = 0
    return torch.from_numpy(w.astype(np.float32))


def plain_bytes(w: torch.Tensor) -> int:
    """Stream bytes of w's shared entry without dead lines or context coding: one group of all
    its rows has the same codebook and layouts, and grouped entries use neither."""
    flat = w.reshape(-1).numpy()
    positions = np.flatnonzero(flat)
    values, index = np.unique(flat[positions], return_inverse=True)
    return codec._shared_streams(values.reshape(1, -1).view(np.int32), positions,
                                 index.astype(np.uint8), tuple(w.shape), (1, w.shape[0])).nbytes


def entry_bytes(f: DczFile, name: str) -> int:
    return sum(s["length"] for s in f.entries[name]["streams"].values())


def test_dead_rows_and_columns_are_left_out(tmp_path):
    w = pruned_smooth(200, 300, density=0.05, dead_rows=60, dead_cols=150)
    _, f = round_trip(tmp_path, {"w": w})
    e = f.entries["w"]
    assert e.get("lines") is True and {"rows", "cols"} <= set(e["streams"])
    assert entry_bytes(f, "w") < 0.9 * plain_bytes(w)


def test_context_coded_indices_are_smaller_when_neighbours_agree(tmp_path):
    w = pruned_smooth(64, 512, density=0.9)
    _, f = round_trip(tmp_path, {"w": w})
    e = f.entries["w"]
    assert "context" in e and e["streams"]["index"]["coding"] == "context"
    assert e["context"][2] == 0 or e["context"][1] == 1  # a neighbour along the row
    assert entry_bytes(f, "w") < 0.85 * plain_bytes(w)  # the best of huffman and zstd: 0.81x


def test_tensors_too_large_to_try_are_not_context_coded(tmp_path, monkeypatch):
    monkeypatch.setattr(codec.context, "WRITER_MAX_CELLS", 1000)
    w = pruned_smooth(64, 512, density=0.6)
    _, f = round_trip(tmp_path, {"w": w})
    assert "context" not in f.entries["w"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), k=st.integers(1, 20),
       density=st.floats(0.0, 1.0), dead_rows=st.integers(0, 5), dead_cols=st.integers(0, 5),
       seed=st.integers(0, 1000))
def test_lines_and_context_round_trip(tmp_path, rows, cols, k, density, dead_rows, dead_cols,
                                      seed):
    w = pruned_smooth(rows, cols, k, density, min(dead_rows, rows), min(dead_cols, cols), seed)
    round_trip(tmp_path, {"w": w, "w3": w.reshape(rows, 1, cols), "v": w.reshape(-1)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("numel", [1, 2, 4097, 70001])  # 70001: a second chunk of odd length
def test_dense_indices_looked_up_in_pairs_decode_bit_exact(dtype, numel, monkeypatch, tmp_path):
    monkeypatch.setattr(codec, "_PAIRS_FROM", 1)  # every dense tensor takes the pair path
    g = torch.Generator().manual_seed(numel)
    book = torch.randn(15, generator=g).to(dtype)
    idx = torch.randint(1, 16, (numel,), generator=g)  # every element a codebook value: dense
    w = book[idx - 1]
    write(tmp_path / "w.dcz", {"w": w})
    with DczFile(tmp_path / "w.dcz") as f:
        assert numel < 3 or f.entries["w"]["layout"] == "dense"
    back = read(tmp_path / "w.dcz")["w"]
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), w.view(torch.uint8))
