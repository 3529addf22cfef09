"""Pruning schedules: when to prune while retraining ('oneshot', 'iterative', 'agp', 'lottery', 'dns').

A schedule composes with any criterion and allocation: each pruning step calls `prune` with a
fresh `criteria.Context` over the task (so data-driven criteria see the current weights), and
moves the allocation's target along the schedule with `map_targets` / `Allocation.ramp`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deepcompress import allocation
from deepcompress.allocation import check_sparsity
from deepcompress.criteria import Context
from deepcompress.errors import CompressError
from deepcompress.parametrize import attach, chain, find, original
from deepcompress.prune import (
    Mask,
    PruneConfig,
    SplicingMask,
    compute_masks,
    layer_stats,
    map_targets,
    prune,
    rescale_dropout,
)
from deepcompress.registry import Registry
from deepcompress.tasks import Task
from deepcompress.train import TrainConfig, fit


def context_for(model: nn.Module, task: Task, train: TrainConfig) -> Context:
    """The context each pruning step of a schedule gives the criterion: a few training batches."""
    return Context.from_task(model, task, batch_size=train.batch_size)


class Schedule:
    """When to prune during retraining; subclasses set name and implement run."""

    name: ClassVar[str]

    def accepts(self, config: PruneConfig) -> bool:
        """Whether this schedule can drive config's allocation."""
        return True

    def run(self, model: nn.Module, task: Task, config: PruneConfig, train: TrainConfig) -> list[dict]:
        """Prune model in place as config says while training on task; return the training history."""
        raise NotImplementedError


registry: Registry[type[Schedule]] = Registry("schedule")
register = registry.register
get = registry.get
names = registry.names
make = registry.make  # the instance registered as name, from the settings it takes




def _densities(model: nn.Module) -> dict[str, float]:
    return {s.name: s.density for s in layer_stats(model)}


@register
@dataclass
class Iterative(Schedule):
    """Prune-retrain rounds (Han et al.); round r of R moves the target r/R of the way.

    Density goes geometrically, final_density ** (r / R); under 'std' quality goes linearly.
    """

    rounds: int = 3
    rescale_dropout: bool = False
    name: ClassVar[str] = "iterative"

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise CompressError(f"rounds {self.rounds}: need at least 1 prune-retrain round")

    def run(self, model: nn.Module, task: Task, config: PruneConfig, train: TrainConfig) -> list[dict]:
        """Alternate pruning with growing sparsity and retraining; return the history."""
        rule = allocation.get(config.allocation)()
        history: list[dict] = []
        for r in range(1, self.rounds + 1):
            before = _densities(model)
            target = map_targets(config, lambda v, f=r / self.rounds: rule.ramp(v, f))
            masks = prune(model, target, context_for(model, task, train))
            if self.rescale_dropout:
                after = _densities(model)
                rescale_dropout(model, before, {n: after[n] for n in masks})
            rows = fit(model, task, replace(train, seed=train.seed + r))
            history.extend({**row, "round": r} for row in rows)
        return history


@register
@dataclass
class OneShot(Schedule):
    """Prune once to the final target, then retrain."""

    rescale_dropout: bool = False
    name: ClassVar[str] = "oneshot"

    def run(self, model: nn.Module, task: Task, config: PruneConfig, train: TrainConfig) -> list[dict]:
        """One round of the iterative schedule."""
        return Iterative(1, self.rescale_dropout).run(model, task, config, train)


