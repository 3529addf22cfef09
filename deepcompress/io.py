"""Save a model to a .dcz and load it back: the public entry points over deepcompress.formats."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from . import __version__
from .errors import CompressError
from .formats import DczError, DczFile, dcz
from .formats import program as _program
from .formats.codec import Shared
from .parametrize import baked_state_dict, refuse_unbaked
from .quantize import declared_shares


def save(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor] | Iterable,
         path: str | os.PathLike, metadata: Mapping | None = None,
         program: torch.export.ExportedProgram | None = None,
         on_tensor: Callable[[str, int], None] | None = None) -> int:
    """Write a model, a state_dict or an iterable of (name, tensor) to a .dcz; returns its bytes.

    A module's weight-shared tensors (share_weights, share_biases) are stored from their
    declared codebook and index; any other floating tensor with at most 256 distinct nonzero
    values (or at most 256 per row) is found to be shared and stored as codebook + indices, and
    anything else in its own dtype, zstd-compressed.
    With `program` (a torch.export of the model), the file also holds the architecture without
    its weights, and `load(path)` returns a runnable module with no Python class needed.
    A module's parametrizations (masks, codebooks) are saved baked, the module left unchanged;
    a state_dict still holding parametrization keys is refused.
    """
    if isinstance(model_or_state_dict, nn.Module):
        tensors = _declared(baked_state_dict(model_or_state_dict),
                            declared_shares(model_or_state_dict))
    else:
        tensors = refuse_unbaked(model_or_state_dict, str(path))
    meta = {"producer": f"deepcompress {__version__}", **dict(metadata or {})}
    try:
        packed = _program.pack(program) if program is not None else None
    except DczError as exc:
        raise CompressError(f"{path}: cannot embed this architecture safely ("
                            f"{str(exc).removeprefix('program: ')}); save without program= to "
                            "store the weights only") from None
    try:
        return dcz.write(path, tensors, meta, on_tensor=on_tensor, program=packed)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, CompressError):
            raise
        raise CompressError(f"{path}: cannot save: {exc}") from exc


def _where(t: torch.Tensor) -> tuple | None:
    if t.numel() == 0:
        return None
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride()


def _declared(tensors: dict[str, torch.Tensor], shares: dict[str, Shared]
              ) -> dict[str, torch.Tensor | Shared]:
    """The baked tensors with each declared one (and any name tied to it) replaced by its Shared
    value: one Shared object per storage, so the writer still stores ties once."""
    by_storage = {_where(tensors[n]): s for n, s in shares.items()
                  if n in tensors and tensors[n].shape == s.shape and tensors[n].dtype == s.dtype}
    by_storage.pop(None, None)
    return {n: by_storage.get(_where(t), t) for n, t in tensors.items()}


def program_bytes(program: torch.export.ExportedProgram | None) -> int:
    """The bytes an exported program adds to a .dcz (its stream and header record, as written)."""
    if program is None:
        return 0
    return dcz.encoded_size({}, program=_program.pack(program)) - dcz.encoded_size({})


def export_program(model: nn.Module, example_input: torch.Tensor | Mapping[str, torch.Tensor]
                   ) -> torch.export.ExportedProgram | None:
    """torch.export of the model in eval mode for this input (a tensor, or a dict of keyword
    inputs; batch size left free when the model allows), or None if it does not export into a
    program a .dcz reader admits."""
    was_training = model.training
    model.eval()
    if isinstance(example_input, Mapping):
        args, kwargs = (), dict(example_input)
        free = {k: {0: torch.export.Dim.DYNAMIC} for k in kwargs}
    else:
        args, kwargs, free = (example_input,), None, ({0: torch.export.Dim.DYNAMIC},)
    try:
        for dynamic in (free, None):
            try:
                program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic)
                _program.pack(program)  # refused if it uses what a reader must not run
                return program
            except Exception:  # many models do not export; the .dcz then holds weights only
                continue
        return None
    finally:
        model.train(was_training)


def load_state_dict(path: str | os.PathLike, names: Iterable[str] | None = None,
                    max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a .dcz (all, or only `names`), bit-identical to what was saved.

    `max_bytes` is the memory budget for decoding (default: the memory available now).
    """
    return dcz.read(path, names, max_bytes=max_bytes)


def open_lazy(path: str | os.PathLike, max_bytes: int | None = None) -> DczFile:
    """A read-only mapping over a .dcz that decodes each tensor when first asked for."""
    return DczFile(path, max_bytes=max_bytes)


def load(path: str | os.PathLike, model: nn.Module | None = None,
         max_bytes: int | None = None) -> nn.Module:
    """Load a .dcz into `model` (strict); one error lists missing, unexpected and mismatched names.

    Without `model`, the architecture stored in the file (if any) is rebuilt: no Python class
    needed, nothing unpickled and no code from the file run; a bad file raises DczError.
    """
    if model is not None:
        return load_into(path, model, load_state_dict(path, max_bytes=max_bytes))
    with DczFile(path, max_bytes=max_bytes, check_program=False) as f:  # load_module checks it
        archive = f.program()
        if archive is None:
            f.load()  # a damaged file is reported as such first
            raise CompressError(f"{path}: holds weights only (no architecture); pass the model: "
                                "deepcompress.load(path, model=Net())")
        module = _program.load_module(archive)
        del archive
        _program.check_fits(module, f.entries, f.path)
        state = f.load()
    try:
        module.load_state_dict(state, strict=True, assign=True)  # its own weights are meta
    except (RuntimeError, ValueError, TypeError) as exc:
        raise DczError(f"{path}: program: its weights do not fit the tensors "
                       f"({' '.join(str(exc).split())[:200]})") from None
    return module


def load_into(source: str | os.PathLike, model: nn.Module, state: Mapping[str, torch.Tensor],
              hint: str = "") -> nn.Module:
    """load_state_dict(strict) with one error listing missing, unexpected and mismatched names."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
                        for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        parts = [f"{label}: {', '.join(items)}" for label, items in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
                 if items]
        raise CompressError(f"{source}: does not fit {type(model).__name__}: "
                            f"{'; '.join(parts)}{hint}")
    model.load_state_dict(state, strict=True)
    return model
