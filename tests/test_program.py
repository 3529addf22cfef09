"""Architectures inside a .dcz: weightless torch.export archives, rebuilt without running code."""
import builtins
import io
import json
import pickle
import sys
import zipfile
from pathlib import Path

import pytest
import sympy
import torch

from deepcompress import models
from deepcompress.formats import DczError, program, program_check

DYN = {0: torch.export.Dim.DYNAMIC}


class Net(torch.nn.Module):
    """Conv + BatchNorm with a buffer and a tensor constant in forward."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.register_buffer("shift", torch.full((4, 1, 1), 0.5))

    def forward(self, x):
        y = self.bn(self.conv(x)) + self.shift
        return y.flatten(1)[:, :3] + torch.tensor([1.0, 2.0, 3.0])


def _pack(model, shape):
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    ep = torch.export.export(model, (torch.randn(2, *shape),), dynamic_shapes=(DYN,))
    return program.pack(ep), model


@pytest.fixture(scope="module")
def packed():
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    return _pack(mlp, (4,))


@pytest.fixture
def guarded(monkeypatch):
    """load_module that fails on any unpickling and records what reaches sympify and exec."""
    seen = {"sympify": [], "exec": []}
    sympify, exec_ = sympy.sympify, builtins.exec

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during load_module")

    class Unpickler(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            refuse()

    def spy_sympify(a, *args, **kwargs):
        if isinstance(a, str):
            seen["sympify"].append(a)
        return sympify(a, *args, **kwargs)

    def spy_exec(src, globals_=None, *args, **kwargs):
        seen["exec"].append(src if isinstance(src, str) else getattr(src, "co_filename", ""))
        return exec_(src, sys._getframe(1).f_globals if globals_ is None else globals_,
                     *args, **kwargs)

    def load(data):
        with monkeypatch.context() as m:
            for owner, name in ((pickle, "loads"), (pickle, "load"), (torch, "load"),
                                (torch._C, "_pickle_load_obj")):
                m.setattr(owner, name, refuse)
            m.setattr(pickle, "Unpickler", Unpickler)
            m.setattr(sympy, "sympify", spy_sympify)
            m.setattr(builtins, "exec", spy_exec)
            return program.load_module(data)

    load.seen = seen
    return load


def rewrite(data: bytes, edit, extra=()) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            name, content = edit(info.filename, src.read(info))
            if name is not None:
                dst.writestr(name, content)
        for name, content in extra:
            dst.writestr(name, content)
    return out.getvalue()


def edit_json(data: bytes, suffix: str, fn) -> bytes:
    def edit(name, content):
        if name.endswith(suffix):
            doc = json.loads(content)
            fn(doc)
            content = json.dumps(doc).encode()
        return name, content
    return rewrite(data, edit)


def graph(doc):
    return doc["graph_module"]["graph"]


def read(data: bytes, suffix: str) -> bytes:
    archive = zipfile.ZipFile(io.BytesIO(data))
    return archive.read(next(n for n in archive.namelist() if n.endswith(suffix)))


@pytest.mark.parametrize("make, shape", [
    (lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
     (4,)),
    (Net, (1, 6, 6)), (models.lenet5, (1, 28, 28)), (models.digits_mlp, (64,))])
def test_round_trip_runs_identically(make, shape, guarded):
    data, model = _pack(make(), shape)
    doc = json.loads(read(data, "models/model.json"))
    assert doc["guards_code"] == []
    assert all(set(n["metadata"]) <= {"nn_module_stack", "torch_fn"} for n in graph(doc)["nodes"])
    module = guarded(data)
    module.load_state_dict(model.state_dict(), assign=True)  # the module's own are meta
    for batch in (1, 7):
        x = torch.randn(batch, *shape)
        assert torch.equal(module(x), model(x))
    assert guarded.seen["sympify"]
    assert all(program_check._expr(s) for s in guarded.seen["sympify"])


def test_pack_drops_weights_and_sample_inputs(packed):
    archive = zipfile.ZipFile(io.BytesIO(packed[0]))
    for info in archive.infolist():
        if "/data/weights/weight_" in info.filename:
            assert info.file_size == 0  # torch reads an empty record as zeros
        if "sample_inputs" in info.filename:
            assert info.file_size == 0
    assert b"stack_trace" not in archive.read("archive/models/model.json")


class Payload:
    """Unpickling this creates the canary file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


