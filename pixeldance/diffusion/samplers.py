"""Samplers as `lax.scan` loops over a time grid (pure functions, jit-able, shard-agnostic).

Each sampler takes `velocity_fn(x, t, i) -> v`, where t is the scalar flow time and i the step
index (so callers can switch conditioning at a step, e.g. PixelDance's tau), and an optional
`project(x) -> x` applied after every step (e.g. re-inserting a clean first frame).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pixeldance.diffusion import schedules

SAMPLERS = ("euler", "heun")


def sample(velocity_fn: Callable, x_init, *, steps: int, sampler: str = "euler", shift: float = 1.0,
           project: Callable | None = None):
    """Integrates dx/dt = v from t = 1 (x_init, noise) to t = 0. Returns x at t = 0."""
    project = project or (lambda x: x)
    grid = schedules.time_grid(steps, shift)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")

    def euler_step(x, i):
        t, t_next = grid[i], grid[i + 1]
        x = x + (t_next - t) * velocity_fn(x, t, i)
        return project(x), None

    def heun_step(x, i):
        t, t_next = grid[i], grid[i + 1]
        v = velocity_fn(x, t, i)
        x_euler = project(x + (t_next - t) * v)
        # The last step lands on t = 0, where x0-parameterised velocities are ill-defined: Euler.
        v2 = velocity_fn(x_euler, t_next, i)
        x_heun = project(x + (t_next - t) * 0.5 * (v + v2))
        return jnp.where(i == steps - 1, x_euler, x_heun), None

    body = euler_step if sampler == "euler" else heun_step
    x, _ = jax.lax.scan(body, project(x_init), jnp.arange(steps))
    return x
