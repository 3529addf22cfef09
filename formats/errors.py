"""The one exception type of the lossless layer."""


class DczError(ValueError):
    """A malformed, truncated, corrupted or unsupported file; the message names the section."""
