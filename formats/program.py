"""A model's architecture as a weightless torch.export archive, and a reader that rebuilds it
without torch.export.load: it parses and allowlists the JSON itself, makes the weights as zero
tensors, and hands torch only checked dataclasses, so nothing is unpickled, eval'd or exec'd."""

from __future__ import annotations

import io
import json
import math
import re
import tempfile
import zipfile
from collections.abc import Mapping

import torch
from torch._export.serde import schema
from torch._export.serde.serialize import (
    _SERIALIZE_TO_TORCH_DTYPE,
    ExportedProgramDeserializer,
    _dict_to_dataclass,
)

from .errors import DczError
from .program_check import NODE_METADATA, check_config, check_program, loads

MAX_MEMBERS = 10_000
MAX_ARCHIVE_BYTES = 1 << 30  # as the .dcz's program stream
MAX_WEIGHT_ELEMENTS = 1 << 40  # weights are never allocated here (meta tensors)
MAX_JSON_BYTES = 1 << 26
MODEL = "models/model.json"
WEIGHTS = "data/weights/model_weights_config.json"
CONSTANTS = "data/constants/model_constants_config.json"
_FIXED = {"archive_format": re.compile(rb"pt2"), "archive_version": re.compile(rb"0"),
          "byteorder": re.compile(rb"little"), ".data/version": re.compile(rb"[0-9]{1,4}\n?"),
          ".data/serialization_id": re.compile(rb"[0-9]{1,64}"),
          "data/sample_inputs/model.pt": re.compile(rb"")}
_RECORD = re.compile(r"data/(?:weights/weight|constants/tensor)_[0-9]{1,9}")
_TOP = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def pack(program: torch.export.ExportedProgram) -> bytes:
    """The program's .pt2 archive as load_module() admits it: weight records empty (the .dcz
    holds the weights; tensor constants are kept), no sample inputs, no guards code, node
    metadata cut to module stack and torch function."""
    with tempfile.TemporaryFile() as buf:  # on disk: the archive holds every weight's bytes
        torch.export.save(program, buf)
        buf.seek(0)
        src = zipfile.ZipFile(buf)
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
            for info in src.infolist():
                rel = info.filename.partition("/")[2]
                # torch reads an empty weight record as zeros of the tensor's size
                empty = rel.startswith(("data/sample_inputs/", "data/weights/weight_"))
                data = b"" if empty else src.read(info)
                if rel == MODEL:
                    doc = json.loads(data)
                    doc["guards_code"] = []
                    for node in doc["graph_module"]["graph"]["nodes"]:
                        node["metadata"] = {k: v for k, v in node["metadata"].items()
                                            if k in NODE_METADATA}
                    check_program(doc)
                    data = json.dumps(doc, separators=(",", ":")).encode()
                dst.writestr(zipfile.ZipInfo(info.filename, info.date_time), data)
    _members(zipfile.ZipFile(out), len(out.getvalue()))
    return out.getvalue()


def _members(archive: zipfile.ZipFile, size: int) -> dict[str, zipfile.ZipInfo]:
    """The archive's members by path below its one top folder, each of an allowed kind."""
    infos = archive.infolist()
    if not infos or len(infos) > MAX_MEMBERS:
        raise DczError("program: empty archive or too many members")
    if sum(i.compress_size for i in infos) > size:
        raise DczError("program: members declare more bytes than the archive holds")
    members, tops = {}, set()
    for info in infos:
        top, _, rel = info.filename.partition("/")
        tops.add(top)
        if rel not in _FIXED and rel not in (MODEL, WEIGHTS, CONSTANTS) and not _RECORD.fullmatch(rel):
            raise DczError(f"program: unexpected archive member {info.filename!r}")
        if (info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1
                or info.file_size != info.compress_size):
            raise DczError(f"program: member {info.filename!r} is compressed or encrypted")
        if rel in members:
            raise DczError(f"program: member {info.filename!r} appears twice")
        members[rel] = info
    if len(tops) != 1 or not _TOP.fullmatch(top):
        raise DczError("program: members must share one plain top folder")
    missing = sorted({*_FIXED, MODEL, WEIGHTS, CONSTANTS} - members.keys())
    if missing:
        raise DczError(f"program: archive lacks {missing[0]}")
    return members


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.file_size > limit:
        raise DczError(f"program: {info.filename} is larger than {limit} bytes")
    return archive.read(info)


