"""XLA flags that trade step speed for compile speed, for smoke tests on a CPU.

On XLA:CPU the `:runlocal` smoke runs and the test suite are compile-bound: a 2-layer, 32-wide
DiT train step took over a minute to compile with the default flags. Turning off XLA:CPU's
fusion emitters and most of LLVM's optimisation cut compile time 2-3x in our measurements
(benchmarks/README.md), while the compiled programs compute the same functions (they run
slower, which a smoke test does not notice). XLA reads XLA_FLAGS once, when the first backend
starts, so these must be set before any JAX computation runs.
"""
from __future__ import annotations

import os

FAST_COMPILE = ("--xla_cpu_use_fusion_emitters=false", "--xla_backend_optimization_level=0")


def with_fast_compile(xla_flags: str) -> str:
    """`xla_flags` (an XLA_FLAGS string) plus the fast-compile flags it does not set already."""
    present = {f.split("=")[0] for f in xla_flags.split()}
    extra = [f for f in FAST_COMPILE if f.split("=")[0] not in present]
    return " ".join([xla_flags.strip()] + extra).strip()


def enable_fast_compile() -> bool:
    """Adds the fast-compile flags to XLA_FLAGS. Returns False (and changes nothing) if a JAX
    backend is already running, since XLA would no longer read them."""
    from jax._src import xla_bridge  # here: tests import this module before jax may be imported
    if xla_bridge.backends_are_initialized():
        return False
    os.environ["XLA_FLAGS"] = with_fast_compile(os.environ.get("XLA_FLAGS", ""))
    return True
