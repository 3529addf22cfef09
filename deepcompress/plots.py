"""Charts as PNG files (matplotlib, the optional 'plot' extra): a .dcz's bytes per tensor."""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

from .errors import CompressError


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the file-only Agg backend, or a CompressError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CompressError("plots need matplotlib: pip install 'deepcompress[plot]'") from None
    return plt


def plot_summary(summary: dict, path: str | Path) -> None:
    """Per-tensor bytes and bits per weight of a formats.summary.summarize() result, as a PNG."""
    plt = pyplot()
    rows = [r for r in summary["tensors"] if r["bytes"]]
    names = [r["name"] for r in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(max(6, 0.5 * len(rows) + 2), 6), sharex=True)
    a.bar(names, [r["bytes"] for r in rows], color="tab:blue")
    a.set_ylabel("bytes")
    a.set_title(f"{Path(summary['file']).name}: {summary['file_bytes']} B, "
                f"{summary['ratio']:.1f}x vs fp32")
    b.bar(names, [8 * r["bytes"] / max(r["weights"], 1) for r in rows], color="tab:orange")
    b.set_ylabel("bits per weight")
    b.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
