"""The pruning methods of the literature (issue 12): criteria obd, obs, taylor_filter, l1_filter, apoz,
fpgm, bn_scale and schedules lottery, dns, each against a property it must have."""
import copy

import pytest
import torch
from torch import nn

from deepcompress import criteria, schedules
from deepcompress.criteria import Context
from deepcompress.errors import CompressError
from deepcompress.layerwise import inverse_cholesky
from deepcompress.prune import (
    Mask,
    PruneConfig,
    SplicingMask,
    compute_masks,
    layer_stats,
    masks_of,
    prune,
)
from deepcompress.tasks import Task
from deepcompress.train import TrainConfig

NEW_CRITERIA = ("obd", "obs", "taylor_filter", "l1_filter", "fpgm", "apoz", "bn_scale")
STRUCTURED = ("taylor_filter", "l1_filter", "fpgm", "apoz", "bn_scale")
QUICK = TrainConfig(epochs=2, lr=0.05, quiet=True)


@pytest.fixture(scope="module")
def small(task):
    """The digits task cut to 256 training rows."""
    return Task("small", (task.train[0][:256], task.train[1][:256]), task.val, task.test)


@pytest.fixture(scope="module")
def images(small):
    """The same rows as 1x8x8 images."""
    def as_image(split):
        return split[0].view(-1, 1, 8, 8), split[1]
    return Task("images", as_image(small.train), as_image(small.val), as_image(small.test))


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(288, 16), nn.ReLU(), nn.Linear(16, 10))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def pruned_filters(mask):
    """Indices of the output filters a mask removes whole (and a check that it removes only whole ones)."""
    rows = mask.flatten(1)
    assert torch.all((rows == 0).all(1) | (rows == 1).all(1))
    return set(torch.nonzero(rows[:, 0] == 0).flatten().tolist())


# --- the registry ---------------------------------------------------------------------------------

def test_every_method_is_registered_with_one_line_help():
    assert criteria.names()[2:] == NEW_CRITERIA
    assert schedules.names()[3:] == ("lottery", "dns")
    for name in NEW_CRITERIA:
        cls = criteria.get(name)
        assert cls.structured == (name in STRUCTURED)
        assert "\n" not in cls.__doc__ and "need" in cls.__doc__
    assert not criteria.get("magnitude").structured and not criteria.get("taylor").structured
    for name in ("lottery", "dns"):
        assert "costs" in schedules.get(name).__doc__.splitlines()[0]


# --- obd ---------------------------------------------------------------------------------------------

def test_obd_is_half_the_empirical_fisher_times_w_squared():
    torch.manual_seed(1)
    layer = nn.Linear(3, 2)
    batches = [(torch.randn(5, 3), torch.randn(5, 2)) for _ in range(3)]
    loss = nn.functional.mse_loss
    by_hand = []
    for x, y in batches:
        w = layer.weight.detach().clone().requires_grad_(True)
        loss(x @ w.T + layer.bias.detach(), y).backward()
        by_hand.append(w.grad ** 2)
    fisher = torch.stack(by_hand).mean(0)
    context = Context(model=layer, batches=batches, loss=loss)
    saliency = criteria.get("obd")().saliency("", layer, context)
    assert torch.allclose(saliency, 0.5 * fisher * layer.weight.detach() ** 2, rtol=1e-5, atol=0)
    assert "fisher" in context.cache


def test_obd_keeps_a_small_weight_with_a_large_curvature():
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, 1.0]]))
    x = torch.tensor([[10.0, 0.01]]).repeat(8, 1)  # feature 0 large: curvature of w0 is 10^6 x w1's
    context = Context(model=layer, batches=[(x, torch.zeros(8, 1))], loss=nn.functional.mse_loss)
    by = {c: compute_masks(layer, PruneConfig(criterion=c, sparsity=0.5, min_weights=0), context)[""]
          for c in ("magnitude", "obd")}
    assert by["magnitude"].tolist() == [[0.0, 1.0]]
    assert by["obd"].tolist() == [[1.0, 0.0]]


# --- obs ---------------------------------------------------------------------------------------------

