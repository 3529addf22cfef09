"""Tests for deepcompress.kmeans: exactness against scikit-learn and brute force, edge cases."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.cluster import KMeans

from deepcompress.errors import CompressError
from deepcompress.kmeans import INITS, cluster_weight, kmeans1d


def direct_sse(x: np.ndarray, c: np.ndarray, labels: np.ndarray) -> float:
    return float(np.sum((x.astype(np.float64) - c[labels]) ** 2))


def nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Nearest centroid by exact float64 comparison with the midpoints, ties to the lower one."""
    return np.searchsorted((c[:-1] + c[1:]) / 2, x.astype(np.float64), side="left")


@pytest.mark.parametrize("init", INITS)
def test_each_init_runs_and_is_consistent(init: str) -> None:
    x = np.random.default_rng(3).laplace(size=5000).astype(np.float32)
    r = kmeans1d(x, 32, init=init, seed=1)
    assert r.centroids.dtype == np.float64 and r.centroids.size == 32
    assert np.all(np.diff(r.centroids) > 0)
    assert np.array_equal(r.labels, nearest(x, r.centroids))
    assert np.bincount(r.labels, minlength=32).min() > 0
    assert r.sse == pytest.approx(direct_sse(x, r.centroids, r.labels), rel=1e-9)
    again = kmeans1d(x, 32, init=init, seed=1)
    assert np.array_equal(again.centroids, r.centroids)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_lloyd_from_same_init(init: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(2000) * rng.uniform(0.1, 3)
    k = int(rng.integers(2, 24))
    start = kmeans1d(x, k, init=init, iters=0, seed=seed).centroids
    ours = kmeans1d(x, k, init=init, iters=500, seed=seed)
    km = KMeans(n_clusters=start.size, init=start.reshape(-1, 1), n_init=1, algorithm="lloyd", tol=0, max_iter=500)
    km.fit(x.reshape(-1, 1))
    assert km.n_iter_ < 500 and ours.converged
    order = np.argsort(km.cluster_centers_.ravel())
    np.testing.assert_allclose(km.cluster_centers_.ravel()[order], ours.centroids, rtol=0, atol=1e-12)
    assert ours.sse == pytest.approx(km.inertia_, rel=1e-10)
    assert ours.iterations == km.n_iter_
    assert np.array_equal(np.argsort(order)[km.labels_], ours.labels)


def test_float32_large_labels_match_exact_comparison() -> None:
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(1_500_000) * 0.02).astype(np.float32)
    r = kmeans1d(x, 256, init="density", iters=5)
    # plant values exactly at and next to the float32 images of the midpoints
    mids = ((r.centroids[:-1] + r.centroids[1:]) / 2).astype(np.float32)
    planted = np.concatenate((mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))))
    x[: planted.size] = planted
    r2 = kmeans1d(x, 256, init="density", iters=5)
    assert np.array_equal(r2.labels, nearest(x, r2.centroids))
    assert r2.sse == pytest.approx(direct_sse(x, r2.centroids, r2.labels), rel=1e-9)


def brute_force_sse(x: np.ndarray, k: int) -> float:
    best = np.inf
    for labels in itertools.product(range(k), repeat=x.size):
        lab = np.array(labels)
        sse = sum(float(((x[lab == j] - x[lab == j].mean()) ** 2).sum()) for j in set(labels))
        best = min(best, sse)
    return best


values = st.lists(st.integers(-20, 20).map(lambda v: v / 4), min_size=1, max_size=7)


@settings(max_examples=60, deadline=None)
@given(values, st.integers(1, 3))
def test_optimal_equals_brute_force(xs: list[float], k: int) -> None:
    x = np.array(xs)
    r = kmeans1d(x, k, init="optimal")
    assert r.sse == pytest.approx(brute_force_sse(x, k), abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=1, max_size=300), st.integers(1, 12))
def test_optimal_never_worse_than_linear(xs: list[float], k: int) -> None:
    x = np.array(xs, dtype=np.float32)
    opt = kmeans1d(x, k, init="optimal")
    lin = kmeans1d(x, k, init="linear")
    assert opt.sse <= lin.sse * (1 + 1e-9) + 1e-9


