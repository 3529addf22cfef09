"""Stage 2 on MNIST: the pruned LeNet from the project's settings, weight-shared at 8, 6, 5, 4, 3
and 2 bits on every layer (the paper's Figures 6 and 7) and fine-tuned, plus each k-means
initialisation at the configured bits. Validation and test accuracy, and the .dcz size.

    python benchmarks/bits.py --model lenet300 --data-dir ../shared/data/mnist \\
        --out benchmarks/results/bits-lenet300.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import (
    MODELS,
    compress_config,
    dcz_bytes,
    dense_model,
    pruned_copy,
    settings,
    shared_copy,
)

from deepcompress.kmeans import INITS
from deepcompress.tasks import load_task
from deepcompress.train import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), required=True, help="which LeNet")
    ap.add_argument("--data-dir", required=True, help="folder with the MNIST IDX files")
    ap.add_argument("--bits", default="8,6,5,4,3,2", help="bits to sweep, all layers alike")
    ap.add_argument("--out", help="JSON results path")
    args = ap.parse_args()
    started = time.perf_counter()
    s = settings(args.model)
    task = load_task("mnist", args.data_dir)
    dense = dense_model(args.model, task, s)
    base = compress_config(s)
    pruned = pruned_copy(dense, task, base)
    result = {"model": args.model, "dense": {"val": evaluate(dense, task, "val"),
                                             "test": evaluate(dense, task, "test")},
              "pruned": {"val": evaluate(pruned, task, "val"),
                         "test": evaluate(pruned, task, "test")},
              "configured_bits": base.bits, "sweep": [], "inits": []}
    print(f"dense {result['dense']}, pruned {result['pruned']}", flush=True)

    def measure(config, **labels) -> dict:
        model = shared_copy(pruned, task, config)
        row = {**labels, "val": evaluate(model, task, "val"), "test": evaluate(model, task, "test"),
               "bytes": dcz_bytes(model),
               "test_drop_points": 100 * (result["dense"]["test"] - evaluate(model, task, "test"))}
        print(row, flush=True)
        return row

    for bits in [int(b) for b in args.bits.split(",")]:
        result["sweep"].append(measure(compress_config(s, bits=bits, init="linear"), bits=bits))
    for init in INITS:
        result["inits"].append(measure(compress_config(s, init=init), init=init,
                                       bits=base.bits))
    result["seconds"] = time.perf_counter() - started
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
