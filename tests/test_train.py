"""Training loop: determinism, best-checkpoint restore, the epoch hook, evaluation."""
import copy

import pytest
import torch

from deepcompress.errors import CompressError
from deepcompress.models import digits_mlp
from deepcompress.prune import PruneConfig, prune
from deepcompress.tasks import load_task
from deepcompress.train import TrainConfig, evaluate, fit


@pytest.fixture(scope="module")
def task():
    return load_task("digits")


def fresh():
    torch.manual_seed(0)
    return digits_mlp()


def test_fit_learns_and_reports_history(task):
    model = fresh()
    before = evaluate(model, task, "test")
    history = fit(model, task, TrainConfig(epochs=3, lr=0.05, quiet=True))
    assert [row["epoch"] for row in history] == [0, 1, 2]
    assert history[0]["train_loss"] > history[-1]["train_loss"]
    assert sum(row["best"] for row in history) == 1
    assert evaluate(model, task, "test") > max(before, 0.85)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fit_is_deterministic_for_a_seed(task, optimizer):
    config = TrainConfig(epochs=2, lr=0.01 if optimizer == "adam" else 0.05, optimizer=optimizer,
                         quiet=True, seed=3)
    a, b = fresh(), fresh()
    ha, hb = fit(a, task, config), fit(b, task, config)
    assert ha == hb
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(),
                                                 strict=True))
    c = fresh()
    fit(c, task, TrainConfig(**{**config.__dict__, "seed": 4}))
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


def test_fit_does_not_touch_global_rng(task):
    model = fresh()
    state = torch.get_rng_state()
    fit(model, task, TrainConfig(epochs=1, quiet=True))
    assert torch.equal(torch.get_rng_state(), state)


def test_best_checkpoint_is_restored(task):
    model = fresh()
    snapshots = []

    def spoil(epoch):
        snapshots.append((epoch, copy.deepcopy(model.state_dict())))
        if epoch == 2:  # ruin the model at the last epoch: the best earlier epoch must come back
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()

    history = fit(model, task, TrainConfig(epochs=3, lr=0.05, quiet=True), on_epoch_end=spoil)
    assert history[2]["val_metric"] < 0.2 and not history[2]["best"]
    best = max(range(3), key=lambda i: history[i]["val_metric"])
    assert history[best]["best"]
    assert evaluate(model, task, "val") == pytest.approx(history[best]["val_metric"])


def test_hook_returning_true_resets_best_and_keeps_masks(task):
    model = fresh()
    fit(model, task, TrainConfig(epochs=2, lr=0.05, quiet=True))

    def prune_late(epoch):
        if epoch == 1:
            prune(model, PruneConfig(sparsity=0.95))
            return True
        return False

    history = fit(model, task, TrainConfig(epochs=3, lr=0.05, quiet=True), on_epoch_end=prune_late)
    assert not history[0]["best"]  # the dense epoch is better but no longer comparable
    sparsity = float((model.fc1.weight == 0).float().mean())
    assert sparsity == pytest.approx(0.95, abs=1e-4)


def test_evaluate_splits_and_restores_mode(task):
    model = fresh()
    model.train()
    for split in ("train", "val", "test"):
        assert 0.0 <= evaluate(model, task, split) <= 1.0
    assert model.training
    with pytest.raises(CompressError, match="split"):
        evaluate(model, task, "holdout")


@pytest.mark.parametrize("kwargs", [{"optimizer": "rmsprop"}, {"epochs": -1}, {"lr": 0.0},
                                    {"lr_schedule": "step"}])
def test_bad_train_config(kwargs):
    with pytest.raises(CompressError):
        TrainConfig(**kwargs)


def test_cosine_schedule_anneals(task):
    history = fit(fresh(), task, TrainConfig(epochs=3, lr=0.1, lr_schedule="cosine", quiet=True))
    lrs = [row["lr"] for row in history]
    assert lrs[0] == pytest.approx(0.1) and lrs[0] > lrs[1] > lrs[2]


def test_tasks_over_iterables_of_batches_train_and_evaluate(task):
    """A DataLoader (or a list of batches) is a split: read a batch at a time, never whole."""
    from torch.utils.data import DataLoader, TensorDataset

    from deepcompress.tasks import Task

    seen: list[int] = []

    def metric(logits, y):
        seen.append(len(y))
        return task.metric(logits, y)

    loaders = {name: DataLoader(TensorDataset(*task.split(name)), batch_size=50,
                                shuffle=name == "train",
                                generator=torch.Generator().manual_seed(0))
               for name in ("train", "val")}
    streamed = Task("digits-stream", loaders["train"], loaders["val"],
                    list(zip(task.test[0].split(64), task.test[1].split(64), strict=True)),
                    metric=metric)
    model = fresh()
    history = fit(model, streamed, TrainConfig(epochs=3, lr=0.05, quiet=True))
    assert history[-1]["val_metric"] > 0.8 and max(seen) == 50
    assert evaluate(model, streamed, "test") == pytest.approx(evaluate(model, task, "test"),
                                                             abs=1e-12)
    assert max(seen) == 64
    assert evaluate(model, task, "test", batch_size=7) == pytest.approx(
        evaluate(model, task, "test"), abs=1e-12)


def test_a_one_shot_iterator_is_not_a_split(task):
    from deepcompress.tasks import Task

    with pytest.raises(CompressError, match="re-iterable"):
        Task("once", iter([task.train]), task.val, task.test)


def test_training_that_diverges_gives_back_the_model_as_it_came(task):
    model = fresh()
    fit(model, task, TrainConfig(epochs=2, lr=0.05, quiet=True))
    start = copy.deepcopy(model.state_dict())
    with pytest.warns(RuntimeWarning, match="lower the learning rate"):
        history = fit(model, task, TrainConfig(epochs=3, lr=1e6, quiet=True))  # NaN in an epoch
    assert len(history) < 3 and not any(row["best"] for row in history)
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())
    # and an epoch that is merely worse than the start does not replace it either
    worse = fit(model, task, TrainConfig(epochs=1, lr=2.0, quiet=True))
    assert worse[0]["val_metric"] < evaluate(model, task, "val")
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())


def _step_length(task, **clip) -> float:
    model = fresh()
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    n = task.size("train")  # one step over the whole split, plain SGD
    fit(model, task, TrainConfig(epochs=1, lr=1.0, momentum=0.0, batch_size=n, quiet=True, **clip),
        on_epoch_end=lambda _: True)  # the stepped model is kept even if validation got worse
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return float((after - before).norm())


def test_clip_norm_bounds_each_step(task):
    assert _step_length(task) > 0.05
    assert 0 < _step_length(task, clip_norm=0.01) <= 0.01 * (1 + 1e-5)


def test_clip_norm_must_be_positive():
    with pytest.raises(CompressError, match="clip_norm"):
        TrainConfig(clip_norm=0.0)
