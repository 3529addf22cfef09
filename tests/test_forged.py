"""Forged .dcz files (every checksum recomputed): each must end in DczError from the three API calls
and in one `error:` line with exit 2 from the CLI; never another exception, a pickle or a huge
allocation. Issue: "a forged .dcz gets past the reader"."""
import atexit
import contextlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import deepcompress
from deepcompress.cli.main import main
from deepcompress.formats import DczError, csr

sys.path.insert(0, str(Path(__file__).parent))
import forge  # noqa: E402
from forge import PROGRAM, Forged, Mutation  # noqa: E402

HERE = Path(__file__).parent
CORPUS = sorted((HERE / "corpus").glob("*.dcz"))
CASES_PER_BASE = 110
GUARD_BYTES = 2 << 30  # address space a call may add before MemoryError
_WORK = Path(tempfile.mkdtemp(prefix="dcz-forged-"))
atexit.register(shutil.rmtree, _WORK, ignore_errors=True)
SENTINEL = _WORK / "pickle-ran"
BASES = forge.build_bases(_WORK / "bases")
_MUTATIONS = {name: forge.mutations(Forged.read(path), seed=7, sentinel=str(SENTINEL),
                                    limit=CASES_PER_BASE) for name, path in BASES.items()}
for _base in ("grouped", "grouped-v2"):  # every one
    _MUTATIONS[_base] += list(forge.grouped_mutations(Forged.read(BASES[_base])))
for _base in ("shared", "raw", "program", "grouped"):  # every version 3 rule
    _MUTATIONS[_base] += list(forge.v3_rule_mutations(Forged.read(BASES[_base])))
CASES = [f"{base}:{i}:{m.name}" for base, ms in _MUTATIONS.items() for i, m in enumerate(ms)]


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


