"""Exact, fast 1-D k-means (Lloyd with sorted prefix sums, optional DP-optimal init) for weight sharing.

Everything works on one sorted copy of the data.  In 1-D the Voronoi cells of sorted centroids are
contiguous runs of the sorted data, so an assignment step is a binary search of the k-1 midpoints
and an update step is k differences of prefix sums: O(k log n) per Lloyd iteration after the sort.
Prefix sums are kept per block of ``_BLOCK`` values in float64 (one cheap pass) and completed on
demand with at most ``_BLOCK`` values per queried position, so no n-long float64 array is built.

Empty clusters: while iterating, an empty cluster is re-seeded at the data point farthest from its
centroid (in 1-D that is an end point of some cluster), largest error first, which always lowers
the SSE.  Clusters still empty after the last assignment are dropped, so every returned centroid
has at least one member.  If the data have at most k distinct values the centroids are exactly
those values (SSE 0) and no iteration is run.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from deepcompress.errors import CompressError

INITS = ("linear", "density", "random", "kmeans++", "optimal")

_BLOCK = 512  # values per stored prefix-sum block
_LUT_CELLS = 1 << 16  # cells of the lookup table used to label large arrays
_CHUNK = 1 << 18  # values per chunk when labelling (keeps temporaries in cache)
_DP_BINS = 2048  # equal-count bins plus as many equal-width bins for the optimal init


@dataclass
class KMeansResult:
    """Outcome of kmeans1d: sorted centroids (float64), labels in input order, SSE and counters."""

    centroids: np.ndarray
    labels: np.ndarray | None
    sse: float
    iterations: int
    converged: bool
    empty_dropped: int
    exact: bool  # True when the data have at most k distinct values (centroids are those values)


@dataclass
class _Sorted:
    """Sorted data with float64 prefix sums of x and x^2 at every _BLOCK-th position."""

    x: np.ndarray
    s: np.ndarray
    q: np.ndarray


def _as_numpy(values: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(values, Tensor):
        t = values.detach().reshape(-1)
        if t.dtype not in (torch.float32, torch.float64):
            t = t.float()
        return t.cpu().numpy()
    a = np.asarray(values).reshape(-1)
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64 if a.dtype.itemsize > 4 else np.float32)
    return a


def _sorted(x: np.ndarray) -> _Sorted:
    """Sort x in place, reject NaN/inf (sorted to the ends) and build the block prefix sums."""
    x.sort()
    if x.size and not (np.isfinite(x[0]) and np.isfinite(x[-1])):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise CompressError(f"weights contain {bad} NaN or infinite values; fix the model before weight sharing")
    nb = x.size // _BLOCK
    blocks = x[: nb * _BLOCK].reshape(nb, _BLOCK)
    s = np.zeros(nb + 1)
    q = np.zeros(nb + 1)
    np.cumsum(blocks.sum(axis=1, dtype=np.float64), out=s[1:])
    np.cumsum(np.einsum("ij,ij->i", blocks, blocks, dtype=np.float64), out=q[1:])
    return _Sorted(x, s, q)


def _prefix(d: _Sorted, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sums of x[:p] and x[:p]**2 (float64) for every position p in pos."""
    pos = np.asarray(pos, dtype=np.int64)
    blk = pos // _BLOCK
    base = blk * _BLOCK
    offs = np.arange(_BLOCK)
    idx = np.minimum(base[:, None] + offs, max(d.x.size - 1, 0))
    vals = np.where(offs < (pos - base)[:, None], d.x[idx].astype(np.float64), 0.0)
    return d.s[blk] + vals.sum(axis=1), d.q[blk] + np.einsum("ij,ij->i", vals, vals)