def test_optimal_beats_linear_on_large_layer() -> None:
    x = np.random.default_rng(0).laplace(size=400_000).astype(np.float32)
    opt = kmeans1d(x, 64, init="optimal", labels=False)
    lin = kmeans1d(x, 64, init="linear", labels=False)
    best = kmeans1d(x, 64, init="optimal", iters=3000, labels=False)
    assert opt.sse < lin.sse
    assert opt.sse <= best.sse * 1.001


def test_empty_clusters_are_reseeded_or_dropped() -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate((rng.standard_normal(1000), [60.0, -40.0]))
    k = 16
    start = kmeans1d(x, k, init="linear", iters=0)
    assert start.empty_dropped > 0  # linear init leaves most clusters empty here
    r = kmeans1d(x, k, init="linear", iters=100)
    assert r.centroids.size == k and r.empty_dropped == 0
    assert np.bincount(r.labels, minlength=k).min() > 0
    assert r.sse < start.sse


def test_fewer_distinct_values_than_clusters() -> None:
    x = np.array([3.0, -1.0, 3.0, 2.0, -1.0, 2.0, 2.0], dtype=np.float32)
    r = kmeans1d(x, 8, init="linear")
    assert r.exact and r.sse == 0 and r.iterations == 0
    np.testing.assert_array_equal(r.centroids, [-1.0, 2.0, 3.0])
    np.testing.assert_array_equal(r.centroids[r.labels], x)


def test_constant_and_empty_inputs() -> None:
    r = kmeans1d(np.full(100, 0.25, dtype=np.float32), 4)
    assert r.centroids.tolist() == [0.25] and r.sse == 0 and not r.labels.any()
    e = kmeans1d(np.zeros(0, dtype=np.float32), 4)
    assert e.centroids.size == 0 and e.labels.size == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_raises(bad: float) -> None:
    x = np.linspace(-1, 1, 50, dtype=np.float32)
    x[7] = bad
    with pytest.raises(CompressError, match="NaN or infinite"):
        kmeans1d(x, 4)
    with pytest.raises(CompressError):
        cluster_weight(torch.from_numpy(x), 4)


@pytest.mark.parametrize("kwargs", [{"k": 0}, {"k": 4, "init": "spectral"}, {"k": 4, "iters": -1}])
def test_bad_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(CompressError):
        kmeans1d(np.ones(5), **kwargs)


def test_random_init_depends_on_seed_only() -> None:
    x = np.random.default_rng(0).standard_normal(3000)
    a = kmeans1d(x, 8, init="random", iters=0, seed=1).centroids
    b = kmeans1d(x, 8, init="random", iters=0, seed=1).centroids
    c = kmeans1d(x, 8, init="random", iters=0, seed=2).centroids
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_cluster_weight_skips_zeros() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 40, generator=g)
    w[w.abs() < 0.7] = 0
    codebook, index = cluster_weight(w, 16, init="optimal")
    assert codebook.dtype == w.dtype and codebook.numel() == 16 and index.dtype == torch.int16
    assert index.shape == w.shape
    assert torch.equal(index == -1, w == 0)
    assert not torch.any(codebook == 0)  # no centroid was pulled towards the pruned zeros
    dense = torch.where(index >= 0, codebook[index.long().clamp_min(0)], torch.zeros(()))
    ref = kmeans1d(w[w != 0], 16, init="optimal")
    assert float(((dense - w) ** 2).sum()) == pytest.approx(ref.sse, rel=1e-5)


def test_cluster_weight_all_zero_and_few_values() -> None:
    codebook, index = cluster_weight(torch.zeros(3, 4), 8)
    assert codebook.numel() == 0 and bool((index == -1).all())
    w = torch.tensor([[0.0, 0.5, -0.5], [0.5, 0.0, 0.25]])
    codebook, index = cluster_weight(w, 4)
    assert codebook.tolist() == [-0.5, 0.25, 0.5]
    assert index.tolist() == [[-1, 2, 0], [2, -1, 1]]


@pytest.mark.parametrize("init", ["linear", "density", "random", "kmeans++", "optimal"])
def test_fit_centroids_is_cluster_weights_codebook(init):
    from deepcompress.kmeans import fit_centroids

    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 30, generator=g)
    w[w.abs() < 0.5] = 0
    assert torch.equal(fit_centroids(w, 16, init, 30, 1), cluster_weight(w, 16, init, 30, 1)[0])
