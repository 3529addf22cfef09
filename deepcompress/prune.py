"""Stage 1: pruning with masks held as parametrizations.

What to prune is a `PruneConfig`: a criterion (deepcompress.criteria: how important each weight
is), an allocation (deepcompress.allocation: how many to keep in which layer) and the layers to
touch; when to prune, with retraining, is a schedule (deepcompress.schedules).

A pruned layer's weight becomes ``original * mask``: the mask is a buffer of the `Mask`
parametrization, so it follows deepcopy, pickling, state_dict and ``.to()``, and the effective
weight of a pruned connection is exactly zero whatever an optimizer does to ``original``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from fnmatch import fnmatch

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deepcompress import allocation, criteria
from deepcompress.allocation import (
    check_sparsity,
    keep_above_std,
    keep_fraction,
    keep_fraction_across,
)
from deepcompress.criteria import Context
from deepcompress.errors import CompressError
from deepcompress.parametrize import attach, chain, find, original

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
# The old single `criterion` word of PruneConfig, now split into criterion and allocation.
OLD_CRITERIA = {"std": "std", "sparsity": "layer", "global": "global"}


class Mask(nn.Module):
    """Parametrization multiplying a tensor by a fixed 0/1 mask buffer."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        """Return x with the pruned entries zeroed."""
        return x * self.mask


class _StraightThrough(torch.autograd.Function):
    """x * mask forward; the incoming gradient passed to x unchanged (masked entries included)."""

    @staticmethod
    def forward(ctx: object, x: Tensor, mask: Tensor) -> Tensor:
        return x * mask

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class SplicingMask(Mask):
    """Mask whose gradient reaches the dense shadow weight everywhere, pruned entries included (dynamic network surgery).

    The forward value is exactly ``x * mask``, as `Mask`'s; the backward is straight-through, so
    ``original`` keeps learning where the mask is 0 and a later mask recomputed from it can bring
    a pruned weight back (splicing). Everything that finds a `Mask` (masks_of, apply_masks, bake)
    finds this one too.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Return x with the pruned entries zeroed; the gradient passes straight through."""
        return _StraightThrough.apply(x, self.mask)


@dataclass
class PruneConfig:
    """What to prune and how much.

    criterion (deepcompress.criteria: magnitude, taylor, obd, obs and the structured ones,
    criteria.names()) scores the weights; allocation
    (deepcompress.allocation) turns scores into masks: 'layer' prunes the fraction `sparsity` of
    each layer, 'global' the fraction `sparsity` of all selected weights together, 'std' prunes
    |score| < quality * std per layer (Han et al.). `layers` maps fnmatch patterns to per-layer
    targets (a quality for 'std', a sparsity otherwise; under 'global' those layers are pruned on
    their own and the rest share the global budget); the first matching pattern wins, and a layer
    named there is pruned even if smaller than min_weights. The old `criterion` values 'std',
    'sparsity' and 'global' still work (as allocation std, layer and global), with a warning.
    """

    criterion: str = "magnitude"
    allocation: str = "layer"
    sparsity: float = 0.9
    quality: float = 1.0
    layers: dict[str, float] = field(default_factory=dict)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    types: tuple[type[nn.Module], ...] = PRUNABLE_TYPES
    embeddings: bool = False
    min_weights: int = 1000

    def __post_init__(self) -> None:
        if self.criterion in OLD_CRITERIA:
            warnings.warn(f"PruneConfig(criterion={self.criterion!r}) is deprecated: use "
                          f"allocation={OLD_CRITERIA[self.criterion]!r} (criterion is now what "
                          "scores weights: magnitude or taylor)", DeprecationWarning, stacklevel=3)
            self.criterion, self.allocation = "magnitude", OLD_CRITERIA[self.criterion]
        criteria.get(self.criterion)
        rule = allocation.get(self.allocation)()
        check_sparsity(self.sparsity, "sparsity")
        allocation.get("std")().check(self.quality, "quality")
        for pattern, value in self.layers.items():
            rule.check(value, f"layer {pattern!r} {rule.target}")

    @property
    def target(self) -> float:
        """The allocation's default target: sparsity, or quality under 'std'."""
        return getattr(self, allocation.get(self.allocation).target)


