"""What is inside a .dcz, tensor by tensor, in the spirit of the paper's Tables 2 to 5."""

from __future__ import annotations

import math
import os

import torch

from . import program as _program
from .dcz import DczFile

_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _table_bytes(f: DczFile, name: str, stream: str) -> int:
    s = f.entries[name]["streams"][stream]
    return 1 + f.payload(name, stream)[0] + 1 if s["coding"] == "huffman" and s["length"] else 0


def _nonzero(t: torch.Tensor) -> int:
    return int(torch.count_nonzero(t.half() if t.dtype in _FLOAT8 else t))


def summarize(path: str | os.PathLike, header_only: bool = False) -> dict:
    """Per-tensor rows and totals. Every tensor is decoded and the architecture checked as
    `load` would (a bad file raises DczError), unless `header_only`: then only the header is
    validated and raw tensors' nonzero counts are left out (None)."""
    rows: list[dict] = []
    by_name: dict[str, dict] = {}
    with DczFile(path, check_program=False) as f:
        if not header_only:
            archive = f.program()
            if archive is not None:
                _program.check_fits(_program.load_module(archive), f.entries, f.path)
        for name, e in f.entries.items():
            numel = math.prod(e["shape"])
            row = {"name": name, "shape": e["shape"], "dtype": e["dtype"],
                   "encoding": e["encoding"], "layout": e.get("layout", e["encoding"]),
                   "weights": numel, "clusters": e.get("clusters", 0), "bytes": 0,
                   "table_bytes": 0, "codings": {}, "nonzero": None}
            if e["encoding"] == "alias":
                row.update(layout=f"alias of {e['alias_of']}",
                           nonzero=by_name[e["alias_of"]]["nonzero"])
            else:
                decoded = None if header_only else f.decode(name)  # checks every stream
                for sname, s in e["streams"].items():
                    row["codings"][sname] = s["coding"]
                    row["bytes"] += s["length"]
                    if not header_only:
                        row["table_bytes"] += _table_bytes(f, name, sname)
                if e["encoding"] == "raw" and decoded is not None:
                    row["nonzero"] = _nonzero(decoded)
                del decoded
            if e["encoding"] == "shared":
                nz = e["nonzero"]
                row["nonzero"] = nz
                s = e["streams"]
                value = s["index"]["length"] * 8
                pos = sum(s[k]["length"] for k in ("gaps", "long_gaps", "rows", "cols") if k in s) * 8
                row["value_bits_per_nonzero"] = value / nz if nz else 0.0
                row["position_bits_per_nonzero"] = pos / nz if nz else 0.0
                row["cluster_bits"] = math.ceil(math.log2(e["clusters"])) if e["clusters"] > 1 else 0
                row["groups"] = e.get("groups", 1)  # codebooks: one per group of rows
                row["group_rows"] = e.get("group_rows")  # None: one for the whole tensor
            nz = row["nonzero"]
            row["density"] = None if nz is None else nz / numel if numel else 0.0
            row["dense_bytes"] = 0 if e["encoding"] == "alias" else 4 * numel
            row["ratio"] = row["dense_bytes"] / row["bytes"] if row["bytes"] else None
            rows.append(row)
            by_name[name] = row
        dense = sum(r["dense_bytes"] for r in rows)
        stored = [r for r in rows if r["encoding"] != "alias"]
        return {
            "file": str(path),
            "file_bytes": f.file_bytes,
            "dense_bytes": dense,
            "ratio": dense / f.file_bytes,
            "tensor_bytes": sum(r["bytes"] for r in rows),
            "header_bytes": f.header_bytes,
            "overhead_bytes": f.overhead_bytes,
            "table_bytes": sum(r["table_bytes"] for r in rows),
            "architecture_bytes": f.program_record["length"] if f.program_record else 0,
            "checked": not header_only,
            "weights": sum(r["weights"] for r in stored),
            "nonzero": (None if any(r["nonzero"] is None for r in stored)
                        else sum(r["nonzero"] for r in stored)),
            "metadata": f.metadata,
            "tensors": rows,
        }
