"""Layer-wise second-order compression: OBS pruning, GPTQ onto a codebook, the model-level pass, save/load."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deepcompress
from deepcompress.calibration import collect_hessians
from deepcompress.errors import CompressError
from deepcompress.layerwise import (
    compress_layerwise,
    fit_codebook,
    gptq_quantize,
    nearest,
    obs_prune,
    output_error,
)
from deepcompress.parametrize import baked_state_dict
from deepcompress.prune import sparsity_mask
from deepcompress.quantize import SharedWeight


def correlated_layer(out: int = 48, d: int = 150, n: int = 1500, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight and H = X^T X / n of strongly correlated inputs (a few latent factors plus noise)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, d // 5, generator=g) @ torch.randn(d // 5, d, generator=g)
    x = latent + 0.3 * torch.randn(n, d, generator=g)
    return torch.randn(out, d, generator=g), (x.T @ x / n).double()


def test_obs_beats_magnitude_and_prunes_exactly() -> None:
    w, h = correlated_layer()
    for sparsity in (0.5, 0.8):
        pruned, keep = obs_prune(w, h, sparsity, blocksize=64)
        magnitude = w * sparsity_mask(w, sparsity)
        obs_err, mag_err = output_error(w, pruned, h), output_error(w, magnitude, h)
        assert obs_err < 0.7 * mag_err, (sparsity, obs_err, mag_err)
        assert int((pruned == 0).sum()) == round(sparsity * w.numel())
        assert torch.equal(pruned == 0, keep == 0)


@pytest.mark.parametrize("shape, sparsity, blocksize, act_order", [
    ((7, 33), 0.37, 8, False), ((5, 40), 0.9, 128, True), ((3, 10), 0.05, 3, False), ((4, 4), 0.0, 2, False),
])
def test_pruned_fraction_is_exact(shape, sparsity: float, blocksize: int, act_order: bool) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g)
    x = torch.randn(100, shape[1], generator=g)
    h = x.T @ x
    h[:, 2] = h[2, :] = 0  # a dead input column
    pruned, keep = obs_prune(w, h, sparsity, blocksize=blocksize, act_order=act_order)
    assert int((pruned == 0).sum()) == int((keep == 0).sum()) == round(sparsity * w.numel())
    assert pruned.dtype == w.dtype and pruned.shape == w.shape


def test_gptq_beats_nearest_and_keeps_codebook_and_zeros() -> None:
    w, h = correlated_layer(seed=2)
    pruned, keep = obs_prune(w, h, 0.6)
    codebook = fit_codebook(pruned, 16, importance=h.diagonal().reshape(1, -1))
    assert codebook.numel() <= 16 and torch.all(codebook[1:] > codebook[:-1])
    quant, index = gptq_quantize(w, h, codebook, mask=keep)
    rounded = torch.where(keep.bool(), codebook[nearest(pruned, codebook)], 0.0)
    assert output_error(w, quant, h) < output_error(w, rounded, h)
    assert torch.all(quant[keep == 0] == 0)
    assert torch.equal(index == -1, quant == 0)
    assert torch.equal(codebook[index[index >= 0].long()], quant[index >= 0])
    # without pruning, on the dense weight, against nearest-centroid of the same codebook
    book = fit_codebook(w, 8)
    dense_q, _ = gptq_quantize(w, h, book)
    assert output_error(w, dense_q, h) < 0.8 * output_error(w, book[nearest(w, book)], h)
    assert set(torch.unique(dense_q).tolist()) <= set(book.tolist())


def test_weighted_codebook_lowers_weighted_error() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(20, 50, generator=g)
    importance = torch.rand(1, 50, generator=g) ** 4
    plain, weighted = fit_codebook(w, 4), fit_codebook(w, 4, importance=importance)

    def cost(book: torch.Tensor) -> float:
        return float((importance * (w - book[nearest(w, book)]) ** 2).sum())

    assert cost(weighted) < cost(plain)


class Net(nn.Module):
    """Conv1d, Conv2d with a (k, 1) kernel (CREPE's) and Linear layers, functional ops between."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 8, 5, padding=2)
        self.conv2 = nn.Conv2d(8, 8, (3, 1), padding=(1, 0))
        self.fc = nn.Linear(8 * 16, 32)
        self.head = nn.Linear(32, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x)).unsqueeze(-1)
        h = torch.relu(self.conv2(h)).flatten(1)
        return self.head(torch.relu(self.fc(h)))


