"""Transparent huge pages for malloc, so XLA:CPU's per-step buffers do not page-fault.

Why: XLA:CPU allocates each program's temporary buffer afresh at every execution (the main job's
DiT train step: about 350 MB), glibc serves an allocation that large with a new mmap, and the
kernel then faults its 4 KiB pages in one by one as the step writes them: about 90,000 page
faults per step, a quarter of the job's CPU time spent in the kernel. glibc >= 2.35 can ask for
transparent huge pages (2 MiB) on such mappings (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`), 512x
fewer faults; on the 2-core CPU that made the main job's DiT step 1.37x faster
(benchmarks/README.md, "Huge pages"). glibc reads tunables once, when the process starts, so a
command line that wants them has to start again with them set: `reexec` does that, first thing,
in the project's command lines (`python -m pixeldance.main`, `.sample`, `.evaluate`).

Nothing changes unless all hold: Linux with glibc >= 2.35, transparent huge pages enabled as
`always` or `madvise` (/sys/kernel/mm/transparent_hugepage/enabled), GLIBC_TUNABLES does not set
`glibc.malloc.hugetlb` already (which also makes the re-exec happen once), and
PIXELDANCE_HUGEPAGES is not `0` (the way to turn it off). Pure standard library: it runs before
JAX is imported.
"""
from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "PIXELDANCE_HUGEPAGES"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library this process runs on, or None where it is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    if name != "glibc":
        return None
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), or None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def with_tunable(tunables: str) -> str:
    """A GLIBC_TUNABLES value (colon-separated name=value) with glibc.malloc.hugetlb=1 added."""
    parts = [p for p in tunables.split(":") if p]
    return ":".join(parts + [f"{TUNABLE}=1"])


_DETECT = object()


def wanted(environ=None, glibc=_DETECT, thp=_DETECT, platform: str | None = None) -> bool:
    """Whether `reexec` would start the process again (module docstring); the arguments default
    to this process's environment, glibc version (None: not glibc), kernel THP mode (None:
    unknown) and platform."""
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if not platform.startswith("linux") or environ.get(OPT_OUT, "1") == "0":
        return False
    if any(p.split("=")[0] == TUNABLE for p in environ.get("GLIBC_TUNABLES", "").split(":")):
        return False
    glibc = glibc_version() if glibc is _DETECT else glibc
    if glibc is None or tuple(glibc) < MIN_GLIBC:
        return False
    return (thp_mode() if thp is _DETECT else thp) in ("always", "madvise")


def reexec() -> None:
    """Starts this process again with glibc.malloc.hugetlb=1 where `wanted` says so (the same
    interpreter, options, arguments and process id: `os.execve` of `sys.orig_argv`); otherwise
    returns. Call it before anything else has run: nothing done before it survives."""
    if not wanted() or not getattr(sys, "orig_argv", None):
        return
    environ = dict(os.environ, GLIBC_TUNABLES=with_tunable(os.environ.get("GLIBC_TUNABLES", "")))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)
