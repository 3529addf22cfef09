"""`dcompress inspect`: what is inside a .dcz, layer by layer."""

from __future__ import annotations

import json

import click

from deepcompress.formats.summary import summarize
from deepcompress.plots import plot_summary


def _kb(n: int) -> str:
    return f"{n / 1000:.1f}K" if n >= 1000 else str(n)


def _printable(name: str) -> str:
    """A tensor name safe for a terminal: control and format characters escaped."""
    return name if name.isprintable() else ascii(name)[1:-1]


def render(s: dict) -> str:
    """The summary as a text table with totals."""
    head = (f"{'tensor':<28} {'shape':<16} {'weights':>9} {'density':>7} {'clusters':>10} "
            f"{'val b/nz':>8} {'pos b/nz':>8} {'bytes':>8} {'ratio':>7}  layout / codings")
    lines = [head, "-" * len(head)]
    for r in s["tensors"]:
        shape = "x".join(map(str, r["shape"])) or "scalar"
        clusters = "-"
        if r["encoding"] == "shared":  # grouped: K per group x G groups, e.g. 16x512g
            clusters = (f"{r['clusters']} ({r['cluster_bits']}b)" if r.get("group_rows") is None
                        else f"{r['clusters']}x{r['groups']}g")
        vb = f"{r['value_bits_per_nonzero']:.2f}" if "value_bits_per_nonzero" in r else "-"
        pb = f"{r['position_bits_per_nonzero']:.2f}" if "position_bits_per_nonzero" in r else "-"
        ratio = f"{r['ratio']:.1f}x" if r["ratio"] else "-"
        density = "-" if r["density"] is None else f"{r['density']:.1%}"
        codings = " ".join(f"{k}:{v}" for k, v in r["codings"].items())
        lines.append(f"{_printable(r['name'])[:28]:<28} {shape[:16]:<16} {r['weights']:>9} "
                     f"{density:>7} {clusters:>10} {vb:>8} {pb:>8} {_kb(r['bytes']):>8} "
                     f"{ratio:>7}  {_printable(r['layout'])} {codings}".rstrip())
    lines.append("-" * len(head))
    nonzero = ("nonzero not counted (header only)" if s["nonzero"] is None else
               f"{s['nonzero']} nonzero ({s['nonzero'] / max(s['weights'], 1):.1%})")
    lines.append(f"{len(s['tensors'])} tensors, {s['weights']} weights, {nonzero}")
    lines.append(f"tensor streams {s['tensor_bytes']} B (Huffman tables {s['table_bytes']} B), "
                 f"header {s['header_bytes']} B, preamble+trailer "
                 f"{s['overhead_bytes'] - s['header_bytes']} B")
    arch = s["architecture_bytes"]
    if not arch:
        lines.append("architecture: not inside; load with deepcompress.load(FILE, model=Net())")
    elif s["checked"]:
        lines.append(f"architecture: torch.export program inside ({arch} B), checked; "
                     "deepcompress.load(FILE) runs it")
    else:
        lines.append(f"architecture: torch.export program inside ({arch} B), not checked "
                     "(--header-only)")
    lines.append(f"file {s['file_bytes']} B vs fp32 dense {s['dense_bytes']} B: "
                 f"{s['ratio']:.1f}x smaller")
    return "\n".join(lines)


@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--header-only", is_flag=True,
              help="Validate the header alone: fast on huge files, but streams are not decoded, "
              "the architecture is not checked and raw tensors' nonzeros are not counted.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also draw per-tensor bytes and bits per weight to this PNG, e.g. --plot m.png.")
def inspect(file: str, as_json: bool, header_only: bool, plot_path: str | None) -> None:
    """Show what is inside a .dcz, tensor by tensor, checking everything load would check.

    \b
    Example:
      dcompress inspect lenet.dcz
      dcompress inspect lenet.dcz --json | jq .ratio
    """
    s = summarize(file, header_only=header_only)
    click.echo(json.dumps(s, indent=2) if as_json else render(s))
    if plot_path:
        plot_summary(s, plot_path)
