"""The `.dcz` container: a streaming writer and a reader that trusts nothing (see SPEC.md).

Layout: a 16-byte preamble, the streams of every tensor back to back, a zstd-compressed JSON
header that lists them, and a trailer pointing at the header (version 3, written: the compact
header of SPEC 2.4 and a 12-byte trailer; versions 1 and 2, still read: an object header and a
32-byte trailer). Every part is covered by a CRC32 (in version 3 one per tensor over all its
streams), so any flipped bit is caught on read.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zstandard

from . import codec, streams
from . import header_dict3 as _header_dict3
from . import program as _program
from .errors import DczError

MAGIC = b"\x89DCZ\r\n\x1a\n"
VERSION = 3  # the version the writer writes (compact header, SPEC 2.4)
VERSIONS = (1, 2, 3)  # the versions this reader reads
PREAMBLE = struct.Struct("<8sII")  # magic, version, crc32 of the first 12 bytes
TRAILER = struct.Struct("<QQQII")  # versions 1, 2: header offset, length, raw length, crcs
TRAILER3 = struct.Struct("<III")  # version 3: header length, header crc, own crc
MAX_HEADER_BYTES = 1 << 26
MAX_HEADER_ITEMS = 1 << 22  # JSON values in the header: bounds the memory of the parsed header
MAX_ELEMENTS = 1 << 34  # per tensor; a reader may lower or raise it (up to 2^62)
MAX_DIMS = 32
MAX_PROGRAM_BYTES = _program.MAX_ARCHIVE_BYTES
# zstd raw-content dictionary for the header (SPEC.md, appendix A): a typical header, so that
# the keys of a small model's header cost almost nothing
HEADER_DICTIONARY = (Path(__file__).parent / "header.dict").read_bytes()
_HEADER_DICT = zstandard.ZstdCompressionDict(HEADER_DICTIONARY,
                                             dict_type=zstandard.DICT_TYPE_RAWCONTENT)
# version 3 headers (SPEC appendix B): a raw-content dictionary of typical compact headers
HEADER_DICTIONARY_3 = bytes.fromhex(_header_dict3.HEX)
_HEADER_DICT_3 = zstandard.ZstdCompressionDict(HEADER_DICTIONARY_3,
                                               dict_type=zstandard.DICT_TYPE_RAWCONTENT)
_STREAM_KEYS = {"offset", "length", "crc32", "coding", "count"}
# version 3 codes (SPEC 2.4): dtypes, encodings, codings by their position in these lists
DTYPES_3 = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
            "uint8", "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2")
ENCODINGS_3 = ("alias", "raw", "shared", "grouped")
CODINGS_3 = streams.CODINGS + ("context",)  # context: index streams only (SPEC 2.6)
CONTEXT = CODINGS_3.index("context")
# layout code: 0 dense, 1..8 capped with gap_bits = code, 9 escape; + LINES with dead lines
LINES = 10
_STREAM_ORDER = {"dense": ("codebook", "index"), "capped": ("codebook", "index", "gaps"),
                 "escape": ("codebook", "index", "gaps", "long_gaps")}
_LINE_STREAMS = ("rows", "cols")
# the stream records whose count a version 3 header states (the others are derived: SPEC 2.4);
# with dead lines a dense index stream's count (the cells of the submatrix) is stated too
_EXPLICIT_COUNT = {"dense": (), "capped": ("gaps",), "escape": ("long_gaps",)}
assert set(DTYPES_3) == set(codec.DTYPES)


def _u64(x: object) -> bool:
    return type(x) is int and 0 <= x < (1 << 63)


def _name(x: object) -> bool:
    """A non-empty string that is valid Unicode (JSON escapes can make lone surrogates)."""
    if not isinstance(x, str) or not x:
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shape_ok(shape: object) -> bool:
    """A list of at most MAX_DIMS u64 dims whose nonzero dims multiply to less than 2^63."""
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_u64(d) for d in shape):
        return False
    return math.prod(d for d in shape if d) < (1 << 63)


def available_memory() -> int:
    """Bytes this process can still allocate: the system's available memory, lowered by an
    address-space limit (ulimit -v) when one is set."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 1 << 40
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as f:
                used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            avail = min(avail, max(limit - used, 0))
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return avail


def decode_cost(entry: dict) -> int:
    """An upper bound on the bytes that decoding one stored (non-alias) entry allocates."""
    numel = math.prod(entry["shape"])
    itemsize = codec.DTYPES[entry["dtype"]][1]
    out = numel * itemsize
    recs = entry["streams"].values()
    symbols = sum(s["count"] for s in recs)
    stored = sum(s["length"] for s in recs)
    positions = 0
    if "gaps" in entry["streams"]:  # advance, ends and mask arrays, then the positions
        positions = 17 * entry["streams"]["gaps"]["count"] + 8 * entry["nonzero"]
    grouped = 0
    if "groups" in entry:  # slot checks (mask, sort, sizes), the dense table, chunk temporaries
        slots = entry["groups"] * (entry["clusters"] + 1)
        grouped = slots * (3 * itemsize + 3) + 16 * entry["groups"] + 64 * min(
            max(numel, entry["nonzero"]), codec.GROUP_CHUNK)
    lines = 0
    if entry.get("lines") or "context" in entry:  # value grid, masks, positions, chunk tables
        lines = 3 * numel + 16 * entry["nonzero"] + 64 * codec.context.CHUNK
    return 2 * out + 2 * symbols + stored + positions + grouped + lines


