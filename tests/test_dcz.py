"""The .dcz container: bit-exact round trips, detected sharing, ties, random access, and a reader
that answers every malformed file with DczError and nothing else."""
import json
import random
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepcompress.formats import DczError, DczFile, dcz, read, write

sys.path.insert(0, str(Path(__file__).parent))
import forge  # noqa: E402
from forge import Forged  # noqa: E402

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def bits(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_identical(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert bits(a[k]) == bits(b[k]), k


@st.composite
def shared_tensors(draw):
    dtype = draw(st.sampled_from(FLOATS))
    shape = draw(st.lists(st.integers(0, 40), min_size=0, max_size=3))
    density = draw(st.floats(0, 1))
    clusters = draw(st.integers(1, 256))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(clusters, generator=g, dtype=torch.float64).to(dtype)
    codebook = codebook[codebook != 0] if (codebook != 0).any() else torch.ones(1, dtype=dtype)
    idx = torch.randint(0, codebook.numel(), shape, generator=g)
    keep = torch.rand(shape, generator=g) < density
    return torch.where(keep, codebook[idx], torch.zeros((), dtype=dtype))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(shared_tensors(), min_size=1, max_size=4))
def test_round_trip_is_bit_exact(tmp_path_factory, tensors):
    path = tmp_path_factory.mktemp("rt") / "m.dcz"
    sd = {f"t{i}": t for i, t in enumerate(tensors)}
    write(path, sd)
    assert_identical(sd, read(path))


def test_every_dtype_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {
        "f32": torch.randn(50, 7, generator=g),
        "f16": torch.randn(33, generator=g).half(),
        "bf16": torch.randn(4, 4, 4, generator=g).bfloat16(),
        "f64": torch.randn(9, generator=g).double(),
        "i64": torch.randint(-2**40, 2**40, (100,), generator=g),
        "i32": torch.randint(-5, 5, (3, 3), generator=g, dtype=torch.int32),
        "i8": torch.randint(-128, 127, (17,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (17,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(31, generator=g) > 0.5,
        "c64": torch.randn(5, dtype=torch.complex64, generator=g),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "num_batches_tracked": torch.tensor(7),
    }
    write(tmp_path / "m.dcz", sd)
    assert_identical(sd, read(tmp_path / "m.dcz"))


def test_special_values_keep_their_bits(tmp_path):
    values = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.0, 0.0])
    nan2 = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)
    values = torch.cat([values, nan2])
    t = values[torch.randint(0, 8, (20000,), generator=torch.Generator().manual_seed(0))]
    write(tmp_path / "m.dcz", {"t": t})
    with DczFile(tmp_path / "m.dcz") as f:
        assert f.entries["t"]["encoding"] == "shared"
        assert bits(f["t"]) == bits(t)


def test_sharing_is_detected_not_declared(tmp_path):
    g = torch.Generator().manual_seed(1)
    codebook = torch.randn(256, generator=g)
    shared = codebook[torch.randint(0, 256, (200, 400), generator=g)]
    shared[torch.rand(200, 400, generator=g) < 0.7] = 0
    dense = torch.randn(200, 400, generator=g)
    write(tmp_path / "m.dcz", {"shared": shared, "dense": dense})
    with DczFile(tmp_path / "m.dcz") as f:
        assert f.entries["shared"]["encoding"] == "shared"
        assert f.entries["shared"]["clusters"] == 256
        assert f.entries["dense"]["encoding"] == "raw"
        assert_identical({"shared": shared, "dense": dense}, dict(f.load()))


def test_layout_follows_density(tmp_path):
    g = torch.Generator().manual_seed(2)
    cb = torch.tensor([-1.0, 0.5, 2.0])
    full = cb[torch.randint(0, 3, (300, 300), generator=g)]
    sparse = torch.where(torch.rand(300, 300, generator=g) < 0.003, full, 0.0)
    write(tmp_path / "m.dcz", {"full": full, "sparse": sparse})
    with DczFile(tmp_path / "m.dcz") as f:
        assert f.entries["full"]["layout"] == "dense"
        assert f.entries["sparse"]["layout"] in ("capped", "escape")
        assert f.entries["sparse"]["nonzero"] == int((sparse != 0).sum())


def test_tied_tensors_are_stored_once_and_restored_tied(tmp_path):
    emb = torch.nn.Embedding(100, 16)
    head = torch.nn.Linear(16, 100, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    write(tmp_path / "m.dcz", model.state_dict())
    with DczFile(tmp_path / "m.dcz") as f:
        assert f.entries["head.weight"]["encoding"] == "alias"
    out = read(tmp_path / "m.dcz")
    assert out["emb.weight"] is out["head.weight"]
    assert torch.equal(out["emb.weight"], emb.weight)
    alone = read(tmp_path / "m.dcz", names=["head.weight"])
    assert torch.equal(alone["head.weight"], emb.weight)


def test_freed_tensors_from_an_iterator_are_not_ties(tmp_path):
    def items():
        for i in range(20):
            yield f"t{i}", torch.full((1000,), float(i))  # freed memory gets reused

    write(tmp_path / "m.dcz", items())
    out = read(tmp_path / "m.dcz")
    assert all(torch.equal(out[f"t{i}"], torch.full((1000,), float(i))) for i in range(20))


def test_random_access_reads_only_what_is_asked(tmp_path):
    path = tmp_path / "m.dcz"
    write(path, {"a": torch.randn(1000), "b": torch.randn(1000)})
    with DczFile(path) as f:
        s = f.entries["a"]["streams"]["data"]
    data = bytearray(path.read_bytes())
    data[s["offset"] + 3] ^= 0x10  # corrupt tensor a only
    path.write_bytes(bytes(data))
    assert set(read(path, names=["b"])) == {"b"}
    with DczFile(path) as lazy:
        assert lazy["b"].shape == (1000,)
        with pytest.raises(DczError, match="'a'.*checksum"):
            lazy["a"]
    with pytest.raises(KeyError):
        read(path, names=["nope"])


def test_write_is_atomic(tmp_path):
    path = tmp_path / "m.dcz"

    def items():
        yield "ok", torch.ones(3)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write(path, items())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):
        write(path, {"a": torch.ones(2), "b": "not a tensor"})
    assert list(tmp_path.iterdir()) == []


# --- untrusted input ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> bytes:
    g = torch.Generator().manual_seed(3)
    cb = torch.randn(16, generator=g)
    w = torch.where(torch.rand(40, 30, generator=g) < 0.2,
                    cb[torch.randint(0, 16, (40, 30), generator=g)], 0.0)
    sd = {"w": w, "b": torch.randn(30, generator=g), "n": torch.tensor(5),
          "d": cb[torch.randint(0, 16, (20, 20), generator=g)]}
    path = tmp_path_factory.mktemp("small") / "s.dcz"
    with forge.without_v3_coding():  # the forgeries below edit huffman and raw index streams
        write(path, sd, {"note": "fuzz"})
    return path.read_bytes()


def load_bytes(tmp_path, data: bytes) -> dict:
    path = tmp_path / "x.dcz"
    path.write_bytes(data)
    return read(path)


def test_every_truncation_is_rejected(tmp_path, small_file):
    for n in range(len(small_file)):
        with pytest.raises(DczError):
            load_bytes(tmp_path, small_file[:n])


def test_random_byte_flips_are_detected(tmp_path, small_file):
    rng = random.Random(1234)
    for _ in range(2000):
        data = bytearray(small_file)
        i = rng.randrange(len(data))
        data[i] ^= rng.randrange(1, 256)
        with pytest.raises(DczError):
            load_bytes(tmp_path, bytes(data))


def test_every_single_bit_flip_is_detected(tmp_path, small_file):
    for i in range(0, len(small_file) * 8, 7):
        data = bytearray(small_file)
        data[i // 8] ^= 1 << (i % 8)
        with pytest.raises(DczError):
            load_bytes(tmp_path, bytes(data))


def as_version(data: bytes, version: int) -> bytes:
    """The same file written as another format version (checksums recomputed)."""
    f = Forged.parse(data)
    f.set_version(version)
    return f.to_bytes()


@pytest.fixture(scope="module")
def small_file_v2(small_file) -> bytes:
    return as_version(small_file, 2)


def repack(data: bytes, edit) -> bytes:
    """Apply `edit` to the decoded header of a version 1 or 2 file and rebuild the file with
    valid header and trailer checksums (the stream records are left as edited)."""
    h_off, h_len, _, _, _ = dcz.TRAILER.unpack(data[-dcz.TRAILER.size:])
    dictionary = zstandard.ZstdCompressionDict(dcz.HEADER_DICTIONARY,
                                               dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    doc = json.loads(zstandard.ZstdDecompressor(dict_data=dictionary).decompress(
        data[h_off:h_off + h_len]))
    edit(doc)
    raw = json.dumps(doc).encode()
    header = zstandard.ZstdCompressor(dict_data=dictionary).compress(raw)
    body = struct.pack("<QQQI", h_off, len(header), len(raw), zlib.crc32(header))
    return data[:h_off] + header + body + struct.pack("<I", zlib.crc32(body))


def repack3(data: bytes, edit=None, compact=None) -> bytes:
    """Apply `edit` to the expanded header of a version 3 file (the compact header is made from
    it by tests/forge.py, lengths and checksums recomputed) and `compact` to the compact array."""
    f = Forged.parse(data)
    if edit is not None:
        edit(f.doc)
    if compact is not None:
        f.compact_edits.append(compact)
    return f.to_bytes()


def entry(doc, name):
    return next(e for e in doc["tensors"] if e["name"] == name)


FORGERIES = {
    "huge tensor": lambda d: entry(d, "b").update(shape=[10**6, 10**6]),
    "huge sparse tensor": lambda d: entry(d, "w").update(shape=[10**6, 10**6]),
    "longer stream": lambda d: entry(d, "b")["streams"]["data"].update(
        length=entry(d, "b")["streams"]["data"]["length"] + 1),
    "shifted offset": lambda d: entry(d, "w")["streams"]["index"].update(
        offset=entry(d, "w")["streams"]["index"]["offset"] + 1),
    "overlap": lambda d: entry(d, "w")["streams"]["gaps"].update(
        offset=entry(d, "w")["streams"]["index"]["offset"]),
    "wrong count": lambda d: entry(d, "w")["streams"]["index"].update(count=3),
    "more nonzeros": lambda d: entry(d, "w").update(nonzero=entry(d, "w")["nonzero"] + 1),
    "fewer clusters": lambda d: entry(d, "w").update(clusters=2),
    "unknown dtype": lambda d: entry(d, "b").update(dtype="float128"),
    "negative dim": lambda d: entry(d, "b").update(shape=[-30]),
    "float dim": lambda d: entry(d, "b").update(shape=[30.0]),
    "unknown coding": lambda d: entry(d, "w")["streams"]["index"].update(coding="lzma"),
    "missing stream": lambda d: entry(d, "w")["streams"].pop("gaps"),
    "extra field": lambda d: entry(d, "b").update(pickle="cos\nsystem\n"),
    "bad alias": lambda d: d["tensors"].append(
        {"name": "z", "dtype": "float32", "shape": [30], "encoding": "alias", "alias_of": "q"}),
    "alias shape": lambda d: d["tensors"].append(
        {"name": "z", "dtype": "float32", "shape": [31], "encoding": "alias", "alias_of": "b"}),
    "duplicate name": lambda d: d["tensors"].append(dict(entry(d, "b"))),
    "gap bits": lambda d: entry(d, "w").update(gap_bits=9),
    "layout": lambda d: entry(d, "w").update(layout="escape"),
    "no tensors": lambda d: d.pop("tensors"),
    "tensors not a list": lambda d: d.update(tensors={"a": 1}),
    # values of the wrong kind must be refused by the schema, not crash a lookup
    "dtype is a list": lambda d: entry(d, "b").update(dtype=["float32"]),
    "alias_of is a list": lambda d: d["tensors"].append(
        {"name": "z", "dtype": "float32", "shape": [30], "encoding": "alias", "alias_of": ["b"]}),
    "layout is an object": lambda d: entry(d, "w").update(layout={"capped": 1}),
    "coding is a list": lambda d: entry(d, "w")["streams"]["index"].update(coding=["raw"]),
    "encoding is a list": lambda d: entry(d, "b").update(encoding=["raw"]),
    "shuffle is an int": lambda d: entry(d, "b").update(shuffle=1),
    "count is a bool": lambda d: entry(d, "b")["streams"]["data"].update(count=True),
    "name with a lone surrogate": lambda d: entry(d, "b").update(name="b\ud800"),
    "program is null": lambda d: d.update(program=None),
    "program is not a record": lambda d: d.update(program=[1, 2]),
    "NaN in metadata": lambda d: d["metadata"].update(x=float("nan")),
    "Infinity in metadata": lambda d: d["metadata"].update(x=float("inf")),
    "shape overflows torch": lambda d: entry(d, "b").update(shape=[2**62, 4, 0]),
}


# offsets and lengths that a version 3 header implies (and the forger recomputes), and a
# shuffle flag that version 3 writes as 0 or 1
V2_ONLY = {"longer stream", "shifted offset", "overlap", "shuffle is an int"}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_headers_are_rejected(tmp_path, small_file, small_file_v2, name):
    with pytest.raises(DczError):
        load_bytes(tmp_path, repack(small_file_v2, FORGERIES[name]))
    if name not in V2_ONLY:
        with pytest.raises(DczError):
            load_bytes(tmp_path, repack3(small_file, FORGERIES[name]))


def _at(*path):
    def get(t):
        for p in path:
            t = t[p]
        return t
    return get


# version 3: edits of the compact header [tensors, metadata]; tensor 0 is "w" (capped): [name,
# 2, dtype, shape, gap_bits, nonzero, clusters, crc32, codebook, index, gaps]
COMPACT_FORGERIES = {
    "longer stream": lambda t: t[0][1][6].__setitem__(0, t[0][1][6][0] + 1),
    "shorter stream": lambda t: t[0][0][8].__setitem__(0, t[0][0][8][0] - 1),
    "lengths moved between streams": lambda t: (
        t[0][0][8].__setitem__(0, t[0][0][8][0] + 1), t[0][0][9].__setitem__(0, t[0][0][9][0] - 1)),
    "entry crc": lambda t: t[0][0].__setitem__(7, (t[0][0][7] + 1) % (1 << 32)),
    "a derived count stated": lambda t: t[0][0][9].append(t[0][0][5]),
    "an explicit count left out": lambda t: t[0][0][10].pop(),
    "a stream crc32 as in version 2": lambda t: t[0][0][8].insert(1, 0),
    "coding code 4": lambda t: t[0][0][9].__setitem__(1, 4),
    "coding code a string": lambda t: t[0][0][9].__setitem__(1, "raw"),
    "dtype code 14": lambda t: t[0][0].__setitem__(2, 14),
    "dtype code a string": lambda t: t[0][0].__setitem__(2, "float32"),
    "encoding code 4": lambda t: t[0][0].__setitem__(1, 4),
    "layout code 10": lambda t: t[0][0].__setitem__(4, 10),
    "layout code dense with 3 streams": lambda t: t[0][0].__setitem__(4, 0),
    "escape code with 3 streams": lambda t: t[0][0].__setitem__(4, 9),
    "raw shuffle 2": lambda t: t[0][1].__setitem__(4, 2),
    "raw shuffle true": lambda t: t[0][1].__setitem__(4, True),
    "alias of a later tensor": lambda t: t[0].append(["z", 0, 4]),
    "alias of itself": lambda t: t[0].append(["z", 0, 4]),
    "alias with a shape": lambda t: t[0].append(["z", 0, 1, [30]]),
    "header an object": lambda t: (t.clear(), t.append({"tensors": [], "metadata": {}})),
    "program is null": lambda t: t.append(None),
    "program without crc32": lambda t: t.append([0, 0, 0]),
}


@pytest.mark.parametrize("name", sorted(COMPACT_FORGERIES))
def test_forged_compact_headers_are_rejected(tmp_path, small_file, name):
    with pytest.raises(DczError):
        load_bytes(tmp_path, repack3(small_file, compact=COMPACT_FORGERIES[name]))


def test_the_small_file_is_version_3_and_its_entries_are_as_the_forgeries_assume(small_file):
    assert small_file[8:12] == b"\x03\x00\x00\x00"
    top = Forged.parse(small_file).compact()
    assert [c[0] for c in top[0]] == ["w", "b", "n", "d"] and top[0][0][4] in range(1, 9)
    assert top[0][1][1] == 1 and len(top[0][0]) == 11


def test_a_version_3_header_without_a_declared_size_is_refused(tmp_path, small_file):
    f = Forged.parse(small_file)
    f.header_frame = zstandard.ZstdCompressor(dict_data=dcz._HEADER_DICT_3, write_dict_id=False,
                                              write_content_size=False).compress(f.header_json())
    with pytest.raises(DczError, match="content size"):
        load_bytes(tmp_path, f.to_bytes())


def test_huge_numbers_and_deep_nesting_in_the_header_are_refused(tmp_path, small_file):
    for raw in (b'{"tensors":[],"metadata":{"x":1e999}}', b"[" * 100_000 + b"]" * 100_000,
                b'{"tensors":[],"metadata":{"x":' + b"[0," * 2_000_000 + b"0" + b"]" * 2_000_000
                + b"}}"):
        with pytest.raises(DczError, match="header"):
            dcz.parse_header(raw)


def test_a_huge_decode_is_refused_before_allocating(tmp_path):
    path = tmp_path / "big.dcz"
    write(path, {"w": torch.randn(1000, 1000)})
    with pytest.raises(DczError, match="memory budget"):
        read(path, max_bytes=1 << 20)
    with DczFile(path, max_bytes=1 << 20) as f, pytest.raises(DczError, match="big.dcz.*'w'"):
        f["w"]
    assert read(path, max_bytes=1 << 30)["w"].shape == (1000, 1000)


@pytest.mark.parametrize("version", [2, 3])
def test_a_bool_byte_other_than_0_or_1_is_refused(tmp_path, version):
    path = tmp_path / "b.dcz"
    write(path, {"m": torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0]).bool()})
    f = Forged.read(path)
    f.set_version(version)
    assert f.doc["tensors"][0]["streams"]["data"]["coding"] == "raw"
    data = bytearray(f.payloads[(0, "data")])
    data[5] = 2
    f.set_stream((0, "data"), bytes(data))  # checksums recomputed
    with pytest.raises(DczError, match="bool"):
        load_bytes(tmp_path, f.to_bytes())


def test_empty_tensors_with_huge_dims_load(tmp_path):
    sd = {"e": torch.empty(2**40, 0, 3), "f": torch.zeros(0, 2**20)}
    write(tmp_path / "e.dcz", sd)
    back = read(tmp_path / "e.dcz")
    assert back["e"].shape == (2**40, 0, 3) and back["f"].shape == (0, 2**20)


def test_fixture_uses_a_sparse_layout(tmp_path, small_file):
    path = tmp_path / "x.dcz"
    path.write_bytes(small_file)
    with DczFile(path) as f:
        assert f.entries["w"]["layout"] == "capped" and f.entries["d"]["layout"] == "dense"


def test_repack_without_edit_still_loads(tmp_path, small_file, small_file_v2):
    want = load_bytes(tmp_path, small_file)
    assert set(want) == {"w", "b", "n", "d"}
    for data in (repack(small_file_v2, lambda d: None), repack3(small_file), small_file_v2,
                 as_version(small_file, 1)):
        assert_identical(load_bytes(tmp_path, data), want)
    assert repack3(small_file) == small_file  # the forger writes what the writer writes


def test_declared_huge_header_is_refused(tmp_path, small_file_v2):
    data = bytearray(small_file_v2)
    h_off, h_len, _, h_crc, _ = dcz.TRAILER.unpack(data[-dcz.TRAILER.size:])
    body = struct.pack("<QQQI", h_off, h_len, 10**12, h_crc)
    data[-dcz.TRAILER.size:] = body + struct.pack("<I", zlib.crc32(body))
    with pytest.raises(DczError, match="header"):
        load_bytes(tmp_path, bytes(data))


def test_wrong_magic_and_future_version(tmp_path, small_file):
    with pytest.raises(DczError, match="magic"):
        load_bytes(tmp_path, b"PK\x03\x04" + small_file[4:])
    head = dcz.MAGIC + struct.pack("<I", 4)
    future = head + struct.pack("<I", zlib.crc32(head)) + small_file[16:]
    with pytest.raises(DczError, match="version 4"):
        load_bytes(tmp_path, future)
    with pytest.raises(DczError):
        load_bytes(tmp_path, b"")


def test_pickle_file_is_not_a_dcz(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(3)}, path)
    with pytest.raises(DczError, match="magic"):
        read(path)


