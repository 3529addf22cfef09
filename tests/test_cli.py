"""The dcompress commands end to end with click's CliRunner, and every bad input: one line, exit 2,
no traceback, no partial output."""
import errno
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import deepcompress
from deepcompress.cli.main import main
from deepcompress.tasks import load_task
from deepcompress.train import TrainConfig, evaluate, fit


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    task = load_task("digits")
    model = task.build_model()
    fit(model, task, TrainConfig(epochs=8, lr=0.05, quiet=True))
    torch.save(model.state_dict(), tmp / "model.pt")
    save_file(model.state_dict(), tmp / "model.safetensors")
    return tmp, model, task


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_compress_with_task_gives_a_runnable_file(trained, tmp_path):
    tmp, model, task = trained
    out = tmp_path / "m.dcz"
    r = run("compress", tmp / "model.pt", "-o", out, "--task", "digits", "--sparsity", "0.8",
            "--bits", "5", "--rounds", "1", "--prune-epochs", "2", "--finetune-epochs", "1",
            "--quiet", "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert r.output.strip().startswith(f"wrote {out}") and "smaller than fp32" in r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["dense", "pruned", "shared"]
    assert report["stages"][-1]["bytes"] == out.stat().st_size
    runnable = deepcompress.load(out)  # architecture from the file
    into_class = deepcompress.load(out, task.build_model())
    x = task.test[0][:50]
    assert torch.equal(runnable(x), into_class(x))
    acc = evaluate(into_class, task, "test")
    assert acc > 0.85
    r = run("evaluate", out, "--task", "digits", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["test"] == pytest.approx(acc)
    weights = [into_class.fc1.weight, into_class.fc2.weight, into_class.fc3.weight]
    kept = sum(int((w != 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert kept == pytest.approx(0.2, abs=0.01)  # --sparsity 0.8, global by default
    assert all(len(torch.unique(w[w != 0])) <= 32 for w in weights)


def test_data_free_compress_keeps_fidelity(trained, tmp_path):
    tmp, model, task = trained
    out = tmp_path / "m.dcz"
    r = run("compress", tmp / "model.safetensors", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    weights = [row for row in report["layers"] if row["name"].endswith("weight")]
    errors = [10 ** (-row["sqnr_db"] / 10) for row in weights]
    assert weights and sum(errors) / len(errors) <= 0.01  # the default fidelity target
    eight, fine = tmp_path / "eight.dcz", tmp_path / "fine.dcz"
    assert run("compress", tmp / "model.pt", "-o", eight, "--bits", "8").exit_code == 0
    r = run("compress", tmp / "model.pt", "-o", fine, "--max-weight-error", "0.001", "--json")
    assert r.exit_code == 0, r.output
    fine_errors = [10 ** (-row["sqnr_db"] / 10) for row in json.loads(r.output)["layers"]
                   if row["name"].endswith("weight")]
    assert sum(fine_errors) / len(fine_errors) <= 0.001
    assert out.stat().st_size < fine.stat().st_size < eight.stat().st_size
    state = deepcompress.load_state_dict(out)
    assert all(state[k].shape == v.shape for k, v in model.state_dict().items())
    assert len(torch.unique(state["fc1.weight"])) <= 256
    pruned = tmp_path / "p.dcz"
    r = run("compress", tmp / "model.pt", "-o", pruned, "--sparsity", "0.5", "--bits", "6")
    assert r.exit_code == 0, r.output
    fc2 = deepcompress.load_state_dict(pruned)["fc2.weight"]
    assert (fc2 == 0).float().mean() == pytest.approx(0.5, abs=0.01)


def test_decompress_round_trip(trained, tmp_path):
    tmp, model, _ = trained
    dcz = tmp_path / "m.dcz"
    assert run("compress", tmp / "model.pt", "-o", dcz, "--quiet").exit_code == 0
    for suffix in (".pt", ".safetensors"):
        out = tmp_path / f"back{suffix}"
        r = run("decompress", dcz, "-o", out)
        assert r.exit_code == 0, r.output
        back = deepcompress.formats.readers.read_model(out).tensors
        assert all(torch.equal(back[k], v) for k, v in deepcompress.load_state_dict(dcz).items())


def test_decompress_of_tied_tensors_to_safetensors(tmp_path):
    w = torch.randn(4, 3)
    deepcompress.save({"a": w, "b": w}, tmp_path / "t.dcz")
    r = run("decompress", tmp_path / "t.dcz", "-o", tmp_path / "t.safetensors")
    assert r.exit_code == 0, r.output
    back = deepcompress.formats.readers.read_model(tmp_path / "t.safetensors").tensors
    assert torch.equal(back["a"], w) and torch.equal(back["b"], w)


def test_help_has_examples():
    for cmd in ("compress", "decompress", "evaluate", "inspect", "demo", "sensitivity"):
        r = run(cmd, "--help")
        assert r.exit_code == 0 and "Example" in r.output, cmd
    assert "0.72" in run("compress", "--help").output


def bad(result, *words):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for w in words:
        assert w in lines[0]
    assert "Traceback" not in result.output


def test_bad_inputs(trained, tmp_path):
    tmp, model, _ = trained
    dcz = tmp_path / "m.dcz"
    run("compress", tmp / "model.pt", "-o", dcz, "--quiet")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    garbage = tmp_path / "junk.pt"
    garbage.write_bytes(b"\x00\x01junk")
    out = tmp_path / "o.dcz"
    bad(run("compress", tmp_path / "missing.pt", "-o", out), "missing.pt")
    bad(run("compress", garbage, "-o", out), "junk.pt")
    bad(run("compress", text, "-o", out), "notes.txt")
    bad(run("compress", dcz, "-o", out), "already a .dcz")
    bad(run("compress", tmp / "model.pt", "-o", dcz), "already exists", "--force")
    bad(run("compress", tmp / "model.pt", "-o", tmp_path / "no" / "o.dcz"), "does not exist")
    bad(run("compress", tmp / "model.pt", "-o", out, "--task", "imagenet"), "imagenet")
    bad(run("compress", tmp / "model.pt", "-o", out, "--task", "mnist"), "--data-dir")
    bad(run("compress", tmp / "model.pt", "-o", out, "--task", "mnist", "--data-dir", tmp_path),
        str(tmp_path))
    bad(run("compress", tmp / "model.pt", "-o", out, "--sparsity", "1.2"), "sparsity")
    bad(run("compress", tmp / "model.pt", "-o", out, "--bits", "9"), "bits")
    bad(run("compress", tmp / "model.pt", "-o", out, "--task", "digits",
            "--arch", "deepcompress.models:lenet5"), "model.pt")
    bad(run("inspect", tmp / "model.pt"), "model.pt", "not a .dcz")
    bad(run("decompress", tmp / "model.pt", "-o", tmp_path / "x.pt"), "model.pt")
    bad(run("evaluate", garbage, "--task", "digits"), "junk.pt")
    assert not out.exists() and not (tmp_path / "x.pt").exists()
    torch.save(model, tmp_path / "whole.pt")
    bad(run("compress", tmp_path / "whole.pt", "-o", out), "--unsafe-pickle")
    assert run("compress", tmp_path / "whole.pt", "-o", out, "--unsafe-pickle",
               "--quiet").exit_code == 0


def test_full_disk_leaves_no_partial_file(trained, tmp_path, monkeypatch):
    tmp, _, _ = trained

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(deepcompress.formats.dcz.os, "fsync", full)
    r = run("compress", tmp / "model.pt", "-o", tmp_path / "o.dcz", "--quiet")
    bad(r, "No space left")
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback(tmp_path):
    r = CliRunner().invoke(main, ["--debug", "inspect", str(tmp_path / "missing.dcz")])
    assert r.exit_code != 0 and isinstance(r.exception, OSError)


def test_demo(tmp_path):
    out = tmp_path / "demo.dcz"
    r = run("demo", "-o", out, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    figures = json.loads(r.output)
    assert figures["ratio"] > 10 and out.stat().st_size == figures["file_bytes"]
    assert figures["final_accuracy"] >= figures["dense_accuracy"] - 0.03


def test_methods_lists_every_registered_name():
    from deepcompress import allocation, criteria, regularisers, schedules

    r = run("methods", "--json")
    assert r.exit_code == 0, r.output
    table = json.loads(r.output)
    for kind, module in (("criterion", criteria), ("allocation", allocation),
                         ("schedule", schedules), ("regulariser", regularisers)):
        assert tuple(table[kind]) == module.names() and all(table[kind].values())


def test_compress_with_a_structured_criterion_and_a_regulariser(trained, tmp_path):
    tmp, _, task = trained
    out = tmp_path / "m.dcz"
    r = run("compress", tmp / "model.pt", "-o", out, "--task", "digits", "--sparsity", "0.5",
            "--criterion", "l1_filter", "--allocation", "layer", "--schedule", "oneshot",
            "--regulariser", "group_lasso", "--regulariser-strength", "1e-3",
            "--prune-epochs", "1", "--finetune-epochs", "1", "--quiet")
    assert r.exit_code == 0, r.output
    model = deepcompress.load(out, task.build_model())
    for w in (model.fc1.weight, model.fc2.weight):  # whole rows (output neurons) pruned
        dead = (w == 0).all(dim=1)
        assert int(dead.sum()) == round(0.5 * w.shape[0]) and bool((w[~dead] != 0).any())
    with deepcompress.open_lazy(out) as f:
        assert f.metadata["settings"]["regulariser"] == "group_lasso"
    r = run("compress", tmp / "model.pt", "-o", tmp_path / "o.dcz", "--task", "digits",
            "--regulariser", "nope")
    assert r.exit_code == 2


def test_the_command_maps_large_allocations_on_glibc(monkeypatch):
    import platform
    import sys

    from deepcompress.cli.allocator import map_large_allocations

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert map_large_allocations() is glibc  # the threshold is the one --calib runs set anyway
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert map_large_allocations() is False  # the user's own setting is left alone
