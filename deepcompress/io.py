"""Save a model to a .dcz and load it back: the public entry points over deepcompress.formats."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from . import __version__
from .errors import CompressError
from .formats import DczFile, dcz


def save(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor] | Iterable,
         path: str | os.PathLike, metadata: Mapping | None = None) -> int:
    """Write a model, a state_dict or an iterable of (name, tensor) to a .dcz; returns its bytes.

    Weight sharing is detected, not declared: a floating tensor with at most 256 distinct nonzero
    values is stored as codebook + indices, anything else in its own dtype, zstd-compressed.
    """
    tensors = (model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module)
               else model_or_state_dict)
    meta = {"producer": f"deepcompress {__version__}", **dict(metadata or {})}
    try:
        return dcz.write(path, tensors, meta)
    except (TypeError, ValueError) as exc:
        raise CompressError(f"{path}: cannot save: {exc}") from exc


def load_state_dict(path: str | os.PathLike, names: Iterable[str] | None = None
                    ) -> dict[str, torch.Tensor]:
    """The tensors of a .dcz (all, or only `names`), bit-identical to what was saved."""
    return dcz.read(path, names)


def open_lazy(path: str | os.PathLike) -> DczFile:
    """A read-only mapping over a .dcz that decodes each tensor when first asked for."""
    return DczFile(path)


def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a .dcz into `model` (strict); one error lists missing, unexpected and mismatched names."""
    state = load_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
                        for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        parts = [f"{label}: {', '.join(items)}" for label, items in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
                 if items]
        raise CompressError(f"{path}: does not fit {type(model).__name__}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)
    return model
