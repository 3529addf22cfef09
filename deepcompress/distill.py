"""Distillation: unlabeled calibration inputs plus the original model (the teacher) become a Task.

The targets are the teacher's outputs, computed once per input; the loss is the MSE between
student and teacher outputs (every floating output, flattened and concatenated), or, for logits,
the temperature-scaled KL divergence from the teacher's softmax over the last dimension. The
result is an ordinary `deepcompress.tasks.Task`, so the retraining paths (deepcompress.train.fit,
the pipeline's prune_stage and share_stage, the pruning schedules) run on it unchanged: masked
retraining after pruning, centroid fine-tuning after sharing, with the teacher as the label.

The validation split (used to pick the best epoch) is a held-out part of the calibration inputs;
the test split is the same held-out part, so it is not an independent test.

With `mix`, the training inputs are extended by convex combinations of random pairs of them,
lambda x_a + (1 - lambda) x_b with lambda uniform in [0, 1], each labelled by the teacher: a few
hundred inputs then show the student much more of the teacher's function than its values on
those inputs alone ("function matching" with mixup, Beyer et al. 2022). Floating inputs only.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepcompress.calibration import as_batches, floating_outputs, model_device
from deepcompress.errors import CompressError
from deepcompress.tasks import Task

LOSSES = ("mse", "kl")


def flatten_outputs(output: Any, rows: int | None = None) -> Tensor:
    """Every floating tensor of a model output as one [N, features] tensor (N = the batch dimension)."""
    parts = floating_outputs(output)
    if not parts:
        raise CompressError(f"model output {type(output).__name__}: holds no floating tensor; "
                            "distill a model whose outputs are floating tensors")
    n = rows if rows is not None else parts[0].shape[0] if parts[0].dim() else 1
    for p in parts:
        if p.dim() == 0 or p.shape[0] != n:
            raise CompressError(f"model output of shape {tuple(p.shape)}: not batch-first with {n} rows; "
                                "distill a model whose outputs are batch-first")
    return parts[0].reshape(n, -1) if len(parts) == 1 else torch.cat([p.reshape(n, -1) for p in parts], 1)


class FlatOutputs(nn.Module):
    """Wrap a model with structured outputs (tuple, dict, dataclass) so it returns flatten_outputs of them; train the wrapper."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """The wrapped model's floating outputs as one [N, features] tensor."""
        return flatten_outputs(self.model(*args, **kwargs))


class DistillLoss:
    """Loss between student outputs and precomputed teacher targets: 'mse' on all outputs, or 'kl' on logits."""

    def __init__(self, kind: str = "mse", temperature: float = 1.0) -> None:
        if kind not in LOSSES:
            raise CompressError(f"distillation loss {kind!r}: unknown; use one of {', '.join(LOSSES)}")
        if not temperature > 0:
            raise CompressError(f"temperature {temperature!r}: must be > 0, e.g. 1.0")
        self.kind, self.temperature = kind, float(temperature)

    def __call__(self, output: Any, target: Tensor) -> Tensor:
        """Mean squared error, or KL(teacher || student) * T^2 averaged over the positions."""
        if self.kind == "mse":
            return F.mse_loss(flatten_outputs(output, len(target)).float(), target.reshape(len(target), -1).float())
        logits = _logits(output, target)
        t = self.temperature
        log_student = F.log_softmax(logits.float() / t, dim=-1).reshape(-1, target.shape[-1])
        log_teacher = F.log_softmax(target.float() / t, dim=-1).reshape(-1, target.shape[-1])
        return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * t * t


def _logits(output: Any, target: Tensor) -> Tensor:
    parts = floating_outputs(output)
    if len(parts) != 1 or parts[0].shape != target.shape:
        raise CompressError("distillation loss 'kl': needs one logits tensor shaped like the teacher's; "
                            "use loss 'mse' for other outputs")
    return parts[0]


def negative_mse(output: Any, target: Tensor) -> float:
    """Metric of an 'mse' distillation task: minus the mean squared error to the teacher (higher is better)."""
    return -float(DistillLoss("mse")(output, target))


def agreement(output: Any, target: Tensor) -> float:
    """Metric of a 'kl' distillation task: fraction of positions where student and teacher arg-max agree."""
    return float((_logits(output, target).argmax(-1) == target.argmax(-1)).double().mean())