def test_obs_is_w_squared_over_the_inverse_hessian_diagonal():
    torch.manual_seed(2)
    layer = nn.Linear(6, 4)
    x = torch.randn(64, 6) @ torch.randn(6, 6)  # correlated inputs: H^-1 is not diagonal
    context = Context(model=layer, batches=[(x, None)], loss=nn.functional.mse_loss)
    saliency = criteria.get("obs")().saliency("", layer, context)
    h = (x.double().T @ x.double()) / 64
    inverse = torch.linalg.inv(h + 0.01 * h.diagonal().mean() * torch.eye(6, dtype=torch.float64))
    expected = 0.5 * layer.weight.detach().double() ** 2 / inverse.diagonal()
    assert saliency.shape == layer.weight.shape
    assert torch.allclose(saliency.double(), expected, rtol=1e-4)
    upper, _ = inverse_cholesky(h)
    assert torch.allclose((upper ** 2).sum(0), inverse.diagonal(), rtol=1e-6)


def test_obs_prunes_the_weights_of_a_dead_input_first():
    torch.manual_seed(3)
    layer = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        layer.weight.normal_(0, 0.1)
        layer.weight[:, 2] = 5.0  # the largest weights, fed by an input that is always zero
    x = torch.randn(32, 4)
    x[:, 2] = 0
    context = Context(model=layer, batches=[(x, None)], loss=nn.functional.mse_loss)
    masks = {c: compute_masks(layer, PruneConfig(criterion=c, sparsity=0.25, min_weights=0), context)[""]
             for c in ("magnitude", "obs")}
    assert torch.equal(masks["obs"][:, 2], torch.zeros(3)) and int(masks["obs"].sum()) == 9
    assert torch.equal(masks["magnitude"][:, 2], torch.ones(3))


def test_obs_refuses_layers_without_a_hessian():
    net = nn.Sequential(nn.ConvTranspose2d(1, 2, 3), nn.Flatten(), nn.Linear(200, 2))
    context = Context(model=net, batches=[(torch.randn(2, 1, 8, 8), None)], loss=nn.functional.mse_loss)
    with pytest.raises(CompressError, match="obs: layer '0' .*exclude it or use criterion 'obd'"):
        compute_masks(net, PruneConfig(criterion="obs", min_weights=0), context)


# --- structured criteria ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", STRUCTURED)
@pytest.mark.parametrize("alloc", ["layer", "global", "std"])
def test_structured_criteria_score_filters_and_masks_cover_whole_filters(images, name, alloc):
    net = conv_net()
    context = Context.from_task(net, images, n_batches=2)
    layers = {"0": net[0]} if name == "bn_scale" else {"0": net[0], "4": net[4]}
    for layer, module in layers.items():
        saliency = criteria.get(name)().saliency(layer, module, context)
        assert saliency.shape == (module.weight.shape[0],) + (1,) * (module.weight.dim() - 1)
    config = PruneConfig(criterion=name, allocation=alloc, sparsity=0.5, quality=0.5,
                         include=tuple(layers), min_weights=0)
    masks = prune(net, config, context)
    for layer, mask in masks.items():
        assert mask.shape == layers[layer].weight.shape  # compute_masks expanded the group scores
        dead = pruned_filters(mask)
        if alloc == "layer":
            assert len(dead) == mask.shape[0] // 2
        assert torch.all(layers[layer].weight.detach().flatten(1)[sorted(dead)] == 0)
    again = prune(net, config, Context.from_task(net, images, n_batches=2))  # pruned filters stay pruned
    for layer in masks:
        assert pruned_filters(masks[layer]) <= pruned_filters(again[layer])


def conv_with(filters):
    conv = nn.Conv2d(filters.shape[1], filters.shape[0], filters.shape[2], bias=False)
    with torch.no_grad():
        conv.weight.copy_(filters)
    return conv


def test_l1_filter_prunes_the_filter_of_smallest_l1():
    torch.manual_seed(4)
    filters = torch.randn(8, 3, 3, 3)
    filters[5] = 0.3 * torch.sign(filters[5])  # smallest L1 (8.1), yet not holding the smallest weight
    filters[2].view(-1)[0] = 1e-6
    conv = conv_with(filters)
    masks = compute_masks(conv, PruneConfig(criterion="l1_filter", sparsity=1 / 8, min_weights=0))
    assert pruned_filters(masks[""]) == {5}
    rows = nn.Linear(4, 3)
    with torch.no_grad():
        rows.weight.copy_(torch.tensor([[1.0, -1, 1, 1], [0.5, 0.5, -0.5, 0.5], [3, 0, 0, 0]]))
    assert criteria.get("l1_filter")().saliency("", rows, Context()).flatten().tolist() == [4, 2, 3]
    transpose = nn.ConvTranspose2d(3, 5, 2)  # output channels are dim 1 of its weight
    saliency = criteria.get("l1_filter")().saliency("t", transpose, Context())
    assert saliency.shape == (1, 5, 1, 1)
    assert torch.allclose(saliency.flatten(), transpose.weight.detach().abs().sum((0, 2, 3)))


