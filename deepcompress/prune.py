"""Stage 1: magnitude pruning with masks held as parametrizations, and prune/retrain schedules.

A pruned layer's weight becomes ``original * mask``: the mask is a buffer of the `Mask`
parametrization, so it follows deepcopy, pickling, state_dict and ``.to()``, and the effective
weight of a pruned connection is exactly zero whatever an optimizer does to ``original``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from fnmatch import fnmatch

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deepcompress.errors import CompressError
from deepcompress.parametrize import attach, chain, find, original
from deepcompress.tasks import Task
from deepcompress.train import TrainConfig, fit

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
CRITERIA = ("std", "sparsity", "global")


class Mask(nn.Module):
    """Parametrization multiplying a tensor by a fixed 0/1 mask buffer."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        """Return x with the pruned entries zeroed."""
        return x * self.mask


def _check_sparsity(value: float, what: str) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise CompressError(f"{what} {value!r}: sparsity must be in [0, 1); e.g. 0.9 prunes 90% of weights")


@dataclass
class PruneConfig:
    """What to prune and how much.

    criterion 'std': prune |w| < quality * std(w) per layer (Han et al.); 'sparsity': prune exactly
    the fraction `sparsity` of each layer; 'global': prune the fraction `sparsity` of all selected
    weights together by magnitude. `layers` maps fnmatch patterns to per-layer values (a quality
    for 'std', a sparsity otherwise; under 'global' those layers are pruned on their own and the
    rest share the global budget); the first matching pattern wins, and a layer named there is
    pruned even if smaller than min_weights.
    """

    criterion: str = "sparsity"
    sparsity: float = 0.9
    quality: float = 1.0
    layers: dict[str, float] = field(default_factory=dict)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    types: tuple[type[nn.Module], ...] = PRUNABLE_TYPES
    embeddings: bool = False
    min_weights: int = 1000

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise CompressError(f"criterion {self.criterion!r}: unknown; use one of {', '.join(CRITERIA)}")
        _check_sparsity(self.sparsity, "sparsity")
        if not self.quality >= 0:
            raise CompressError(f"quality {self.quality!r}: must be >= 0; e.g. 1.0 prunes |w| < 1 std")
        for pattern, value in self.layers.items():
            if self.criterion == "std":
                if not value >= 0:
                    raise CompressError(f"layer {pattern!r} quality {value!r}: must be >= 0")
            else:
                _check_sparsity(value, f"layer {pattern!r} sparsity")


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
    _check_sparsity(sparsity, "sparsity")
    flat = weight.detach().abs().flatten()
    k = math.floor(sparsity * flat.numel() + 0.5)
    mask = torch.ones_like(flat)
    mask[torch.argsort(flat, stable=True)[:k]] = 0
    return mask.view_as(weight)


def std_mask(weight: Tensor, quality: float) -> Tensor:
    """0/1 mask pruning entries with |w| below quality times the layer's weight std (Han et al.)."""
    w = weight.detach()
    return (w.abs() >= quality * w.float().std()).to(w.dtype)


