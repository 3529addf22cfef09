"""Shared steps of the MNIST benchmarks: the dense model and a pruned copy, from the settings
in benchmarks/configs/MODEL.toml (chosen on the validation split)."""

from __future__ import annotations

import copy
import tempfile
import tomllib
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

import deepcompress
from deepcompress.models import lenet5, lenet300
from deepcompress.pipeline import CompressConfig, prune_stage, share_stage
from deepcompress.tasks import Task
from deepcompress.train import TrainConfig, fit

MODELS = {"lenet300": lenet300, "lenet5": lenet5}
CONFIGS = Path(__file__).resolve().parent / "configs"


def settings(model: str) -> dict:
    """The model's benchmark settings."""
    return tomllib.loads((CONFIGS / f"{model}.toml").read_text())


def dense_model(model: str, task: Task, s: dict) -> nn.Module:
    """The dense model trained with the project's own code and the settings' seed."""
    torch.manual_seed(s.get("seed", 0))
    net = MODELS[model]()
    fit(net, task, TrainConfig(**s["dense"], quiet=True))
    return net


def compress_config(s: dict, **changes: object) -> CompressConfig:
    """The settings' pipeline configuration, with changes."""
    return replace(CompressConfig(**s["compress"], quiet=True), **changes)


def pruned_copy(dense: nn.Module, task: Task, config: CompressConfig) -> nn.Module:
    """A pruned (and baked) copy of the dense model."""
    return prune_stage(copy.deepcopy(dense), task, config)


def shared_copy(pruned: nn.Module, task: Task, config: CompressConfig) -> nn.Module:
    """A weight-shared, fine-tuned, baked copy of the pruned model."""
    model = copy.deepcopy(pruned)
    share_stage(model, task, config)
    return model


def dcz_bytes(model: nn.Module) -> int:
    """Size of the model's .dcz (weights only)."""
    with tempfile.TemporaryDirectory() as tmp:
        return deepcompress.save(model, Path(tmp) / "m.dcz")
