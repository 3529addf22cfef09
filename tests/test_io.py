"""The public save/load API: modules, state_dicts, strict loading with one clear error."""
import pytest
import torch

import deepcompress


class Net(torch.nn.Module):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.fc1 = torch.nn.Linear(4, hidden)
        self.bn = torch.nn.BatchNorm1d(hidden)
        self.fc2 = torch.nn.Linear(hidden, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def test_module_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    net = Net()
    net.train()
    net(torch.randn(16, 4))  # moves batch-norm statistics and num_batches_tracked
    net.eval()
    path = tmp_path / "net.dcz"
    size = deepcompress.save(net, path, metadata={"accuracy": 0.5})
    assert size == path.stat().st_size
    back = deepcompress.load(path, Net()).eval()
    x = torch.randn(5, 4)
    assert torch.equal(back(x), net(x))
    state = deepcompress.load_state_dict(path)
    assert state["bn.num_batches_tracked"].dtype == torch.int64
    with deepcompress.open_lazy(path) as lazy:
        assert lazy.metadata["accuracy"] == 0.5 and "deepcompress" in lazy.metadata["producer"]


def test_strict_load_lists_every_problem(tmp_path):
    path = tmp_path / "net.dcz"
    deepcompress.save(Net(), path)
    other = torch.nn.ModuleDict({"fc1": torch.nn.Linear(4, 9), "extra": torch.nn.Linear(1, 1)})
    with pytest.raises(deepcompress.CompressError) as err:
        deepcompress.load(path, other)
    msg = str(err.value)
    assert "net.dcz" in msg and "extra.weight" in msg and "fc2.weight" in msg
    assert "fc1.weight (file (8, 4), model (9, 4))" in msg
    assert "\n" not in msg


def test_save_refuses_what_it_cannot_store(tmp_path):
    with pytest.raises(deepcompress.CompressError, match="bad.dcz"):
        deepcompress.save({"a": torch.ones(2), "b": 3}, tmp_path / "bad.dcz")
    assert not (tmp_path / "bad.dcz").exists()


def test_runnable_output_needs_no_class(tmp_path):
    from deepcompress.models import lenet5

    torch.manual_seed(0)
    model = lenet5().eval()
    x = torch.randn(3, 1, 28, 28)
    program = deepcompress.export_program(model, x)
    path = tmp_path / "lenet5.dcz"
    deepcompress.save(model, path, program=program)
    runnable = deepcompress.load(path)
    assert not isinstance(runnable, type(model))
    assert torch.equal(runnable(x), model(x))
    other_batch = torch.randn(7, 1, 28, 28)
    assert torch.equal(runnable(other_batch), model(other_batch))


def test_weights_only_file_asks_for_the_model(tmp_path):
    path = tmp_path / "net.dcz"
    deepcompress.save(Net(), path)
    with pytest.raises(deepcompress.CompressError, match="model=Net"):
        deepcompress.load(path)


def _compressed_mlp():
    from deepcompress.models import digits_mlp
    from deepcompress.prune import PruneConfig, prune
    from deepcompress.quantize import ShareConfig, share_biases, share_weights

    torch.manual_seed(0)
    model = digits_mlp()
    prune(model, PruneConfig(sparsity=0.8))
    share_weights(model, ShareConfig(bits=4))
    share_biases(model, 3)
    return model


def test_save_of_a_parametrized_module_writes_it_baked_and_leaves_it_alone(tmp_path):
    import copy

    from deepcompress.models import digits_mlp
    from deepcompress.parametrize import bake

    model = _compressed_mlp()
    keys = list(model.state_dict())
    x = torch.randn(4, 64)
    expected = model(x)
    deepcompress.save(model, tmp_path / "live.dcz")
    deepcompress.save(bake(copy.deepcopy(model)), tmp_path / "baked.dcz")
    assert (tmp_path / "live.dcz").read_bytes() == (tmp_path / "baked.dcz").read_bytes()
    assert not any("parametrizations" in k for k in deepcompress.load_state_dict(tmp_path / "live.dcz"))
    assert list(model.state_dict()) == keys and "fc1.parametrizations.weight.original" in keys
    assert torch.equal(model(x), expected)
    back = deepcompress.load(tmp_path / "live.dcz", digits_mlp())
    assert torch.equal(back(x), expected)


def test_save_refuses_a_state_dict_still_holding_parametrizations(tmp_path):
    state = _compressed_mlp().state_dict()
    first = next(k for k in state if ".parametrizations." in k)
    for tensors in (state, ((k, v) for k, v in state.items())):
        path = tmp_path / "unbaked.dcz"
        with pytest.raises(deepcompress.CompressError) as err:
            deepcompress.save(tensors, path)
        msg = str(err.value)
        assert repr(first) in msg and "bake" in msg and "module" in msg and "\n" not in msg
        assert not path.exists()
