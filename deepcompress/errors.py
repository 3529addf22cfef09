"""The one exception type for bad input to the lossy stages, the pipeline and the API."""


class CompressError(ValueError):
    """Bad input: the message is one line naming the thing at fault, the problem and the fix."""
