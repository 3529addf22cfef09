"""Structured pruning made physical: output channels (rows of a Linear, filters of a conv)
whose weights are all zero leave the model, with the BatchNorm that follows and the next
layer's input columns, so the model is smaller and faster, not only sparser.

The model is traced (torch.fx) only to find, for each Linear/Conv layer, the path its output
takes to the next such layer. A channel is removed when that path is a chain of channel-wise
operations (activations, BatchNorm, dropout, pooling, flatten) used by nothing else; a dead
channel's constant output (its bias through the chain) is folded into the next layer's bias
where that is exact. Anything else (a residual add, a concatenation, a grouped conv, a layer
whose output leaves the model) keeps its channels, and the report says why, layer by layer.
Modules are replaced in place, so the model keeps its class and its forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import CompressError

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh,
                        nn.Sigmoid, nn.Hardtanh, nn.Dropout, nn.Identity, nn.MaxPool1d,
                        nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                        nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ELEMENTWISE_FUNCTIONS = {torch.relu, torch.tanh, torch.sigmoid, nn.functional.relu,
                          nn.functional.gelu, nn.functional.silu, nn.functional.leaky_relu,
                          nn.functional.max_pool1d, nn.functional.max_pool2d,
                          nn.functional.avg_pool1d, nn.functional.avg_pool2d,
                          nn.functional.adaptive_avg_pool2d, nn.functional.dropout}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}


@dataclass
class LayerShrink:
    """What shrink did to one layer: channels before and after, or why it kept them."""

    layer: str
    channels: int
    kept: int
    reason: str = ""  # empty when the dead channels were removed


@dataclass
class ShrinkReport:
    """Per-layer outcome of shrink, and the parameter counts before and after."""

    layers: list[LayerShrink] = field(default_factory=list)
    parameters_before: int = 0
    parameters_after: int = 0


def _is_flatten(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start == 1 and len(node.args) <= 2
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Flatten):
        m = gm.get_submodule(node.target)
        return m.start_dim == 1 and m.end_dim == -1
    return False


def _step(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """'norm', 'flatten' or 'same' for an operation a channel passes through alone; None otherwise."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, _NORMS):
            return "norm"
        if isinstance(m, _ELEMENTWISE_MODULES):
            return "same"
    if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
        return "same"
    if node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
        return "same"
    if _is_flatten(gm, node):
        return "flatten"
    return None


def _chain(gm: fx.GraphModule, producer: fx.Node) -> tuple[list[fx.Node], fx.Node | None, str]:
    """The channel-wise nodes after producer and the next layer, or (.., None, why not)."""
    path: list[fx.Node] = []
    node = producer
    while True:
        users = list(node.users)
        if len(users) != 1:
            return path, None, (f"its output feeds {len(users)} places (a residual add, a "
                                "concatenation or a model output)" if users else "no consumer")
        (node,) = users
        if node.op != "output" and node.args and node.args[0] is not (path[-1] if path else producer):
            return path, None, f"its output reaches {node.name} as a second input"
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _LAYERS):
            return path, node, ""
        if node.op == "output":
            return path, None, "its output is the model's output"
        kind = _step(gm, node)
        if kind is None:
            name = getattr(node.target, "__name__", str(node.target))
            return path, None, f"its output goes through {name}, which mixes or reshapes channels"
        path.append(node)


def _run_chain(gm: fx.GraphModule, path: list[fx.Node], x: Tensor) -> Tensor:
    """x through the chain's operations (eval mode), as the traced graph runs them."""
    env = x
    for node in path:
        args = [env if a is not None and isinstance(a, fx.Node) else a for a in node.args]
        if node.op == "call_module":
            env = gm.get_submodule(node.target)(*args, **node.kwargs)
        elif node.op == "call_function":
            env = node.target(*args, **node.kwargs)
        else:
            env = getattr(args[0], node.target)(*args[1:], **node.kwargs)
    return env


