"""The pruning seam: criteria x allocations x schedules, the registries, the context, taylor."""
import copy
import warnings

import pytest
import torch
from torch import nn

from deepcompress import allocation, criteria, schedules
from deepcompress.criteria import Context, Criterion, Magnitude, Taylor, gradients
from deepcompress.errors import CompressError
from deepcompress.prune import PruneConfig, compute_masks, masks_of, prune
from deepcompress.tasks import Task
from deepcompress.train import TrainConfig

TINY_TRAIN = TrainConfig(epochs=2, lr=0.05, batch_size=64, quiet=True)


@pytest.fixture(scope="module")
def tiny_task(task):
    """The digits task cut to 256 training rows (fast schedules)."""
    return Task("tiny", (task.train[0][:256], task.train[1][:256]), task.val, task.test)


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def pruned_fraction(masks):
    return sum(int((m == 0).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


# --- registries -----------------------------------------------------------------------------

def test_registries_hold_the_vocabulary():
    assert criteria.names() == ("magnitude", "taylor", "obd", "obs", "taylor_filter", "l1_filter",
                                "fpgm", "apoz", "bn_scale")
    assert allocation.names() == ("global", "layer", "std")
    assert schedules.names() == ("iterative", "oneshot", "agp", "lottery", "dns")
    assert criteria.get("magnitude") is Magnitude and criteria.get("taylor") is Taylor
    assert allocation.get("std").target == "quality"
    assert schedules.get("agp") is schedules.AGPConfig


@pytest.mark.parametrize("registry, kind, known", [
    (criteria, "criterion", "magnitude, taylor, obd, obs, taylor_filter, l1_filter, fpgm, apoz, bn_scale"),
    (allocation, "allocation", "global, layer, std"),
    (schedules, "schedule", "iterative, oneshot, agp, lottery, dns"),
])
def test_unknown_names_list_the_known_ones(registry, kind, known):
    with pytest.raises(CompressError, match=f"{kind} 'hessian': unknown; use one of {known}$") as info:
        registry.get("hessian")
    assert "\n" not in str(info.value)


def test_unknown_names_in_configs():
    with pytest.raises(CompressError, match="magnitude, taylor"):
        PruneConfig(criterion="hessian")
    with pytest.raises(CompressError, match="global, layer, std"):
        PruneConfig(allocation="everywhere")


def test_make_takes_only_the_settings_a_schedule_has():
    settings = {"rounds": 2, "initial_sparsity": 0.3, "steps": 4}
    assert schedules.make("iterative", **settings) == schedules.Iterative(rounds=2)
    assert schedules.make("oneshot", **settings) == schedules.OneShot()
    assert schedules.make("agp", **settings) == schedules.AGP(initial_sparsity=0.3, steps=4)


class L1Rows(Criterion):
    """Structured: one score per output row (a Linear's neuron, a conv's filter), its L1 norm."""

    name = "l1-rows"

    def saliency(self, name, module, context):
        w = module.weight.detach()
        return w.abs().flatten(1).sum(1).view(-1, *([1] * (w.dim() - 1)))


@pytest.fixture
def l1_rows():
    criteria.register(L1Rows)
    yield L1Rows
    criteria.registry.unregister(L1Rows.name)


@pytest.mark.parametrize("alloc", ["layer", "global"])
def test_a_structured_criterion_plugs_in_as_one_class(l1_rows, alloc):
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 20))
    masks = prune(net, PruneConfig(criterion="l1-rows", allocation=alloc, sparsity=0.5, min_weights=0))
    for name, mask in masks.items():
        rows = mask.flatten(1)
        assert torch.all((rows == 0).all(1) | (rows == 1).all(1)), name  # whole rows or none
    if alloc == "layer":
        assert [int((m.flatten(1)[:, 0] == 0).sum()) for m in masks.values()] == [4, 10]
    dead = masks["0"][:, 0, 0, 0] == 0  # a pruned filter outputs its bias alone
    out = net[0](torch.randn(2, 3, 8, 8)).detach()[:, dead]
    assert torch.equal(out, net[0].bias.detach()[dead].view(1, -1, 1, 1).expand_as(out))


# --- every criterion x allocation x schedule ---------------------------------------------------

COMBOS = [(c, a, s) for c in ("magnitude", "taylor") for a in ("layer", "global", "std")
          for s in ("oneshot", "iterative", "agp")]