def agp_sparsity(t: float, final: float, agp: AGP) -> float:
    """s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3, clamped to [t0, t0 + n * dt]."""
    initial = min(agp.initial_sparsity, final)
    progress = min(max((t - agp.start_epoch) / (agp.steps * agp.every), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


@register
@dataclass
class AGP(Schedule):
    """Zhu & Gupta's cubic schedule: from initial_sparsity at epoch start to the target over steps * every epochs."""

    initial_sparsity: float = 0.0
    start_epoch: int = 0
    steps: int = 10
    every: int = 1
    name: ClassVar[str] = "agp"

    def __post_init__(self) -> None:
        check_sparsity(self.initial_sparsity, "initial_sparsity")
        if self.start_epoch < 0 or self.steps < 1 or self.every < 1:
            raise CompressError(
                f"AGP(start_epoch={self.start_epoch}, steps={self.steps}, every={self.every}): "
                "need start_epoch >= 0, steps >= 1, every >= 1"
            )

    @property
    def end_epoch(self) -> int:
        """Epoch count after which the final sparsity is reached."""
        return self.start_epoch + self.steps * self.every

    def accepts(self, config: PruneConfig) -> bool:
        """Only allocations whose target is a sparsity (not 'std', whose target is a quality)."""
        return allocation.get(config.allocation).target == "sparsity"

    def run(self, model: nn.Module, task: Task, config: PruneConfig, train: TrainConfig) -> list[dict]:
        """Train while raising sparsity along the cubic curve, then fine-tune; return the history."""
        if train.epochs < self.end_epoch:
            raise CompressError(
                f"AGP: schedule ends at epoch {self.end_epoch} but training has {train.epochs} epochs; "
                "raise epochs or lower steps/every"
            )
        hook = agp_hook(model, config, self, task, train)
        if self.start_epoch == 0:
            prune(model, map_targets(config, lambda s: agp_sparsity(0, s, self)), context_for(model, task, train))
        return fit(model, task, train, on_epoch_end=hook)


def agp_hook(model: nn.Module, config: PruneConfig, agp: AGP, task: Task | None = None,
             train: TrainConfig | None = None) -> Callable[[int], bool]:
    """on_epoch_end callback for fit that prunes model along the AGP curve; True when it pruned.

    With a task, each step's criterion context holds its training batches (for taylor).
    """
    if not agp.accepts(config):
        raise CompressError(f"allocation {config.allocation!r}: AGP needs target sparsities; "
                            "use allocation 'layer' or 'global'")

    def on_epoch_end(epoch: int) -> bool:
        t = epoch + 1
        if t < agp.start_epoch or t > agp.end_epoch or (t - agp.start_epoch) % agp.every:
            return False
        context = context_for(model, task, train or TrainConfig()) if task is not None else None
        prune(model, map_targets(config, lambda s: agp_sparsity(t, s, agp)), context)
        return True

    return on_epoch_end


def snapshot(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(parameter, copy of its value) for every parameter; a mask installed later keeps the parameter (as its original)."""
    return [(p, p.detach().clone()) for p in model.parameters()]


def rewind(model: nn.Module, saved: list[tuple[Tensor, Tensor]]) -> None:
    """Put every saved parameter back to its saved value, then zero what the installed masks prune."""
    with torch.no_grad():
        for param, value in saved:
            param.copy_(value)
        for module in model.modules():
            mask = find(module, "weight", Mask)
            if mask is not None and chain(module, "weight")[0] is mask:
                original(module, "weight").mul_(mask.mask)


@register
@dataclass
class Lottery(Schedule):
    """Lottery ticket (Frankle & Carbin 2019): train, prune, rewind survivors to their rewind_epoch values, rounds times, then retrain; costs rounds + 1 trainings.

    rewind_epoch 0 keeps the weights as given: a random initialisation gives the original
    lottery ticket, a pretrained model is rewound to its pretrained weights. rewind_epoch k > 0
    rewinds to the weights after k epochs of the first training (late rewinding, Frankle et al.
    2020). Round r prunes r/R of the way to the target as 'iterative' does. All parameters are
    rewound (biases and BatchNorm affine too); buffers such as BatchNorm running statistics are
    not. final_epochs (default: train.epochs) is the last training's length.
    """

    rounds: int = 1
    rewind_epoch: int = 0
    final_epochs: int | None = None
    name: ClassVar[str] = "lottery"

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.rewind_epoch < 0 or (self.final_epochs is not None and self.final_epochs < 0):
            raise CompressError(f"Lottery(rounds={self.rounds}, rewind_epoch={self.rewind_epoch}, "
                                f"final_epochs={self.final_epochs}): need rounds >= 1, rewind_epoch >= 0 "
                                "and final_epochs >= 0")

    def run(self, model: nn.Module, task: Task, config: PruneConfig, train: TrainConfig) -> list[dict]:
        """Train, prune, rewind (rounds times), retrain; return the history."""
        if self.rewind_epoch > train.epochs:
            raise CompressError(f"lottery: rewind_epoch {self.rewind_epoch} is past the {train.epochs} "
                                "training epochs; lower rewind_epoch or raise epochs")
        rule = allocation.get(config.allocation)()
        saved = snapshot(model) if self.rewind_epoch == 0 else None
        history: list[dict] = []

        def keep_early(epoch: int) -> None:
            nonlocal saved
            if saved is None and epoch + 1 == self.rewind_epoch:
                saved = snapshot(model)

        for r in range(1, self.rounds + 1):
            rows = fit(model, task, replace(train, seed=train.seed + r), on_epoch_end=keep_early)
            history.extend({**row, "round": r} for row in rows)
            prune(model, map_targets(config, lambda v, f=r / self.rounds: rule.ramp(v, f)),
                  context_for(model, task, train))
            if saved is None:  # unreachable: rewind_epoch <= epochs, so round 1 took it
                raise CompressError(f"lottery: no snapshot at epoch {self.rewind_epoch}; raise epochs")
            rewind(model, saved)
        final = replace(train, seed=train.seed + self.rounds + 1,
                        epochs=train.epochs if self.final_epochs is None else self.final_epochs)
        rows = fit(model, task, final)
        history.extend({**row, "round": self.rounds + 1} for row in rows)
        return history


def install_splicing(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Install masks as SplicingMask parametrizations (a plain Mask already first on a weight is replaced; rank 0's masks under torch.distributed)."""
    modules = dict(model.named_modules())
    distributed = dist.is_available() and dist.is_initialized()
    for name, mask in masks.items():
        module = modules[name]
        mask = mask.detach().to(device=module.weight.device, dtype=module.weight.dtype).clone()
        if distributed:
            dist.broadcast(mask, src=0)
        existing = find(module, "weight", Mask)
        if existing is None:
            attach(module, "weight", SplicingMask(mask))
        elif chain(module, "weight")[0] is not existing:
            raise CompressError(f"dns: layer {name!r} has a parametrization before its mask; "
                                "run dns before weight sharing")
        elif isinstance(existing, SplicingMask):
            existing.mask.copy_(mask)
        else:
            module.parametrizations.weight[0] = SplicingMask(mask)


def splice(model: nn.Module, config: PruneConfig, context: Context | None = None) -> dict[str, Tensor]:
    """Recompute the SplicingMask masks from the dense shadow weights (masks lifted while the criterion scores); return them."""
    spliced = {name: m for name, m in model.named_modules() if isinstance(find(m, "weight", Mask), SplicingMask)}
    saved = {name: find(m, "weight", Mask).mask.clone() for name, m in spliced.items()}
    try:
        for m in spliced.values():
            find(m, "weight", Mask).mask.fill_(1)
        masks = compute_masks(model, config, context)
    except BaseException:
        for name, m in spliced.items():
            find(m, "weight", Mask).mask.copy_(saved[name])
        raise
    for name in set(spliced) - set(masks):
        find(spliced[name], "weight", Mask).mask.copy_(saved[name])
    install_splicing(model, masks)
    return masks


def settle(model: nn.Module) -> None:
    """Turn every SplicingMask into a plain Mask and zero the shadow weights it prunes (the model then looks pruned as by any schedule)."""
    with torch.no_grad():
        for module in model.modules():
            mask = find(module, "weight", Mask)
            if isinstance(mask, SplicingMask) and chain(module, "weight")[0] is mask:
                module.parametrizations.weight[0] = Mask(mask.mask.clone())
                original(module, "weight").mul_(mask.mask)


@register
@dataclass
class DNS(Schedule):
    """Dynamic network surgery (Guo et al. 2016): train under masks recomputed every `every` epochs from the dense shadow weights, so pruned weights can return; costs one training.

    The masks are `prune.SplicingMask`s: the forward uses w * mask, the gradient reaches w
    everywhere (straight-through, as Guo et al. update W with dL/d(W * T)), so pruned weights
    keep learning and come back when they outgrow survivors. Masks follow the allocation's exact
    target from the start (no hysteresis band); they are recomputed after every `every` epochs
    except the last, and at the end become plain Masks with the pruned shadow weights zeroed.
    """

    every: int = 1
    name: ClassVar[str] = "dns"

    def __post_init__(self) -> None:
        if self.every < 1:
            raise CompressError(f"dns: every {self.every}: need at least 1 epoch between mask updates")

    def run(self, model: nn.Module, task: Task, config: PruneConfig, train: TrainConfig) -> list[dict]:
        """Prune, then train while splicing; return the history."""
        install_splicing(model, compute_masks(model, config, context_for(model, task, train)))

        def on_epoch_end(epoch: int) -> bool:
            t = epoch + 1
            if t % self.every or t >= train.epochs:
                return False
            splice(model, config, context_for(model, task, train))
            return True

        try:
            return fit(model, task, train, on_epoch_end=on_epoch_end)
        finally:
            settle(model)


IterativeConfig = Iterative  # the names of these schedules before the registry
AGPConfig = AGP


def prune_iterative(model: nn.Module, task: Task, config: PruneConfig, schedule: Iterative,
                    train: TrainConfig) -> list[dict]:
    """Alternate pruning with growing sparsity and retraining (Han et al.); return the history."""
    return schedule.run(model, task, config, train)


def prune_one_shot(model: nn.Module, task: Task, config: PruneConfig, train: TrainConfig) -> list[dict]:
    """Prune once to the final sparsity, then retrain; return the history."""
    return OneShot().run(model, task, config, train)


def prune_agp(model: nn.Module, task: Task, config: PruneConfig, agp: AGP,
              train: TrainConfig) -> list[dict]:
    """Train while raising sparsity along the cubic AGP curve, then fine-tune; return the history."""
    return agp.run(model, task, config, train)
