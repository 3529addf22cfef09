"""Magnitude pruning: masks, allocations, schedules, bake, DDP, bad input."""
import copy
import io
import math
import os
import pickle

import pytest
import spawn  # tests/spawn.py
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from deepcompress.bake import bake
from deepcompress.errors import CompressError
from deepcompress.models import digits_mlp, lenet5
from deepcompress.prune import (
    Mask,
    PruneConfig,
    compute_masks,
    global_masks,
    layer_stats,
    masks_of,
    overall_density,
    prune,
    rescale_dropout,
    select_layers,
    sparsity_mask,
    std_mask,
)
from deepcompress.schedules import (
    AGPConfig,
    IterativeConfig,
    agp_sparsity,
    prune_agp,
    prune_iterative,
    prune_one_shot,
)
from deepcompress.train import TrainConfig, evaluate

QUICK = TrainConfig(epochs=2, lr=0.05, quiet=True)


@pytest.fixture
def model(trained):
    return copy.deepcopy(trained)


def effective(model):
    return {name: m.weight.detach().clone() for name, m in model.named_modules()
            if isinstance(m, nn.Linear)}


def assert_pruned_zero(model):
    for name, mask in masks_of(model).items():
        weight = dict(model.named_modules())[name].weight
        assert torch.all(weight[mask == 0] == 0), name


# --- masks as parametrizations -------------------------------------------------------------

def test_mask_is_a_parametrization_buffer(model):
    prune(model, PruneConfig(sparsity=0.5))
    assert isinstance(model.fc1.parametrizations.weight[0], Mask)
    keys = model.state_dict().keys()
    assert "fc1.parametrizations.weight.0.mask" in keys
    assert "fc1.parametrizations.weight.original" in keys
    assert not model._forward_hooks and not model.fc1._forward_pre_hooks
    # the underlying parameter is zeroed too, not only the forward value
    assert torch.all(model.fc1.parametrizations.weight.original[model.fc1.parametrizations.weight[0].mask == 0] == 0)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=1e-3),
    lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=1e-3),
])
def test_masks_survive_optimizer_steps(model, task, make_opt):
    # momentum / Adam state built up while dense would move pruned weights if nothing masked them
    opt = make_opt(model.parameters())
    x, y = task.train
    for _ in range(3):
        opt.zero_grad()
        task.loss(model(x[:64]), y[:64]).backward()
        opt.step()
    prune(model, PruneConfig(sparsity=0.7))
    before = effective(model)
    for i in range(5):
        opt.zero_grad()
        task.loss(model(x[64 * i:64 * i + 64]), y[64 * i:64 * i + 64]).backward()
        opt.step()
    assert_pruned_zero(model)
    after = effective(model)
    assert not torch.equal(before["fc1"], after["fc1"])  # the survivors did train
    assert layer_stats(model)[0].sparsity == pytest.approx(0.7, abs=1 / 19200)


def test_deepcopy_pickle_state_dict_round_trip(model, task):
    prune(model, PruneConfig(sparsity=0.8))
    x = task.test[0][:16]
    expected = model(x)
    clone = copy.deepcopy(model)
    # torch refuses to pickle a parametrized module whole; the mask module itself pickles
    # with its buffer, and the parametrized model pickles once its parametrizations hold it
    mask = pickle.loads(pickle.dumps(model.fc1.parametrizations.weight[0]))
    assert torch.equal(mask.mask, masks_of(model)["fc1"])
    unpickled = copy.deepcopy(model)
    unpickled.fc1.parametrizations.weight[0] = mask
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = digits_mlp()
    prune(fresh, PruneConfig(sparsity=0.1))  # same parametrization structure, different masks
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for other in (clone, unpickled, fresh):
        assert torch.equal(other(x), expected)
        for name, mask in masks_of(model).items():
            assert torch.equal(masks_of(other)[name], mask)
    baked = pickle.loads(pickle.dumps(bake(copy.deepcopy(model))))
    assert torch.equal(baked(x), expected)
    assert torch.equal(baked.fc1.weight == 0, masks_of(model)["fc1"] == 0)
    double = copy.deepcopy(model).to(torch.float64)
    assert masks_of(double)["fc1"].dtype == torch.float64
    assert torch.equal(double.fc1.weight == 0, model.fc1.weight == 0)