def _tensors(archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], config: str,
             prefix: str, keep: bool) -> dict[str, torch.Tensor]:
    """The tensors of a payload config as views of one record per path_name (aliases kept): the
    record's little-endian bytes if `keep`, else meta tensors (nothing allocated; the .dcz
    supplies the weights, and files before 0.2 hold zero-filled records that are not read)."""
    doc = loads(_read(archive, members[config], MAX_JSON_BYTES))
    check_config(doc, prefix)
    folder = config.rsplit("/", 1)[0]
    records: dict[str, torch.Tensor] = {}
    out = {}
    for fqn, meta in doc["config"].items():
        tm, path = meta["tensor_meta"], f"{folder}/{meta['path_name']}"
        dtype = _SERIALIZE_TO_TORCH_DTYPE.get(tm["dtype"])
        if path not in members or dtype is None:
            raise DczError(f"program: {fqn}: no record {path} or unknown dtype")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        nbytes = members[path].file_size
        sizes, strides = ([d["as_int"] for d in tm[k]] for k in ("sizes", "strides"))
        offset = tm["storage_offset"]["as_int"]
        extent = offset + sum((n - 1) * s for n, s in zip(sizes, strides, strict=False)) + 1
        if (len(sizes) != len(strides) or min(sizes + strides + [offset], default=0) < 0
                or nbytes % itemsize or math.prod(sizes) > MAX_WEIGHT_ELEMENTS
                or (0 not in sizes and (keep or nbytes) and extent * itemsize > nbytes)):
            raise DczError(f"program: {fqn}: tensor_meta does not fit its {nbytes}-byte record")
        if path not in records:
            records[path] = (
                torch.frombuffer(bytearray(archive.read(members[path])), dtype=dtype)
                if keep and nbytes else torch.empty(max(nbytes // itemsize, extent), dtype=dtype,
                                                    device="meta"))
        if records[path].dtype != dtype:
            raise DczError(f"program: {fqn}: record {path} shared across dtypes")
        view = records[path].as_strided(sizes, strides, offset)
        out[fqn] = torch.nn.Parameter(view, tm["requires_grad"]) if meta["is_param"] else view
    if unused := {r for r in members if r.startswith(f"{folder}/") and r != config} - records.keys():
        raise DczError(f"program: unreferenced record {sorted(unused)[0]}")
    return out


def _checked(data: bytes | bytearray) -> tuple[dict, dict, dict]:
    """(state_dict, constants, program JSON) of an archive that passes every rule of SPEC 2.3."""
    if len(data) > MAX_ARCHIVE_BYTES:
        raise DczError("program: archive too large")
    archive = zipfile.ZipFile(io.BytesIO(data))
    members = _members(archive, len(data))
    for rel, pattern in _FIXED.items():
        if members[rel].file_size > 64 or not pattern.fullmatch(archive.read(members[rel])):
            raise DczError(f"program: unexpected content in {rel} (sample inputs must be "
                           "empty: torch would unpickle them)" if "sample" in rel else
                           f"program: unexpected content in {rel}")
    state_dict = _tensors(archive, members, WEIGHTS, "weight_", keep=False)
    constants = _tensors(archive, members, CONSTANTS, "tensor_", keep=True)
    doc = loads(_read(archive, members[MODEL], MAX_JSON_BYTES))
    check_program(doc)
    return state_dict, constants, doc


def _as_dcz_error(exc: Exception) -> DczError:
    if isinstance(exc, DczError):
        return exc
    if isinstance(exc, (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError)):
        return DczError(f"program: not a valid zip archive ({exc})")
    return DczError(f"program: torch cannot rebuild it ({type(exc).__name__})")


def check(data: bytes | bytearray, entries: Mapping[str, Mapping]) -> None:
    """Raise DczError unless the archive passes every rule of SPEC 2.3 and its weights are
    exactly the file's tensors (`entries`: name -> header entry); nothing is built."""
    try:
        state_dict = _checked(data)[0]
    except Exception as exc:  # zipfile and json raise many types on a malformed archive
        raise _as_dcz_error(exc) from None
    _fits(state_dict, entries)


def _fits(state_dict: Mapping[str, torch.Tensor], entries: Mapping[str, Mapping]) -> None:
    own = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state_dict.items()}
    theirs = {k: (list(e["shape"]), e["dtype"]) for k, e in entries.items()}
    wrong = sorted(set(own) ^ set(theirs)) or sorted(k for k in own if own[k] != theirs[k])
    if wrong:
        raise DczError(f"program: its weights do not fit the tensors ({wrong[0]}: "
                       f"program {own.get(wrong[0])}, file {theirs.get(wrong[0])})")


def unpack(data: bytes | bytearray) -> torch.export.ExportedProgram:
    """The program stored by pack(), rebuilt from checked JSON only: nothing unpickled or exec'd.
    Its weights are meta tensors: load the .dcz tensors with load_state_dict(assign=True)."""
    try:
        state_dict, constants, doc = _checked(data)
        for node in doc["graph_module"]["graph"]["nodes"]:
            node["metadata"] = {}  # checked, but torch need not read it
        program = _dict_to_dataclass(schema.ExportedProgram, doc)
        return ExportedProgramDeserializer().deserialize(program, state_dict, constants, None)
    except Exception as exc:  # torch raises many types (and MemoryError) on a malformed program
        raise _as_dcz_error(exc) from None


def load_module(data: bytes) -> torch.nn.Module:
    """The runnable module of a program archive, its weights on the meta device: load the .dcz
    tensors into it with load_state_dict(state, assign=True)."""
    program = unpack(data)
    try:
        return program.module()
    except Exception as exc:  # a checked program that torch still refuses to turn into a module
        raise DczError(f"program: torch cannot build the module ({type(exc).__name__})") from None


def check_fits(module: torch.nn.Module, entries: Mapping[str, Mapping], path: object) -> None:
    """Raise DczError unless the module's state_dict has exactly the file's tensor names, with
    their shapes and dtypes (checked before any tensor is decoded)."""
    try:
        _fits(module.state_dict(), entries)
    except DczError as exc:
        raise DczError(f"{path}: {exc}") from None
