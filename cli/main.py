"""The `dcompress` command: a thin layer over the library; bad input exits 2 with one line."""

from __future__ import annotations

import click

from deepcompress import __version__
from deepcompress.errors import DeepCompressError

from .compress_cmd import compress, decompress, evaluate
from .demo_cmd import demo
from .inspect_cmd import inspect
from .methods_cmd import methods
from .sensitivity import sensitivity


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return " ".join(str(exc).split())


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (DeepCompressError, OSError) as exc:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {_one_line(exc)}", err=True)
            raise click.exceptions.Exit(2) from None
        except MemoryError:
            if ctx.params.get("debug"):
                raise
            click.echo("error: out of memory; free memory, or for a look inside a .dcz use "
                       "dcompress inspect --header-only", err=True)
            raise click.exceptions.Exit(2) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dcompress")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
def main(debug: bool) -> None:
    """Make trained PyTorch models small: prune, share weights, Huffman-code.

    \b
    Examples:
      dcompress compress model.pt -o model.dcz --task mnist --data-dir data/mnist
      dcompress inspect model.dcz
      python -c "import deepcompress; m = deepcompress.load('model.dcz')"
    """


main.add_command(compress)
main.add_command(decompress)
main.add_command(demo)
main.add_command(evaluate)
main.add_command(inspect)
main.add_command(methods)
main.add_command(sensitivity)

if __name__ == "__main__":
    main()
