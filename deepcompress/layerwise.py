"""Layer-wise second-order compression from unlabeled calibration data (OBS, SparseGPT, GPTQ).

For a layer with flattened weight W [out, in'] and input second moment H = X^T X / n (see
deepcompress.calibration), the output error of a replacement W' is tr((W - W') H (W - W')^T).
Both stages sweep the columns left to right in blocks (128 by default), each column's error fed
back to the columns not yet processed through the upper Cholesky factor U of the damped H^-1
(damping lambda = 1% of mean diag(H)), computed once per layer for both (`factor`):

- `obs_prune`: Optimal Brain Surgeon pruning with compensation (Hassibi & Stork 1993, made
  practical by SparseGPT, Frantar & Alistarh 2023). In each column block the mask prunes the
  entries of lowest saliency w^2 / U_qq^2 (U_qq^2 is [H^-1]_qq given the columns already
  processed), so many that the pruned count up to the block's end is round(sparsity * weights
  so far): the layer's pruned fraction is exact. The surviving weights absorb the error.
- `gptq_quantize`: GPTQ's error feedback onto the layer's k-means codebook rather than a uniform
  grid: each column is rounded to its nearest codebook entry (pruned entries to exactly zero).
- `fit_codebook`: 1-D k-means of the nonzeros (deepcompress.kmeans) refined by Lloyd steps
  weighted by diag(H) of each weight's column, OBD's saliency.

`compress_layerwise` runs calibration, pruning and quantization block by block over a model and
installs the results as the usual parametrizations (SharedWeight, or Mask without bits), so
`deepcompress.save` stores the codebooks and the zeros and fine-tuning can follow.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch

import torch
from torch import Tensor, nn

from deepcompress.calibration import Batch, Moments, calibrate_blocks, calibration_layers, columns
from deepcompress.errors import CompressError
from deepcompress.kmeans import INITS, fit_centroids
from deepcompress.parametrize import attach, chain, find, remove
from deepcompress.prune import Mask, apply_masks, sparsity_mask
from deepcompress.quantize import SharedWeight, bits_for, parse_bits

INSTALLS = ("auto", "plain")


@dataclass
class LayerResult:
    """One layer after compress_layerwise: sparsity reached, clusters used, relative output errors on the calibration inputs."""

    layer: str
    block: str
    weights: int
    sparsity: float
    clusters: int
    prune_error: float  # ||W X - W_pruned X||^2 / ||W X||^2 after pruning alone (bias excluded)
    error: float  # the same for the final weight
    method: str  # "obs" (second order) or "magnitude" (fallback: too many columns)
    seconds: float


def _check_unit(value: float, what: str) -> None:
    if not (isinstance(value, int | float) and 0 <= value < 1):
        raise CompressError(f"{what} {value!r}: must be in [0, 1), e.g. 0.5 prunes half")


def _damped_reversed(hessian: Tensor, dead: Tensor, mean: float, lam: float) -> Tensor:
    """J H J (the order reversed: a copy) with its dead columns cut off and unit diagonal there
    scaled to the mean, plus lam I."""
    h = hessian.flip(0, 1)
    gone = dead.flip(0)
    h[gone, :] = 0
    h[:, gone] = 0
    diag = h.diagonal()
    diag[gone] = mean
    diag.add_(lam)
    return h


def _reversed_lower_inverse(lower: Tensor, out: Tensor, leaf: int = 1024) -> None:
    """Write J L^-1 J (J reverses the order: an upper-triangular matrix) into out, by halves: for
    L = [[A, 0], [C, B]], L^-1 = [[A^-1, 0], [-B^-1 C A^-1, B^-1]], so two half-size inverses
    and two matrix products (a third of the flops of a triangular solve against the identity,
    at matrix-product speed), each half reversed into place."""
    n = lower.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        out.copy_(torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1))
        return
    m = n // 2
    r = n - m
    _reversed_lower_inverse(lower[m:, m:], out[:r, :r], leaf)  # J B^-1 J
    _reversed_lower_inverse(lower[:m, :m], out[r:, r:], leaf)  # J A^-1 J
    right = lower[m:, :m].flip(0, 1) @ out[r:, r:]  # (J C J)(J A^-1 J)
    corner = out[:r, :r] @ right
    del right
    out[:r, r:] = corner.neg_()


def _inverse_upper(reversed_h: Tensor) -> Tensor | None:
    """Upper Cholesky factor U of h^-1 (h^-1 = U^T U; None if h is not positive definite), given
    J h J (J reverses the order), which is overwritten: if J h J = L L^T, U = J L^-1 J. One
    factorisation in place and one triangular inverse: the memory of two matrices of h's size."""
    info = torch.empty((), dtype=torch.int32, device=reversed_h.device)
    factor, info = torch.linalg.cholesky_ex(reversed_h, out=(reversed_h, info))
    if int(info) != 0:
        return None
    upper = torch.zeros_like(factor)
    _reversed_lower_inverse(factor, upper)
    return upper


