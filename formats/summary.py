"""What is inside a .dcz, tensor by tensor, in the spirit of the paper's Tables 2 to 5."""

from __future__ import annotations

import math
import os

import torch

from .dcz import DczFile


def _table_bytes(f: DczFile, name: str, stream: str) -> int:
    s = f.entries[name]["streams"][stream]
    return 1 + f.payload(name, stream)[0] + 1 if s["coding"] == "huffman" else 0


def summarize(path: str | os.PathLike) -> dict:
    """Per-tensor rows and totals; every stream is read and checked (CRC) on the way."""
    rows = []
    with DczFile(path) as f:
        if f.program_record is not None:
            f.program()  # checked like every stream
        for name, e in f.entries.items():
            numel = math.prod(e["shape"])
            row = {"name": name, "shape": e["shape"], "dtype": e["dtype"],
                   "encoding": e["encoding"], "layout": e.get("layout", e["encoding"]),
                   "weights": numel, "clusters": e.get("clusters", 0), "bytes": 0,
                   "table_bytes": 0, "codings": {}}
            if e["encoding"] == "alias":
                row.update(layout=f"alias of {e['alias_of']}",
                           nonzero=rows[[r["name"] for r in rows].index(e["alias_of"])]["nonzero"])
            else:
                for sname, s in e["streams"].items():
                    row["codings"][sname] = s["coding"]
                    row["bytes"] += s["length"]
                    row["table_bytes"] += _table_bytes(f, name, sname)
            if e["encoding"] == "raw":
                row["nonzero"] = int(torch.count_nonzero(f.decode(name)))
            elif e["encoding"] == "shared":
                nz = e["nonzero"]
                row["nonzero"] = nz
                s = e["streams"]
                value = s["index"]["length"] * 8
                pos = sum(s[k]["length"] for k in ("gaps", "long_gaps") if k in s) * 8
                row["value_bits_per_nonzero"] = value / nz if nz else 0.0
                row["position_bits_per_nonzero"] = pos / nz if nz else 0.0
                row["cluster_bits"] = math.ceil(math.log2(e["clusters"])) if e["clusters"] > 1 else 0
                for sname in s:  # the payloads' CRCs are checked even when not decoded here
                    f.payload(name, sname)
            row["density"] = row["nonzero"] / numel if numel else 0.0
            row["dense_bytes"] = 0 if e["encoding"] == "alias" else 4 * numel
            row["ratio"] = row["dense_bytes"] / row["bytes"] if row["bytes"] else None
            rows.append(row)
        dense = sum(r["dense_bytes"] for r in rows)
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
            "weights": sum(r["weights"] for r in rows if r["encoding"] != "alias"),
            "nonzero": sum(r["nonzero"] for r in rows if r["encoding"] != "alias"),
            "metadata": f.metadata,
            "tensors": rows,
        }
