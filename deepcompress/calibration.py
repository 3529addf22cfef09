"""Calibration: run a model on unlabeled batches and collect each layer's input second moment.

For every Linear, Conv1d and Conv2d layer (ungrouped convolutions) a forward pre-hook adds
``X^T X`` of the layer's inputs to a running sum, X having one row per output position: a Linear
layer's input rows (all leading dimensions flattened), a convolution's im2col patches (padding
applied as the layer applies it) in the order of ``weight.reshape(out, -1)``. So for a layer
weight W, ``W @ X^T`` is the layer's output without bias, and ``tr(W H W^T)`` its energy.

`calibrate_blocks` processes the model block by block (its top-level children in order, or
named submodules), so memory follows one block's activations: the calibration inputs are run
through the blocks already compressed, the block's layers accumulate H, a callback compresses
them, and the compressed block's outputs feed the next block (as SparseGPT and GPTQ do). When the
blocks form a chain (each block's only input is the previous block's output, as in
nn.Sequential) the block inputs are cached and fed forward; otherwise ("prefix" mode, any
forward) the model is rerun on every batch up to the end of the current block.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepcompress.errors import CompressError

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
MODES = ("auto", "chain", "prefix")
Batch = Tensor | Mapping[str, Tensor] | tuple[Tensor, ...]
_PATCH_ELEMENTS = 1 << 24  # unfolded elements per chunk of a conv layer's batch


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


@dataclass
class Moments:
    """Running sum of x x^T over a layer's input rows (im2col patches for convolutions) and the row count."""

    sum: Tensor
    count: int = 0

    def add(self, rows: Tensor) -> None:
        """Add rows [n, in'] to the sum (in the sum's dtype)."""
        rows = rows.to(self.sum.dtype)
        self.sum.addmm_(rows.T, rows)
        self.count += rows.shape[0]

    def mean(self) -> Tensor:
        """H / count: the input second moment per row (zeros before any row was added)."""
        return self.sum / max(self.count, 1)


def supports(module: nn.Module) -> bool:
    """Whether module is a layer whose input second moment can be collected (Linear, ungrouped Conv1d/2d)."""
    return isinstance(module, LAYER_TYPES) and getattr(module, "groups", 1) == 1


def columns(module: nn.Module) -> int:
    """Number of columns of the layer's flattened weight [out, in * kernel]."""
    return module.weight[0].numel()


