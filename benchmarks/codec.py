"""Codec benchmark: a synthetic VGG-16 (138M weights) pruned and quantized like the paper's.

Reports file bytes against the streams' order-0 entropy, encode time on one core, decode
throughput against torch.load of the dense fp32 state_dict (same run, page cache warm), peak
memory while loading, and memory at scale (a 2 GB fp16 model in 200 tensors, saved from an
iterator and read back one tensor by name). Each memory figure comes from a fresh process.

    python benchmarks/codec.py --out benchmarks/results/codec.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deepcompress.formats import DczFile, read, streams, write

# (name, shape, density) after the paper's Table 5 (VGG-16 pruned 13x)
VGG16 = [
    ("conv1_1", (64, 3, 3, 3), 0.58), ("conv1_2", (64, 64, 3, 3), 0.22),
    ("conv2_1", (128, 64, 3, 3), 0.34), ("conv2_2", (128, 128, 3, 3), 0.36),
    ("conv3_1", (256, 128, 3, 3), 0.53), ("conv3_2", (256, 256, 3, 3), 0.24),
    ("conv3_3", (256, 256, 3, 3), 0.42), ("conv4_1", (512, 256, 3, 3), 0.32),
    ("conv4_2", (512, 512, 3, 3), 0.27), ("conv4_3", (512, 512, 3, 3), 0.34),
    ("conv5_1", (512, 512, 3, 3), 0.35), ("conv5_2", (512, 512, 3, 3), 0.29),
    ("conv5_3", (512, 512, 3, 3), 0.36), ("fc6", (4096, 25088), 0.04),
    ("fc7", (4096, 4096), 0.04), ("fc8", (1000, 4096), 0.23),
]


def synthetic_vgg16(seed: int = 0) -> dict[str, torch.Tensor]:
    """VGG-16 shapes, magnitude-pruned to the paper's densities, linearly quantized to 8 bits
    (conv) or 5 bits (fc) over the survivors' range: clusters are used unevenly, as after k-means."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape, density in VGG16:
        w = torch.randn(shape, generator=g) * (2.0 / np.prod(shape[1:])) ** 0.5
        flat = w.abs().reshape(-1)
        k = max(1, int(round(flat.numel() * (1 - density))))
        threshold = flat.kthvalue(k).values
        keep = w.abs() > threshold
        bits = 8 if name.startswith("conv") else 5
        lo, hi = w[keep].min(), w[keep].max()
        codebook = torch.linspace(float(lo), float(hi), 2**bits)
        codebook = codebook[codebook != 0]
        idx = torch.bucketize(w, (codebook[1:] + codebook[:-1]) / 2)
        sd[f"{name}.weight"] = torch.where(keep, codebook[idx], torch.zeros(()))
        sd[f"{name}.bias"] = torch.randn(shape[0], generator=g) * 0.01
    return sd


