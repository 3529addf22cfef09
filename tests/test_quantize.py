"""Tests for deepcompress.quantize: bits rules, shared-weight parametrization, fine-tuning, DDP, bake."""
from __future__ import annotations

import math
import os

import pytest
import spawn  # tests/spawn.py
import torch
from torch import nn
from torch.nn.utils import parametrize

from deepcompress.errors import CompressError
from deepcompress.quantize import (
    ShareConfig,
    SharedWeight,
    bake,
    bits_for,
    codebooks,
    parse_bits,
    share_weights,
    weight_error,
)


def lenet(seed: int = 0, sparsity: float = 0.6) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 12 * 12, 50), nn.ReLU(), nn.Linear(50, 10)
    )
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear | nn.Conv2d):
                w = m.weight
                w[w.abs() < w.abs().flatten().quantile(sparsity)] = 0
    return model


def test_parse_bits_and_precedence() -> None:
    assert parse_bits(4) == [("conv", 4), ("linear", 4)]
    assert parse_bits("6") == [("conv", 6), ("linear", 6)]
    rules = parse_bits("conv=7, linear=4,fc3=6")
    assert rules == [("conv", 7), ("linear", 4), ("fc3", 6)]
    conv, fc = nn.Conv2d(1, 1, 1), nn.Linear(1, 1)
    assert bits_for("c1", conv, []) == 8 and bits_for("fc1", fc, []) == 5
    assert bits_for("c1", conv, rules) == 7 and bits_for("fc1", fc, rules) == 4
    assert bits_for("fc3", fc, rules) == 6
    assert bits_for("fc3", fc, parse_bits("fc*=2,fc3=3")) == 3  # last matching pattern wins


@pytest.mark.parametrize("spec", [0, 9, "conv=0", "linear=9", "conv:8", "conv=x", "=3"])
def test_bad_bits_raise(spec: object) -> None:
    with pytest.raises(CompressError) as e:
        share_weights(lenet(), ShareConfig(bits=spec))
    assert "\n" not in str(e.value)


def test_pattern_matching_nothing_raises() -> None:
    with pytest.raises(CompressError, match="matches no"):
        share_weights(lenet(), ShareConfig(bits="nolayer=4"))
    with pytest.raises(CompressError, match="matches no"):
        share_weights(lenet(), ShareConfig(include=("fc9",)))


def test_share_weights_codebook_values_and_zeros() -> None:
    model = lenet()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    reports = share_weights(model, ShareConfig(bits="conv=3,linear=4,6=2", init="optimal"))
    assert [(r.name, r.kind, r.bits) for r in reports] == [("0", "Conv2d", 3), ("4", "Linear", 4), ("6", "Linear", 2)]
    books = codebooks(model)
    for r in reports:
        module = model.get_submodule(r.name)
        codebook, index = books[r.name]
        w = module.weight.detach()
        assert codebook.numel() == r.n_clusters == 2**r.bits
        assert torch.equal(w == 0, dense[r.name] == 0)  # pruned entries stay zero, survivors stay nonzero
        assert torch.equal(w[index >= 0], codebook.detach()[index[index >= 0].long()])
        assert r.reclustered and 0 < r.rel_l2_error < 1
        assert r.rel_l2_error == pytest.approx(weight_error(dense[r.name], w)[0])
    names = {n for n, _ in model.named_parameters()}
    assert "4.parametrizations.weight.original" in names and "4.weight" not in names


def test_layers_with_few_values_are_kept_exactly() -> None:
    model = lenet()
    with torch.no_grad():
        w = model[6].weight
        w.copy_(torch.where(w == 0, w, torch.sign(w) * 0.125))
    before = model[6].weight.detach().clone()
    reports = share_weights(model, ShareConfig(bits=2, include=("6",)))
    assert len(reports) == 1 and not reports[0].reclustered and reports[0].n_clusters == 2
    assert reports[0].sqnr_db == math.inf
    assert torch.equal(model[6].weight, before)
    assert not parametrize.is_parametrized(model[0])  # not included