def layer_rows(module: nn.Module, x: Tensor) -> Iterable[Tensor]:
    """The layer's input as rows matching weight.reshape(out, -1), in chunks (im2col for convolutions)."""
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, module.in_features)
        yield from rows.split(max(1, _PATCH_ELEMENTS // max(module.in_features, 1)))
        return
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2) if x.dim() == 3 else x.reshape(1, x.shape[0], 1, x.shape[1])
        kernel, stride, dilation = (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation)
        pad = (*module._reversed_padding_repeated_twice, 0, 0)
    else:
        if x.dim() == 3:
            x = x.unsqueeze(0)
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        pad = tuple(module._reversed_padding_repeated_twice)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    per_sample = columns(module) * max(1, x[0].numel() // max(x.shape[1], 1))
    step = max(1, _PATCH_ELEMENTS // max(per_sample, 1))
    for start in range(0, x.shape[0], step):
        part = x[start:start + step]
        if any(pad):
            part = F.pad(part, pad, mode=mode)
        patches = F.unfold(part, kernel, dilation=dilation, stride=stride)  # [n, in', positions]
        yield patches.transpose(1, 2).reshape(-1, patches.shape[1])


def as_batches(inputs: Tensor | Mapping[str, Tensor] | Iterable[Batch], batch_size: int = 64) -> list[Batch]:
    """A list of calibration batches: a batch-first tensor (or dict of them) split into batch_size rows, or the iterable's batches."""
    if isinstance(inputs, Tensor):
        if inputs.dim() == 0 or len(inputs) == 0:
            raise CompressError("calibration inputs: an empty or 0-d tensor; pass a batch-first tensor of examples")
        return list(inputs.split(batch_size))
    if isinstance(inputs, Mapping):
        _check_batch(inputs, 0)
        n = len(next(iter(inputs.values())))
        return [{k: v[s:s + batch_size] for k, v in inputs.items()} for s in range(0, n, batch_size)]
    if not isinstance(inputs, Iterable):
        raise CompressError(f"calibration inputs: {type(inputs).__name__} is not a tensor, a dict of "
                            "tensors or an iterable of batches; pass one of those")
    batches = list(inputs)
    if not batches:
        raise CompressError("calibration inputs: no batches; pass at least one batch of example inputs")
    for i, batch in enumerate(batches):
        _check_batch(batch, i)
    return batches


def _check_batch(batch: object, i: int) -> None:
    values = (batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, tuple | list)
              else (batch,))
    values = list(values)
    if not values or not all(isinstance(v, Tensor) for v in values):
        raise CompressError(f"calibration batch {i}: {type(batch).__name__} is not a tensor, a tuple or "
                            "a dict of tensors; pass batches of input tensors (no labels)")


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, Mapping):
        return {k: v.to(device) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return tuple(v.to(device) for v in batch)
    return batch.to(device)


def run_model(model: nn.Module, batch: Batch) -> Any:
    """model(batch): a dict as keyword inputs, a tuple as positional inputs, a tensor as the one input."""
    batch = _to(batch, model_device(model))
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)


def floating_outputs(output: Any) -> list[Tensor]:
    """Every floating tensor in a model output (tensor, tuple, list, dict or dataclass), in order."""
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        items: Iterable[Any] = output.values()
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        items = (getattr(output, f.name) for f in dataclasses.fields(output))
    elif isinstance(output, tuple | list):
        items = output
    else:
        return []
    return [t for item in items for t in floating_outputs(item)]


@contextmanager
def _hooks(handles: list) -> Any:
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _evaluating(model: nn.Module) -> Any:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _moment_hooks(layers: Mapping[str, nn.Module], dtype: torch.dtype) -> tuple[dict[str, Moments], list]:
    moments: dict[str, Moments] = {}
    handles = []
    for name, module in layers.items():
        n = columns(module)
        moments[name] = Moments(torch.zeros(n, n, dtype=dtype, device=module.weight.device))

        def hook(mod: nn.Module, args: tuple, kwargs: dict, m: Moments = moments[name]) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            for rows in layer_rows(mod, x.detach()):
                m.add(rows)

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return moments, handles


def calibration_layers(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The supported layers of model (Linear, ungrouped Conv1d/Conv2d), or the named ones (checked)."""
    found = {n: m for n, m in model.named_modules() if supports(m)}
    if names is None:
        return found
    out = {}
    for name in names:
        if name not in found:
            raise CompressError(f"layer {name!r}: not a Linear or ungrouped Conv1d/Conv2d of "
                                f"{type(model).__name__}; use one of {', '.join(found) or 'none'}")
        out[name] = found[name]
    return out


def collect_hessians(model: nn.Module, batches: Iterable[Batch], layers: Iterable[str] | None = None,
                     dtype: torch.dtype = torch.float64) -> dict[str, Moments]:
    """Input second moments of the layers (all supported ones by default) from one full pass per batch."""
    batches = as_batches(batches)
    moments, handles = _moment_hooks(calibration_layers(model, layers), dtype)
    with _hooks(handles), _evaluating(model):
        for batch in batches:
            run_model(model, batch)
    return moments


def blocks_of(model: nn.Module, names: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The blocks to process in order: the named submodules, else the top-level children (else the model itself)."""
    if names is None:
        children = list(model.named_children())
        return children or [("", model)]
    modules = dict(model.named_modules())
    out = []
    for name in names:
        if name not in modules:
            raise CompressError(f"block {name!r}: not a submodule of {type(model).__name__}; "
                                f"use names such as {', '.join(list(modules)[1:6]) or 'none'}")
        out.append((name, modules[name]))
    owned = [n for n, _ in out]
    for i, a in enumerate(owned):
        for b in owned[i + 1:]:
            if a == b or b.startswith(f"{a}.") or a.startswith(f"{b}.") or a == "" or b == "":
                raise CompressError(f"blocks {a!r} and {b!r} overlap; give disjoint blocks")
    return out


def _inside(layer: str, block: str) -> bool:
    return block == "" or layer == block or layer.startswith(f"{block}.")


def _is_chain(model: nn.Module, blocks: list[tuple[str, nn.Module]], batch: Batch) -> bool:
    """Whether, on this batch, each block ran once, in order, and each block after the first took
    exactly the previous block's output as its only input, the last one's output being the model's."""
    calls: list[tuple[int, tuple, dict, Any]] = []
    handles = []
    for i, (_, block) in enumerate(blocks):
        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any, i: int = i) -> None:
            calls.append((i, args, kwargs, out))
        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    with _hooks(handles), _evaluating(model):
        output = run_model(model, batch)
    if [c[0] for c in calls] != list(range(len(blocks))):
        return False
    for (_, _, _, prev), (_, args, kwargs, _) in zip(calls, calls[1:], strict=False):
        if kwargs or len(args) != 1 or args[0] is not prev:
            return False
    return output is calls[-1][3]


def _block_inputs(model: nn.Module, block: nn.Module, batches: list[Batch]) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) block receives on each batch, running the model only up to the block."""
    cache: list[tuple[tuple, dict]] = []

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        cache.append((args, kwargs))
        raise _Stop

    with _hooks([block.register_forward_pre_hook(hook, with_kwargs=True)]):
        _run_to_block(model, batches)
    return cache


def calibrate_blocks(model: nn.Module, batches: Iterable[Batch],
                     compress: Callable[[str, dict[str, tuple[nn.Module, Moments]]], None],
                     blocks: Sequence[str] | None = None, layers: Iterable[str] | None = None,
                     dtype: torch.dtype = torch.float64, mode: str = "auto") -> str:
    """Block by block: collect H of the block's layers from inputs through the blocks already
    compressed, call compress(block name, {layer: (module, moments)}) to change them in place,
    move on; returns the mode used ('chain' or 'prefix')."""
    if mode not in MODES:
        raise CompressError(f"calibration mode {mode!r}: unknown; use one of {', '.join(MODES)}")
    batches = as_batches(batches)
    selected = calibration_layers(model, layers)
    plan = blocks_of(model, blocks)
    with _evaluating(model):
        if mode == "auto":
            mode = "chain" if _is_chain(model, plan, batches[0]) else "prefix"
        elif mode == "chain" and not _is_chain(model, plan, batches[0]):
            raise CompressError("calibration mode 'chain': the blocks do not feed each other in order; "
                                "use mode 'prefix' or 'auto'")
        cache = _block_inputs(model, plan[0][1], batches) if mode == "chain" else []
        for index, (name, block) in enumerate(plan):
            inside = {n: m for n, m in selected.items() if _inside(n, name)}
            moments, handles = _moment_hooks(inside, dtype)
            with _hooks(handles):
                if mode == "chain":
                    for args, kwargs in cache:
                        block(*args, **kwargs)
                else:
                    _run_through(model, block, batches)
            if inside:
                compress(name, {n: (m, moments[n]) for n, m in inside.items()})
            del moments
            if mode == "chain" and index + 1 < len(plan):
                cache = [((block(*args, **kwargs),), {}) for args, kwargs in cache]
    return mode


def _run_to_block(model: nn.Module, batches: Iterable[Batch]) -> None:
    """Run each batch until a hook raises _Stop at the block; an error if one never gets there."""
    for i, batch in enumerate(batches):
        try:
            run_model(model, batch)
        except _Stop:
            continue
        raise CompressError(f"calibration batch {i}: a block never ran in the model's forward; "
                            "give blocks= that the forward calls")


def _run_through(model: nn.Module, block: nn.Module, batches: list[Batch]) -> None:
    """Run each batch through the model up to the end of block's first call."""
    def hook(mod: nn.Module, args: tuple, out: Any) -> None:
        raise _Stop

    with _hooks([block.register_forward_hook(hook)]):
        _run_to_block(model, batches)


