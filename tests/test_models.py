"""Reference models: shapes, parameter counts, attribute names."""
import pytest
import torch

from deepcompress.models import MODELS, digits_mlp, lenet5, lenet300


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_lenet5_matches_caffe_parameter_count():
    model = lenet5()
    assert n_params(model) == 431_080
    assert [n for n, _ in model.named_children()] == ["conv1", "conv2", "fc1", "fc2"]
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_lenet300_accepts_images_and_flat_vectors():
    model = lenet300()
    assert n_params(model) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), model(x.view(4, 784)))
    assert [n for n, _ in model.named_children()] == ["fc1", "fc2", "fc3"]


def test_digits_mlp_takes_64_features():
    assert digits_mlp()(torch.zeros(2, 64)).shape == (2, 10)
    assert lenet300(in_features=64).fc1.in_features == 64


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registry_builds_fresh_modules(name):
    assert MODELS[name]() is not MODELS[name]()


@pytest.mark.parametrize("name, plain, extra", [("lenet5_bn", lenet5, 2 * (20 + 50 + 500)),
                                               ("lenet300_bn", lenet300, 2 * (300 + 100))])
def test_the_batchnorm_variants_add_one_norm_after_each_hidden_layer(name, plain, extra):
    model = MODELS[name]()
    assert n_params(model) == n_params(plain()) + extra
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == (3 if name == "lenet5_bn" else 2)
    assert model.eval()(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
