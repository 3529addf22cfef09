"""Model files in: `.pt`/`.pth`/`.bin` state_dicts (weights_only), safetensors (single or
sharded), torch.export programs (`.pt2`). A pickled nn.Module is refused unless asked for."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .dcz import MAGIC
from .errors import ModelFileError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass
class ModelFile:
    """A model read from disk: its tensors (name -> tensor) and, for .pt2, the exported program."""

    path: Path
    kind: str  # "state_dict", "safetensors", "export", "module"
    tensors: dict[str, torch.Tensor]
    program: object | None = None
    module: torch.nn.Module | None = field(default=None, repr=False)


def _flat_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # Lightning-style checkpoints
    if not isinstance(obj, dict) or not obj:
        raise ModelFileError(f"{path}: holds a {type(obj).__name__}, not a state_dict of tensors; "
                             "save one with torch.save(model.state_dict(), path)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelFileError(f"{path}: entry {bad[0]!r} is not a named tensor; save "
                             "model.state_dict() instead")
    return dict(obj)


def is_dcz(path: str | os.PathLike) -> bool:
    """Whether the file starts with the .dcz magic bytes."""
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def read_model(path: str | os.PathLike, unsafe_pickle: bool = False) -> ModelFile:
    """Read a model file by its suffix; raises ModelFileError with one clear line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file; check the path")
    if is_dcz(path):
        raise ModelFileError(f"{path}: is already a .dcz; give the original model file "
                             "(or use 'dcompress decompress' to get one back)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors" or path.name.endswith(".safetensors.index.json"):
        return ModelFile(path, "safetensors", dict(iter_safetensors(path)))
    if suffix == ".pt2":
        try:
            program = torch.export.load(path)
        except Exception as exc:  # torch raises many types for a bad archive
            raise ModelFileError(f"{path}: not a readable torch.export program ({exc}); "
                                 "save one with torch.export.save") from None
        tensors = {**program.state_dict, **{k: v for k, v in program.constants.items()
                                            if isinstance(v, torch.Tensor)}}
        return ModelFile(path, "export", tensors, program=program)
    if suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            if not unsafe_pickle:
                if "weights_only" in str(exc) or "Unsupported global" in str(exc):
                    raise ModelFileError(
                        f"{path}: is a pickled object (likely a whole nn.Module), and loading it "
                        "runs code from the file; save model.state_dict() instead, or pass "
                        "--unsafe-pickle if you trust the file") from None
                raise ModelFileError(f"{path}: not a readable torch file ({exc})") from None
            obj = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(obj, torch.nn.Module):
            return ModelFile(path, "module", dict(obj.state_dict()), module=obj)
        return ModelFile(path, "state_dict", _flat_state_dict(obj, path))
    raise ModelFileError(f"{path}: unknown model file type {suffix!r}; give a .pt/.pth state_dict, "
                         "a .safetensors file or a torch.export .pt2 program")


def iter_safetensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a safetensors file or a sharded index, one tensor in memory at a time."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelFileError(f"{path}: not a safetensors index ({exc})") from None
        shards = list(dict.fromkeys(weight_map.values()))
        files = [path.parent / s for s in shards]
    else:
        files = [path]
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise ModelFileError(f"{file}: not a readable safetensors file ({exc})") from None