def read_calibration(spec: str, batch_size: int = 64) -> list[Batch]:
    """Calibration batches from a file of example inputs (no labels) or a batch factory.

    `.pt`/`.pth` (loaded with weights_only), `.safetensors` or `.npy` holding a batch-first
    tensor, or a dict of named batch-first tensors passed as keyword inputs (a transformer's
    `input_ids` and `attention_mask`); or 'file.py:factory' / 'module:factory' returning an
    iterable of batches.
    """
    path = Path(spec)
    if not path.is_file() and ":" in spec:
        from .tasks import load_object
        return as_batches(load_object(spec, "--calib")(), batch_size)
    if not path.is_file():
        raise CompressError(f"{spec}: no such calibration file; pass a .pt, .safetensors or .npy "
                            "file of example inputs, or module:factory")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            inputs: object = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".safetensors":
            from safetensors.torch import load_file
            inputs = load_file(path)
            if len(inputs) == 1:
                inputs = next(iter(inputs.values()))
        elif suffix in (".pt", ".pth"):
            inputs = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise CompressError(f"{spec}: unknown calibration file type {suffix!r}; give a .pt, "
                                ".safetensors or .npy file of example inputs")
    except CompressError:
        raise
    except Exception as exc:  # each reader raises its own types for a damaged file
        raise CompressError(f"{spec}: not a file of tensors ({type(exc).__name__}); save the "
                            "inputs with torch.save(tensor, path) or numpy.save") from None
    if isinstance(inputs, Mapping):
        shapes = {k: tuple(v.shape) for k, v in inputs.items() if isinstance(v, Tensor)}
        if len(shapes) != len(inputs) or not shapes:
            raise CompressError(f"{spec}: a dict of calibration inputs must map names to tensors")
        if len({s[:1] for s in shapes.values()}) != 1 or () in shapes.values():
            raise CompressError(f"{spec}: named inputs must be batch-first with the same number of "
                                f"rows (got {shapes}); give one row per example in each")
    elif not isinstance(inputs, Tensor | list | tuple):
        raise CompressError(f"{spec}: holds a {type(inputs).__name__}, not tensors; save a "
                            "batch-first tensor of example inputs")
    try:
        return as_batches(inputs, batch_size)
    except CompressError as exc:
        raise CompressError(f"{spec}: {exc}") from None


def check_runs(model: nn.Module, batches: list[Batch], spec: str) -> None:
    """CompressError naming spec unless the model accepts the first calibration batch."""
    try:
        with _evaluating(model):
            output = run_model(model, batches[0])
    except Exception as exc:  # whatever the model raises for a wrong input
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CompressError(f"{spec}: the model rejects the first calibration batch "
                            f"({type(exc).__name__}: {first}); give inputs of the shape and dtype "
                            "the model takes") from None
    if not floating_outputs(output):
        raise CompressError(f"{spec}: the model's output holds no floating tensor to compare; "
                            "calibration needs a model with floating outputs")
