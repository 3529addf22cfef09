"""Where `bake` used to live; it is deepcompress.parametrize.bake (pipeline and benchmarks import it here)."""
from deepcompress.parametrize import bake

__all__ = ["bake"]
