"""The `dcompress` command."""
import click


@click.group()
def main() -> None:
    """Make trained PyTorch models small."""


if __name__ == "__main__":
    main()