def _storage_key(t: torch.Tensor) -> tuple | None:
    if t.device.type == "meta" or t.numel() == 0:
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
            t.dtype)


def _put(f, stream: streams.Stream, offset: int, crc: int = 0) -> dict:
    """Write a stream's payload at `offset`; its header record, whose crc32 continues `crc`
    (so that the streams of one entry, back to back, share one checksum: SPEC 2.4)."""
    for chunk in stream.chunks():
        f.write(chunk)
        crc = zlib.crc32(chunk, crc)
    return {"offset": offset, "length": stream.nbytes, "crc32": crc, "coding": stream.coding,
            "count": stream.count}


def _preamble(version: int) -> bytes:
    head = MAGIC + struct.pack("<I", version)
    return head + struct.pack("<I", zlib.crc32(head))


def write(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor] | Iterable,
          metadata: Mapping | None = None,
          on_tensor: Callable[[str, int], None] | None = None,
          program: bytes | None = None) -> int:
    """Write tensors (a mapping or an iterable of (name, tensor)) to a .dcz; returns its size.

    A value may be a `codec.Shared` (a declared codebook and index) instead of a tensor: it is
    stored shared without its values being searched, as the same bytes detection would give.

    One tensor is encoded and written at a time, so memory follows the largest tensor. The file
    appears whole or not at all (written to a temporary file, then renamed). `on_tensor(name,
    bytes_so_far)` is called after each stored tensor (for progress bars). `program` is an
    architecture archive from formats.program.pack, stored after the tensors.
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    path = Path(path)
    meta = json.loads(json.dumps(dict(metadata or {}), allow_nan=False))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            _emit(f, items, meta, on_tensor, program)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


class _Counter:
    """A write-only sink that keeps only the number of bytes written."""

    def __init__(self) -> None:
        self.size = self.pos = 0

    def write(self, data: bytes) -> int:
        self.pos += len(data)
        self.size = max(self.size, self.pos)
        return len(data)

    def seek(self, pos: int) -> None:
        self.pos = pos


def encoded_size(tensors: Mapping[str, torch.Tensor] | Iterable, metadata: Mapping | None = None,
                 program: bytes | None = None) -> int:
    """The bytes `write` would give for these arguments, encoded but written nowhere."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    sink = _Counter()
    _emit(sink, items, json.loads(json.dumps(dict(metadata or {}), allow_nan=False)), None, program)
    return sink.size


def _emit(f, items: Iterable, meta: dict, on_tensor: Callable[[str, int], None] | None,
          program: bytes | None) -> None:
    """Write a whole .dcz to f (a binary file, or a _Counter), one tensor at a time."""
    f.write(_preamble(VERSION))
    offset = PREAMBLE.size
    entries: list[dict] = []
    # storage address -> (name, weak ref): a freed tensor's address can be reused by a
    # later one from an iterator, and that is no tie
    seen: dict[tuple, tuple[str, weakref.ref]] = {}
    names: set[str] = set()
    for name, tensor in items:
        if not _name(name) or name in names:
            raise ValueError(f"tensor name {name!r} is empty, not a string, not valid "
                             "Unicode or repeated")
        if isinstance(tensor, codec.Shared):
            tensor.check()
        elif not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor or a Shared, got "
                             f"{type(tensor).__name__}")
        if not _shape_ok(list(tensor.shape)):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} cannot be stored "
                             "(its nonzero dims multiply to 2^63 or more)")
        names.add(name)
        entry = {"name": name, "dtype": codec.dtype_name(tensor.dtype),
                 "shape": list(tensor.shape)}
        key = (("shared", id(tensor)) if isinstance(tensor, codec.Shared)
               else _storage_key(tensor))
        if key is not None and key in seen and seen[key][1]() is not None:
            entries.append({**entry, "encoding": "alias", "alias_of": seen[key][0]})
            continue
        if key is not None:
            seen[key] = (name, weakref.ref(tensor))
        encoded = codec.encode_tensor(tensor)
        entry.update(encoded.fields)
        entry["streams"] = {}
        crc = 0  # one CRC32 over all the entry's streams, in order (SPEC 2.4)
        for sname, stream in encoded.streams.items():
            entry["streams"][sname] = rec = _put(f, stream, offset, crc)
            crc = rec.pop("crc32")
            offset += stream.nbytes
        entry["crc32"] = crc
        entries.append(entry)
        del tensor, encoded  # before the iterator makes the next one
        if on_tensor is not None:
            on_tensor(name, offset)
    doc = {"tensors": entries, "metadata": meta}
    if program is not None:
        stream = streams.encode_bytes(np.frombuffer(program, dtype=np.uint8))
        doc["program"] = _put(f, stream, offset)
        offset += stream.nbytes
    raw = json.dumps(compact_header(doc), separators=(",", ":"), allow_nan=False).encode()
    f.write(header_frame(raw))


