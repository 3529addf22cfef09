"""Peak memory of calibrated compression on a large model of Linear blocks (issue 14's bound:
the weights + 2x the largest layer + one block's activations).

    python benchmarks/memory.py --out benchmarks/results/memory.json      # 1.07 GB fp32
    python benchmarks/memory.py --blocks 2 --width 256 --quick            # a smoke run

The model is `blocks` residual-free blocks Linear(width, 2 width) -> GELU -> Linear(2 width,
width), saved as a state dict (.pt); calibration inputs are random normal rows. The run is
`deepcompress.compress_file` (what `dcompress compress MODEL --arch ... --calib ...` runs) with
--sparsity 0.5 --bits 4, in a fresh process whose resident memory is sampled every 5 ms from
/proc/self/status: RssAnon (the process's own memory) and VmRSS (with the pages of files it
maps, which the kernel can drop), with the allocator setting that `dcompress compress --calib`
makes (cli.allocator.map_large_allocations: glibc maps blocks of 1 MiB and more on their own).
Figures are peaks above the process's memory just before compress_file (after a tiny warm-up
run, so that the libraries it loads on first use are not counted), against the bound computed
from the model's sizes. Linux only; one thread.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def blocks(n: int, width: int) -> nn.Sequential:
    """n blocks of Linear(width, 2 width), GELU, Linear(2 width, width)."""
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                         nn.Linear(2 * width, width)) for _ in range(n)])


CHILD = """
import json, sys, threading, time, resource
import torch
torch.set_num_threads(1)
import deepcompress
from deepcompress.cli.allocator import map_large_allocations
mapped = map_large_allocations()  # what dcompress compress --calib sets before any work
sys.path.insert(0, sys.argv[5])
from memory import blocks

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("RssAnon", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out

n, width = int(sys.argv[3]), int(sys.argv[4])
# a tiny run first, so that the libraries compress_file loads on first use are in the baseline
tiny = sys.argv[1] + ".tiny.pt"
torch.save(blocks(1, 8).state_dict(), tiny)
torch.save(torch.randn(16, 8), tiny + ".calib.pt")
deepcompress.compress_file(tiny, tiny + ".dcz", calib=tiny + ".calib.pt", arch=lambda: blocks(1, 8),
                           config=deepcompress.CompressConfig(sparsity=0.5, bits=4, quiet=True))
base = status()
peak = dict(base)
done = threading.Event()
def sample():
    while not done.wait(0.005):
        for k, v in status().items():
            peak[k] = max(peak[k], v)
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
report = deepcompress.compress_file(sys.argv[1], sys.argv[2], calib=sys.argv[6],
                                    arch=lambda: blocks(n, width),
                                    config=deepcompress.CompressConfig(sparsity=0.5, bits=4,
                                                                       quiet=True))
seconds = time.perf_counter() - t
done.set()
for k, v in status().items():
    peak[k] = max(peak[k], v)
print(json.dumps({"base": base, "peak": peak, "seconds": seconds, "mapped": mapped}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=16, help="Linear blocks (default 16)")
    ap.add_argument("--width", type=int, default=2048,
                    help="block width; its hidden layer is twice as wide (default 2048: 1.07 GB)")
    ap.add_argument("--calib", type=int, default=256, help="calibration rows (default 256)")
    ap.add_argument("--quick", action="store_true", help="do not write --out")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/memory.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = blocks(args.blocks, args.width)
    state = model.state_dict()
    weights = sum(v.numel() * v.element_size() for v in state.values())
    largest = max(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))
    # one block's activations over the calibration rows: its input, hidden and output
    activations = args.calib * (args.width + 2 * args.width + args.width) * 4
    bound = weights + 2 * largest + activations
    with tempfile.TemporaryDirectory() as tmp:
        src, calib, dst = Path(tmp) / "m.pt", Path(tmp) / "calib.pt", Path(tmp) / "m.dcz"
        torch.save(state, src)
        torch.save(torch.randn(args.calib, args.width), calib)
        del model, state
        out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), str(args.blocks),
                              str(args.width), str(Path(__file__).parent), str(calib)],
                             check=True, capture_output=True, text=True)
        child = json.loads(out.stdout.strip().splitlines()[-1])
        size = dst.stat().st_size
    anon = child["peak"]["RssAnon"] - child["base"]["RssAnon"]
    rss = child["peak"]["VmRSS"] - child["base"]["VmRSS"]
    result = {
        "machine": f"{platform.machine()}, torch {torch.__version__}, one thread",
        "model": f"{args.blocks} blocks Linear({args.width}, {2 * args.width}) GELU "
                 f"Linear({2 * args.width}, {args.width})",
        "options": "--calib (random normal rows) --sparsity 0.5 --bits 4",
        "calibration_rows": args.calib,
        "weights_bytes": weights, "largest_layer_bytes": largest,
        "block_activation_bytes": activations, "bound_bytes": bound,
        "peak_anon_bytes": anon, "peak_rss_bytes": rss,
        "anon_over_bound": anon / bound, "rss_over_bound": rss / bound,
        "large_allocations_mapped": child["mapped"],
        "dcz_bytes": size, "ratio": weights / size, "seconds": child["seconds"],
    }
    print(json.dumps(result, indent=1))
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
