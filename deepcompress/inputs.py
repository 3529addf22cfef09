"""From a model file (and optionally a task or an architecture factory) to a module to train."""

from __future__ import annotations

import torch
from torch import nn

from .errors import CompressError
from .formats.readers import ModelFile
from .tasks import Task, load_object


def _fit_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> nn.Module:
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    mismatched = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or mismatched:
        parts = [f"{label} {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}" for label, v in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
                 if v]
        raise CompressError(f"{source}: does not fit {type(model).__name__} ({'; '.join(parts)});"
                            " pass the matching --arch module:factory")
    model.load_state_dict(tensors, strict=True)
    return model


def build_model(model_file: ModelFile, task: Task | None = None,
                arch: str | None = None) -> nn.Module | None:
    """A module holding the file's weights: from --arch, else the task's model, else a pickled
    module the user allowed; None when no architecture is known."""
    if arch is not None:
        factory = load_object(arch, "--arch")
        model = factory()
        if not isinstance(model, nn.Module):
            raise CompressError(f"--arch {arch}: returned {type(model).__name__}, not an nn.Module")
        return _fit_state(model, model_file.tensors, str(model_file.path))
    if model_file.module is not None:
        return model_file.module
    if task is not None and task.build_model is not None:
        return _fit_state(task.build_model(), model_file.tensors, str(model_file.path))
    return None