def compact_header(doc: dict) -> list:
    """The version 3 form (SPEC 2.4) of a header doc: entries in the version 1/2 form whose
    stream records carry no crc32 and that carry one `crc32` over all their streams instead;
    the streams are back to back from byte 16 in entry order, then the program."""
    at = PREAMBLE.size
    positions = {}

    def rec(s: dict, count: bool, crc: bool = False, model: list | None = None) -> list:
        nonlocal at
        if s["offset"] != at:
            raise ValueError("streams are not back to back in header order")
        at += s["length"]
        return ([s["length"]] + ([s["crc32"]] if crc else []) + [CODINGS_3.index(s["coding"])]
                + (list(model) if s["coding"] == "context" else [])
                + ([s["count"]] if count else []))

    out = []
    for i, e in enumerate(doc["tensors"]):
        positions[e["name"]] = i
        enc = e["encoding"]
        if enc == "alias":
            out.append([e["name"], 0, positions[e["alias_of"]]])
            continue
        head = [e["name"], 0, DTYPES_3.index(e["dtype"]), e["shape"]]
        if enc == "raw":
            head[1] = 1
            out.append(head + [int(e["shuffle"]), e["crc32"], rec(e["streams"]["data"], False)])
            continue
        layout, lines = e["layout"], e.get("lines", False)
        code = {"dense": 0, "escape": 9}[layout] if layout != "capped" else e["gap_bits"]
        head[1] = 3 if "groups" in e else 2
        head += [code + LINES * lines, e["nonzero"], e["clusters"]]
        if "groups" in e:
            head.append(e["group_rows"])
        out.append(head + [e["crc32"]] + [
            rec(e["streams"][k], k in _explicit(layout, lines), model=e.get("context"))
            for k in _stream_order(layout, lines)])
    top = [out, doc["metadata"]]
    if "program" in doc:
        top.append(rec(doc["program"], True, True))
    return top


def _stream_order(layout: str, lines: bool) -> tuple[str, ...]:
    return _STREAM_ORDER[layout] + (_LINE_STREAMS if lines else ())


def _explicit(layout: str, lines: bool) -> tuple[str, ...]:
    return _EXPLICIT_COUNT[layout] + (("index",) if lines and layout == "dense" else ())


def header_frame(raw: bytes) -> bytes:
    """The version 3 header frame and trailer for this compact header JSON."""
    header = zstandard.ZstdCompressor(level=19, dict_data=_HEADER_DICT_3, write_dict_id=False,
                                      write_checksum=False).compress(raw)
    body = struct.pack("<II", len(header), zlib.crc32(header))
    return header + body + struct.pack("<I", zlib.crc32(body))