@pytest.mark.parametrize("criterion, alloc, schedule", COMBOS)
def test_every_combination_prunes_and_retrains(tiny_task, criterion, alloc, schedule):
    model = tiny_model()
    config = PruneConfig(criterion=criterion, allocation=alloc, sparsity=0.75, quality=0.8,
                         layers={"2": 0.5}, min_weights=0)
    plan = schedules.make(schedule, rounds=2, initial_sparsity=0.25, steps=1)
    if not plan.accepts(config):
        with pytest.raises(CompressError, match="allocation 'std': AGP needs target sparsities"):
            plan.run(model, tiny_task, config, TINY_TRAIN)
        return
    history = plan.run(model, tiny_task, config, TINY_TRAIN)
    assert history
    masks = masks_of(model)
    assert set(masks) == {"0", "2"}
    for name, mask in masks.items():
        weight = dict(model.named_modules())[name].weight
        assert torch.all(weight[mask == 0] == 0)
    if alloc == "layer":
        assert int((masks["0"] == 0).sum()) == 0.75 * 2048 and int((masks["2"] == 0).sum()) == 160
    elif alloc == "global":
        assert int((masks["0"] == 0).sum()) == 0.75 * 2048  # the only layer sharing the budget
        assert int((masks["2"] == 0).sum()) == 160
    else:
        assert 0.2 < pruned_fraction(masks) < 0.95  # |g * w| is heavy-tailed: taylor prunes more


def test_global_allocation_ranks_scores_across_layers(tiny_task):
    model = tiny_model()
    context = Context.from_task(model, tiny_task)
    for criterion in ("magnitude", "taylor"):
        config = PruneConfig(criterion=criterion, allocation="global", sparsity=0.6, min_weights=0)
        masks = compute_masks(model, config, context)
        scores = {n: criteria.get(criterion)().saliency(n, m, context).abs()
                  for n, m in model.named_modules() if n in masks}
        kept = torch.cat([scores[n][masks[n] == 1] for n in masks])
        dropped = torch.cat([scores[n][masks[n] == 0] for n in masks])
        assert dropped.max() <= kept.min()
        assert pruned_fraction(masks) == pytest.approx(0.6, abs=1 / 2368)


# --- taylor and the context --------------------------------------------------------------------

def two_weight_problem():
    """w = [0.1, 1.0]; input feature 0 is large, feature 1 tiny: the small weight matters more."""
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, 1.0]]))
    x = torch.tensor([[10.0, 0.01]]).repeat(8, 1)
    y = torch.zeros(8, 1)
    return layer, [(x, y)], nn.functional.mse_loss


def test_taylor_keeps_a_small_weight_with_a_large_gradient():
    layer, batches, loss = two_weight_problem()
    context = Context(model=layer, batches=batches, loss=loss)
    by = {c: compute_masks(layer, PruneConfig(criterion=c, sparsity=0.5, min_weights=0), context)[""]
          for c in ("magnitude", "taylor")}
    assert by["magnitude"].tolist() == [[0.0, 1.0]]  # |0.1| < |1.0|: the small weight dies
    assert by["taylor"].tolist() == [[1.0, 0.0]]  # |g0 * 0.1| ~ 2.0 > |g1 * 1.0| ~ 0.02: it survives


def test_taylor_from_a_task_and_through_a_schedule_on_digits(trained, task):
    magnitude, taylor = copy.deepcopy(trained), copy.deepcopy(trained)
    schedules.OneShot().run(magnitude, task, PruneConfig(sparsity=0.8), TINY_TRAIN)
    schedules.OneShot().run(taylor, task, PruneConfig(criterion="taylor", sparsity=0.8), TINY_TRAIN)
    a, b = masks_of(magnitude), masks_of(taylor)
    assert all(pruned_fraction({n: b[n]}) == pytest.approx(0.8, abs=1e-3) for n in b)
    assert not torch.equal(a["fc1"], b["fc1"])  # a different criterion picks different survivors


def test_gradients_are_lazy_cached_and_leave_the_model_alone(tiny_task):
    model = tiny_model()
    model.train()
    prune(model, PruneConfig(sparsity=0.5, min_weights=0))
    context = Context.from_task(model, tiny_task, n_batches=2, batch_size=32)
    assert context.cache == {}
    first = context.statistic("gradients", gradients)
    assert context.statistic("gradients", gradients) is first
    assert set(first) == {"0", "2"} and first["0"].shape == (32, 64)
    assert torch.all(first["0"][masks_of(model)["0"] == 0] == 0)  # no gradient through the mask
    assert model.training and all(p.grad is None for p in model.parameters())


def test_data_criteria_without_data_say_so(trained):
    with pytest.raises(CompressError, match="needs data"):
        prune(copy.deepcopy(trained), PruneConfig(criterion="taylor"))
    with pytest.raises(CompressError, match="empty"):
        prune(copy.deepcopy(trained), PruneConfig(criterion="taylor"),
              Context(model=trained, batches=[], loss=nn.functional.cross_entropy))


def test_old_prune_config_words_still_work_with_a_warning(trained):
    for old, new in (("std", "std"), ("sparsity", "layer"), ("global", "global")):
        with pytest.warns(DeprecationWarning, match=f"allocation='{new}'"):
            config = PruneConfig(criterion=old)
        assert (config.criterion, config.allocation) == ("magnitude", new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PruneConfig(criterion="taylor", allocation="global")
