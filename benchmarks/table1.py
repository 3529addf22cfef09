"""Deep Compression's Table 1 on MNIST: train the dense model, run the pipeline with the project's
settings for it (benchmarks/configs/MODEL.toml, chosen on the validation split), write the .dcz,
reload it in a fresh process and evaluate it on the test split.

    python benchmarks/table1.py --model lenet300 --data-dir ../shared/data/mnist \\
        --out benchmarks/results/lenet300.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import torch
from common import MODELS, dense_model

import deepcompress
from deepcompress.formats.summary import summarize
from deepcompress.pipeline import CompressConfig, compress
from deepcompress.plots import plot_summary
from deepcompress.tasks import load_task
from deepcompress.train import evaluate

PAPER = {"lenet300": {"dense_kb": 1070, "compressed_kb": 27, "ratio": 40, "top1_error": 1.58},
         "lenet5": {"dense_kb": 1720, "compressed_kb": 44, "ratio": 39, "top1_error": 0.74}}
HERE = Path(__file__).resolve().parent

RELOAD = """
import json, sys, torch
import deepcompress
from deepcompress import models
from deepcompress.tasks import load_task
from deepcompress.train import evaluate
task = load_task("mnist", sys.argv[2])
path, weights, cls = sys.argv[1], sys.argv[3], sys.argv[4]
model = deepcompress.load(path) if cls == "-" else deepcompress.load(path, getattr(models, cls)())
state, own = deepcompress.load_state_dict(weights), model.state_dict()
assert all(torch.equal(v, own[k]) for k, v in state.items()), "not the same weights"
print(json.dumps({"test": evaluate(model, task, "test"), "val": evaluate(model, task, "val")}))
"""


def reload_and_evaluate(path: Path, model: str | None, data_dir: str,
                        weights: Path | None = None) -> dict:
    """Evaluate the .dcz in a fresh interpreter: nothing carried over from this process. With
    model None it runs the architecture embedded in the file; weights, another .dcz, must hold
    the same tensors (checked)."""
    out = subprocess.run([sys.executable, "-c", RELOAD, str(path), data_dir,
                          str(weights or path), model or "-"],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(model_name: str, data_dir: str, config_path: Path, workdir: Path,
        seed: int | None = None) -> dict:
    """Train, compress, save, reload: every figure of one Table 1 row (seed: instead of the
    settings' seed, for the dense training and the pipeline)."""
    settings = tomllib.loads(config_path.read_text())
    if seed is not None:
        settings["seed"] = seed
        settings["compress"]["seed"] = seed
    task = load_task("mnist", data_dir)
    started = time.perf_counter()
    model = dense_model(model_name, task, settings)
    dense_seconds = time.perf_counter() - started
    dense_val, dense_test = evaluate(model, task, "val"), evaluate(model, task, "test")
    dense_pt = workdir / f"{model_name}.pt"
    torch.save(model.state_dict(), dense_pt)
    config = CompressConfig(**settings["compress"], quiet=True)
    model, report = compress(model, task, config)
    dcz = workdir / f"{model_name}.dcz"
    deepcompress.save(model, dcz, {"benchmark": "table1", "model": model_name})
    with_arch = workdir / f"{model_name}-arch.dcz"
    deepcompress.save(model, with_arch,
                      program=deepcompress.export_program(model, task.example_input))
    # channels removed (config `channels`, or `structured`): the original class no longer fits,
    # so the file with the architecture runs, checked to hold the weights-only file's tensors
    shrunk = report.shrunk is not None and any(r.kept < r.channels for r in report.shrunk.layers)
    reloaded = (reload_and_evaluate(with_arch, None, data_dir, weights=dcz) if shrunk
                else reload_and_evaluate(dcz, model_name, data_dir))
    summary = summarize(dcz)
    tensors = {t["name"]: t for t in summary["tensors"]}
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            continue
        w, b = tensors[f"{name}.weight"], tensors.get(f"{name}.bias")
        layers.append({
            "layer": name, "weights": w["weights"], "nonzero": w["nonzero"],
            "remaining_pct": 100 * w["nonzero"] / w["weights"],
            "clusters": w["clusters"], "bits": math.ceil(math.log2(w["clusters"])) if w["clusters"] > 1 else 0,
            "value_bits_per_nonzero": w.get("value_bits_per_nonzero"),
            "position_bits_per_nonzero": w.get("position_bits_per_nonzero"),
            "weight_bytes": w["bytes"], "bias_bytes": b["bytes"] if b else 0,
            "ratio": 4 * w["weights"] / w["bytes"],
        })
    dense_bytes = dense_pt.stat().st_size
    dcz_bytes = dcz.stat().st_size
    return {
        "model": model_name,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "config": str(config_path),
        "dense_accuracy": dense_test, "dense_val_accuracy": dense_val,
        "stages": [{"stage": s.name, "val_accuracy": s.val_metric, "test_accuracy": s.test_metric,
                    "nonzero": s.nonzero, "weights": s.weights, "seconds": s.seconds}
                   for s in report.stages],
        "dense_training_seconds": dense_seconds,
        "final_accuracy": reloaded["test"], "final_val_accuracy": reloaded["val"],
        "accuracy_drop_points": 100 * (dense_test - reloaded["test"]),
        "dense_bytes": dense_bytes, "dcz_bytes": dcz_bytes, "ratio": dense_bytes / dcz_bytes,
        "dcz_bytes_with_architecture": with_arch.stat().st_size,
        "header_bytes": summary["header_bytes"], "overhead_bytes": summary["overhead_bytes"],
        "weights": summary["weights"], "nonzero": summary["nonzero"],
        "layers": layers,
        "channels_removed": shrunk,
        "architecture": {r["layer"]: tensors[f"{r['layer']}.weight"]["shape"] for r in layers},
        "paper": PAPER[model_name],
        "wall_seconds": time.perf_counter() - started,
    }


def render(r: dict) -> str:
    """The Table 1 row and the per-layer table (the paper's Tables 2 and 3)."""
    lines = [f"{r['model']}: dense {r['dense_accuracy']:.2%} -> {r['final_accuracy']:.2%} "
             f"(reloaded .dcz, {r['accuracy_drop_points']:+.2f} pt lost), "
             f"{r['dense_bytes'] / 1000:.0f} KB -> {r['dcz_bytes'] / 1000:.1f} KB, "
             f"{r['ratio']:.1f}x (paper {r['paper']['ratio']}x), {r['wall_seconds']:.0f} s",
             f"{'layer':<8} {'weights':>8} {'remain':>7} {'bits':>5} {'val b/nz':>9} "
             f"{'pos b/nz':>9} {'bytes':>7} {'ratio':>7}"]
    for row in r["layers"]:
        lines.append(f"{row['layer']:<8} {row['weights']:>8} {row['remaining_pct']:>6.1f}% "
                     f"{row['bits']:>5} {row['value_bits_per_nonzero'] or 0:>9.2f} "
                     f"{row['position_bits_per_nonzero'] or 0:>9.2f} "
                     f"{row['weight_bytes'] + row['bias_bytes']:>7} {row['ratio']:>6.1f}x")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), required=True, help="which LeNet")
    ap.add_argument("--data-dir", required=True, help="folder with the MNIST IDX files")
    ap.add_argument("--config", help="settings TOML (default benchmarks/configs/MODEL.toml)")
    ap.add_argument("--out", help="JSON results path")
    ap.add_argument("--plot", help="also draw dcompress inspect's per-layer plot to this PNG")
    ap.add_argument("--seeds", help="comma-separated seeds: one run each, written to --out with "
                    "their mean and spread (default: the settings' seed, one run)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: results differ between thread counts, and "
                    "more threads than free cores run many times slower; recorded)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = Path(args.config) if args.config else HERE / "configs" / f"{args.model}.toml"
    if args.seeds:
        seeded(args, config.resolve())
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.model, args.data_dir, config.resolve(), Path(tmp))
        if args.plot:
            plot_summary(summarize(Path(tmp) / f"{args.model}.dcz"), args.plot)
    print(render(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def seeded(args: argparse.Namespace, config: Path) -> None:
    """One run per seed, and for each figure its mean and half spread ((max - min) / 2)."""
    seeds = [int(v) for v in args.seeds.split(",")]
    runs = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(run(args.model, args.data_dir, config, Path(tmp), seed))
        print(f"seed {seed}: " + render(runs[-1]).splitlines()[0], flush=True)
    figures = ("dense_accuracy", "dense_val_accuracy", "final_accuracy", "final_val_accuracy",
               "accuracy_drop_points", "dcz_bytes", "ratio")
    stats = {k: {"mean": sum(r[k] for r in runs) / len(runs),
                 "half_spread": (max(r[k] for r in runs) - min(r[k] for r in runs)) / 2}
             for k in figures}
    result = {"model": args.model, "threads": args.threads, "config": str(config),
              "seeds": seeds, "stats": stats,
              "runs": [{k: r[k] for k in figures} for r in runs]}
    for k, v in stats.items():
        print(f"{k}: {v['mean']:.4f} +- {v['half_spread']:.4f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