def test_codebook_gradient_is_sum_of_member_gradients() -> None:
    layer = nn.Linear(3, 2, bias=False)
    index = torch.tensor([[0, 1, -1], [1, 0, 1]], dtype=torch.int16)
    parametrize.register_parametrization(layer, "weight", SharedWeight(index, 2), unsafe=True)
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.tensor([0.5, -2.0]))
    assert layer.weight.tolist() == [[0.5, -2.0, 0.0], [-2.0, 0.5, -2.0]]
    x = torch.tensor([[1.0, 2.0, 3.0]])
    layer(x).mul(torch.tensor([[10.0, 100.0]])).sum().backward()
    # dL/dW[i, j] = g_i * x_j: W00 (c0) = 10, W01 (c1) = 20, W10 (c1) = 100, W11 (c0) = 200, W12 (c1) = 300
    assert layer.parametrizations.weight.original.grad.tolist() == [210.0, 420.0]


def test_right_inverse_gives_cluster_means() -> None:
    index = torch.tensor([0, 1, 0, -1, 1], dtype=torch.int16)
    p = SharedWeight(index, 2)
    assert p.right_inverse(torch.tensor([1.0, 4.0, 3.0, 9.0, 6.0])).tolist() == [2.0, 5.0]


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
])
def test_zeros_stay_zero_through_fine_tuning(make_opt) -> None:
    model = lenet()
    zeros = {n: m.weight == 0 for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    share_weights(model, ShareConfig(bits=4))
    books = {n: c.detach().clone() for n, (c, _) in codebooks(model).items()}
    opt = make_opt(model.parameters())
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for n, mask in zeros.items():
        w = model.get_submodule(n).weight
        assert torch.equal(w == 0, mask)
        assert not torch.equal(codebooks(model)[n][0].detach(), books[n])  # the centroids did train


def test_bake_gives_plain_weights_with_codebook_values() -> None:
    model = lenet()
    share_weights(model, ShareConfig(bits="conv=3,linear=5"))
    books = {n: c.detach().clone() for n, (c, _) in codebooks(model).items()}
    live = {n: model.get_submodule(n).weight.detach().clone() for n in books}
    bake(model)
    for n, book in books.items():
        module = model.get_submodule(n)
        assert not parametrize.is_parametrized(module) and isinstance(module.weight, nn.Parameter)
        assert torch.equal(module.weight.detach(), live[n])
        nz = module.weight[module.weight != 0].detach()
        assert torch.equal(torch.unique(nz), torch.unique(book))
    # a baked layer already has <= 2^b values: shared again, exactly
    reports = share_weights(model, ShareConfig(bits="conv=3,linear=5"))
    assert not any(r.reclustered for r in reports)


def test_already_shared_with_more_clusters_raises() -> None:
    model = lenet()
    share_weights(model, ShareConfig(bits=5))
    assert all(not r.reclustered for r in share_weights(model, ShareConfig(bits=6)))
    with pytest.raises(CompressError, match="already shared"):
        share_weights(model, ShareConfig(bits=3))


class Mask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


def test_composes_with_mask_parametrization() -> None:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(40, 30))
    mask = (torch.rand(30, 40) > 0.7).float()
    parametrize.register_parametrization(layer[0], "weight", Mask(mask))
    reports = share_weights(layer, ShareConfig(bits=3))
    assert reports[0].n_nonzero == int(mask.sum())
    assert len(layer[0].parametrizations.weight) == 1
    assert isinstance(layer[0].parametrizations.weight[0], SharedWeight)
    assert torch.equal(layer[0].weight == 0, mask == 0)


def test_nan_weights_raise() -> None:
    model = lenet()
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")
    with pytest.raises(CompressError, match="NaN"):
        share_weights(model)


