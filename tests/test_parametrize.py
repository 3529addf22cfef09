"""deepcompress.parametrize: attach/find/remove/bake, and copies that never reach back into originals."""
import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

from deepcompress.models import digits_mlp
from deepcompress.parametrize import attach, bake, chain, find, original, remove
from deepcompress.prune import Mask, PruneConfig, masks_of, prune
from deepcompress.quantize import ShareConfig, SharedWeight, codebooks, share_biases, share_weights


class Halve(nn.Module):
    def forward(self, x):
        return x / 2


@pytest.fixture
def pruned():
    torch.manual_seed(0)
    model = digits_mlp()
    prune(model, PruneConfig(sparsity=0.8))
    return model


@pytest.fixture
def x():
    return torch.randn(8, 64, generator=torch.Generator().manual_seed(1))


def _train(model, x, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    y = torch.arange(len(x)) % 10
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


# --- attach, chain, find, original, remove ---------------------------------------------------

def test_find_and_chain_on_plain_and_parametrized_tensors():
    layer = nn.Linear(3, 2)
    assert chain(layer, "weight") == () and find(layer, "weight", Mask) is None
    mask = Mask(torch.ones(2, 3))
    attach(layer, "weight", Halve())
    attach(layer, "weight", mask)
    assert find(layer, "weight", Mask) is mask
    assert find(layer, "bias", Mask) is None and find(layer, "weight", SharedWeight) is None
    assert [type(p) for p in chain(layer, "weight")] == [Halve, Mask]
    assert original(layer, "weight").shape == (2, 3)


def test_remove_keeps_the_parameter_and_leaves_positive_zeros():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]]))
    param = layer.weight
    attach(layer, "weight", Mask(torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])))
    layer(torch.ones(1, 3)).sum().backward()
    assert original(layer, "weight") is param and param.grad is not None
    value = layer.weight.detach().clone()
    assert torch.signbit(value[value == 0]).any()  # -1 * 0 is -0.0
    tensor = remove(layer, "weight")
    assert tensor is param and layer.weight is param and type(layer) is nn.Linear
    assert isinstance(param, nn.Parameter) and param.grad is None
    assert torch.equal(param.detach(), value)
    assert not torch.signbit(param[param == 0]).any()


def test_bake_removes_every_parametrization_of_every_module(pruned, x):
    share_biases(pruned, 2)
    torch_parametrize.register_parametrization(pruned.fc3, "bias", Halve())  # not ours: baked too
    expected = pruned(x)
    assert bake(pruned) is pruned
    assert not any(torch_parametrize.is_parametrized(m) for m in pruned.modules())
    assert type(pruned.fc1) is nn.Linear
    assert not any(".parametrizations." in k for k in pruned.state_dict())
    assert torch.equal(pruned(x), expected)


# --- copies are independent -------------------------------------------------------------------

def test_share_weights_on_a_copy_leaves_the_pruned_original_working(pruned, x):
    expected = pruned(x)
    masks = {k: v.clone() for k, v in masks_of(pruned).items()}
    clone = copy.deepcopy(pruned)
    share_weights(clone, ShareConfig(bits=4))
    assert torch.equal(pruned(x), expected)
    assert all(isinstance(chain(pruned.get_submodule(n), "weight")[0], Mask) for n in masks)
    assert codebooks(pruned) == {} and set(codebooks(clone)) == set(masks)
    for name, mask in masks_of(pruned).items():
        assert torch.equal(mask, masks[name])
    _train(pruned, x)  # the original still trains, pruned entries still zero
    for name, mask in masks.items():
        assert torch.all(pruned.get_submodule(name).weight[mask == 0] == 0)
    assert clone(x).shape == expected.shape


def test_share_biases_on_a_copy_adds_no_property_to_the_original(pruned, x):
    expected = pruned(x)
    share_biases(copy.deepcopy(pruned), 2)  # a second tensor of an already parametrized module
    assert not torch_parametrize.is_parametrized(pruned.fc1, "bias")
    assert isinstance(pruned.fc1.bias, nn.Parameter)
    assert torch.equal(pruned(x), expected)


@pytest.mark.parametrize("baked", ["copy", "original"])
def test_bake_of_one_copy_leaves_the_other_parametrized_and_training(pruned, x, baked):
    share_weights(pruned, ShareConfig(bits=4))
    clone = copy.deepcopy(pruned)
    target, other = (clone, pruned) if baked == "copy" else (pruned, clone)
    expected = other(x)
    books = {n: c.detach().clone() for n, (c, _) in codebooks(other).items()}
    bake(target)
    assert codebooks(target) == {} and type(target.fc1) is nn.Linear
    assert torch.equal(other(x), expected)
    assert set(codebooks(other)) == set(books) == {"fc1", "fc2", "fc3"}
    _train(other, x)
    assert all(not torch.equal(codebooks(other)[n][0].detach(), b) for n, b in books.items())


def test_state_dict_round_trips_after_work_on_copies(pruned, x):
    share_weights(copy.deepcopy(pruned), ShareConfig(bits=4))
    bake(copy.deepcopy(pruned))
    expected = pruned(x)
    buffer = io.BytesIO()
    torch.save(pruned.state_dict(), buffer)
    buffer.seek(0)
    fresh = digits_mlp()
    prune(fresh, PruneConfig(sparsity=0.1))  # the same structure, other masks
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh(x), expected)
    # the keys a DistributedDataParallel wrapper gives load into a wrapper of a fresh model
    wrapped = nn.ModuleDict({"module": pruned})
    other = digits_mlp()
    prune(other, PruneConfig(sparsity=0.3))
    nn.ModuleDict({"module": other}).load_state_dict(wrapped.state_dict())
    assert torch.equal(other(x), expected)


def test_bake_frees_each_parametrization_as_it_goes(monkeypatch):
    import weakref

    from deepcompress import parametrize as P
    from deepcompress.quantize import SharedWeight

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    refs = []
    for layer in (model[0], model[2]):
        P.attach(layer, "weight", SharedWeight(torch.randint(-1, 3, (4, 4), dtype=torch.int32), 3),
                 unsafe=True)
        refs.append(weakref.ref(layer.parametrizations.weight[0]))
    seen, real = [], P.remove

    def spy(module, name):
        seen.append([r() is None for r in refs])
        return real(module, name)
    monkeypatch.setattr(P, "remove", spy)
    P.bake(model)
    assert seen == [[False, False], [True, False]]  # the first index is gone before the second
    assert all(r() is None for r in refs)
