"""Calibration: im2col rows match the layers, hooks collect H, block-by-block equals a full pass."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from deepcompress.calibration import (
    as_batches,
    calibrate_blocks,
    collect_hessians,
    floating_outputs,
    layer_rows,
)
from deepcompress.errors import CompressError


@pytest.mark.parametrize("layer, shape", [
    (nn.Linear(6, 4), (3, 5, 6)),
    (nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=2), (2, 3, 9, 8)),
    (nn.Conv2d(3, 4, (5, 1), padding="same", padding_mode="reflect"), (2, 3, 11, 1)),
    (nn.Conv1d(3, 4, 4, stride=2, padding=3, padding_mode="circular"), (2, 3, 17)),
    (nn.Conv1d(3, 4, 3, padding="same", dilation=2), (2, 3, 10)),
])
def test_rows_reproduce_layer_output(layer: nn.Module, shape: tuple) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape)
    rows = torch.cat(list(layer_rows(layer, x)))
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    got = rows @ w.T
    with torch.no_grad():
        ref = layer(x) - layer.bias.reshape(-1, *[1] * (x.dim() - 2)) if not isinstance(layer, nn.Linear) \
            else layer(x) - layer.bias
    ref = ref.reshape(-1, w.shape[0]) if isinstance(layer, nn.Linear) else ref.movedim(1, -1).reshape(-1, w.shape[0])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


class Functional(nn.Module):
    """Blocks that do not chain: functional ops between them and a dataclass output."""

    @dataclass
    class Out:
        logits: torch.Tensor
        hidden: torch.Tensor
        count: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 8, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> Out:
        h = torch.relu(self.conv(x)).flatten(1)
        if scale is not None:
            h = h * scale
        h = torch.tanh(self.fc1(h))
        return self.Out(self.fc2(h), h, torch.tensor(3))


def _seq() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.Tanh(),
                         nn.Linear(8, 4))


def _halve_smallest(block: str, layers: dict) -> None:
    for _, (module, _) in layers.items():
        with torch.no_grad():
            w = module.weight
            w[w.abs() < w.abs().median()] = 0


@pytest.mark.parametrize("make, batches, mode", [
    (_seq, [torch.randn(5, 1, 6, 6), torch.randn(3, 1, 6, 6)], "chain"),
    (Functional, [{"x": torch.randn(4, 2, 8), "scale": torch.rand(4, 32)}, {"x": torch.randn(2, 2, 8)}], "prefix"),
])
def test_blocks_see_compressed_predecessors(make, batches, mode: str) -> None:
    torch.manual_seed(0)
    model = make()
    dense = collect_hessians(model, batches)
    seen: dict[str, torch.Tensor] = {}

    def compress(block: str, layers: dict) -> None:
        for name, (_, moments) in layers.items():
            seen[name] = moments.sum.clone()
            assert moments.count > 0
        _halve_smallest(block, layers)

    assert calibrate_blocks(model, batches, compress) == mode
    final = collect_hessians(model, batches)  # every block here holds one layer
    first = next(iter(dense))
    torch.testing.assert_close(seen[first], dense[first].sum, rtol=1e-12, atol=1e-12)
    for name in seen:
        torch.testing.assert_close(seen[name], final[name].sum, rtol=1e-10, atol=1e-10)
    assert any(not torch.allclose(seen[n], dense[n].sum) for n in list(seen)[1:])


def test_named_blocks_and_prefix_equal_chain() -> None:
    torch.manual_seed(0)
    batches = [torch.randn(4, 1, 6, 6)]
    sums = {}
    for blocks, mode in ((None, "chain"), (["0", "3", "5"], "prefix")):  # ReLU, Flatten, Tanh skipped
        torch.manual_seed(1)
        model = _seq()
        got: dict[str, torch.Tensor] = {}

        def compress(block: str, layers: dict, got: dict = got) -> None:
            got.update({n: m.sum.clone() for n, (_, m) in layers.items()})
            _halve_smallest(block, layers)

        assert calibrate_blocks(model, batches, compress, blocks=blocks) == mode
        sums[mode] = got
    for name in sums["chain"]:
        torch.testing.assert_close(sums["chain"][name], sums["prefix"][name])


def test_outputs_and_bad_input() -> None:
    out = {"a": torch.ones(2), "b": (torch.zeros(1, dtype=torch.long), [torch.ones(3)]), "c": None}
    assert [t.numel() for t in floating_outputs(out)] == [2, 3]
    assert len(floating_outputs(Functional.Out(torch.ones(1), torch.ones(2), torch.tensor(1)))) == 2
    assert len(as_batches(torch.randn(130, 3), 64)) == 3
    for bad in ([], [1, 2], "text", torch.zeros(())):
        with pytest.raises(CompressError):
            as_batches(bad)
    model = _seq()
    with pytest.raises(CompressError, match="not a submodule"):
        calibrate_blocks(model, [torch.randn(1, 1, 6, 6)], lambda b, layers: None, blocks=["nope"])
    with pytest.raises(CompressError, match="do not feed"):
        calibrate_blocks(Functional(), [torch.randn(1, 2, 8)], lambda b, layers: None, mode="chain")
    with pytest.raises(CompressError, match="never ran"):
        m = nn.ModuleDict({"used": nn.Linear(2, 2), "unused": nn.Linear(2, 2)})
        m.forward = lambda x: m["used"](x)  # type: ignore[method-assign]
        calibrate_blocks(m, [torch.randn(1, 2)], lambda b, layers: None, mode="prefix")
