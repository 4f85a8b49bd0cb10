"""The one exception type for user errors (bad file, missing column, unknown model...)."""

from __future__ import annotations


class ValuegateError(Exception):
    """A user error: the message says what went wrong and what to do; the CLI prints it without a traceback."""