def _floor_to(m: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Largest values of dtype that are <= m, so comparisons in dtype match comparisons with m."""
    if dtype == np.float64:
        return m
    r = m.astype(dtype)
    over = r.astype(np.float64) > m
    r[over] = np.nextafter(r[over], dtype.type(-np.inf))
    return r


def _midpoints(c: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return _floor_to((c[:-1] + c[1:]) / 2, dtype)


def _bounds(d: _Sorted, c: np.ndarray) -> np.ndarray:
    """Cluster boundaries [0, ..., n] in the sorted data for sorted centroids c (ties go left)."""
    pos = np.searchsorted(d.x, _midpoints(c, d.x.dtype), side="right")
    return np.concatenate(([0], pos, [d.x.size]))


def _reseed(d: _Sorted, bounds: np.ndarray, c: np.ndarray, n_empty: int) -> np.ndarray:
    """Up to n_empty distinct data values farthest from their own centroid, largest error first."""
    ne = np.flatnonzero(bounds[1:] > bounds[:-1])
    ends = np.concatenate((d.x[bounds[ne]], d.x[bounds[ne + 1] - 1])).astype(np.float64)
    err = (ends - np.concatenate((c[ne], c[ne]))) ** 2
    order = np.argsort(-err, kind="stable")
    ends, err = ends[order], err[order]
    ends = ends[err > 0]
    _, first = np.unique(ends, return_index=True)
    return ends[np.sort(first)][:n_empty]


def _lloyd(d: _Sorted, c: np.ndarray, iters: int) -> tuple[np.ndarray, int, bool]:
    """Lloyd iterations from sorted centroids c; stops when the assignment no longer changes."""
    prev = None
    for it in range(1, iters + 1):
        bounds = _bounds(d, c)
        cnt = np.diff(bounds)
        sums = np.diff(_prefix(d, bounds)[0])
        full = cnt > 0
        new = c.copy()
        new[full] = sums[full] / cnt[full]
        empty = np.flatnonzero(~full)
        if empty.size:
            seeds = _reseed(d, bounds, c, empty.size)
            new[empty[: seeds.size]] = seeds
        new.sort()
        done = prev is not None and not empty.size and np.array_equal(bounds, prev)
        prev, c = bounds, new
        if done:
            return c, it, True
    return c, iters, False


def _init_kmeanspp(d: _Sorted, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ (D^2 sampling) using prefix sums: O(k^2 + k log n) work after the sort."""
    x, n = d.x, d.x.size
    c = np.array([x[rng.integers(n)]], dtype=np.float64)
    while c.size < k:
        bounds = _bounds(d, c)
        s, q = _prefix(d, bounds)
        cnt, ss, qq = np.diff(bounds), np.diff(s), np.diff(q)
        mass = np.maximum(qq - 2 * c * ss + cnt * c * c, 0.0)
        cum = np.cumsum(mass)
        if cum[-1] <= 0:
            break
        u = rng.random() * cum[-1]
        j = min(int(np.searchsorted(cum, u, side="right")), c.size - 1)
        u -= cum[j - 1] if j else 0.0
        lo, hi = int(bounds[j]), int(bounds[j + 1])
        s0, q0 = _prefix(d, np.array([lo]))
        cj = c[j]
        # smallest p in (lo, hi] whose within-cluster D^2 mass from lo reaches u; the point is x[p-1]
        a, b = lo + 1, hi
        while a < b:
            m = (a + b) // 2
            sm, qm = _prefix(d, np.array([m]))
            if (qm - q0) - 2 * cj * (sm - s0) + (m - lo) * cj * cj >= u:
                b = m
            else:
                a = m + 1
        c = np.sort(np.append(c, x[a - 1]))
    return c


def _bin_edges(d: _Sorted, k: int) -> np.ndarray:
    """Bin boundaries (positions in the sorted data) for the DP: runs of equal values when few,
    else the union of equal-count and equal-width bins (narrow both in the bulk and in the tails)."""
    x, n = d.x, d.x.size
    bins = max(_DP_BINS, 2 * k)
    if n <= 2 * bins:
        return np.concatenate(([0], np.flatnonzero(x[1:] != x[:-1]) + 1, [n]))
    by_count = np.linspace(0, n, bins + 1).astype(np.int64)
    grid = np.linspace(float(x[0]), float(x[-1]), bins + 1)[1:-1]
    by_value = np.searchsorted(x, _floor_to(grid, x.dtype), side="right")
    return np.unique(np.concatenate((by_count, by_value, [0, n])))


def _dp_partition(cn: np.ndarray, cs: np.ndarray, cq: np.ndarray, k: int) -> np.ndarray:
    """Optimal split of m weighted bins (prefix count/sum/sumsq cn, cs, cq) into k contiguous
    groups minimising the SSE; returns the k start bins.  Row by row DP whose argmin is monotone
    (the 1-D cost is Monge), solved by divide and conquer, vectorised over each recursion level."""
    m = cn.size - 1

    def cost(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        w = cn[hi + 1] - cn[lo]
        s = cs[hi + 1] - cs[lo]
        return (cq[hi + 1] - cq[lo]) - s * s / w

    prev = cost(np.zeros(m, dtype=np.int64), np.arange(m))
    arg = np.zeros((k, m), dtype=np.int64)
    for j in range(1, k):
        cur = np.full(m, np.inf)
        ilo, ihi = np.array([j]), np.array([m - 1])
        olo, ohi = np.array([j]), np.array([m - 1])
        while ilo.size:
            mid = (ilo + ihi) // 2
            top = np.minimum(ohi, mid)
            lens = top - olo + 1
            starts = np.cumsum(lens) - lens
            owner = np.repeat(np.arange(mid.size), lens)
            cand = np.arange(lens.sum()) - starts[owner] + olo[owner]
            v = prev[cand - 1] + cost(cand, mid[owner])
            best = np.minimum.reduceat(v, starts)
            hits = np.flatnonzero(v <= best[owner])
            opt = cand[hits[np.searchsorted(hits, starts)]]
            cur[mid], arg[j, mid] = best, opt
            left, right = ilo <= mid - 1, mid + 1 <= ihi
            ilo, ihi, olo, ohi = (
                np.concatenate((ilo[left], mid[right] + 1)),
                np.concatenate((mid[left] - 1, ihi[right])),
                np.concatenate((olo[left], opt[right])),
                np.concatenate((opt[left], ohi[right])),
            )
        prev = cur
    starts = np.zeros(k, dtype=np.int64)
    i = m - 1
    for j in range(k - 1, 0, -1):
        starts[j] = arg[j, i]
        i = starts[j] - 1
    return starts


def _init_optimal(d: _Sorted, k: int) -> np.ndarray:
    """Centroids of the SSE-optimal clustering of a fine histogram of the data (exact on few values)."""
    edges = _bin_edges(d, k)
    s, q = _prefix(d, edges)
    cn = edges.astype(np.float64)
    starts = _dp_partition(cn, s, q, k)
    bounds = np.append(starts, edges.size - 1)
    return np.diff(s[bounds]) / np.diff(cn[bounds])


def _initial(d: _Sorted, k: int, init: str, seed: int) -> np.ndarray:
    x, n = d.x, d.x.size
    rng = np.random.default_rng(seed)
    if init == "linear":
        return np.linspace(float(x[0]), float(x[-1]), k)
    if init == "density":
        return x[((np.arange(k) + 0.5) * (n / k)).astype(np.int64)].astype(np.float64)
    if init == "random":
        return np.sort(x[rng.choice(n, size=k, replace=False)].astype(np.float64))
    if init == "kmeans++":
        return _init_kmeanspp(d, k, rng)
    return _init_optimal(d, k)


def _distinct_upto(x: np.ndarray, k: int) -> np.ndarray | None:
    """The distinct values of sorted x if there are at most k of them, else None (O(k log n))."""
    found, pos = [], 0
    while pos < x.size and len(found) <= k:
        found.append(x[pos])
        pos = int(np.searchsorted(x, x[pos], side="right"))
    return np.array(found, dtype=x.dtype) if pos == x.size and len(found) <= k else None


def _fit(d: _Sorted, k: int, init: str, iters: int, seed: int) -> tuple[np.ndarray, float, int, bool, int, bool]:
    """Centroids, SSE, iterations, converged, empty clusters dropped, exact for sorted data."""
    x, n = d.x, d.x.size
    if n == 0:
        return np.zeros(0), 0.0, 0, True, 0, True
    distinct = _distinct_upto(x, k)
    if distinct is not None:
        return distinct.astype(np.float64), 0.0, 0, True, 0, True
    c, it, converged = _lloyd(d, _initial(d, k, init, seed), iters)
    bounds = _bounds(d, c)
    full = bounds[1:] > bounds[:-1]
    s, q = _prefix(d, bounds)
    cnt, ss, qq = np.diff(bounds), np.diff(s), np.diff(q)
    sse = float(np.maximum(qq - 2 * c * ss + cnt * c * c, 0.0)[full].sum())
    return c[full], sse, it, converged, int(k - full.sum()), False


def _labels(x: np.ndarray, c: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Index of the nearest centroid (ties to the lower one) for every x in [lo, hi], in x's order."""
    out = np.empty(x.size, dtype=np.int16 if c.size <= 1 << 15 else np.int64)
    mids = _midpoints(c, x.dtype)
    if x.size <= _CHUNK or hi <= lo:
        out[:] = np.searchsorted(mids, x, side="left")
        return out
    # Cell lookup: cells come from the same float ops for data and midpoints, so a midpoint in an
    # earlier (later) cell is below (above) every value of a cell; only same-cell ones are compared.
    t = x.dtype.type
    lo_, scale = t(lo), t((_LUT_CELLS - 1) / (hi - lo))
    mcell = np.clip(np.floor((mids - lo_) * scale), -1, _LUT_CELLS + 1).astype(np.int64)
    cells = np.arange(_LUT_CELLS + 1)
    lut = np.searchsorted(mcell, cells, side="left").astype(out.dtype)
    per = np.searchsorted(mcell, cells, side="right") - lut
    rounds = int(per.max())
    if rounds > 4:
        for s in range(0, x.size, _CHUNK):
            out[s : s + _CHUNK] = np.searchsorted(mids, x[s : s + _CHUNK], side="left")
        return out
    thr = np.full((rounds, cells.size), np.inf, dtype=x.dtype)
    for r in range(rounds):
        has = per > r
        thr[r, has] = mids[lut[has].astype(np.int64) + r]

    def run(start: int, stop: int) -> None:
        tmp = np.empty(_CHUNK, dtype=x.dtype)
        cell = np.empty(_CHUNK, dtype=np.intp)
        for s in range(start, stop, _CHUNK):
            v = x[s : min(s + _CHUNK, stop)]
            m = v.size
            np.subtract(v, lo_, out=tmp[:m])
            np.multiply(tmp[:m], scale, out=tmp[:m])
            cell[:m] = tmp[:m]
            o = out[s : s + m]
            np.take(lut, cell[:m], out=o)
            for r in range(rounds):
                o += v > np.take(thr[r], cell[:m])

    # numpy releases the GIL in these loops, so threads over disjoint slices scale
    workers = max(1, min(os.cpu_count() or 1, 8, x.size // (4 * _CHUNK)))
    cuts = [(x.size * i // workers) // _CHUNK * _CHUNK for i in range(workers)] + [x.size]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, cuts[:-1], cuts[1:]))
    return out


def _validate(k: int, init: str, iters: int) -> None:
    if not isinstance(k, int | np.integer) or k < 1:
        raise CompressError(f"k-means: k={k!r} is not a positive integer; pass k >= 1")
    if init not in INITS:
        raise CompressError(f"k-means: unknown init {init!r}; use one of {', '.join(INITS)}")
    if iters < 0:
        raise CompressError(f"k-means: iters={iters} is negative; pass iters >= 0")


def kmeans1d(
    values: np.ndarray | Tensor,
    k: int,
    init: str = "linear",
    iters: int = 30,
    seed: int = 0,
    labels: bool = True,
) -> KMeansResult:
    """Cluster every given value (zeros included) into at most k clusters; deterministic per seed."""
    _validate(k, init, iters)
    x = _as_numpy(values)
    d = _sorted(x.copy())
    c, sse, it, conv, dropped, exact = _fit(d, int(k), init, iters, seed)
    lab = None
    if labels:
        lab = _labels(x, c, float(d.x[0]), float(d.x[-1])) if x.size else np.zeros(0, np.int16)
    return KMeansResult(c, lab, sse, it, conv, dropped, exact)


def _codebook(nonzeros: np.ndarray, k: int, init: str, iters: int, seed: int) -> tuple[_Sorted, np.ndarray]:
    _validate(k, init, iters)
    d = _sorted(nonzeros)
    return d, _fit(d, int(k), init, iters, seed)[0]


def fit_centroids(weight: Tensor, k: int, init: str = "linear", iters: int = 30, seed: int = 0) -> Tensor:
    """The codebook cluster_weight would give, without labelling every weight (weight's dtype)."""
    flat = _as_numpy(weight)
    c = _codebook(flat[flat != 0], k, init, iters, seed)[1]
    return torch.from_numpy(c).to(weight.device,
                                  weight.dtype if weight.is_floating_point() else torch.float32)


def cluster_weight(
    weight: Tensor, k: int, init: str = "linear", iters: int = 30, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Cluster the nonzeros of weight: (codebook in weight's dtype, int16 index of weight's shape, -1 at zeros)."""
    if k > 1 << 15:
        raise CompressError(f"k-means: k={k} does not fit an int16 index; use k <= 32768")
    flat = _as_numpy(weight)
    nonzero = flat != 0
    d, c = _codebook(flat[nonzero], k, init, iters, seed)
    if c.size == 0:
        index = np.full(flat.size, -1, dtype=np.int16)
    else:
        index = _labels(flat, c, min(float(d.x[0]), 0.0), max(float(d.x[-1]), 0.0)).astype(np.int16, copy=False)
        index[~nonzero] = -1
    codebook = torch.from_numpy(c).to(weight.device,
                                      weight.dtype if weight.is_floating_point() else torch.float32)
    return codebook, torch.from_numpy(index).reshape(weight.shape).to(weight.device)
