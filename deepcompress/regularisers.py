"""Regularisers: penalties added to the training loss that drive structures to zero before pruning.

A regulariser is a callable ``penalty(model) -> scalar Tensor``; give one to training as
``TrainConfig(regulariser=regularisers.make("slimming", strength=1e-4))`` and every step of
`deepcompress.train.fit` (and so every schedule) minimises ``loss + penalty(model)``. Then prune
the structures it shrank: 'slimming' with criterion 'bn_scale', 'group_lasso' with 'l1_filter'
(or any structured criterion).

The classes are plain (not dataclasses), so ``dataclasses.asdict`` of a TrainConfig copies a
regulariser instead of turning it into a dict.
"""
from __future__ import annotations

from fnmatch import fnmatch
from typing import ClassVar

import torch
from torch import Tensor, nn

from deepcompress.errors import CompressError
from deepcompress.registry import Registry

GROUPS = ("filters", "channels", "both")


class Regulariser:
    """A penalty on a model's weights, added to the training loss; subclasses set name and implement __call__."""

    name: ClassVar[str]

    def __init__(self, strength: float) -> None:
        if not (isinstance(strength, (int, float)) and strength >= 0):
            raise CompressError(f"regulariser {self.name!r}: strength {strength!r} must be a number >= 0, e.g. 1e-4")
        self.strength = float(strength)

    def __call__(self, model: nn.Module) -> Tensor:
        """strength times the penalty of model, a scalar with a gradient."""
        raise NotImplementedError

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({settings})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    __hash__ = None  # type: ignore[assignment]


registry: Registry[type[Regulariser]] = Registry("regulariser")
register = registry.register
get = registry.get
names = registry.names
make = registry.make  # the instance registered as name, from the settings it takes




def _zero(model: nn.Module) -> Tensor:
    p = next(model.parameters(), None)
    return torch.zeros((), device=p.device if p is not None else None)


@register
class Slimming(Regulariser):
    """Network slimming (Liu et al. 2017): strength * sum |gamma| over every affine BatchNorm; needs BatchNorms after the layers, costs one pass over their scales per step."""

    name = "slimming"

    def __init__(self, strength: float = 1e-4) -> None:
        super().__init__(strength)

    def __call__(self, model: nn.Module) -> Tensor:
        """L1 norm of all BatchNorm scales, times strength."""
        scales = [m.weight for m in model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
        if not scales:
            raise CompressError(f"regulariser 'slimming': {type(model).__name__} has no affine BatchNorm; "
                                "add BatchNorm after the layers or use regulariser 'group_lasso'")
        return self.strength * sum(w.abs().sum() for w in scales)


@register
class GroupLasso(Regulariser):
    """Structured sparsity learning (Wen et al. 2016): strength * sum of L2 norms of each layer's output filters (and/or input channels); needs Linear/conv layers, costs one pass over their weights per step."""

    name = "group_lasso"

    def __init__(self, strength: float = 1e-4, groups: str = "filters", include: tuple[str, ...] = ("*",),
                 exclude: tuple[str, ...] = ()) -> None:
        super().__init__(strength)
        if groups not in GROUPS:
            raise CompressError(f"regulariser 'group_lasso': groups {groups!r} unknown; use one of {', '.join(GROUPS)}")
        self.groups, self.include, self.exclude = groups, tuple(include), tuple(exclude)

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The Linear and conv layers the penalty covers (fnmatch include/exclude on module names)."""
        return {n: m for n, m in model.named_modules()
                if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
                and any(fnmatch(n, p) for p in self.include) and not any(fnmatch(n, p) for p in self.exclude)}

    def __call__(self, model: nn.Module) -> Tensor:
        """Sum over the layers of the L2 norms of their groups, times strength."""
        layers = self.layers(model)
        if not layers:
            raise CompressError(f"regulariser 'group_lasso': no Linear/conv layer of {type(model).__name__} "
                                f"matches include {self.include} / exclude {self.exclude}; fix the patterns")
        total = _zero(model)
        for module in layers.values():
            w = module.weight  # effective (masked) weight: pruned entries add nothing
            out = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
            if self.groups in ("filters", "both"):
                total = total + w.movedim(out, 0).flatten(1).norm(dim=1).sum()
            if self.groups in ("channels", "both"):
                total = total + w.movedim(1 - out, 0).flatten(1).norm(dim=1).sum()
        return self.strength * total