def test_weight_error_by_hand() -> None:
    rel, sqnr = weight_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.5]))
    assert rel == pytest.approx(0.1) and sqnr == pytest.approx(20.0)
    assert weight_error(torch.ones(3), torch.ones(3)) == (0.0, math.inf)


def _ddp_worker(rank: int, world: int, out_dir: str) -> None:
    model = lenet(seed=0)  # same weights on every rank, then shared identically
    share_weights(model, ShareConfig(bits=4))
    index0 = {n: i.clone() for n, (_, i) in codebooks(model).items()}
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    for _ in range(3):
        x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    state = {n: (c.detach().clone(), torch.equal(i, index0[n])) for n, (c, i) in codebooks(model).items()}
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_keeps_codebooks_identical_and_indices_fixed(tmp_path) -> None:
    spawn.run(_ddp_worker, 2, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    before = {n: c.detach() for n, (c, _) in codebooks(share_and_return(lenet(seed=0))).items()}
    assert r0.keys() == r1.keys() == before.keys()
    for n in r0:
        assert torch.equal(r0[n][0], r1[n][0])
        assert r0[n][1] and r1[n][1]
        assert not torch.equal(r0[n][0], before[n])


def share_and_return(model: nn.Module) -> nn.Module:
    share_weights(model, ShareConfig(bits=4))
    return model


def test_share_biases_trains_a_small_codebook():
    from deepcompress.bake import bake
    from deepcompress.quantize import share_biases

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 100), nn.ReLU(), nn.Linear(100, 4))
    assert share_biases(model, 3) == 1  # the 4-entry bias is left alone
    codebook = model[0].parametrizations.bias.original
    assert codebook.numel() <= 8 and codebook.requires_grad
    model(torch.randn(5, 8)).sum().backward()
    assert codebook.grad is not None and codebook.grad.shape == codebook.shape
    bake(model)
    assert len(torch.unique(model[0].bias.detach())) <= 8
    with pytest.raises(CompressError):
        share_biases(model, 9)


def test_save_hands_codebooks_to_the_writer_and_writes_the_bytes_detection_gives(tmp_path, monkeypatch) -> None:
    """Declared sharing: no search over the weights, and the file detection would write."""
    import copy

    import numpy as np

    import deepcompress
    from deepcompress.formats import DczFile, codec
    from deepcompress.models import lenet300
    from deepcompress.quantize import declared_shares, share_biases

    torch.manual_seed(0)
    model = lenet300()
    with torch.no_grad():
        for p in model.parameters():
            p[p.abs() < 0.02] = 0
    share_weights(model, ShareConfig(bits="linear=5"))
    share_biases(model, 4)
    shares = declared_shares(model)
    assert set(shares) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight"}
    assert all(isinstance(s, codec.Shared) and s.codebook.dim() == 1 for s in shares.values())
    deepcompress.save(bake(copy.deepcopy(model)), tmp_path / "detected.dcz")
    sizes = []
    unique = np.unique
    monkeypatch.setattr(np, "unique", lambda a, *args, **kw: sizes.append(np.asarray(a).size) or unique(a, *args, **kw))
    deepcompress.save(model, tmp_path / "declared.dcz")
    assert (tmp_path / "declared.dcz").read_bytes() == (tmp_path / "detected.dcz").read_bytes()
    assert max(sizes) <= 32  # codebooks only (and fc3.bias, 10 values, left to detection)
    with DczFile(tmp_path / "declared.dcz") as f:
        assert f.version == 3 and f.entries["fc1.weight"]["encoding"] == "shared"


def test_declared_shares_skip_tensors_with_further_parametrizations() -> None:
    from deepcompress.parametrize import attach
    from deepcompress.quantize import declared_shares

    class Scale(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    model = lenet()
    share_weights(model, ShareConfig(bits=3))
    attach(model[4], "weight", Scale())
    assert set(declared_shares(model)) == {"0.weight", "6.weight"}
