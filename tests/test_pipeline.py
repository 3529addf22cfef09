"""The pipeline: configuration files, validation, stage reports, data-free streaming."""
import pytest
import torch
from torch import nn

from deepcompress import CompressConfig, CompressError, compress
from deepcompress.pipeline import (
    LayerRow,
    compress_tensors,
    load_config,
    parse_sparsity,
    render_report,
)
from deepcompress.tasks import load_task


def test_config_file_uses_the_cli_keys(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('sparsity = 0.9\nbits = "conv=8,linear=4"\nprune-epochs = 3\n')
    config = load_config(path, seed=7)
    assert config.sparsity == 0.9 and config.bits == "conv=8,linear=4"
    assert config.prune_epochs == 3 and config.seed == 7


@pytest.mark.parametrize("text,word", [("sparsity = 1.5\n", "sparsity"),
                                       ("colour = 3\n", "colour"),
                                       ("sparsity = [\n", "TOML"),
                                       ("schedule = 'weekly'\n", "schedule")])
def test_bad_config_files_say_what_is_wrong(tmp_path, text, word):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(CompressError, match=word):
        load_config(path)


def test_config_of_unknown_type_is_named(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{}")
    with pytest.raises(CompressError, match=r"must be \.toml") as err:
        load_config(path)
    assert "not valid" not in str(err.value)


def test_config_validation():
    with pytest.raises(CompressError, match="either"):
        CompressConfig(sparsity=0.5, quality=1.0)
    with pytest.raises(CompressError, match="bias_bits"):
        CompressConfig(bias_bits=12)
    assert parse_sparsity("fc1=0.9,fc2=0.8") == {"fc1": 0.9, "fc2": 0.8}
    with pytest.raises(CompressError):
        parse_sparsity("lots")


def test_compress_reports_every_stage():
    task = load_task("digits")
    torch.manual_seed(0)
    model = task.build_model()
    model, report = compress(model, task, CompressConfig(
        sparsity=0.8, bits=4, prune_epochs=2, finetune_epochs=1, quiet=True))
    assert [s.name for s in report.stages] == ["dense", "pruned", "shared"]
    dense, pruned, shared = report.stages
    assert pruned.nonzero == pytest.approx(0.2 * dense.weights, abs=2)
    assert shared.bytes < pruned.bytes < dense.bytes and report.ratio > 5
    assert all(s.test_metric is not None for s in report.stages)
    assert "shared" in render_report(report)
    weights = [r for r in report.layers if r.name.endswith("weight")]
    assert all(0 < r.clusters <= 16 for r in weights)


def test_data_free_streams_one_tensor_at_a_time():
    seen = []

    def items():
        for i in range(3):
            seen.append(i)
            yield f"l{i}.weight", torch.randn(50, 40)
        yield "l0.bias", torch.randn(50)

    rows: list[LayerRow] = []
    stream = compress_tensors(items(), CompressConfig(bits=3), rows)
    assert seen == []  # lazy: nothing read before the writer asks
    name, first = next(stream)
    assert seen == [0] and len(torch.unique(first)) <= 8
    rest = dict(stream)
    assert torch.equal(rest["l0.bias"].isnan(), torch.zeros(50, dtype=torch.bool))
    assert [r.name for r in rows] == ["l0.weight", "l1.weight", "l2.weight", "l0.bias"]
    assert rows[0].sqnr_db > 10 and rows[3].clusters == 0
    with pytest.raises(CompressError, match="bits"):
        compress_tensors(items(), CompressConfig(bits="conv=4"), [])


# --- pruning vocabulary: criterion x allocation x schedule ---------------------------------

def test_pruning_words_default_and_resolve():
    assert (CompressConfig().criterion, CompressConfig().allocation) == ("magnitude", "global")
    assert CompressConfig(quality=1.0).allocation == "std"
    assert CompressConfig(sparsity=0.9, allocation="layer").allocation == "layer"
    for kwargs, word in [({"criterion": "hessian"}, "magnitude, taylor"),
                         ({"allocation": "even"}, "global, layer, std"),
                         ({"schedule": "weekly"}, "iterative, oneshot, agp"),
                         ({"allocation": "std", "sparsity": 0.9}, "give quality"),
                         ({"allocation": "layer", "quality": 1.0}, "give sparsity")]:
        with pytest.raises(CompressError, match=word):
            CompressConfig(**kwargs)


@pytest.mark.parametrize("old", ["global", "layer"])
def test_old_criterion_key_maps_to_allocation(tmp_path, old):
    path = tmp_path / "c.toml"
    path.write_text(f'sparsity = 0.9\ncriterion = "{old}"\n')
    with pytest.warns(FutureWarning, match=f"write allocation = '{old}'"):
        config = load_config(path)
    assert (config.criterion, config.allocation) == ("magnitude", old)
    with pytest.raises(CompressError, match="conflicts"):
        CompressConfig(criterion=old, allocation="std", quality=1.0)


def test_benchmark_configs_use_the_new_words():
    import tomllib
    import warnings
    from pathlib import Path

    from deepcompress import schedules

    for path in sorted((Path(__file__).parent.parent / "benchmarks" / "configs").glob("*.toml")):
        settings = tomllib.loads(path.read_text())["compress"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            config = CompressConfig(**settings)
        assert (config.criterion, config.allocation) == ("magnitude", "global")
        assert config.schedule in schedules.names()


def test_compress_with_taylor_and_layer_allocation():
    task = load_task("digits")
    torch.manual_seed(0)
    model, report = compress(task.build_model(), task, CompressConfig(
        sparsity=0.8, criterion="taylor", allocation="layer", schedule="oneshot", bits=4,
        prune_epochs=1, finetune_epochs=0, quiet=True))
    pruned = report.stages[1]
    assert pruned.nonzero == pytest.approx(0.2 * pruned.weights, abs=3)
    assert report.config["criterion"] == "taylor" and report.config["allocation"] == "layer"


def test_data_free_refuses_a_criterion_that_needs_data(trained):
    from deepcompress.pipeline import prune_stage

    config = CompressConfig(sparsity=0.5, criterion="taylor")
    with pytest.raises(CompressError, match="taylor.*needs data"):
        compress_tensors(iter([]), config, [])
    with pytest.raises(CompressError, match="needs data"):
        prune_stage(__import__("copy").deepcopy(trained), None, config)


def test_one_rule_for_shared_tensors_with_and_without_a_task(task):
    from deepcompress.pipeline import compress_tensors, share_stage

    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(8 * 4, 20), nn.LayerNorm(20),
                        nn.Linear(20, 10))
    small = {k: v.clone() for k, v in net.state_dict().items()}
    with_task = share_stage(net, task, CompressConfig(bits=4, bias_bits=None, finetune_epochs=0,
                                                      quiet=True))
    rows: list = []
    list(compress_tensors(small.items(), CompressConfig(bits=4), rows))
    shared_free = {r.name for r in rows if r.clusters}
    assert {f"{r.name}.weight" for r in with_task} == shared_free == {"0.weight", "2.weight",
                                                                      "4.weight"}


@pytest.mark.parametrize("device, message", [
    ("gpu", "not a device name"), ("cuda", "no CUDA device"), ("meta", "only cpu and cuda")])
def test_a_device_this_machine_lacks_is_refused_with_the_fix(device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(CompressError, match=message):
        CompressConfig(device=device)
