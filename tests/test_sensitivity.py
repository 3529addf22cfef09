"""Sensitivity analysis and the `sensitivity` command."""
import json

import pytest
import torch
from click.testing import CliRunner

from deepcompress.cli.main import main
from deepcompress.errors import CompressError
from deepcompress.prune import layer_stats, prune
from deepcompress.sensitivity import (
    SensitivityResult,
    analyze,
    parse_sparsities,
    plot,
    prune_config,
    render_table,
    thresholds,
    to_dict,
    tolerated_sparsities,
)
from deepcompress.train import evaluate


@pytest.fixture(scope="module")
def result(trained, task):
    return analyze(trained, task, [0.5, 0.9, 0.99])


def test_analyze_prunes_one_layer_at_a_time(result, trained, task):
    assert set(result.scores) == {"fc1", "fc2", "fc3"}
    assert result.baseline == pytest.approx(evaluate(trained, task, "val"))
    assert all(len(v) == 3 for v in result.scores.values())
    assert result.scores["fc3"][-1] < result.scores["fc3"][0]  # 99% of the classifier hurts
    assert not any(m.__class__.__name__.startswith("Parametrized") for m in trained.modules())


def test_tolerated_sparsities_stop_at_first_drop():
    result = SensitivityResult(
        baseline=0.9, sparsities=[0.5, 0.8, 0.9],
        scores={"a": [0.9, 0.895, 0.7], "b": [0.85, 0.9, 0.9], "c": [0.9, 0.9, 0.9]},
        weights={"a": 10, "b": 10, "c": 10},
    )
    assert tolerated_sparsities(result, 0.01) == {"a": 0.8, "b": 0.0, "c": 0.9}
    config = prune_config(result, 0.01, min_weights=0)
    assert config.layers == {"a": 0.8, "b": 0.0, "c": 0.9}


def test_tolerated_sparsities_feed_pruning(result, trained, task):
    import copy

    model = copy.deepcopy(trained)
    chosen = tolerated_sparsities(result, 0.02)
    prune(model, prune_config(result, 0.02))
    stats = {s.name: s.sparsity for s in layer_stats(model)}
    for name, sparsity in chosen.items():
        assert stats[name] == pytest.approx(sparsity, abs=1e-3)
    limits = thresholds(trained, chosen)
    for name, sparsity in chosen.items():
        w = dict(trained.named_modules())[name].weight.detach().abs()
        if sparsity:
            assert float((w <= limits[name]).float().mean()) == pytest.approx(sparsity, abs=1e-3)


def test_table_json_and_plot(result, tmp_path):
    table = render_table(result, tolerance=0.01)
    assert "fc1" in table and "baseline" in table and "90%" in table
    data = json.loads(json.dumps(to_dict(result, 0.01)))
    assert data["layers"]["fc2"]["weights"] == 30000
    assert set(data["tolerated_sparsity"]) == {"fc1", "fc2", "fc3"}
    pytest.importorskip("matplotlib")
    plot(result, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("text", ["", "0.5,abc", "0.5,1.0", "-0.1"])
def test_parse_sparsities_rejects(text):
    with pytest.raises(CompressError):
        parse_sparsities(text)


def test_parse_sparsities_sorts_and_dedups():
    assert parse_sparsities("0.9, 0.5,0.9") == [0.5, 0.9]


@pytest.fixture
def saved(trained, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    return path


def test_cli_table_and_json(saved, tmp_path):
    runner = CliRunner()
    out = runner.invoke(main, ["sensitivity", str(saved), "--task", "digits", "--sparsities", "0.5,0.9",
                                      "--quiet", "--plot", str(tmp_path / "p.png")])
    assert out.exit_code == 0, out.output
    assert "fc2" in out.output and (tmp_path / "p.png").exists()
    out = runner.invoke(main, ["sensitivity", str(saved), "--task", "digits", "--sparsities", "0.5",
                                      "--json", "--quiet", "--arch", "deepcompress.models:digits_mlp"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["sparsities"] == [0.5] and set(data["thresholds"]) == {"fc1", "fc2", "fc3"}


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "unknown task"),
    (["--task", "digits", "--sparsities", "1.5"], "sparsities"),
    (["--task", "digits", "--arch", "deepcompress.models:lenet5"], "does not fit"),
    (["--task", "mnist"], "--data-dir"),
    (["--task", "digits", "--tolerance", "2"], "tolerance"),
])
def test_cli_bad_input_exits_2_with_one_line(saved, args, message):
    out = CliRunner().invoke(main, ["sensitivity", str(saved), *args, "--quiet"])
    assert out.exit_code == 2
    assert message in out.output
    assert len(out.output.strip().splitlines()) == 1


def test_cli_rejects_unbaked_state_dict(trained, tmp_path):
    import copy

    model = copy.deepcopy(trained)
    prune(model, prune_config(SensitivityResult(0.9, [0.5], {"fc1": [0.9]}, {"fc1": 1}), 0.01))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    out = CliRunner().invoke(main, ["sensitivity", str(tmp_path / "m.pt"), "--task", "digits"])
    assert out.exit_code == 2 and "bake" in out.output


def test_cli_missing_model_file(tmp_path):
    out = CliRunner().invoke(main, ["sensitivity", str(tmp_path / "none.pt"), "--task", "digits"])
    assert out.exit_code == 2 and "no such file" in out.output


def test_analyze_and_cli_take_a_criterion(trained, task, saved):
    from deepcompress.prune import PruneConfig

    taylor = analyze(trained, task, [0.9], PruneConfig(criterion="taylor"))
    assert set(taylor.scores) == {"fc1", "fc2", "fc3"}
    runner = CliRunner()
    out = runner.invoke(main, ["sensitivity", str(saved), "--task", "digits", "--sparsities", "0.9",
                                      "--criterion", "taylor", "--json", "--quiet"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["layers"]["fc1"]["scores"] == taylor.scores["fc1"] and "thresholds" not in data
    out = runner.invoke(main, ["sensitivity", str(saved), "--task", "digits", "--criterion", "no-such-criterion"])
    assert out.exit_code == 2 and "magnitude, taylor" in out.output


def test_cli_reads_safetensors_like_every_command(trained, tmp_path):
    from safetensors.torch import save_file

    save_file(trained.state_dict(), tmp_path / "m.safetensors")
    out = CliRunner().invoke(main, ["sensitivity", str(tmp_path / "m.safetensors"), "--task",
                                    "digits", "--sparsities", "0.5", "--json", "--quiet"])
    assert out.exit_code == 0, out.output
    assert set(json.loads(out.output)["layers"]) == {"fc1", "fc2", "fc3"}
