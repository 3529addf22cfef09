"""The one owner of parametrizations (pruning masks, shared-weight codebooks): attach, find, remove, bake.

torch.nn.utils.parametrize swaps a parametrized module's class for a generated
``Parametrized<Class>`` and adds or deletes a property on that class for each tensor it
registers or removes. copy.deepcopy shares that class object between original and copy, so
every change made here first gives the module a class of its own (`isolate_class`).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from deepcompress.errors import CompressError

P = TypeVar("P", bound=nn.Module)


def isolate_class(module: nn.Module) -> None:
    """Give a parametrized module a private copy of its generated class (no-op on a plain module)."""
    if parametrize.is_parametrized(module):
        cls = type(module)
        namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def attach(module: nn.Module, name: str, parametrization: nn.Module, *, unsafe: bool = False) -> None:
    """Parametrize module.<name> by parametrization, after any parametrizations it already has."""
    isolate_class(module)
    parametrize.register_parametrization(module, name, parametrization, unsafe=unsafe)


def chain(module: nn.Module, name: str) -> tuple[nn.Module, ...]:
    """The parametrizations of module.<name> in the order they apply (empty if it is plain)."""
    if not parametrize.is_parametrized(module, name):
        return ()
    return tuple(module.parametrizations[name])


def find(module: nn.Module, name: str, kind: type[P]) -> P | None:
    """The first parametrization of type kind on module.<name>, if any."""
    return next((p for p in chain(module, name) if isinstance(p, kind)), None)


def original(module: nn.Module, name: str) -> Tensor:
    """The tensor module.<name>'s parametrizations are applied to (a codebook, an unmasked weight)."""
    return module.parametrizations[name].original


def remove(module: nn.Module, name: str) -> Tensor:
    """Replace every parametrization of module.<name> by a plain tensor holding its current value.

    The tensor keeps the identity of the original parameter (optimizers stay valid), drops its
    gradient (a codebook's would be wrongly shaped) and holds +0.0, never -0.0, at its zeros (a
    masked negative weight times 0 is -0.0, which a bit-exact encoder would store as a value of
    its own).
    """
    isolate_class(module)
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    tensor = getattr(module, name)
    tensor.grad = None
    if tensor.is_floating_point():
        with torch.no_grad():
            tensor.add_(0.0)  # IEEE: -0.0 + 0.0 == +0.0; every other value unchanged
    return tensor


def bake(model: nn.Module) -> nn.Module:
    """Remove every parametrization of model in place (see `remove`), leaving plain tensors; return model."""
    # the owners only: a list of every module would keep each removed parametrization (a
    # shared layer's index, the size of its weight) alive until the last one is removed
    owners = [m for m in model.modules() if parametrize.is_parametrized(m)]
    for module in owners:
        for name in list(module.parametrizations):
            remove(module, name)
    return model


def baked_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """model's state_dict as bake would leave it, computed on a copy: model is not changed."""
    if not any(parametrize.is_parametrized(m) for m in model.modules()):
        return model.state_dict()
    return bake(copy.deepcopy(model)).state_dict()


def is_parametrization_key(key: str) -> bool:
    """Whether a state_dict key belongs to a parametrization (an unbaked model)."""
    return key.startswith("parametrizations.") or ".parametrizations." in key


def refuse_unbaked(tensors: Mapping[str, Tensor] | Iterable, where: str
                   ) -> Mapping[str, Tensor] | Iterator:
    """tensors unchanged, or (lazily for an iterable) CompressError at its first parametrization key."""
    if isinstance(tensors, Mapping):
        key = next((k for k in tensors if isinstance(k, str) and is_parametrization_key(k)), None)
        if key is not None:
            raise _unbaked(key, where)
        return tensors
    return _refusing(tensors, where)


def _refusing(items: Iterable, where: str) -> Iterator:
    for item in items:
        if isinstance(item, (tuple, list)) and item and isinstance(item[0], str) and is_parametrization_key(item[0]):
            raise _unbaked(item[0], where)
        yield item


def _unbaked(key: str, where: str) -> CompressError:
    return CompressError(f"{where}: tensor {key!r} belongs to a parametrization (an unbaked model); "
                         "pass the module itself, or call deepcompress.parametrize.bake(model) first")