def global_masks(weights: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """0/1 masks pruning exactly round(sparsity * total) smallest-magnitude weights across all layers."""
    _check_sparsity(sparsity, "sparsity")
    flat = torch.cat([w.detach().abs().flatten().float() for w in weights.values()])
    k = math.floor(sparsity * flat.numel() + 0.5)
    keep = torch.ones_like(flat)
    keep[torch.argsort(flat, stable=True)[:k]] = 0
    parts = keep.split([w.numel() for w in weights.values()])
    return {name: p.view_as(w).to(w.dtype) for (name, w), p in zip(weights.items(), parts, strict=True)}


def compute_masks(model: nn.Module, config: PruneConfig) -> dict[str, Tensor]:
    """Masks config would give model's current (effective) weights; does not change the model."""
    layers = select_layers(model, config)
    weights = {name: m.weight.detach() for name, m in layers.items()}
    overrides = {name: _override(name, config) for name in layers}
    if config.criterion == "std":
        return {
            name: std_mask(w, config.quality if overrides[name] is None else overrides[name])
            for name, w in weights.items()
        }
    if config.criterion == "sparsity":
        return {
            name: sparsity_mask(w, config.sparsity if overrides[name] is None else overrides[name])
            for name, w in weights.items()
        }
    masks = {name: sparsity_mask(w, overrides[name]) for name, w in weights.items()
             if overrides[name] is not None}
    rest = {name: w for name, w in weights.items() if overrides[name] is None}
    if rest:
        masks.update(global_masks(rest, config.sparsity))
    return {name: masks[name] for name in weights}


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


def prune(model: nn.Module, config: PruneConfig) -> dict[str, Tensor]:
    """Compute masks for model under config, install them, and return them by layer name."""
    masks = compute_masks(model, config)
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
    """Copy of config with fn applied to the overall and every per-layer sparsity (or quality)."""
    if config.criterion == "std":
        return replace(config, quality=fn(config.quality),
                       layers={k: fn(v) for k, v in config.layers.items()})
    return replace(config, sparsity=fn(config.sparsity),
                   layers={k: fn(v) for k, v in config.layers.items()})


@dataclass
class IterativeConfig:
    """Prune-retrain rounds; round r of R prunes to density final_density ** (r / R).

    With the 'std' criterion round r uses quality * r / R instead.
    """

    rounds: int = 3
    rescale_dropout: bool = False

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise CompressError(f"rounds {self.rounds}: need at least 1 prune-retrain round")


def _round_target(config: PruneConfig, fraction: float) -> PruneConfig:
    if config.criterion == "std":
        return map_targets(config, lambda q: q * fraction)
    return map_targets(config, lambda s: 1.0 - (1.0 - s) ** fraction)


def _densities(model: nn.Module) -> dict[str, float]:
    return {s.name: s.density for s in layer_stats(model)}


def prune_iterative(
    model: nn.Module, task: Task, config: PruneConfig, schedule: IterativeConfig, train: TrainConfig
) -> list[dict]:
    """Alternate pruning with growing sparsity and retraining (Han et al.); return the history."""
    history: list[dict] = []
    for r in range(1, schedule.rounds + 1):
        before = _densities(model)
        masks = prune(model, _round_target(config, r / schedule.rounds))
        if schedule.rescale_dropout:
            after = _densities(model)
            rescale_dropout(model, before, {n: after[n] for n in masks})
        rows = fit(model, task, replace(train, seed=train.seed + r))
        history.extend({**row, "round": r} for row in rows)
    return history


def prune_one_shot(model: nn.Module, task: Task, config: PruneConfig, train: TrainConfig) -> list[dict]:
    """Prune once to the final sparsity, then retrain; return the history."""
    return prune_iterative(model, task, config, IterativeConfig(rounds=1), train)


@dataclass
class AGPConfig:
    """Zhu & Gupta's cubic schedule: from initial_sparsity at epoch start to the target over steps * every epochs."""

    initial_sparsity: float = 0.0
    start_epoch: int = 0
    steps: int = 10
    every: int = 1

    def __post_init__(self) -> None:
        _check_sparsity(self.initial_sparsity, "initial_sparsity")
        if self.start_epoch < 0 or self.steps < 1 or self.every < 1:
            raise CompressError(
                f"AGPConfig(start_epoch={self.start_epoch}, steps={self.steps}, every={self.every}): "
                "need start_epoch >= 0, steps >= 1, every >= 1"
            )

    @property
    def end_epoch(self) -> int:
        """Epoch count after which the final sparsity is reached."""
        return self.start_epoch + self.steps * self.every


def agp_sparsity(t: float, final: float, agp: AGPConfig) -> float:
    """s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3, clamped to [t0, t0 + n * dt]."""
    initial = min(agp.initial_sparsity, final)
    progress = min(max((t - agp.start_epoch) / (agp.steps * agp.every), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


def agp_hook(model: nn.Module, config: PruneConfig, agp: AGPConfig) -> Callable[[int], bool]:
    """on_epoch_end callback for fit that prunes model along the AGP curve; True when it pruned."""
    if config.criterion == "std":
        raise CompressError("criterion 'std': AGP needs target sparsities; use criterion 'sparsity' or 'global'")

    def on_epoch_end(epoch: int) -> bool:
        t = epoch + 1
        if t < agp.start_epoch or t > agp.end_epoch or (t - agp.start_epoch) % agp.every:
            return False
        prune(model, map_targets(config, lambda s: agp_sparsity(t, s, agp)))
        return True

    return on_epoch_end


def prune_agp(
    model: nn.Module, task: Task, config: PruneConfig, agp: AGPConfig, train: TrainConfig
) -> list[dict]:
    """Train while raising sparsity along the cubic AGP curve, then fine-tune; return the history."""
    if train.epochs < agp.end_epoch:
        raise CompressError(
            f"AGP: schedule ends at epoch {agp.end_epoch} but training has {train.epochs} epochs; "
            "raise epochs or lower steps/every"
        )
    hook = agp_hook(model, config, agp)
    if agp.start_epoch == 0:
        prune(model, map_targets(config, lambda s: agp_sparsity(0, s, agp)))
    return fit(model, task, train, on_epoch_end=hook)
