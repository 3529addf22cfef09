"""Allocations: how many weights to keep in which layer, given each layer's saliency (any criterion).

'layer' prunes the same fraction of every layer, 'global' one fraction of all layers together
(one threshold across layers on |saliency|), 'std' the paper's rule |saliency| < quality * std.
Per-layer values override the default for the layers named; under 'global' those layers are
pruned on their own and the rest share the global budget. With a structured criterion the
fraction counts scored groups, not weights. Masks have the saliency's shape; ties go by index.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from deepcompress.errors import CompressError
from deepcompress.registry import Registry


def check_sparsity(value: object, what: str) -> None:
    """CompressError unless value is a number in [0, 1)."""
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise CompressError(f"{what} {value!r}: sparsity must be in [0, 1); e.g. 0.9 prunes 90% of weights")


def keep_fraction(saliency: Tensor, sparsity: float) -> Tensor:
    """0/1 mask pruning exactly round(sparsity * numel) least-|saliency| entries (ties by index)."""
    check_sparsity(sparsity, "sparsity")
    flat = saliency.detach().abs().flatten()
    k = math.floor(sparsity * flat.numel() + 0.5)
    mask = torch.ones_like(flat)
    mask[torch.argsort(flat, stable=True)[:k]] = 0
    return mask.view_as(saliency)


def keep_fraction_across(saliencies: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """0/1 masks pruning exactly round(sparsity * total) least-|saliency| entries across all tensors."""
    check_sparsity(sparsity, "sparsity")
    flat = torch.cat([s.detach().abs().flatten().float() for s in saliencies.values()])
    k = math.floor(sparsity * flat.numel() + 0.5)
    keep = torch.ones_like(flat)
    keep[torch.argsort(flat, stable=True)[:k]] = 0
    parts = keep.split([s.numel() for s in saliencies.values()])
    return {name: p.view_as(s).to(s.dtype) for (name, s), p in zip(saliencies.items(), parts, strict=True)}


def keep_above_std(saliency: Tensor, quality: float) -> Tensor:
    """0/1 mask pruning entries with |saliency| below quality times its std (Han et al.)."""
    s = saliency.detach()
    return (s.abs() >= quality * s.float().std()).to(s.dtype)


class Allocation:
    """Turns per-layer saliencies and targets into 0/1 masks; subclasses set name and implement masks."""

    name: ClassVar[str]
    target: ClassVar[str] = "sparsity"  # the PruneConfig field holding the target: sparsity or quality

    def check(self, value: object, what: str) -> None:
        """CompressError unless value is a valid target."""
        check_sparsity(value, what)

    def ramp(self, target: float, fraction: float) -> float:
        """Target of an intermediate pruning step, fraction of the way (density geometric in fraction)."""
        return 1.0 - (1.0 - target) ** fraction

    def masks(self, saliencies: dict[str, Tensor], overrides: dict[str, float],
              default: float) -> dict[str, Tensor]:
        """Masks by layer: overridden layers get their own target, the others default."""
        raise NotImplementedError


registry: Registry[type[Allocation]] = Registry("allocation")
register = registry.register
get = registry.get
names = registry.names


@register
class Global(Allocation):
    """One fraction of all (non-overridden) layers' weights together: a single threshold."""

    name = "global"

    def masks(self, saliencies: dict[str, Tensor], overrides: dict[str, float],
              default: float) -> dict[str, Tensor]:
        """Overridden layers alone, the rest ranked together."""
        out = {name: keep_fraction(s, overrides[name]) for name, s in saliencies.items() if name in overrides}
        rest = {name: s for name, s in saliencies.items() if name not in overrides}
        if rest:
            out.update(keep_fraction_across(rest, default))
        return {name: out[name] for name in saliencies}


@register
class Layer(Allocation):
    """The same fraction of every layer (or its override)."""

    name = "layer"

    def masks(self, saliencies: dict[str, Tensor], overrides: dict[str, float],
              default: float) -> dict[str, Tensor]:
        """Each layer ranked on its own."""
        return {name: keep_fraction(s, overrides.get(name, default)) for name, s in saliencies.items()}


@register
class Std(Allocation):
    """The paper's rule: prune |saliency| < quality * std(saliency), per layer."""

    name = "std"
    target = "quality"

    def check(self, value: object, what: str) -> None:
        """CompressError unless value is a number >= 0."""
        if not (isinstance(value, (int, float)) and value >= 0):
            raise CompressError(f"{what} {value!r}: quality must be >= 0; e.g. 1.0 prunes |w| < 1 std")

    def ramp(self, target: float, fraction: float) -> float:
        """Quality grows linearly with the fraction."""
        return target * fraction

    def masks(self, saliencies: dict[str, Tensor], overrides: dict[str, float],
              default: float) -> dict[str, Tensor]:
        """Each layer against its own std."""
        return {name: keep_above_std(s, overrides.get(name, default)) for name, s in saliencies.items()}
