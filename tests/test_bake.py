"""bake(): plain modules, values kept, and +0.0 (never -0.0) at pruned entries."""
import torch

from deepcompress.bake import bake
from deepcompress.prune import PruneConfig, prune
from deepcompress.quantize import ShareConfig, share_weights


def test_bake_leaves_plain_modules_with_positive_zeros():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(60, 40), torch.nn.ReLU(), torch.nn.Linear(40, 10))
    prune(model, PruneConfig(sparsity=0.8, min_weights=100))
    share_weights(model, ShareConfig(bits=3))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    x = torch.randn(4, 60)
    out = model(x).detach()
    model(x).sum().backward()  # gradients on the codebooks
    bake(model)
    assert model[0].weight.grad is None and model[2].weight.grad is None
    assert not any("parametrizations" in k for k in model.state_dict())
    assert torch.equal(model(x), out)
    w = model[0].weight.detach()
    assert int((w == 0).sum()) >= int(0.8 * w.numel())
    assert not torch.signbit(w[w == 0]).any()
    assert len(before) > 0 and len(torch.unique(w[w != 0])) <= 8
