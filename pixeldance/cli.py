"""How every command line fails: a user error is one line `error: ...` on stderr and exit code 2.

User errors are what bad input raises: ValueError (the project's one-line errors such as
ConversionError, WeightsError, StatsError, and json.JSONDecodeError / UnicodeDecodeError of a
garbled file), OSError (a missing, unreadable, read-only or full file: `error: PATH: Read-only file
system`), absl's flag errors, ml_collections' config override errors and app.UsageError. Anything
else is a bug and keeps its traceback; `--verbosity=1` shows the traceback of a user error too.

    cli.run(main)                # instead of app.run(main): flags parsed, errors one line
    @cli.one_line_errors         # on a main that tests call in-process (it exits 2 by itself)
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import os
import re
import sys
from typing import Callable, NoReturn

from absl import app, flags

USER_ERRORS = (ValueError, OSError, app.UsageError)


def run(main: Callable, *, errors: tuple[type[BaseException], ...] = ()) -> NoReturn:
    """`app.run(main)`: flags parsed by `parse_flags`, and `main`'s user errors (and `errors`)
    one line with exit code 2."""
    app.run(one_line_errors(main, errors=errors), flags_parser=parse_flags)


def one_line_errors(main: Callable | None = None, *, errors: tuple[type[BaseException], ...] = ()):
    """`main(argv)` with its user errors (and `errors`) as one line `error: ...` and exit code 2;
    with `--verbosity=1` (or more) they propagate. A decorator, with or without arguments."""
    if main is None:
        return functools.partial(one_line_errors, errors=errors)
    if getattr(main, "_one_line_errors", None) == errors:
        return main

    @functools.wraps(main)
    def guarded(argv=None):
        try:
            return main(argv)
        except (*USER_ERRORS, *errors) as e:
            if debug(argv):
                raise
            fail(first_line(e))

    guarded._one_line_errors = errors
    return guarded


def fail(message: str, *, hard: bool = False) -> NoReturn:
    """`error: message` on stderr and exit code 2; `hard`: at once (os._exit, after flushing),
    so that no thread or shutdown hook prints after it."""
    _close_progress_bars()
    print(f"error: {message}", file=sys.stderr)
    if hard:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    sys.exit(2)


def _close_progress_bars():
    """Ends the lines of tqdm bars the error left open, so that the error has a line of its own."""
    tqdm = sys.modules.get("tqdm")  # loaded by the trainers' and cache's bars, if at all
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        with contextlib.suppress(Exception):  # a bar half torn down already
            bar.close()


def first_line(e: BaseException) -> str:
    """An error as one line: its message's first line; an OSError of the system as `PATH: reason`
    (`SRC -> DST: reason` for a rename); its type's name when it has no message."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None and str(e).startswith("[Errno"):
        target = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
        return f"{target}: {e.strerror}"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def debug(argv=None) -> bool:
    """Whether tracebacks were asked for: --verbosity >= 1 (absl's flag once parsed, else in argv)."""
    if flags.FLAGS.is_parsed() and "verbosity" in flags.FLAGS:
        return flags.FLAGS.verbosity >= 1
    args = sys.argv[1:] if argv is None else argv
    return any(re.fullmatch(r"--verbosity=\s*[1-9]\d*", str(a)) for a in args)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing with one line for every flag error (an unknown flag, a bad value, a missing
    required flag) and for a config file's errors (a missing file, a misspelt field, a bad value
    or argument), naming the flag, and exit code 2."""
    for arg in argv[1:]:
        if arg.startswith("--config=") and "config" in flags.FLAGS:
            path = arg.split("=", 1)[1].split(":", 1)[0]
            if not os.path.isfile(path):
                _usage_error(f"{arg}: no such config file {path}")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # a config file that raised has its traceback inside the message
        lines = [line for line in str(e).splitlines() if line.strip()]
        _usage_error(lines[0] + (f" {lines[-1]}" if "Traceback" in str(e) else ""), e, argv)
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections' override errors
        text = str(e.args[0] if e.args else e)
        if text[:1] in "'\"" and text[-1:] == text[:1]:  # a KeyError's repr inside an AttributeError
            with contextlib.suppress(ValueError, SyntaxError):
                text = ast.literal_eval(text)
        text = " ".join(text.split())
        key = text.split("'")[1] if text.count("'") >= 2 else None
        named = [a.split("=")[0] for a in argv[1:] if key and a.startswith("--config.")
                 and f".{key}." in a.split("=")[0] + "."]
        _usage_error(f"{named[0] if named else '--config'}: {text}", e, argv)


def _usage_error(message: str, error: BaseException | None = None, argv=()) -> NoReturn:
    if error is not None and debug(list(argv)):
        raise error
    fail(message)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the tools that do not use absl's global flags: a bad or missing argument is a
    UsageError (one line through `one_line_errors`); --verbosity=1 shows tracebacks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--verbosity", type=int, default=0, help="1: tracebacks instead of one-line errors")

    def error(self, message):
        raise app.UsageError(message)
