"""A model's architecture as a torch.export program without its weights, and a loader for it
that refuses anything that could run code (pickles) before handing the archive to torch."""

from __future__ import annotations

import io
import json
import re
import zipfile

import torch

from .errors import DczError

MAX_MEMBERS = 10_000
MAX_ARCHIVE_BYTES = 1 << 30
# members a weightless program archive may hold (relative to its top folder)
_ALLOWED = re.compile(r"(models/[\w.-]+\.json|data/weights/[\w.-]+|data/constants/[\w.-]+"
                      r"|data/sample_inputs/[\w.-]+\.pt|archive_format|archive_version"
                      r"|\.data/version|\.data/serialization_id|byteorder)")
_CONFIGS = ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json")


def pack(program: torch.export.ExportedProgram) -> bytes:
    """The program's .pt2 archive with every weight byte zeroed and no sample inputs: it
    compresses to little more than the graph, and the .dcz holds the real weights."""
    buf = io.BytesIO()
    torch.export.save(program, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            rel = info.filename.split("/", 1)[-1]
            if rel.startswith("data/sample_inputs/"):
                data = b""  # torch reads an empty record as "no sample inputs", unpickling nothing
            elif rel.startswith(("data/weights/", "data/constants/")) and rel not in _CONFIGS:
                data = bytes(len(data))
            dst.writestr(info, data)
    return out.getvalue()


def _check(archive: zipfile.ZipFile) -> None:
    infos = archive.infolist()
    if not infos or len(infos) > MAX_MEMBERS:
        raise DczError("program: empty archive or too many members")
    if sum(i.file_size for i in infos) > MAX_ARCHIVE_BYTES:
        raise DczError("program: archive too large")
    for info in infos:
        top, _, rel = info.filename.partition("/")
        if not top or not _ALLOWED.fullmatch(rel):
            raise DczError(f"program: unexpected archive member {info.filename!r}")
        if rel.startswith("data/sample_inputs/") and info.file_size:
            raise DczError("program: sample inputs must be empty (they would be unpickled)")
        if rel in _CONFIGS:
            try:
                config = json.loads(archive.read(info))["config"]
                pickled = [k for k, v in config.items() if v.get("use_pickle", True)]
            except (ValueError, KeyError, TypeError, AttributeError):
                raise DczError(f"program: unreadable {rel}") from None
            if pickled:
                raise DczError(f"program: {rel} stores pickled tensors ({pickled[0]}); refused")


def unpack(data: bytes) -> torch.export.ExportedProgram:
    """The program stored by pack(), after checking that loading it unpickles nothing."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        _check(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise DczError(f"program: not a valid archive ({exc})") from None
    try:
        return torch.export.load(io.BytesIO(data))
    except Exception as exc:  # torch raises many types for a malformed program
        raise DczError(f"program: torch.export cannot load it ({type(exc).__name__})") from None