def test_fpgm_prunes_a_duplicated_filter_first():
    torch.manual_seed(5)
    filters = torch.nn.functional.normalize(torch.randn(8, 4 * 3 * 3), dim=1).view(8, 4, 3, 3)
    filters[6] = filters[1]  # same norm as the rest: only their distances tell them apart
    conv = conv_with(filters)
    one = compute_masks(conv, PruneConfig(criterion="fpgm", sparsity=1 / 8, min_weights=0))[""]
    two = compute_masks(conv, PruneConfig(criterion="fpgm", sparsity=2 / 8, min_weights=0))[""]
    assert len(pruned_filters(one)) == 1 and pruned_filters(one) <= {1, 6}
    assert pruned_filters(two) == {1, 6}
    l1 = compute_masks(conv, PruneConfig(criterion="l1_filter", sparsity=2 / 8, min_weights=0))[""]
    assert pruned_filters(l1) != {1, 6}


def test_apoz_prunes_a_channel_that_relu_always_zeroes(small):
    net = mlp()
    with torch.no_grad():
        net[0].weight[7] = 1.0  # the largest row ...
        net[0].bias[7] = -1000.0  # ... always negative: ReLU zeroes it on every input
    context = Context.from_task(net, small, n_batches=2)
    fractions = context.statistic("apoz", criteria.zero_fractions)
    assert fractions["0"][7] == 1.0 and float(fractions["0"].max(0).values) == 1.0
    mask = compute_masks(net, PruneConfig(criterion="apoz", sparsity=1 / 32, include=("0",), min_weights=0),
                         context)["0"]
    assert pruned_filters(mask) == {7}


def test_apoz_reads_the_batchnorm_after_a_conv(images):
    net = conv_net()
    with torch.no_grad():
        net[0].bias[3] = 100.0  # the conv's output is positive ...
        net[1].bias[3] = -1000.0  # ... but the BatchNorm after it makes it negative before the ReLU
    context = Context.from_task(net, images, n_batches=2)
    assert criteria.get("apoz")().saliency("0", net[0], context).flatten()[3] == 0.0
    mask = compute_masks(net, PruneConfig(criterion="apoz", sparsity=1 / 8, include=("0",), min_weights=0),
                         context)["0"]
    assert pruned_filters(mask) == {3}


def test_bn_scale_prunes_the_channels_of_smallest_gamma(images):
    net = conv_net()
    with torch.no_grad():
        net[1].weight.copy_(torch.linspace(1, 2, 8))
        net[1].weight[6] = -1e-3  # importance is |gamma|
    context = Context.from_task(net, images, n_batches=1)
    assert context.statistic("batchnorms", criteria.following_batchnorms) == {"0": "1"}
    mask = compute_masks(net, PruneConfig(criterion="bn_scale", sparsity=2 / 8, include=("0",),
                                          min_weights=0), context)["0"]
    assert pruned_filters(mask) == {0, 6}
    with pytest.raises(CompressError, match="bn_scale: layer '4' is not followed by an affine BatchNorm"):
        compute_masks(net, PruneConfig(criterion="bn_scale", include=("4",), min_weights=0), context)


def test_structured_refusals_and_bad_saliency_shapes(small):
    emb = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 2))
    with pytest.raises(CompressError, match="Embedding, which has no output filters"):
        compute_masks(emb, PruneConfig(criterion="l1_filter", embeddings=True, min_weights=0))
    net = mlp()
    with pytest.raises(CompressError, match="apoz: layer '2' never ran"):
        criteria.get("apoz")().saliency("2", net[2], Context(model=nn.Sequential(net[0]), batches=[(
            small.train[0][:4], None)], loss=nn.functional.cross_entropy))

    class Wrong(criteria.Criterion):
        """Returns the transpose."""
        name = "wrong-shape"

        def saliency(self, name, module, context):
            return module.weight.detach().T

    criteria.register(Wrong)
    try:
        with pytest.raises(CompressError, match="does not broadcast to its weight"):
            compute_masks(net, PruneConfig(criterion="wrong-shape", min_weights=0))
    finally:
        criteria.registry.unregister("wrong-shape")


