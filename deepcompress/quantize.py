"""Stage 2: per-layer weight sharing (k-means codebooks) with trainable centroids.

Each shared weight is parametrized as ``codebook[index]``: the index (int32, -1 = structural zero)
is a fixed buffer and the codebook is the parametrization's ``original`` parameter, so autograd
gives each centroid the sum of its members' gradients (the paper's rule), any optimizer or DDP sees
only the small codebook, and pruned entries stay exactly zero.  Build optimizers after
share_weights.  Existing parametrizations on a weight (for example stage 1's pruning masks) are
baked in first; their zeros are then kept structurally by the index.

The assignment is not refreshed during fine-tuning: with the codebook as the only parameter every
weight equals its own centroid, so re-assigning to the nearest centroid would change nothing.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deepcompress.errors import CompressError
from deepcompress.formats.codec import Shared
from deepcompress.kmeans import INITS, cluster_weight
from deepcompress.parametrize import attach, bake, chain, find, original, remove

__all__ = [
    "ShareConfig",
    "LayerReport",
    "SharedWeight",
    "bake",
    "bits_for",
    "codebooks",
    "declared_shares",
    "format_report",
    "parse_bits",
    "share_biases",
    "share_weights",
    "shareable",
    "weight_error",
]

_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.modules.conv._ConvNd,),
    "linear": (nn.Linear,),
}
DEFAULT_BITS = {"conv": 8, "linear": 5}


TASK_BITS, TASK_INIT = "conv=8,linear=5", "linear"  # with retraining: the paper's bits
DATA_FREE_BITS, DATA_FREE_INIT = 8, "optimal"  # without: fidelity first


@dataclass
class ShareConfig:
    """Weight-sharing settings: bits spec (int or 'conv=8,linear=5,fc3=6'; layers that are not
    conv count as linear), k-means init/iters/seed, include patterns."""

    bits: int | str = TASK_BITS
    init: str = TASK_INIT
    iters: int = 30
    seed: int = 0
    include: tuple[str, ...] = ()


@dataclass
class LayerReport:
    """Per-layer outcome of share_weights; errors are over the layer's weight, data-free."""

    name: str
    kind: str
    bits: int
    n_weights: int
    n_nonzero: int
    n_clusters: int
    reclustered: bool
    rel_l2_error: float
    sqnr_db: float


class SharedWeight(nn.Module):
    """Parametrization codebook -> codebook[index] (zeros where index is -1); right_inverse gives cluster means."""

    def __init__(self, index: Tensor, n_clusters: int) -> None:
        super().__init__()
        # int32, not int16: gloo (DDP buffer broadcast) has no int16
        self.register_buffer("index", index.to(torch.int32))
        self.n_clusters = int(n_clusters)

    def forward(self, codebook: Tensor) -> Tensor:
        """Dense weight: the codebook value of each entry, exactly 0 at structural zeros."""
        table = torch.cat((codebook.new_zeros(1), codebook))
        if torch.is_grad_enabled() and codebook.requires_grad:  # training: the gradient as it
            return table[self.index.long() + 1]  # always was (index_select's sums differently)
        # index_select takes the int32 index as it is ([] widens it to int64 first)
        return torch.index_select(table, 0, (self.index + 1).reshape(-1)).reshape(self.index.shape)

    def right_inverse(self, weight: Tensor) -> Tensor:
        """Codebook: mean of weight over each cluster (float64 sums, so equal members give their value exactly)."""
        keep = self.index.reshape(-1) >= 0
        idx = self.index.reshape(-1)[keep]
        vals = weight.detach().reshape(-1)[keep].double()
        sums = torch.zeros(self.n_clusters, dtype=torch.float64,
                           device=weight.device).index_add_(0, idx, vals)
        counts = torch.bincount(idx, minlength=self.n_clusters).clamp_min(1)
        return (sums / counts).to(weight.dtype)


def parse_bits(spec: int | str) -> list[tuple[str, int]]:
    """Rules (key, bits) from an int (all layers) or 'conv=8,linear=5,fc3=6' (type keywords or name patterns)."""
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        b = int(spec)
        _check_bits(b, str(spec))
        return [(key, b) for key in _TYPES]
    rules = []
    for item in str(spec).split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key.strip() or not value.strip().lstrip("-").isdigit():
            raise CompressError(f"bits spec item {item.strip()!r} is not KEY=BITS; write e.g. 'conv=8,linear=5,fc3=6'")
        _check_bits(int(value), item.strip())
        rules.append((key.strip(), int(value)))
    return rules


def _check_bits(b: int, where: str) -> None:
    if not 1 <= b <= 8:
        raise CompressError(f"bits spec {where!r}: {b} bits is outside 1..8; pick 1 to 8 bits per layer")


def _kind(module: nn.Module) -> str | None:
    return next((key for key, types in _TYPES.items() if isinstance(module, types)), None)


def bits_for(name: str, module: nn.Module, rules: list[tuple[str, int]]) -> int:
    """Bits for one layer: the last matching name pattern, else its type rule, else the default."""
    kind = _kind(module) or "linear"  # embeddings and other shared weights count as linear
    bits = DEFAULT_BITS[kind]
    for key, b in rules:
        if key == kind:
            bits = b
    for key, b in rules:
        if key not in _TYPES and fnmatch.fnmatchcase(name, key):
            bits = b
    return bits


def shareable(tensor: object) -> bool:
    """The one rule for which tensors are weight-shared, with or without a model: floating point
    with two or more dimensions (linear, conv and embedding weights); biases and norm scales are
    shared only by share_biases, with a task."""
    return isinstance(tensor, Tensor) and tensor.is_floating_point() and tensor.dim() >= 2


