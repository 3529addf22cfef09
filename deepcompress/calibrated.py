"""Compression of a pretrained model from unlabeled calibration inputs (no task, no labels).

Layer by layer, block by block (deepcompress.layerwise): prune by OBS saliency with the
surviving weights compensated, then round onto the layer's H-weighted k-means codebook with GPTQ
error feedback; tensors outside Linear/Conv layers that the one sharing rule covers (embeddings)
are shared data-free. With distillation (deepcompress.distill: the original model's outputs on
the calibration inputs as the labels), the paper's retraining: the layers are pruned first, the
survivors retrained under their masks, then shared, and the codebooks fine-tuned.

With a size target instead of sparsity and bits, each layer's sparsity and bits come from a
budget: every layer is tried alone at each (sparsity, bits) of a grid, magnitude-pruned and
k-means-shared (a quick, pessimistic stand-in for the layer-wise solve), its coded bytes
measured and the model's output error on the first calibration inputs; then the cheapest error
per byte is taken layer by layer (budget.descend over each layer's lower convex hull, errors
summed) until the file fits, and the chosen settings go to the layer-wise solve, which reports
each layer's coded bytes as it is done so that the layers after it are chosen again for the
bytes left (RatePlan).
"""
from __future__ import annotations

import copy
import glob
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from .budget import descend, hull, shared_at
from .calibration import Batch, floating_outputs, run_model
from .distill import distill_task
from .errors import CompressError
from .formats import codec, dcz
from .layerwise import _layer_sparsity, _selected, compress_layerwise
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
from .prune import layer_stats, sparsity_mask
from .quantize import share_biases, share_weights
from .tasks import Task
from .train import fit

DISTILL_LR = 1e-3  # Adam's, unless config.finetune_lr says otherwise
BUDGET_SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95)  # the grid a size target chooses
BUDGET_BITS = (2, 3, 4, 5, 6)  # from, per layer
BUDGET_INPUTS = 16  # calibration inputs each candidate's output error is measured on


def _outputs(model: nn.Module, batches: list[Batch]) -> list[list[torch.Tensor]]:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [floating_outputs(run_model(model, batch)) for batch in batches]
    finally:
        model.train(was)


def _relative(got: list[list[torch.Tensor]], want: list[list[torch.Tensor]]) -> float:
    num = den = 0.0
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            num += float(((a.double() - b.double()) ** 2).sum())
            den += float((b.double() ** 2).sum())
    return num / den if den else 0.0


def output_error(model: nn.Module, reference: nn.Module, batches: list[Batch]) -> float:
    """sum ||model(x) - reference(x)||^2 / sum ||reference(x)||^2 over every floating output."""
    return _relative(_outputs(model, batches), _outputs(reference, batches))


@dataclass
class LayerChoice:
    """One layer's settings chosen for a size target: the bytes and output error the grid
    measured for them, and the bytes the layer took once solved."""

    layer: str
    sparsity: float
    bits: int
    bytes: int
    error: float
    coded: int | None = None


def _first(batches: list[Batch], n: int) -> list[Batch]:
    """The batches holding the first n inputs (the last one cut)."""
    def cut(batch: Batch, k: int) -> Batch:
        if isinstance(batch, Mapping):
            return {key: v[:k] for key, v in batch.items()}
        return tuple(v[:k] for v in batch) if isinstance(batch, tuple) else batch[:k]

    out, have = [], 0
    for batch in batches:
        if have >= n:
            break
        first = (next(iter(batch.values())) if isinstance(batch, Mapping)
                 else batch[0] if isinstance(batch, tuple) else batch)
        take = min(len(first), n - have)
        out.append(cut(batch, take))
        have += take
    return out


