"""Errors of the lossy stages, the pipeline and the API, under the project's one base type."""

from .formats.errors import DczError, DeepCompressError, ModelFileError


class CompressError(DeepCompressError):
    """Bad settings or input to compression: one line naming the thing at fault and the fix."""


__all__ = ["CompressError", "DczError", "DeepCompressError", "ModelFileError"]
