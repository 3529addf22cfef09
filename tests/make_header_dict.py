"""Retrain the version 3 header dictionary (formats/header_dict3.py, SPEC appendix B).

Samples: the compact headers of files written by the current writer for the models of
deepcompress.models (fresh random weights, not the Table 1 files) pruned to various sparsities
and shared at 2 to 8 bits, with the metadata deepcompress writes, plus a few generic conv-net
and transformer state dicts. Run: .venv/bin/python tests/make_header_dict.py [SIZE]
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

import torch
import zstandard

from deepcompress import models
from deepcompress.formats import dcz


def shared(t: torch.Tensor, sparsity: float, bits: int) -> torch.Tensor:
    """Magnitude-pruned to `sparsity`, the survivors rounded to 2^bits - 1 levels."""
    t = t.clone()
    if t.numel() > 1:
        cut = t.abs().flatten().kthvalue(max(1, int(sparsity * t.numel()))).values
        t[t.abs() <= cut] = 0
    nz = t != 0
    if nz.any():
        lo, hi = t[nz].min(), t[nz].max()
        k = (1 << bits) - 1
        q = torch.round((t - lo) / max(float(hi - lo), 1e-12) * (k - 1)) / (k - 1) * (hi - lo) + lo
        q[q == 0] = lo
        t = torch.where(nz, q, t)
    return t


def generic(rng: random.Random) -> dict[str, torch.Tensor]:
    """A conv net or a small transformer, as names and shapes go."""
    out = {}
    if rng.random() < 0.5:
        ch = 3
        for i in range(rng.randint(2, 6)):
            width = rng.choice([16, 32, 64, 128])
            out[f"features.{3 * i}.weight"] = torch.randn(width, ch, 3, 3)
            out[f"features.{3 * i}.bias"] = torch.randn(width)
            ch = width
        out["classifier.1.weight"] = torch.randn(10, ch * 4)
        out["classifier.1.bias"] = torch.randn(10)
    else:
        d = rng.choice([32, 64, 128])
        for i in range(rng.randint(1, 3)):
            p = f"encoder.layers.{i}"
            out[f"{p}.self_attn.in_proj_weight"] = torch.randn(3 * d, d)
            out[f"{p}.self_attn.out_proj.weight"] = torch.randn(d, d)
            out[f"{p}.linear1.weight"] = torch.randn(4 * d, d)
            out[f"{p}.linear2.weight"] = torch.randn(d, 4 * d)
            out[f"{p}.norm1.weight"] = torch.ones(d)
            out[f"{p}.norm1.bias"] = torch.zeros(d)
    return out


def samples(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    got: list[bytes] = []
    real = dcz.header_frame
    dcz.header_frame = lambda raw: got.append(raw) or real(raw)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(n):
                torch.manual_seed(i)
                kind = rng.choice(["lenet300", "lenet5", "digits_mlp", "generic"])
                sd = (generic(rng) if kind == "generic"
                      else getattr(models, kind)().state_dict())
                bits, bias_bits = rng.randint(2, 8), rng.choice([4, 5, 6, 32])
                out = {}
                for name, t in sd.items():
                    if name.endswith("bias") or t.dim() == 1:
                        out[name] = t if bias_bits == 32 else shared(t, 0.0, bias_bits)
                    else:
                        out[name] = shared(t, rng.uniform(0.5, 0.97), bits)
                meta = {"producer": "deepcompress 0.1.0"}
                if kind != "generic" and rng.random() < 0.5:
                    meta.update(benchmark="table1", model=kind)
                dcz.write(Path(tmp) / "x.dcz", out, meta)
    finally:
        dcz.header_frame = real
    return got


def train(size: int, n: int = 240) -> bytes:
    data = samples(n)
    d = zstandard.train_dictionary(size, data, level=19, split_point=1.0, threads=1,
                                   notifications=0, dict_id=0x44435a33)
    return d.as_bytes()


if __name__ == "__main__":
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    raw = train(size)
    hexed = raw.hex()
    lines = [hexed[i:i + 96] for i in range(0, len(hexed), 96)]
    path = Path(__file__).parents[1] / "formats" / "header_dict3.py"
    path.write_text('"""The version 3 header dictionary (SPEC appendix B), as hex; made by '
                    'tests/make_header_dict.py."""\n\nHEX = (\n'
                    + "".join(f'    "{line}"\n' for line in lines) + ")\n")
    print(f"{len(raw)} bytes -> {path}")