def _grid(model: nn.Module, batches: list[Batch], config: CompressConfig
          ) -> dict[str, list[tuple[tuple[float, int], int, float]]]:
    """Each Linear/Conv layer's ((sparsity, bits), coded bytes, output error) at every point of
    the grid, the layer tried alone (magnitude pruning and k-means) on the first BUDGET_INPUTS
    calibration inputs; a given sparsity (one fraction or per layer) is kept and only bits vary."""
    from tqdm import tqdm

    layers = _selected(model, ("*",), (), 0)
    sample = _first(batches, BUDGET_INPUTS)
    want = _outputs(model, sample)
    sc = share_config(config, with_task=False)
    points: dict[str, list[tuple[tuple[float, int], int, float]]] = {}

    def sparsities(name: str) -> tuple[float, ...]:
        return (BUDGET_SPARSITIES if config.sparsity is None
                else (_layer_sparsity(name, config.sparsity),))

    total = sum(len(sparsities(n)) * len(BUDGET_BITS) for n in layers)
    bar = tqdm(total=total, disable=config.quiet, desc="budget", unit="setting", leave=False)
    for name, module in layers.items():
        w0 = module.weight.detach().clone()
        options = []
        try:
            for s in sparsities(name):
                pruned = torch.where(sparsity_mask(w0, s).bool(), w0, 0.0) if s > 0 else w0
                for b in BUDGET_BITS:
                    q = shared_at(pruned, b, sc.init, config.seed)
                    with torch.no_grad():
                        module.weight.copy_(q)
                    options.append(((s, b), codec.encode_tensor(q).nbytes,
                                    _relative(_outputs(model, sample), want)))
                    bar.update(1)
        finally:
            with torch.no_grad():
                module.weight.copy_(w0)
        points[name] = options
    bar.close()
    return points


def _at_bytes(column: list[tuple[float, int, float]], want: float) -> tuple[float, float, float] | None:
    """(sparsity, bytes, error) of a layer at one bit width taking `want` bytes, from its grid
    points (sparsity, bytes, error) at that width: linear in sparsity between the two that
    bracket `want`, the densest point if even it takes less, None if even the sparsest takes
    more or the bracket starts at sparsity 0 (there a few zeros cost bytes, one more symbol in
    the dense layout, rather than save them: CREPE's classifier at 14% took 20% more than
    planned)."""
    column = sorted(column)
    if not column or column[-1][1] > want:
        return None
    if column[0][1] <= want:
        return float(column[0][0]), float(column[0][1]), column[0][2]
    for (s0, b0, e0), (s1, b1, e1) in zip(column, column[1:], strict=False):
        if b0 > want >= b1:
            if s0 == 0:
                return None
            f = (b0 - want) / (b0 - b1)
            return round(s0 + f * (s1 - s0), 4), float(want), e0 + f * (e1 - e0)
    return None


