"""Benchmark stage 1: train a dense LeNet on MNIST, prune with retraining, report what remains.

Usage: python benchmarks/prune.py --data-dir DIR --model lenet300|lenet5 --out results.json
       [--schedule agp|iterative] [--criterion magnitude|taylor] [--allocation global|layer]
Every choice (best epoch) is made on the validation split; the test split is only reported.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from deepcompress import criteria
from deepcompress.bake import bake
from deepcompress.models import MODELS
from deepcompress.prune import PruneConfig, layer_stats, overall_density
from deepcompress.schedules import AGP, Iterative
from deepcompress.tasks import load_task
from deepcompress.train import TrainConfig, evaluate, fit

# Per-model recipe: dense training, final overall sparsity of the prunable layers, retraining.
RECIPES = {
    "lenet300": {
        "dense": TrainConfig(epochs=30, lr=0.05, batch_size=64, weight_decay=1e-4, lr_schedule="cosine"),
        "sparsity": 0.965,
        "agp": AGP(initial_sparsity=0.5, steps=20, every=1),
        "retrain": TrainConfig(epochs=50, lr=0.02, batch_size=64, weight_decay=1e-4, lr_schedule="cosine"),
    },
    "lenet5": {
        "dense": TrainConfig(epochs=20, lr=0.02, batch_size=64, weight_decay=1e-4, lr_schedule="cosine"),
        "sparsity": 0.975,
        "agp": AGP(initial_sparsity=0.5, steps=10, every=1),
        "retrain": TrainConfig(epochs=24, lr=0.01, batch_size=64, weight_decay=1e-4, lr_schedule="cosine"),
    },
}


def run(data_dir: str, model_name: str, schedule: str, seed: int, quiet: bool,
        criterion: str = "magnitude", allocation_name: str = "global") -> dict:
    """Train dense, prune and retrain one model; return the figures."""
    recipe = RECIPES[model_name]
    task = load_task("mnist", data_dir)
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    start = time.perf_counter()
    dense_cfg = TrainConfig(**{**asdict(recipe["dense"]), "seed": seed, "quiet": quiet})
    fit(model, task, dense_cfg)
    dense_time = time.perf_counter() - start
    dense_val, dense_test = evaluate(model, task, "val"), evaluate(model, task, "test")

    config = PruneConfig(criterion=criterion, allocation=allocation_name, sparsity=recipe["sparsity"])
    retrain = TrainConfig(**{**asdict(recipe["retrain"]), "seed": seed + 1, "quiet": quiet})
    plans = {"agp": (recipe["agp"], retrain),
             "iterative": (Iterative(rounds=4),
                           TrainConfig(**{**asdict(retrain), "epochs": retrain.epochs // 4 + 1}))}
    plan, train = plans[schedule]
    start = time.perf_counter()
    plan.run(model, task, config, train)
    prune_time = time.perf_counter() - start
    bake(model)
    stats = layer_stats(model)
    return {
        "model": model_name,
        "schedule": schedule,
        "criterion": config.criterion,
        "allocation": config.allocation,
        "target_sparsity": config.sparsity,
        "split": {k: len(getattr(task, k)[0]) for k in ("train", "val", "test")},
        "dense": {"val": dense_val, "test": dense_test},
        "pruned": {"val": evaluate(model, task, "val"), "test": evaluate(model, task, "test")},
        "layers": [{"name": s.name, "weights": s.total, "remaining": s.nonzero,
                    "density": s.density} for s in stats],
        "weights_remaining": overall_density(stats),
        "seconds": {"dense": dense_time, "prune_retrain": prune_time},
    }


def table(result: dict) -> str:
    """Plain-text summary of one run."""
    lines = [f"{result['model']} ({result['schedule']}, {result['criterion']}, "
             f"{result.get('allocation', 'global')})",
             f"{'layer':<10}{'weights':>10}{'remaining':>11}{'density':>9}"]
    lines += [f"{r['name']:<10}{r['weights']:>10}{r['remaining']:>11}{r['density']:>9.2%}"
              for r in result["layers"]]
    total = sum(r["weights"] for r in result["layers"])
    kept = sum(r["remaining"] for r in result["layers"])
    lines.append(f"{'total':<10}{total:>10}{kept:>11}{result['weights_remaining']:>9.2%}")
    d, p = result["dense"], result["pruned"]
    lines.append(f"test accuracy: dense {d['test']:.2%}  pruned {p['test']:.2%}  "
                 f"(delta {100 * (p['test'] - d['test']):+.2f} points)")
    lines.append(f"val accuracy:  dense {d['val']:.2%}  pruned {p['val']:.2%}")
    s = result["seconds"]
    lines.append(f"wall time: dense {s['dense']:.0f}s  prune+retrain {s['prune_retrain']:.0f}s")
    return "\n".join(lines)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with MNIST IDX files, e.g. ../shared/data/mnist")
    parser.add_argument("--model", choices=sorted(RECIPES), default="lenet300", help="e.g. lenet5")
    parser.add_argument("--schedule", choices=("agp", "iterative"), default="agp", help="e.g. iterative")
    parser.add_argument("--criterion", choices=criteria.names(), default="magnitude", help="e.g. taylor")
    parser.add_argument("--allocation", choices=("global", "layer"), default="global", help="e.g. layer")
    parser.add_argument("--seed", type=int, default=0, help="e.g. 1")
    parser.add_argument("--out", type=Path, help="write JSON results here, e.g. results.json")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = run(args.data_dir, args.model, args.schedule, args.seed, args.quiet,
                 args.criterion, args.allocation)
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