def inverse_cholesky(hessian: Tensor, damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """(upper Cholesky factor of (H + lambda I)^-1 with lambda = damp * mean diag(H), dead
    columns): dead columns (zero diagonal: inputs always zero) get a unit diagonal scaled to the
    mean. Temporaries are freed as soon as they are used: H's size, the square of its columns,
    is what a large layer's memory is made of."""
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise CompressError(f"hessian of shape {tuple(hessian.shape)}: must be square [in, in]; pass H = X^T X")
    if not damp > 0:
        raise CompressError(f"damp {damp!r}: must be > 0, e.g. 0.01 (1% of mean diag(H))")
    hessian = hessian.detach()
    diag = hessian.diagonal()
    dead = diag <= 0
    mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    lam = damp * mean
    for _ in range(6):
        upper = _inverse_upper(_damped_reversed(hessian, dead, mean, lam))
        if upper is not None:
            return upper, dead
        lam *= 10
    raise CompressError("hessian is not positive definite even with 10^6 x the damping; "
                        "accumulate H in float64 or give more calibration inputs")


def nearest(values: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest entry of a sorted codebook for each value (ties to the lower entry)."""
    mids = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(values.contiguous(), mids, out_int32=True)


def _sweep(weight: Tensor, upper: Tensor, sparsity: float | None, mask: Tensor | None,
           codebook: Tensor | None, blocksize: int, dead: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One left-to-right pass over column blocks with error feedback, in weight's own memory
    (the caller's copy); (weight, kept mask, index)."""
    w = weight
    rows, cols = w.shape
    keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.clone()
    index = torch.full(w.shape, -1, dtype=torch.int32, device=w.device)
    pruned = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        block = w[:, i1:i2].clone()
        u = upper[i1:i2, i1:i2]
        d = u.diagonal()
        if sparsity is not None:
            want = round(sparsity * rows * i2) - pruned
            if want > 0:
                saliency = block ** 2 / d.unsqueeze(0) ** 2
                if dead is not None:  # inputs always zero: free to prune
                    saliency[:, dead[i1:i2]] = 0
                saliency = saliency.reshape(-1)
                drop = torch.topk(saliency, want, largest=False, sorted=False).indices
                flat = keep[:, i1:i2].reshape(-1).clone()
                flat[drop] = False
                keep[:, i1:i2] = flat.reshape(rows, i2 - i1)
            pruned += max(want, 0)
        errors = torch.zeros_like(block)
        for j in range(i2 - i1):
            col = block[:, j]
            kept = keep[:, i1 + j]
            if codebook is None:
                q = torch.where(kept, col, 0.0)
            else:
                idx = nearest(col, codebook)
                q = torch.where(kept, codebook[idx], 0.0)
                index[:, i1 + j] = torch.where(kept, idx, -1)
            err = (col - q) / d[j]
            block[:, j:] -= err.unsqueeze(1) * u[j, j:].unsqueeze(0)
            block[:, j] = q
            errors[:, j] = err
        w[:, i1:i2] = block
        w[:, i2:] -= errors @ upper[i1:i2, i2:]
    return w, keep, index


def _order(hessian: Tensor, act_order: bool) -> Tensor | None:
    return torch.argsort(hessian.diagonal(), descending=True, stable=True) if act_order else None


@dataclass(frozen=True)
class Factored:
    """A layer's H made ready for its sweeps, once for both pruning and sharing: the column
    order (None: as given), H in that order, the upper Cholesky factor of its damped inverse and
    its dead columns."""

    perm: Tensor | None
    hessian: Tensor
    upper: Tensor
    dead: Tensor


def factor(hessian: Tensor, damp: float = 0.01, act_order: bool = False) -> Factored:
    """Factor H for obs_prune and gptq_quantize (the inverse is most of a large layer's time and
    memory); act_order sweeps the columns by decreasing diag(H), as GPTQ's option."""
    h = hessian.detach()
    if h.dtype not in (torch.float32, torch.float64):
        h = h.float()
    perm = _order(h, act_order) if h.dim() == 2 and h.shape[0] == h.shape[1] else None
    if perm is not None:
        h = h[perm][:, perm]
    upper, dead = inverse_cholesky(h, damp)
    return Factored(perm, h, upper, dead)


def _matrix(weight: Tensor, f: Factored) -> Tensor:
    """A copy of weight as [rows, columns] in H's precision and column order."""
    w = weight.detach().reshape(weight.shape[0], -1)
    if f.hessian.shape != (w.shape[1], w.shape[1]):
        raise CompressError(f"hessian of shape {tuple(f.hessian.shape)} does not fit a weight with "
                            f"{w.shape[1]} columns; collect H for this layer")
    copy = w.to(f.hessian.dtype)
    if f.perm is not None:
        return copy[:, f.perm]
    return copy.clone() if copy.data_ptr() == weight.data_ptr() else copy


def _unpermute(f: Factored, *tensors: Tensor) -> tuple[Tensor, ...]:
    if f.perm is None:
        return tensors
    inv = torch.argsort(f.perm)
    return tuple(t[:, inv] for t in tensors)


def obs_prune(weight: Tensor, hessian: Tensor | Factored, sparsity: float, *, blocksize: int = 128,
              damp: float = 0.01, act_order: bool = False) -> tuple[Tensor, Tensor]:
    """OBS/SparseGPT pruning of exactly round(sparsity * numel) weights with compensation; (weight, 0/1 keep mask), weight's shape and dtype.
    A Factored H brings its own damping and order."""
    _check_unit(sparsity, "sparsity")
    f = hessian if isinstance(hessian, Factored) else factor(hessian, damp, act_order)
    out, keep, _ = _sweep(_matrix(weight, f), f.upper, sparsity, None, None, blocksize, f.dead)
    out, keep = _unpermute(f, out, keep)
    return out.to(weight.dtype).reshape(weight.shape), keep.to(weight.dtype).reshape(weight.shape)


def gptq_quantize(weight: Tensor, hessian: Tensor | Factored, codebook: Tensor, *, mask: Tensor | None = None,
                  blocksize: int = 128, damp: float = 0.01, act_order: bool = False) -> tuple[Tensor, Tensor]:
    """GPTQ onto a codebook: every kept weight becomes a codebook value with error feedback, masked ones exactly 0; (weight, int32 index with -1 at zeros).
    A Factored H brings its own damping and order."""
    f = hessian if isinstance(hessian, Factored) else factor(hessian, damp, act_order)
    w = _matrix(weight, f)
    book = torch.unique(codebook.detach().to(weight.dtype)).to(w.dtype)  # values as stored
    if book.numel() == 0:
        raise CompressError("codebook is empty; fit one with fit_codebook first")
    keep = (torch.ones_like(w, dtype=torch.bool) if mask is None
            else mask.detach().reshape(w.shape).to(w.device) != 0)
    if f.perm is not None:
        keep = keep[:, f.perm]
    out, keep, index = _sweep(w, f.upper, None, keep, book, blocksize)
    out, index = _unpermute(f, out, index)
    out = out.to(weight.dtype)
    index = torch.where(out == 0, -1, index)
    out = out + 0.0  # no -0.0
    return out.reshape(weight.shape), index.to(torch.int32).reshape(weight.shape)


def fit_codebook(weight: Tensor, k: int, *, importance: Tensor | None = None, init: str = "optimal",
                 iters: int = 20, seed: int = 0) -> Tensor:
    """Sorted codebook of at most k values for the nonzeros of weight: k-means, then Lloyd steps weighted by importance (weight's shape)."""
    if init not in INITS:
        raise CompressError(f"k-means init {init!r}: unknown; use one of {', '.join(INITS)}")
    c = fit_centroids(weight.detach(), k, init, 30, seed).to(torch.float64).sort().values
    if importance is None or c.numel() <= 1 or iters <= 0:
        return c.to(weight.dtype)
    flat = weight.detach().reshape(-1)
    nz = flat != 0
    values = flat[nz].to(torch.float64)
    weights = importance.detach().expand_as(weight).reshape(-1)[nz].to(torch.float64)
    weights = weights.clamp_min(0) + 1e-12 * float(weights.abs().mean().clamp_min(1e-30))
    for _ in range(iters):
        idx = nearest(values, c)
        num = torch.zeros_like(c).index_add_(0, idx, weights * values)
        den = torch.zeros_like(c).index_add_(0, idx, weights)
        new = torch.where(den > 0, num / den.clamp_min(1e-300), c).sort().values
        if torch.equal(new, c):
            break
        c = new
    return torch.unique(c.to(weight.dtype))


def output_error(weight: Tensor, approx: Tensor, hessian: Tensor, rows: int = 256) -> float:
    """Relative output error ||W X - W' X||^2 / ||W X||^2 from H = X^T X (bias excluded); 0 when both are 0.
    In float64, `rows` rows at a time (a whole layer in float64 is twice its own size, times four)."""
    w = weight.detach().reshape(weight.shape[0], -1)
    a = approx.detach().reshape(w.shape)
    h = hessian.to(torch.float64)
    num = den = 0.0
    for i in range(0, w.shape[0], rows):
        wi = w[i:i + rows].to(torch.float64)
        di = wi - a[i:i + rows].to(torch.float64)
        num += float(((di @ h) * di).sum())
        den += float(((wi @ h) * wi).sum())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _layer_sparsity(name: str, sparsity: float | dict[str, float] | None) -> float:
    if sparsity is None:
        return 0.0
    if isinstance(sparsity, dict):
        return next((float(v) for p, v in sparsity.items() if fnmatch(name, p)), 0.0)
    return float(sparsity)


def _selected(model: nn.Module, include: Sequence[str], exclude: Sequence[str], min_weights: int) -> dict[str, nn.Module]:
    layers = calibration_layers(model)
    for pattern in (*include, *exclude):
        if not any(fnmatch(n, pattern) for n in layers):
            raise CompressError(f"pattern {pattern!r}: matches no Linear/Conv1d/Conv2d layer; layers are: "
                                f"{', '.join(layers) or 'none'}")
    return {n: m for n, m in layers.items()
            if any(fnmatch(n, p) for p in include) and not any(fnmatch(n, p) for p in exclude)
            and m.weight.numel() >= min_weights}


def _kept(module: nn.Module, weight: Tensor) -> Tensor:
    """The weights a layer not pruned here keeps: its prune.Mask's (pruned before, and retrained
    under it), else all."""
    mask = find(module, "weight", Mask)
    if mask is None:
        return torch.ones_like(weight, dtype=torch.bool)
    return mask.mask.detach().reshape(weight.shape) != 0


def _install(model: nn.Module, name: str, module: nn.Module, weight: Tensor, index: Tensor | None,
             keep: Tensor, install: str) -> int:
    """Write weight into module (replacing its parametrizations); attach SharedWeight or Mask; return clusters."""
    if chain(module, "weight"):
        remove(module, "weight")
    with torch.no_grad():
        module.weight.copy_(weight.reshape(module.weight.shape) + 0.0)
    if index is None:
        if install == "auto":
            apply_masks(model, {name: keep.reshape(module.weight.shape).to(module.weight.dtype)})
        return 0
    flat = index.reshape(-1)
    counts = torch.bincount(flat[flat >= 0])
    used = int((counts > 0).sum())
    # the clusters used, renumbered 0..used-1 in order (a lookup over index + 1, -1 staying -1)
    lut = torch.cat((flat.new_full((1,), -1), (counts > 0).cumsum(0).to(flat.dtype) - 1))
    index = torch.index_select(lut, 0, flat + 1).reshape(module.weight.shape)
    if install == "auto" and used:
        attach(module, "weight", SharedWeight(index, used), unsafe=True)
    return used


def compress_layerwise(model: nn.Module, batches: Tensor | Iterable[Batch], sparsity: float | dict[str, float] | None = 0.5,
                       bits: int | str | dict[str, int] | None = 4, *, blocks: Sequence[str] | None = None, blocksize: int = 128,
                       damp: float = 0.01, weighted: bool = True, init: str = "optimal", act_order: bool = False,
                       include: Sequence[str] = ("*",), exclude: Sequence[str] = (), min_weights: int = 0,
                       max_columns: int = 16384, install: str = "auto", dtype: torch.dtype = torch.float64,
                       mode: str = "auto", quiet: bool = True,
                       on_layer: Callable[[str, Tensor], None] | None = None) -> list[LayerResult]:
    """Prune (OBS) and share (GPTQ onto an H-weighted k-means codebook) every selected Linear/Conv layer, block by block, in place.

    sparsity: one fraction, or {layer pattern: fraction} (first match, others unpruned), or None;
    bits: int, a spec like 'conv=6,linear=4,fc3=5' (deepcompress.quantize.parse_bits), or
    {layer pattern: bits} (first match, others at their type's default), or None (prune only).
    The dicts are read as each layer is reached: on_layer(name, final weight), called after each
    layer, may change the settings of the layers still to come. Results are installed as SharedWeight (Mask without bits) parametrizations, or
    written into the plain weight with install='plain'. A layer not pruned here that already
    carries a prune.Mask keeps exactly the mask's zeros. Layers with more than max_columns
    flattened inputs fall back to magnitude pruning and nearest-centroid k-means.
    """
    if isinstance(sparsity, dict):
        for p, v in sparsity.items():
            _check_unit(v, f"sparsity for {p!r}")
    elif sparsity is not None:
        _check_unit(sparsity, "sparsity")
    for p, v in (bits.items() if isinstance(bits, dict) else ()):
        if not isinstance(v, int) or not 1 <= v <= 8:
            raise CompressError(f"bits for {p!r}: {v!r} is not 1 to 8; pick 1 to 8 bits per layer")
    if install not in INSTALLS:
        raise CompressError(f"install {install!r}: unknown; use one of {', '.join(INSTALLS)}")
    if not isinstance(blocksize, int) or blocksize < 1:
        raise CompressError(f"blocksize {blocksize!r}: must be a positive whole number, e.g. 128")
    rules = (None if bits is None else [] if isinstance(bits, dict) else parse_bits(bits))

    def layer_bits(name: str, module: nn.Module) -> int:
        if isinstance(bits, dict):
            return next((int(v) for p, v in bits.items() if fnmatch(name, p)),
                        bits_for(name, module, []))
        return bits_for(name, module, rules)
    layers = _selected(model, include, exclude, min_weights)
    results: list[LayerResult] = []

    def finish(name: str, block: str, module: nn.Module, n: int, errors: tuple[float, float],
               keep: Tensor, final: Tensor, index: Tensor | None, method: str, t0: float) -> None:
        clusters = _install(model, name, module, final, index, keep, install)
        if on_layer is not None:
            on_layer(name, final)
        zeros = int((final == 0).sum())
        results.append(LayerResult(name, block, n, zeros / max(n, 1), clusters, *errors,
                                   method, time.perf_counter() - t0))
        if not quiet:
            r = results[-1]
            print(f"{r.layer}: sparsity {r.sparsity:.3f}, {r.clusters} clusters, "
                  f"output error {r.error:.4g} ({r.method}, {r.seconds:.1f}s)", flush=True)

    big = {n: m for n, m in layers.items() if columns(m) > max_columns}
    for name, module in big.items():  # data-free, before any H is collected downstream of them
        t0 = time.perf_counter()
        s = _layer_sparsity(name, sparsity)
        w0 = module.weight.detach().clone()
        keep = sparsity_mask(w0, s).bool() if s > 0 else _kept(module, w0)
        pruned = torch.where(keep, w0, 0.0)
        final, index = pruned, None
        if rules is not None:
            k = 1 << layer_bits(name, module)
            codebook = fit_codebook(pruned, k, init=init).to(torch.float64)
            idx = nearest(pruned.reshape(-1).to(torch.float64), codebook).reshape(w0.shape)
            final = torch.where(keep, codebook[idx], 0.0).to(w0.dtype) + 0.0
            index = torch.where(final == 0, -1, idx).to(torch.int32)
        finish(name, "", module, w0.numel(), (math.nan, math.nan), keep, final, index, "magnitude", t0)

    def solve(block: str, name: str, module: nn.Module, moments: Moments) -> None:
        # a function, so that one layer's matrices are freed before the next layer's solve
        t0 = time.perf_counter()
        s = _layer_sparsity(name, sparsity)
        h = moments.mean()
        moments.sum = moments.sum.new_zeros(0)  # free the sum as soon as H is out
        w0 = module.weight.detach()  # no copy: nothing writes it before _install
        f = factor(h, damp, act_order) if s > 0 or rules is not None else None  # one inverse for both
        if s > 0:
            pruned, keep = obs_prune(w0, f, s, blocksize=blocksize)
            keep = keep.bool()
        else:
            pruned, keep = w0, _kept(module, w0)
        prune_error = output_error(w0, pruned, h)
        final, index = pruned, None
        if rules is not None:
            k = 1 << layer_bits(name, module)
            importance = h.diagonal().reshape(1, -1) if weighted else None
            codebook = fit_codebook(pruned.reshape(pruned.shape[0], -1), k, importance=importance, init=init)
            del pruned, final
            final, index = gptq_quantize(w0, f, codebook, mask=keep, blocksize=blocksize)
        del f
        errors = (prune_error, output_error(w0, final, h))  # before _install overwrites w0
        finish(name, block, module, w0.numel(), errors, keep, final, index, "obs", t0)

    def compress(block: str, found: dict[str, tuple[nn.Module, Moments]]) -> None:
        for name, (module, moments) in found.items():
            solve(block, name, module, moments)

    second = [n for n in layers if n not in big]
    calibrate_blocks(model, batches, compress, blocks=blocks, layers=second, dtype=dtype, mode=mode)
    missing = [n for n in layers if n not in {r.layer for r in results}]
    if missing:
        raise CompressError(f"layers {', '.join(missing)} never ran on the calibration inputs or lie "
                            "outside the blocks; give blocks= covering them or exclude them")
    return results


def format_results(results: list[LayerResult]) -> str:
    """Plain-text table of compress_layerwise results."""
    head = f"{'layer':<24}{'weights':>10}{'sparsity':>10}{'k':>5}{'prune err':>11}{'error':>10}{'method':>10}{'s':>7}"
    rows = [f"{r.layer:<24}{r.weights:>10}{r.sparsity:>10.4f}{r.clusters:>5}{r.prune_error:>11.4g}"
            f"{r.error:>10.4g}{r.method:>10}{r.seconds:>7.2f}" for r in results]
    return "\n".join([head, *rows])
