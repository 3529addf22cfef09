"""Compression of a pretrained model from unlabeled calibration inputs (no task, no labels).

Layer by layer, block by block (deepcompress.layerwise): prune by OBS saliency with the
surviving weights compensated, then round onto the layer's H-weighted k-means codebook with GPTQ
error feedback; tensors outside Linear/Conv layers that the one sharing rule covers (embeddings)
are shared data-free. Optionally the codebooks are then fine-tuned against the original model's
outputs (distillation, deepcompress.distill).
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from .calibration import Batch, floating_outputs, run_model
from .distill import distill_task
from .errors import CompressError
from .formats import dcz
from .layerwise import compress_layerwise
from .parametrize import bake
from .pipeline import (
    CompressConfig,
    LayerRow,
    Report,
    Stage,
    _fp32_bytes,
    _train_config,
    share_config,
)
from .prune import layer_stats
from .quantize import share_weights
from .train import evaluate, fit

DISTILL_LR = 1e-3  # Adam's, unless config.finetune_lr says otherwise


def output_error(model: nn.Module, reference: nn.Module, batches: list[Batch]) -> float:
    """sum ||model(x) - reference(x)||^2 / sum ||reference(x)||^2 over every floating output."""
    num = den = 0.0
    was = model.training, reference.training
    model.eval()
    reference.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                got, want = floating_outputs(run_model(model, batch)), floating_outputs(run_model(reference, batch))
                for a, b in zip(got, want, strict=True):
                    num += float(((a.double() - b.double()) ** 2).sum())
                    den += float((b.double() ** 2).sum())
    finally:
        model.train(was[0])
        reference.train(was[1])
    return num / den if den else 0.0


def _stage(name: str, model: nn.Module, teacher: nn.Module, batches: list[Batch], started: float,
           size: int | None = None) -> Stage:
    stats = layer_stats(model)
    weights = sum(s.total for s in stats)
    nonzero = sum(s.nonzero for s in stats)
    size = size if size is not None else dcz.encoded_size(model.state_dict())
    return Stage(name, None, None, weights, nonzero, size, time.perf_counter() - started,
                 output_error(model, teacher, batches))


def _distill(model: nn.Module, teacher: nn.Module, batches: list[Batch],
             config: CompressConfig) -> None:
    """Fine-tune on the teacher's outputs with Adam (MSE on raw outputs such as logits has a
    scale that SGD at the retraining rate diverges on); the best validation epoch is kept, or
    the model as it was if no epoch beats it."""
    task = distill_task(teacher, batches, batch_size=config.batch_size, seed=config.seed)
    start = evaluate(model, task, "val")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history = fit(model, task, _train_config(config, epochs=config.distill_epochs,
                                             lr=config.finetune_lr or DISTILL_LR,
                                             optimizer="adam", weight_decay=0.0))
    if not max(h["val_metric"] for h in history) > start:  # NaN included
        model.load_state_dict(before)


def compress_calibrated(model: nn.Module, batches: list[Batch],
                        config: CompressConfig | None = None) -> tuple[nn.Module, Report]:
    """Prune (config.sparsity, per layer) and share (config.bits) model in place from calibration
    batches, then distill for config.distill_epochs; returns the baked model and the report."""
    config = config or CompressConfig()
    if config.quality is not None:
        raise CompressError("quality: the std rule has no calibrated form; give --sparsity with --calib")
    report = Report(config=vars(config).copy())
    t0 = time.perf_counter()
    teacher = copy.deepcopy(model).eval()
    report.stages.append(_stage("dense", model, teacher, batches, t0,
                                size=_fp32_bytes(model.state_dict())))
    sc = share_config(config, with_task=False)
    t = time.perf_counter()
    results = compress_layerwise(model, batches, config.sparsity, sc.bits, init=sc.init,
                                 min_weights=0, quiet=config.quiet)
    share_weights(model, sc)  # the shareable tensors outside Linear/Conv layers (embeddings)
    if config.distill_epochs:
        _distill(model, teacher, batches, config)
    bake(model)
    report.stages.append(_stage("shared", model, teacher, batches, t))
    by_layer = {f"{r.layer}.weight": r for r in results}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            r = by_layer.get(name)
            report.layers.append(LayerRow(name, tensor.numel(), int(torch.count_nonzero(tensor)),
                                          r.clusters if r else 0,
                                          output_error=r.error if r else None))
    return model, report