class RatePlan:
    """Per-layer (sparsity, bits) for a file size, re-planned as the layer-wise solve goes (a
    rate controller's feedback): after each layer, the layers not yet solved are chosen again
    for the bytes left, their grid bytes scaled by how far the solved layers' coded bytes ran
    from their plan (the solve codes to other bytes than the grid's stand-in). Every plan aims
    `headroom` (a fraction) under the target: the layer solved last has none after it to absorb
    its overrun. The choice is made on each layer's lower convex hull of the grid; the room it
    leaves under the aim (less than any step) then goes to the one layer not yet solved and the
    bit width where it lowers the error most, at the sparsity where that layer takes its bytes
    plus the room (bytes and error taken as linear in sparsity between two grid points)."""

    def __init__(self, grid: dict[str, list[tuple[tuple[float, int], int, float]]], fixed: int,
                 target_bytes: int, headroom: float = 0.01, interpolate: bool = True):
        self.grid, self.fixed, self.target = grid, fixed, target_bytes
        self.points = {n: hull(p) for n, p in grid.items()}
        self.aim = int(target_bytes * (1 - headroom))
        at = descend(self.points, fixed, self.aim)
        if at is None:  # no room for the headroom: aim at the target itself
            self.aim = target_bytes
            at = descend(self.points, fixed, self.aim)
        if at is None:
            floor = fixed + sum(p[0][1] for p in self.points.values())
            raise CompressError(f"target {target_bytes} B: the smallest settings tried (the most "
                                f"sparsity, {min(BUDGET_BITS)} bits) take {floor} B; ask for a "
                                "larger file")
        self.at = at
        self.coded: dict[str, int] = {}
        self.expect: dict[str, float] = {}  # each layer's grid bytes as published
        self.estimate: dict[str, float] = {}  # and its grid error
        self.scale = 1.0  # coded / expected bytes of the layers solved so far
        self.interpolate = interpolate  # off when the layers are pruned before the plan's last word
        self.sparsity: dict[str, float] = {}  # read by compress_layerwise as each layer comes
        self.bits: dict[str, int] = {}
        self._publish()

    def _publish(self) -> None:
        left = [n for n in self.at if n not in self.coded]
        for name in left:
            (s, b), nbytes, _ = self.points[name][self.at[name]]
            self.sparsity[glob.escape(name)], self.bits[glob.escape(name)] = s, b
            self.expect[name], self.estimate[name] = nbytes, self.points[name][self.at[name]][2]
        if not self.interpolate:
            return
        spent = self.fixed + sum(self.coded.values()) + self.scale * sum(self.expect[n] for n in left)
        room = (self.aim - spent) / self.scale  # in grid bytes
        best = None  # (error saved, layer, sparsity, bits, grid bytes)
        for name in left:
            _, nbytes, err = self.points[name][self.at[name]]
            for bits in {b for (_, b), _, _ in self.grid[name]}:
                got = _at_bytes([(s, nb, e) for (s, b), nb, e in self.grid[name] if b == bits],
                                nbytes + room)
                if got is not None and got[1] > nbytes and (best is None or err - got[2] > best[0]):
                    best = (err - got[2], name, got[0], bits, got[1])
        if best is not None and best[0] > 0:
            _, name, sparsity, bits, nbytes = best
            self.sparsity[glob.escape(name)], self.bits[glob.escape(name)] = sparsity, bits
            self.expect[name], self.estimate[name] = nbytes, self.estimate[name] - best[0]

    def solved(self, layer: str, weight: torch.Tensor) -> None:
        """Record a solved layer's coded bytes and choose the remaining layers again."""
        self.coded[layer] = codec.encode_tensor(weight.detach()).nbytes
        left = {n: p for n, p in self.points.items() if n not in self.coded}
        if not left:
            return
        planned = sum(self.expect[n] for n in self.coded)
        self.scale = sum(self.coded.values()) / planned if planned else 1.0
        scaled = {n: [(s, max(1, round(b * self.scale)), e) for s, b, e in p] for n, p in left.items()}
        at = descend(scaled, self.fixed + sum(self.coded.values()), self.aim)
        self.at.update(at if at is not None else dict.fromkeys(left, 0))
        self._publish()

    def keep_sparsity(self) -> None:
        """From now on re-plan only the bits: each layer keeps the sparsity chosen so far (its
        weights were pruned, and retrained, at it), its points the grid's at that sparsity."""
        chosen = {n: self.points[n][i][0] for n, i in self.at.items()}
        self.interpolate = False
        self.points = {n: hull([pt for pt in self.grid[n] if pt[0][0] == chosen[n][0]])
                       for n in self.points}
        self.at = {n: [pt[0] for pt in self.points[n]].index(chosen[n]) for n in self.at}

    def choices(self) -> list[LayerChoice]:
        """Each layer's final settings, planned bytes and error, and coded bytes once solved."""
        return [LayerChoice(n, self.sparsity[glob.escape(n)], self.bits[glob.escape(n)],
                            round(self.expect[n]), self.estimate[n], coded=self.coded.get(n))
                for n in self.at]


def plan_layers(model: nn.Module, batches: list[Batch], target_bytes: int,
                config: CompressConfig, reserved: int = 0, interpolate: bool = True) -> RatePlan:
    """The (sparsity, bits) per Linear/Conv layer whose coded bytes, with the rest of the
    model's, fit target_bytes at the least summed output error (every layer measured alone on a
    grid, see _grid); `reserved` bytes of the file go to something else (an embedded program)."""
    names = {f"{n}.weight" for n in _selected(model, ("*",), (), 0)}
    rest = {k: v for k, v in model.state_dict().items() if k not in names}
    return RatePlan(_grid(model, batches, config), dcz.encoded_size(rest) + reserved, target_bytes,
                    interpolate=interpolate)


def _stage(name: str, model: nn.Module, reference: list[list[torch.Tensor]] | None,
           batches: list[Batch], started: float, size: int | None = None) -> Stage:
    """The stage's figures; reference None: the model is the original (output error 0)."""
    stats = layer_stats(model)
    weights = sum(s.total for s in stats)
    nonzero = sum(s.nonzero for s in stats)
    size = size if size is not None else dcz.encoded_size(model.state_dict())
    return Stage(name, None, None, weights, nonzero, size, time.perf_counter() - started,
                 _relative(_outputs(model, batches), reference) if reference is not None else 0.0)


