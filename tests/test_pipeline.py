"""The pipeline: configuration files, validation, stage reports, data-free streaming."""
import pytest
import torch

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
