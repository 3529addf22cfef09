"""Model files in: state_dicts, safetensors (single and sharded, streamed), .pt2, and refusals."""
import json

import pytest
import torch
from safetensors.torch import save_file

from deepcompress.formats import write
from deepcompress.formats.readers import ModelFileError, iter_safetensors, read_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_state_dict_and_checkpoint(tmp_path, model):
    torch.save(model.state_dict(), tmp_path / "m.pt")
    assert same(read_model(tmp_path / "m.pt").tensors, model.state_dict())
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "c.ckpt")
    assert same(read_model(tmp_path / "c.ckpt").tensors, model.state_dict())


def test_safetensors_single_and_sharded(tmp_path, model):
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "m.safetensors")
    assert same(read_model(tmp_path / "m.safetensors").tensors, sd)
    names = list(sd)
    save_file({k: sd[k] for k in names[:2]}, tmp_path / "a.safetensors")
    save_file({k: sd[k] for k in names[2:]}, tmp_path / "b.safetensors")
    index = {"weight_map": {k: ("a" if i < 2 else "b") + ".safetensors"
                            for i, k in enumerate(names)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    streamed = iter_safetensors(tmp_path / "model.safetensors.index.json")
    assert same(dict(streamed), sd)
    write(tmp_path / "m.dcz", iter_safetensors(tmp_path / "model.safetensors.index.json"))


def test_export_program(tmp_path, model):
    ep = torch.export.export(model, (torch.randn(2, 4),))
    torch.export.save(ep, tmp_path / "m.pt2")
    got = read_model(tmp_path / "m.pt2")
    assert got.kind == "export" and same(got.tensors, model.state_dict())


def test_pickled_module_is_refused_unless_asked(tmp_path, model):
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(ModelFileError, match="unsafe-pickle"):
        read_model(tmp_path / "whole.pt")
    got = read_model(tmp_path / "whole.pt", unsafe_pickle=True)
    assert got.kind == "module" and same(got.tensors, model.state_dict())


@pytest.mark.parametrize("case", ["missing", "dcz", "suffix", "garbage", "not a dict", "bad st"])
def test_bad_inputs_name_the_file(tmp_path, case):
    path = tmp_path / "m.pt"
    if case == "dcz":
        write(path, {"a": torch.ones(2)})
    elif case == "suffix":
        path = tmp_path / "m.txt"
        path.write_text("hello")
    elif case == "garbage":
        path.write_bytes(b"\x00garbage")
    elif case == "not a dict":
        torch.save([torch.ones(2)], path)
    elif case == "bad st":
        path = tmp_path / "m.safetensors"
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelFileError, match=str(path.name)):
        read_model(path)