def test_reader_limit_is_configurable(tmp_path):
    write(tmp_path / "m.dcz", {"a": torch.zeros(1000)})
    with pytest.raises(DczError, match="limit"):
        read(tmp_path / "m.dcz", max_elements=999)
    assert np.count_nonzero(read(tmp_path / "m.dcz")["a"].numpy()) == 0


def test_header_dictionary_matches_the_spec():
    import hashlib
    import re
    from pathlib import Path

    spec = (Path(dcz.__file__).parent / "SPEC.md").read_text()
    digest = re.search(r"SHA-256\s+`([0-9a-f]{64})`", spec).group(1)
    assert hashlib.sha256(dcz.HEADER_DICTIONARY).hexdigest() == digest
    assert len(dcz.HEADER_DICTIONARY) == 1877
    folded = spec.split("## Appendix A")[1].split("```")[1]
    assert folded.replace("\n", "").encode() == dcz.HEADER_DICTIONARY


def test_large_raw_tensors_round_trip(tmp_path):
    g = torch.Generator().manual_seed(5)
    sd = {"smooth": torch.randn(700, 1000, generator=g).cumsum(1),  # compressible: zstd, shuffled
          "noise": torch.randint(-2**31, 2**31 - 1, (600_000,), generator=g, dtype=torch.int32)
          .view(torch.float32),  # incompressible: stored as it is
          "half": torch.randn(1_100_000, generator=g).half()}
    write(tmp_path / "m.dcz", sd)
    with DczFile(tmp_path / "m.dcz") as f:
        assert f.entries["smooth"]["shuffle"] and f.entries["smooth"]["streams"]["data"]["coding"] == "zstd"
        assert f.entries["noise"]["streams"]["data"]["coding"] == "raw"
        assert_identical(sd, dict(f.load()))


