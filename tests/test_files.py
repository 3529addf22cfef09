"""compress_file: the one library entry point for files (model file in, .dcz out, Report back)."""
import tempfile

import pytest
import torch
from safetensors.torch import save_file

import deepcompress
from deepcompress import CompressConfig, compress_file
from deepcompress.errors import DeepCompressError
from deepcompress.formats import dcz
from deepcompress.models import digits_mlp
from deepcompress.pipeline import compress, render_report
from deepcompress.train import evaluate

QUICK = dict(sparsity=0.8, bits=5, rounds=1, schedule="iterative", prune_epochs=1,
             finetune_epochs=1, quiet=True)


@pytest.fixture(scope="module")
def files(trained, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("files")
    torch.save(trained.state_dict(), tmp / "m.pt")
    save_file(trained.state_dict(), tmp / "m.safetensors")
    return tmp


def test_with_a_task_the_file_runs_and_the_report_has_its_bytes(files, task, tmp_path):
    out = tmp_path / "m.dcz"
    report = compress_file(files / "m.pt", out, CompressConfig(**QUICK), task)
    assert report.output == str(out) and report.bytes == out.stat().st_size
    assert 10 << 20 < report.peak_memory < 64 << 30 and "peak memory" in render_report(report)
    assert [s.name for s in report.stages] == ["dense", "pruned", "shared"]
    model = deepcompress.load(out)  # the architecture is inside
    assert evaluate(model, task, "test") == pytest.approx(report.stages[-1].test_metric)
    with deepcompress.open_lazy(out) as f:
        assert f.metadata["task"] == "digits" and f.metadata["settings"]["sparsity"] == 0.8


def test_arch_may_be_a_callable_and_the_architecture_left_out(files, task, tmp_path):
    out = tmp_path / "m.dcz"
    compress_file(files / "m.pt", out, CompressConfig(**QUICK), task, arch=digits_mlp,
                  architecture=False)
    with deepcompress.open_lazy(out) as f:
        assert f.program_record is None
    assert evaluate(deepcompress.load(out, digits_mlp()), task, "test") > 0.8


def test_data_free_streams_safetensors(files, trained, tmp_path):
    out = tmp_path / "m.dcz"
    report = compress_file(files / "m.safetensors", out, CompressConfig(quiet=True))
    assert report.bytes == out.stat().st_size and report.ratio > 3
    back = deepcompress.load_state_dict(out)
    assert set(back) == set(trained.state_dict())
    shared = [row for row in report.layers if row.clusters]
    assert shared and all(len(torch.unique(back[r.name])) == r.clusters <= 256 for r in shared)
    errors = [r.rel_l2_error ** 2 for r in shared]  # relative squared error, the default target
    assert sum(errors) / len(errors) <= CompressConfig().max_weight_error


def test_bad_input_is_a_deepcompress_error(tmp_path):
    with pytest.raises(DeepCompressError, match="no such file"):
        compress_file(tmp_path / "none.safetensors", tmp_path / "o.dcz")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(DeepCompressError):
        compress_file(tmp_path / "junk.pt", tmp_path / "o.dcz")
    assert not (tmp_path / "o.dcz").exists()


def test_encoded_size_is_the_written_size(trained, tmp_path):
    state = trained.state_dict()
    shared = {k: (v * 8).round() / 8 for k, v in state.items()}  # few values: shared entries
    grouped = {"w": torch.arange(64.0).repeat(300, 1) + torch.arange(300.0)[:, None] * 100}
    for tensors in (state, shared, grouped, {}):
        meta = {"note": "x"}
        assert dcz.encoded_size(tensors, meta) == dcz.write(tmp_path / "m.dcz", tensors, meta)


def test_stage_sizes_write_no_file(trained, task, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a stage size wrote a temporary file")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tempfile, "TemporaryDirectory", refuse)
    model = digits_mlp()
    model.load_state_dict(trained.state_dict())
    _, report = compress(model, task, CompressConfig(**QUICK))
    assert all(s.bytes > 0 for s in report.stages)
    assert report.stages[-1].bytes == dcz.encoded_size(model.state_dict())