def _no_duplicates(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise DczError("header: a JSON object repeats a key")
    return dict(pairs)


def _no_constant(token: str) -> float:
    raise DczError(f"header: {token} is not JSON (non-finite numbers are not allowed)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise DczError(f"header: number {text[:20]} is out of range")
    return value


def parse_header(raw: bytes | bytearray, version: int = 2) -> dict:
    """The header's JSON, parsed with caps on its size and its number of values, as a doc in
    the version 1/2 form (a version 3 header is expanded: SPEC 2.4; the counts that it derives
    are None until _check_entry fills them in)."""
    if len(raw) > MAX_HEADER_BYTES:
        raise DczError(f"header: {len(raw)} bytes, above the limit of {MAX_HEADER_BYTES}")
    items = raw.count(b",") + raw.count(b"[") + raw.count(b"{") + 1
    if items > MAX_HEADER_ITEMS:
        raise DczError(f"header: up to {items} JSON values, above the limit of "
                       f"{MAX_HEADER_ITEMS}")
    try:
        doc = json.loads(bytes(raw).decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=_no_constant, parse_float=_finite)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        if isinstance(exc, DczError):
            raise
        raise DczError(f"header: not valid JSON ({exc})") from None
    if version >= 3:
        doc = _expand(doc)
    if (not isinstance(doc, dict) or not {"tensors", "metadata"} <= set(doc)
            or not set(doc) <= {"tensors", "metadata", "program"}
            or not isinstance(doc["tensors"], list) or not isinstance(doc["metadata"], dict)):
        raise DczError("header: must hold 'tensors' (a list), 'metadata' (an object) and at "
                       "most 'program'")
    if "program" in doc:
        _check_stream(doc["program"], "header: program")
        if doc["program"]["count"] > MAX_PROGRAM_BYTES:
            raise DczError(f"header: program larger than {MAX_PROGRAM_BYTES} bytes")
        if doc["program"]["coding"] not in ("raw", "zstd"):
            raise DczError("header: the program stream must be coded raw or zstd")
    return doc


def _int(x: object) -> bool:
    return type(x) is int


def _expand(top: object) -> dict:
    """A version 3 header (SPEC 2.4) as a doc in the version 1/2 form: offsets implied by the
    order of the records, codes named, each stored entry's `crc32` (over all its streams) on
    the entry and None in its stream records, derived counts left None (filled in, from the
    checked entry, by _check_entry). Only the form is checked here; every value is checked
    after."""
    if not isinstance(top, list) or len(top) not in (2, 3) or not isinstance(top[0], list):
        raise DczError("header: must be an array [tensors, metadata] or [tensors, metadata, "
                       "program]")
    at = PREAMBLE.size

    def record(r: object, where: str, count: bool, crc: bool = False,
               entry: dict | None = None) -> dict:
        nonlocal at
        c = 1 + crc  # where the coding code is
        model = (isinstance(r, list) and len(r) > c and _int(r[c]) and r[c] == CONTEXT
                 and entry is not None)
        n = 2 + count + crc + 3 * model
        if (not isinstance(r, list) or len(r) != n or not _u64(r[0])
                or not _int(r[c]) or not 0 <= r[c] < len(CODINGS_3)):
            raise DczError(f"{where}: bad stream record (expected [length"
                           f"{', crc32' if crc else ''}, coding{', t, near, far' if model else ''}"
                           f"{', count' if count else ''}] with a known coding code)")
        if model:  # the index stream's context model is the entry's (SPEC 2.6)
            entry["context"] = r[c + 1:c + 4]
        s = {"offset": at, "length": r[0], "crc32": r[1] if crc else None,
             "coding": CODINGS_3[r[c]], "count": r[-1] if count else None}
        at += r[0]
        return s

    tensors = []
    for i, c in enumerate(top[0]):
        where = f"header: tensor #{i}"
        if not isinstance(c, list) or len(c) < 3 or not _int(c[1]) or not 0 <= c[1] <= 3:
            raise DczError(f"{where}: not an array [name, encoding code, ...] with a known "
                           "encoding code")
        name, enc = c[0], c[1]
        if enc == 0:
            j = c[2]
            if len(c) != 3 or not _int(j) or not 0 <= j < i:
                raise DczError(f"{where}: alias must be [name, 0, index of an earlier tensor]")
            target = tensors[j]
            tensors.append({"name": name, "dtype": target["dtype"], "shape": target["shape"],
                            "encoding": "alias", "alias_of": target["name"]})
            continue
        if not _int(c[2]) or not 0 <= c[2] < len(DTYPES_3):
            raise DczError(f"{where}: unknown dtype code {c[2]!r}")
        e = {"name": name, "dtype": DTYPES_3[c[2]], "shape": c[3] if len(c) > 3 else None}
        if enc == 1:
            if len(c) != 7 or not _int(c[4]) or c[4] not in (0, 1):
                raise DczError(f"{where}: raw must be [name, 1, dtype, shape, shuffle 0 or 1, "
                               "crc32, data]")
            e.update(encoding="raw", shuffle=bool(c[4]), crc32=c[5])
            e["streams"] = {"data": record(c[6], f"{where} data", False)}
        else:
            fixed = 8 + (enc == 3)
            code = c[4] if len(c) > 4 else None
            if not _int(code) or not 0 <= code < 2 * LINES:
                raise DczError(f"{where}: unknown layout code {code!r}")
            lines, code = code >= LINES, code % LINES
            layout = "dense" if code == 0 else "escape" if code == 9 else "capped"
            names = _stream_order(layout, lines)
            if len(c) != fixed + len(names):
                raise DczError(f"{where}: a {'grouped' if enc == 3 else 'shared'} {layout} "
                               f"entry has {fixed + len(names)} members, not {len(c)}")
            e.update(encoding="shared", layout=layout, nonzero=c[5], clusters=c[6],
                     crc32=c[fixed - 1])
            if layout == "capped":
                e["gap_bits"] = code
            if enc == 3:
                e.update(groups=None, group_rows=c[7])
            if lines:
                e["lines"] = True
            e["streams"] = {k: record(r, f"{where} {k}", k in _explicit(layout, lines),
                                      entry=e if k == "index" else None)
                            for k, r in zip(names, c[fixed:], strict=True)}
        tensors.append(e)
    doc = {"tensors": tensors, "metadata": top[1]}
    if len(top) == 3:
        doc["program"] = record(top[2], "header: program", True, True)
    return doc


def _check_stream(s: object, where: str, entry_crc: bool = False,
                  codings: tuple[str, ...] = streams.CODINGS) -> None:
    """A stream record; with `entry_crc` (a version 3 entry's stream), its crc32 is None: the
    entry's crc32 covers it."""
    if (not isinstance(s, dict) or set(s) != _STREAM_KEYS
            or not all(_u64(s[k]) for k in ("offset", "length", "count"))
            or not (s["crc32"] is None if entry_crc else _u32(s["crc32"]))
            or not isinstance(s["coding"], str) or s["coding"] not in codings):
        raise DczError(f"{where}: bad stream record")


def _u32(x: object) -> bool:
    return type(x) is int and 0 <= x < (1 << 32)


def _check_entry(e: object, index: int, earlier: dict[str, dict], max_elements: int,
                 version: int = VERSION) -> dict:
    """Validate one header entry of a file of this format version against the schema; returns
    it."""
    where = f"header: tensor #{index}"
    if not isinstance(e, dict) or not _name(e.get("name")):
        raise DczError(f"{where}: not an object with a non-empty, valid Unicode name")
    name = e["name"]
    where = f"header: tensor {name!r}"
    if name in earlier:
        raise DczError(f"{where}: name repeated")
    dtype = e.get("dtype")
    if not isinstance(dtype, str) or dtype not in codec.DTYPES:
        raise DczError(f"{where}: unknown dtype {dtype!r}")
    shape = e.get("shape")
    if not _shape_ok(shape):
        raise DczError(f"{where}: bad shape (at most {MAX_DIMS} dims, each 0 <= d < 2^63, "
                       "the nonzero ones multiplying to less than 2^63)")
    numel = math.prod(shape)
    if numel > max_elements:
        raise DczError(f"{where}: declares {numel} elements, above the reader's limit "
                       f"of {max_elements}")
    itemsize = codec.DTYPES[dtype][1]
    enc = e.get("encoding")
    common = {"name", "dtype", "shape", "encoding"}
    if enc == "alias":
        alias_of = e.get("alias_of")
        target = earlier.get(alias_of) if isinstance(alias_of, str) else None
        if set(e) != common | {"alias_of"} or target is None or target["encoding"] == "alias":
            raise DczError(f"{where}: alias must name an earlier stored tensor")
        if target["dtype"] != dtype or target["shape"] != shape:
            raise DczError(f"{where}: alias differs in dtype or shape from {alias_of!r}")
        return e
    if version >= 3:  # one CRC32 over all the entry's streams (SPEC 2.4)
        common = common | {"crc32"}
        if not _u32(e.get("crc32")):
            raise DczError(f"{where}: crc32 must be an integer 0 <= c < 2^32")
    if enc == "raw":
        if set(e) != common | {"shuffle", "streams"} or type(e["shuffle"]) is not bool:
            raise DczError(f"{where}: bad raw entry fields")
        counts = {"data": numel * itemsize}
    elif enc == "shared":
        layout = e.get("layout")
        keys = common | {"layout", "nonzero", "clusters", "streams"}
        grouped = "groups" in e or "group_rows" in e
        if grouped:
            if version < 2:
                raise DczError(f"{where}: grouped codebooks need format version 2 (the file "
                               f"says {version})")
            keys |= {"groups", "group_rows"}
            if version >= 3:  # G is derived: ceil(rows / group_rows)
                r = e.get("group_rows")
                if not _u64(r) or not 1 <= r <= max(shape[0] if shape else 0, 1):
                    raise DczError(f"{where}: group_rows must be 1..{max(shape[:1] + [1])} "
                                   "(the rows) in a tensor of at least one dimension")
                e["groups"] = -(-shape[0] // r)
        if layout == "capped":
            keys |= {"gap_bits"}
            if type(e.get("gap_bits")) is not int or not 1 <= e["gap_bits"] <= 8:
                raise DczError(f"{where}: gap_bits must be 1..8")
        for member in ("lines", "context"):  # version 3, ungrouped (SPEC 2.5, 2.6)
            if member in e:
                if version < 3 or grouped:
                    raise DczError(f"{where}: {member} needs format version 3 and one codebook")
                keys |= {member}
        if (set(e) != keys or dtype not in codec.SHAREABLE or not isinstance(layout, str)
                or layout not in ("dense", "capped", "escape")):
            raise DczError(f"{where}: bad shared entry fields")
        k, nonzero = e["clusters"], e["nonzero"]
        if not (_u64(k) and _u64(nonzero) and nonzero <= numel and k <= min(nonzero, 256)):
            raise DczError(f"{where}: clusters or nonzero out of range")
        if layout == "dense" and k > 255:
            raise DczError(f"{where}: the dense layout holds at most 255 clusters")
        if "lines" in e and (e["lines"] is not True or nonzero < 1):
            raise DczError(f"{where}: lines must be true, in an entry with a nonzero")
        if "context" in e:
            _check_context(e["context"], shape, numel, k, where)
        slots = k
        if grouped:
            _check_groups(e, shape, numel, where)
            slots = e["groups"] * k
        counts = {"codebook": slots * itemsize, "index": numel if layout == "dense" else nonzero}
        if e.get("lines"):
            rows, cols = codec.context.matrix_shape(shape, numel)
            counts.update(rows=(rows + 7) // 8, cols=(cols + 7) // 8)
            if layout == "dense":
                del counts["index"]  # the submatrix's cells: stated, checked once decoded
    else:
        raise DczError(f"{where}: unknown encoding {enc!r}")
    got = e["streams"]
    if not isinstance(got, dict) or set(got) != codec.stream_names(e):
        raise DczError(f"{where}: wrong set of streams")
    if version >= 3:  # the counts the compact records leave out (SPEC 2.4)
        derived = dict(counts, gaps=nonzero) if enc == "shared" and layout == "escape" else counts
        for sname, s in got.items():
            if (s["count"] is None) != (sname in derived):
                raise DczError(f"{where}: {sname} stream record has the wrong form")
            if s["count"] is None:
                s["count"] = derived[sname]
    for sname, s in got.items():
        index = enc == "shared" and sname == "index"
        _check_stream(s, f"{where} {sname}", version >= 3,
                      CODINGS_3 if index and "context" in e else streams.CODINGS)
        if index and ("context" in e) != (s["coding"] == "context"):
            raise DczError(f"{where}: an entry has a context model if and only if its index "
                           "stream is coded 'context'")
        if sname in counts and s["count"] != counts[sname]:
            raise DczError(f"{where}: {sname} stream holds {s['count']} symbols, "
                           f"expected {counts[sname]}")
    if "index" in got and got["index"]["count"] > max(numel, nonzero):
        raise DczError(f"{where}: index stream count out of range")
    if "gaps" in got and not nonzero <= got["gaps"]["count"] <= max(numel, nonzero):
        raise DczError(f"{where}: gaps stream count out of range")
    if "long_gaps" in got and got["long_gaps"]["count"] > 9 * got["gaps"]["count"]:
        raise DczError(f"{where}: long_gaps stream count out of range")
    return e


def _check_context(model: object, shape: list[int], numel: int, k: int, where: str) -> None:
    """A context model [t, near, far] and the limits of context coding (SPEC 2.6)."""
    if (not isinstance(model, list) or len(model) != 3 or not all(_int(x) for x in model)
            or model[0] not in (0, 1)):
        raise DczError(f"{where}: context must be [t, near, far] with t 0 or 1")
    rows, cols = codec.context.matrix_shape(shape, numel)
    codec.context.check(rows, cols, k, codec.context.Model(bool(model[0]), model[1], model[2]),
                        where)


def _check_groups(e: dict, shape: list[int], numel: int, where: str) -> None:
    """The grouping members of a shared entry (SPEC 2.1): G = ceil(rows / group_rows) groups of
    group_rows rows (the last one shorter), and K no larger than the elements of a group."""
    groups, group_rows = e["groups"], e["group_rows"]
    if not (_u64(groups) and _u64(group_rows)):
        raise DczError(f"{where}: groups and group_rows must be non-negative integers")
    if not shape:
        raise DczError(f"{where}: a grouped tensor needs at least one dimension")
    rows = shape[0]
    if not 1 <= group_rows <= max(rows, 1):
        raise DczError(f"{where}: group_rows must be 1..{max(rows, 1)} (the rows)")
    if groups != -(-rows // group_rows):
        raise DczError(f"{where}: {groups} groups, but {rows} rows in groups of {group_rows} "
                       f"make {-(-rows // group_rows)}")
    if e["clusters"] > group_rows * (numel // rows if rows else 0):
        raise DczError(f"{where}: {e['clusters']} clusters, more than the elements of a group")


def _declared_size(frame: bytes | bytearray, what: str) -> int:
    """The content size a version 3 header frame declares (SPEC 1: it MUST declare one, at most
    2^26); the frame itself is checked when it is decompressed."""
    if bytes(frame[:4]) != streams.ZSTD_MAGIC:
        raise DczError(f"{what}: not a zstd frame (wrong magic; skippable frames are refused)")
    try:
        declared = zstandard.get_frame_parameters(frame).content_size
    except zstandard.ZstdError as exc:
        raise DczError(f"{what}: corrupt zstd frame ({exc})") from None
    if declared == zstandard.CONTENTSIZE_UNKNOWN:
        raise DczError(f"{what}: the zstd frame does not declare its content size")
    if declared > MAX_HEADER_BYTES:
        raise DczError(f"{what}: declared size {declared} is too large")
    return declared


class DczFile(Mapping):
    """An open .dcz: validated header up front; each tensor decoded when first asked for."""

    def __init__(self, path: str | os.PathLike, max_elements: int = MAX_ELEMENTS,
                 max_bytes: int | None = None, check_program: bool = True):
        """Open and validate the file's preamble, trailer and header, and the architecture
        archive unless `check_program` is false (no tensor is decoded).

        `max_elements` caps each tensor (at most 2^62); `max_bytes` is the memory budget for
        decoding (default: the memory available now), checked before anything is allocated.
        """
        self.path = Path(path)
        self.max_bytes = available_memory() if max_bytes is None else max_bytes
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._parse(min(max_elements, 1 << 62))
            if check_program and self.program_record is not None:
                try:
                    _program.check(self.program(), self.entries)
                except DczError as exc:
                    raise DczError(f"{self.path}: {exc}") from None
        except MemoryError:
            self.close()
            raise DczError(f"{self.path}: header: not enough memory to parse it") from None
        except BaseException:
            self.close()
            raise
        self._cache: dict[str, torch.Tensor] = {}

    def _read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        got = os.preadv(self._fd, [buf], offset) if length else 0
        if got != length:
            raise DczError(f"{self.path}: file changed while reading")
        return buf

    def _parse(self, max_elements: int) -> None:
        size = os.fstat(self._fd).st_size
        self.file_bytes = size
        if size < PREAMBLE.size + TRAILER3.size:
            raise DczError(f"{self.path}: preamble: file too short ({size} bytes) to be a .dcz")
        magic, version, crc = PREAMBLE.unpack(self._read(0, PREAMBLE.size))
        if magic != MAGIC:
            raise DczError(f"{self.path}: preamble: not a .dcz file (wrong magic bytes)")
        if zlib.crc32(MAGIC + struct.pack("<I", version)) != crc:
            raise DczError(f"{self.path}: preamble: checksum mismatch")
        if version not in VERSIONS:
            raise DczError(f"{self.path}: preamble: format version {version} is not supported "
                           f"(this reader reads versions 1, 2 and 3); upgrade deepcompress")
        self.version = version
        tsize = TRAILER3.size if version >= 3 else TRAILER.size
        if size < PREAMBLE.size + tsize:
            raise DczError(f"{self.path}: preamble: file too short ({size} bytes) to be a .dcz")
        trailer = self._read(size - tsize, tsize)
        if zlib.crc32(trailer[:-4]) != struct.unpack_from("<I", trailer, tsize - 4)[0]:
            raise DczError(f"{self.path}: trailer: checksum mismatch (file truncated or corrupt)")
        if version >= 3:  # the header ends at the trailer; R is the frame's own content size
            h_len, h_crc, _ = TRAILER3.unpack(trailer)
            h_off, h_raw = size - tsize - h_len, None
        else:
            h_off, h_len, h_raw, h_crc, _ = TRAILER.unpack(trailer)
        if h_off < PREAMBLE.size or h_off + h_len != size - tsize:
            raise DczError(f"{self.path}: trailer: header position does not fit the file")
        if h_raw is not None and h_raw > MAX_HEADER_BYTES:
            raise DczError(f"{self.path}: header: declared size {h_raw} is too large")
        stored = self._read(h_off, h_len)
        if zlib.crc32(stored) != h_crc:
            raise DczError(f"{self.path}: header: checksum mismatch")
        if h_raw is None:
            h_raw = _declared_size(stored, f"{self.path}: header")
        raw = streams.zstd_decompress(stored, h_raw, f"{self.path}: header",
                                      dictionary=_HEADER_DICT_3 if version >= 3 else _HEADER_DICT)
        try:
            doc = parse_header(raw, version)
        except DczError as exc:
            raise DczError(f"{self.path}: {exc}") from None
        del raw, stored
        self.program_record = doc.get("program")
        entries: dict[str, dict] = {}
        try:
            for i, e in enumerate(doc["tensors"]):
                entries[e["name"] if isinstance(e, dict) else i] = _check_entry(
                    e, i, entries, max_elements, version)
        except DczError as exc:
            raise DczError(f"{self.path}: {exc}") from None
        records = [s for e in entries.values() for s in e.get("streams", {}).values()]
        if self.program_record is not None:
            records.append(self.program_record)
        spans = sorted((s["offset"], s["length"]) for s in records)
        at = PREAMBLE.size
        for off, length in spans:
            if off != at:
                raise DczError(f"{self.path}: header: streams leave a hole or overlap at byte {at}")
            at += length
        if at != h_off:
            raise DczError(f"{self.path}: header: streams do not end where the header starts")
        self.entries = entries
        self.metadata = doc["metadata"]
        self.header_bytes = h_len
        self.overhead_bytes = PREAMBLE.size + h_len + tsize

    def program(self) -> bytearray | None:
        """The architecture archive's checked bytes (see formats.program), or None if absent."""
        s = self.program_record
        if s is None:
            return None
        self._budget(s["length"] + 2 * s["count"], "the program stream")  # the archive reader copies
        data = self._read(s["offset"], s["length"])
        if zlib.crc32(data) != s["crc32"]:
            raise DczError(f"{self.path}: program stream: checksum mismatch")
        if s["coding"] == "raw":
            if len(data) != s["count"]:
                raise DczError(f"{self.path}: program: raw stream has {len(data)} bytes, "
                               f"expected {s['count']}")
            return data
        try:
            return streams.zstd_decompress(data, s["count"], f"{self.path}: program")
        except MemoryError:
            raise DczError(f"{self.path}: program: not enough memory to decode it") from None

    def payloads(self, name: str) -> dict[str, bytearray]:
        """The checked bytes of every stream of one stored tensor, by stream name: each
        stream's CRC32 checked (versions 1 and 2), or the entry's one CRC32 over all its
        streams (version 3), before any of them is returned."""
        e = self.entries[name]
        out, crc = {}, 0
        for k, s in e["streams"].items():
            out[k] = data = self._read(s["offset"], s["length"])
            if self.version < 3 and zlib.crc32(data) != s["crc32"]:
                raise DczError(f"{self.path}: tensor {name!r} {k} stream: checksum mismatch")
            crc = zlib.crc32(data, crc)
        if self.version >= 3 and crc != e["crc32"]:
            raise DczError(f"{self.path}: tensor {name!r}: checksum mismatch")
        return out

    def payload(self, name: str, stream: str) -> bytearray:
        """The checked bytes of one stream of one tensor (in version 3 the whole entry is read
        and checked: its checksum covers all its streams)."""
        if self.version >= 3:
            return self.payloads(name)[stream]
        s = self.entries[name]["streams"][stream]
        data = self._read(s["offset"], s["length"])
        if zlib.crc32(data) != s["crc32"]:
            raise DczError(f"{self.path}: tensor {name!r} {stream} stream: checksum mismatch")
        return data

    def _budget(self, need: int, what: str) -> None:
        if need > self.max_bytes:
            raise DczError(f"{self.path}: {what} needs about {need >> 20} MiB, above the memory "
                           f"budget of {self.max_bytes >> 20} MiB; free memory, pass a larger "
                           "max_bytes if the machine has it, or look with dcompress inspect "
                           "--header-only")

    def decode(self, name: str) -> torch.Tensor:
        """Decode one tensor (no caching; aliases decode their target)."""
        e = self.entries[name]
        if e["encoding"] == "alias":
            return self.decode(e["alias_of"])
        self._budget(decode_cost(e), f"tensor {name!r}")
        what = f"{self.path}: tensor {name!r}"
        try:
            data = self.payloads(name)
            payloads = {k: (s["coding"], s["count"], data[k]) for k, s in e["streams"].items()}
            return codec.decode_tensor(e, e["dtype"], e["shape"], payloads, what)
        except MemoryError:
            raise DczError(f"{what}: not enough memory to decode it") from None
        except DczError as exc:
            if str(exc).startswith(str(self.path)):
                raise
            raise DczError(f"{what}: {exc}") from None

    def __getitem__(self, name: str) -> torch.Tensor:
        """The tensor, decoded on first access; tied names give the same tensor object."""
        if name not in self.entries:
            raise KeyError(name)
        root = self.entries[name].get("alias_of", name)
        if root not in self._cache:
            self._cache[root] = self.decode(root)
        return self._cache[root]

    def __iter__(self) -> Iterator[str]:
        """Tensor names in file order."""
        return iter(self.entries)

    def __len__(self) -> int:
        """Number of tensors."""
        return len(self.entries)

    def load(self, names: Iterable[str] | None = None, workers: int | None = None
             ) -> dict[str, torch.Tensor]:
        """Decode the named tensors (all by default) in parallel threads; ties preserved."""
        wanted = list(self.entries) if names is None else list(names)
        missing = [n for n in wanted if n not in self.entries]
        if missing:
            raise KeyError(f"{self.path}: no tensor named {', '.join(map(repr, missing))}")
        roots = list(dict.fromkeys(self.entries[n].get("alias_of", n) for n in wanted))
        todo = [r for r in roots if r not in self._cache]
        workers = workers or min(4, os.cpu_count() or 1)
        if todo:
            costs = sorted((decode_cost(self.entries[r]) for r in todo), reverse=True)
            results = sum(math.prod(self.entries[r]["shape"])
                          * codec.DTYPES[self.entries[r]["dtype"]][1] for r in todo)
            self._budget(results + sum(costs[:workers]), f"decoding {len(todo)} tensors")
        if workers > 1 and len(todo) > 1:
            # largest first, so that the big tensors do not end up last on one core (zstd and
            # numpy release the GIL while they work)
            order = sorted(todo, key=lambda r: decode_cost(self.entries[r]), reverse=True)
            with ThreadPoolExecutor(workers) as pool:
                for r, t in zip(order, pool.map(self.decode, order), strict=True):
                    self._cache[r] = t
        else:
            for r in todo:
                self._cache[r] = self.decode(r)
        return {n: self[n] for n in wanted}

    def close(self) -> None:
        """Close the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DczFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()


def read(path: str | os.PathLike, names: Iterable[str] | None = None,
         max_elements: int = MAX_ELEMENTS, max_bytes: int | None = None
         ) -> dict[str, torch.Tensor]:
    """Decode the named tensors (all by default) of a .dcz, bit-exact, ties restored; every
    stream read is checked, and the architecture (if any) when the file is opened."""
    with DczFile(path, max_elements=max_elements, max_bytes=max_bytes) as f:
        return f.load(names)


def dense_nbytes(entry: dict) -> int:
    """fp32 size of a tensor entry (the reference for ratios)."""
    return 4 * int(np.prod(entry["shape"], dtype=np.int64))