def test_version_3_header_dictionary_matches_the_spec():
    import hashlib

    spec = (Path(dcz.__file__).parent / "SPEC.md").read_text()
    appendix = spec.split("## Appendix B")[1]
    digest = appendix.split("SHA-256")[1].split("`")[1]
    assert hashlib.sha256(dcz.HEADER_DICTIONARY_3).hexdigest() == digest
    assert len(dcz.HEADER_DICTIONARY_3) == 2048 and "2,048 bytes" in appendix


def test_one_checksum_per_tensor_covers_all_its_streams(tmp_path, small_file):
    path = tmp_path / "s.dcz"
    path.write_bytes(small_file)
    with DczFile(path) as f:
        recs = f.entries["w"]["streams"]
        assert all(s["crc32"] is None for s in recs.values()) and "crc32" in f.entries["w"]
        last = recs["gaps"]
    for at in (recs["codebook"]["offset"], last["offset"] + last["length"] - 1):
        data = bytearray(small_file)
        data[at] ^= 1
        path.write_bytes(bytes(data))
        with DczFile(path) as f:
            assert f["b"].shape == (30,)  # the other tensors still load
            for stream in recs:  # any one stream of the tensor: the whole tensor is checked
                with pytest.raises(DczError, match="tensor 'w': checksum mismatch"):
                    f.payload("w", stream)
            with pytest.raises(DczError, match="'w': checksum"):
                f["w"]


LENET = Path(__file__).parents[2] / "shared" / "data" / "lenet"


@pytest.mark.skipif(not LENET.is_dir(), reason="shared LeNet files not present")
@pytest.mark.parametrize("name,v1,most", [("lenet300-v1.dcz", 386, 193),
                                          ("lenet5-v1.dcz", 441, 220)])
def test_the_lenet_header_and_framing_take_half_of_version_1(tmp_path, name, v1, most):
    with DczFile(LENET / name) as f:
        state, meta = f.load(), f.metadata
        assert f.version == 1 and f.overhead_bytes == v1
    size = write(tmp_path / "m.dcz", state, meta)
    assert dcz.encoded_size(state, meta) == size
    with DczFile(tmp_path / "m.dcz") as g:
        assert g.overhead_bytes <= most, g.overhead_bytes
        assert g.overhead_bytes == 16 + g.header_bytes + 12
        assert_identical(dict(g.load()), dict(state))