@pytest.mark.parametrize("name", ["obd", "obs", "apoz", "bn_scale", "taylor_filter"])
def test_data_criteria_without_data_say_so(name):
    net = conv_net()
    with pytest.raises(CompressError, match="needs data"):
        prune(net, PruneConfig(criterion=name, include=("0",), min_weights=0))


# --- schedules: with existing ones and new criteria -------------------------------------------------

@pytest.mark.parametrize("schedule, criterion, alloc", [
    ("iterative", "fpgm", "layer"), ("agp", "obd", "global"), ("oneshot", "obs", "std"),
    ("lottery", "l1_filter", "layer"), ("lottery", "magnitude", "std"), ("dns", "taylor_filter", "global"),
    ("dns", "magnitude", "std"), ("agp", "apoz", "layer"),
])
def test_schedules_and_new_criteria_compose(small, schedule, criterion, alloc):
    net = mlp()
    config = PruneConfig(criterion=criterion, allocation=alloc, sparsity=0.5, quality=0.5, min_weights=0)
    plan = schedules.make(schedule, rounds=2, steps=1)
    plan.run(net, small, config, QUICK)
    masks = masks_of(net)
    assert set(masks) == {"0", "2"} and all(type(m.parametrizations.weight[0]) is Mask for m in (net[0], net[2]))
    for name, mask in masks.items():
        weight = dict(net.named_modules())[name].weight.detach()
        assert torch.all(weight[mask == 0] == 0)
        if alloc == "layer":
            assert int((mask == 0).sum()) == mask.numel() // 2
        if criteria.get(criterion).structured:
            pruned_filters(mask)
    if alloc == "global" and criteria.get(criterion).structured:  # global counts filters: 32 + 10 rows
        assert sum(len(pruned_filters(m)) for m in masks.values()) == 21
    elif alloc == "global":
        assert sum(int((m == 0).sum()) for m in masks.values()) == (2048 + 320) // 2


# --- lottery -------------------------------------------------------------------------------------------

def test_lottery_rewinds_survivors_to_their_initial_values(small):
    net = mlp()
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    history = schedules.Lottery(final_epochs=0).run(net, small, PruneConfig(sparsity=0.8, min_weights=0), QUICK)
    assert [row["round"] for row in history] == [1, 1]
    masks = masks_of(net)
    for name in ("0", "2"):
        weight, mask = dict(net.named_modules())[name].weight.detach(), masks[name]
        assert int((mask == 0).sum()) == round(0.8 * mask.numel())
        assert torch.equal(weight, initial[f"{name}.weight"] * mask)  # survivors at their initial values
        assert torch.equal(dict(net.named_modules())[name].bias.detach(), initial[f"{name}.bias"])
    at_init = compute_masks(mlp(), PruneConfig(sparsity=0.8, min_weights=0))
    assert not torch.equal(at_init["0"], masks["0"])  # the ticket was chosen by the trained weights


def test_lottery_late_rewinding_and_rounds(small):
    net = mlp()
    early = mlp()
    from deepcompress.train import fit
    fit(early, small, TrainConfig(epochs=1, lr=0.05, quiet=True, seed=QUICK.seed + 1))
    schedules.Lottery(rounds=2, rewind_epoch=1, final_epochs=0).run(
        net, small, PruneConfig(sparsity=0.75, min_weights=0), QUICK)
    for name in ("0", "2"):
        mask = masks_of(net)[name]
        assert int((mask == 0).sum()) == round(0.75 * mask.numel())
        assert torch.equal(dict(net.named_modules())[name].weight.detach(),
                           dict(early.named_modules())[name].weight.detach() * mask)
    with pytest.raises(CompressError, match="rewind_epoch 3 is past the 2 training epochs"):
        schedules.Lottery(rewind_epoch=3).run(mlp(), small, PruneConfig(), QUICK)
    with pytest.raises(CompressError, match="need rounds >= 1"):
        schedules.Lottery(rounds=0)


