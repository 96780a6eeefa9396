"""Samplers as `lax.scan` loops over a time grid (pure functions, jit-able, shard-agnostic).

Every sampler is driven by one interface, `denoise_fn(x, t, i) -> (x0_hat, v_hat)` (see
`objectives.denoise`; v_hat = eps_hat - x0_hat): x is the state on the objective's noise path at
time t (a float32 scalar in [0, 1], 1 = noise), i the int32 step index (so callers can switch
conditioning at a step, e.g. PixelDance's tau). An optional `project(x) -> x` runs on the
initial state and after every step (e.g. re-inserting a clean first frame). Nothing inside a
step leaves the device: x may be sharded any way.

The probability-flow ODE is integrated in rectified-flow coordinates (`schedules.flow_coordinates`):
y = x / (alpha + sigma) moves with dy/dtau = v_hat, tau = sigma / (alpha + sigma). On the flow
path y = x and tau = t. Samplers:

  euler    first order; an Euler step in these coordinates is the DDIM update, on any path.
  heun     second order (trapezoid; the last step, which lands on t = 0, is Euler).
  dpm++2m  DPM-Solver++(2M): second-order multistep on the x0 predictions in
           lambda = log(alpha / sigma) (first-order first and last steps).
  ddim     x_next = alpha(t_next) x0_hat + sigma(t_next) eps_hat, written as such. Equal to
           euler except below a flow x0-model's min_t, where euler keeps the clipped velocity.

Axis letters (glossary: pixeldance/models/__init__.py): B batch (the state may be any shape).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from pixeldance.diffusion import schedules

SAMPLERS = ("euler", "heun", "dpm++2m", "ddim")


def solve(denoise_fn: Callable, x_init, *, steps: int, sampler: str = "euler", path: str = "flow",
          shift: float = 1.0, project: Callable | None = None):
    """Integrates from t = 1 (x_init, noise) to t = 0 on `path` ('flow' or 'ddpm'). Returns x at t = 0.

    steps: number of grid intervals (model calls: steps; heun 2 * steps). shift: the resolution
    shift of the time grid (`schedules.time_grid`).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
    project = project or (lambda x: x)
    grid = schedules.time_grid(steps, shift, path)            # native time, [steps + 1]
    tau, scale = schedules.flow_coordinates(grid, path)       # flow time and x / y, [steps + 1]

    def flow_step(x, i, d):
        """y + (tau_next - tau) d, back in native coordinates, projected."""
        y = x / scale[i] + (tau[i + 1] - tau[i]) * d
        return project(scale[i + 1] * y)

    def euler_step(x, i):
        _, v = denoise_fn(x, grid[i], i)
        return flow_step(x, i, v), None

    def heun_step(x, i):
        _, v = denoise_fn(x, grid[i], i)
        x_euler = flow_step(x, i, v)
        _, v2 = denoise_fn(x_euler, grid[i + 1], i)
        x_heun = flow_step(x, i, 0.5 * (v + v2))
        # The last step lands on t = 0, where x0-parameterised velocities are clipped: Euler there.
        return jnp.where(i == steps - 1, x_euler, x_heun), None

    def ddim_step(x, i):
        x0, v = denoise_fn(x, grid[i], i)
        alpha, sigma = schedules.alpha_sigma(grid[i + 1], path)
        return project(alpha * x0 + sigma * (x0 + v)), None

    # lambda = log(alpha / sigma): -inf at a flow's t = 1 and +inf at t = 0. exp(-h) is computed
    # as a ratio that is finite (0) there, the last step is first order, and an infinite h_prev
    # (the step after a flow's t = 1) turns the correction off: no inf - inf, no NaN.
    lam = jnp.log1p(-tau) - jnp.log(tau)

    def dpm_step(carry, i):
        x, x0_prev = carry
        x0, _ = denoise_fn(x, grid[i], i)
        h = lam[i + 1] - lam[i]
        second = (i > 0) & (i < steps - 1)
        h_prev = jnp.where(second, lam[jnp.maximum(i, 1)] - lam[jnp.maximum(i - 1, 0)], 1.0)
        # Linear extrapolation of x0 over lambda: D = x0 + (h / 2 h_prev)(x0 - x0_prev).
        d = x0 + jnp.where(second, h / (2.0 * h_prev), 0.0) * (x0 - x0_prev)
        t, t_next = tau[i], tau[i + 1]
        exp_neg_h = (t_next * (1.0 - t)) / (t * (1.0 - t_next))  # = exp(-h), 0 at either end
        y = (t_next / t) * (x / scale[i]) + (1.0 - t_next) * (1.0 - exp_neg_h) * d
        return (project(scale[i + 1] * y), x0), None

    x = project(x_init)
    if sampler == "dpm++2m":
        (x, _), _ = jax.lax.scan(dpm_step, (x, jnp.zeros_like(x)), jnp.arange(steps))
        return x
    body = dict(euler=euler_step, heun=heun_step, ddim=ddim_step)[sampler]
    x, _ = jax.lax.scan(body, x, jnp.arange(steps))
    return x


def sample(velocity_fn: Callable, x_init, *, steps: int, sampler: str = "euler", shift: float = 1.0,
           project: Callable | None = None):
    """`solve` on the flow path for a caller that has a velocity: velocity_fn(x, t, i) -> v = eps - x0.

    Integrates dx/dt = v from t = 1 (x_init, noise) to t = 0. Returns x at t = 0.
    """
    def denoise_fn(x, t, i):
        v = velocity_fn(x, t, i)
        return x - t * v, v

    return solve(denoise_fn, x_init, steps=steps, sampler=sampler, path="flow", shift=shift,
                 project=project)


# -- checks of a sampling call's settings (the Pipeline's, the CLI's and storyboards') --------

def as_number(value) -> float | None:
    """value as a float (Python, NumPy or JAX scalars), or None if it is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def is_int(value) -> bool:
    v = as_number(value)
    return v is not None and v.is_integer()


def check_settings(prefix: str = "", *, steps=None, guidance=None, image_guidance=None, num_frames=None,
                   height=None, width=None, num_clips=None, sampler=None, keyframe_guidance=None, shift=None):
    """Refuses sampling settings that would fail late or run and make garbage (NaN or inf
    guidance gives black videos): a one-line ValueError naming `prefix` + the setting
    (`--guidance` on the command line) unless each given one (None: not given) is in range on
    its own: guidance and image_guidance finite and >= 0; steps, num_frames, height, width and
    num_clips integers >= 1; sampler one of `SAMPLERS`; shift finite and > 0 (0 or less folds
    the time grid onto t = 0 or past it). tau depends on the steps
    (`sample.check_tau`); whether a size fits the VAE and the DiT, on the model
    (`sample.Pipeline._settings`)."""
    for name, value in (("guidance", guidance), ("image_guidance", image_guidance),
                        ("keyframe_guidance", keyframe_guidance)):
        if value is not None and not (as_number(value) is not None and math.isfinite(as_number(value)) and value >= 0):
            raise ValueError(f"{prefix}{name} must be a finite number >= 0, got {value}")
    for name, value in (("steps", steps), ("num_clips", num_clips), ("num_frames", num_frames),
                        ("height", height), ("width", width)):
        if value is not None and not (is_int(value) and value >= 1):
            raise ValueError(f"{prefix}{name} must be an integer >= 1, got {value}")
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"{prefix}sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if shift is not None and not (as_number(shift) is not None and math.isfinite(as_number(shift)) and as_number(shift) > 0):
        raise ValueError(f"{prefix}shift must be a finite number > 0, got {shift}")
