"""`dcompress inspect` and the CLI's error contract (one line, exit 2, nothing else)."""
import json

import pytest
import torch
from click.testing import CliRunner

import deepcompress
from deepcompress.cli.main import main


@pytest.fixture
def dcz_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    cb = torch.randn(8, generator=g)
    w = torch.where(torch.rand(100, 200, generator=g) < 0.1,
                    cb[torch.randint(0, 8, (100, 200), generator=g)], 0.0)
    path = tmp_path / "m.dcz"
    deepcompress.save({"fc.weight": w, "fc.bias": torch.randn(100, generator=g)}, path)
    return path, w


def test_inspect_table(dcz_file):
    path, _ = dcz_file
    out = CliRunner().invoke(main, ["inspect", str(path)])
    assert out.exit_code == 0, out.output
    assert "fc.weight" in out.output and "8 (3b)" in out.output and "smaller" in out.output


def test_inspect_json(dcz_file):
    path, w = dcz_file
    out = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    s = json.loads(out.output)
    assert s["file_bytes"] == path.stat().st_size
    assert s["dense_bytes"] == 4 * (100 * 200 + 100)
    assert s["ratio"] == pytest.approx(s["dense_bytes"] / s["file_bytes"])
    fc = next(t for t in s["tensors"] if t["name"] == "fc.weight")
    assert fc["nonzero"] == int((w != 0).sum()) and fc["clusters"] == 8
    assert fc["shape"] == [100, 200] and fc["dtype"] == "float32" and fc["layout"]
    assert sum(t["bytes"] for t in s["tensors"]) + s["overhead_bytes"] == s["file_bytes"]


def test_inspect_plot(dcz_file, tmp_path):
    pytest.importorskip("matplotlib")
    path, _ = dcz_file
    png = tmp_path / "m.png"
    out = CliRunner().invoke(main, ["inspect", str(path), "--plot", str(png)])
    assert out.exit_code == 0 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("make", ["missing", "pickle", "corrupt", "empty"])
def test_bad_files_exit_2_with_one_line(tmp_path, dcz_file, make):
    path = tmp_path / "bad.dcz"
    if make == "pickle":
        torch.save({"w": torch.ones(2)}, path)
    elif make == "corrupt":
        data = bytearray(dcz_file[0].read_bytes())
        data[40] ^= 1
        path.write_bytes(bytes(data))
    elif make == "empty":
        path.write_bytes(b"")
    out = CliRunner().invoke(main, ["inspect", str(path)])
    assert out.exit_code == 2
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.dcz" in lines[0]
    assert "Traceback" not in out.output


def test_version():
    out = CliRunner().invoke(main, ["--version"])
    assert out.exit_code == 0 and deepcompress.__version__ in out.output


def test_inspect_valid_but_unusual_files(tmp_path):
    """float8 tensors, 60,000 tied names (inspect is linear in them) and control characters."""
    w = torch.randn(50, 4)
    sd = {"f8": torch.randn(64).to(torch.float8_e4m3fn), "f8b": torch.zeros(3).to(
        torch.float8_e5m2), "esc\x1b[2Jname": torch.ones(2), "w": w,
          **{f"tied.{i}": w for i in range(60_000)}}
    path = tmp_path / "odd.dcz"
    deepcompress.save(sd, path)
    out = CliRunner().invoke(main, ["inspect", str(path)])
    assert out.exit_code == 0, out.output
    assert "\x1b" not in out.output and "esc\\x1b[2Jname" in out.output
    s = json.loads(CliRunner().invoke(main, ["inspect", str(path), "--json"]).output)
    rows = {r["name"]: r for r in s["tensors"]}
    assert rows["f8"]["nonzero"] == int((sd["f8"].float() != 0).sum()) and rows["f8b"]["nonzero"] == 0
    assert rows["tied.59999"]["layout"] == "alias of w" and rows["tied.59999"]["nonzero"] == 200


def test_inspect_header_only_decodes_nothing(dcz_file, monkeypatch):
    path, _ = dcz_file
    from deepcompress.formats import dcz

    monkeypatch.setattr(dcz.DczFile, "decode", lambda *a: pytest.fail("decoded a tensor"))
    out = CliRunner().invoke(main, ["inspect", str(path), "--header-only"])
    assert out.exit_code == 0, out.output
    assert "not counted (header only)" in out.output


def test_inspect_shows_the_grouping(tmp_path):
    """One codebook per row: K x G in the clusters column, groups and group_rows in --json."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(1, 17, (512, 1024), generator=g).float() * (torch.rand(512, 1, generator=g) + 0.5)
    path = tmp_path / "g.dcz"
    deepcompress.save({"w": w, "b": torch.randn(8, generator=g)}, path)
    out = CliRunner().invoke(main, ["inspect", str(path)])
    assert out.exit_code == 0, out.output
    assert "16x512g" in out.output
    s = json.loads(CliRunner().invoke(main, ["inspect", str(path), "--json"]).output)
    row = next(t for t in s["tensors"] if t["name"] == "w")
    assert row["clusters"] == 16 and row["groups"] == 512 and row["group_rows"] == 1
    assert sum(t["bytes"] for t in s["tensors"]) + s["overhead_bytes"] == s["file_bytes"]


def test_inspect_json_of_an_ungrouped_shared_tensor(dcz_file):
    path, _ = dcz_file
    s = json.loads(CliRunner().invoke(main, ["inspect", str(path), "--json"]).output)
    fc = next(t for t in s["tensors"] if t["name"] == "fc.weight")
    assert fc["groups"] == 1 and fc["group_rows"] is None
