"""Figures for BENCHMARKS.md (matplotlib, PNG):

- weights-MODEL-LAYER.png: one layer's weight distribution dense, after pruning, and after
  weight sharing with the centroids marked (the paper's Figures 4 and 5);
- sweep-MODEL.png: test accuracy against compression ratio for a sweep of sparsity and bits
  (the paper's Figure 6), each point a real .dcz.

    python benchmarks/plots.py --data-dir ../shared/data/mnist --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    MODELS,
    compress_config,
    dcz_bytes,
    dense_model,
    pruned_copy,
    settings,
    shared_copy,
)

from deepcompress.tasks import load_task  # noqa: E402
from deepcompress.train import evaluate  # noqa: E402


def weight_figure(dense, pruned, shared, layer: str, path: Path) -> None:
    get = {"dense": dense, "pruned": pruned, "shared": shared}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), sharex=True)
    for ax, (title, model) in zip(axes, get.items(), strict=True):
        w = dict(model.named_parameters())[f"{layer}.weight"].detach().flatten()
        nz = w[w != 0] if title != "dense" else w
        ax.hist(nz.numpy(), bins=200, color="tab:blue")
        if title == "shared":
            for c in torch.unique(nz).tolist():
                ax.axvline(c, color="tab:red", lw=0.8, alpha=0.7)
        ax.set_title(f"{layer} {title}: {nz.numel()} weights"
                     + (f", {torch.unique(nz).numel()} centroids" if title == "shared" else ""))
        ax.set_xlabel("weight value")
    axes[0].set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def sweep_figure(points: list[dict], dense_acc: float, model: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for sparsity in sorted({p["sparsity"] for p in points}):
        row = sorted((p for p in points if p["sparsity"] == sparsity), key=lambda p: p["ratio"])
        ax.plot([p["ratio"] for p in row], [100 * p["accuracy"] for p in row], "o-",
                label=f"{100 * (1 - sparsity):.0f}% weights kept")
        for p in row:
            ax.annotate(f"{p['bits']}b", (p["ratio"], 100 * p["accuracy"]), fontsize=7,
                        xytext=(2, 3), textcoords="offset points")
    ax.axhline(100 * dense_acc, color="gray", ls="--", lw=1, label="dense")
    ax.axhline(100 * dense_acc - 0.5, color="tab:red", ls=":", lw=1, label="dense - 0.5 pt")
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (fp32 bytes / .dcz bytes)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{model} on MNIST: pruning + weight sharing")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="folder with the MNIST IDX files")
    ap.add_argument("--model", default="lenet300", choices=sorted(MODELS), help="which LeNet")
    ap.add_argument("--layer", default="fc2", help="layer for the weight-distribution figure")
    ap.add_argument("--sparsities", default="0.9,0.95,0.965,0.98", help="sweep sparsities")
    ap.add_argument("--bits", default="2,3,4,5,8", help="sweep bits")
    ap.add_argument("--out-dir", default="benchmarks/results", help="where the PNGs go")
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = settings(args.model)
    task = load_task("mnist", args.data_dir)
    dense = dense_model(args.model, task, s)
    dense_acc = evaluate(dense, task, "test")
    dense_bytes = 4 * sum(t.numel() for t in dense.state_dict().values())
    points = []
    for sparsity in [float(x) for x in args.sparsities.split(",")]:
        pruned = pruned_copy(dense, task, compress_config(s, sparsity=sparsity))
        for bits in [int(b) for b in args.bits.split(",")]:
            shared = shared_copy(pruned, task, compress_config(s, sparsity=sparsity, bits=bits))
            points.append({"sparsity": sparsity, "bits": bits,
                           "accuracy": evaluate(shared, task, "test"),
                           "ratio": dense_bytes / dcz_bytes(shared)})
            print(points[-1], flush=True)
            if sparsity == float(s["compress"]["sparsity"]) and bits == 4:
                weight_figure(dense, pruned, shared, args.layer,
                              out / f"weights-{args.model}-{args.layer}.png")
    sweep_figure(points, dense_acc, args.model, out / f"sweep-{args.model}.png")
    (out / f"sweep-{args.model}.json").write_text(
        json.dumps({"dense_accuracy": dense_acc, "points": points}, indent=2) + "\n")


if __name__ == "__main__":
    main()
