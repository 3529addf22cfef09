"""The three-stage pipeline: prune (with retraining), share weights (with centroid fine-tuning),
then entropy coding by `save`. Without a task there is no retraining, so the data-free path only
prunes when asked and shares with the lowest-error clustering, tensor by tensor."""

from __future__ import annotations

import math
import time
import tomllib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import nn

from . import allocation, criteria, regularisers, schedules
from .bake import bake
from .errors import CompressError
from .formats import dcz
from .kmeans import INITS, cluster_weight
from .parametrize import baked_state_dict
from .prune import PruneConfig, layer_stats, prune, select_layers, sparsity_mask, std_mask
from .quantize import (
    DATA_FREE_BITS,
    DATA_FREE_INIT,
    TASK_BITS,
    TASK_INIT,
    ShareConfig,
    share_biases,
    share_weights,
    shareable,
    weight_error,
)
from .structured import ShrinkReport, shrink
from .tasks import Task
from .train import TrainConfig, evaluate, fit

OLD_CRITERIA = ("global", "layer")  # `criterion` values of old configs, now allocations


@dataclass
class CompressConfig:
    """Every pipeline setting; the keys match the CLI flags (`--prune-epochs` is prune_epochs)."""

    sparsity: float | dict[str, float] | None = None  # global, or {layer pattern: sparsity}
    quality: float | None = None  # the paper's rule: prune |w| < quality * std(w)
    bits: int | str | None = None  # None: conv=8,linear=5 with a task, 8 without (share_config)
    init: str | None = None  # k-means init; None: linear with a task, optimal without
    bias_bits: int | None = 5  # with a task or distillation, biases shared too (fine-tuned); None keeps fp32
    criterion: str = "magnitude"  # what scores weights: magnitude (|w|), taylor (|grad * w|)
    allocation: str | None = None  # global (one threshold), layer (each alike), std (with quality);
    # None: std with quality, global otherwise
    schedule: str = "agp"  # agp (Zhu & Gupta's cubic), iterative (the paper's), oneshot
    rounds: int = 3  # iterative: prune-retrain rounds
    prune_epochs: int = 12  # retraining epochs (iterative: per round)
    agp_initial: float = 0.5  # agp: sparsity at the start
    agp_steps: int | None = None  # agp: epochs over which sparsity rises (None: 40% of them)
    finetune_epochs: int = 4  # centroid fine-tuning epochs
    distill_epochs: int = 0  # with calibration inputs: retraining on the original's outputs
    # (the survivors after pruning, then the codebooks after sharing)
    distill_mix: int = 0  # distillation also on this many mixed inputs per input (distill.py)
    structured: bool = False  # with a task: remove all-zero channels after pruning (structured.py)
    channels: float | None = None  # with a task, first: remove this fraction of every hidden
    channel_criterion: str = "l1_filter"  # layer's neurons/filters, ranked by this, then prune
    # a file size (or fp32 size / file size) to fit: data-free, each tensor's bits are chosen;
    # with calibration, each layer's sparsity and bits (calibrated.choose_layer_settings)
    target_bytes: int | None = None
    target_ratio: float | None = None
    # data-free without bits or a size: per-tensor bits at the fewest bytes whose mean relative
    # squared weight error (||w - q(w)||^2 / ||w||^2, averaged over shared tensors) is at most this
    max_weight_error: float = 0.01
    regulariser: str | None = None  # with a task: slimming, group_lasso (deepcompress.regularisers)
    regulariser_strength: float = 1e-4  # its weight in the loss
    lr: float = 0.01
    finetune_lr: float | None = None  # None: lr / 10
    lr_schedule: str = "cosine"  # or constant
    batch_size: int = 64
    weight_decay: float = 1e-4
    clip_norm: float | None = None  # with a task: largest gradient norm of a training step
    min_weights: int = 1000  # smaller layers stay dense
    seed: int = 0
    device: str = "cpu"  # with a task or calibration: where training and the layer-wise solves run
    quiet: bool = False

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.sparsity is not None and self.quality is not None:
            raise CompressError("give either sparsity or quality, not both")
        if isinstance(self.sparsity, dict):
            for k, v in self.sparsity.items():
                _check_unit(v, f"sparsity for {k!r}")
        elif self.sparsity is not None:
            _check_unit(self.sparsity, "sparsity")
        if self.quality is not None and not (isinstance(self.quality, (int, float))
                                             and self.quality >= 0):
            raise CompressError(f"quality {self.quality!r}: must be a number >= 0, e.g. 1.0")
        if self.criterion in OLD_CRITERIA:
            warnings.warn(f"criterion = {self.criterion!r} is deprecated: write allocation = "
                          f"{self.criterion!r} (criterion now names what scores weights)",
                          FutureWarning, stacklevel=3)
            if self.allocation not in (None, self.criterion):
                raise CompressError(f"criterion {self.criterion!r} (an old allocation) conflicts "
                                    f"with allocation {self.allocation!r}; drop criterion")
            self.criterion, self.allocation = "magnitude", self.criterion
        criteria.get(self.criterion)
        if self.allocation is None:
            self.allocation = "std" if self.quality is not None else "global"
        target = allocation.get(self.allocation).target
        if self.prunes and (target == "quality") != (self.quality is not None):
            raise CompressError(f"allocation {self.allocation!r}: give "
                                f"{'quality' if target == 'quality' else 'sparsity'}, not "
                                f"{'sparsity' if target == 'quality' else 'quality'}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise CompressError(f"lr_schedule {self.lr_schedule!r}: use cosine or constant")
        _check_unit(self.agp_initial, "agp_initial")
        schedules.get(self.schedule)
        if self.channels is not None:
            _check_unit(self.channels, "channels")
        if not getattr(criteria.get(self.channel_criterion), "structured", False):
            raise CompressError(f"channel_criterion {self.channel_criterion!r}: not a structured "
                                "criterion; use l1_filter, fpgm, taylor_filter or apoz")
        if not (isinstance(self.max_weight_error, (int, float))
                and 0 < self.max_weight_error < 1):
            raise CompressError(f"max_weight_error {self.max_weight_error!r}: must be between 0 "
                                "and 1, e.g. 0.01 (a mean SQNR of 20 dB)")
        if self.target_bytes is not None and self.target_ratio is not None:
            raise CompressError("give target_bytes or target_ratio, not both")
        if self.target_bytes is not None and not (isinstance(self.target_bytes, int)
                                                  and self.target_bytes > 0):
            raise CompressError(f"target_bytes {self.target_bytes!r}: must be a positive whole number")
        if self.target_ratio is not None and not (isinstance(self.target_ratio, (int, float))
                                                  and self.target_ratio > 1):
            raise CompressError(f"target_ratio {self.target_ratio!r}: must be above 1, e.g. 20")
        if self.has_target and self.bits is not None:
            raise CompressError("a size target chooses the bits itself; drop bits or the target")
        if self.regulariser is not None:
            regularisers.make(self.regulariser, strength=self.regulariser_strength)
        if self.init is not None and self.init not in INITS:
            raise CompressError(f"init {self.init!r}: use one of {', '.join(INITS)}")
        if self.agp_steps is not None and (not isinstance(self.agp_steps, int)
                                           or not 1 <= self.agp_steps <= self.prune_epochs):
            raise CompressError(f"agp_steps {self.agp_steps!r}: must be 1 to prune_epochs")
        for name in ("rounds", "prune_epochs", "finetune_epochs", "distill_epochs", "distill_mix",
                     "batch_size", "min_weights"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name in ("rounds", "batch_size") else 0):
                raise CompressError(f"{name} {value!r}: must be a non-negative whole number")
        if self.bias_bits is not None and (not isinstance(self.bias_bits, int)
                                           or not 1 <= self.bias_bits <= 8):
            raise CompressError(f"bias_bits {self.bias_bits!r}: must be 1 to 8, or none")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise CompressError(f"lr {self.lr!r}: must be a positive number, e.g. 0.01")
        if self.clip_norm is not None and not (isinstance(self.clip_norm, (int, float))
                                               and self.clip_norm > 0):
            raise CompressError(f"clip_norm {self.clip_norm!r}: must be a positive number, e.g. "
                                "1.0, or none")

    @property
    def has_target(self) -> bool:
        """Whether a file size (or ratio) target chooses the bits."""
        return self.target_bytes is not None or self.target_ratio is not None

    @property
    def prunes(self) -> bool:
        """Whether any pruning was asked for."""
        return self.sparsity is not None or self.quality is not None


def _check_unit(value: object, what: str) -> None:
    if not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise CompressError(f"{what} {value!r}: must be in [0, 1), e.g. 0.9 prunes 90%")


def parse_sparsity(text: str) -> float | dict[str, float]:
    """'0.9' -> 0.9; 'fc1=0.92,fc2=0.9' -> {'fc1': 0.92, 'fc2': 0.9}."""
    try:
        if "=" not in text:
            return float(text)
        return {k.strip(): float(v) for k, v in (item.split("=", 1) for item in text.split(","))}
    except ValueError:
        raise CompressError(f"sparsity {text!r}: write 0.9 or fc1=0.92,fc2=0.9") from None


def load_config(path: str | Path, **overrides: object) -> CompressConfig:
    """A CompressConfig from a TOML or YAML file (keys as the CLI flags), then `overrides`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise CompressError(f"{path}: cannot read config ({exc.strerror})") from None
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise CompressError(f"{path}: not valid TOML ({exc})") from None
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml  # optional: pip install pyyaml
        except ImportError:
            raise CompressError(f"{path}: YAML configs need PyYAML (pip install pyyaml)") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise CompressError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    else:
        raise CompressError(f"{path}: config must be .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise CompressError(f"{path}: config must be a table of settings")
    known = {f.name for f in fields(CompressConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CompressError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: "
                            f"{', '.join(sorted(known))}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return CompressConfig(**data)
    except TypeError as exc:
        raise CompressError(f"{path}: {exc}") from None


@dataclass
class Stage:
    """One pipeline stage's outcome."""

    name: str
    val_metric: float | None
    test_metric: float | None
    weights: int
    nonzero: int
    bytes: int
    seconds: float
    output_error: float | None = None  # with calibration: ||f(x) - f0(x)||^2 / ||f0(x)||^2


@dataclass
class LayerRow:
    """One tensor after compression: size, survivors, clusters, and (data-free) weight error."""

    name: str
    weights: int
    nonzero: int
    clusters: int
    rel_l2_error: float | None = None
    sqnr_db: float | None = None
    output_error: float | None = None  # with calibration: the layer's relative output error


@dataclass
class Report:
    """What compress did, stage by stage and layer by layer."""

    stages: list[Stage] = field(default_factory=list)
    layers: list[LayerRow] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    output: str | None = None  # the .dcz written, when compress_file wrote one
    peak_memory: int | None = None  # the process's peak resident bytes, when compress_file ran
    shrunk: ShrinkReport | None = None  # with structured pruning: the channels each layer kept
    budget: list = field(default_factory=list)  # with calibration and a size target: each
    # layer's chosen sparsity and bits, with its measured bytes and error (calibrated.LayerChoice)

    @property
    def ratio(self) -> float:
        """fp32 dense bytes over compressed bytes."""
        return self.stages[0].bytes / self.stages[-1].bytes if self.stages else 1.0

    @property
    def bytes(self) -> int:
        """The last stage's bytes (the file's, after compress_file)."""
        return self.stages[-1].bytes if self.stages else 0

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {**asdict(self), "bytes": self.bytes, "ratio": self.ratio}


def _fp32_bytes(state: dict[str, torch.Tensor]) -> int:
    return 4 * sum(t.numel() for t in state.values())


def _stage(name: str, model: nn.Module, task: Task | None, started: float,
           size: int | None = None) -> Stage:
    """The stage's metrics and, unless given, the bytes its weights encode to (no file written)."""
    stats = layer_stats(model)
    metric = (lambda s: evaluate(model, task, s)) if task is not None else (lambda s: None)
    if size is None:
        size = dcz.encoded_size(baked_state_dict(model))
    return Stage(name, metric("val"), metric("test"), sum(s.total for s in stats),
                 sum(s.nonzero for s in stats), size, time.perf_counter() - started)


def _prune_config(config: CompressConfig) -> PruneConfig:
    base = PruneConfig(criterion=config.criterion, allocation=config.allocation,
                       min_weights=config.min_weights)
    if config.quality is not None:
        return replace(base, quality=config.quality)
    if isinstance(config.sparsity, dict):  # only the named layers, each to its own sparsity
        return replace(base, sparsity=0.0, layers=config.sparsity, include=tuple(config.sparsity))
    return replace(base, sparsity=config.sparsity)


def check_device(device: str) -> torch.device:
    """The torch device named, or CompressError with the fix when this machine has none such."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise CompressError(f"device {device!r}: not a device name ({exc}); use cpu, cuda or "
                            "cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CompressError(f"device {device!r}: this machine has no CUDA device (or torch is a "
                            "CPU build); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CompressError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA "
                            "devices; pick one of them")
    if dev.type not in ("cpu", "cuda"):
        raise CompressError(f"device {device!r}: only cpu and cuda are supported")
    return dev


def _train_config(config: CompressConfig, **changes: object) -> TrainConfig:
    penalty = (regularisers.make(config.regulariser, strength=config.regulariser_strength)
               if config.regulariser is not None else None)
    base = TrainConfig(epochs=config.prune_epochs, lr=config.lr, batch_size=config.batch_size,
                       weight_decay=config.weight_decay, seed=config.seed, quiet=config.quiet,
                       lr_schedule=config.lr_schedule, regulariser=penalty,
                       clip_norm=config.clip_norm)
    return TrainConfig(**{**asdict(base), **changes})


def prune_stage(model: nn.Module, task: Task | None, config: CompressConfig) -> nn.Module:
    """Stage 1 in place: prune as configured (retraining on the task if given), then bake."""
    pc = _prune_config(config)
    if task is None:
        prune(model, pc)
        return bake(model)
    settings = {"rounds": config.rounds, "initial_sparsity": min(config.agp_initial, pc.sparsity),
                "steps": config.agp_steps or max(1, round(0.4 * config.prune_epochs))}
    schedule = schedules.make(config.schedule, **settings)
    if not schedule.accepts(pc):  # AGP cannot drive the std rule: the paper's rounds instead
        schedule = schedules.make("iterative", **settings)
    schedule.run(model, task, pc, _train_config(config))
    return bake(model)


def channel_stage(model: nn.Module, task: Task, config: CompressConfig) -> ShrinkReport:
    """Stage 0 in place: remove config.channels of every hidden layer's neurons or filters (the
    output layer's rows are the outputs: kept), retrain once, and shrink the model for real."""
    layers = list(select_layers(model, PruneConfig(min_weights=0)))
    hidden = {name: config.channels for name in layers[:-1]}
    pc = PruneConfig(criterion=config.channel_criterion, allocation="layer", sparsity=0.0,
                     layers=hidden, include=tuple(hidden), min_weights=0)
    schedules.make("oneshot").run(model, task, pc, _train_config(config))
    bake(model)
    return shrink(model, task.example_input)


def share_config(config: CompressConfig, with_task: bool) -> ShareConfig:
    """The one place where unset bits and init get their defaults: the paper's bits with a task
    (retraining recovers), 8 bits and the lowest-error clustering without (a file compressed
    data-free without bits instead gets per-tensor bits from max_weight_error: files.py)."""
    bits = TASK_BITS if with_task else DATA_FREE_BITS
    init = TASK_INIT if with_task else DATA_FREE_INIT
    return ShareConfig(bits=config.bits if config.bits is not None else bits,
                       init=config.init or init, seed=config.seed)


def share_stage(model: nn.Module, task: Task | None, config: CompressConfig) -> list:
    """Stage 2 in place: share weights (and, with a task, biases), fine-tune centroids, bake."""
    sc = share_config(config, task is not None)
    shares = share_weights(model, sc)
    if task is not None and config.bias_bits is not None:
        share_biases(model, config.bias_bits, sc.init, config.seed)
    if task is not None and config.finetune_epochs:
        fit(model, task, _train_config(config, epochs=config.finetune_epochs,
                                       lr=config.finetune_lr or config.lr / 10))
    bake(model)
    return shares


def compress(model: nn.Module, task: Task | None = None,
             config: CompressConfig | None = None) -> tuple[nn.Module, Report]:
    """Prune, then share weights, fine-tuning on the task if given; returns the baked model.

    The model is changed in place. Save the result with deepcompress.save.
    """
    config = config or CompressConfig()
    report = Report(config=asdict(config))
    t0 = time.perf_counter()
    dense_state = model.state_dict()
    report.stages.append(_stage("dense", model, task, t0, size=_fp32_bytes(dense_state)))
    reference = {k: v.detach().clone() for k, v in dense_state.items()}
    if config.channels:
        if task is None:
            raise CompressError("channels: removing neurons needs a task to retrain on; drop "
                                "--channels or give --task")
        t = time.perf_counter()
        report.shrunk = channel_stage(model, task, config)
        report.stages.append(_stage("channels", model, task, t))
    if config.prunes:
        t = time.perf_counter()
        prune_stage(model, task, config)
        if config.structured:
            if task is None:
                raise CompressError("structured: removing channels needs a task (its example "
                                    "input traces the model); drop --structured or give --task")
            report.shrunk = shrink(model, task.example_input)
        report.stages.append(_stage("pruned", model, task, t))
    t = time.perf_counter()
    shares = share_stage(model, task, config)
    report.stages.append(_stage("shared", model, task, t))
    final = model.state_dict()
    by_layer = {r.name: r for r in shares}
    for name, tensor in final.items():
        if not tensor.is_floating_point():
            continue
        layer = name.rsplit(".", 1)[0]
        shared = name.endswith(".weight") and layer in by_layer
        same = name in reference and reference[name].shape == tensor.shape  # shrunk: no
        rel, sqnr = weight_error(reference[name], tensor) if same else (None, None)
        report.layers.append(LayerRow(name, tensor.numel(), int(torch.count_nonzero(tensor)),
                                      by_layer[layer].n_clusters if shared else 0, rel, sqnr))
    return model, report


def compress_tensors(items: Iterable[tuple[str, torch.Tensor]], config: CompressConfig,
                     rows: list[LayerRow]) -> Iterator[tuple[str, torch.Tensor]]:
    """Data-free compression of a stream of named tensors, one at a time (memory per tensor).

    Floating tensors with two or more dimensions (weights of linear, conv and embedding layers)
    are pruned if asked (by magnitude, each tensor on its own: 'global' acts as 'layer' here)
    and shared into 2^bits clusters; others pass unchanged. A row per tensor
    (with its relative L2 error and SQNR) is appended to `rows`.
    """
    sc = share_config(config, with_task=False)
    bits = sc.bits
    if not (isinstance(bits, int) or str(bits).isdigit()) or not 1 <= int(bits) <= 8:
        raise CompressError(f"bits {bits!r}: without a task give one number of bits, 1 to 8")
    if isinstance(config.sparsity, dict):
        raise CompressError("per-layer sparsity needs a model; without a task give one number")
    if config.prunes and criteria.get(config.criterion).needs_data:
        raise CompressError(f"criterion {config.criterion!r}: needs data; give a task, or use "
                            "criterion 'magnitude'")
    return _compress_tensors(items, config, rows, 1 << int(bits), sc.init)


def prune_tensor(tensor: torch.Tensor, config: CompressConfig) -> torch.Tensor:
    """Data-free pruning of one shareable tensor by magnitude, as config asks (layers under
    min_weights stay whole, as with a model)."""
    w = tensor.detach()
    if not shareable(w) or w.numel() < config.min_weights:
        return w
    if config.quality is not None:
        return torch.where(std_mask(w, config.quality).bool(), w, 0.0)
    if config.sparsity is not None:
        return torch.where(sparsity_mask(w, float(config.sparsity)).bool(), w, 0.0)
    return w


def _compress_tensors(items: Iterable[tuple[str, torch.Tensor]], config: CompressConfig,
                      rows: list[LayerRow], k: int, init: str
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in items:
        if not shareable(tensor):
            rows.append(LayerRow(name, tensor.numel(), int(torch.count_nonzero(tensor)), 0))
            yield name, tensor
            continue
        w = prune_tensor(tensor, config)
        codebook, index = cluster_weight(w, k, init=init, seed=config.seed)
        shared = torch.where(index >= 0, codebook[index.clamp_min(0).long()], 0.0).to(w.dtype)
        rel, sqnr = weight_error(tensor, shared)
        rows.append(LayerRow(name, tensor.numel(), int(torch.count_nonzero(shared)),
                             codebook.numel(), rel, None if math.isinf(sqnr) else sqnr))
        yield name, shared


def render_report(report: Report) -> str:
    """A per-stage summary (metric, weights, bytes, ratio) and per-layer rows."""
    dense = report.stages[0].bytes if report.stages else 0
    lines = [f"{'stage':<8} {'val':>7} {'test':>7} {'nonzero':>10} {'of':>10} {'bytes':>10} "
             f"{'ratio':>7} {'seconds':>8}"]
    for s in report.stages:
        val = f"{s.val_metric:.4f}" if s.val_metric is not None else "-"
        test = f"{s.test_metric:.4f}" if s.test_metric is not None else "-"
        err = f"  output error {s.output_error:.3g}" if s.output_error is not None else ""
        lines.append(f"{s.name:<8} {val:>7} {test:>7} {s.nonzero:>10} {s.weights:>10} "
                     f"{s.bytes:>10} {dense / max(s.bytes, 1):>6.1f}x {s.seconds:>8.1f}{err}")
    if report.peak_memory is not None:
        lines.append(f"peak memory {report.peak_memory / 2**20:.0f} MiB")
    lines.append("")
    lines.append(f"{'tensor':<32} {'weights':>9} {'density':>8} {'clusters':>8} {'rel L2':>8} "
                 f"{'SQNR dB':>8} {'out err':>8}")
    for r in report.layers:
        rel = f"{r.rel_l2_error:.4f}" if r.rel_l2_error is not None else "-"
        sq = f"{r.sqnr_db:.1f}" if r.sqnr_db is not None else "-"
        out = f"{r.output_error:.4f}" if r.output_error is not None else "-"
        lines.append(f"{r.name[:32]:<32} {r.weights:>9} {r.nonzero / max(r.weights, 1):>8.1%} "
                     f"{r.clusters or '-':>8} {rel:>8} {sq:>8} {out:>8}")
    if report.budget:
        lines += ["", "budget (each layer tried alone: magnitude pruning and k-means, coded bytes "
                  "and the model's output error; then the bytes it took once solved)",
                  f"{'layer':<32} {'sparsity':>8} {'bits':>4} {'planned':>10} {'out err':>9} "
                  f"{'coded':>10}"]
        lines += [f"{c.layer[:32]:<32} {c.sparsity:>8.2f} {c.bits:>4} {c.bytes:>10} "
                  f"{c.error:>9.3g} {c.coded if c.coded is not None else '-':>10}"
                  for c in report.budget]
    return "\n".join(lines)
