"""Regularisers (slimming, group_lasso), TrainConfig.regulariser, and training without one unchanged."""
import copy
import dataclasses

import pytest
import torch
from torch import nn

from deepcompress import regularisers
from deepcompress.criteria import Context
from deepcompress.errors import CompressError
from deepcompress.prune import PruneConfig, prune
from deepcompress.tasks import Task
from deepcompress.train import TrainConfig, fit

QUICK = TrainConfig(epochs=2, lr=0.05, quiet=True)


@pytest.fixture(scope="module")
def images(task):
    """256 digits as 1x8x8 images."""
    def as_image(split, n=None):
        return split[0][:n].view(-1, 1, 8, 8), split[1][:n]
    return Task("images", as_image(task.train, 256), as_image(task.val), as_image(task.test))


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(288, 16), nn.ReLU(), nn.Linear(16, 10))


def filter_norms(net):
    return float(net[0].weight.detach().flatten(1).norm(dim=1).sum() + net[4].weight.detach().norm(dim=1).sum())


def test_registry_make_and_bad_settings():
    assert regularisers.names() == ("slimming", "group_lasso")
    for name in regularisers.names():
        doc = regularisers.get(name).__doc__
        assert "\n" not in doc and "needs" in doc and "costs" in doc
    made = regularisers.make("group_lasso", strength=0.5, groups="both", rounds=3)  # unknown settings dropped
    assert made == regularisers.GroupLasso(0.5, "both") and made.groups == "both"
    assert regularisers.make("slimming") == regularisers.Slimming(1e-4)
    with pytest.raises(CompressError, match="regulariser 'slimming': strength -1 must be a number >= 0"):
        regularisers.make("slimming", strength=-1)
    with pytest.raises(CompressError, match="groups 'rows' unknown; use one of filters, channels, both"):
        regularisers.GroupLasso(groups="rows")
    with pytest.raises(CompressError, match="regulariser 'l0': unknown; use one of slimming, group_lasso"):
        regularisers.get("l0")
    with pytest.raises(CompressError, match="no affine BatchNorm"):
        regularisers.Slimming()(nn.Linear(2, 2))
    with pytest.raises(CompressError, match="fix the patterns"):
        regularisers.GroupLasso(include=("conv*",))(conv_net())
    with pytest.raises(CompressError, match="regulariser 3: not callable"):
        TrainConfig(regulariser=3)


@torch.no_grad()
def test_penalties_by_hand():
    net = conv_net()
    with torch.no_grad():
        net[1].weight.copy_(torch.linspace(-1, 1, 8))
    assert float(regularisers.Slimming(0.5)(net)) == pytest.approx(0.5 * float(torch.linspace(-1, 1, 8).abs().sum()))
    w0, w4, w6 = (net[i].weight.detach() for i in (0, 4, 6))
    filters = w0.flatten(1).norm(dim=1).sum() + w4.norm(dim=1).sum() + w6.norm(dim=1).sum()
    channels = w0.transpose(0, 1).flatten(1).norm(dim=1).sum() + w4.norm(dim=0).sum() + w6.norm(dim=0).sum()
    assert float(regularisers.GroupLasso(2.0)(net)) == pytest.approx(2 * float(filters), rel=1e-6)
    assert float(regularisers.GroupLasso(1.0, "both")(net)) == pytest.approx(float(filters + channels), rel=1e-6)
    only = regularisers.GroupLasso(1.0, exclude=("4", "6"))(net)
    assert float(only) == pytest.approx(float(w0.flatten(1).norm(dim=1).sum()), rel=1e-6)


def test_group_lasso_gradient_is_finite_on_pruned_filters():
    net = conv_net()
    prune(net, PruneConfig(criterion="l1_filter", sparsity=0.5, include=("0",), min_weights=0))
    regularisers.GroupLasso(1.0, "both")(net).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_slimming_shrinks_batchnorm_scales_and_bn_scale_prunes_them(images):
    plain, slim = conv_net(), conv_net()
    fit(plain, images, QUICK)
    fit(slim, images, dataclasses.replace(QUICK, regulariser=regularisers.make("slimming", strength=0.3)))
    gammas = {k: float(n[1].weight.detach().abs().sum()) for k, n in (("plain", plain), ("slim", slim))}
    assert gammas["slim"] < 0.8 * gammas["plain"]
    masks = prune(slim, PruneConfig(criterion="bn_scale", sparsity=0.5, include=("0",), min_weights=0),
                  Context.from_task(slim, images, n_batches=1))
    kept = masks["0"][:, 0, 0, 0] == 1
    assert slim[1].weight.detach().abs()[kept].min() >= slim[1].weight.detach().abs()[~kept].max()


def test_group_lasso_shrinks_filter_norms(images):
    plain, lasso = conv_net(), conv_net()
    fit(plain, images, QUICK)
    fit(lasso, images, dataclasses.replace(QUICK, regulariser=regularisers.GroupLasso(0.1, exclude=("6",))))
    assert filter_norms(lasso) < 0.9 * filter_norms(plain)


def reference_fit(model, task, config):
    """fit's training steps for one epoch as they were before regularisers (the best epoch is the only one)."""
    shuffle = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
        model.train()
        order = torch.randperm(len(task.train[0]), generator=shuffle)
        for x, y in task.batches("train", config.batch_size, order):
            optimizer.zero_grad(set_to_none=True)
            task.loss(model(x), y).backward()
            optimizer.step()


def test_training_without_a_regulariser_is_unchanged(images):
    config = TrainConfig(epochs=1, lr=0.05, quiet=True, seed=5)
    assert config.regulariser is None and dataclasses.asdict(config)["regulariser"] is None
    a, b, c = conv_net(), conv_net(), conv_net()
    history = fit(a, images, config)
    reference_fit(b, images, config)
    fit(c, images, dataclasses.replace(config, regulariser=lambda model: torch.zeros(())))
    for x, y, z in zip(a.state_dict().values(), b.state_dict().values(), c.state_dict().values(), strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)  # bit for bit
    assert set(history[0]) == {"epoch", "train_loss", "val_metric", "lr", "best"}


def test_a_regulariser_survives_asdict_and_deepcopy():
    slim = regularisers.Slimming(0.1)
    config = TrainConfig(regulariser=slim, quiet=True)
    again = TrainConfig(**dataclasses.asdict(config))  # as pipeline._train_config rebuilds it
    assert again.regulariser == slim and isinstance(again.regulariser, regularisers.Slimming)
    assert copy.deepcopy(slim) == slim and repr(slim) == "Slimming(strength=0.1)"