@dataclass
class LayerStats:
    """Weight count and surviving (non-zero) weight count of one layer."""

    name: str
    total: int
    nonzero: int

    @property
    def density(self) -> float:
        """Fraction of weights remaining."""
        return self.nonzero / self.total if self.total else 1.0

    @property
    def sparsity(self) -> float:
        """Fraction of weights pruned."""
        return 1.0 - self.density


def _candidates(model: nn.Module, config: PruneConfig) -> dict[str, nn.Module]:
    types = config.types + ((nn.Embedding,) if config.embeddings else ())
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, types) and isinstance(getattr(m, "weight", None), Tensor)
    }


def _override(name: str, config: PruneConfig) -> float | None:
    for pattern, value in config.layers.items():
        if fnmatch(name, pattern):
            return value
    return None


def select_layers(model: nn.Module, config: PruneConfig) -> dict[str, nn.Module]:
    """Modules (by qualified name) whose weight config prunes."""
    candidates = _candidates(model, config)
    names = ", ".join(candidates) or "none"
    for kind, patterns in (("include", config.include), ("exclude", config.exclude),
                           ("layers", tuple(config.layers))):
        for pattern in patterns:
            if not any(fnmatch(name, pattern) for name in candidates):
                raise CompressError(
                    f"{kind} pattern {pattern!r}: matches no prunable layer; prunable layers are: {names}"
                )
    selected = {
        name: m for name, m in candidates.items()
        if any(fnmatch(name, p) for p in config.include)
        and not any(fnmatch(name, p) for p in config.exclude)
        and (m.weight.numel() >= config.min_weights or _override(name, config) is not None)
    }
    if not selected:
        raise CompressError(
            f"model {type(model).__name__}: no prunable layer with >= {config.min_weights} weights "
            f"(candidates: {names}); lower min_weights or name layers in PruneConfig.layers"
        )
    return selected


def sparsity_mask(weight: Tensor, sparsity: float) -> Tensor:
    """0/1 mask pruning exactly round(sparsity * numel) smallest-magnitude entries (ties by index)."""
    return keep_fraction(weight, sparsity)


def std_mask(weight: Tensor, quality: float) -> Tensor:
    """0/1 mask pruning entries with |w| below quality times the layer's weight std (Han et al.)."""
    return keep_above_std(weight, quality)