def _prunes(sparsity: float | dict[str, float] | None) -> bool:
    values = sparsity.values() if isinstance(sparsity, dict) else [sparsity or 0.0]
    return any(v > 0 for v in values)


def _retrain(model: nn.Module, task: Task, config: CompressConfig) -> None:
    """Train on the teacher's outputs with Adam (MSE on raw outputs such as logits has a scale
    that SGD at the retraining rate diverges on): the survivors of a pruning under its masks, or
    the codebooks of shared weights; fit keeps the best validation epoch, or the model as it
    was if no epoch beats it."""
    fit(model, task, _train_config(config, epochs=config.distill_epochs,
                                   lr=config.finetune_lr or DISTILL_LR, optimizer="adam",
                                   weight_decay=0.0))


def compress_calibrated(model: nn.Module, batches: list[Batch],
                        config: CompressConfig | None = None, reserved: int = 0
                        ) -> tuple[nn.Module, Report]:
    """Prune (config.sparsity, per layer) and share (config.bits) model in place from calibration
    batches, or to config's size target (less `reserved` bytes the file spends elsewhere); with
    config.distill_epochs, retrain on the original's outputs after pruning and after sharing
    (biases then shared at config.bias_bits too, as with a task); returns the baked model and
    the report."""
    config = config or CompressConfig()
    if config.quality is not None:
        raise CompressError("quality: the std rule has no calibrated form; give --sparsity with --calib")
    report = Report(config=vars(config).copy())
    t0 = time.perf_counter()
    # the original's outputs are what errors are measured against; the original itself is kept
    # only to distill from (a second copy of the weights)
    teacher = copy.deepcopy(model).eval() if config.distill_epochs else None
    reference = _outputs(model, batches)
    report.stages.append(_stage("dense", model, None, batches, t0,
                                size=_fp32_bytes(model.state_dict())))
    sc = share_config(config, with_task=False)
    t = time.perf_counter()
    sparsity, bits, solved = config.sparsity, sc.bits, None
    if config.has_target:
        target = config.target_bytes or int(_fp32_bytes(model.state_dict()) / config.target_ratio)
        # distillation prunes every layer first, at the plan's grid sparsities (keep_sparsity
        # then re-plans the bits on the grid at those): no sparsity between the grid's
        plan = plan_layers(model, batches, target, config, reserved,
                           interpolate=not config.distill_epochs)
        sparsity, bits, solved = plan.sparsity, plan.bits, plan.solved
    task = (distill_task(teacher, batches, batch_size=config.batch_size, seed=config.seed,
                         mix=config.distill_mix)
            if teacher is not None else None)
    pruning = []
    if task is not None and _prunes(sparsity):
        # the paper's order: prune, retrain the survivors under their masks, then share
        pruning = compress_layerwise(model, batches, sparsity, None, min_weights=0,
                                     quiet=config.quiet)
        _retrain(model, task, config)
        if config.has_target:
            plan.keep_sparsity()
        sparsity = None  # the layers keep their masks' zeros
    results = compress_layerwise(model, batches, sparsity, bits, init=sc.init, min_weights=0,
                                 quiet=config.quiet, on_layer=solved)
    if pruning:  # each layer's pruning error from the pass that pruned it (the sharing pass's
        # error is then against the retrained weights it was given)
        pruned_by = {r.layer: r.prune_error for r in pruning}
        results = [replace(r, prune_error=pruned_by.get(r.layer, r.prune_error)) for r in results]
    if config.has_target:
        report.budget = plan.choices()
    share_weights(model, sc)  # the shareable tensors outside Linear/Conv layers (embeddings)
    if task is not None:
        if config.bias_bits is not None:  # as with any task: biases shared, then fine-tuned
            share_biases(model, config.bias_bits, sc.init, config.seed)
        _retrain(model, task, config)  # the codebooks
    bake(model)
    report.stages.append(_stage("shared", model, reference, batches, t))
    by_layer = {f"{r.layer}.weight": r for r in results}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            r = by_layer.get(name)
            report.layers.append(LayerRow(name, tensor.numel(), int(torch.count_nonzero(tensor)),
                                          r.clusters if r else 0,
                                          output_error=r.error if r else None))
    return model, report
