"""Pruning criteria: how important each weight (or group of weights) of a layer is.

A criterion returns a layer's *saliency*: a tensor of the weight's shape, or one that broadcasts
to it for structured pruning (``(out, 1)`` scores rows, ``(out, 1, 1, 1)`` scores conv filters).
Importance is ``|saliency|``; allocations keep the most important entries, and the paper's std
rule keeps ``|saliency| >= quality * std(saliency)`` (with magnitude: ``|w| >= quality * std(w)``).

A criterion that needs data reads it from the `Context`: the model, calibration batches and a
loss, with statistics (gradients, and whatever a new criterion needs) computed lazily, once per
context. Adding one is a small class, as 'obd' below is::

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
    return _mean_over_batches(context, "gradients", lambda g: g)


def squared_gradients(context: Context) -> dict[str, Tensor]:
    """Empirical Fisher diagonal: the mean over the context's batches of each batch's squared mean-loss gradient.

    Per batch, not per example: E[g_b^2] = g^2 + Var(g_x) / batch size, so it ranks like the
    per-example Fisher within a layer and smaller batches bring it closer (same rules as gradients).
    """
    return _mean_over_batches(context, "fisher", lambda g: g * g)


def _mean_over_batches(context: Context, what: str, transform: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    model, batches, loss_fn = context.require_data(what)
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
                        total.add_(transform(grad.detach()))
    finally:
        model.train(was_training)
    return {name: total / len(batches) for name, total in zip(modules, sums, strict=True)}


class Criterion:
    """Scores a layer's weights (or groups of them); subclasses set name and implement saliency."""

    name: ClassVar[str]
    needs_data: ClassVar[bool] = False
    structured: ClassVar[bool] = False  # one score per output filter/row: saliency (out, 1, ...)

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


# --- the methods of the literature (issue 12) ----------------------------------------------------
#
# Unstructured: obd, obs. Structured (one score per output filter of a conv, per output row of a
# Linear; the output channels of a ConvTranspose are its weight's dim 1): taylor_filter, l1_filter,
# apoz, fpgm, bn_scale. A structured saliency has shape (out, 1, ...) (a ConvTranspose's
# (1, out, 1, ...)); allocations then count filters, and prune.compute_masks expands each mask
# to the weight's shape. A group whose weights are all zero (pruned before) scores 0, so
# repeated pruning (iterative, agp, lottery) keeps what it pruned pruned.

_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)
_NORMS = (nn.modules.batchnorm._BatchNorm,)
OBS_MAX_COLUMNS = 16384  # layers with more flattened inputs have no H collected (it would be columns^2)


def _output_dim(name: str, module: nn.Module, what: str) -> int:
    """The weight dim indexing the layer's output channels (1 for a ConvTranspose, else 0)."""
    if isinstance(module, nn.Embedding):
        raise CompressError(f"{what}: layer {name!r} is an Embedding, which has no output filters; "
                            "set PruneConfig.embeddings=False or use criterion 'magnitude'")
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        if module.groups != 1:
            raise CompressError(f"{what}: layer {name!r} is a grouped ConvTranspose, whose output "
                                "channels are split across groups; exclude it or use criterion 'magnitude'")
        return 1
    return 0


def group_rows(name: str, module: nn.Module, tensor: Tensor, what: str) -> Tensor:
    """tensor (the weight's shape) as a matrix with one row per output filter/row of the layer."""
    return tensor.movedim(_output_dim(name, module, what), 0).flatten(1)


def group_saliency(name: str, module: nn.Module, scores: Tensor, what: str) -> Tensor:
    """One score per output filter shaped to broadcast to the weight; 0 where the filter is all zero."""
    weight = module.weight.detach()
    dim = _output_dim(name, module, what)
    if scores.numel() != weight.shape[dim]:
        raise CompressError(f"{what}: layer {name!r} has {weight.shape[dim]} output channels but "
                            f"{scores.numel()} scores; check the layer (or the BatchNorm after it)")
    alive = group_rows(name, module, weight, what).ne(0).any(1)
    shape = [1] * weight.dim()
    shape[dim] = -1
    return torch.where(alive, scores.reshape(-1).to(weight.dtype), 0.0).view(shape)


@register
class OBD(Criterion):
    """Optimal Brain Damage (LeCun et al. 1990): 1/2 F_ii w^2, F the empirical Fisher diagonal; needs data, one backward pass per calibration batch."""

    name = "obd"
    needs_data = True

    def saliency(self, name: str, module: nn.Module, context: Context) -> Tensor:
        """Half the Fisher diagonal times the squared weight."""
        w = module.weight.detach()
        return 0.5 * context.statistic("fisher", squared_gradients)[name] * w * w