def forge(data: bytes, route: str, canary) -> bytes:
    """`data` changed so that torch.export.load (or running the module) would touch `canary`."""
    evil = pickle.dumps(Payload(canary))
    code = f"open({str(canary)!r}, 'w').close()"
    saved = io.BytesIO()
    torch.save({"x": torch.ones(1)}, saved)
    if route == "second model":
        config = json.loads(read(data, "model_weights_config.json"))
        for meta in config["config"].values():
            meta.update(use_pickle=True, path_name="weight_9")
        return rewrite(data, lambda n, c: (n, c), extra=[
            ("archive/models/evil.json", read(data, "models/model.json")),
            ("archive/data/weights/evil_weights_config.json", json.dumps(config)),
            ("archive/data/weights/weight_9", evil),
            ("archive/data/constants/evil_constants_config.json", b'{"config": {}}'),
            ("archive/data/sample_inputs/evil.pt", b"")])
    if route == "pickled weights":
        def pickled(doc):
            for meta in doc["config"].values():
                meta.update(use_pickle=True, path_name="weight_0")
        data = edit_json(data, "model_weights_config.json", pickled)
        return rewrite(data, lambda n, c: (n, evil if n.endswith("weights/weight_0") else c))
    if route == "legacy weights":
        return rewrite(data, lambda n, c: (n, c), extra=[("archive/data/weights/model.pt", evil)])
    if route in ("opaque constant", "custom constant"):
        prefix = route.split()[0].replace("custom", "custom_obj").replace("opaque", "opaque_obj")
        doc = {"config": {"c": {"path_name": f"{prefix}_0", "is_param": False,
                                "use_pickle": True, "tensor_meta": None}}}
        return rewrite(data, lambda n, c: (n, json.dumps(doc) if n.endswith(
            "constants_config.json") else c), extra=[(f"archive/data/constants/{prefix}_0", evil)])
    if route == "sympify":
        def expr(doc):
            payload = "+".join(f"chr({ord(ch)})" for ch in code)
            size = next(v for v in graph(doc)["tensor_values"].values()
                        if "as_expr" in v["sizes"][0])["sizes"][0]["as_expr"]
            size["expr_str"] = f"exec({payload})"
        return edit_json(data, "models/model.json", expr)
    if route == "guards code":
        return edit_json(data, "models/model.json", lambda d: d.update(guards_code=[code]))
    if route == "operator target":
        def target(doc):
            node = graph(doc)["nodes"][0]
            node.update(target="torch.os.makedirs",
                        inputs=[{"name": "", "arg": {"as_string": str(canary)}, "kind": 1}])
        return edit_json(data, "models/model.json", target)
    if route == "get_attr name":
        name = f'0.weight"); {code}; ("'

        def rename(doc):
            doc["config"][name] = doc["config"].pop("0.weight")
        data = edit_json(data, "model_weights_config.json", rename)
        return edit_json(data, "models/model.json", lambda d: next(
            s["parameter"] for s in d["graph_module"]["signature"]["input_specs"]
            if "parameter" in s).update(parameter_name=name))
    if route == "sample inputs":
        return rewrite(data, lambda n, c: (n, evil if "sample_inputs" in n else c))
    if route == "treespec enum":
        def spec(doc):
            hook = json.dumps([{"__enum__": True, "fqn": "os:system", "name": "x"}])
            sig = doc["graph_module"]["module_call_graph"][0]["signature"]
            sig["in_spec"] = json.dumps([1, {"type": "builtins.dict", "context": hook,
                                             "children_spec": []}])
        return edit_json(data, "models/model.json", spec)
    if route == "from_file":
        def from_file(doc):
            graph(doc)["nodes"][0]["target"] = "torch.ops.aten.from_file.default"
        return edit_json(data, "models/model.json", from_file)
    if route == "extension op":
        return edit_json(data, "models/model.json",
                         lambda d: graph(d)["nodes"][0].update(target="#evil:op"))
    if route == "custom object":
        return edit_json(data, "models/model.json", lambda d: graph(d).update(
            custom_obj_values={"obj": {"name": "obj", "class_fqn": "os.system"}}))
    if route == "nested graph":
        def nested(doc):
            graph(doc)["nodes"][0]["inputs"][0]["arg"] = {"as_graph": {
                "name": 'g"); x = ("', "graph": json.loads(json.dumps(graph(doc)))}}
        return edit_json(data, "models/model.json", nested)
    raise AssertionError(route)


