"""The lossless layer: canonical Huffman, sparse positions and the `.dcz` container."""

from .dcz import DczFile, read, write
from .errors import DczError, DeepCompressError, ModelFileError

__all__ = ["DczError", "DczFile", "DeepCompressError", "ModelFileError", "read", "write"]