def entropy_bytes(path: Path) -> tuple[float, int]:
    """Sum over index and gap streams of count x order-0 entropy, in bytes; and their file bytes."""
    total, stored = 0.0, 0
    with DczFile(path) as f:
        for name, e in f.entries.items():
            for sname in ("index", "gaps"):
                if sname not in e.get("streams", {}):
                    continue
                s = e["streams"][sname]
                sym = streams.decode(s["coding"], s["count"], f.payload(name, sname), sname)
                p = np.bincount(sym, minlength=256) / max(sym.size, 1)
                p = p[p > 0]
                total += sym.size * float(-(p * np.log2(p)).sum()) / 8
                stored += s["length"]
    return total, stored


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_child(kind: str, path: str, extra: str | None) -> dict:
    base = peak_rss_mb()
    t = time.perf_counter()
    if kind == "load-dcz":
        sd = read(path)
        n = sum(v.numel() * v.element_size() for v in sd.values())
    elif kind == "torch-load":
        sd = torch.load(path, weights_only=True)
        n = sum(v.numel() * v.element_size() for v in sd.values())
    elif kind == "load-one":
        sd = read(path, names=[extra])
        n = sd[extra].numel() * sd[extra].element_size()
    elif kind == "save-big":
        def tensors():
            g = torch.Generator().manual_seed(1)
            for i in range(200):
                yield f"layer{i}.weight", torch.randn(2560, 2048, generator=g, dtype=torch.float16)
        write(path, tensors())
        n = 200 * 2560 * 2048 * 2
    else:
        raise SystemExit(f"unknown child {kind}")
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "bytes": n, "baseline_mb": base, "peak_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/codec.json", help="JSON results path")
    ap.add_argument("--repeat", type=int, default=3, help="best of N decode timings")
    ap.add_argument("--skip-big", action="store_true", help="skip the 2 GB fp16 memory test")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_child(*args.child)))
        return

    tmp = Path(tempfile.mkdtemp(prefix="dcz-bench-"))
    print("building synthetic VGG-16 ...", flush=True)
    sd = synthetic_vgg16()
    weights = sum(v.numel() for v in sd.values())
    dense_pt = tmp / "vgg16.pt"
    torch.save(sd, dense_pt)
    dcz_path = tmp / "vgg16.dcz"
    torch.set_num_threads(1)
    t = time.perf_counter()
    write(dcz_path, sd)
    encode_s = time.perf_counter() - t
    torch.set_num_threads(os.cpu_count() or 1)
    del sd
    file_bytes = dcz_path.stat().st_size
    ent, stored = entropy_bytes(dcz_path)
    with DczFile(dcz_path) as f:
        other = file_bytes - stored
        codings = {}
        for e in f.entries.values():
            for s in e.get("streams", {}).values():
                codings[s["coding"]] = codings.get(s["coding"], 0) + s["length"]

    # warm the page cache, then time best-of-N in fresh processes
    for p in (dense_pt, dcz_path):
        p.read_bytes()
    tl = [child(["torch-load", str(dense_pt), "-"]) for _ in range(args.repeat)]
    dl = [child(["load-dcz", str(dcz_path), "-"]) for _ in range(args.repeat)]
    tl_best, dl_best = min(tl, key=lambda r: r["seconds"]), min(dl, key=lambda r: r["seconds"])
    dense_mb = dl_best["bytes"] / 1e6
    one = child(["load-one", str(dcz_path), "fc6.weight"])

    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}, torch {torch.__version__}",
        "weights": weights,
        "dense_fp32_bytes": dense_pt.stat().st_size,
        "file_bytes": file_bytes,
        "ratio": dense_pt.stat().st_size / file_bytes,
        "index_gap_streams_bytes": stored,
        "index_gap_entropy_bytes": ent,
        "other_bytes": other,
        "file_vs_entropy_plus_other": file_bytes / (ent + other),
        "streams_vs_entropy": stored / ent,
        "bytes_by_coding": codings,
        "encode_seconds_one_core": encode_s,
        "decode_seconds": dl_best["seconds"],
        "decode_mb_per_s": dense_mb / dl_best["seconds"],
        "torch_load_seconds": tl_best["seconds"],
        "torch_load_mb_per_s": dense_mb / tl_best["seconds"],
        "decode_vs_torch_load": dl_best["seconds"] / tl_best["seconds"],
        "decode_peak_rss_mb": dl_best["peak_mb"],
        "decode_baseline_rss_mb": dl_best["baseline_mb"],
        "decode_peak_over_dense": (dl_best["peak_mb"] - dl_best["baseline_mb"]) / dense_mb,
        "torch_load_peak_rss_mb": tl_best["peak_mb"],
        "load_fc6_only": one,
    }
    if not args.skip_big:
        big = tmp / "big.dcz"
        save = child(["save-big", str(big), "-"])
        one_big = child(["load-one", str(big), "layer100.weight"])
        res["big_fp16"] = {"model_mb": save["bytes"] / 1e6, "largest_tensor_mb": 2560 * 2048 * 2 / 1e6,
                           "save_seconds": save["seconds"],
                           "save_peak_rss_mb": save["peak_mb"],
                           "save_baseline_rss_mb": save["baseline_mb"],
                           "load_one_peak_rss_mb": one_big["peak_mb"],
                           "load_one_baseline_rss_mb": one_big["baseline_mb"],
                           "file_mb": big.stat().st_size / 1e6}
        big.unlink()
    for p in (dense_pt, dcz_path):
        p.unlink()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
