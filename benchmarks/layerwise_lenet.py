"""LeNet-300-100 on MNIST from its dense model with 512 unlabeled training images as the only data:
layer-wise second-order compression (OBS + GPTQ onto k-means codebooks), optionally followed by
distillation from the dense model, against magnitude pruning + plain k-means at the same settings.

    python benchmarks/layerwise_lenet.py --data-dir ../shared/data/mnist [--out results/layerwise_lenet300.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn

from deepcompress.distill import distill_task
from deepcompress.layerwise import compress_layerwise, fit_codebook, nearest
from deepcompress.models import lenet300
from deepcompress.parametrize import bake
from deepcompress.prune import sparsity_mask
from deepcompress.quantize import ShareConfig, share_biases, share_weights
from deepcompress.tasks import load_task
from deepcompress.train import TrainConfig, evaluate, fit

try:
    from common import dcz_bytes  # run from benchmarks/
except ImportError:  # pragma: no cover
    from benchmarks.common import dcz_bytes


def baseline(dense: nn.Module, sparsity: dict[str, float], bits: int) -> nn.Module:
    """Magnitude pruning per layer, then nearest-centroid k-means (optimal init) per layer."""
    model = copy.deepcopy(dense)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                w = m.weight * sparsity_mask(m.weight, sparsity[name])
                book = fit_codebook(w, 1 << bits)
                m.weight.copy_(torch.where(w != 0, book[nearest(w, book)], 0.0) + 0.0)
    return model


def finish(model: nn.Module, dense_bytes: int, task, **row) -> dict:
    share_biases(model, 4, "optimal")
    bake(model)
    size = dcz_bytes(model)
    return {**row, "val": evaluate(model, task, "val"), "test": evaluate(model, task, "test"), "bytes": size,
            "ratio": round(dense_bytes / size, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="../shared/data/mnist")
    ap.add_argument("--dense", default="/tmp/lenet300_dense.pt")
    ap.add_argument("--out", default=None)
    ap.add_argument("--calib", type=int, default=512)
    args = ap.parse_args()
    torch.manual_seed(0)
    task = load_task("mnist", args.data_dir)
    dense = lenet300()
    if Path(args.dense).is_file():
        dense.load_state_dict(torch.load(args.dense, weights_only=True))
    else:
        fit(dense, task, TrainConfig(epochs=30, lr=0.05, weight_decay=1e-4, lr_schedule="cosine", quiet=True))
        torch.save(dense.state_dict(), args.dense)
    dense_bytes = 4 * sum(t.numel() for t in dense.state_dict().values())
    calib = task.train[0][torch.randperm(len(task.train[0]), generator=torch.Generator().manual_seed(1))[:args.calib]]
    rows = [{"method": "dense", "val": evaluate(dense, task, "val"), "test": evaluate(dense, task, "test"),
             "bytes": dense_bytes, "ratio": 1.0}]
    print(rows[0], flush=True)
    distill = distill_task(dense, calib, loss="kl", temperature=2.0)
    tune = TrainConfig(epochs=15, lr=1e-3, optimizer="adam", batch_size=32, quiet=True)
    settings = [("fc1=.9,fc2=.9,fc3=.7", 3), ("fc1=.95,fc2=.9,fc3=.7", 3), ("fc1=.96,fc2=.92,fc3=.75", 3),
                ("fc1=.8,fc2=.8,fc3=.6", 4)]
    for s, b in settings:
        sparsity = {k: float(v) for k, v in (p.split("=") for p in s.split(","))}
        label = {"sparsity": s, "bits": b}
        base = baseline(dense, sparsity, b)
        tuned = copy.deepcopy(base)
        share_weights(tuned, ShareConfig(bits=b))  # exact: <= 2^b values already; makes codebooks trainable
        rows.append(finish(base, dense_bytes, task, method="magnitude+kmeans", **label))
        print(rows[-1], flush=True)
        fit(tuned, distill, tune)
        rows.append(finish(tuned, dense_bytes, task, method="magnitude+kmeans+distill", **label))
        print(rows[-1], flush=True)
        for damp in (0.01, 0.1):
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            results = compress_layerwise(model, calib, sparsity=sparsity, bits=b, damp=damp)
            seconds = time.perf_counter() - t0
            errors = {r.layer: round(r.error, 4) for r in results}
            tuned = copy.deepcopy(model)
            rows.append(finish(model, dense_bytes, task, method=f"layerwise damp={damp}", seconds=round(seconds, 2),
                               errors=errors, **label))
            print(rows[-1], flush=True)
            t0 = time.perf_counter()  # centroid fine-tuning with the dense model as the teacher
            fit(tuned, distill, tune)
            rows.append(finish(tuned, dense_bytes, task, method=f"layerwise damp={damp}+distill",
                               seconds=round(seconds + time.perf_counter() - t0, 2), **label))
            print(rows[-1], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