def _inputs(context: Context, what: str) -> tuple[nn.Module, list[Tensor]]:
    model, batches, _ = context.require_data(what)
    return model, [x for x, _ in batches]


def hessians(context: Context) -> dict[str, Any]:
    """Input second moments H = X^T X / n (calibration.Moments) of every Linear and ungrouped Conv1d/2d layer with at most OBS_MAX_COLUMNS inputs."""
    from deepcompress.calibration import calibration_layers, collect_hessians, columns

    model, inputs = _inputs(context, "obs")
    layers = [n for n, m in calibration_layers(model).items() if columns(m) <= OBS_MAX_COLUMNS]
    return collect_hessians(model, inputs, layers) if layers else {}


@register
class OBS(Criterion):
    """Optimal Brain Surgeon (Hassibi & Stork 1993): w_q^2 / (2 [H^-1]_qq), H = X^T X of each layer's inputs; needs data, one forward pass and an in^2 inverse per layer; scores only (the compensating update is layerwise.obs_prune)."""

    name = "obs"
    needs_data = True

    def saliency(self, name: str, module: nn.Module, context: Context) -> Tensor:
        """OBS saliency per weight; inputs that are always zero make their weights free (0)."""
        from deepcompress.layerwise import inverse_cholesky

        moments = context.statistic("hessians", hessians)
        if name not in moments:
            raise CompressError(f"obs: layer {name!r} ({type(module).__name__}) has no H: OBS supports "
                                f"Linear and ungrouped Conv1d/Conv2d with <= {OBS_MAX_COLUMNS} inputs; "
                                "exclude it or use criterion 'obd'")
        w = module.weight.detach()
        flat = w.reshape(w.shape[0], -1).to(torch.float64)
        upper, dead = inverse_cholesky(moments[name].mean().to(torch.float64))
        inverse_diagonal = (upper * upper).sum(0)  # H^-1 = U^T U
        scores = 0.5 * flat * flat / inverse_diagonal
        scores[:, dead] = 0
        return scores.reshape(w.shape).to(w.dtype)


@register
class TaylorFilter(Criterion):
    """First-order Taylor per filter (Molchanov et al. 2019): |sum over a filter of g * w|; structured; needs data, one backward pass per calibration batch."""

    name = "taylor_filter"
    needs_data = True
    structured = True

    def saliency(self, name: str, module: nn.Module, context: Context) -> Tensor:
        """Sum of gradient times weight over each output filter."""
        product = context.statistic("gradients", gradients)[name] * module.weight.detach()
        return group_saliency(name, module, group_rows(name, module, product, self.name).sum(1), self.name)


@register
class L1Filter(Criterion):
    """L1-norm filter pruning (Li et al. 2017): the L1 norm of each output filter/row; structured; needs no data."""

    name = "l1_filter"
    structured = True

    def saliency(self, name: str, module: nn.Module, context: Context) -> Tensor:
        """L1 norm of each output filter."""
        w = module.weight.detach()
        return group_saliency(name, module, group_rows(name, module, w.abs(), self.name).sum(1), self.name)


@register
class FPGM(Criterion):
    """Filter pruning via geometric median (He et al. 2019): each filter's summed distance to the layer's other filters, the nearest to the median pruned first; structured; needs no data, out^2 distances per layer."""

    name = "fpgm"
    structured = True

    def saliency(self, name: str, module: nn.Module, context: Context) -> Tensor:
        """Sum of Euclidean distances of each filter to all others."""
        rows = group_rows(name, module, module.weight.detach(), self.name).to(torch.float64)
        return group_saliency(name, module, torch.cdist(rows, rows).sum(1), self.name)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _channels(output: Tensor, dim: int) -> Tensor:
    """output as [channels, everything else]."""
    return output.movedim(dim, 0).flatten(1)


