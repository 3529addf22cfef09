"""Compression of a pretrained model from unlabeled calibration inputs: the API, the CLI's
--calib and --example-input, and every bad CALIB as one line, exit 2."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import deepcompress
from deepcompress import CompressConfig
from deepcompress.calibrated import compress_calibrated, output_error
from deepcompress.calibration import read_calibration
from deepcompress.cli.main import main
from deepcompress.errors import CompressError
from deepcompress.models import digits_mlp
from deepcompress.pipeline import compress_tensors


@pytest.fixture(scope="module")
def files(trained, task, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calib")
    torch.save(trained.state_dict(), tmp / "m.pt")
    np.save(tmp / "x.npy", task.train[0][:192].numpy())
    return tmp


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_calibrated_beats_data_free_on_output_error(trained, task):
    import copy

    x = task.train[0][:192]
    model = copy.deepcopy(trained)
    _, report = compress_calibrated(model, list(x.split(64)), CompressConfig(sparsity=0.8, bits=4,
                                                                             quiet=True))
    rows: list = []
    free = digits_mlp()
    free.load_state_dict(dict(compress_tensors(trained.state_dict().items(),
                                               CompressConfig(sparsity=0.8, bits=4), rows)))
    held_out = list(task.val[0].split(64))
    assert output_error(model, trained, held_out) < 0.7 * output_error(free, trained, held_out)
    assert report.stages[-1].output_error < 0.1
    w = model.fc1.weight
    assert int((w == 0).sum()) == round(0.8 * w.numel()) and len(torch.unique(w[w != 0])) <= 16


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_distillation_lowers_the_output_error_whatever_the_output_scale(trained, task, scale):
    import copy

    teacher = nn.Sequential(copy.deepcopy(trained), nn.Linear(10, 10))  # logits times scale
    with torch.no_grad():
        teacher[1].weight.copy_(scale * torch.eye(10))
        teacher[1].bias.zero_()
    x, held_out = list(task.train[0][:256].split(64)), list(task.val[0].split(64))
    errors = []
    for epochs in (0, 10):
        model = copy.deepcopy(teacher)
        compress_calibrated(model, x, CompressConfig(sparsity=0.9, bits=3, distill_epochs=epochs,
                                                     quiet=True))
        errors.append(output_error(model, teacher, held_out))
    assert errors[1] < 0.9 * errors[0]  # SGD at the retraining rate diverged at scale 30


def test_cli_calib_writes_a_runnable_file(files, task, tmp_path):
    out = tmp_path / "m.dcz"
    r = run("compress", files / "m.pt", "-o", out, "--arch", "deepcompress.models:digits_mlp",
            "--calib", files / "x.npy", "--sparsity", "0.8", "--bits", "4", "--json")
    assert r.exit_code == 0, r.output
    runnable = deepcompress.load(out)  # the architecture was exported with a calibration batch
    x = task.test[0][:5]
    assert torch.equal(runnable(x), deepcompress.load(out, digits_mlp())(x))
    with deepcompress.open_lazy(out) as f:
        assert 0 < f.metadata["calibration_output_error"] < 0.2


def test_calib_of_named_inputs_reaches_keyword_arguments(tmp_path):
    class KeywordNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 16)
            self.fc = nn.Linear(16, 4)

        def forward(self, input_ids, attention_mask):
            h = self.emb(input_ids) * attention_mask[..., None]
            return {"logits": self.fc(h.mean(1))}

    torch.manual_seed(0)
    net = KeywordNet()
    g = torch.Generator().manual_seed(0)
    save_file({"input_ids": torch.randint(0, 30, (40, 6), generator=g),
               "attention_mask": torch.ones(40, 6)}, tmp_path / "c.safetensors")
    batches = read_calibration(str(tmp_path / "c.safetensors"), batch_size=16)
    assert [set(b) for b in batches] == [{"input_ids", "attention_mask"}] * 3
    model, report = compress_calibrated(net, batches, CompressConfig(bits=4, quiet=True))
    assert len(torch.unique(model.fc.weight)) <= 16 and len(torch.unique(model.emb.weight)) <= 16
    assert report.stages[-1].output_error < 0.05


@pytest.mark.parametrize("make,word", [
    (lambda p: p.write_bytes(b"junk"), "not a file of tensors"),
    (lambda p: torch.save({"a": torch.ones(3, 2), "b": torch.ones(4, 2)}, p), "same number of rows"),
    (lambda p: torch.save(torch.ones(8, 5), p), "rejects the first calibration batch"),
    (lambda p: torch.save([1, 2], p), "calibration batch 0"),
    (lambda p: torch.save(torch.ones(0, 64), p), "empty"),
])
def test_bad_calib_is_one_line_exit_2(files, tmp_path, make, word):
    bad = tmp_path / "bad.pt"
    make(bad)
    r = run("compress", files / "m.pt", "-o", tmp_path / "o.dcz", "--arch",
            "deepcompress.models:digits_mlp", "--calib", bad)
    assert r.exit_code == 2 and word in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert str(bad) in r.output and not (tmp_path / "o.dcz").exists()


def test_calib_needs_an_architecture_and_no_task(files, tmp_path):
    r = run("compress", files / "m.pt", "-o", tmp_path / "o.dcz", "--calib", files / "x.npy")
    assert r.exit_code == 2 and "--arch" in r.output
    r = run("compress", files / "m.pt", "-o", tmp_path / "o.dcz", "--calib", files / "x.npy",
            "--task", "digits")
    assert r.exit_code == 2 and "not both" in r.output
    with pytest.raises(CompressError, match="missing.npy: no such calibration file"):
        read_calibration(str(tmp_path / "missing.npy"))


def test_example_input_embeds_the_architecture_data_free(files, task, tmp_path):
    out = tmp_path / "m.dcz"
    r = run("compress", files / "m.pt", "-o", out, "--arch", "deepcompress.models:digits_mlp",
            "--example-input", files / "x.npy", "--quiet")
    assert r.exit_code == 0, r.output
    runnable = deepcompress.load(out)
    assert runnable(task.test[0][:7]).shape == (7, 10)  # any batch size
    r = run("compress", files / "m.pt", "-o", tmp_path / "o.dcz", "--example-input",
            files / "x.npy")
    assert r.exit_code == 2 and "--arch" in r.output


def test_cli_device_cpu_gives_the_same_file_and_a_missing_device_is_one_line(files, tmp_path):
    args = ["compress", files / "m.pt", "--arch", "deepcompress.models:digits_mlp", "--calib",
            files / "x.npy", "--sparsity", "0.8", "--bits", "4", "--quiet"]
    assert run(*args, "-o", tmp_path / "a.dcz").exit_code == 0
    assert run(*args, "-o", tmp_path / "b.dcz", "--device", "cpu").exit_code == 0
    assert (tmp_path / "a.dcz").read_bytes() == (tmp_path / "b.dcz").read_bytes()
    if not torch.cuda.is_available():
        r = run(*args, "-o", tmp_path / "c.dcz", "--device", "cuda")
        assert r.exit_code == 2 and "--device cpu" in r.output
        assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "c.dcz").exists()


def test_a_size_target_with_calibration_chooses_each_layers_settings(trained, task):
    import copy

    from deepcompress.formats import dcz

    x = list(task.train[0][:192].split(64))
    dense = 4 * sum(v.numel() for v in trained.state_dict().values())
    for ratio in (10, 25):
        model, report = compress_calibrated(copy.deepcopy(trained), x,
                                            CompressConfig(target_ratio=ratio, quiet=True))
        size = dcz.encoded_size(model.state_dict())
        assert 0.9 * dense / ratio <= size <= 1.02 * dense / ratio
        assert [c.layer for c in report.budget] == ["fc1", "fc2", "fc3"]
        for c in report.budget:  # the layer holds what was chosen for it
            w = getattr(model, c.layer).weight
            assert int((w == 0).sum()) >= round(c.sparsity * w.numel())
            assert len(torch.unique(w[w != 0])) <= 1 << c.bits
    assert "budget" in deepcompress.pipeline.render_report(report)
    with pytest.raises(CompressError, match="smallest settings tried"):
        compress_calibrated(copy.deepcopy(trained), x, CompressConfig(target_bytes=500, quiet=True))


def test_cli_calib_with_a_target_ratio(files, tmp_path):
    result = run("compress", files / "m.pt", "-o", tmp_path / "t.dcz", "--arch",
                 "deepcompress.models:digits_mlp", "--calib", files / "x.npy", "--target-ratio", 20,
                 "--quiet", "--json")
    assert result.exit_code == 0, result.output
    import json
    out = json.loads(result.output)
    assert 0.98 * 20 <= out["ratio"] and len(out["budget"]) == 3


def test_the_budget_measures_on_the_first_inputs_of_any_batch_kind():
    from deepcompress.calibrated import _first

    x = torch.arange(30.0).reshape(10, 3)
    assert [b.shape[0] for b in _first([x, x, x], 16)] == [10, 6]
    named = _first([{"a": x, "b": x[:, :1]}] * 3, 25)
    assert [b["a"].shape[0] for b in named] == [10, 10, 5] and named[2]["b"].shape == (5, 1)
    pairs = _first([(x, x)] * 2, 4)
    assert len(pairs) == 1 and torch.equal(pairs[0][1], x[:4])


def test_the_plan_spends_less_on_the_layers_left_when_a_solved_layer_overran(monkeypatch):
    from deepcompress import calibrated

    # two layers, each (setting, bytes, error) on its hull: 100 B at error 1, 200 B at 0.5
    points = {"a": [((0.9, 2), 100, 1.0), ((0.5, 4), 200, 0.5)],
              "b": [((0.9, 2), 100, 0.7), ((0.5, 4), 200, 0.6)]}
    plan = calibrated.RatePlan(points, fixed=0, target_bytes=300, headroom=0)
    assert plan.at == {"a": 1, "b": 0}  # b's step down costs less error per byte
    assert plan.sparsity == {"a": 0.5, "b": 0.9} and plan.bits == {"a": 4, "b": 2}
    monkeypatch.setattr(calibrated.codec, "encode_tensor",
                        lambda w: type("Encoded", (), {"nbytes": int(w.numel())})())
    for took, b in ((200, 0), (150, 1), (260, 0)):
        plan = calibrated.RatePlan(points, fixed=0, target_bytes=300, headroom=0)
        plan.solved("a", torch.zeros(took))
        # b's bytes scaled by took / 200: at 150, b's 200 B point costs 150 B and fits
        assert plan.at["b"] == b and plan.bits["b"] == (4 if b else 2)
    assert [(c.layer, c.coded) for c in plan.choices()] == [("a", 260), ("b", None)]
    # by default the plan aims 1% under: 300 B exactly no longer fits, a steps down too
    assert calibrated.RatePlan(points, fixed=0, target_bytes=300).at == {"a": 0, "b": 0}
    assert calibrated.RatePlan(points, fixed=0, target_bytes=304).at == {"a": 1, "b": 0}


def test_without_distillation_the_original_is_not_copied(trained, task, monkeypatch):
    import copy

    from deepcompress import calibrated

    model = copy.deepcopy(trained)
    x = list(task.train[0][:128].split(64))

    def refuse(obj, memo=None):
        raise AssertionError("the model was copied")
    monkeypatch.setattr(calibrated.copy, "deepcopy", refuse)
    _, report = compress_calibrated(model, x, CompressConfig(sparsity=0.5, bits=4, quiet=True))
    assert report.stages[0].output_error == 0 and report.stages[-1].output_error > 0
    with pytest.raises(AssertionError, match="copied"):
        compress_calibrated(model, x,
                            CompressConfig(sparsity=0.5, bits=4, distill_epochs=1, quiet=True))


def test_distillation_retrains_the_survivors_before_sharing_then_the_codebooks(trained, task, monkeypatch):
    import copy

    from deepcompress import calibrated
    from deepcompress.parametrize import chain
    from deepcompress.prune import Mask
    from deepcompress.quantize import SharedWeight

    seen, retrain = [], calibrated._retrain

    def spy(model, t, config):
        kinds = {type(p) for m in model.modules() for p in chain(m, "weight")}
        seen.append("shared" if SharedWeight in kinds else "masked" if Mask in kinds else "dense")
        before = copy.deepcopy(model.state_dict())
        retrain(model, t, config)
        seen.append(any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items()))
    monkeypatch.setattr(calibrated, "_retrain", spy)
    model = copy.deepcopy(trained)
    x = list(task.train[0][:256].split(64))
    compress_calibrated(model, x, CompressConfig(sparsity=0.9, bits=3, distill_epochs=3, quiet=True))
    assert seen == ["masked", True, "shared", True]
    w = model.fc1.weight
    assert int((w == 0).sum()) == round(0.9 * w.numel()) and len(torch.unique(w[w != 0])) <= 8


def test_the_plan_keeps_its_sparsities_once_the_layers_are_pruned():
    from deepcompress import calibrated

    points = {"a": [((0.9, 2), 100, 1.0), ((0.9, 4), 150, 0.8), ((0.5, 4), 200, 0.5)],
              "b": [((0.9, 2), 100, 0.7), ((0.5, 2), 150, 0.65), ((0.5, 4), 200, 0.6)]}
    plan = calibrated.RatePlan(points, fixed=0, target_bytes=400, headroom=0)
    assert plan.at == {"a": 1, "b": 1}  # on each hull: a's (0.9, 4) and b's (0.5, 2) are not
    plan.keep_sparsity()
    assert plan.points["a"] == [points["a"][2]] and plan.points["b"] == points["b"][1:]
    assert plan.at == {"a": 0, "b": 1} and plan.sparsity == {"a": 0.5, "b": 0.5}


def test_distill_mix_adds_mixtures_to_what_is_retrained_on(trained, task, monkeypatch):
    import copy

    from deepcompress import calibrated

    sizes = []
    monkeypatch.setattr(calibrated, "_retrain", lambda model, t, config: sizes.append(t.size("train")))
    x = list(task.train[0][:128].split(64))
    for mix in (0, 2):
        compress_calibrated(copy.deepcopy(trained), x, CompressConfig(
            sparsity=0.5, bits=4, distill_epochs=1, distill_mix=mix, quiet=True))
    assert sizes == [112, 112, 336, 336]
    with pytest.raises(CompressError, match="distill_mix"):
        CompressConfig(distill_mix=-1)


def test_the_room_no_step_fits_goes_to_the_largest_layer_at_an_interpolated_sparsity(monkeypatch):
    from deepcompress import calibrated

    # "big": 3 bits at 0.9 (400 B) or 0.8 (600 B), and 2 bits at 0.9 (300 B, far more error);
    # "small": one point
    grid = {"big": [((0.9, 3), 400, 1.0), ((0.8, 3), 600, 0.5), ((0.9, 2), 300, 3.0)],
            "small": [((0.5, 4), 100, 0.2)]}
    plan = calibrated.RatePlan(grid, fixed=0, target_bytes=600, headroom=0)
    # 0.8 does not fit (700 B); 100 B are left, half the step from 0.9 to 0.8
    assert plan.at == {"big": 1, "small": 0} and plan.bits["big"] == 3
    assert plan.sparsity == {"big": 0.85, "small": 0.5}
    assert [(c.layer, c.sparsity, c.bytes) for c in plan.choices()] == [("big", 0.85, 500), ("small", 0.5, 100)]
    monkeypatch.setattr(calibrated.codec, "encode_tensor",
                        lambda w: type("Encoded", (), {"nbytes": int(w.numel())})())
    plan.solved("big", torch.zeros(550))  # 10% over what 0.85 was expected to take
    assert plan.scale == 1.1 and plan.sparsity["small"] == 0.5  # small has no denser point
    plan.keep_sparsity()
    assert not plan.interpolate


def test_with_distillation_the_biases_are_shared_as_with_a_task(trained, task):
    import copy

    x = list(task.train[0][:128].split(64))
    for bias_bits, most in ((3, 8), (None, None)):
        model = copy.deepcopy(trained)
        compress_calibrated(model, x, CompressConfig(sparsity=0.5, bits=4, distill_epochs=1,
                                                     bias_bits=bias_bits, quiet=True))
        distinct = len(torch.unique(model.fc1.bias))
        assert distinct <= most if most else distinct == model.fc1.bias.numel()
    model = copy.deepcopy(trained)  # without distillation, no task: biases stay as they are
    compress_calibrated(model, x, CompressConfig(sparsity=0.5, bits=4, quiet=True))
    assert torch.equal(model.fc1.bias, trained.fc1.bias)


def test_the_room_can_go_to_another_bit_width_of_a_layer_made_sparser_until_it_fits():
    from deepcompress import calibrated

    # 2 bits at 0.5 is cheap and bad; 3 bits at 0.5 does not fit, 3 bits at 0.7 does
    grid = {"last": [((0.5, 2), 135, 0.0233), ((0.5, 3), 223, 0.0049), ((0.7, 3), 150, 0.008)]}
    plan = calibrated.RatePlan(grid, fixed=0, target_bytes=200, headroom=0)
    assert plan.points["last"][plan.at["last"]][0] == (0.7, 3)
    # the 50 B left buy 3 bits at the sparsity where bits 3 take 200 B: 0.5 + 0.2 x 23/73
    assert plan.bits["last"] == 3 and plan.sparsity["last"] == round(0.5 + 0.2 * 23 / 73, 4)
    assert plan.choices()[0].bytes == 200 and plan.choices()[0].bits == 3
    assert plan.choices()[0].error == pytest.approx(0.0049 + 23 / 73 * (0.008 - 0.0049))
    assert calibrated._at_bytes([(0.5, 223, 0.1), (0.7, 150, 0.2)], 100) is None
    assert calibrated._at_bytes([(0.5, 223, 0.1), (0.7, 150, 0.2)], 300) == (0.5, 223.0, 0.1)
    # not between sparsity 0 and the next: a few zeros can cost bytes in the dense layout
    assert calibrated._at_bytes([(0.0, 223, 0.1), (0.5, 150, 0.2)], 200) is None


def test_without_interpolation_the_plan_publishes_grid_points_only():
    from deepcompress import calibrated

    grid = {"big": [((0.9, 3), 400, 1.0), ((0.8, 3), 600, 0.5), ((0.9, 2), 300, 3.0)],
            "small": [((0.5, 4), 100, 0.2)]}
    plan = calibrated.RatePlan(grid, fixed=0, target_bytes=600, headroom=0, interpolate=False)
    assert plan.sparsity == {"big": 0.9, "small": 0.5}  # not 0.85: distillation prunes at it
    plan.keep_sparsity()
    assert [(c.layer, c.sparsity, c.bits, c.bytes) for c in plan.choices()] == [
        ("big", 0.9, 3, 400), ("small", 0.5, 4, 100)]
