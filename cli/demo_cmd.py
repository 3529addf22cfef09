"""`dcompress demo`: the whole method on a small model, end to end."""

from __future__ import annotations

import json

import click

from deepcompress.demo import run_demo

from .compress_cmd import check_output


@click.command()
@click.option("-o", "--output", default="demo.dcz", show_default=True,
              type=click.Path(dir_okay=False), help="Where to write the compressed model. "
              "Example: -o /tmp/demo.dcz")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Use MNIST from this "
              "folder instead of scikit-learn's digits. Example: --data-dir ../shared/data/mnist")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def demo(output: str, data_dir: str | None, force: bool, quiet: bool, as_json: bool) -> None:
    """Train LeNet-300-100, prune, share weights, write a .dcz, load it back and check it.

    \b
    Example:
      dcompress demo -o /tmp/demo.dcz
    """
    out = check_output(output, force)
    r = run_demo(out, data_dir, quiet=quiet or as_json)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"LeNet-300-100 on {r['task']} ({r['weights']} weights)")
    click.echo(f"{'stage':<28} {'test accuracy':>13} {'bytes':>9} {'ratio':>7}")
    rows = [("dense (fp32)", r["dense_accuracy"], r["dense_bytes"]),
            ("pruned", r["pruned_accuracy"], r["pruned_bytes"]),
            ("pruned + shared, in .dcz", r["shared_accuracy"], r["file_bytes"]),
            ("reloaded from .dcz", r["final_accuracy"], r["file_bytes"])]
    for name, acc, size in rows:
        click.echo(f"{name:<28} {acc:>13.2%} {size:>9} {r['dense_bytes'] / size:>6.1f}x")
    click.echo(f"wrote {r['output']}: {r['nonzero']} of {r['weights']} weights kept, "
               f"{r['ratio']:.1f}x smaller, {r['seconds']:.0f} s")