def _layers(model: nn.Module, config: ShareConfig, rules: list[tuple[str, int]]) -> dict[str, nn.Module]:
    layers = {n: m for n, m in model.named_modules() if shareable(getattr(m, "weight", None))}
    for pattern in [k for k, _ in rules if k not in _TYPES] + list(config.include):
        if not any(fnmatch.fnmatchcase(n, pattern) for n in layers):
            raise CompressError(f"pattern {pattern!r} matches no layer with a shared weight; known layers: {', '.join(layers) or 'none'}")
    if config.include:
        layers = {n: m for n, m in layers.items() if any(fnmatch.fnmatchcase(n, p) for p in config.include)}
    return layers


def weight_error(reference: Tensor, approx: Tensor) -> tuple[float, float]:
    """(relative L2 error, SQNR in dB) of approx against reference; (0, inf) when equal."""
    ref = reference.detach().double()
    err = float(torch.sum((ref - approx.detach().double()) ** 2))
    sig = float(torch.sum(ref * ref))
    if err == 0:
        return 0.0, math.inf
    return (math.sqrt(err / sig) if sig else math.inf), (10 * math.log10(sig / err) if sig else -math.inf)


def share_weights(model: nn.Module, config: ShareConfig | None = None) -> list[LayerReport]:
    """Replace each selected layer's weight by codebook[index] (in place); return one report per layer."""
    config = config or ShareConfig()
    if config.init not in INITS:
        raise CompressError(f"unknown k-means init {config.init!r}; use one of {', '.join(INITS)}")
    rules = parse_bits(config.bits)
    reports = []
    for name, module in _layers(model, config, rules).items():
        bits = bits_for(name, module, rules)
        k = 1 << bits
        existing = find(module, "weight", SharedWeight)
        if existing is not None:
            if existing.n_clusters > k:
                raise CompressError(
                    f"layer {name!r} is already shared with {existing.n_clusters} clusters, more than 2^{bits}; "
                    "bake it and re-run, or ask for more bits"
                )
            w = module.weight.detach()
            reports.append(_report(name, module, bits, w, w, existing.n_clusters, False))
            continue
        if chain(module, "weight"):
            remove(module, "weight")
        before = module.weight.detach().clone()
        codebook, index = cluster_weight(before, k, config.init, config.iters, config.seed)
        attach(module, "weight", SharedWeight(index, codebook.numel()), unsafe=True)
        after = module.weight.detach()
        rel, _ = weight_error(before, after)
        reports.append(_report(name, module, bits, before, after, codebook.numel(), rel > 0))
    return reports


def share_biases(model: nn.Module, bits: int, init: str = "linear", seed: int = 0) -> int:
    """Share the bias of every Conv/Linear layer with more than 2^bits entries into 2^bits
    trainable centroids, like the weights (biases are ~10% of a pruned LeNet's file in fp32);
    returns how many biases were shared."""
    _check_bits(bits, f"bias bits {bits}")
    count = 0
    for _, module in model.named_modules():
        bias = getattr(module, "bias", None)
        if not _kind(module) or not isinstance(bias, Tensor) or bias.numel() <= 1 << bits:
            continue
        if chain(module, "bias"):
            remove(module, "bias")
        codebook, index = cluster_weight(bias.detach(), 1 << bits, init, 30, seed)
        attach(module, "bias", SharedWeight(index, codebook.numel()), unsafe=True)
        count += 1
    return count


def _report(name: str, module: nn.Module, bits: int, before: Tensor, after: Tensor, n: int, re: bool) -> LayerReport:
    rel, sqnr = weight_error(before, after)
    nnz = int(torch.count_nonzero(after))
    return LayerReport(name, type(module).__name__.removeprefix("Parametrized"), bits, after.numel(), nnz, n, re, rel, sqnr)


def codebooks(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """(codebook parameter, int32 index buffer) of every shared layer, by module name."""
    out = {}
    for name, module in model.named_modules():
        p = find(module, "weight", SharedWeight)
        if p is not None:
            out[name] = (original(module, "weight"), p.index)
    return out


def declared_shares(model: nn.Module) -> dict[str, Shared]:
    """The codebook and index of every tensor whose only parametrization is a SharedWeight, by
    state_dict name, for the writer to store as they are (no search for the values). The
    codebook gets the +0.0 that baking adds (-0.0 becomes +0.0, a structural zero), so the
    values are bit for bit those of the baked tensor."""
    out = {}
    for prefix, module in model.named_modules():
        for name in getattr(module, "parametrizations", {}):
            parts = chain(module, name)
            if len(parts) == 1 and isinstance(parts[0], SharedWeight):
                with torch.no_grad():
                    codebook = original(module, name).detach() + 0.0
                out[f"{prefix}.{name}" if prefix else name] = Shared(codebook, parts[0].index)
    return out


def format_report(reports: list[LayerReport]) -> str:
    """Plain-text table of share_weights reports."""
    head = f"{'layer':<24}{'type':<10}{'bits':>5}{'weights':>12}{'nonzero':>12}{'k':>6}{'rel L2':>10}{'SQNR dB':>9}"
    rows = [
        f"{r.name:<24}{r.kind:<10}{r.bits:>5}{r.n_weights:>12}{r.n_nonzero:>12}{r.n_clusters:>6}"
        f"{r.rel_l2_error:>10.4f}{r.sqnr_db:>9.2f}"
        for r in reports
    ]
    return "\n".join([head, *rows])
