"""The project's error types: one base, and one type per kind of bad input."""


class DeepCompressError(ValueError):
    """Bad input to deepcompress; the message is one line naming the thing at fault and the fix."""


class DczError(DeepCompressError):
    """A malformed, truncated, corrupted or unsupported .dcz; the message names the file and part."""


class ModelFileError(DeepCompressError):
    """A model file (.pt, .safetensors, .pt2) that cannot be read; the message names the fix."""