def test_lottery_full_run_trains_the_ticket(small):
    net = mlp()
    initial = net[0].weight.detach().clone()
    history = schedules.Lottery().run(net, small, PruneConfig(sparsity=0.9, min_weights=0), QUICK)
    assert [row["round"] for row in history] == [1, 1, 2, 2]
    assert {s.name: s.total - s.nonzero for s in layer_stats(net)} == {"0": 1843, "2": 288}
    mask = masks_of(net)["0"]
    trained = net[0].weight.detach()
    assert not torch.equal(trained, initial * mask) and torch.all(trained[mask == 0] == 0)  # the ticket retrained


# --- dns -------------------------------------------------------------------------------------------------

def test_splicing_mask_passes_gradients_to_pruned_shadow_weights():
    torch.manual_seed(6)
    for kind, expect_zero in ((Mask, True), (SplicingMask, False)):
        layer = nn.Linear(4, 3)
        prune(layer, PruneConfig(sparsity=0.5, min_weights=0))
        mask = layer.parametrizations.weight[0].mask.clone()
        layer.parametrizations.weight[0] = kind(mask)
        out = layer(torch.randn(5, 4))
        assert torch.equal(layer.weight.detach() == 0, mask == 0)  # the same forward value
        out.sum().backward()
        grad = layer.parametrizations.weight.original.grad
        assert bool((grad[mask == 0] == 0).all()) == expect_zero


def toy_regression():
    """y = 3 x1: w = [1.0, 0.1] starts with the wrong weight large; pruning half drops w1 first."""
    torch.manual_seed(7)
    x = torch.randn(256, 2)
    data = (x, 3 * x[:, 1:])
    task = Task("toy", data, data, data, loss=nn.functional.mse_loss,
                metric=lambda out, y: -float(nn.functional.mse_loss(out, y)))
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.1]]))
    return layer, task


def test_dns_lets_a_pruned_weight_come_back():
    config = PruneConfig(sparsity=0.5, min_weights=0)
    train = TrainConfig(epochs=4, lr=0.1, momentum=0.0, batch_size=32, quiet=True)
    layer, task = toy_regression()
    schedules.OneShot().run(layer, task, config, train)
    assert masks_of(layer)[""].tolist() == [[1.0, 0.0]]  # a fixed mask: w1 stays pruned
    layer, task = toy_regression()
    schedules.DNS().run(layer, task, config, train)
    assert masks_of(layer)[""].tolist() == [[0.0, 1.0]]  # spliced back, and w0 pruned instead
    assert float(layer.weight.detach()[0, 1]) == pytest.approx(3.0, abs=0.2)
    assert type(layer.parametrizations.weight[0]) is Mask
    assert float(layer.parametrizations.weight.original.detach()[0, 0]) == 0.0  # settled: shadow zeroed


def test_dns_on_digits_keeps_exact_sparsity_while_masks_move(small):
    net = mlp()
    first = compute_masks(net, PruneConfig(sparsity=0.8, min_weights=0))
    schedules.DNS(every=1).run(net, small, PruneConfig(sparsity=0.8, min_weights=0),
                               TrainConfig(epochs=3, lr=0.05, quiet=True))
    masks = masks_of(net)
    for name, mask in masks.items():
        assert int((mask == 0).sum()) == round(0.8 * mask.numel())
        assert int(((first[name] == 0) & (mask == 1)).sum()) > 0  # some pruned weights returned
        assert torch.all(dict(net.named_modules())[name].parametrizations.weight.original[mask == 0] == 0)
    assert {s.name: s.total - s.nonzero for s in layer_stats(net)} == {"0": 1638, "2": 256}
    with pytest.raises(CompressError, match="every 0"):
        schedules.DNS(every=0)


def test_dns_continues_from_an_existing_mask_and_copies_cleanly(small):
    net = mlp()
    prune(net, PruneConfig(sparsity=0.5, min_weights=0))
    clone = copy.deepcopy(net)
    schedules.DNS().run(net, small, PruneConfig(sparsity=0.7, min_weights=0), QUICK)
    assert len(net[0].parametrizations.weight) == 1 and type(net[0].parametrizations.weight[0]) is Mask
    assert type(clone[0].parametrizations.weight[0]) is Mask  # the copy was left alone
    assert float((masks_of(net)["0"] == 0).float().mean()) == pytest.approx(0.7, abs=1 / 2048)
