"""`dcompress methods`: every registered criterion, allocation, schedule and regulariser."""
from __future__ import annotations

import json

import click

from deepcompress import allocation, criteria, regularisers, schedules

KINDS = {"criterion": criteria, "allocation": allocation, "schedule": schedules,
         "regulariser": regularisers}


def _help(cls: type) -> str:
    return " ".join((cls.__doc__ or "").split("\n\n")[0].split())


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def methods(as_json: bool) -> None:
    """List the names `--criterion`, `--allocation`, `--schedule` and `--regulariser` take, with
    what each needs and costs."""
    table = {kind: {name: _help(module.get(name)) for name in module.names()}
             for kind, module in KINDS.items()}
    if as_json:
        click.echo(json.dumps(table, indent=2))
        return
    for kind, rows in table.items():
        click.echo(f"--{kind}")
        for name, text in rows.items():
            click.echo(f"  {name:<14} {text}")