def _slice_layer(m: nn.Module, out_keep: Tensor | None = None, in_keep: Tensor | None = None
                 ) -> nn.Module:
    """A copy of a Linear/Conv/BatchNorm keeping the given output and input channels."""
    with torch.no_grad():
        if isinstance(m, _NORMS):
            new = type(m)(int(out_keep.sum()), m.eps, m.momentum, m.affine, m.track_running_stats)
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(m, name)
                if t is not None:
                    getattr(new, name).copy_(t[out_keep])
            if m.num_batches_tracked is not None:
                new.num_batches_tracked.copy_(m.num_batches_tracked)
            return new.train(m.training)
        w = m.weight
        if out_keep is not None:
            w = w[out_keep]
        if in_keep is not None:
            w = w[:, in_keep]
        bias = m.bias[out_keep] if (m.bias is not None and out_keep is not None) else m.bias
        if isinstance(m, nn.Linear):
            new = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
        else:
            new = type(m)(w.shape[1], w.shape[0], m.kernel_size, m.stride, m.padding, m.dilation,
                          m.groups, m.bias is not None, m.padding_mode)
        new = new.to(dtype=w.dtype, device=w.device)
        new.weight.copy_(w)
        if bias is not None:
            new.bias.copy_(bias)
        return new.train(m.training)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def shrink(model: nn.Module, example_input: Tensor) -> ShrinkReport:
    """Remove, in place, the all-zero output channels of model's Linear/Conv layers where that is
    exact (see the module docstring); example_input gives the shapes. Returns what was done."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types for code it cannot trace
        raise CompressError(f"structured pruning: the model cannot be traced by torch.fx "
                            f"({type(exc).__name__}); prune unstructured instead") from None
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
            report = ShrinkReport(parameters_before=sum(p.numel() for p in model.parameters()))
            for node in list(gm.graph.nodes):
                if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _LAYERS):
                    report.layers.append(_shrink_one(model, gm, node))
            report.parameters_after = sum(p.numel() for p in model.parameters())
    finally:
        model.train(was)
    return report


def _shrink_one(model: nn.Module, gm: fx.GraphModule, node: fx.Node) -> LayerShrink:
    name = node.target
    layer = model.get_submodule(name)
    w = layer.weight.detach()
    dead = (w.reshape(w.shape[0], -1) == 0).all(dim=1)
    channels = w.shape[0]
    if not bool(dead.any()):
        return LayerShrink(name, channels, channels)
    if int(dead.sum()) == channels:
        return LayerShrink(name, channels, channels, "every channel is zero; kept so the model still runs")
    if getattr(layer, "groups", 1) != 1:
        return LayerShrink(name, channels, channels, "a grouped conv; its channels are kept")
    path, consumer, why = _chain(gm, node)
    if consumer is None:
        return LayerShrink(name, channels, channels, why)
    nxt = model.get_submodule(consumer.target)
    if getattr(nxt, "groups", 1) != 1:
        return LayerShrink(name, channels, channels, f"the next layer {consumer.target} is a grouped conv")
    shape = tuple(node.meta["tensor_meta"].shape)
    if isinstance(layer, nn.Linear) and len(shape) != 2:
        return LayerShrink(name, channels, channels, "a Linear on inputs of more than two dimensions")
    # a dead channel outputs its bias everywhere: run that through the chain to see what arrives
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros(channels, dtype=w.dtype)
    const = bias.view(1, -1, *([1] * (len(shape) - 2))).expand(1, *shape[1:]).clone()
    arrived = _run_chain(gm, path, const)
    flat = any(_step(gm, n) == "flatten" for n in path)
    if isinstance(nxt, nn.Linear) and arrived.dim() != 2:
        return LayerShrink(name, channels, channels, f"{consumer.target} is a Linear over the last "
                           "dimension, not over these channels")
    if flat or arrived.dim() == 2:  # the next layer's input columns: blocks of the channel's values
        per = arrived.shape[1] // channels
        cols = arrived.reshape(1, channels, per)[0]
    else:
        cols = arrived[0].reshape(channels, -1)
    values = cols[dead]
    if not torch.all(values == values[:, :1]) and not isinstance(nxt, nn.Linear):
        return LayerShrink(name, channels, channels, "a dead channel's output is not constant after the chain")
    if bool((values != 0).any()):
        if isinstance(nxt, nn.Linear):
            fold = nxt.weight.detach().reshape(nxt.weight.shape[0], channels, -1)[:, dead] * values
            fold = fold.sum(dim=(1, 2))
        elif all(p == 0 for p in _padding(nxt)):
            fold = (nxt.weight.detach()[:, dead] * values[:, :1].reshape(1, -1, *([1] * (nxt.weight.dim() - 2)))).sum(
                dim=tuple(range(1, nxt.weight.dim())))
        else:
            return LayerShrink(name, channels, channels, f"dead channels carry a nonzero constant into "
                               f"{consumer.target}, whose zero padding makes folding it inexact")
        if nxt.bias is None:
            return LayerShrink(name, channels, channels, f"dead channels carry a nonzero constant and "
                               f"{consumer.target} has no bias to take it")
    else:
        fold = None
    keep = ~dead
    per_channel = cols.shape[1] if (flat or arrived.dim() == 2) and isinstance(nxt, nn.Linear) else 1
    in_keep = keep.repeat_interleave(per_channel) if isinstance(nxt, nn.Linear) else keep
    new_next = _slice_layer(nxt, in_keep=in_keep)
    if fold is not None:
        with torch.no_grad():
            new_next.bias.add_(fold.to(new_next.bias.dtype))
    _set(model, name, _slice_layer(layer, out_keep=keep))
    for n in path:
        if _step(gm, n) == "norm":
            _set(model, n.target, _slice_layer(model.get_submodule(n.target), out_keep=keep))
    _set(model, consumer.target, new_next)
    return LayerShrink(name, channels, int(keep.sum()))


def _padding(m: nn.Module) -> tuple[int, ...]:
    p = m.padding
    if isinstance(p, str):
        return (0,) if p == "valid" else (1,)
    return tuple(p)
