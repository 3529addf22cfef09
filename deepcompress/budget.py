"""Budgets instead of knobs: per-tensor bits chosen so that a file meets a size at the smallest
error, from the bytes each choice really costs once coded (not from bits x weights).

Data-free, the error is a weight-space proxy: each tensor's relative squared error
||w - q(w)||^2 / ||w||^2, summed over tensors (a layer's output error follows its relative
weight error, whatever its size). Each shared tensor is clustered at every bit width once and
encoded to learn its real bytes; then bits are lowered greedily where a byte saved costs the
least error (a Lagrangian descent over the per-tensor rate-distortion points), until the
tensors fit. Without a size, the default data-free rule is a fidelity target instead: the
fewest bytes whose mean relative squared error stays within it (choose_bits_for_error).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import CompressError
from .formats import codec
from .kmeans import cluster_weight
from .quantize import shareable

BITS = tuple(range(1, 9))


@dataclass
class Choice:
    """One shared tensor's bit width chosen for the budget, with its coded bytes and error."""

    name: str
    bits: int
    bytes: int
    rel_error: float


def _shared(w: Tensor, bits: int, init: str, seed: int) -> Tensor:
    codebook, index = cluster_weight(w, 1 << bits, init=init, seed=seed)
    return torch.where(index >= 0, codebook[index.clamp_min(0).long()], 0.0).to(w.dtype)


def _rel_error(w: Tensor, q: Tensor) -> float:
    ref = w.detach().double()
    sig = float((ref * ref).sum())
    return float(((ref - q.double()) ** 2).sum()) / sig if sig else 0.0


@dataclass
class RatePoints:
    """Every shared tensor's (bits, coded bytes, relative error) points, and the bytes of the rest."""

    points: dict[str, list[tuple[int, int, float]]]
    fixed: int
    shapes: dict[str, tuple[int, int]]  # every tensor's (elements, nonzeros), in order


def rate_points(tensors: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
                init: str = "optimal", seed: int = 0, quiet: bool = True) -> RatePoints:
    """Cluster and encode each shareable tensor at every bit width; encode the others once."""
    from tqdm import tqdm

    fixed = 0
    points: dict[str, list[tuple[int, int, float]]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for name, w in tqdm(items, disable=quiet, desc="rate-distortion", unit="tensor",
                        leave=False):
        shapes[name] = (w.numel(), int(torch.count_nonzero(w)))
        if not shareable(w):
            fixed += codec.encode_tensor(w).nbytes
            continue
        points[name] = [(b, codec.encode_tensor(q).nbytes, _rel_error(w, q))
                        for b in BITS for q in (_shared(w.detach(), b, init, seed),)]
    return RatePoints(points, fixed, shapes)


def _cheapest_step(points: dict[str, list[tuple[int, int, float]]], at: dict[str, int],
                   allowed: float = float("inf")) -> str | None:
    """The tensor whose next lower width saves a byte for the least added error, among steps
    adding at most `allowed` error; None when there is none."""
    best, best_slope = None, None
    for name, i in at.items():
        if i == 0:
            continue
        (_, b1, e1), (_, b0, e0) = points[name][i], points[name][i - 1]
        if e0 - e1 > allowed:
            continue
        if b1 - b0 <= 0:  # fewer bits, no fewer bytes: no reason to stay
            return name
        slope = (e0 - e1) / (b1 - b0)
        if best_slope is None or slope < best_slope:
            best, best_slope = name, slope
    return best


def descend(points: dict[str, list[tuple[object, int, float]]], fixed: int, target_bytes: int
            ) -> dict[str, int] | None:
    """Each name's point (index into its (setting, bytes, error) list, ordered by bytes) whose
    total with `fixed` is at most target_bytes at the smallest summed error: from every list's
    last point, step down where a byte saved costs least error; None when even the first points
    do not fit."""
    at = {name: len(p) - 1 for name, p in points.items()}
    total = fixed + sum(points[n][i][1] for n, i in at.items())
    while total > target_bytes:
        best = _cheapest_step(points, at)
        if best is None:
            return None
        total -= points[best][at[best]][1] - points[best][at[best] - 1][1]
        at[best] -= 1
    while True:  # the room the last step left: spend it where it lowers the error most
        ups = [(points[n][i][2] - points[n][i + 1][2], n) for n, i in at.items()
               if i + 1 < len(points[n])
               and total + points[n][i + 1][1] - points[n][i][1] <= target_bytes]
        if not ups:
            return at
        _, n = max(ups)
        total += points[n][at[n] + 1][1] - points[n][at[n]][1]
        at[n] += 1


def hull(points: list[tuple[object, int, float]]) -> list[tuple[object, int, float]]:
    """The points on the lower convex hull of (bytes, error), by bytes ascending: the only ones a
    Lagrangian choice (least error per byte) ever stops at."""
    front: list[tuple[object, int, float]] = []
    for p in sorted(points, key=lambda p: (p[1], p[2])):
        if front and (p[1] == front[-1][1] or p[2] >= front[-1][2]):
            continue  # no fewer bytes, or no less error, than a point already kept
        while len(front) >= 2:
            (_, x0, y0), (_, x1, y1) = front[-2], front[-1]
            if (y1 - y0) * (p[1] - x1) < (p[2] - y1) * (x1 - x0):
                break
            front.pop()  # above the chord from front[-2] to p
        front.append(p)
    return front


def choose_bits(rate: RatePoints, target_bytes: int) -> list[Choice]:
    """Bits per shared tensor whose coded tensors, with the others, take at most target_bytes at
    the smallest summed relative error (greedy: lower bits where a byte costs least error)."""
    at = descend(rate.points, rate.fixed, target_bytes)
    if at is None:
        floor = rate.fixed + sum(p[0][1] for p in rate.points.values())
        raise CompressError(f"target {target_bytes} B: even 1 bit everywhere takes {floor} B "
                            f"(tensors that are not shared: {rate.fixed} B); ask for a larger "
                            "file, or prune too")
    return [Choice(n, *rate.points[n][i]) for n, i in at.items()]


def choose_bits_for_error(rate: RatePoints, max_error: float) -> list[Choice]:
    """Bits per shared tensor at the fewest coded bytes whose mean relative squared error over
    the shared tensors stays at most max_error (the same greedy descent from 8 bits, each step
    the cheapest in error per byte that still keeps the mean within the target)."""
    points = rate.points
    at = {name: len(BITS) - 1 for name in points}
    spent = sum(points[n][i][2] for n, i in at.items())
    budget = max_error * len(at)
    while (best := _cheapest_step(points, at, budget - spent)) is not None:
        i = at[best]
        spent += points[best][i - 1][2] - points[best][i][2]
        at[best] = i - 1
    return [Choice(n, *points[n][i]) for n, i in at.items()]


def shared_at(w: Tensor, bits: int, init: str = "optimal", seed: int = 0) -> Tensor:
    """w shared into 2^bits clusters (what rate_points measured for that width)."""
    return _shared(w.detach(), bits, init, seed)