@contextlib.contextmanager
def memory_guard(extra: int = GUARD_BYTES):
    """Lower the address-space limit to the current size + extra, so a huge allocation is a
    MemoryError in this process instead of the OOM killer."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_bytes() + extra
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard < 0 else min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def case(case_id: str) -> Mutation:
    base, i, _ = case_id.split(":", 2)
    return _MUTATIONS[base][int(i)]


def reference(base: str) -> dict[str, str]:
    return _REFERENCES.setdefault(base, forge.check_file(BASES[base]))


_REFERENCES: dict[str, dict[str, str]] = {}


def check(path: Path, expect: str = "error", base: str | None = None) -> list[str]:
    with memory_guard():
        got = forge.check_file(path)
    problems = forge.verdict(expect, got, reference(base) if base else None)
    if SENTINEL.exists():
        SENTINEL.unlink()
        problems.append("a pickle ran")
    return problems


def cli(*args: object) -> tuple[int, str, BaseException | None]:
    with memory_guard():
        r = CliRunner().invoke(main, [str(a) for a in args])
    exc = None if r.exception is None or isinstance(r.exception, SystemExit) else r.exception
    return r.exit_code, r.output, exc


def cli_problems(path: Path, tmp: Path, expect: str = "error") -> list[str]:
    problems = []
    out = tmp / "out.safetensors"
    for args in (["inspect", path], ["decompress", path, "-o", out, "--force"]):
        code, output, exc = cli(*args)
        what = args[0]
        if exc is not None:
            problems.append(f"{what}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
        elif "Traceback" in output:
            problems.append(f"{what}: printed a traceback")
        elif code == 2:
            lines = output.strip().splitlines()
            if len(lines) != 1 or not lines[0].startswith("error: "):
                problems.append(f"{what}: exit 2 without exactly one 'error:' line: {output!r}")
            if expect == "same":
                problems.append(f"{what}: refused a no-op file: {output.strip()}")
        elif code == 0:
            if expect == "error":
                problems.append(f"{what}: exit 0 on a forged file")
        else:
            problems.append(f"{what}: exit {code}: {output.strip()[-200:]}")
    out.unlink(missing_ok=True)
    return problems


def forged_path(tmp: Path, data: bytes, name: str = "x.dcz") -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


# --- the harness itself ------------------------------------------------------------------------

def test_bases_cover_every_layout_and_load():
    with deepcompress.open_lazy(BASES["shared"]) as f:
        layouts = {e.get("layout") for e in f.entries.values()}
        assert {"dense", "capped", "escape", None} <= layouts
        assert any(e["encoding"] == "alias" for e in f.entries.values())
        lined = {e.get("layout") for e in f.entries.values() if e.get("lines")}
        assert lined == {"dense", "capped"}  # dead lines (SPEC 2.5) in both kinds of layout
        assert any("context" in e for e in f.entries.values() if e.get("lines"))
    with deepcompress.open_lazy(BASES["raw"]) as f:
        assert {"bool", "float8_e4m3fn", "float8_e5m2", "int64"} <= {
            e["dtype"] for e in f.entries.values()}
    for base, path in BASES.items():
        assert not forge.verdict("same", forge.check_file(path), None), base
    for base, legacy, version in (("shared", "shared-v1", 1), ("grouped", "grouped-v2", 2)):
        assert forge.check_file(BASES[legacy]) == reference(base)  # the same tensors
        with deepcompress.open_lazy(BASES[legacy]) as f, deepcompress.open_lazy(BASES[base]) as g:
            assert (f.version, g.version) == (version, 3)


@pytest.mark.parametrize("base", sorted(BASES))
def test_forge_round_trip_is_exact(base):
    data = BASES[base].read_bytes()
    f = Forged.parse(data)
    again = f.to_bytes()
    assert Forged.parse(again).doc == f.doc and Forged.parse(again).payloads == f.payloads
    assert forge.check_file(forged_path(_WORK, again, f"rt-{base}.dcz")) == reference(base)


def test_forge_huffman_matches_the_reader():
    rng = np.random.default_rng(0)
    symbols = rng.integers(0, 5, 1000).astype(np.uint8)
    from deepcompress.formats import streams
    lengths = np.array([2, 2, 2, 3, 3], dtype=np.uint8)
    payload = forge.huffman_payload(symbols, lengths)
    assert np.array_equal(streams.decode("huffman", 1000, payload, "t"), symbols)


def test_mutator_is_deterministic():
    a = forge.mutations(Forged.read(BASES["shared"]), seed=3, limit=40)
    b = forge.mutations(Forged.read(BASES["shared"]), seed=3, limit=40)
    assert [m.name for m in a] == [m.name for m in b]
    assert [m.data() for m in a] == [m.data() for m in b]


# --- a few hundred forged files ----------------------------------------------------------------

@pytest.mark.parametrize("case_id", CASES)
def test_forged_file_api(case_id, tmp_path):
    m = case(case_id)
    base = case_id.split(":", 1)[0]
    problems = check(forged_path(tmp_path, m.data()), m.expect, base)
    assert not problems, f"{m.kind}: {m.name}: {problems}"


@pytest.mark.parametrize("case_id", CASES[::3])
def test_forged_file_cli(case_id, tmp_path):
    m = case(case_id)
    problems = cli_problems(forged_path(tmp_path, m.data()), tmp_path, m.expect)
    assert not problems, f"{m.kind}: {m.name}: {problems}"


_CHILD = r"""
import json, resource, signal, sys, time
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
sys.path.insert(0, sys.argv[1])
import forge

def alarm(signum, frame):
    raise TimeoutError("case took over 20 s")

signal.signal(signal.SIGALRM, alarm)
for path in sys.argv[2:]:
    signal.alarm(20)
    t = time.perf_counter()
    got = forge.check_file(path)
    signal.alarm(0)
    print(json.dumps({"path": path, "got": got, "s": time.perf_counter() - t}), flush=True)