def calibration(n: int = 96, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.randn(n, 2, 20, generator=g).cumsum(-1)[..., 4:] / 3  # correlated along time
    return list(smooth.split(32))


def test_compress_layerwise_model_save_load(tmp_path) -> None:
    torch.manual_seed(0)
    model = Net()
    reference = Net()
    reference.load_state_dict(model.state_dict())
    batches = calibration()
    dense_h = collect_hessians(model, batches)
    results = compress_layerwise(model, batches, sparsity={"head": 0.25, "*": 0.5}, bits="conv=5,linear=4")
    assert [r.layer for r in results] == ["conv1", "conv2", "fc", "head"]
    for r in results:
        module = dict(model.named_modules())[r.layer]
        w = module.weight.detach()
        bits = 5 if r.layer.startswith("conv") else 4
        target = 0.25 if r.layer == "head" else 0.5
        assert r.sparsity == int((w == 0).sum()) / w.numel() == round(target * w.numel()) / w.numel()
        assert r.clusters == torch.unique(w[w != 0]).numel() <= 1 << bits
        assert isinstance(module.parametrizations.weight[0], SharedWeight)
        assert 0 <= r.error < 1 and r.method == "obs"
    first = results[0]
    assert first.error == pytest.approx(output_error(reference.conv1.weight, model.conv1.weight, dense_h["conv1"].mean()))

    # end to end, the second-order pass beats magnitude + plain k-means at the same settings
    baseline = Net()
    baseline.load_state_dict(reference.state_dict())
    for m in (baseline.conv1, baseline.conv2, baseline.fc, baseline.head):
        with torch.no_grad():
            w = m.weight * sparsity_mask(m.weight, 0.25 if m is baseline.head else 0.5)
            book = fit_codebook(w, 32 if m in (baseline.conv1, baseline.conv2) else 16)
            m.weight.copy_(torch.where(w != 0, book[nearest(w, book)], 0.0))
    x = torch.cat(calibration(seed=5))
    with torch.no_grad():
        want = reference(x)
        ours, theirs = (float(((m(x) - want) ** 2).mean()) for m in (model, baseline))
    assert ours < theirs

    path = tmp_path / "net.dcz"
    deepcompress.save(model, path)
    state = baked_state_dict(model)
    loaded = deepcompress.load_state_dict(path)
    assert state.keys() == loaded.keys()
    for key, value in state.items():
        assert value.dtype == loaded[key].dtype
        assert torch.equal(value.view(torch.int32), loaded[key].view(torch.int32)), key


def test_prune_only_plain_install_and_bad_settings() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(18, 12), nn.ReLU(), nn.Linear(12, 4))
    batches = [torch.randn(40, 18)]
    results = compress_layerwise(model, batches, sparsity=0.5, bits=None, exclude=("2",))
    assert [r.layer for r in results] == ["0"] and results[0].clusters == 0
    assert int((model[0].weight == 0).sum()) == 108 and hasattr(model[0], "parametrizations")
    results = compress_layerwise(model, batches, sparsity=None, bits=2, install="plain", max_columns=12)
    assert [r.method for r in results] == ["magnitude", "obs"]  # layer 0 has 18 > 12 columns
    assert not hasattr(model[2], "parametrizations") and torch.unique(model[2].weight).numel() <= 4
    for kwargs in ({"sparsity": 1.0}, {"bits": 9}, {"install": "mask"}, {"include": ("nope",)},
                   {"blocksize": 0}):
        with pytest.raises(CompressError):
            compress_layerwise(model, batches, **kwargs)