def test_prune_again_only_grows_sparsity(model):
    first = {k: v.clone() for k, v in prune(model, PruneConfig(sparsity=0.5)).items()}
    second = prune(model, PruneConfig(sparsity=0.8))
    for name in first:
        assert torch.all(second[name][first[name] == 0] == 0)
    assert len(model.fc1.parametrizations.weight) == 1  # updated, not stacked


# --- allocations of magnitude -------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40), cols=st.integers(1, 40),
    sparsity=st.floats(0.0, 0.999), levels=st.integers(1, 1000), seed=st.integers(0, 2**16),
)
def test_sparsity_solver_is_exact_even_with_ties(rows, cols, sparsity, levels, seed):
    g = torch.Generator().manual_seed(seed)
    # few distinct values => many ties, which a threshold alone could not split
    weight = (torch.randint(-levels, levels + 1, (rows, cols), generator=g) / levels).float()
    mask = sparsity_mask(weight, sparsity)
    n = weight.numel()
    pruned = int((mask == 0).sum())
    assert abs(pruned - sparsity * n) <= 0.5 + 1e-9
    if 0 < pruned < n:
        assert weight[mask == 0].abs().max() <= weight[mask == 1].abs().min()


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=4),
       sparsity=st.floats(0.0, 0.999), seed=st.integers(0, 2**16))
