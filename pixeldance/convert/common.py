"""What every converter shares: its error type (the command lines fail through pixeldance/cli.py:
a ConversionError, like any ValueError or OSError, is one line `error: ...` and exit code 2)."""
from __future__ import annotations

from pixeldance.cli import first_line  # the converters' messages quote errors by it

__all__ = ["ConversionError", "first_line"]


class ConversionError(ValueError):
    """Bad input for a converter; the message is one line."""