@pytest.mark.parametrize("max_columns", [16384, 12])  # the second-order path, the data-free one
def test_a_masked_layer_keeps_exactly_its_zeros_when_shared_later(max_columns: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(18, 12), nn.ReLU(), nn.Linear(12, 4))
    batches = [torch.randn(40, 18)]
    compress_layerwise(model, batches, sparsity=0.5, bits=None)  # Masks, as before retraining
    zeros = {name: model[i].weight.detach() == 0 for i, name in ((0, "0"), (2, "2"))}
    with torch.no_grad():  # retraining moves the survivors (the mask keeps the rest at 0)
        for i in (0, 2):
            model[i].parametrizations.weight.original.add_(0.05)
    compress_layerwise(model, batches, sparsity=None, bits=3, max_columns=max_columns)
    for i, name in ((0, "0"), (2, "2")):
        w = model[i].weight.detach()
        assert torch.equal(w == 0, zeros[name]), name
        assert torch.unique(w[w != 0]).numel() <= 8


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse(dtype) -> None:
    from deepcompress.layerwise import inverse_cholesky

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 40, generator=g, dtype=dtype)
    x[:, 7] = 0  # an input that is always zero: a dead column
    h = x.T @ x / 300
    kept = h.clone()
    upper, dead = inverse_cholesky(h, damp=0.01)
    assert torch.equal(h, kept)  # H itself untouched
    assert dead.tolist() == [i == 7 for i in range(40)]
    assert torch.equal(upper, upper.triu()) and upper.dtype == dtype
    mean = float(h.diagonal()[~dead].mean())
    damped = h.double().clone()
    damped[7, 7] = mean
    damped += 0.01 * mean * torch.eye(40, dtype=torch.float64)
    want = torch.linalg.inv(damped)
    got = upper.double().T @ upper.double()
    assert float((got - want).abs().max() / want.abs().max()) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_the_inverse_factor_and_a_matrix_that_is_not_positive_definite() -> None:
    from deepcompress.layerwise import _inverse_upper

    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 30, generator=g, dtype=torch.float64)
    h = x.T @ x / 200 + 0.01 * torch.eye(30, dtype=torch.float64)
    want = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    reversed_h = h.flip(0, 1)
    assert torch.allclose(_inverse_upper(reversed_h), want, rtol=1e-10, atol=1e-12)
    assert torch.equal(reversed_h, reversed_h.tril())  # overwritten by its Cholesky factor
    assert _inverse_upper(-h.flip(0, 1)) is None


@pytest.mark.parametrize("n, leaf", [(1, 4), (37, 4), (64, 8), (5, 1024)])
def test_the_reversed_lower_inverse_by_halves_is_the_inverse_reversed(n, leaf) -> None:
    from deepcompress.layerwise import _reversed_lower_inverse

    g = torch.Generator().manual_seed(n)
    x = torch.randn(2 * n, n, generator=g, dtype=torch.float64)
    lower = torch.linalg.cholesky(x.T @ x / (2 * n) + 0.1 * torch.eye(n, dtype=torch.float64))
    out = torch.zeros_like(lower)
    _reversed_lower_inverse(lower, out, leaf)
    got = out.flip(0, 1)
    assert torch.equal(got, got.tril())
    assert torch.allclose(got @ lower, torch.eye(n, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("act_order", [False, True])
def test_one_factored_hessian_serves_both_sweeps_as_the_plain_one_does(act_order) -> None:
    from deepcompress.layerwise import factor

    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 48, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2, 48, dtype=torch.float64)
    h = x.T @ x / 400
    w = torch.randn(16, 48, generator=g)
    f = factor(h, 0.01, act_order)
    pruned, keep = obs_prune(w, h, 0.5, act_order=act_order)
    got = obs_prune(w, f, 0.5)
    assert torch.equal(got[0], pruned) and torch.equal(got[1], keep)
    book = torch.linspace(-1, 1, 8)
    want = gptq_quantize(w, h, book, mask=keep, act_order=act_order)
    got = gptq_quantize(w, f, book, mask=keep)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
