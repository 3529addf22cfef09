"""Pruning criteria: how important each weight (or group of weights) of a layer is.

A criterion returns a layer's *saliency*: a tensor of the weight's shape, or one that broadcasts
to it for structured pruning (``(out, 1)`` scores rows, ``(out, 1, 1, 1)`` scores conv filters).
Importance is ``|saliency|``; allocations keep the most important entries, and the paper's std
rule keeps ``|saliency| >= quality * std(saliency)`` (with magnitude: ``|w| >= quality * std(w)``).

A criterion that needs data reads it from the `Context`: the model, calibration batches and a
loss, with statistics (gradients, and whatever a new criterion needs) computed lazily, once per
context. Adding one is a small class::

    @criteria.register
    class OBD(Criterion):
        '''Optimal Brain Damage: 1/2 h_ii w^2 with the empirical Fisher diagonal for h_ii.'''
        name = "obd"
        needs_data = True
        def saliency(self, name, module, context):
            return 0.5 * context.statistic("fisher", squared_gradients)[name] * module.weight.detach() ** 2
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from deepcompress.errors import CompressError
from deepcompress.parametrize import chain, original
from deepcompress.registry import Registry
from deepcompress.tasks import Task

S = TypeVar("S")
Batch = tuple[Tensor, Tensor]


@dataclass
class Context:
    """What a criterion may use beyond a layer's weight: model, calibration batches, loss, statistics."""

    model: nn.Module | None = None
    batches: Iterable[Batch] | None = None
    loss: Callable[[Tensor, Tensor], Tensor] | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_task(cls, model: nn.Module, task: Task, n_batches: int = 4, batch_size: int = 64) -> Context:
        """Context over the first n_batches training batches of task (in order) and its loss."""
        return cls(model=model, batches=_Head(task, n_batches, batch_size), loss=task.loss)

    def statistic(self, key: str, compute: Callable[[Context], S]) -> S:
        """compute(self), cached under key for the life of this context."""
        if key not in self.cache:
            self.cache[key] = compute(self)
        return self.cache[key]

    def require_data(self, what: str) -> tuple[nn.Module, list[Batch], Callable[[Tensor, Tensor], Tensor]]:
        """The model, batches and loss, or a CompressError naming `what` needed them."""
        if self.model is None or self.batches is None or self.loss is None:
            raise CompressError(f"{what}: needs data (a model, calibration batches and a loss); "
                                "give a task, or use criterion 'magnitude'")
        batches = list(self.batches)
        if not batches:
            raise CompressError(f"{what}: the calibration batches are empty; give a task with training data")
        return self.model, batches, self.loss


class _Head:
    """The first n training batches of a task, read only when iterated (magnitude never does)."""

    def __init__(self, task: Task, n: int, batch_size: int) -> None:
        self.task, self.n, self.batch_size = task, n, batch_size

    def __iter__(self) -> Iterator[Batch]:
        return itertools.islice(self.task.batches("train", self.batch_size), self.n)


def weight_leaf(module: nn.Module) -> Tensor:
    """The tensor autograd reaches for module.weight: the weight, or the original under a mask."""
    return original(module, "weight") if chain(module, "weight") else module.weight


def gradients(context: Context) -> dict[str, Tensor]:
    """Mean loss gradient over the context's batches for every weight of the model, by module name.

    Taken in eval mode, without touching .grad; under a mask, the gradient of the unmasked
    weight (zero where masked). The model's train/eval mode is restored.
    """
    model, batches, loss_fn = context.require_data("gradients")
    modules = {name: m for name, m in model.named_modules()
               if isinstance(getattr(m, "weight", None), Tensor) and weight_leaf(m).requires_grad}
    leaves = [weight_leaf(m) for m in modules.values()]
    sums = [torch.zeros_like(leaf) for leaf in leaves]
    device = leaves[0].device if leaves else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for x, y in batches:
                loss = loss_fn(model(x.to(device)), y.to(device))
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                for total, grad in zip(sums, grads, strict=True):
                    if grad is not None:
                        total.add_(grad.detach())
    finally:
        model.train(was_training)
    return {name: total / len(batches) for name, total in zip(modules, sums, strict=True)}


class Criterion:
    """Scores a layer's weights (or groups of them); subclasses set name and implement saliency."""

    name: ClassVar[str]
    needs_data: ClassVar[bool] = False

    def saliency(self, name: str, module: nn.Module, context: Context) -> Tensor:
        """Signed saliency of module.weight (its shape, or one broadcasting to it); importance is |saliency|."""
        raise NotImplementedError


registry: Registry[type[Criterion]] = Registry("criterion")
register = registry.register
get = registry.get
names = registry.names


@register
class Magnitude(Criterion):
    """|w|: the paper's criterion; needs no data."""

    name = "magnitude"

    def saliency(self, name: str, module: nn.Module, context: Context) -> Tensor:
        """The weight itself."""
        return module.weight.detach()


@register
class Taylor(Criterion):
    """First-order Taylor expansion of the loss (Molchanov et al.): |g * w|, g averaged over the batches."""

    name = "taylor"
    needs_data = True

    def saliency(self, name: str, module: nn.Module, context: Context) -> Tensor:
        """Gradient times weight."""
        return context.statistic("gradients", gradients)[name] * module.weight.detach()