def test_global_solver_is_exact(sizes, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    weights = {f"l{i}": torch.randn(n, generator=g).round(decimals=1) for i, n in enumerate(sizes)}
    masks = global_masks(weights, sparsity)
    total = sum(sizes)
    pruned = sum(int((m == 0).sum()) for m in masks.values())
    assert abs(pruned - sparsity * total) <= 0.5 + 1e-9
    kept = torch.cat([weights[k][masks[k] == 1].abs() for k in weights])
    dropped = torch.cat([weights[k][masks[k] == 0].abs() for k in weights])
    if len(kept) and len(dropped):
        assert dropped.max() <= kept.min()


def test_std_allocation_uses_quality_times_std(model):
    w = model.fc2.weight.detach().clone()
    masks = compute_masks(model, PruneConfig(allocation="std", quality=0.8, layers={"fc3": 0.2}))
    assert torch.equal(masks["fc2"], (w.abs() >= 0.8 * w.std()).float())
    assert torch.equal(masks["fc3"], std_mask(model.fc3.weight, 0.2))
    assert 0.3 < float((masks["fc2"] == 0).float().mean()) < 0.8


def test_global_allocation_with_override(model):
    masks = compute_masks(model, PruneConfig(allocation="global", sparsity=0.9, layers={"fc3": 0.5}))
    assert int((masks["fc3"] == 0).sum()) == 500
    pruned = int((masks["fc1"] == 0).sum() + (masks["fc2"] == 0).sum())
    assert pruned == round(0.9 * (19200 + 30000))
    # global: per-layer sparsities differ, set by magnitude across layers
    assert float((masks["fc1"] == 0).float().mean()) != pytest.approx(0.9, abs=1e-3)


def test_selection_size_threshold_patterns_and_types():
    net = lenet5()
    assert set(select_layers(net, PruneConfig())) == {"conv2", "fc1", "fc2"}  # conv1: 500 weights
    assert "conv1" in select_layers(net, PruneConfig(layers={"conv1": 0.3}))
    assert set(select_layers(net, PruneConfig(include=("fc*",)))) == {"fc1", "fc2"}
    assert set(select_layers(net, PruneConfig(exclude=("fc2",)))) == {"conv2", "fc1"}
    assert set(select_layers(net, PruneConfig(types=(nn.Conv2d,)))) == {"conv2"}
    emb = nn.Sequential(nn.Embedding(100, 20), nn.Linear(20, 100))
    assert set(select_layers(emb, PruneConfig())) == {"1"}
    assert set(select_layers(emb, PruneConfig(embeddings=True))) == {"0", "1"}
    prune(emb, PruneConfig(embeddings=True, sparsity=0.5))
    assert int((emb[0].weight == 0).sum()) == 1000


def test_conv_transpose_and_conv1d_are_prunable():
    net = nn.Sequential(nn.Conv1d(8, 16, 9), nn.ConvTranspose2d(16, 8, 3), nn.Conv3d(4, 8, 3))
    masks = prune(net, PruneConfig(sparsity=0.5, min_weights=1))
    assert set(masks) == {"0", "1", "2"}
    assert all(int((m == 0).sum()) == m.numel() // 2 for m in masks.values())


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": -0.1}, "sparsity"),
    ({"criterion": "random"}, "criterion"),
    ({"allocation": "random"}, "allocation"),
    ({"layers": {"fc1": 1.5}}, "fc1"),
    ({"quality": -1.0}, "quality"),
])
def test_bad_config_raises(kwargs, message):
    with pytest.raises(CompressError, match=message) as info:
        PruneConfig(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("config, message", [
    (PruneConfig(include=("decoder.*",)), "matches no prunable layer"),
    (PruneConfig(layers={"fc9": 0.5}), "fc9"),
    (PruneConfig(exclude=("conv*",)), "conv"),
])
def test_pattern_matching_nothing_raises(model, config, message):
    with pytest.raises(CompressError, match=message):
        prune(model, config)


def test_model_without_prunable_layer_raises():
    with pytest.raises(CompressError, match="no prunable layer"):
        prune(nn.Sequential(nn.ReLU(), nn.Linear(3, 3)), PruneConfig())


def test_agp_rejects_std_and_short_training(model, task):
    with pytest.raises(CompressError, match="std"):
        prune_agp(model, task, PruneConfig(allocation="std"), AGPConfig(steps=1), QUICK)
    with pytest.raises(CompressError, match="epochs"):
        prune_agp(model, task, PruneConfig(), AGPConfig(steps=5), QUICK)


# --- bake -----------------------------------------------------------------------------------

class Halve(nn.Module):
    def forward(self, x):
        return x / 2


def test_bake_leaves_plain_modules_holding_zeros(model, task):
    prune(model, PruneConfig(sparsity=0.6))
    parametrize.register_parametrization(model.fc1, "bias", Halve())  # some other parametrization
    x = task.test[0][:8]
    expected = model(x)
    zeros = model.fc2.weight == 0
    assert bake(model) is model
    assert type(model.fc1) is nn.Linear and type(model.fc2) is nn.Linear
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert set(model.state_dict()) == set(digits_mlp().state_dict())
    assert torch.equal(model.fc2.weight == 0, zeros)
    assert int(zeros.sum()) == 18000
    assert torch.allclose(model(x), expected)


def test_bake_or_prune_on_a_copy_leaves_the_original_intact(model, task):
    prune(model, PruneConfig(sparsity=0.6))
    x = task.test[0][:8]
    expected = model(x)
    bake(copy.deepcopy(model))
    assert torch.equal(model(x), expected)
    # torch's generated class is shared by deepcopies; a new parametrization must not leak
    plain = digits_mlp()
    parametrize.register_parametrization(plain.fc1, "bias", Halve())
    expected = plain(x)
    prune(copy.deepcopy(plain), PruneConfig(sparsity=0.5))
    assert torch.equal(plain(x), expected)
    assert not parametrize.is_parametrized(plain.fc1, "weight")


# --- schedules on digits ---------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    PruneConfig(allocation="layer", sparsity=0.8),
    PruneConfig(allocation="global", sparsity=0.8),
    PruneConfig(allocation="std", quality=1.0),
])
def test_one_shot_each_allocation_retrains(model, task, config):
    history = prune_one_shot(model, task, config, QUICK)
    assert len(history) == 2 and all(row["round"] == 1 for row in history)
    stats = layer_stats(model)
    if config.allocation != "std":
        assert overall_density(stats) == pytest.approx(0.2, abs=1e-4)
    else:
        assert 0.3 < overall_density(stats) < 0.8
    assert_pruned_zero(model)
    assert evaluate(model, task, "test") > 0.85


