"""What every converter shares: its error type and the command line's way of failing."""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class ConversionError(ValueError):
    """Bad input for a converter; the message is one line."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__


def or_exit(convert_call: Callable[[], T], errors: tuple[type[BaseException], ...] = ()) -> T:
    """convert_call(); on a ConversionError, OSError or one of `errors`: `error: <first line>`
    on stderr and exit code 2 (bad input never ends in a traceback)."""
    try:
        return convert_call()
    except (ConversionError, OSError, *errors) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(2)
