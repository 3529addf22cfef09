"""Distillation: a teacher and unlabeled inputs make a Task the existing training loop runs on."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from deepcompress.distill import DistillLoss, FlatOutputs, distill_task, flatten_outputs
from deepcompress.errors import CompressError
from deepcompress.prune import PruneConfig, masks_of, prune
from deepcompress.train import TrainConfig, evaluate, fit


def teacher() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))


def inputs() -> torch.Tensor:
    return torch.randn(320, 12, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_distillation_trains_pruned_student_toward_teacher(loss: str) -> None:
    model = teacher()
    task = distill_task(model, list(inputs().split(64)), loss=loss)
    assert task.size("train") == 280 and task.size("val") == 40
    student = copy.deepcopy(model)
    prune(student, PruneConfig(sparsity=0.8, min_weights=0))
    x = inputs()
    with torch.no_grad():
        target = model(x)
        before = float(((student(x) - target) ** 2).mean())
    metric_before = evaluate(student, task, "val")
    fit(student, task, TrainConfig(epochs=4, lr=5e-3, optimizer="adam", batch_size=40, quiet=True))
    with torch.no_grad():
        after = float(((student(x) - target) ** 2).mean())
    assert after < 0.6 * before
    assert evaluate(student, task, "val") > metric_before
    for name, mask in masks_of(student).items():  # masked retraining: pruned weights stay zero
        assert torch.all(dict(student.named_modules())[name].weight[mask == 0] == 0)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> dict:
        h = self.body(x)
        return {"a": h[:, :3], "b": (h[:, 3:], x.argmax(1))}


def test_structured_outputs_and_bad_input() -> None:
    model = TwoHeads()
    task = distill_task(model, torch.randn(50, 4), val_fraction=0.2)
    x, y = task.val
    assert y.shape == (10, 8)
    wrapped = FlatOutputs(copy.deepcopy(model))
    assert evaluate(wrapped, task, "val") == pytest.approx(0.0, abs=1e-12)  # identical: -MSE is 0
    assert flatten_outputs(model(x)).shape == (10, 8)
    with pytest.raises(CompressError, match="not one logits tensor"):
        distill_task(model, torch.randn(50, 4), loss="kl")
    with pytest.raises(CompressError, match="unknown"):
        DistillLoss("l1")
    with pytest.raises(CompressError, match="must be tensors"):
        distill_task(model, [{"x": torch.randn(3, 4)}])
    with pytest.raises(CompressError, match="different shapes"):
        distill_task(model, [torch.randn(3, 4), torch.randn(3, 5)])
    with pytest.raises(CompressError, match="none to validate"):
        distill_task(model, torch.randn(1, 4))


def test_pipeline_stages_run_on_a_distillation_task() -> None:
    from deepcompress.pipeline import CompressConfig, compress

    model = teacher()
    task = distill_task(model, inputs())
    student, report = compress(copy.deepcopy(model), task, CompressConfig(
        sparsity=0.7, schedule="oneshot", prune_epochs=2, finetune_epochs=1, bits=4, min_weights=0,
        quiet=True))
    assert [s.name for s in report.stages] == ["dense", "pruned", "shared"]
    assert report.stages[-1].val_metric is not None and report.stages[-1].val_metric > -1.0
    assert sum(int((m.weight == 0).sum()) for m in student.modules() if isinstance(m, nn.Linear)) > 0


def test_mixed_inputs_are_seeded_convex_combinations_of_pairs() -> None:
    from deepcompress.distill import mixed_inputs

    x = torch.randn(10, 3, 4, generator=torch.Generator().manual_seed(2))
    mixed = mixed_inputs(x, 25, seed=5)
    assert mixed.shape == (25, 3, 4) and torch.equal(mixed, mixed_inputs(x, 25, seed=5))
    assert not torch.equal(mixed, mixed_inputs(x, 25, seed=6))
    # every mixture is lam x_a + (1 - lam) x_b for some pair and one lam in [0, 1]
    flat, rows = mixed.reshape(25, -1), x.reshape(10, -1)
    for m in flat:
        d = rows.unsqueeze(0) - rows.unsqueeze(1)  # x_a - x_b for every pair
        lam = ((m - rows.unsqueeze(1)) * d).sum(-1) / (d * d).sum(-1).clamp_min(1e-12)
        fit = rows.unsqueeze(1) + lam.unsqueeze(-1) * d
        err = (fit - m).abs().amax(-1) + torch.where((lam >= -1e-6) & (lam <= 1 + 1e-6), 0.0, 1.0)
        assert float(err.min()) < 1e-5
    with pytest.raises(CompressError, match="cannot be mixed"):
        mixed_inputs(torch.arange(12).reshape(4, 3), 2)


def test_a_mixed_task_adds_teacher_labelled_mixtures_to_the_training_split_only() -> None:
    model = teacher()
    plain = distill_task(model, inputs())
    task = distill_task(model, inputs(), mix=3)
    assert task.size("train") == 4 * 280 and task.size("val") == 40
    assert torch.equal(task.val[0], plain.val[0]) and torch.equal(task.train[0][:280], plain.train[0])
    with torch.no_grad():
        assert torch.allclose(task.train[1][280:], model(task.train[0][280:]))
    for bad in (-1, True, 1.5):
        with pytest.raises(CompressError, match="non-negative"):
            distill_task(model, inputs(), mix=bad)


def test_mixtures_teach_a_student_the_teacher_away_from_the_few_inputs_given() -> None:
    model = teacher()
    few = torch.randn(24, 12, generator=torch.Generator().manual_seed(3)) * 2
    fresh = torch.randn(500, 12, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(fresh)
    errors = {}
    for mix in (0, 16):
        task = distill_task(model, few, mix=mix, val_fraction=0)
        torch.manual_seed(0)
        student = nn.Sequential(nn.Linear(12, 64), nn.Tanh(), nn.Linear(64, 5))
        fit(student, task, TrainConfig(epochs=40, lr=3e-3, optimizer="adam", batch_size=24, quiet=True))
        with torch.no_grad():
            errors[mix] = float(((student(fresh) - want) ** 2).mean())
    assert errors[16] < 0.7 * errors[0]
