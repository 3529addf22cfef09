"""Architectures inside a .dcz: weightless torch.export archives, refused if they could unpickle."""
import io
import json
import zipfile

import pytest
import torch

from deepcompress.formats import DczError, program


@pytest.fixture(scope="module")
def packed():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    ep = torch.export.export(model.eval(), (torch.randn(2, 4),),
                             dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    return program.pack(ep), model


def rewrite(data: bytes, edit) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            name, content = edit(info.filename, src.read(info))
            if name is not None:
                dst.writestr(name, content)
    return out.getvalue()


def test_pack_drops_weights_and_sample_inputs(packed):
    data, model = packed
    archive = zipfile.ZipFile(io.BytesIO(data))
    for info in archive.infolist():
        if "/data/weights/weight_" in info.filename:
            assert set(archive.read(info)) <= {0}
        if "sample_inputs" in info.filename:
            assert info.file_size == 0
    gm = program.unpack(data).module()
    gm.load_state_dict(model.state_dict())
    x = torch.randn(5, 4)
    assert torch.equal(gm(x), model(x))


def test_pickled_sample_inputs_are_refused(packed):
    pickled = io.BytesIO()
    torch.save({"x": torch.ones(1)}, pickled)
    bad = rewrite(packed[0], lambda n, c: (n, pickled.getvalue() if "sample_inputs" in n else c))
    with pytest.raises(DczError, match="sample inputs"):
        program.unpack(bad)


def test_pickled_weights_are_refused(packed):
    def edit(name, content):
        if name.endswith("model_weights_config.json"):
            config = json.loads(content)
            for v in config["config"].values():
                v["use_pickle"] = True
            content = json.dumps(config).encode()
        return name, content

    with pytest.raises(DczError, match="pickled"):
        program.unpack(rewrite(packed[0], edit))


def test_unexpected_members_and_garbage_are_refused(packed):
    extra = rewrite(packed[0], lambda n, c: (n, c))
    buf = io.BytesIO(extra)
    with zipfile.ZipFile(buf, "a") as z:
        z.writestr("m/code/evil.pkl", b"cos\nsystem\n")
    with pytest.raises(DczError, match="unexpected"):
        program.unpack(buf.getvalue())
    with pytest.raises(DczError):
        program.unpack(b"not a zip at all")
