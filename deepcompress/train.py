"""Training loop with best-validation checkpointing, and evaluation of a model on a task split."""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from deepcompress.errors import CompressError
from deepcompress.tasks import Task


@dataclass
class TrainConfig:
    """Hyper-parameters of one call to fit."""

    epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 64
    weight_decay: float = 0.0
    seed: int = 0
    optimizer: str = "sgd"  # 'sgd' (with momentum) or 'adam'
    lr_schedule: str = "constant"  # 'constant' or 'cosine' (annealed to 0 over the epochs)
    quiet: bool = False
    # largest gradient norm a step applies (clip_grad_norm_ over all parameters); None: unclipped
    clip_norm: float | None = None
    # penalty(model) added to every step's loss (deepcompress.regularisers); None trains on the loss alone
    regulariser: Callable[[nn.Module], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise CompressError(f"optimizer {self.optimizer!r}: unknown; use 'sgd' or 'adam'")
        if self.lr_schedule not in ("constant", "cosine"):
            raise CompressError(f"lr_schedule {self.lr_schedule!r}: unknown; use 'constant' or 'cosine'")
        if self.regulariser is not None and not callable(self.regulariser):
            raise CompressError(f"regulariser {self.regulariser!r}: not callable; pass "
                                "deepcompress.regularisers.make(name) or a function of the model")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise CompressError(f"clip_norm {self.clip_norm!r}: must be > 0, e.g. 1.0, or None")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise CompressError(
                f"TrainConfig(epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr}): "
                "need epochs >= 0, batch_size >= 1 and lr > 0"
            )


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    """Build the optimizer named in config over params."""
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _set_mode(model: nn.Module, training: bool) -> None:
    try:
        model.train(training)
    except NotImplementedError:  # torch.export modules are fixed in the mode they were exported in
        pass


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, split: str = "test", batch_size: int = 1000) -> float:
    """Task metric of model on the given split ('train', 'val' or 'test'), in eval mode, one
    batch at a time: the per-example average of the metric's batch means."""
    device = _device(model)
    was_training = model.training
    _set_mode(model, False)
    weighted: list[float] = []
    count = 0
    try:
        for x, y in task.batches(split, batch_size):
            weighted.append(float(task.metric(model(x.to(device)).cpu(), y)) * len(y))
            count += len(y)
    finally:
        _set_mode(model, was_training)
    if count == 0:
        raise CompressError(f"task {task.name}: split {split!r} is empty; give it examples")
    return weighted[0] / count if len(weighted) == 1 else math.fsum(weighted) / count


def fit(
    model: nn.Module,
    task: Task,
    config: TrainConfig,
    on_epoch_end: Callable[[int], bool | None] | None = None,
) -> list[dict]:
    """Train model on task.train, restore the best validation epoch (or the model as it came,
    if no epoch beats it), return per-epoch history. A step whose loss is not finite ends the
    training (every later step would be NaN).

    With config.regulariser, each step minimises loss + regulariser(model); train_loss reports
    the task loss alone.

    on_epoch_end(epoch) runs after each epoch's steps and before validation; if it returns
    True the model was changed (e.g. pruned further), so only later epochs compete for best.
    """
    device = _device(model)
    n = task.size("train")
    history: list[dict] = []
    batches = (math.ceil(n / config.batch_size) if n is not None
               else len(task.train) if hasattr(task.train, "__len__") else None)
    shuffle = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(trained, config)
        schedule = (
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))
            if config.lr_schedule == "cosine" else None
        )
        best_score, best_state, best_epoch = -math.inf, None, None
        if config.epochs:
            best_score = evaluate(model, task, "val")
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        total_steps = config.epochs * batches if batches is not None else None
        with tqdm(total=total_steps, disable=config.quiet, desc=f"train {task.name}",
                  leave=False) as bar:
            diverged = False
            for epoch in range(config.epochs):
                model.train()
                order = torch.randperm(n, generator=shuffle) if n is not None else None
                total, seen = 0.0, 0
                for x, y in task.batches("train", config.batch_size, order):
                    optimizer.zero_grad(set_to_none=True)
                    loss = task.loss(model(x.to(device)), y.to(device))
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        diverged = True
                        warnings.warn(f"train {task.name}: the loss became {value} in epoch "
                                      f"{epoch + 1}; training stopped and the best model so far "
                                      "was kept; lower the learning rate or set clip_norm",
                                      RuntimeWarning,
                                      stacklevel=2)
                        break
                    if config.regulariser is None:
                        loss.backward()
                    else:
                        (loss + config.regulariser(model)).backward()
                    if config.clip_norm is not None:
                        nn.utils.clip_grad_norm_(trained, config.clip_norm)
                    optimizer.step()
                    total += value * len(y)
                    seen += len(y)
                    bar.update(1)
                if diverged:
                    break
                n_epoch = max(seen, 1)
                lr = optimizer.param_groups[0]["lr"]
                if schedule is not None:
                    schedule.step()
                if on_epoch_end is not None and on_epoch_end(epoch):
                    best_score, best_state, best_epoch = -math.inf, None, None
                score = evaluate(model, task, "val")
                history.append({"epoch": epoch, "train_loss": total / n_epoch,
                                "val_metric": score, "lr": lr, "best": False})
                if score > best_score:
                    best_score = score
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    best_epoch = len(history) - 1
                bar.set_postfix(loss=f"{total / n_epoch:.4f}", val=f"{score:.4f}")
        if best_state is not None:
            model.load_state_dict(best_state)
        if best_epoch is not None:
            history[best_epoch]["best"] = True
    return history
