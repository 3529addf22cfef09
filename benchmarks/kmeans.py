"""Benchmark 1-D k-means for weight sharing on one VGG-16 fc6-sized layer (102.8M weights, k=256).

Measures deepcompress.kmeans (linear init + Lloyd, and the DP-optimal init + Lloyd polish) on the full
synthetic layer, and scikit-learn's KMeans from the same linear init on a random subsample (full
layer is far too slow for it), with our method on that same subsample for a like-for-like SSE.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from sklearn.cluster import KMeans

from deepcompress.kmeans import kmeans1d


def synth_fc6(seed: int = 0, rows: int = 25088, cols: int = 4096) -> np.ndarray:
    """Dense float32 weights: Laplacian bulk with a Gaussian component, std about 0.01."""
    rng = np.random.default_rng(seed)
    n = rows * cols
    w = rng.laplace(scale=0.006, size=n).astype(np.float32)
    w[: n // 4] = rng.standard_normal(n // 4, dtype=np.float32) * 0.01
    return w


def timed(fn):
    """(result, seconds) of fn()."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    """Run the benchmark, print a table and optionally write JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--subsample", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write results as JSON here")
    args = ap.parse_args()

    w = synth_fc6(args.seed)
    rows = []

    def run(label: str, x: np.ndarray, init: str, labels: bool = True) -> None:
        r, sec = timed(lambda: kmeans1d(x, args.k, init=init, iters=args.iters, labels=labels))
        rows.append({"method": label, "n": int(x.size), "init": init, "iters": r.iterations, "seconds": sec,
                     "sse": r.sse, "sse_per_weight": r.sse / x.size, "empty_dropped": r.empty_dropped})

    run("deepcompress (labels)", w, "linear")
    run("deepcompress (no labels)", w, "linear", labels=False)
    run("deepcompress (labels)", w, "optimal")
    run("deepcompress (no labels)", w, "optimal", labels=False)

    sub = np.random.default_rng(args.seed + 1).choice(w, size=args.subsample, replace=False)
    start = np.linspace(float(sub.min()), float(sub.max()), args.k)  # the same linear init, empties included
    km, sec = timed(lambda: KMeans(n_clusters=start.size, init=start.reshape(-1, 1), n_init=1,
                                   algorithm="lloyd", tol=0, max_iter=args.iters).fit(sub.reshape(-1, 1)))
    rows.append({"method": "sklearn KMeans lloyd", "n": int(sub.size), "init": "linear", "iters": int(km.n_iter_),
                 "seconds": sec, "sse": float(km.inertia_), "sse_per_weight": float(km.inertia_) / sub.size,
                 "empty_dropped": 0})
    run("deepcompress (labels)", sub, "linear")
    run("deepcompress (labels)", sub, "optimal")

    print(f"{'method':<26}{'n':>11}{'init':>9}{'iters':>6}{'seconds':>9}{'SSE':>14}{'SSE/weight':>12}{'dropped':>8}")
    for r in rows:
        print(f"{r['method']:<26}{r['n']:>11}{r['init']:>9}{r['iters']:>6}{r['seconds']:>9.2f}"
              f"{r['sse']:>14.6g}{r['sse_per_weight']:>12.4g}{r['empty_dropped']:>8}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"k": args.k, "iters_max": args.iters, "seed": args.seed, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
