"""Table 1, raised: search structured-then-unstructured settings on the validation split.

Trains the dense model once (the settings' seed, as table1.py), then runs the pipeline for every
point of a grid of changes to benchmarks/configs/MODEL.toml (channels removed from every hidden
layer, sparsity, bits), keeps each result's .dcz in --keep, and marks the smallest file whose
validation accuracy is within --within points of the dense model's. The test split is reported,
never used to choose. The chosen point becomes benchmarks/configs/MODEL-raised.toml, whose row
table1.py then measures like any other.

    python benchmarks/table1_sweep.py --model lenet300 --data-dir ../shared/data/mnist \\
        --grid channels=0.3,0.5 sparsity=0.965,0.975 --out benchmarks/results/sweep1-lenet300.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import time
from pathlib import Path

import torch
from common import MODELS, compress_config, dense_model, settings

import deepcompress
from deepcompress.pipeline import compress
from deepcompress.tasks import load_task
from deepcompress.train import evaluate


def _values(text: str) -> tuple[str, list[float]]:
    key, _, values = text.partition("=")
    return key, [float(v) if "." in v else int(v) for v in values.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), required=True, help="which LeNet")
    ap.add_argument("--data-dir", required=True, help="folder with the MNIST IDX files")
    ap.add_argument("--grid", nargs="+", required=True, type=_values,
                    help="KEY=V1,V2 ... : CompressConfig fields and the values to try")
    ap.add_argument("--within", type=float, default=0.5,
                    help="validation points the chosen file may lose against the dense model")
    ap.add_argument("--keep", default="/tmp/table1-sweep", help="folder for every point's .dcz")
    ap.add_argument("--out", required=True, help="JSON results path")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads (default: all cores, as table1.py: the same dense model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = settings(args.model)
    task = load_task("mnist", args.data_dir)
    dense = dense_model(args.model, task, s)
    dense_val, dense_test = evaluate(dense, task, "val"), evaluate(dense, task, "test")
    keep = Path(args.keep)
    keep.mkdir(parents=True, exist_ok=True)
    keys = [k for k, _ in args.grid]
    rows = []
    for point in itertools.product(*(v for _, v in args.grid)):
        changes = dict(zip(keys, point, strict=True))
        started = time.perf_counter()
        model, _ = compress(copy.deepcopy(dense), task, compress_config(s, **changes))
        name = "-".join(f"{k}{v}" for k, v in changes.items())
        path = keep / f"{args.model}-{name}.dcz"
        torch.save(model.state_dict(), path.with_suffix(".pt"))  # to re-encode with a later coder
        size = deepcompress.save(model, path, {"benchmark": "table1", "model": args.model})
        row = {"changes": changes, "val_accuracy": evaluate(model, task, "val"),
               "test_accuracy": evaluate(model, task, "test"), "dcz_bytes": size,
               "dcz": str(path), "seconds": time.perf_counter() - started}
        rows.append(row)
        print(json.dumps(row), flush=True)
    ok = [r for r in rows if 100 * (dense_val - r["val_accuracy"]) <= args.within]
    chosen = min(ok, key=lambda r: r["dcz_bytes"]) if ok else None
    Path(args.out).write_text(json.dumps(
        {"model": args.model, "dense_val_accuracy": dense_val, "dense_test_accuracy": dense_test,
         "within_points": args.within, "rows": rows,
         "chosen": chosen and chosen["changes"]}, indent=2) + "\n")
    print("chosen:", chosen)


if __name__ == "__main__":
    main()
