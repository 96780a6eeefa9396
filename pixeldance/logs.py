"""The command lines' log: the project's lines, not the libraries' chatter, and intact progress bars.

    logs.setup()                       # once, in an entry point, after absl parsed the flags
    with logs.stage("train_vae", paths):  # one line as a stage starts, one as it ends
        ...

By default the INFO (and DEBUG) records of the libraries (Orbax, absl, grain, JAX, ...) are
dropped: a `:runlocal` main job printed 277 of them among its 303 lines. Their warnings and
errors, and every record of pixeldance's own modules, are kept. `--verbosity=1` (absl's flag,
which also turns the one-line errors into tracebacks) brings the libraries' lines back.

Lines logged or printed while a tqdm progress bar is drawn are written whole, with the bars
cleared first and redrawn after, so no line ends up inside a bar (absl's handler and
`sys.stdout`; the bars draw on stderr).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

from absl import logging as absl_logging
from tqdm import tqdm

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def is_library_info(record: logging.LogRecord) -> bool:
    """Whether `record` is a library's INFO or DEBUG record (not from a module of pixeldance)."""
    return record.levelno < logging.WARNING and not os.path.abspath(record.pathname).startswith(_PACKAGE)


class _QuietLibraries(logging.Filter):
    """Drops the libraries' INFO / DEBUG records unless absl's verbosity is 1 (DEBUG) or more;
    read at each record, so a later `--verbosity` change applies."""

    def filter(self, record: logging.LogRecord) -> bool:
        return absl_logging.get_verbosity() >= absl_logging.DEBUG or not is_library_info(record)


class _AroundBars:
    """A text stream that writes whole lines only, each with tqdm's bars cleared before and
    redrawn after (`tqdm.external_write_mode`); a partial line waits for its newline or a flush.
    Compares equal to the stream it wraps (absl's handler checks `stream == sys.stderr`)."""

    def __init__(self, stream):
        self._stream, self._partial = stream, ""

    def write(self, text: str) -> int:
        head, newline, self._partial = (self._partial + text).rpartition("\n")
        if newline:
            self._write(head + newline)
        return len(text)

    def flush(self):
        if self._partial:
            text, self._partial = self._partial, ""
            self._write(text)
        self._stream.flush()

    def _write(self, text: str):
        with tqdm.external_write_mode(file=self._stream):
            self._stream.write(text)
            self._stream.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding, buffer, ...
        return getattr(self._stream, name)

    def __eq__(self, other) -> bool:
        return self._stream == (other._stream if isinstance(other, _AroundBars) else other)

    def __hash__(self) -> int:
        return hash(self._stream)


def setup():
    """Quiet libraries and bar-safe lines for this process (see the module docstring). Call it
    after absl has parsed the flags (inside `app.run`'s main); calling it again changes nothing."""
    absl_logging.use_absl_handler()  # app.run installed it already; a no-op then
    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
        handler.addFilter(_QuietLibraries())
    python_handler = handler.python_handler
    if python_handler.stream is sys.stderr:  # not when absl logs to a file (--logtostderr=false)
        python_handler.setStream(_AroundBars(sys.stderr))
    if not isinstance(sys.stdout, _AroundBars):
        sys.stdout = _AroundBars(sys.stdout)


@contextlib.contextmanager
def stage(name: str, outputs: list[str]):
    """Logs one line as stage `name` starts, naming what it writes (`outputs`: paths), and one as it
    ends, with its seconds (none when it raises: the error is the last line)."""
    t0 = time.time()
    absl_logging.info("stage %s: starting; writes %s", name, ", ".join(outputs))
    yield
    absl_logging.info("stage %s: done in %.0f s; wrote %s", name, time.time() - t0,
                      ", ".join(p for p in outputs if os.path.exists(p)) or "nothing new")
