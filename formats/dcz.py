"""The `.dcz` container: a streaming writer and a reader that trusts nothing (see SPEC.md).

Layout: a 16-byte preamble, the streams of every tensor back to back, a zstd-compressed JSON
header that lists them, and a 32-byte trailer pointing at the header. Every part is covered by
a CRC32, so any flipped bit is caught on read.
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
from . import program as _program
from .errors import DczError

MAGIC = b"\x89DCZ\r\n\x1a\n"
VERSION = 2  # the newest version; a file that needs nothing of version 2 is written as version 1
VERSIONS = (1, 2)  # the versions this reader reads
PREAMBLE = struct.Struct("<8sII")  # magic, version, crc32 of the first 12 bytes
TRAILER = struct.Struct("<QQQII")  # header offset, header length, raw length, header crc, own crc
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
_STREAM_KEYS = {"offset", "length", "crc32", "coding", "count"}


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
    return 2 * out + 2 * symbols + stored + positions + grouped


def _storage_key(t: torch.Tensor) -> tuple | None:
    if t.device.type == "meta" or t.numel() == 0:
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
            t.dtype)


def _put(f, stream: streams.Stream, offset: int) -> dict:
    """Write a stream's payload at `offset`; its header record."""
    crc = 0
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
    version = 1  # until an entry needs version 2; the preamble is rewritten at the end
    f.write(_preamble(version))
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
        if "groups" in encoded.fields:
            version = 2
        entry.update(encoded.fields)
        entry["streams"] = {}
        for sname, stream in encoded.streams.items():
            entry["streams"][sname] = _put(f, stream, offset)
            offset += stream.nbytes
        entries.append(entry)
        del tensor, encoded  # before the iterator makes the next one
        if on_tensor is not None:
            on_tensor(name, offset)
    doc = {"tensors": entries, "metadata": meta}
    if program is not None:
        stream = streams.encode_bytes(np.frombuffer(program, dtype=np.uint8))
        doc["program"] = _put(f, stream, offset)
        offset += stream.nbytes
    raw = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    header = zstandard.ZstdCompressor(level=19, dict_data=_HEADER_DICT, write_dict_id=False,
                                      write_checksum=False).compress(raw)
    f.write(header)
    body = struct.pack("<QQQI", offset, len(header), len(raw), zlib.crc32(header))
    f.write(body + struct.pack("<I", zlib.crc32(body)))
    if version != 1:
        f.seek(0)
        f.write(_preamble(version))


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


def parse_header(raw: bytes | bytearray) -> dict:
    """The header's JSON object, parsed with caps on its size and its number of values."""
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


def _check_stream(s: object, where: str) -> None:
    if (not isinstance(s, dict) or set(s) != _STREAM_KEYS
            or not all(_u64(s[k]) for k in ("offset", "length", "count"))
            or type(s["crc32"]) is not int or not 0 <= s["crc32"] < (1 << 32)
            or not isinstance(s["coding"], str) or s["coding"] not in streams.CODINGS):
        raise DczError(f"{where}: bad stream record")


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
        if layout == "capped":
            keys |= {"gap_bits"}
            if type(e.get("gap_bits")) is not int or not 1 <= e["gap_bits"] <= 8:
                raise DczError(f"{where}: gap_bits must be 1..8")
        if (set(e) != keys or dtype not in codec.SHAREABLE or not isinstance(layout, str)
                or layout not in ("dense", "capped", "escape")):
            raise DczError(f"{where}: bad shared entry fields")
        k, nonzero = e["clusters"], e["nonzero"]
        if not (_u64(k) and _u64(nonzero) and nonzero <= numel and k <= min(nonzero, 256)):
            raise DczError(f"{where}: clusters or nonzero out of range")
        if layout == "dense" and k > 255:
            raise DczError(f"{where}: the dense layout holds at most 255 clusters")
        slots = k
        if grouped:
            _check_groups(e, shape, numel, where)
            slots = e["groups"] * k
        counts = {"codebook": slots * itemsize, "index": numel if layout == "dense" else nonzero}
    else:
        raise DczError(f"{where}: unknown encoding {enc!r}")
    got = e["streams"]
    if not isinstance(got, dict) or set(got) != codec.stream_names(e):
        raise DczError(f"{where}: wrong set of streams")
    for sname, s in got.items():
        _check_stream(s, f"{where} {sname}")
        if sname in counts and s["count"] != counts[sname]:
            raise DczError(f"{where}: {sname} stream holds {s['count']} symbols, "
                           f"expected {counts[sname]}")
    if "gaps" in got and not nonzero <= got["gaps"]["count"] <= max(numel, nonzero):
        raise DczError(f"{where}: gaps stream count out of range")
    if "long_gaps" in got and got["long_gaps"]["count"] > 9 * got["gaps"]["count"]:
        raise DczError(f"{where}: long_gaps stream count out of range")
    return e


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
        if size < PREAMBLE.size + TRAILER.size:
            raise DczError(f"{self.path}: preamble: file too short ({size} bytes) to be a .dcz")
        magic, version, crc = PREAMBLE.unpack(self._read(0, PREAMBLE.size))
        if magic != MAGIC:
            raise DczError(f"{self.path}: preamble: not a .dcz file (wrong magic bytes)")
        if zlib.crc32(MAGIC + struct.pack("<I", version)) != crc:
            raise DczError(f"{self.path}: preamble: checksum mismatch")
        if version not in VERSIONS:
            raise DczError(f"{self.path}: preamble: format version {version} is not supported "
                           f"(this reader reads versions 1 and 2); upgrade deepcompress")
        self.version = version
        trailer = self._read(size - TRAILER.size, TRAILER.size)
        h_off, h_len, h_raw, h_crc, t_crc = TRAILER.unpack(trailer)
        if zlib.crc32(trailer[:-4]) != t_crc:
            raise DczError(f"{self.path}: trailer: checksum mismatch (file truncated or corrupt)")
        if h_off < PREAMBLE.size or h_off + h_len != size - TRAILER.size:
            raise DczError(f"{self.path}: trailer: header position does not fit the file")
        if h_raw > MAX_HEADER_BYTES:
            raise DczError(f"{self.path}: header: declared size {h_raw} is too large")
        stored = self._read(h_off, h_len)
        if zlib.crc32(stored) != h_crc:
            raise DczError(f"{self.path}: header: checksum mismatch")
        raw = streams.zstd_decompress(stored, h_raw, f"{self.path}: header",
                                      dictionary=_HEADER_DICT)
        try:
            doc = parse_header(raw)
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
        self.overhead_bytes = PREAMBLE.size + h_len + TRAILER.size

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

    def payload(self, name: str, stream: str) -> bytearray:
        """The checked bytes of one stream of one tensor."""
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
            payloads = {k: (s["coding"], s["count"], self.payload(name, k))
                        for k, s in e["streams"].items()}
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
