"""The LeNets from their dense models with 512 unlabeled MNIST training images as the only data
(issue 14): layer-wise OBS pruning and GPTQ-style sharing from calibration, optionally with
distillation on the dense model's outputs; no labels are read by the compression.

    python benchmarks/unlabeled.py --model lenet300 --data-dir ../shared/data/mnist \\
        --out benchmarks/results/unlabeled-lenet300.json

The dense model is trained as table1.py trains it (benchmarks/configs/MODEL.toml, its seed, the
same thread count), the calibration images are the first 512 of the training split (labels
dropped), and every grid point goes through `deepcompress.compress_file` (what `dcompress
compress MODEL.pt --arch ... --calib calib.pt` runs). Each point is scored on the reloaded
.dcz; the chosen point is the smallest file within --within points of dense on the validation
split (the test split is reported, never used to choose).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

import torch
from common import MODELS, dense_model, settings

import deepcompress
from deepcompress.pipeline import CompressConfig
from deepcompress.tasks import load_task
from deepcompress.train import evaluate

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), required=True, help="which LeNet")
    ap.add_argument("--data-dir", required=True, help="folder with the MNIST IDX files")
    ap.add_argument("--images", type=int, default=512, help="unlabeled calibration images")
    ap.add_argument("--sparsity", default="0.8,0.9,0.95", help="comma-separated grid")
    ap.add_argument("--layer-sparsity", default="",
                    help="more sparsity points, per layer: 'fc1=0.95,fc2=0.8;fc1=0.97,fc2=0.9' "
                    "(layers not named stay dense)")
    ap.add_argument("--bits", default="3,4", help="comma-separated grid")
    ap.add_argument("--distill-epochs", default="0,20", help="comma-separated grid")
    ap.add_argument("--distill-mix", default="0", help="comma-separated grid of mixed inputs "
                    "per calibration input in distillation (with distill epochs only)")
    ap.add_argument("--within", type=float, default=1.0, help="validation points the chosen "
                    "file may lose against the dense model")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "unlabeled",
                    help="dense model, calibration images and every point's .dcz")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads (default all cores, as table1.py: the same dense model)")
    ap.add_argument("--out", type=Path, required=True, help="JSON results path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work / args.model
    work.mkdir(parents=True, exist_ok=True)
    s = settings(args.model)
    task = load_task("mnist", args.data_dir)
    started = time.perf_counter()

    src, calib = work / "dense.pt", work / "calib.pt"
    net = MODELS[args.model]()
    if src.exists():
        net.load_state_dict(torch.load(src, weights_only=True))
    else:
        net = dense_model(args.model, task, s)
        torch.save(net.state_dict(), src)
    x = task.train[0] if isinstance(task.train, tuple) else next(iter(task.train))[0]
    torch.save(x[:args.images].clone(), calib)  # inputs only: no labels
    dense = {"val": evaluate(net, task, "val"), "test": evaluate(net, task, "test"),
             "bytes": src.stat().st_size}
    print(f"dense: val {dense['val']:.4f}, test {dense['test']:.4f}", flush=True)

    rows = []
    per_layer = [{k: float(v) for k, v in (kv.split("=") for kv in spec.split(","))}
                 for spec in args.layer_sparsity.split(";") if spec]
    grid = itertools.product([float(v) for v in args.sparsity.split(",") if v] + per_layer,
                             [int(v) for v in args.bits.split(",")],
                             [int(v) for v in args.distill_epochs.split(",")],
                             [int(v) for v in args.distill_mix.split(",")])
    for sparsity, bits, epochs, mix in grid:
        if mix and not epochs:
            continue
        label = (sparsity if isinstance(sparsity, float)
                 else "-".join(f"{k}{v}" for k, v in sparsity.items()))
        dst = work / (f"s{label}-b{bits}-d{epochs}" + (f"-m{mix}" if mix else "") + ".dcz")
        flag = (sparsity if isinstance(sparsity, float)
                else ",".join(f"{k}={v}" for k, v in sparsity.items()))
        config = CompressConfig(sparsity=sparsity, bits=str(bits), quiet=True,
                                distill_epochs=epochs, distill_mix=mix)
        t0 = time.perf_counter()
        deepcompress.compress_file(src, dst, config, arch=MODELS[args.model], calib=str(calib))
        seconds = time.perf_counter() - t0
        model = deepcompress.load(dst, MODELS[args.model]())
        row = {"sparsity": sparsity, "bits": bits, "distill_epochs": epochs, "distill_mix": mix,
               "bytes": dst.stat().st_size, "ratio": dense["bytes"] / dst.stat().st_size,
               "val": evaluate(model, task, "val"), "test": evaluate(model, task, "test"),
               "compress_seconds": seconds,
               "command": f"dcompress compress {src} -o {dst} --arch "
                          f"deepcompress.models:{args.model} --calib {calib} --sparsity "
                          f"{flag} --bits {bits}"
                          + (f" --distill-epochs {epochs}" if epochs else "")
                          + (f" --distill-mix {mix}" if mix else "")}
        rows.append(row)
        print(f"sparsity {flag} bits {bits} distill {epochs} mix {mix}: {row['bytes']:,} B "
              f"({row['ratio']:.1f}x), val {row['val']:.4f}, test {row['test']:.4f}, "
              f"{seconds:.0f} s", flush=True)
    ok = [r for r in rows if r["val"] >= dense["val"] - args.within / 100]
    chosen = min(ok, key=lambda r: r["bytes"]) if ok else None
    result = {"model": args.model, "images": args.images, "within_points": args.within,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s), "
                         f"torch {torch.__version__}",
              "dense": dense, "rows": rows, "chosen": chosen,
              "seconds": time.perf_counter() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if chosen:
        print(f"chosen on validation: {chosen['ratio']:.1f}x, test {chosen['test']:.4f} "
              f"(dense {dense['test']:.4f})")
    else:
        print(f"no point within {args.within} pt of dense on validation")


if __name__ == "__main__":
    main()
