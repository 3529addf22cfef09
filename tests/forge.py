"""Take a .dcz apart and put it back together with every checksum recomputed (attack tests)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import random
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zstandard

from deepcompress.formats import dcz

MAGIC = b"\x89DCZ\r\n\x1a\n"
PREAMBLE = struct.Struct("<8sII")
TRAILER = struct.Struct("<QQQII")  # versions 1 and 2
TRAILER3 = struct.Struct("<III")  # version 3: header length, header crc, own crc
ZSTD_MAGIC = 0xFD2FB528
PROGRAM: tuple[int, str] = (-1, "program")  # the stream key of the program archive
Key = tuple[int, str]  # (entry index, stream name), or PROGRAM
ENTRY_CRC = "*"  # pinned[(i, ENTRY_CRC)] = {"crc32"}: keep a version 3 entry's crc32 as it is
CODINGS = ("raw", "const", "zstd", "huffman", "context")  # version 3 coding codes (SPEC 2.4)
ENCODINGS = ("alias", "raw", "shared", "grouped")
_RECORD_KEYS = ("offset", "length", "crc32", "coding", "count")


# --- stream payload builders -------------------------------------------------------------------

def zstd_frame(data: bytes, content_size: bool = True, level: int = 3) -> bytes:
    """A plain zstd frame of data (with or without its content size)."""
    return zstandard.ZstdCompressor(level=level, write_content_size=content_size,
                                    write_checksum=False).compress(data)


def lying_zstd_frame(data: bytes, declared: int) -> bytes:
    """A zstd frame of `data` whose header declares `declared` content bytes (8-byte field)."""
    frame = zstd_frame(data, content_size=False)
    desc = frame[4]
    assert desc >> 5 & 1 == 0 and desc >> 6 == 0, "expected a windowed frame without size"
    head = 6 + (0, 1, 2, 4)[desc & 3]  # magic, descriptor, window, dictionary id
    return (frame[:4] + bytes([desc | 0xC0]) + frame[5:head] + struct.pack("<Q", declared)
            + frame[head:])


def skippable_frame(data: bytes, nibble: int = 0) -> bytes:
    """A zstd skippable frame (magic 0x184D2A5?) holding data."""
    return struct.pack("<II", 0x184D2A50 | (nibble & 15), len(data)) + data


def rle_zstd_frame(byte: int, size: int) -> bytes:
    """A small zstd frame of `size` copies of one byte, built from RLE blocks (a bomb)."""
    out = [struct.pack("<IB", ZSTD_MAGIC, 0xC0 | 0), bytes([0x70]), struct.pack("<Q", size)]
    block = 1 << 17
    for start in range(0, max(size, 1), block):
        n = min(block, size - start)
        last = start + block >= size
        header = (n << 3) | (1 << 1) | int(last)  # block type 1 = RLE
        out.append(header.to_bytes(3, "little") + bytes([byte]))
    return b"".join(out)


def varints(values: list[int]) -> bytes:
    """Unsigned LEB128 of each value, concatenated (few values; no numpy needed)."""
    out = bytearray()
    for v in values:
        while True:
            b = v & 0x7F
            v >>= 7
            out.append(b | (0x80 if v else 0))
            if not v:
                break
    return bytes(out)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code value of every symbol (SPEC 3: sorted by (length, symbol))."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.int64)
    used = np.flatnonzero(lengths)
    order = used[np.lexsort((used, lengths[used]))]
    code, prev = 0, 0
    for i, s in enumerate(order):  # one step per alphabet symbol, not per byte
        if i:
            code += 1
        code <<= int(lengths[s]) - prev
        prev = int(lengths[s])
        codes[s] = code
    return codes


def huffman_bits(symbols: np.ndarray, lengths: np.ndarray, pad_bit: int = 0) -> bytes:
    """The MSB-first bitstream of `symbols` under canonical `lengths`, padded with pad_bit."""
    symbols = np.asarray(symbols, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = canonical_codes(lengths)
    sym_len = lengths[symbols]
    total = int(sym_len.sum())
    starts = np.cumsum(sym_len) - sym_len
    owner = np.repeat(np.arange(symbols.size), sym_len)
    k = np.arange(total) - starts[owner]
    bits = (codes[symbols][owner] >> (sym_len[owner] - 1 - k)) & 1
    pad = (-total) % 8
    bits = np.concatenate((bits, np.full(pad, pad_bit, dtype=np.int64))).astype(np.uint8)
    return np.packbits(bits).tobytes()


def huffman_payload(symbols: np.ndarray, lengths: np.ndarray | list[int],
                    pad_bit: int = 0) -> bytes:
    """A `huffman` stream payload: u8 A-1, the A lengths, the bitstream."""
    lengths = np.asarray(lengths, dtype=np.uint8)
    return (bytes([lengths.size - 1]) + lengths.tobytes()
            + huffman_bits(symbols, lengths, pad_bit))


def flat_lengths(alphabet: int) -> np.ndarray:
    """A complete code over `alphabet` symbols (a power of two) with equal lengths."""
    return np.full(alphabet, int(math.log2(alphabet)), dtype=np.uint8)


def decode_payload(coding: str, count: int, payload: bytes) -> bytes:
    """The symbols of a stream of a file we trust (a real, unforged .dcz); context-coded
    streams are opaque here (their symbols depend on the whole entry)."""
    if coding == "context":
        raise ValueError("a context-coded stream has no symbols of its own")
    if count > 1 << 28:  # a forged record: the forge decodes only what the reader would
        raise ValueError(f"stream count {count} is beyond what the forge decodes")
    if coding == "raw":
        return bytes(payload)
    if coding == "const":
        return bytes(payload[:1]) * count
    if coding == "zstd":
        return zstandard.ZstdDecompressor().decompress(payload, max_output_size=count)
    from deepcompress.formats import huffman
    used = payload[0] + 1
    lengths = np.frombuffer(payload, dtype=np.uint8, count=used, offset=1)
    return huffman.decode(bytes(payload[1 + used:]), lengths, count).tobytes()


def pickle_that_touches(path: str) -> bytes:
    """A protocol-0 pickle that creates `path` when unpickled: proof that a pickle ran."""
    return f"cbuiltins\nopen\n(V{path}\nVw\ntR.".encode()


class _Nan:
    """Marker for a literal written into the JSON text (NaN, Infinity, -Infinity)."""

    def __init__(self, text: str):
        self.text = text


def _with_literals(doc: dict) -> bytes:
    """Dump doc, writing _Nan markers as bare literals (invalid JSON that Python accepts)."""
    marks: dict[str, str] = {}

    def default(o: object) -> object:
        if isinstance(o, _Nan):
            key = f"@@lit{len(marks)}@@"
            marks[key] = o.text
            return key
        raise TypeError(type(o).__name__)

    text = json.dumps(doc, separators=(",", ":"), default=default)
    for key, lit in marks.items():
        text = text.replace(json.dumps(key), lit)
    return text.encode()


# --- the file as parts -------------------------------------------------------------------------

@dataclass
class Forged:
    """A .dcz as parts: header doc, stream payloads in file order, and optional raw overrides.

    The doc is always in the version 1/2 form (objects with names). For a version 3 file each
    stored entry carries one `crc32` (over all its streams) and its stream records none; the
    compact header (SPEC 2.4) is made from the doc when the file is written, tolerantly: a
    value the compact form cannot hold (a count or a group count that differs from the one a
    reader derives, a member the entry does not have) is written as one more array member,
    which makes the array the wrong length. `compact_edits` then edit the compact array."""

    doc: dict
    payloads: dict[Key, bytes]
    version: int = 1
    header_text: bytes | None = None  # JSON bytes used instead of dumping doc
    header_frame: bytes | None = None  # zstd frame used instead of compressing the JSON
    declared_raw: int | None = None  # trailer's R instead of the JSON length (versions 1, 2)
    pinned: dict[Key, set[str]] = field(default_factory=dict)  # record fields left as they are
    gap: bytes = b""  # bytes no stream covers, before the header
    compact_edits: list[Callable[[list], None]] = field(default_factory=list)  # version 3
    header_length: int | None = None  # the trailer's header length instead of the frame's
    trailing: bytes = b""  # bytes after the header frame, counted in the header length
    preamble_version: int | None = None  # the preamble's version instead of `version`

    @classmethod
    def parse(cls, data: bytes) -> Forged:
        """Split a real .dcz into parts (no checks: it is ours)."""
        _, version, _ = PREAMBLE.unpack_from(data)
        if version >= 3:
            h_len = TRAILER3.unpack_from(data, len(data) - TRAILER3.size)[0]
            h_off = len(data) - TRAILER3.size - h_len
            raw = zstandard.ZstdDecompressor(dict_data=dcz._HEADER_DICT_3).decompress(
                data[h_off:h_off + h_len])
            doc = dcz.parse_header(raw, 3)  # expanded; the entry checks fill in the counts
            seen: dict[str, dict] = {}
            for i, e in enumerate(doc["tensors"]):
                seen[e["name"]] = dcz._check_entry(e, i, seen, 1 << 62, 3)
                for rec in e.get("streams", {}).values():
                    del rec["crc32"]
        else:
            h_off, h_len, h_raw, _, _ = TRAILER.unpack_from(data, len(data) - TRAILER.size)
            raw = zstandard.ZstdDecompressor(dict_data=dcz._HEADER_DICT).decompress(
                data[h_off:h_off + h_len], max_output_size=h_raw)
            doc = json.loads(raw)
        f = cls(doc, {}, version)
        spans = []
        for key in f.keys():
            rec = f.record(key)
            spans.append((rec["offset"], key, data[rec["offset"]:rec["offset"] + rec["length"]]))
        f.payloads = {key: payload for _, key, payload in sorted(spans)}
        return f

    @classmethod
    def read(cls, path: str | Path) -> Forged:
        """Parse the .dcz at path."""
        return cls.parse(Path(path).read_bytes())

    def set_version(self, version: int) -> None:
        """Write the file as another version: the doc moves between the per-stream CRCs of
        versions 1 and 2 and the per-entry CRC of version 3 (recomputed when written)."""
        for e in self.doc.get("tensors") or []:
            if not isinstance(e, dict) or not isinstance(e.get("streams"), dict):
                continue
            if version >= 3:
                e.setdefault("crc32", 0)
            else:
                e.pop("crc32", None)
            for rec in e["streams"].values():
                if isinstance(rec, dict):
                    if version >= 3:
                        rec.pop("crc32", None)
                    else:
                        rec.setdefault("crc32", 0)
        self.version = version

    def copy(self) -> Forged:
        """A deep copy to mutate."""
        return copy.deepcopy(self)

    def keys(self) -> list[Key]:
        """Keys of every stream record the doc holds, in doc order."""
        out: list[Key] = []
        for i, e in enumerate(self.doc.get("tensors") or []):
            if isinstance(e, dict) and isinstance(e.get("streams"), dict):
                out += [(i, s) for s, r in e["streams"].items() if isinstance(r, dict)]
        if isinstance(self.doc.get("program"), dict):
            out.append(PROGRAM)
        return out

    def record(self, key: Key) -> dict | None:
        """The stream record of key, or None if the doc no longer has it as an object."""
        try:
            rec = (self.doc["program"] if key == PROGRAM
                   else self.doc["tensors"][key[0]]["streams"][key[1]])
        except (KeyError, IndexError, TypeError):
            return None
        return rec if isinstance(rec, dict) else None

    def index(self, name: str) -> int:
        """Position of the entry named name."""
        return next(i for i, e in enumerate(self.doc["tensors"]) if e.get("name") == name)

    def entry(self, name: str) -> dict:
        """The entry named name."""
        return self.doc["tensors"][self.index(name)]

    def remove_entry(self, name: str) -> None:
        """Drop an entry and its payloads (later entries' keys move down by one)."""
        i = self.index(name)
        del self.doc["tensors"][i]
        self.payloads = {(k[0] - (k[0] > i), k[1]): v for k, v in self.payloads.items()
                         if k[0] != i}
        self.pinned = {(k[0] - (k[0] > i), k[1]): v for k, v in self.pinned.items() if k[0] != i}

    def set_stream(self, key: Key, payload: bytes, coding: str | None = None,
                   count: int | None = None) -> None:
        """Replace a stream's payload (and its coding and count, if given)."""
        rec = self.record(key)
        if rec is not None:
            if coding is not None:
                rec["coding"] = coding
            if count is not None:
                rec["count"] = count
        self.payloads[key] = bytes(payload)

    def symbols(self, key: Key) -> bytes:
        """The decoded symbols of a stream (only for parts of a real file)."""
        rec = self.record(key)
        return decode_payload(rec["coding"], rec["count"], self.payloads[key])

    def program_members(self) -> list[tuple[str, bytes]]:
        """(name, bytes) of every member of the program archive."""
        z = zipfile.ZipFile(io.BytesIO(self.symbols(PROGRAM)))
        return [(i.filename, z.read(i)) for i in z.infolist()]

    def set_program_members(self, members: list[tuple[str, bytes]]) -> None:
        """Replace the program archive by a stored zip of these members (zstd-coded)."""
        out = io.BytesIO()
        with (warnings.catch_warnings(), zipfile.ZipFile(out, "w") as z):
            warnings.simplefilter("ignore")  # duplicate names are an attack we want
            for name, data in members:
                z.writestr(name, data)
        archive = out.getvalue()
        self.set_stream(PROGRAM, zstd_frame(archive), "zstd", len(archive))

    def header_json(self) -> bytes:
        """The header JSON: header_text if set, else the doc (version 3: its compact form, with
        compact_edits applied), NaN and surrogates as Python writes them: NaN literals, \\ud800
        escapes."""
        if self.header_text is not None:
            return self.header_text
        if self.version < 3:
            return _with_literals(self.doc)
        top = copy.deepcopy(self.compact())
        for edit in self.compact_edits:
            edit(top)
        return _with_literals(top)

    def dictionary(self) -> zstandard.ZstdCompressionDict:
        """The header dictionary of this version."""
        return dcz._HEADER_DICT_3 if self.version >= 3 else dcz._HEADER_DICT

    def compact(self) -> object:
        """The version 3 header (SPEC 2.4) the doc describes, made tolerantly (class doc)."""
        doc = self.doc
        if not isinstance(doc, dict):
            return doc
        tensors = doc.get("tensors", _MISSING)
        positions: dict[str, int] = {}
        out: object = tensors
        if isinstance(tensors, list):
            out = []
            for i, e in enumerate(tensors):
                out.append(self._compact_entry(i, e, positions))
                if isinstance(e, dict) and _hashable(e.get("name")):
                    positions.setdefault(e["name"], i)
        top = [x for x in (out, doc.get("metadata", _MISSING)) if x is not _MISSING]
        if "program" in doc:
            top.append(self._compact_record(PROGRAM, doc["program"], None, "program"))
        top += [v for k, v in doc.items() if k not in ("tensors", "metadata", "program")]
        return top

    def _compact_entry(self, i: int, e: object, positions: dict[str, int]) -> object:
        if not isinstance(e, dict):
            return e
        enc = e.get("encoding", _MISSING)
        dtype = e.get("dtype", _MISSING)
        code = dcz.DTYPES_3.index(dtype) if _hashable(dtype) and dtype in dcz.DTYPES_3 else dtype
        used = {"name", "encoding", "dtype", "shape"}
        if enc == "alias":
            target = e.get("alias_of", _MISSING)
            j = positions.get(target, target) if _hashable(target) else target
            out = [e.get("name", _MISSING), 0, j]
            used.add("alias_of")
            t = self.doc["tensors"][j] if type(j) is int else None
            if not (isinstance(t, dict) and _same(t.get("dtype"), dtype)
                    and _same(t.get("shape"), e.get("shape"))):
                out += [dtype, e.get("shape", _MISSING)]  # not what the target says
        else:
            out = [e.get("name", _MISSING), enc, code, e.get("shape", _MISSING)]
            layout = e.get("layout", _MISSING)
            if enc == "raw":
                out[1] = 1
                shuffle = e.get("shuffle", _MISSING)
                out.append(int(shuffle) if isinstance(shuffle, bool) else shuffle)
                used.add("shuffle")
            elif enc == "shared":
                grouped = "groups" in e or "group_rows" in e
                out[1] = 3 if grouped else 2
                lcode = layout
                if layout == "capped":
                    lcode = e.get("gap_bits", _MISSING)
                elif _hashable(layout) and layout in ("dense", "escape"):
                    lcode = {"dense": 0, "escape": 9}[layout]
                if e.get("lines") is True and type(lcode) is int:
                    lcode += dcz.LINES
                out += [lcode, e.get("nonzero", _MISSING), e.get("clusters", _MISSING)]
                used |= {"layout", "gap_bits", "nonzero", "clusters", "groups", "group_rows",
                         "context"}
                if e.get("lines") is True:
                    used.add("lines")
                if grouped:
                    out.append(e.get("group_rows", _MISSING))
            elif _hashable(enc) and enc in ENCODINGS:
                out[1] = ENCODINGS.index(enc)
            out.append(e.get("crc32", _MISSING))
            used |= {"crc32", "streams"}
            recs = e.get("streams", _MISSING)
            if isinstance(recs, dict):
                order = [k[1] for k in self.payloads if k[0] == i and k[1] in recs]
                order += [k for k in recs if k not in order]
                out += [self._compact_record((i, k), recs[k], e, k) for k in order]
            else:
                out.append(recs)
            if enc == "shared" and ("groups" in e or "group_rows" in e):
                groups = e.get("groups", _MISSING)
                if not _same(groups, _derived_groups(e)):
                    out.append(groups)  # a group count the reader would not derive
        out += [e[k] for k in e if k not in used]
        return [x for x in out if x is not _MISSING]

    def _compact_record(self, key: Key, rec: object, e: dict | None, sname: str) -> object:
        if not isinstance(rec, dict):
            return rec
        coding = rec.get("coding", _MISSING)
        code = CODINGS.index(coding) if _hashable(coding) and coding in CODINGS else coding
        count = rec.get("count", _MISSING)
        out = [rec.get("length", _MISSING)]
        if e is None:  # the program: [length, crc32, coding, count]
            out += [rec.get("crc32", _MISSING), code, count]
        else:
            layout = e.get("layout")
            explicit = sname == "long_gaps" or (sname == "gaps" and layout == "capped")
            explicit = explicit or (sname == "index" and layout == "dense"
                                    and e.get("lines") is True)
            model = e.get("context", []) if coding == "context" else []
            model = list(model) if isinstance(model, list) else [model]  # tolerantly
            out += [code, *model, count] if explicit or not _same(
                count, _derived_count(e, sname)) else [code, *model]
        out += [v for k, v in rec.items() if k not in _RECORD_KEYS]
        return [x for x in out if x is not _MISSING]

    def to_bytes(self) -> bytes:
        """The file, with offsets, lengths and every CRC recomputed (except pinned fields)."""
        at = PREAMBLE.size
        entry_crcs: dict[int, int] = {}
        for key, payload in self.payloads.items():
            rec = self.record(key)
            crc = zlib.crc32(payload)
            if self.version >= 3 and key != PROGRAM:
                entry_crcs[key[0]] = crc = zlib.crc32(payload, entry_crcs.get(key[0], 0))
            if rec is not None:
                pins = self.pinned.get(key, set())
                for name, value in (("offset", at), ("length", len(payload)), ("crc32", crc)):
                    if name not in pins and (name != "crc32" or self.version < 3
                                             or key == PROGRAM):
                        rec[name] = value
            at += len(payload)
        for i, crc in entry_crcs.items():
            tensors = self.doc.get("tensors")
            e = tensors[i] if isinstance(tensors, list) and i < len(tensors) else None
            if (isinstance(e, dict) and "crc32" in e
                    and "crc32" not in self.pinned.get((i, ENTRY_CRC), set())):
                e["crc32"] = crc
        raw = self.header_json()
        frame = self.header_frame
        if frame is None:
            frame = zstandard.ZstdCompressor(level=19, dict_data=self.dictionary(),
                                             write_dict_id=False, write_checksum=False
                                             ).compress(raw)  # as the writer does
        frame += self.trailing
        head = MAGIC + struct.pack("<I", self.version if self.preamble_version is None
                                   else self.preamble_version)
        body = b"".join(self.payloads.values()) + self.gap
        h_off = PREAMBLE.size + len(body)
        if self.version >= 3:
            h_len = len(frame) if self.header_length is None else self.header_length
            data = head + struct.pack("<I", zlib.crc32(head)) + body + frame
            covered = data[len(data) - h_len:] if 0 <= h_len <= len(data) else frame
            trailer = struct.pack("<II", h_len & 0xFFFFFFFF, zlib.crc32(covered))
            return data + trailer + struct.pack("<I", zlib.crc32(trailer))
        r = len(raw) if self.declared_raw is None else self.declared_raw
        h_len = len(frame) if self.header_length is None else self.header_length
        trailer = struct.pack("<QQQI", h_off, h_len, r, zlib.crc32(frame))
        return (head + struct.pack("<I", zlib.crc32(head)) + body + frame + trailer
                + struct.pack("<I", zlib.crc32(trailer)))

    def write(self, path: str | Path) -> Path:
        """Write the file to path; returns path."""
        path = Path(path)
        path.write_bytes(self.to_bytes())
        return path


_MISSING = object()  # a member the doc does not have: left out of the compact array


def _hashable(x: object) -> bool:
    return isinstance(x, str | int | float | bool | type(None))


def _numel(e: dict) -> int:
    return math.prod(e["shape"])


def _derived_groups(e: dict) -> int | None:
    """ceil(rows / group_rows), as a version 3 reader derives G, or None if it cannot."""
    try:
        r = e["group_rows"]
        return -(-e["shape"][0] // r) if type(r) is int and r > 0 else None
    except (KeyError, IndexError, TypeError):
        return None


def _derived_count(e: dict, sname: str) -> int | None:
    """The count a version 3 reader derives for this stream of this entry, or None."""
    try:
        numel, itemsize = _numel(e), dcz.codec.DTYPES[e["dtype"]][1]
        if e["encoding"] == "raw":
            return numel * itemsize if sname == "data" else None
        if sname == "codebook":
            groups = _derived_groups(e) if "groups" in e or "group_rows" in e else 1
            return None if groups is None else groups * e["clusters"] * itemsize
        if sname == "index":
            return numel if e["layout"] == "dense" else e["nonzero"]
        if sname == "gaps" and e["layout"] == "escape":
            return e["nonzero"]
        if sname in ("rows", "cols") and e.get("lines") is True:
            rows, cols = dcz.codec.context.matrix_shape(e["shape"], numel)
            return ((rows if sname == "rows" else cols) + 7) // 8
    except (KeyError, TypeError, ValueError, OverflowError):
        pass
    return None


# --- the structured mutator --------------------------------------------------------------------

@dataclass
class Mutation:
    """One forged file: what was done, which issue class it tests, and what a reader must do.

    expect: "error" (DczError from every API call), "same" (a no-op: loads bit-exactly) or
    "any" (a valid but different file is possible: DczError or a clean load).
    """

    name: str
    kind: str
    expect: str
    forged: Forged

    def data(self) -> bytes:
        """The forged file's bytes."""
        return self.forged.to_bytes()


WRONG_KINDS: list[tuple[str, object]] = [
    ("list", []), ("list1", [1]), ("dict", {}), ("null", None), ("true", True), ("false", False),
    ("float", 1.5), ("float-int", 4.0), ("2^64", 1 << 64), ("2^63", 1 << 63), ("-1", -1),
    ("huge", 10 ** 40), ("NaN", _Nan("NaN")), ("Infinity", _Nan("Infinity")),
    ("-Infinity", _Nan("-Infinity")), ("surrogate", "\ud800"), ("empty", ""), ("zero", 0),
    ("str", "float32"),
]


def _same(a: object, b: object) -> bool:
    return type(a) is type(b) and a == b


def _stored(doc: dict) -> list[int]:
    return [i for i, e in enumerate(doc["tensors"]) if e.get("encoding") != "alias"]


def header_mutations(base: Forged, rng: random.Random, per_field: int = 3
                     ) -> Iterator[Mutation]:
    """Wrong kinds for every field of every entry, stream record, the top object and program."""
    doc = base.doc
    for i, e in enumerate(doc["tensors"]):
        for fname in e:
            if fname == "streams":
                continue
            for label, value in rng.sample(WRONG_KINDS, per_field):
                if _same(e[fname], value):
                    continue
                f = base.copy()
                f.doc["tensors"][i][fname] = copy.deepcopy(value)
                expect = "error"
                if fname == "name" and label == "surrogate":
                    expect = "any"  # a lone surrogate is a JSON string; the name is unique
                if fname == "name" and label == "str" and e["name"] != "float32":
                    expect = "any"
                if fname == "shuffle" and (isinstance(value, bool) or base.version >= 3
                                           and value in (0, 1) and type(value) is int):
                    expect = "any"  # version 3 writes the flag as 0 or 1
                if fname == "crc32":
                    f.pinned[(i, ENTRY_CRC)] = {"crc32"}
                yield Mutation(f"entry[{e['name']}].{fname}={label}", "value-kind", expect, f)
        # version 3 records hold no offset (implied by order) and no crc32 (the entry's)
        rfields = ("offset", "length", "crc32", "coding", "count") if base.version < 3 else (
            "length", "coding", "count")
        for sname in e.get("streams", {}):
            for rfield in rfields:
                for label, value in rng.sample(WRONG_KINDS, 2):
                    f = base.copy()
                    f.doc["tensors"][i]["streams"][sname][rfield] = copy.deepcopy(value)
                    f.pinned[(i, sname)] = {rfield}
                    code = (base.version >= 3 and rfield == "coding" and type(value) is int
                            and 0 <= value < len(CODINGS))  # a version 3 coding is a code
                    yield Mutation(f"entry[{e['name']}].{sname}.{rfield}={label}", "value-kind",
                                   "any" if code else "error", f)
            f = base.copy()
            f.doc["tensors"][i]["streams"][sname]["extra"] = 0
            yield Mutation(f"entry[{e['name']}].{sname}+extra", "extra-key", "error", f)
            label, value = rng.choice(WRONG_KINDS)
            f = base.copy()
            f.doc["tensors"][i]["streams"][sname] = copy.deepcopy(value)
            yield Mutation(f"entry[{e['name']}].{sname}={label}", "value-kind", "error", f)
        f = base.copy()
        f.doc["tensors"][i]["pickle"] = "cos\nsystem\n"
        yield Mutation(f"entry[{e['name']}]+extra", "extra-key", "error", f)
    for top in ("tensors", "metadata"):
        for label, value in rng.sample(WRONG_KINDS, 3):
            f = base.copy()
            f.doc[top] = copy.deepcopy(value)
            expect = "same" if top == "metadata" and value == {} else "error"
            yield Mutation(f"{top}={label}", "value-kind", expect, f)
    f = base.copy()
    f.doc["extra"] = 1
    yield Mutation("top+extra", "extra-key", "error", f)
    f = base.copy()
    f.doc["metadata"]["extra"] = {"nested": [1, 2, None]}
    yield Mutation("metadata+extra", "metadata", "same", f)
    for lit in ("NaN", "Infinity", "-Infinity"):
        f = base.copy()
        f.doc["metadata"]["acc"] = _Nan(lit)
        yield Mutation(f"metadata.acc={lit}", "value-kind", "error", f)
    f = base.copy()
    f.doc["metadata"]["who"] = "\ud83d"
    yield Mutation("metadata.who=surrogate", "metadata", "same", f)
    if "program" in doc:
        for label, value in [("null", None), ("list", []), ("true", True), ("-1", -1)]:
            f = base.copy()
            f.doc["program"] = value
            f.payloads.pop(PROGRAM)
            yield Mutation(f"program={label}", "value-kind", "error", f)
    else:
        f = base.copy()
        f.doc["program"] = None
        yield Mutation("program=null", "value-kind", "error", f)
    f = base.copy()
    if base.version < 3:
        text = base.header_json().decode()
        f.header_text = ('{"tensors":[],' + text[1:]).encode()
        yield Mutation("duplicate key tensors", "header", "error", f)
    f = base.copy()  # a marker in the metadata, replaced in the JSON text
    f.doc["metadata"]["@m@"] = 0
    marked = f.header_json()
    f.header_text = marked.replace(b'"@m@":0', b'"a":1,"a":2', 1)
    yield Mutation("duplicate key in metadata", "header", "error", f)
    f = base.copy()
    f.header_text = marked.replace(b'"@m@":0', b'"s":"\xed\xa0\x80"', 1)
    yield Mutation("header not UTF-8 (CESU surrogate)", "header", "error", f)
    f = base.copy()
    f.header_text = b"[" * 100_000 + b"]" * 100_000
    yield Mutation("header deep nesting", "header", "error", f)
    f = base.copy()
    f.header_text = base.header_json() + b" \x00"
    yield Mutation("header trailing NUL", "header", "error", f)
    f = base.copy()
    f.header_frame = lying_zstd_frame(base.header_json(), len(base.header_json()) + 7)
    yield Mutation("header zstd frame lies about its size", "zstd", "error", f)
    f = base.copy()
    f.header_frame = (skippable_frame(b"x" * 8) + zstandard.ZstdCompressor(
        dict_data=base.dictionary(), write_dict_id=False).compress(base.header_json()))
    yield Mutation("header after a skippable frame", "zstd", "error", f)
    f = base.copy()
    f.trailing = b"\x00"
    yield Mutation("a byte after the header frame", "zstd", "error", f)
    f = base.copy()
    f.trailing = skippable_frame(b"")
    yield Mutation("a skippable frame after the header frame", "zstd", "error", f)
    f = base.copy()
    f.version = 0
    yield Mutation("version 0", "preamble", "error", f)
    f = base.copy()
    f.gap = b"\x00" * 3
    yield Mutation("hole before header", "tiling", "error", f)
    if base.version >= 3:
        yield from compact_mutations(base, rng)


def _compact_edit(base: Forged, name: str, fn: Callable[[list], None], expect: str = "error",
                  kind: str = "compact") -> Mutation:
    f = base.copy()
    f.compact_edits.append(fn)
    return Mutation(f"v3 {name}", kind, expect, f)


def _put(path: tuple, value: object) -> Callable[[list], None]:
    """An edit that sets the compact header's member at path (indices) to value."""
    def fn(t: list) -> None:
        node = t
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = copy.deepcopy(value)
    return fn


def _resize(path: tuple, delta: int) -> Callable[[list], None]:
    """An edit that gives the array at path one member more (delta 1) or less (-1)."""
    def fn(t: list) -> None:
        node = t
        for p in path:
            node = node[p]
        if delta > 0:
            node.append(0)
        else:
            del node[-1]
    return fn


def _records(c: list) -> list[int]:
    return [j for j, x in enumerate(c) if isinstance(x, list) and j > 3]


def compact_mutations(base: Forged, rng: random.Random) -> Iterator[Mutation]:
    """Version 3: wrong kinds at every position of the compact header (SPEC 2.4): entry
    members (codes, shape, counts, the entry crc32) and stream record members."""
    top = base.compact()
    for i, c in enumerate(top[0]):
        e = base.doc["tensors"][i]
        name = e["name"]
        numel = math.prod(e["shape"])
        records = _records(c)
        for j, x in enumerate(c):
            if j in records:
                for m, y in enumerate(x):
                    for label, value in rng.sample(WRONG_KINDS, 2):
                        if _same(y, value):
                            continue
                        expect = "error"
                        if m == 1 and label == "zero" and x[1] == 1:  # const -> raw
                            expect = "any"
                        yield _compact_edit(base, f"{name}[{j}][{m}]={label}",
                                            _put((0, i, j, m), value), expect)
                continue
            for label, value in rng.sample(WRONG_KINDS, 3):
                if _same(x, value):
                    continue
                expect = "error"
                if j == 0 and label in ("surrogate", "str"):
                    expect = "any"  # another valid name
                if j == 2 and c[1] != 0 and type(value) is int:
                    expect = "any"  # another dtype: the same bytes can be valid (int64/float64)
                if j == 3 and isinstance(value, list) and (numel == 0 or c[1] == 1):
                    expect = "any"  # another shape with as many elements
                if j == 4 and c[1] == 1 and label == "zero":
                    expect = "any"  # shuffle 0
                yield _compact_edit(base, f"{name}[{j}]={label}", _put((0, i, j), value),
                                    expect)


def v3_rule_mutations(base: Forged) -> Iterator[Mutation]:
    """Version 3 rules, every one (deterministic): codes outside their tables, arrays one
    member too long or short, aliases that do not point back, group_rows out of range, header
    frames that do not declare their size, skippable frames, bytes after the frame, header
    lengths that do not fit, a version 3 layout under an older version number."""
    top = base.compact()
    size = len(base.to_bytes())

    def edit(name: str, fn: Callable[[list], None]) -> Mutation:
        return _compact_edit(base, name, fn)

    for i, c in enumerate(top[0]):
        e = base.doc["tensors"][i]
        name = e["name"]
        for j in _records(c):
            yield edit(f"{name}[{j}] one member more", _resize((0, i, j), 1))
            yield edit(f"{name}[{j}] one member less", _resize((0, i, j), -1))
            yield edit(f"{name}[{j}] coding code 5", _put((0, i, j, 1), 5))
        yield edit(f"{name} one member more", _resize((0, i), 1))
        yield edit(f"{name} one member less", _resize((0, i), -1))
        yield edit(f"{name} encoding code 4", _put((0, i, 1), 4))
        if c[1] == 0:
            yield edit(f"{name} alias of itself", _put((0, i, 2), i))
            yield edit(f"{name} alias of a later tensor", _put((0, i, 2), i + 1))
            yield edit(f"{name} alias of -1", _put((0, i, 2), -1))
            yield edit(f"{name} alias by name", _put((0, i, 2), e["alias_of"]))
            continue
        yield edit(f"{name} dtype code 14", _put((0, i, 2), 14))
        yield edit(f"{name} entry crc32 + 1", _put((0, i, len(c) - len(_records(c)) - 1),
                                                   (c[len(c) - len(_records(c)) - 1] + 1)
                                                   % (1 << 32)))
        if c[1] >= 2:
            yield edit(f"{name} layout code 20", _put((0, i, 4), 20))
        if c[1] == 3:
            rows = e["shape"][0]
            for label, value in (("0", 0), ("rows+1", rows + 1), ("-1", -1), ("bool", True)):
                yield edit(f"{name} group_rows {label}", _put((0, i, 7), value))
        if c[1] == 2 and e["shape"]:
            yield edit(f"{name} grouped code without group_rows", _put((0, i, 1), 3))
    yield from _line_and_context_mutations(base, top)
    yield edit("top one member more", lambda t: t.append([0, 0, 0, 0]))
    yield edit("top [tensors] only", lambda t: t.__delitem__(slice(1, None)))
    yield edit("top an object", lambda t: (t.clear(), t.append({"tensors": []})))
    yield edit("metadata an array", _put((1,), []))
    if len(top) == 3:
        for m in range(4):
            yield edit(f"program[{m}]=-1", _put((2, m), -1))
        yield edit("program crc32 + 1", _put((2, 1), (top[2][1] + 1) % (1 << 32)))
        yield edit("program one member less", _resize((2,), -1))
        yield edit("program one member more", _resize((2,), 1))
    f = base.copy()
    f.header_frame = zstandard.ZstdCompressor(
        level=3, dict_data=base.dictionary(), write_dict_id=False,
        write_content_size=False).compress(base.header_json())
    yield Mutation("v3 header frame without content size", "zstd", "error", f)
    f = base.copy()
    f.header_frame = skippable_frame(base.header_json())
    yield Mutation("v3 header a skippable frame", "zstd", "error", f)
    f = base.copy()
    f.header_frame = zstandard.ZstdCompressor(level=3).compress(base.header_json())
    yield Mutation("v3 header without the dictionary", "zstd", "same", f)  # it need not use it
    f = base.copy()
    f.header_frame = lying_zstd_frame(base.header_json(), 1 << 27)
    yield Mutation("v3 header declares 2^27 bytes", "allocation", "error", f)
    for label, value in (("0", 0), ("size", size), ("2^32-1", (1 << 32) - 1),
                         ("into the preamble", size - TRAILER3.size - 8)):
        f = base.copy()
        f.header_length = value
        yield Mutation(f"v3 header length {label}", "trailer", "error", f)
    for v in (1, 2):
        f = base.copy()
        f.preamble_version = v  # the version 3 header and trailer read as an older version
        yield Mutation(f"v3 file says version {v}", "preamble", "error", f)


def _line_and_context_mutations(base: Forged, top: list) -> Iterator[Mutation]:
    """Dead lines (SPEC 2.5) and context models (SPEC 2.6) that break a rule, or that change
    what a valid file says."""
    for i, c in enumerate(top[0]):
        e = base.doc["tensors"][i]
        name = e["name"]
        if e.get("encoding") != "shared":
            continue
        names = list(e["streams"])
        j = 8 + ("groups" in e) + names.index("index")  # the index record in the array
        if "context" in e:
            for label, m, expect in (("t 2", (2, 0, 0), "error"), ("near -1", (0, -1, 0), "error"),
                                     ("far 256", (0, 0, 256), "error"),
                                     ("near true", (0, True, 0), "error"),
                                     ("transposed", (1 - e["context"][0], *e["context"][1:]), "any"),
                                     ("near 1", (e["context"][0], 1, e["context"][2]), "any")):
                yield edit_context(base, f"{name} context {label}", i, j, m, expect)
            f = base.copy()
            f.doc["tensors"][i].pop("context")
            yield Mutation(f"v3 {name} context coding without a model", "context", "error", f)
        elif c[1] == 2:
            f = base.copy()
            f.doc["tensors"][i]["context"] = [0, 0, 0]
            f.record((i, "index"))["coding"] = "context"
            yield Mutation(f"v3 {name} another coding read as context", "context", "any", f)
        else:  # grouped: no context coding
            f = base.copy()
            f.doc["tensors"][i]["context"] = [0, 0, 0]
            f.record((i, "index"))["coding"] = "context"
            yield Mutation(f"v3 {name} grouped with a context model", "context", "error", f)
            f = base.copy()
            f.doc["tensors"][i]["lines"] = True
            f.set_stream((i, "rows"), b"\xff" * ((e["shape"][0] + 7) // 8), "raw")
            f.set_stream((i, "cols"), b"\xff" * ((_numel(e) // e["shape"][0] + 7) // 8), "raw")
            yield Mutation(f"v3 {name} grouped with dead lines", "lines", "error", f)
        if not e.get("lines"):
            continue
        rows, cols = dcz.codec.context.matrix_shape(e["shape"], _numel(e))
        for sname, n in (("rows", rows), ("cols", cols)):
            bits = np.unpackbits(np.frombuffer(base.symbols((i, sname)), np.uint8))
            dead = np.flatnonzero(bits[:n] == 0)
            for label, at in (("a dead line alive", dead[0]), ("a padding bit", n),
                              ("an alive line dead", np.flatnonzero(bits[:n])[0])):
                if at >= bits.size:
                    continue
                b = bits.copy()
                b[at] ^= 1
                f = base.copy()
                f.set_stream((i, sname), np.packbits(b).tobytes(), "raw")
                yield Mutation(f"v3 {name} {sname}: {label}", "lines", "error", f)
            f = base.copy()
            f.set_stream((i, sname), b"\xff" * (bits.size // 8), "raw")
            yield Mutation(f"v3 {name} {sname}: all alive, padding set", "lines", "error", f)
        f = base.copy()
        f.doc["tensors"][i].pop("lines")
        yield Mutation(f"v3 {name} bitmaps without lines", "lines", "error", f)


def edit_context(base: Forged, name: str, i: int, j: int, model: tuple, expect: str
                 ) -> Mutation:
    """Entry i's context model set to `model` in the compact header (its index record at j)."""
    def fn(t: list) -> None:
        t[0][i][j][2:5] = list(model)
    return _compact_edit(base, name, fn, expect, "context")


def stream_mutations(base: Forged, rng: random.Random) -> Iterator[Mutation]:
    """Payload attacks on every stream, checksums recomputed (the program stream's too: every
    API call checks the archive when it opens the file)."""
    yield from _stream_mutations(base, rng)


def _stream_mutations(base: Forged, rng: random.Random) -> Iterator[Mutation]:
    for key in base.keys():
        rec = base.record(key)
        payload = base.payloads[key]
        label = f"{'program' if key == PROGRAM else base.doc['tensors'][key[0]]['name']}.{key[1]}"
        count = rec["count"]
        if payload:
            f = base.copy()
            f.set_stream(key, rng.randbytes(len(payload)))
            yield Mutation(f"{label} random bytes", "stream", "any", f)
            f = base.copy()
            f.set_stream(key, payload[:-1])
            yield Mutation(f"{label} truncated by 1", "stream", "error", f)
            f = base.copy()
            f.set_stream(key, payload[: len(payload) // 2])
            yield Mutation(f"{label} truncated to half", "stream", "any" if len(payload) < 2
                           else "error", f)
        f = base.copy()
        f.set_stream(key, payload + b"\x00")
        yield Mutation(f"{label} one byte appended", "stream", "error", f)
        for big in (1 << 34, 1 << 40, (1 << 63) - 1):
            f = base.copy()
            f.record(key)["count"] = big
            yield Mutation(f"{label} count={big}", "allocation", "error", f)
        if count and rec["coding"] != "context":  # context payloads: the attacks above only
            symbols = base.symbols(key)
            f = base.copy()
            f.set_stream(key, lying_zstd_frame(symbols, count + 1), "zstd")
            yield Mutation(f"{label} zstd declares count+1", "zstd", "error", f)
            f = base.copy()
            f.set_stream(key, lying_zstd_frame(symbols, 1 << 34), "zstd", 1 << 34)
            yield Mutation(f"{label} zstd declares 2^34", "allocation", "error", f)
            f = base.copy()
            f.set_stream(key, skippable_frame(b"\x00" * 4) + zstd_frame(symbols), "zstd")
            yield Mutation(f"{label} skippable frame first", "zstd", "error", f)
            f = base.copy()
            f.set_stream(key, zstd_frame(symbols) + skippable_frame(b""), "zstd")
            yield Mutation(f"{label} skippable frame after", "zstd", "error", f)
            f = base.copy()
            f.set_stream(key, zstd_frame(symbols) + zstd_frame(b"\x01"), "zstd")
            yield Mutation(f"{label} second zstd frame", "zstd", "error", f)
            f = base.copy()
            f.set_stream(key, zstd_frame(symbols, content_size=False), "zstd")
            yield Mutation(f"{label} zstd without content size", "zstd", "error", f)
            f = base.copy()
            f.set_stream(key, zstd_frame(symbols), "zstd")
            yield Mutation(f"{label} re-coded as zstd", "stream", "same", f)
            f = base.copy()
            f.set_stream(key, symbols, "raw")
            yield Mutation(f"{label} re-coded as raw", "stream", "same", f)
            yield from _huffman_mutations(base, key, label, np.frombuffer(symbols, np.uint8), rng)


def _huffman_mutations(base: Forged, key: Key, label: str, symbols: np.ndarray,
                       rng: random.Random) -> Iterator[Mutation]:
    count = symbols.size
    top = int(symbols.max())
    same = "error" if key == PROGRAM else "same"  # a program stream is raw or zstd only
    alphabet = 1 << max(1, math.ceil(math.log2(top + 1)))
    if alphabet > 256:
        return
    lengths = flat_lengths(alphabet)  # complete, and its last length is nonzero
    f = base.copy()
    f.set_stream(key, huffman_payload(symbols, lengths), "huffman")
    yield Mutation(f"{label} re-coded as flat huffman", "huffman", same, f)
    f = base.copy()
    f.set_stream(key, huffman_payload(symbols, lengths, pad_bit=1), "huffman")
    bits = int(lengths[0]) * count
    yield Mutation(f"{label} huffman padding ones", "huffman",
                   same if bits % 8 == 0 else "error", f)
    f = base.copy()
    f.set_stream(key, huffman_payload(symbols, lengths) + b"\x00", "huffman")
    yield Mutation(f"{label} huffman extra byte", "huffman", "error", f)
    f = base.copy()
    f.set_stream(key, bytes([1, 1, 1]) + b"\x00" * 4, "huffman", 1 << 34)
    yield Mutation(f"{label} huffman 2^34 symbols in 4 bytes", "allocation", "error", f)
    if top == 0:
        return
    for name, table in [("one symbol", [0] * top + [1]),
                        ("incomplete", [1] + [0] * (top - 1) + [2]),
                        ("over-complete", [1] * (top + 1) if top >= 2 else [1, 1, 1]),
                        ("length 32", [1] + [0] * (top - 1) + [32]),
                        ("trailing zero", [1] * 2 + [0] * max(0, top - 1))]:
        f = base.copy()
        f.set_stream(key, bytes([len(table) - 1]) + bytes(t & 0xFF for t in table)
                     + rng.randbytes(max(1, count // 8)), "huffman")
        yield Mutation(f"{label} huffman table {name}", "huffman", "error", f)


def layout_mutations(base: Forged, rng: random.Random) -> Iterator[Mutation]:
    """Attacks on the position streams of sparse entries and on bool bytes."""
    for i in _stored(base.doc):
        e = base.doc["tensors"][i]
        if e["encoding"] == "raw" and e["dtype"] == "bool" and base.record((i, "data"))["count"]:
            data = bytearray(base.symbols((i, "data")))
            data[rng.randrange(len(data))] = 2
            f = base.copy()
            f.set_stream((i, "data"), bytes(data), "raw", len(data))
            yield Mutation(f"{e['name']} bool byte 2", "value-kind", "error", f)
        if e["encoding"] != "shared" or e["layout"] == "dense":
            continue
        name = e["name"]
        if e["layout"] == "capped":
            m = (1 << e["gap_bits"]) - 1
            f = _empty_sparse(base, i)
            f.set_stream((i, "gaps"), bytes([m]), "const", 5)
            yield Mutation(f"{name} capped fillers only, nonzero 0", "capped", "error", f)
            gaps = bytearray(base.symbols((i, "gaps")))
            f = base.copy()
            f.set_stream((i, "gaps"), bytes(gaps) + bytes([m]), "raw", len(gaps) + 1)
            yield Mutation(f"{name} capped ends with a filler", "capped", "error", f)
            f = base.copy()
            gaps[0] = min(255, m + 1)
            f.set_stream((i, "gaps"), bytes(gaps), "raw", len(gaps))
            yield Mutation(f"{name} capped symbol above cap", "capped", "error", f)
            f = base.copy()
            numel = math.prod(e["shape"])
            f.set_stream((i, "gaps"), bytes([m]), "const", numel)
            yield Mutation(f"{name} capped all fillers", "capped", "error", f)
        else:
            gaps = np.frombuffer(base.symbols((i, "gaps")), np.uint8).copy()
            numel = math.prod(e["shape"])
            for label, extra in [("2^31", 1 << 31), ("2^32-256", (1 << 32) - 256),
                                 ("2^63-1", (1 << 63) - 1), ("numel", numel),
                                 ("2^64 (10 bytes)", 1 << 64)]:
                f = base.copy()
                g = gaps.copy()
                g[0] = 255
                old = np.count_nonzero(gaps == 255)
                vs = varints([extra] + [0] * (old - (1 if gaps[0] == 255 else 0)))
                f.set_stream((i, "gaps"), g.tobytes(), "raw", g.size)
                f.set_stream((i, "long_gaps"), vs, "raw", len(vs))
                yield Mutation(f"{name} escape long gap {label}", "wraparound", "error", f)
            f = base.copy()
            lg = base.symbols((i, "long_gaps"))
            f.set_stream((i, "long_gaps"), lg + b"\x00", "raw", len(lg) + 1)
            yield Mutation(f"{name} escape extra varint", "escape", "error", f)
            f = base.copy()
            f.set_stream((i, "long_gaps"), lg + b"\x80", "raw", len(lg) + 1)
            yield Mutation(f"{name} escape unterminated varint", "escape", "error", f)
            f = _empty_sparse(base, i)
            f.set_stream((i, "gaps"), b"", "raw", 0)
            f.set_stream((i, "long_gaps"), b"\x05", "raw", 1)
            yield Mutation(f"{name} escape varint without escape", "escape", "error", f)


_INT = {"float64": np.int64, "float32": np.int32, "float16": np.int16, "bfloat16": np.int16}


def _slots(base: Forged, i: int) -> np.ndarray:
    """The [G, K] codebook slots (bit patterns) of grouped entry i, a writable copy."""
    e = base.doc["tensors"][i]
    flat = np.frombuffer(base.symbols((i, "codebook")), _INT[e["dtype"]]).copy()
    return flat.reshape(e["groups"], e["clusters"])


def _set_slots(f: Forged, i: int, slots: np.ndarray) -> None:
    data = np.ascontiguousarray(slots).tobytes()
    f.set_stream((i, "codebook"), data, "raw", len(data))


def _group_sizes(slots: np.ndarray) -> np.ndarray:
    return (slots != 0).sum(axis=1)


def grouped_mutations(base: Forged) -> Iterator[Mutation]:
    """Attacks on grouped (version 2) entries: groups and group_rows that lie, codebooks that
    break the padding, distinctness or fill rules, indices past their group's codebook, and a
    grouped entry in a version 1 file. Deterministic (no randomness): the same list each time."""
    for i in _stored(base.doc):
        if "groups" in base.doc["tensors"][i]:
            yield from _grouped_entry_mutations(base, i)


def _grouped_entry_mutations(base: Forged, i: int) -> Iterator[Mutation]:
    e = base.doc["tensors"][i]
    name, groups, rows, k = e["name"], e["groups"], e["shape"][0], e["clusters"]
    gsize = e["group_rows"] * (math.prod(e["shape"]) // rows)
    slots = _slots(base, i)
    sizes = _group_sizes(slots)

    def edit(label: str, fn: Callable[[Forged, dict], None], expect: str = "error") -> Mutation:
        f = base.copy()
        fn(f, f.doc["tensors"][i])
        return Mutation(f"{name} {label}", "grouped", expect, f)

    for label, kw in [("groups+1", {"groups": groups + 1}), ("groups-1", {"groups": groups - 1}),
                      ("groups 0", {"groups": 0}), ("group_rows 0", {"group_rows": 0}),
                      ("group_rows rows+1", {"group_rows": rows + 1}),
                      ("group_rows+1", {"group_rows": e["group_rows"] + 1}),
                      ("group_rows 2^63", {"group_rows": 1 << 63}),
                      ("groups 2^40", {"groups": 1 << 40}), ("clusters 257", {"clusters": 257}),
                      ("grouped scalar", {"shape": []})]:
        yield edit(label, lambda f, en, kw=kw: en.update(kw))

    def more_groups(f: Forged, en: dict) -> None:  # a codebook that matches one more group
        en["groups"] = groups + 1
        _set_slots(f, i, np.concatenate((slots, slots[:1])))
    yield edit("groups+1 with a codebook to match", more_groups)
    yield edit("groups without group_rows", lambda f, en: en.pop("group_rows"))
    if base.version < 3:  # version 3 has no groups member: G is derived from group_rows
        yield edit("group_rows without groups", lambda f, en: en.pop("groups"))
    yield edit("grouping members dropped", lambda f, en: (en.pop("groups"), en.pop("group_rows")))
    yield edit("in a version 1 file", lambda f, en: f.set_version(1))

    def wider(f: Forged, en: dict) -> None:  # one more slot per group: no group fills them all
        en["clusters"] = k + 1
        _set_slots(f, i, np.concatenate((slots, np.zeros((groups, 1), slots.dtype)), 1))
    yield edit("clusters+1, padded codebooks", wider)

    full = int(np.flatnonzero(sizes == k)[0])

    def changed(at: tuple[int, int], value: object) -> Callable[[Forged, dict], None]:
        def fn(f: Forged, en: dict) -> None:
            s2 = slots.copy()
            s2[at] = s2[full, 0] if value == "repeat" else value
            _set_slots(f, i, s2)
        return fn
    if k >= 2:
        yield edit("a group repeats a value", changed((full, 1), "repeat"))
        yield edit("a zero slot before a value", changed((full, 0), 0))
    short = np.flatnonzero(sizes < k - 1)
    if short.size:  # -0.0 is a value, not padding: a value after a zero slot
        yield edit("padding -0.0", changed((int(short[0]), k - 1), np.iinfo(slots.dtype).min))

    if e["layout"] == "dense" and (sizes < k).any():
        g = int(np.flatnonzero(sizes < k)[0])

        def past(f: Forged, en: dict) -> None:  # an element gets the symbol past its codebook
            symbols = bytearray(base.symbols((i, "index")))
            en["nonzero"] = e["nonzero"] + (symbols[g * gsize] == 0)
            symbols[g * gsize] = int(sizes[g]) + 1
            f.set_stream((i, "index"), bytes(symbols), "raw", len(symbols))
        yield edit(f"index past group {g}'s codebook", past)
    if e["layout"] != "dense" and e["nonzero"]:
        g = int(_positions(base, i)[0] // gsize)

        def shrink(f: Forged, en: dict) -> None:  # the first nonzero's group loses slot K-1
            symbols = bytearray(base.symbols((i, "index")))
            symbols[0] = k - 1
            s2 = slots.copy()
            s2[g, k - 1] = 0
            _set_slots(f, i, s2)
            f.set_stream((i, "index"), bytes(symbols), "raw", len(symbols))
        yield edit(f"sparse index past group {g}'s codebook", shrink)


def _positions(base: Forged, i: int) -> np.ndarray:
    """The flat nonzero positions of sparse entry i of a real file."""
    from deepcompress.formats import csr
    e = base.doc["tensors"][i]
    numel = math.prod(e["shape"])
    gaps = np.frombuffer(base.symbols((i, "gaps")), np.uint8)
    if e["layout"] == "capped":
        return csr.decode_capped(gaps, e["gap_bits"], e["nonzero"], numel, "forge")
    long_gaps = np.frombuffer(base.symbols((i, "long_gaps")), np.uint8)
    return csr.decode_escape(gaps, long_gaps, e["nonzero"], numel, "forge")


def _empty_sparse(base: Forged, i: int) -> Forged:
    """A copy where entry i claims nonzero 0 and clusters 0, with empty codebook and index."""
    f = base.copy()
    f.doc["tensors"][i].update(nonzero=0, clusters=0)
    f.set_stream((i, "codebook"), b"", "raw", 0)
    f.set_stream((i, "index"), b"", "raw", 0)
    return f


def program_mutations(base: Forged, rng: random.Random, sentinel: str) -> Iterator[Mutation]:
    """Attacks on the members of the program archive (pickles that would touch `sentinel`)."""
    if PROGRAM not in base.payloads:
        return
    members = base.program_members()
    top = members[0][0].split("/", 1)[0]
    bomb = pickle_that_touches(sentinel)

    def edit(name: str, fn: Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]],
             expect: str = "error") -> Mutation:
        f = base.copy()
        f.set_program_members(fn([(n, d) for n, d in members]))
        return Mutation(f"program {name}", "program", expect, f)

    def replace(suffix: str, data: bytes) -> Callable:
        return lambda ms: [(n, data if n.endswith(suffix) else d) for n, d in ms]

    yield edit("re-zipped unchanged", lambda ms: ms, "same")
    yield edit("pickled sample inputs", replace("sample_inputs/model.pt", bomb))
    yield edit("extra pickle member", lambda ms: ms + [(f"{top}/data/x.pkl", bomb)])
    yield edit("member outside archive", lambda ms: ms + [("../evil.json", b"{}")])
    yield edit("second top folder", lambda ms: ms + [("other/data/sample_inputs/m.pt", bomb)])
    yield edit("no members", lambda ms: [])
    yield edit("duplicate sample inputs member",
               lambda ms: ms + [(f"{top}/data/sample_inputs/model.pt", bomb)])

    def use_pickle(value: object) -> Callable:
        def fn(ms: list) -> list:
            out = []
            for n, d in ms:
                if n.endswith("model_weights_config.json"):
                    cfg = json.loads(d)
                    for v in cfg["config"].values():
                        v["use_pickle"] = value
                    d = json.dumps(cfg).encode()
                elif "/data/weights/weight_" in n:
                    d = bomb
                out.append((n, d))
            return out
        return fn

    yield edit("use_pickle true", use_pickle(True))
    yield edit("use_pickle 1", use_pickle(1))
    yield edit("use_pickle missing", use_pickle(None))
    yield edit("use_pickle string", use_pickle("false"))
    yield edit("weights config a list", replace("model_weights_config.json", b'{"config": []}'))
    yield edit("weights config NaN", replace("model_weights_config.json", b'{"config": NaN}'))
    yield edit("weights config deep", replace("model_weights_config.json",
                                              b"[" * 50_000 + b"]" * 50_000))
    yield edit("model.json garbage", replace("models/model.json", rng.randbytes(64)))
    yield edit("model.json empty object", replace("models/model.json", b"{}"))
    yield edit("archive_format wrong", replace("archive_format", b"pickle"))
    yield edit("byteorder wrong", replace("byteorder", b"big-endian"))
    f = base.copy()
    f.set_stream(PROGRAM, rng.randbytes(200), "raw", 200)
    yield Mutation("program random bytes", "program", "error", f)
    f = base.copy()
    f.set_stream(PROGRAM, b"\x00", "const", 1 << 30)
    yield Mutation("program const 2^30 bytes", "allocation", "error", f)
    f = base.copy()
    f.set_stream(PROGRAM, lying_zstd_frame(b"PK", 1 << 30), "zstd", 1 << 30)
    yield Mutation("program zstd declares 2^30", "allocation", "error", f)


def mutations(base: Forged, seed: int = 0, sentinel: str = "/tmp/dcz-pickle-ran",
              limit: int | None = None) -> list[Mutation]:
    """Every structured mutation of base (a sample of `limit` of them), deterministic in seed."""
    rng = random.Random(seed)
    out = [*header_mutations(base, rng), *stream_mutations(base, rng),
           *layout_mutations(base, rng), *program_mutations(base, rng, sentinel)]
    if limit is not None and len(out) > limit:
        keep = sorted(rng.sample(range(len(out)), limit))
        out = [out[i] for i in keep]
    return out


def random_mutation(base: Forged, rng: random.Random, sentinel: str = "/tmp/dcz-pickle-ran"
                    ) -> Mutation:
    """One random structured mutation (for the fuzzer): a random generator, a random pick."""
    gens = [lambda: header_mutations(base, rng, 1), lambda: stream_mutations(base, rng),
            lambda: layout_mutations(base, rng), lambda: program_mutations(base, rng, sentinel),
            lambda: grouped_mutations(base)]
    while True:
        found = list(rng.choice(gens)())
        if found:
            return rng.choice(found)


# --- base files and the three API calls --------------------------------------------------------

def _shared(shape: tuple[int, ...], density: float, k: int, dtype: object, seed: int) -> object:
    import torch
    g = torch.Generator().manual_seed(seed)
    codebook = torch.linspace(-1, 1, k + 1, dtype=torch.float64)
    codebook = codebook[codebook != 0][:k].to(dtype)
    idx = torch.randint(0, k, shape, generator=g)
    keep = torch.rand(shape, generator=g) < density
    return torch.where(keep, codebook[idx], torch.zeros((), dtype=dtype))


def _tiny_mlp_class() -> type:
    import torch

    class TinyMLP(torch.nn.Module):
        """4 -> 8 -> 3, ReLU."""

        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(4, 8)
            self.fc2 = torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """The logits."""
            return self.fc2(torch.relu(self.fc1(x)))

    return TinyMLP


def _per_row(rows: int, cols: int, k: int, dtype: object, density: float, seed: int) -> object:
    """rows x cols with k distinct nonzero values per row, each row its own scale."""
    import torch
    g = torch.Generator().manual_seed(seed)
    levels = torch.arange(1, k + 1, dtype=torch.float64) - (k + 1) / 2 + 0.25
    w = (levels[torch.randint(0, k, (rows, cols), generator=g)]
         * (torch.rand(rows, 1, generator=g, dtype=torch.float64) + 0.5)).to(dtype)
    return torch.where(torch.rand(rows, cols, generator=g) < density, w, torch.zeros((), dtype=dtype))


def _dead_lines(w: object, more: int = 0) -> object:
    """w with rows 0, 3, 4, columns 1, 2, 9, the last and `more` after 10 all zero (dead
    lines, SPEC 2.5)."""
    w = w.clone()
    w[[0, 3, 4]] = 0
    w[:, [1, 2, 9, -1]] = 0
    w[:, 10:10 + more] = 0
    return w


def grouped_tensors() -> dict:
    """Grouped (version 2) entries: per-row dense and capped, and a declared escape entry with
    groups of 7 rows, the last shorter, one of them all zero."""
    import torch

    from deepcompress.formats.codec import Shared
    dense = _per_row(40, 300, 10, torch.float32, 1.0, 4)
    dense[5] = 0  # an empty group
    g = torch.Generator().manual_seed(5)
    index = torch.full((50, 4000), -1, dtype=torch.int64)
    spots = torch.randint(0, index.numel(), (120,), generator=g)
    index.view(-1)[spots] = torch.randint(0, 3, (120,), generator=g)
    index.view(-1)[[7, 150_000]] = 1  # ...and a gap of over 255 + 2^7 zeros (a long varint)
    index[7:14] = -1  # group 1 all zero
    codebook = torch.randn(8, 3, generator=g).to(torch.bfloat16)
    return {"gdense": dense, "gcapped": _per_row(64, 500, 8, torch.float16, 0.1, 6),
            "gescape": Shared(codebook, index, 7)}


def build_bases(folder: str | Path) -> dict[str, Path]:
    """Small real files to forge from: every layout, raw dtypes, aliases, and a program (in
    the version the writer writes, 3), and the shared and grouped files as versions 1 and 2."""
    import torch

    import deepcompress
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    escape = torch.zeros(200_000, dtype=torch.bfloat16)
    escape[[3, 10, 50_000, 50_001, 199_999]] = torch.tensor([0.5, -1.0, 0.5, 2.0, -1.0],
                                                             dtype=torch.bfloat16)
    dense = _shared((24, 24), 0.9, 12, torch.float32, 1)
    tensors = {
        "dense": dense,
        "dense_tied": dense,
        "capped": _shared((64, 48), 0.15, 8, torch.float16, 2),
        "escape": escape,
        "dense64": _shared((9, 7), 0.7, 5, torch.float64, 3),
        "lined": _dead_lines(_shared((30, 40), 0.8, 6, torch.float32, 7)),
        "lined_sparse": _dead_lines(_shared((40, 300), 0.08, 4, torch.float16, 8), 150),
    }
    raw = {
        "f32": torch.randn(20, generator=g),
        "i64": torch.arange(-3, 4, dtype=torch.int64),
        "flag": torch.rand(17, generator=g) < 0.5,
        "e4m3": torch.randn(12, generator=g).to(torch.float8_e4m3fn),
        "e5m2": torch.randn(6, generator=g).to(torch.float8_e5m2),
        "u8": torch.arange(9, dtype=torch.uint8),
        "c64": torch.randn(3, generator=g, dtype=torch.complex64),
        "scalar": torch.tensor(7, dtype=torch.int32),
        "empty": torch.zeros(0, 3),
    }
    out = {"shared": folder / "shared.dcz", "raw": folder / "raw.dcz",
           "program": folder / "program.dcz", "grouped": folder / "grouped.dcz"}
    deepcompress.save(tensors, out["shared"], metadata={"note": "forge base"})
    deepcompress.save(grouped_tensors(), out["grouped"])
    deepcompress.save(raw, out["raw"])
    torch.manual_seed(0)
    model = _tiny_mlp_class()()
    with torch.no_grad():
        model.fc1.weight[model.fc1.weight.abs() < 0.3] = 0
    example = torch.randn(2, 4)
    deepcompress.save(model, out["program"],
                      program=deepcompress.export_program(model, example))
    plain = {"shared": folder / "shared-plain.dcz", "grouped": out["grouped"]}
    with without_v3_coding():  # what versions 1 and 2 can say: no dead lines, no contexts
        deepcompress.save(tensors, plain["shared"], metadata={"note": "forge base"})
    for name, version in (("shared", 1), ("grouped", 2)):  # the older versions, still read
        legacy = Forged.read(plain[name])
        legacy.set_version(version)
        out[f"{name}-v{version}"] = legacy.write(folder / f"{name}-v{version}.dcz")
    return out


@contextlib.contextmanager
def without_v3_coding() -> Iterator[None]:
    """The writer with dead-line removal and context coding switched off."""
    from deepcompress.formats import codec
    lines_of, try_context = codec._lines_of, codec._try_context
    codec._lines_of = lambda positions, rows, cols: (np.ones(rows, bool), np.ones(cols, bool))
    codec._try_context = lambda *args: None
    try:
        yield
    finally:
        codec._lines_of, codec._try_context = lines_of, try_context


def digest(state: dict) -> str:
    """A hash of names, dtypes, shapes and bytes of tensors (bit-exact comparison)."""
    import hashlib

    import torch
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(repr((name, str(t.dtype), tuple(t.shape))).encode("utf-8", "backslashreplace"))
        if t.numel():
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


API_CALLS = ("load_state_dict", "load", "open_lazy")


def call_api(api: str, path: str | Path) -> str:
    """Run one API call on a file: 'ok:<digest>', 'weights-only', 'DczError' or 'Type: msg'."""
    import deepcompress
    try:
        if api == "load_state_dict":
            return "ok:" + digest(deepcompress.load_state_dict(path))
        if api == "load":
            return "ok:" + digest(deepcompress.load(path).state_dict())
        f = deepcompress.open_lazy(path)
        try:
            return "ok:" + digest({n: f[n] for n in f})
        finally:
            f.close()
    except deepcompress.DczError:
        return "DczError"
    except deepcompress.CompressError as exc:
        if api == "load" and "holds weights only" in str(exc):
            return "weights-only"
        return f"CompressError: {' '.join(str(exc).split())[:300]}"
    except Exception as exc:  # anything else is a finding
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def check_file(path: str | Path) -> dict[str, str]:
    """The outcome of each API call on a file."""
    return {api: call_api(api, path) for api in API_CALLS}


def verdict(expect: str, got: dict[str, str], reference: dict[str, str] | None) -> list[str]:
    """Problems with the outcomes of a case: empty when the reader behaved."""
    bad = []
    for api, res in got.items():
        ok = res.startswith("ok:") or res == "weights-only"
        if expect == "error":
            if res != "DczError":
                bad.append(f"{api}: {'loaded without error' if ok else res}")
        elif expect == "same":
            if not ok:
                bad.append(f"{api}: a no-op was refused: {res}")
            elif reference is not None and res != reference[api]:
                bad.append(f"{api}: loaded but differs from the original")
        elif not ok and res != "DczError":
            bad.append(f"{api}: {res}")
    return bad
