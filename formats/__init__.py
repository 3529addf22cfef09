"""The lossless layer: canonical Huffman, sparse positions and the `.dcz` container."""

from .dcz import DczFile, read, write
from .errors import DczError

__all__ = ["DczError", "DczFile", "read", "write"]
