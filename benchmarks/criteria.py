"""Benchmark the pruning criteria and schedules side by side on a LeNet and the MNIST split.

Every row starts from the same dense model (trained once per seed) and gets the same retraining
epochs, then the rest of the pipeline (sharing, fine-tuning, coding). Unstructured criteria prune
to one weight budget (global allocation); structured ones remove one fraction of the neurons or
filters of each hidden layer (`--structured`), and their runnable model's CPU latency is measured at
batch 1 and 64 against the dense model's. "scratch" is the Rethinking-the-Value-of-Pruning
experiment (Liu et al. 2019): the smallest structured architecture trained from random
initialisation for the dense training's epochs plus the retraining epochs.

Network slimming (L1 on BatchNorm scales) runs on the model's BatchNorm variant
(deepcompress.models.lenet300_bn, lenet5_bn), trained dense with the same settings.

Usage: python benchmarks/criteria.py --data-dir ../shared/data/mnist --model lenet300
       --seeds 0,1 --out benchmarks/results/criteria-lenet300.json
       (--only slimming: run those rows alone, merged into the rows already in --out)
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import MODELS, compress_config, dense_model, settings

import deepcompress
from deepcompress import models
from deepcompress.pipeline import compress
from deepcompress.tasks import load_task
from deepcompress.train import TrainConfig, evaluate, fit

UNSTRUCTURED = [("magnitude", "agp"), ("taylor", "agp"), ("obd", "agp"), ("obs", "agp"),
                ("magnitude", "lottery"), ("magnitude", "dns")]
STRUCTURED = ["l1_filter", "taylor_filter", "fpgm", "apoz"]
# Structured sparsity learning (Wen et al. 2016): group lasso on the neurons/filters while AGP
# removes them gradually, by L1 norm
SSL = {"criterion": "l1_filter", "schedule": "agp", "regulariser": "group_lasso",
       "regulariser_strength": 1e-4}
# Network slimming (Liu et al. 2017): L1 on the BatchNorm scales while AGP removes the channels
# of smallest scale; it needs a BatchNorm after each hidden layer, which the LeNets lack, so it
# runs on their BatchNorm variants (deepcompress.models), with their own dense row
SLIMMING = {"criterion": "bn_scale", "schedule": "agp", "regulariser": "slimming",
            "regulariser_strength": 1e-4}
BN_VARIANT = {"lenet300": "lenet300_bn", "lenet5": "lenet5_bn"}
ROWS = ("dense", "unstructured", "structured", "ssl", "scratch", "slimming")


def latency(model: torch.nn.Module, example: torch.Tensor, batch: int, repeat: int = 30) -> float:
    """Median seconds of one forward pass at this batch size (one thread, eval mode)."""
    x = example[:1].expand(batch, *example.shape[1:]).contiguous()
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(5):
            model(x)
        for _ in range(repeat):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(model: torch.nn.Module, task, example, seconds: float) -> dict:
    """Accuracy, .dcz bytes, kept weights, architecture and latency of a compressed model."""
    with tempfile.TemporaryDirectory() as tmp:
        size = deepcompress.save(model, Path(tmp) / "m.dcz")
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    return {"test_accuracy": evaluate(model, task, "test"), "val_accuracy": evaluate(model, task, "val"),
            "bytes": size, "weights": sum(p.numel() for p in weights),
            "nonzero": sum(int((p != 0).sum()) for p in weights),
            "latency_1": latency(model, example, 1), "latency_64": latency(model, example, 64),
            "architecture": [list(p.shape) for p in weights], "seconds": seconds}


def dense_row(dense: torch.nn.Module, task, example) -> dict:
    """Accuracy, fp32 bytes and latency of a dense model."""
    return {"test_accuracy": evaluate(dense, task, "test"), "val_accuracy": evaluate(dense, task, "val"),
            "bytes": 4 * sum(p.numel() for p in dense.parameters()), "latency_1": latency(dense, example, 1),
            "latency_64": latency(dense, example, 64)}


def one(dense: torch.nn.Module, task, config, example) -> tuple[dict, torch.nn.Module]:
    """Compress a copy of dense with config; its figures and the compressed model."""
    t = time.perf_counter()
    model, _ = compress(copy.deepcopy(dense), task, config)
    return measure(model, task, example, time.perf_counter() - t), model


def from_scratch(shrunk: torch.nn.Module, task, dense_train: TrainConfig, config, example,
                 seed: int) -> dict:
    """The shrunken architecture re-initialised and trained for dense + retraining epochs, then
    shared and coded like the others (no pruning: it is already small)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(shrunk)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    t = time.perf_counter()
    fit(model, task, replace(dense_train, epochs=dense_train.epochs + config.prune_epochs, seed=seed,
                             quiet=True))
    model, _ = compress(model, task, replace(config, sparsity=None, structured=False))
    return measure(model, task, example, time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="folder with the MNIST IDX files")
    ap.add_argument("--model", choices=sorted(MODELS), default="lenet300", help="which LeNet")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds (dense model and pruning)")
    ap.add_argument("--epochs", type=int, default=20, help="retraining epochs, the same for every row")
    ap.add_argument("--channels", type=float, default=0.5, help="fraction of neurons/filters structured criteria remove")
    ap.add_argument("--out", help="JSON results path")
    ap.add_argument("--only", help=f"comma-separated groups of rows to run ({', '.join(ROWS)}), "
                    "merged into the rows already in --out (same model, seeds and epochs)")
    args = ap.parse_args()
    groups = set(args.only.split(",")) if args.only else set(ROWS)
    if groups - set(ROWS):
        raise SystemExit(f"--only: unknown groups {', '.join(sorted(groups - set(ROWS)))}; "
                         f"use {', '.join(ROWS)}")
    torch.set_num_threads(1)
    task = load_task("mnist", args.data_dir)
    s = settings(args.model)
    rows: dict[str, list[dict]] = {}
    for seed in [int(v) for v in args.seeds.split(",")]:
        # the plain dense model, unless only the BatchNorm variant's rows are asked for
        dense = (dense_model(args.model, task, {**s, "seed": seed}) if groups - {"slimming"}
                 else models.MODELS[BN_VARIANT[args.model]]())
        example = task.example_input
        # the config's own structured step (channels) is Table 1's recipe, not a criterion
        base = compress_config(s, prune_epochs=args.epochs, agp_steps=min(s["compress"].get("agp_steps", 10), args.epochs),
                               seed=seed, finetune_epochs=s["compress"].get("finetune_epochs", 4),
                               channels=None)
        if groups & {"dense"}:
            rows.setdefault("dense", []).append(dense_row(dense, task, example))
        for criterion, schedule in UNSTRUCTURED if "unstructured" in groups else ():
            key = criterion if schedule == "agp" else f"{criterion}+{schedule}"
            print(f"seed {seed}: {key}", flush=True)
            row, _ = one(dense, task, replace(base, criterion=criterion, schedule=schedule), example)
            rows.setdefault(key, []).append(row)
        shrunk = None
        layers = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
        hidden = layers[:-1]  # the output layer's rows are the classes: never removed
        config = replace(base, criterion="l1_filter", allocation="layer", schedule="oneshot",
                         sparsity={name: args.channels for name in hidden}, structured=True)
        for criterion in STRUCTURED if groups & {"structured", "scratch"} else ():
            print(f"seed {seed}: {criterion} (structured)", flush=True)
            row, model = one(dense, task, replace(config, criterion=criterion), example)
            rows.setdefault(f"{criterion} (structured)", []).append(row)
            shrunk = shrunk or model
        if "ssl" in groups:
            print(f"seed {seed}: group lasso (SSL, structured)", flush=True)
            row, _ = one(dense, task, replace(config, **SSL), example)
            rows.setdefault("group_lasso+l1_filter agp (structured)", []).append(row)
        if "scratch" in groups:
            print(f"seed {seed}: scratch", flush=True)
            dense_train = TrainConfig(**s["dense"])
            rows.setdefault("l1_filter architecture from scratch", []).append(
                from_scratch(shrunk, task, dense_train, config, example, seed))
        if "slimming" in groups:
            print(f"seed {seed}: network slimming ({BN_VARIANT[args.model]})", flush=True)
            torch.manual_seed(seed)
            bn = models.MODELS[BN_VARIANT[args.model]]()
            fit(bn, task, TrainConfig(**{**s["dense"], "seed": seed}, quiet=True))
            rows.setdefault(f"dense with BatchNorm ({BN_VARIANT[args.model]})", []).append(
                dense_row(bn, task, example))
            row, _ = one(bn, task, replace(config, **SLIMMING), example)
            rows.setdefault("slimming+bn_scale agp (structured, BatchNorm variant)", []).append(row)
    if args.only and args.out and Path(args.out).exists():  # merge: the rows run now replace theirs
        old = json.loads(Path(args.out).read_text())
        if (old["model"], old["seeds"], old["epochs"]) != (args.model, args.seeds, args.epochs):
            raise SystemExit(f"--only: {args.out} holds another run (model, seeds or epochs differ)")
        rows = {**old["rows"], **rows}
    summary = {k: {m: (statistics.mean(r[m] for r in v), (max(r[m] for r in v) - min(r[m] for r in v)) / 2)
                   for m in ("test_accuracy", "bytes", "latency_1", "latency_64") if all(m in r for r in v)}
               for k, v in rows.items()}
    result = {"model": args.model, "seeds": args.seeds, "epochs": args.epochs, "channels": args.channels,
              "sparsity": s["compress"]["sparsity"],
              "rows": rows, "summary": summary}
    for k, v in summary.items():
        if v:
            print(f"{k:<28} " + "  ".join(f"{m} {mean:.4g}±{half:.2g}" for m, (mean, half) in v.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