def global_masks(weights: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """0/1 masks pruning exactly round(sparsity * total) smallest-magnitude weights across all layers."""
    return keep_fraction_across(weights, sparsity)


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether a tensor of shape expands to target (each dim equal or 1, no extra dims)."""
    return len(shape) <= len(target) and all(a in (1, b) for a, b in zip(reversed(shape), reversed(target), strict=False))


def compute_masks(model: nn.Module, config: PruneConfig, context: Context | None = None) -> dict[str, Tensor]:
    """Masks config would give model's current (effective) weights; does not change the model.

    context carries what a data-driven criterion needs (see criteria.Context.from_task).
    """
    layers = select_layers(model, config)
    context = context if context is not None else Context(model=model)
    criterion = criteria.get(config.criterion)()
    saliencies = {name: criterion.saliency(name, m, context) for name, m in layers.items()}
    for name, s in saliencies.items():
        shape = tuple(layers[name].weight.shape)
        if not _broadcasts(tuple(s.shape), shape):
            raise CompressError(f"criterion {config.criterion!r}: saliency of shape {tuple(s.shape)} for layer "
                                f"{name!r} does not broadcast to its weight {shape}; return the weight's shape "
                                "or (out, 1, ...)")
    overrides = {name: value for name in layers if (value := _override(name, config)) is not None}
    masks = allocation.get(config.allocation)().masks(saliencies, overrides, config.target)
    return {name: masks[name].to(m.weight.dtype).expand_as(m.weight).contiguous() for name, m in layers.items()}


def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Install (or update) the Mask parametrization of each named module's weight.

    Under torch.distributed every rank must call this with the same layer names: rank 0's
    masks are broadcast so all ranks prune identically.
    """
    modules = dict(model.named_modules())
    distributed = dist.is_available() and dist.is_initialized()
    for name, mask in masks.items():
        module = modules.get(name)
        if module is None:
            raise CompressError(f"layer {name!r}: not a module of {type(model).__name__}; check the name")
        weight = module.weight
        if mask.shape != weight.shape:
            raise CompressError(f"layer {name!r}: mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
        mask = mask.detach().to(device=weight.device, dtype=weight.dtype).clone()
        if distributed:
            dist.broadcast(mask, src=0)
        existing = find(module, "weight", Mask)
        if existing is None:
            existing = Mask(mask)
            attach(module, "weight", existing)
        else:
            existing.mask.copy_(mask)
        if chain(module, "weight")[0] is existing:
            with torch.no_grad():
                original(module, "weight").mul_(existing.mask)


def prune(model: nn.Module, config: PruneConfig, context: Context | None = None) -> dict[str, Tensor]:
    """Compute masks for model under config (and context), install them, return them by layer name."""
    masks = compute_masks(model, config, context)
    apply_masks(model, masks)
    return {name: find(m, "weight", Mask).mask for name, m in model.named_modules() if name in masks}


def masks_of(model: nn.Module) -> dict[str, Tensor]:
    """Every installed Mask buffer, by module name."""
    return {name: mask.mask for name, m in model.named_modules()
            if (mask := find(m, "weight", Mask)) is not None}


def layer_stats(model: nn.Module, types: tuple[type[nn.Module], ...] = PRUNABLE_TYPES + (nn.Embedding,)) -> list[LayerStats]:
    """Total and non-zero weights of every layer of the given types, masked or not."""
    return [
        LayerStats(name, m.weight.numel(), int(torch.count_nonzero(m.weight.detach())))
        for name, m in model.named_modules()
        if isinstance(m, types) and isinstance(getattr(m, "weight", None), Tensor)
    ]


def overall_density(stats: list[LayerStats]) -> float:
    """Fraction of all counted weights that remain."""
    return sum(s.nonzero for s in stats) / max(sum(s.total for s in stats), 1)


def rescale_dropout(model: nn.Module, before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Scale each dropout rate after a pruned layer by sqrt(density after / density before); return new rates.

    A dropout module belongs to the last pruned layer preceding it in registration order.
    """
    rates: dict[str, float] = {}
    owner: str | None = None
    for name, module in model.named_modules():
        if name in after:
            owner = name
        elif isinstance(module, nn.modules.dropout._DropoutNd) and owner is not None:
            if before.get(owner, 0.0) > 0:
                module.p = module.p * math.sqrt(after[owner] / before[owner])
            rates[name] = module.p
            owner = None
    return rates


def map_targets(config: PruneConfig, fn: Callable[[float], float]) -> PruneConfig:
    """Copy of config with fn applied to the allocation's target (sparsity or quality) and every per-layer one."""
    key = allocation.get(config.allocation).target
    return replace(config, **{key: fn(getattr(config, key))},
                   layers={k: fn(v) for k, v in config.layers.items()})


_MOVED = ("AGPConfig", "IterativeConfig", "agp_hook", "agp_sparsity", "prune_agp", "prune_iterative",
          "prune_one_shot")


def __getattr__(name: str) -> object:
    """The schedules once defined here, now in deepcompress.schedules."""
    if name in _MOVED:
        from deepcompress import schedules
        return getattr(schedules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