@torch.no_grad()
def teacher_targets(teacher: nn.Module, inputs: Tensor, loss: str = "mse", batch_size: int = 256) -> Tensor:
    """The teacher's outputs on inputs, in eval mode, on the CPU: [N, features] for 'mse', the logits' shape for 'kl'."""
    was = teacher.training
    teacher.eval()
    device = model_device(teacher)
    out = []
    try:
        for part in inputs.split(batch_size):
            output = teacher(part.to(device))
            if loss == "kl":
                out.append(_single(output).detach().cpu())
            else:
                out.append(flatten_outputs(output, len(part)).detach().cpu())
    finally:
        teacher.train(was)
    return torch.cat(out)


def _single(output: Any) -> Tensor:
    parts = floating_outputs(output)
    if len(parts) != 1:
        raise CompressError(f"distillation loss 'kl': the teacher returns {len(parts)} floating outputs, "
                            "not one logits tensor; use loss 'mse'")
    return parts[0]


def mixed_inputs(x: Tensor, count: int, seed: int = 0) -> Tensor:
    """count convex combinations lambda x[a] + (1 - lambda) x[b] of random pairs of rows of x, lambda uniform in [0, 1]."""
    if not x.is_floating_point():
        raise CompressError(f"distillation mix: inputs of dtype {x.dtype} cannot be mixed; "
                            "mix floating inputs only (drop distill_mix for token ids)")
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(len(x), (count,), generator=g)
    b = torch.randint(len(x), (count,), generator=g)
    lam = torch.rand(count, generator=g, dtype=x.dtype).reshape(-1, *[1] * (x.dim() - 1))
    return torch.lerp(x[b], x[a], lam)


def distill_task(teacher: nn.Module, inputs: Tensor | Iterable[Tensor], *, loss: str = "mse",
                 temperature: float = 1.0, val_fraction: float = 0.125, seed: int = 0,
                 batch_size: int = 256, mix: int = 0, name: str = "distill") -> Task:
    """A Task on unlabeled inputs whose targets are teacher(x): loss 'mse' (or 'kl' for logits), metric negative MSE (or agreement).

    inputs: a batch-first tensor or an iterable of such batches (concatenated). A fraction
    val_fraction of the rows (seeded) is held out as validation and test split (0: validate on
    the training rows). mix: add this many mixed inputs per training input (mixed_inputs),
    labelled by the teacher. A student with structured outputs is trained wrapped in FlatOutputs.
    """
    DistillLoss(loss, temperature)
    if isinstance(mix, bool) or not isinstance(mix, int) or mix < 0:
        raise CompressError(f"distillation mix {mix!r}: must be a non-negative whole number, e.g. 8")
    if not (isinstance(val_fraction, int | float) and 0 <= val_fraction < 1):
        raise CompressError(f"val_fraction {val_fraction!r}: must be in [0, 1), e.g. 0.125")
    batches = as_batches(inputs, batch_size)
    if not all(isinstance(b, Tensor) for b in batches):
        raise CompressError("distillation inputs: batches must be tensors (the training loop calls "
                            "model(x)); wrap a keyword-input model in a module taking one tensor")
    try:
        x = torch.cat([b.detach().cpu() for b in batches])
    except RuntimeError:
        shapes = sorted({tuple(b.shape[1:]) for b in batches})
        raise CompressError(f"distillation inputs: batches of different shapes {shapes[:3]}; "
                            "give batches of one example shape") from None
    targets = teacher_targets(teacher, x, loss, batch_size)
    n = len(x)
    n_val = min(int(round(val_fraction * n)), n - 1) if val_fraction > 0 else 0
    if val_fraction > 0 and n_val < 1:
        raise CompressError(f"distillation inputs: {n} example(s) leave none to validate on; "
                            "give more inputs or val_fraction=0")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if n_val:
        val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
        train, val = (x[train_idx], targets[train_idx]), (x[val_idx], targets[val_idx])
    else:
        train = val = (x, targets)
    if mix:
        extra = mixed_inputs(train[0], mix * len(train[0]), seed + 1)
        train = (torch.cat([train[0], extra]),
                 torch.cat([train[1], teacher_targets(teacher, extra, loss, batch_size)]))
    metric = negative_mse if loss == "mse" else agreement
    return Task(name, train, val, val, loss=DistillLoss(loss, temperature), metric=metric,
                example_input=x[:8])
