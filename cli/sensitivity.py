"""`dcompress sensitivity`: how much each layer tolerates pruning, without retraining."""
from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from deepcompress import criteria
from deepcompress.errors import CompressError
from deepcompress.formats.readers import read_model
from deepcompress.inputs import build_model
from deepcompress.prune import PruneConfig
from deepcompress.sensitivity import (
    analyze,
    parse_sparsities,
    plot,
    render_table,
    thresholds,
    to_dict,
    tolerated_sparsities,
)
from deepcompress.tasks import load_task


def _load_model(path: str, task, arch: str | None) -> torch.nn.Module:
    """The model in path (any format the readers know), built by --arch or the task's factory."""
    model = build_model(read_model(path), task, arch)
    if model is None:
        raise CompressError(f"task {task.name!r}: has no model factory; pass --arch module:factory")
    return model


@click.command("sensitivity")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--task", "task_spec", required=True,
              help="Task to evaluate on: digits, mnist, or path/to/file.py:factory. Example: --task mnist")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Folder with the task's data files. Example: --data-dir data/mnist")
@click.option("--arch", help="Model factory if not the task's own. Example: --arch deepcompress.models:lenet5")
@click.option("--sparsities", default="0.5,0.6,0.7,0.8,0.9,0.95,0.98", show_default=True,
              help="Comma-separated sparsities to try per layer. Example: --sparsities 0.5,0.9,0.99")
@click.option("--tolerance", type=float, default=0.01, show_default=True,
              help="Metric drop tolerated when suggesting per-layer sparsities. Example: --tolerance 0.005")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table. Example: --json")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also write a PNG line plot (needs matplotlib). Example: --plot sensitivity.png")
@click.option("--criterion", default="magnitude", show_default=True,
              help=f"What ranks the weights: {', '.join(criteria.names())}. Example: --criterion taylor")
@click.option("--quiet", is_flag=True, help="No progress bar. Example: --quiet")
def sensitivity(model_path: str, task_spec: str, data_dir: str | None, arch: str | None,
                sparsities: str, tolerance: float, as_json: bool, plot_path: str | None,
                criterion: str, quiet: bool) -> None:
    """Prune each layer of MODEL (.pt, .safetensors or .pt2) alone and report the validation metric."""
    if not Path(model_path).is_file():
        raise CompressError(f"{model_path}: no such file; pass a model file (.pt, .safetensors, .pt2)")
    if not 0 <= tolerance < 1:
        raise CompressError(f"--tolerance {tolerance}: must be in [0, 1); e.g. 0.01")
    values = parse_sparsities(sparsities)
    config = PruneConfig(criterion=criterion)
    task = load_task(task_spec, data_dir)
    model = _load_model(model_path, task, arch)
    result = analyze(model, task, values, config, quiet=quiet)
    if plot_path:
        plot(result, plot_path)
    chosen = tolerated_sparsities(result, tolerance)
    if as_json:
        data = to_dict(result, tolerance)
        if criteria.get(criterion) is criteria.Magnitude:  # |w| thresholds mean nothing otherwise
            data["thresholds"] = thresholds(model, chosen)
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(render_table(result, tolerance))
