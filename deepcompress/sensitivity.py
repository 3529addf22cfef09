"""Sensitivity analysis: prune one layer at a time without retraining and measure the metric."""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from tqdm import tqdm

from deepcompress.criteria import Context
from deepcompress.errors import CompressError
from deepcompress.plots import pyplot
from deepcompress.prune import PruneConfig, prune, select_layers, sparsity_mask
from deepcompress.tasks import Task
from deepcompress.train import evaluate

DEFAULT_SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)


@dataclass
class SensitivityResult:
    """Metric of the model with one layer pruned, for each (layer, sparsity), plus the unpruned baseline."""

    baseline: float
    sparsities: list[float]
    scores: dict[str, list[float]]  # layer name -> metric at each sparsity
    weights: dict[str, int]  # layer name -> number of weights
    split: str = "val"


def parse_sparsities(text: str) -> list[float]:
    """Parse '0.5,0.7,0.9' into sorted sparsities, each in [0, 1)."""
    try:
        values = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise CompressError(f"sparsities {text!r}: not a comma-separated list of numbers; e.g. 0.5,0.7,0.9") from None
    if not values or not all(0.0 <= v < 1.0 for v in values):
        raise CompressError(f"sparsities {text!r}: need values in [0, 1); e.g. 0.5,0.7,0.9")
    return values


def analyze(
    model: nn.Module,
    task: Task,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    config: PruneConfig | None = None,
    split: str = "val",
    quiet: bool = True,
) -> SensitivityResult:
    """Metric on split after pruning each selected layer alone to each sparsity (no retraining).

    Weights are ranked by config.criterion (magnitude by default; taylor reads training batches
    of task); config's allocation and targets are not used.
    """
    config = config or PruneConfig()
    layers = select_layers(model, config)
    values = parse_sparsities(",".join(str(s) for s in sparsities))
    scores: dict[str, list[float]] = {name: [] for name in layers}
    context = Context.from_task(model, task)  # every trial starts from model's weights
    with tqdm(total=len(layers) * len(values), disable=quiet, desc="sensitivity", leave=False) as bar:
        for name in layers:
            for sparsity in values:
                trial = copy.deepcopy(model)
                alone = PruneConfig(criterion=config.criterion, allocation="layer", sparsity=sparsity,
                                    include=(name,), types=config.types, embeddings=config.embeddings,
                                    min_weights=0)
                prune(trial, alone, context)
                scores[name].append(evaluate(trial, task, split))
                bar.update(1)
    return SensitivityResult(
        baseline=evaluate(model, task, split),
        sparsities=values,
        scores=scores,
        weights={name: m.weight.numel() for name, m in layers.items()},
        split=split,
    )


def tolerated_sparsities(result: SensitivityResult, tolerance: float) -> dict[str, float]:
    """Per layer, the largest tested sparsity up to which the metric stays within tolerance of baseline."""
    chosen: dict[str, float] = {}
    for name, scores in result.scores.items():
        best = 0.0
        for sparsity, score in zip(result.sparsities, scores, strict=True):
            if score < result.baseline - tolerance:
                break
            best = sparsity
        chosen[name] = best
    return chosen


def thresholds(model: nn.Module, sparsities: dict[str, float]) -> dict[str, float]:
    """Magnitude threshold per layer equivalent to the given sparsities (largest pruned |w|, 0 if none)."""
    modules = dict(model.named_modules())
    out: dict[str, float] = {}
    for name, sparsity in sparsities.items():
        if name not in modules:
            raise CompressError(f"layer {name!r}: not a module of {type(model).__name__}; check the name")
        weight = modules[name].weight.detach()
        pruned = weight[sparsity_mask(weight, sparsity) == 0].abs()
        out[name] = float(pruned.max()) if pruned.numel() else 0.0
    return out


def prune_config(result: SensitivityResult, tolerance: float, **kwargs) -> PruneConfig:
    """PruneConfig pruning each analysed layer to its tolerated sparsity (extra kwargs passed on)."""
    chosen = tolerated_sparsities(result, tolerance)
    return PruneConfig(**{"allocation": "layer", **kwargs, "sparsity": 0.0, "layers": chosen})


def to_dict(result: SensitivityResult, tolerance: float | None = None) -> dict:
    """JSON-able form of result, with the tolerated sparsities when tolerance is given."""
    data = {
        "split": result.split,
        "baseline": result.baseline,
        "sparsities": list(result.sparsities),
        "layers": {name: {"weights": result.weights[name], "scores": scores}
                   for name, scores in result.scores.items()},
    }
    if tolerance is not None:
        data["tolerance"] = tolerance
        data["tolerated_sparsity"] = tolerated_sparsities(result, tolerance)
    return data


def render_table(result: SensitivityResult, tolerance: float | None = None) -> str:
    """Text table: one row per layer, one column per sparsity, metric values."""
    width = max([5] + [len(n) for n in result.scores])
    head = f"{'layer':<{width}} {'weights':>8} " + " ".join(f"{s:>6.0%}" if s * 100 == int(s * 100)
                                                             else f"{s:>6.3g}" for s in result.sparsities)
    lines = [f"baseline {result.split} metric: {result.baseline:.4f}", head]
    chosen = tolerated_sparsities(result, tolerance) if tolerance is not None else {}
    for name, scores in result.scores.items():
        row = f"{name:<{width}} {result.weights[name]:>8} " + " ".join(f"{v:>6.4f}" for v in scores)
        if name in chosen:
            row += f"   -> {chosen[name]:g}"
        lines.append(row)
    if tolerance is not None:
        lines.append(f"-> largest sparsity within {tolerance:g} of baseline")
    return "\n".join(lines)


def plot(result: SensitivityResult, path: str | Path) -> None:
    """Write a PNG line plot of metric against sparsity, one line per layer (needs matplotlib)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, scores in result.scores.items():
        ax.plot(result.sparsities, scores, marker="o", label=name)
    ax.axhline(result.baseline, color="grey", linestyle="--", label="dense")
    ax.set_xlabel("sparsity of the layer")
    ax.set_ylabel(f"{result.split} metric")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