def _watch(model: nn.Module, inputs: list[Tensor], on_layer: Callable[[str, nn.Module, Tensor], None],
           on_norm: Callable[[str, str, Tensor], None]) -> None:
    """Run inputs through model (eval, no grad) calling on_layer(name, module, output) for each Linear/conv
    and on_norm(layer name, norm name, output) for each BatchNorm whose input is a layer's output itself."""
    produced: dict[int, tuple[str, Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _LAYERS):
            def layer_hook(mod: nn.Module, args: tuple, out: Any, name: str = name) -> None:
                if isinstance(out, Tensor):
                    produced[id(out)] = (name, out)
                    on_layer(name, mod, out)
            handles.append(module.register_forward_hook(layer_hook))
        elif isinstance(module, _NORMS):
            def norm_hook(mod: nn.Module, args: tuple, out: Any, name: str = name) -> None:
                x = args[0] if args else None
                hit = produced.get(id(x)) if isinstance(x, Tensor) else None
                if hit is not None and hit[1] is x and isinstance(out, Tensor):
                    on_norm(hit[0], name, out)
            handles.append(module.register_forward_hook(norm_hook))
    device, was_training = _device(model), model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in inputs:
                produced.clear()
                model(x.to(device))
    finally:
        produced.clear()
        for handle in handles:
            handle.remove()
        model.train(was_training)


def following_batchnorms(context: Context) -> dict[str, str]:
    """Layer name -> name of the BatchNorm that takes the layer's output as its input, traced on the first calibration batch."""
    model, inputs = _inputs(context, "bn_scale")
    found: dict[str, str] = {}
    _watch(model, inputs[:1], lambda *_: None, lambda layer, norm, _: found.setdefault(layer, norm))
    return found


def zero_fractions(context: Context) -> dict[str, Tensor]:
    """APoZ per output channel of every Linear/conv layer: the fraction of its activations that ReLU
    zeroes over all calibration batches (examples and positions), taken after the BatchNorm that
    directly follows the layer if there is one, else on the layer's output."""
    model, inputs = _inputs(context, "apoz")
    layer_counts: dict[str, list[Tensor]] = {}
    norm_counts: dict[str, list[Tensor]] = {}

    def add(counts: dict[str, list[Tensor]], name: str, output: Tensor, dim: int) -> None:
        zeros = _channels(output <= 0, dim)  # relu(x) == 0 exactly when x <= 0
        total = counts.setdefault(name, [torch.zeros(zeros.shape[0], dtype=torch.float64), 0])
        total[0] += zeros.sum(1).cpu().to(torch.float64)
        total[1] += zeros.shape[1]

    def on_layer(name: str, module: nn.Module, out: Tensor) -> None:
        if isinstance(module, nn.modules.conv._ConvNd):  # (N, C, ...) or unbatched (C, ...)
            add(layer_counts, name, out, 1 if out.dim() == module.weight.dim() else 0)
        else:  # a Linear's features are its output's last dim
            add(layer_counts, name, out, out.dim() - 1)

    _watch(model, inputs, on_layer, lambda layer, norm, out: add(norm_counts, layer, out, 1 if out.dim() > 1 else 0))
    return {name: zeros / count for name, (zeros, count) in {**layer_counts, **norm_counts}.items()}


@register
class APoZ(Criterion):
    """Average percentage of zeros (Hu et al. 2016): output channels that ReLU zeroes most often are pruned; structured; needs data, one forward pass per calibration batch, assumes a ReLU follows the layer (or its BatchNorm)."""

    name = "apoz"
    needs_data = True
    structured = True

    def saliency(self, name: str, module: nn.Module, context: Context) -> Tensor:
        """1 - APoZ of each output channel (a forward hook on the layer, or on the BatchNorm right after it, passed through ReLU)."""
        fractions = context.statistic("apoz", zero_fractions)
        if name not in fractions:
            raise CompressError(f"apoz: layer {name!r} never ran on the calibration batches; "
                                "exclude it or use criterion 'l1_filter'")
        return group_saliency(name, module, 1.0 - fractions[name], self.name)


@register
class BNScale(Criterion):
    """Network slimming's criterion (Liu et al. 2017): |gamma| of the BatchNorm after each layer scores its filters; structured; needs one batch to find that BatchNorm (train with regulariser 'slimming' first)."""

    name = "bn_scale"
    needs_data = True
    structured = True

    def saliency(self, name: str, module: nn.Module, context: Context) -> Tensor:
        """|gamma| of the following BatchNorm, per output channel."""
        follows = context.statistic("batchnorms", following_batchnorms)
        norm = dict(context.model.named_modules()).get(follows.get(name, ""))  # type: ignore[union-attr]
        if norm is None or getattr(norm, "weight", None) is None:
            raise CompressError(f"bn_scale: layer {name!r} is not followed by an affine BatchNorm; "
                                "exclude it (PruneConfig.exclude) or use criterion 'l1_filter'")
        return group_saliency(name, module, norm.weight.detach().abs(), self.name)