ROUTES = ["second model", "pickled weights", "legacy weights", "opaque constant",
          "custom constant", "sympify", "guards code", "operator target", "get_attr name",
          "sample inputs", "treespec enum", "from_file", "extension op", "custom object",
          "nested graph"]


@pytest.mark.parametrize("route", ROUTES)
def test_forged_archives_are_refused_without_running_code(packed, route, tmp_path, guarded):
    canary = tmp_path / "pwned"
    bad = forge(packed[0], route, canary)
    with pytest.raises(DczError, match=r"^program: "):
        guarded(bad)
    assert not canary.exists()
    assert not any(str(canary) in s for s in guarded.seen["exec"])
    assert all(program_check._expr(s) for s in guarded.seen["sympify"])


@pytest.mark.parametrize("route", ["second model", "legacy weights", "opaque constant",
                                   "sympify", "sample inputs"])
def test_forgeries_do_run_code_in_torch_export_load(packed, route, tmp_path):
    """The forgeries are real: torch's own loader runs the payload."""
    canary = tmp_path / "pwned"
    try:
        torch.export.load(io.BytesIO(forge(packed[0], route, canary)))
    except Exception:  # the payload has run by the time torch notices the archive is odd
        pass
    assert canary.exists()


def test_sizes_are_checked_before_allocating(packed):
    def huge(doc):
        meta = doc["config"]["0.weight"]["tensor_meta"]
        meta["sizes"] = [{"as_int": 1 << 40}, {"as_int": 1 << 20}]
    with pytest.raises(DczError, match="does not fit"):
        program.load_module(edit_json(packed[0], "model_weights_config.json", huge))
    info = zipfile.ZipInfo("archive/data/weights/weight_7")
    info.file_size = 1 << 40
    with pytest.raises(DczError):
        program.load_module(rewrite(packed[0], lambda n, c: (n, c), extra=[(info, b"")]))


def test_garbage_and_truncation_are_refused(packed):
    data = packed[0]
    at = data.index(b'"graph_module"')
    flipped = data[:at] + b"{" + data[at + 1:]
    for bad in (b"not a zip at all", data[: len(data) // 2], data[:-10], flipped):
        with pytest.raises(DczError, match=r"^program: "):
            program.load_module(bad)
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(DczError, match=r"^program: "):
        program.load_module(rewrite(data, lambda n, c: (n, deep if n.endswith("model.json")
                                                        else c)))
    with pytest.raises(DczError, match="NaN"):
        program.load_module(edit_json(data, "models/model.json", lambda d: graph(d)["nodes"][
            0]["inputs"].append({"name": "x", "arg": {"as_float": float("nan")}, "kind": 2})))


def test_a_program_written_by_deepcompress_0_1_still_loads():
    """tests/data/v0.1-mlp-program.dcz: Sequential(Linear(4, 3), ReLU, Linear(3, 2)), seed 0,
    saved by the 0.1.0 writer (its archive keeps stack traces in node metadata)."""
    import deepcompress

    path = Path(__file__).parent / "data" / "v0.1-mlp-program.dcz"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    x = torch.linspace(-1, 1, 20).reshape(5, 4)
    assert torch.equal(deepcompress.load(path)(x), model.eval()(x))
