"""Structured pruning made physical: all-zero channels leave the model where that is exact, and
every layer where it is not keeps its channels with a reason."""
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import deepcompress
from deepcompress.cli.main import main
from deepcompress.errors import CompressError
from deepcompress.models import digits_mlp, lenet5
from deepcompress.structured import shrink
from deepcompress.train import evaluate


def kill(module: nn.Module, rows: list[int]) -> None:
    with torch.no_grad():
        module.weight[rows] = 0


def test_lenet5_shrinks_and_computes_the_same():
    torch.manual_seed(0)
    m = lenet5().eval()
    kill(m.conv1, [0, 3, 7])
    kill(m.conv2, list(range(0, 50, 2)))
    kill(m.fc1, list(range(100)))
    x = torch.randn(5, 1, 28, 28)
    ref = m(x)
    report = shrink(m, x)
    assert (m.conv1.out_channels, m.conv2.in_channels) == (17, 17)
    assert (m.conv2.out_channels, m.fc1.in_features) == (25, 25 * 16)  # 4x4 per flattened channel
    assert (m.fc1.out_features, m.fc2.in_features) == (400, 400)
    assert report.parameters_after < report.parameters_before
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)  # dead biases folded forward


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3)  # no padding: constants fold exactly
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv2(x))), 1))


def test_batchnorm_follows_and_constants_fold():
    torch.manual_seed(0)
    m = WithNorm()
    m.bn1.running_mean.uniform_(-1, 1)
    m.bn1.running_var.uniform_(0.5, 2)
    m.bn1.bias.data.uniform_(-1, 1)
    m.eval()
    kill(m.conv1, [1, 5])
    kill(m.conv2, [0])
    x = torch.randn(3, 3, 12, 12)
    ref = m(x)
    shrink(m, x)
    assert m.bn1.num_features == 6 and m.conv2.in_channels == 6 and m.fc.in_features == 7
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.out(h + self.b(h))


class Padded(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3)
        self.c2 = nn.Conv1d(4, 4, 3, padding=1)
        self.g = nn.Conv1d(4, 4, 3, groups=2)

    def forward(self, x):
        return self.g(self.c2(torch.relu(self.c1(x))))


def test_what_cannot_shrink_keeps_its_channels_and_says_why():
    torch.manual_seed(0)
    m = Residual().eval()
    kill(m.a, [0])
    kill(m.b, [1])
    x = torch.randn(4, 6)
    ref = m(x)
    report = {r.layer: r for r in shrink(m, x).layers}
    assert report["a"].kept == 6 and "feeds 2 places" in report["a"].reason
    assert report["b"].kept == 6 and report["b"].reason
    torch.testing.assert_close(m(x), ref)
    p = Padded().eval()
    kill(p.c1, [2])  # bias constant into a zero-padded conv: not exact
    with torch.no_grad():
        p.c1.bias[2] = 0.5  # relu lets it through
    kill(p.c2, [0])  # into a grouped conv
    x = torch.randn(2, 2, 16)
    ref = p(x)
    report = {r.layer: r for r in shrink(p, x).layers}
    assert "padding" in report["c1"].reason and "grouped" in report["c2"].reason
    torch.testing.assert_close(p(x), ref)


def test_untraceable_model_is_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(CompressError, match="torch.fx"):
        shrink(Branchy(), torch.randn(2, 3))


def test_cli_structured_writes_a_smaller_runnable_network(tmp_path, trained, task):
    torch.save(trained.state_dict(), tmp_path / "m.pt")
    out = tmp_path / "m.dcz"
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "m.pt"), "-o", str(out), "--task",
                                  "digits", "--sparsity", "0.5", "--criterion", "l1_filter",
                                  "--allocation", "layer", "--schedule", "oneshot",
                                  "--structured", "--prune-epochs", "1", "--finetune-epochs", "1",
                                  "--report", str(tmp_path / "r.json"), "--quiet"])
    assert r.exit_code == 0, r.output
    state = deepcompress.load_state_dict(out)
    assert state["fc1.weight"].shape == (150, 64) and state["fc2.weight"].shape == (50, 150)
    runnable = deepcompress.load(out)  # the smaller architecture is inside; no class needed
    assert runnable(task.test[0][:9]).shape == (9, 10)
    with pytest.raises(deepcompress.DeepCompressError):
        deepcompress.load(out, digits_mlp())  # the original class no longer fits


def test_channels_then_unstructured_pruning_in_one_run(trained, task):
    import copy

    from deepcompress import CompressConfig, compress

    model, report = compress(copy.deepcopy(trained), task, CompressConfig(
        channels=0.5, sparsity=0.8, allocation="layer", schedule="oneshot", prune_epochs=1,
        finetune_epochs=0, bits=5, quiet=True))
    assert [s.name for s in report.stages] == ["dense", "channels", "pruned", "shared"]
    assert (model.fc1.out_features, model.fc2.out_features, model.fc3.out_features) == (150, 50, 10)
    w = model.fc2.weight
    assert int((w == 0).sum()) == round(0.8 * w.numel())
    assert evaluate(model, task, "test") > 0.8
    with pytest.raises(CompressError, match="not a structured criterion"):
        CompressConfig(channels=0.5, channel_criterion="magnitude")