"""


def test_all_cases_under_2gb_address_space(tmp_path):
    """Every forged case and corpus file in one child limited to 2 GB of address space."""
    paths, expects = [], {}
    for case_id in CASES:
        m = case(case_id)
        p = forged_path(tmp_path, m.data(), f"{len(paths)}.dcz")
        paths.append(str(p))
        expects[str(p)] = (case_id, m.expect, case_id.split(":", 1)[0])
    for p in CORPUS:
        paths.append(str(p))
        expects[str(p)] = (p.name, "error", None)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(HERE), *paths], capture_output=True,
                          text=True, timeout=300)
    done = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    problems = []
    for r in done:
        name, expect, base = expects[r["path"]]
        bad = forge.verdict(expect, r["got"], reference(base) if base else None)
        if bad:
            problems.append(f"{name}: {bad}")
    if len(done) < len(paths):
        crashed = expects[paths[len(done)]][0]
        problems.append(f"child died at {crashed} (rc {proc.returncode}): {proc.stderr[-500:]}")
    assert not SENTINEL.exists(), "a pickle ran"
    assert not problems, f"{len(problems)} cases:\n" + "\n".join(problems)


# --- corpus: forged files that broke the reader ------------------------------------------------

@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_corpus_file_is_refused(path, tmp_path):
    assert not check(path), path.name
    assert not cli_problems(path, tmp_path), path.name


def test_corpus_is_small_and_listed():
    assert len(CORPUS) <= 40 and sum(p.stat().st_size for p in CORPUS) <= 300_000
    readme = (HERE / "corpus" / "README.md").read_text()
    for p in CORPUS:
        assert p.name in readme, p.name


# --- grouped codebooks (format version 2) -------------------------------------------------------

def test_the_grouped_base_has_every_layout_and_an_empty_group():
    for base, version in (("grouped", 3), ("grouped-v2", 2)):
        with deepcompress.open_lazy(BASES[base]) as f:
            assert f.version == version
    with deepcompress.open_lazy(BASES["grouped"]) as f:
        assert {e["layout"] for e in f.entries.values()} == {"dense", "capped", "escape"}
        assert all("groups" in e for e in f.entries.values())
        assert f.entries["gescape"]["group_rows"] == 7 and f.entries["gescape"]["groups"] == 8
        assert not f["gescape"][7:14].any()


@pytest.mark.parametrize("member", ["groups", "group_rows"])
@pytest.mark.parametrize("label,value", forge.WRONG_KINDS, ids=[k for k, _ in forge.WRONG_KINDS])
def test_grouped_members_of_the_wrong_kind(tmp_path, member, label, value):
    def edit(f: Forged) -> None:
        f.entry("gdense")[member] = value
    assert not check(_edited(tmp_path, "grouped", edit))


def _grouped_entry(**changes: object) -> dict:
    e = {"name": "w", "dtype": "float32", "shape": [4, 2], "encoding": "shared",
         "layout": "dense", "nonzero": 8, "clusters": 2, "groups": 4, "group_rows": 1,
         "streams": {k: {"offset": 16, "length": 0, "crc32": 0, "coding": "raw", "count": 0}
                     for k in ("codebook", "index")}}
    e.update(changes)
    e["streams"]["codebook"]["count"] = 4 * e["clusters"] * e["groups"]
    e["streams"]["index"]["count"] = 8
    return e


@pytest.mark.parametrize("changes,message", [
    ({"clusters": 3}, "more than the elements of a group"),
    ({"shape": [], "nonzero": 1, "clusters": 1, "groups": 1}, "at least one dimension"),
    ({"group_rows": 3, "groups": 1}, "make 2"),  # ceil(4 / 3) = 2: the last group is shorter
    ({"groups": True}, "non-negative integers"),
])
def test_grouped_header_rules(changes, message):
    from deepcompress.formats import dcz
    e = _grouped_entry(**changes)
    if e["shape"] == []:
        e["streams"]["index"]["count"] = 1
    with pytest.raises(DczError, match=message):
        dcz._check_entry(e, 0, {}, 1 << 34, 2)
    assert dcz._check_entry(_grouped_entry(group_rows=3, groups=2), 0, {}, 1 << 34, 2)


def test_a_grouped_entry_with_2_34_slots_is_refused_before_allocating(tmp_path):
    f = Forged.read(BASES["grouped"])
    i = f.index("gdense")
    f.doc["tensors"][i].update(shape=[1 << 30, 16], nonzero=1, clusters=1, groups=1 << 30)
    f.set_stream((i, "codebook"), b"\x3f", "const", 4 << 30)
    f.set_stream((i, "index"), forge.lying_zstd_frame(b"\x01" + b"\x00" * 7, 1 << 34), "zstd",
                 1 << 34)
    assert not check(forged_path(tmp_path, f.to_bytes()))


# --- (a) allocation before validation ----------------------------------------------------------

def _shared_entry(f: Forged, shape: list[int], layout: str, dtype: str = "float32",
                  **extra: object) -> int:
    """Turn the `escape`/`capped`/`dense` entry of the shared base into a 1-nonzero tensor."""
    i = f.index(layout if layout != "dense" else "dense")
    e = f.doc["tensors"][i]
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}[dtype]
    e.update(dtype=dtype, shape=shape, nonzero=1, clusters=1, **extra)
    f.set_stream((i, "codebook"), b"\x00" * (itemsize - 1) + b"\x3f", "raw", itemsize)
    f.set_stream((i, "index"), b"\x00" if layout != "dense" else b"", "raw",
                 1 if layout != "dense" else 0)
    f.remove_entry("dense_tied")  # the alias of the dense entry no longer matches it
    return f.index(e["name"])


def shared_base() -> Forged:
    return Forged.read(BASES["shared"])


def test_a_const_gap_stream_of_2_34_fillers(tmp_path):
    f = shared_base()
    i = _shared_entry(f, [1 << 34], "capped", "float16")
    m = (1 << f.doc["tensors"][i]["gap_bits"]) - 1
    f.set_stream((i, "gaps"), bytes([m]), "const", 1 << 34)
    assert not check(forged_path(tmp_path, f.to_bytes()))


def test_a_zstd_stream_declaring_2_34_bytes(tmp_path):
    f = Forged.read(BASES["raw"])
    i = f.index("u8")
    f.doc["tensors"][i]["shape"] = [1 << 34]
    f.set_stream((i, "data"), forge.lying_zstd_frame(b"\x01" * 9, 1 << 34), "zstd", 1 << 34)
    assert not check(forged_path(tmp_path, f.to_bytes()))


def test_a_zstd_index_declaring_2_34_symbols(tmp_path):
    f = shared_base()
    i = _shared_entry(f, [1 << 34], "dense", "float16")
    f.set_stream((i, "index"), forge.lying_zstd_frame(b"\x01" + b"\x00" * 7, 1 << 34), "zstd",
                 1 << 34)
    assert not check(forged_path(tmp_path, f.to_bytes()))


def test_a_huffman_stream_of_2_33_symbols_in_4_bytes(tmp_path):
    f = shared_base()
    i = _shared_entry(f, [1 << 33], "dense", "float16")
    f.set_stream((i, "index"), bytes([1, 1, 1]) + b"\x80\x00\x00\x00", "huffman", 1 << 33)
    assert not check(forged_path(tmp_path, f.to_bytes()))


@pytest.mark.parametrize("coding", ["const", "zstd"])
def test_a_huge_program_count(tmp_path, coding):
    f = Forged.read(BASES["program"])
    payload = b"\x00" if coding == "const" else forge.lying_zstd_frame(b"PK\x03\x04", 1 << 30)
    f.set_stream(PROGRAM, payload, coding, 1 << 30)
    assert not check(forged_path(tmp_path, f.to_bytes()), "error", "program")


def test_a_program_count_above_the_limit(tmp_path):
    f = Forged.read(BASES["program"])
    f.set_stream(PROGRAM, b"\x00", "const", (1 << 30) + 1)
    assert not check(forged_path(tmp_path, f.to_bytes()))  # a header error: every call refuses


# --- (b) 32-bit wraparound ---------------------------------------------------------------------

@pytest.mark.parametrize("numel", [(1 << 31) - 2, (1 << 31) + 5])
def test_b_escape_long_gap_wraps_int32(tmp_path, numel):
    """One nonzero whose long gap, added in 32 bits, would wrap to a negative position."""
    f = shared_base()
    i = _shared_entry(f, [numel], "escape")
    f.set_stream((i, "gaps"), b"\xff", "raw", 1)
    lg = forge.varints([numel])  # position 255 + numel: past the end, or negative if wrapped
    f.set_stream((i, "long_gaps"), lg, "raw", len(lg))
    assert not check(forged_path(tmp_path, f.to_bytes()))


def test_b_escape_two_long_gaps_sum_past_2_32(tmp_path):
    f = shared_base()
    i = _shared_entry(f, [(1 << 31) + 5], "escape")
    f.doc["tensors"][i].update(nonzero=2)
    f.set_stream((i, "index"), b"\x00\x00", "raw", 2)
    f.set_stream((i, "gaps"), b"\xff\xff", "raw", 2)
    lg = forge.varints([1 << 31, (1 << 32) - 512])
    f.set_stream((i, "long_gaps"), lg, "raw", len(lg))
    assert not check(forged_path(tmp_path, f.to_bytes()))


def test_b_capped_fillers_run_past_2_31(tmp_path):
    """Fillers that place the only nonzero at numel (one past the end) of a 2^31+5 tensor."""
    f = shared_base()
    numel = (1 << 31) + 5
    i = _shared_entry(f, [numel], "capped", gap_bits=8)
    fillers, last = divmod(numel, 255)
    gaps = np.full(fillers + 1, 255, dtype=np.uint8)
    gaps[-1] = last - 1 + 1  # position fillers*255 + last == numel
    f.set_stream((i, "gaps"), forge.zstd_frame(gaps.tobytes()), "zstd", gaps.size)
    assert not check(forged_path(tmp_path, f.to_bytes()))


BOUNDARIES = [(1 << 31) - 2, (1 << 31) - 1, 1 << 31, 1 << 32]


def _escape_result(numel: int, extra: int) -> object:
    symbols = np.array([255], dtype=np.uint8)
    varint = np.frombuffer(forge.varints([extra]), dtype=np.uint8)
    try:
        with memory_guard():
            return csr.decode_escape(symbols, varint, 1, numel, "t")
    except DczError:
        return None


@pytest.mark.parametrize("numel", BOUNDARIES)
def test_b_decode_escape_at_32_bit_boundaries(numel):
    last = _escape_result(numel, numel - 256)  # the only nonzero at numel - 1
    assert last is not None and last.dtype == np.int64 and last.tolist() == [numel - 1]
    for extra in (numel - 255, numel, (1 << 32) - 256, (1 << 31) - 256):
        pos = _escape_result(numel, extra)
        expected = 255 + extra
        if pos is not None:  # accepted: then it must be the true, in-range position
            assert pos.tolist() == [expected] and 0 <= expected < numel, (numel, extra, pos)


@pytest.mark.parametrize("numel", BOUNDARIES)
def test_b_decode_capped_at_32_bit_boundaries(numel):
    for target in (numel - 1, numel, numel + 254):
        fillers, last = divmod(target, 255)
        symbols = np.full(fillers + 1, 255, dtype=np.uint8)
        symbols[-1] = last
        try:
            with memory_guard():
                pos = csr.decode_capped(symbols, 8, 1, numel, "t")
        except DczError:
            assert target >= numel, (numel, target)
            continue
        assert pos.dtype == np.int64 and pos.tolist() == [target] and target < numel


# --- (c) value kinds ---------------------------------------------------------------------------

def _edited(tmp_path: Path, base: str, edit) -> Path:
    f = Forged.read(BASES[base])
    edit(f)
    return forged_path(tmp_path, f.to_bytes())


@pytest.mark.parametrize("field,value", [("dtype", ["float32"]), ("dtype", {"a": 1}),
                                         ("alias_of", ["dense"]), ("alias_of", {"n": 1}),
                                         ("shape", [[24], 24]), ("encoding", ["raw"]),
                                         ("layout", ["dense"]), ("name", ["dense"])])
def test_c_unhashable_values(tmp_path, field, value):
    def edit(f: Forged) -> None:
        f.entry("dense_tied" if field == "alias_of" else "dense")[field] = value
    assert not check(_edited(tmp_path, "shared", edit))


def test_c_bool_byte_2(tmp_path):
    def edit(f: Forged) -> None:
        i = f.index("flag")
        data = bytearray(f.symbols((i, "data")))
        data[0] = 2
        f.set_stream((i, "data"), bytes(data), "raw", len(data))
    assert not check(_edited(tmp_path, "raw", edit))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_c_non_json_literals_in_metadata(tmp_path, literal):
    def edit(f: Forged) -> None:
        f.doc["metadata"]["accuracy"] = forge._Nan(literal)
    assert not check(_edited(tmp_path, "shared", edit))


def test_c_program_null(tmp_path):
    assert not check(_edited(tmp_path, "shared", lambda f: f.doc.update(program=None)))


def test_c_capped_fillers_only_with_nonzero_0(tmp_path):
    def edit(f: Forged) -> None:
        i = f.index("capped")
        f.doc["tensors"][i].update(nonzero=0, clusters=0)
        f.set_stream((i, "codebook"), b"", "raw", 0)
        f.set_stream((i, "index"), b"", "raw", 0)
        f.set_stream((i, "gaps"), bytes([(1 << f.doc["tensors"][i]["gap_bits"]) - 1]), "const", 3)
    assert not check(_edited(tmp_path, "shared", edit))


@pytest.mark.parametrize("where", ["before", "after", "alone"])
def test_c_skippable_zstd_frame(tmp_path, where):
    def edit(f: Forged) -> None:
        i = f.index("i64")
        symbols = f.symbols((i, "data"))
        skip = forge.skippable_frame(b"\x00" * 8)
        frame = forge.zstd_frame(symbols)
        payload = {"before": skip + frame, "after": frame + skip, "alone": skip}[where]
        f.set_stream((i, "data"), payload, "zstd")
    assert not check(_edited(tmp_path, "raw", edit))


# --- (d) valid files that crashed --------------------------------------------------------------

def test_d_inspect_float8_file(tmp_path):
    path = tmp_path / "f8.dcz"
    deepcompress.save({"a": torch.randn(8).to(torch.float8_e4m3fn),
                       "b": torch.randn(8).to(torch.float8_e5m2)}, path)
    code, output, exc = cli("inspect", path)
    assert exc is None and code == 0, output


def test_d_name_with_a_lone_surrogate(tmp_path):
    def edit(f: Forged) -> None:
        f.entry("f32")["name"] = "w\ud800"
    path = _edited(tmp_path, "raw", edit)
    assert not check(path, "any")
    assert not cli_problems(path, tmp_path, "any")


def test_d_shape_with_a_huge_dim_and_a_zero(tmp_path):
    def edit(f: Forged) -> None:
        f.entry("empty")["shape"] = [1 << 62, 4, 0]
    path = _edited(tmp_path, "raw", edit)
    assert not check(path, "any")
    assert not cli_problems(path, tmp_path, "any")


def test_d_huge_zero_shape_as_alias_target(tmp_path):
    def edit(f: Forged) -> None:
        f.entry("empty")["shape"] = [1 << 62, 4, 0]
        f.doc["tensors"].append({"name": "tie", "dtype": "float32", "shape": [1 << 62, 4, 0],
                                 "encoding": "alias", "alias_of": "empty"})
    path = _edited(tmp_path, "raw", edit)
    assert not check(path, "any")
    assert not cli_problems(path, tmp_path, "any")


def many_aliases(n: int = 60_000) -> bytes:
    f = shared_base()
    target = f.entry("dense")
    f.doc["tensors"] += [{"name": f"tie.{k}", "dtype": target["dtype"], "shape": target["shape"],
                          "encoding": "alias", "alias_of": "dense"} for k in range(n)]
    return f.to_bytes()


@pytest.mark.slow
def test_d_60000_aliases_inspect_completes(tmp_path):
    path = forged_path(tmp_path, many_aliases())
    proc = subprocess.run([sys.executable, "-m", "deepcompress.cli.main", "inspect", str(path)],
                          capture_output=True, text=True, timeout=45)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert f"{60_000 + len(shared_base().doc['tensors'])} tensors" in proc.stdout


@pytest.mark.slow
def test_d_60000_aliases_load(tmp_path):
    path = forged_path(tmp_path, many_aliases())
    state = deepcompress.load_state_dict(path)
    assert len(state) == 60_000 + len(shared_base().doc["tensors"])
    assert state["tie.0"] is state["dense"]


def test_d_nothing_pickled_by_any_api(tmp_path):
    """A program whose sample inputs are a pickle that would create a file: load() refuses."""
    def edit(f: Forged) -> None:
        bomb = forge.pickle_that_touches(str(SENTINEL))
        f.set_program_members([(n, bomb if "sample_inputs" in n else d)
                               for n, d in f.program_members()])
    path = _edited(tmp_path, "program", edit)
    assert not check(path, "error", "program")
    assert not SENTINEL.exists()


def test_memory_guard_turns_huge_allocations_into_memory_error():
    with pytest.raises(MemoryError), memory_guard(1 << 28):
        bytearray(1 << 30)
    assert os.path.exists("/proc/self/status") and math.isfinite(_vm_bytes())


@pytest.mark.parametrize("where", ["first pair", "last pair", "odd last symbol"])
def test_c_dense_index_past_the_codebook_in_the_pair_lookup(tmp_path, where):
    # above codec._PAIRS_FROM the dense layout is looked up two symbols at a time: a byte past
    # K in either half of a pair, or in a lone last symbol, is still refused
    from deepcompress.formats import codec, write

    numel = codec._PAIRS_FROM + 1  # odd: the last symbol is looked up alone
    book = torch.linspace(0.5, 2.0, 7)
    w = book[torch.randint(0, 7, (numel,), generator=torch.Generator().manual_seed(0))]
    write(tmp_path / "base.dcz", {"big": w})
    f = Forged.read(tmp_path / "base.dcz")
    i = f.index("big")
    assert f.entry("big")["layout"] == "dense" and f.entry("big")["clusters"] == 7
    symbols = bytearray(f.symbols((i, "index")))
    symbols[{"first pair": 1, "last pair": numel - 3, "odd last symbol": numel - 1}[where]] = 8
    f.set_stream((i, "index"), bytes(symbols), "raw", len(symbols))
    path = forged_path(tmp_path, f.to_bytes())
    assert not check(path)
    with pytest.raises(DczError, match="points past the codebook"):
        deepcompress.load_state_dict(path)
