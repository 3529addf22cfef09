"""The one library entry point for files: a model file in, a .dcz out, a Report back.

The CLI's `compress` only parses flags into a CompressConfig and prints what this returns.
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .budget import Choice, RatePoints, choose_bits, choose_bits_for_error, rate_points, shared_at
from .calibrated import compress_calibrated
from .calibration import as_batches, check_runs, read_calibration
from .errors import CompressError
from .formats.readers import iter_safetensors, read_model
from .inputs import build_model
from .io import export_program, program_bytes, save
from .pipeline import (
    CompressConfig,
    LayerRow,
    Report,
    Stage,
    compress,
    compress_tensors,
    prune_tensor,
    share_config,
)
from .tasks import Task


def compress_file(src: str | os.PathLike, dst: str | os.PathLike,
                  config: CompressConfig | None = None, task: Task | None = None, *,
                  arch: str | Callable[[], nn.Module] | None = None, unsafe_pickle: bool = False,
                  architecture: bool = True, metadata: Mapping | None = None,
                  calib: str | list | None = None, example_input: str | None = None) -> Report:
    """Compress the model file src (.pt/.pth state_dict, .safetensors, .pt2) into the .dcz dst.

    With a task: the full pipeline (prune and retrain, share and fine-tune) on a model built
    from `arch` (a 'module:factory' spec or a callable), else the task's model, else a pickled
    module allowed by `unsafe_pickle`; the architecture is embedded unless `architecture` is
    False. With `calib` instead (a file of unlabeled example inputs, a 'module:factory' of
    batches, or a list of batches; see calibration.read_calibration): layer-wise compression of
    the runnable model (deepcompress.calibrated), its architecture exported with a calibration
    batch. Without either: data-free, tensor by tensor (safetensors streamed from disk), the
    file's own program kept, or with `example_input` (a file as calib) and `arch` the
    architecture exported with it. dst appears whole or not at all. Returns the report; its
    last stage holds the file's bytes and the whole run's seconds.
    """
    config = config or CompressConfig()
    started = time.perf_counter()
    meta = {"settings": _changed(config), "task": task.name if task is not None else None,
            **dict(metadata or {})}
    if task is not None and calib is not None:
        raise CompressError("give a task or calibration inputs, not both (a task already has "
                            "data to retrain on)")
    if task is not None:
        report, size = _with_task(Path(src), Path(dst), config, task, arch, unsafe_pickle,
                                  architecture, meta)
    elif calib is not None:
        report, size = _calibrated(Path(src), Path(dst), config, calib, arch, unsafe_pickle,
                                   architecture, meta)
    else:
        report, size = _data_free(Path(src), Path(dst), config, arch, unsafe_pickle,
                                  architecture, meta, example_input)
    report.stages[-1].bytes = size
    report.stages[-1].seconds = time.perf_counter() - started
    report.output = str(dst)
    report.peak_memory = _peak_rss()
    return report


def _peak_rss() -> int | None:
    """Peak resident memory of this process in bytes (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _changed(config: CompressConfig) -> dict:
    """The settings that differ from the defaults (what the file's metadata records)."""
    defaults = CompressConfig()
    return {k: v for k, v in vars(config).items() if k != "quiet" and v != getattr(defaults, k)}


def _bar(total: int | None, quiet: bool, desc: str) -> tqdm:
    return tqdm(total=total, disable=quiet, desc=desc, unit="tensor", leave=False)


def _model(src: Path, task: Task | None, arch: str | Callable[[], nn.Module] | None,
           unsafe_pickle: bool) -> nn.Module | None:
    model_file = read_model(src, unsafe_pickle=unsafe_pickle)
    return build_model(model_file, task, arch)


def _with_task(src: Path, dst: Path, config: CompressConfig, task: Task,
               arch: str | Callable[[], nn.Module] | None, unsafe_pickle: bool,
               architecture: bool, meta: dict) -> tuple[Report, int]:
    model = _model(src, task, arch, unsafe_pickle)
    if model is None:
        raise CompressError(f"task {task.name}: has no model to build; pass --arch module:factory")
    model, report = compress(model.to(config.device), task, config)
    model = model.cpu()
    program = export_program(model, task.example_input) if architecture else None
    final = report.stages[-1]
    meta.update(val_metric=final.val_metric, test_metric=final.test_metric)
    with _bar(len(model.state_dict()), config.quiet, "encode") as bar:
        size = save(model, dst, meta, program=program, on_tensor=lambda *_: bar.update(1))
    return report, size


def _example(spec: str) -> object:
    """A small example input from a calibration-style file: two rows of its first batch."""
    first = read_calibration(spec)[0]
    if isinstance(first, Mapping):
        return {k: v[:2] for k, v in first.items()}
    return first[:2] if isinstance(first, torch.Tensor) else first


def _calibrated(src: Path, dst: Path, config: CompressConfig, calib: str | list,
                arch: str | Callable[[], nn.Module] | None, unsafe_pickle: bool,
                architecture: bool, meta: dict) -> tuple[Report, int]:
    model = _model(src, None, arch, unsafe_pickle)
    if model is None:
        raise CompressError(f"{src}: calibration needs a module to run; pass --arch "
                            "module:factory (or file.py:factory) that builds the model")
    spec = calib if isinstance(calib, str) else "calibration inputs"
    batches = read_calibration(calib, config.batch_size) if isinstance(calib, str) else as_batches(calib)
    check_runs(model, batches, spec)
    program = None
    if architecture:  # exported before compressing (weightless: the same program), so that a
        first = batches[0]  # size target counts its bytes
        program = export_program(model, {k: v[:2] for k, v in first.items()}
                                 if isinstance(first, Mapping) else first[:2])
    model, report = compress_calibrated(model.to(config.device), batches, config,
                                        reserved=program_bytes(program))
    model = model.cpu()
    meta.update(calibration_output_error=report.stages[-1].output_error)
    with _bar(len(model.state_dict()), config.quiet, "encode") as bar:
        size = save(model, dst, meta, program=program, on_tensor=lambda *_: bar.update(1))
    return report, size


def _data_free(src: Path, dst: Path, config: CompressConfig,
               arch: str | Callable[[], nn.Module] | None, unsafe_pickle: bool,
               architecture: bool, meta: dict, example_input: str | None = None
               ) -> tuple[Report, int]:
    """Tensor by tensor, without retraining; safetensors are streamed from disk."""
    streamed = (src.name.endswith((".safetensors", ".safetensors.index.json"))
                and example_input is None)
    model_file = None if streamed else read_model(src, unsafe_pickle=unsafe_pickle)
    exported = None
    if model_file is not None and arch is not None:
        dense = build_model(model_file, None, arch)  # checks that the weights fit the architecture
        if example_input is not None and architecture:  # the program holds no weights: the
            exported = export_program(dense, _example(example_input))  # dense model's will do
            if exported is None:
                raise CompressError(f"{example_input}: the model does not export with this input "
                                    "into a program a .dcz can hold; drop --example-input")
    elif example_input is not None:
        raise CompressError("--example-input: needs --arch module:factory to build the model")
    if streamed:
        if not src.is_file():
            raise CompressError(f"{src}: no such file; check the path")
        items, count = iter_safetensors(src), None
    else:
        items, count = model_file.tensors.items(), len(model_file.tensors)
    dense = 0

    def counted():
        nonlocal dense
        for name, tensor in items:
            dense += 4 * tensor.numel()
            yield name, tensor

    rows: list[LayerRow] = []
    program = exported or (model_file.program if model_file is not None and architecture else None)
    if config.has_target:
        tensors = model_file.tensors if model_file is not None else dict(iter_safetensors(src))
        return _to_target(tensors, dst, config, meta, program)
    if config.bits is None:  # the default: the weight-error target, in two passes over the file
        return _to_error((lambda: iter_safetensors(src)) if streamed
                         else model_file.tensors.items, dst, config, meta, program)
    stream = compress_tensors(counted(), config, rows)  # checks the settings before any work
    with _bar(count, config.quiet, "compress") as bar:
        size = save(stream, dst, meta, program=program, on_tensor=lambda *_: bar.update(1))
    weights = sum(r.weights for r in rows)
    nonzero = sum(r.nonzero for r in rows)
    report = Report(stages=[Stage("dense", None, None, weights, weights, dense, 0.0),
                            Stage("shared", None, None, weights, nonzero, size, 0.0)],
                    layers=rows, config=vars(config))
    return report, size


def _to_target(tensors: dict[str, torch.Tensor], dst: Path, config: CompressConfig, meta: dict,
               program: object | None) -> tuple[Report, int]:
    """Data-free to a size: prune if asked, then per-tensor bits from the coded bytes of every
    choice (deepcompress.budget); if the header pushes the file over, the tensors get less."""
    dense = 4 * sum(t.numel() for t in tensors.values())
    target = config.target_bytes or int(dense / config.target_ratio)
    if isinstance(config.sparsity, dict):
        raise CompressError("per-layer sparsity needs a model; without a task give one number")
    pruned = {n: prune_tensor(t, config) for n, t in tensors.items()}
    init = share_config(config, with_task=False).init
    rate = rate_points(pruned, init, config.seed, config.quiet)
    room = target - 64 - 48 * len(tensors)  # preamble, trailer and about a header record each
    for _ in range(3):
        choices = choose_bits(rate, room)
        bits = {c.name: c.bits for c in choices}
        stream = ((n, shared_at(t, bits[n], init, config.seed) if n in bits else t)
                  for n, t in pruned.items())
        size = save(stream, dst, {**meta, "target_bytes": target}, program=program)
        if size <= target:
            break
        room -= size - target
    return _budget_report(rate, choices, size, config), size


def _to_error(items: Callable[[], Iterable[tuple[str, torch.Tensor]]], dst: Path,
              config: CompressConfig, meta: dict, program: object | None) -> tuple[Report, int]:
    """Data-free to the weight-error target: every tensor's rate-distortion points in a first
    pass, the chosen widths in a second (one tensor in memory at a time)."""
    if isinstance(config.sparsity, dict):
        raise CompressError("per-layer sparsity needs a model; without a task give one number")
    init = share_config(config, with_task=False).init

    def pruned() -> Iterator[tuple[str, torch.Tensor]]:
        return ((n, prune_tensor(t, config)) for n, t in items())

    rate = rate_points(pruned(), init, config.seed, config.quiet)
    choices = choose_bits_for_error(rate, config.max_weight_error)
    bits = {c.name: c.bits for c in choices}
    stream = ((n, shared_at(t, bits[n], init, config.seed) if n in bits else t)
              for n, t in pruned())
    size = save(stream, dst, {**meta, "max_weight_error": config.max_weight_error},
                program=program)
    return _budget_report(rate, choices, size, config), size


def _budget_report(rate: RatePoints, choices: list[Choice], size: int,
                   config: CompressConfig) -> Report:
    by_name = {c.name: c for c in choices}
    rows = []
    for n, (numel, nonzero) in rate.shapes.items():
        c = by_name.get(n)
        rows.append(LayerRow(n, numel, nonzero, 1 << c.bits if c else 0,
                             c.rel_error ** 0.5 if c else None,
                             -10 * math.log10(c.rel_error) if c and c.rel_error > 0 else None))
    weights = sum(r.weights for r in rows)
    return Report(stages=[Stage("dense", None, None, weights, weights, 4 * weights, 0.0),
                          Stage("shared", None, None, weights, sum(r.nonzero for r in rows), size,
                                0.0)],
                  layers=rows, config=vars(config))
