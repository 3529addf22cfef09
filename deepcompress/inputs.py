"""From a model file (and optionally a task or an architecture factory) to a module to train."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .errors import CompressError
from .formats.readers import ModelFile
from .io import load_into
from .tasks import Task, load_object

_HINT = "; pass the matching --arch module:factory"


def build_model(model_file: ModelFile, task: Task | None = None,
                arch: str | Callable[[], nn.Module] | None = None) -> nn.Module | None:
    """A module holding the file's weights: from arch (a 'module:factory' spec or a callable),
    else the task's model, else a pickled module the user allowed; None when none is known."""
    if arch is not None:
        factory = load_object(arch, "--arch") if isinstance(arch, str) else arch
        model = factory()
        if not isinstance(model, nn.Module):
            raise CompressError(f"--arch {arch}: returned {type(model).__name__}, not an nn.Module")
        return load_into(model_file.path, model, model_file.tensors, _HINT)
    if model_file.module is not None:
        return model_file.module
    if task is not None and task.build_model is not None:
        return load_into(model_file.path, task.build_model(), model_file.tensors, _HINT)
    return None