def test_iterative_grows_sparsity_geometrically(model, task):
    history = prune_iterative(model, task, PruneConfig(sparsity=0.9, layers={"fc3": 0.5}),
                              IterativeConfig(rounds=2), TrainConfig(epochs=1, lr=0.05, quiet=True))
    seen = [row["round"] for row in history]
    assert seen == [1, 2]
    stats = {s.name: s for s in layer_stats(model)}
    assert stats["fc1"].sparsity == pytest.approx(0.9, abs=1 / 19200)
    assert stats["fc3"].sparsity == pytest.approx(0.5, abs=1e-3)
    assert evaluate(model, task, "test") > 0.85


def test_agp_curve():
    agp = AGPConfig(initial_sparsity=0.2, start_epoch=2, steps=4, every=2)
    assert agp_sparsity(0, 0.9, agp) == pytest.approx(0.2)
    assert agp_sparsity(2, 0.9, agp) == pytest.approx(0.2)
    assert agp_sparsity(6, 0.9, agp) == pytest.approx(0.9 - 0.7 * 0.5 ** 3)
    assert agp_sparsity(10, 0.9, agp) == pytest.approx(0.9)
    assert agp_sparsity(99, 0.9, agp) == pytest.approx(0.9)
    values = [agp_sparsity(t, 0.9, agp) for t in range(12)]
    assert values == sorted(values)


def test_agp_raises_sparsity_during_training(model, task):
    history = prune_agp(model, task, PruneConfig(sparsity=0.9), AGPConfig(steps=3),
                        TrainConfig(epochs=5, lr=0.05, quiet=True))
    densities = overall_density(layer_stats(model))
    assert densities == pytest.approx(0.1, abs=1e-4)
    # the restored best checkpoint comes from an epoch at the final sparsity
    best = [row["epoch"] for row in history if row["best"]]
    assert best and best[0] >= 2
    assert evaluate(model, task, "test") > 0.85


def test_dropout_rescaled_by_sqrt_density_ratio():
    net = nn.Sequential(nn.Linear(40, 50), nn.ReLU(), nn.Dropout(0.5), nn.Linear(50, 10))
    before = {s.name: s.density for s in layer_stats(net)}
    prune(net, PruneConfig(sparsity=0.75, include=("0",)))
    after = {s.name: s.density for s in layer_stats(net)}
    rates = rescale_dropout(net, before, {"0": after["0"]})
    assert rates == {"2": pytest.approx(0.5 * math.sqrt(0.25))}
    assert net[2].p == pytest.approx(0.25)


def test_iterative_with_dropout_rescaling(task):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Dropout(0.4), nn.Linear(100, 10))
    prune_iterative(net, task, PruneConfig(sparsity=0.84, include=("0",)),
                    IterativeConfig(rounds=2, rescale_dropout=True), TrainConfig(epochs=1, quiet=True))
    assert net[2].p == pytest.approx(0.4 * math.sqrt(0.16), abs=1e-3)


# --- DistributedDataParallel ------------------------------------------------------------------


def _ddp_worker(rank, world, out):
    torch.manual_seed(0)
    model = digits_mlp()
    with torch.no_grad():  # ranks disagree on weights: masks must still agree
        model.fc1.weight.add_(torch.randn_like(model.fc1.weight) * rank)
    prune(model, PruneConfig(sparsity=0.8))
    first = {k: v.clone() for k, v in masks_of(model).items()}
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(rank)  # each rank sees different data
    for step in range(6):
        if step == 3:
            prune(ddp, PruneConfig(sparsity=0.9))
        x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    torch.save({"first": first, "masks": {k: v.clone() for k, v in masks_of(model).items()},
                "weights": effective(model)}, os.path.join(out, f"rank{rank}.pt"))


def test_ddp_two_ranks_keep_identical_masks_and_zeros(tmp_path):
    spawn.run(_ddp_worker, 2, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert set(r0["masks"]) == {"fc1", "fc2", "fc3"}
    assert torch.equal(r0["first"]["fc1"], r1["first"]["fc1"])  # before DDP could sync buffers
    for name, mask in r0["masks"].items():
        assert torch.equal(mask, r1["masks"][name])
        assert int((mask == 0).sum()) == round(0.9 * mask.numel())
        for r in (r0, r1):
            assert torch.all(r["weights"][name][mask == 0] == 0)
        assert torch.allclose(r0["weights"][name], r1["weights"][name])
