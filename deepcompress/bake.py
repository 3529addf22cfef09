"""Remove every parametrization from a model, keeping the parametrized values as plain tensors."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


def isolate_class(module: nn.Module) -> None:
    """Give a parametrized module a private copy of its generated class.

    copy.deepcopy shares torch's generated Parametrized* class between original and copy, and
    registering or removing a parametrization edits that class, which would break the other one.
    """
    cls = type(module)
    if parametrize.is_parametrized(module):
        namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def bake(model: nn.Module) -> nn.Module:
    """Replace each parametrized tensor of model (in place) by its current value; return model.

    Baked floating tensors hold +0.0, never -0.0, at their zeros (a masked negative weight times
    0 is -0.0, which a bit-exact encoder would have to store as a value of its own).
    """
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            isolate_class(module)
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                tensor = getattr(module, name)
                tensor.grad = None  # a codebook's gradient would otherwise stay, wrongly shaped
                if tensor.is_floating_point():
                    with torch.no_grad():
                        tensor.add_(0.0)  # IEEE: -0.0 + 0.0 == +0.0; every other value unchanged
    return model
