"""Diffusion time: noise paths, sampling of training times and sampler time grids (pure functions).

Every objective uses one time convention: t in [0, 1], t = 0 is data, t = 1 is (almost) pure
noise, and x_t = alpha(t) x0 + sigma(t) eps. Two paths:

  'flow'  rectified flow: alpha = 1 - t, sigma = t.
  'ddpm'  DDPM's variance-preserving path with T = 1000 discrete steps: step n = 0 .. T-1 sits
          at t = (n + 1) / T with alpha = sqrt(alpha_bar_n), sigma = sqrt(1 - alpha_bar_n); in
          between, log alpha_bar is interpolated linearly (and t = 0 is clean data). The DiT embeds
          1000 t, so a DDPM model sees the step numbers n + 1 it was trained on. Its last step
          keeps alpha = 0.068 of the data: a model learns to read that signal, which pure noise
          at sampling does not have.
  'ddpm_zero_snr'  the same steps with sqrt(alpha_bar) shifted and rescaled so that the first
          step is unchanged and the last is pure noise (Lin et al., "Common Diffusion Noise
          Schedules and Sample Steps are Flawed", 2024; alpha floored at ZERO_SNR_ALPHA so logs
          stay finite). Only v-prediction can learn it: eps says nothing about x0 there.

Any such path is a rectified flow after rescaling x: x / (alpha + sigma) = (1 - tau) x0 + tau eps
with tau = sigma / (alpha + sigma) (`flow_coordinates`); the samplers integrate there.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

PATHS = ("flow", "ddpm", "ddpm_zero_snr")
DDPM_PATHS = ("ddpm", "ddpm_zero_snr")
DDPM_STEPS = 1000
# Latent diffusion's "scaled linear" betas (sqrt(beta) linear in n): the schedule of the image
# VAE latents PixelDance diffuses in; the paper states only DDPM with T = 1000.
DDPM_BETA_START, DDPM_BETA_END = 0.00085, 0.012
# The zero-terminal-SNR path's alpha at its last step: a signal-to-noise ratio of 1e-12, nothing a
# model can read, but a finite log alpha_bar for the interpolation below.
ZERO_SNR_ALPHA = 1e-6


def sample_time(rng, batch: int, *, kind: str = "logit_normal", mean: float = 0.0,
                std: float = 1.0, shift: float = 1.0):
    """Training times float32 [batch] in (0, 1) for the flow path.

    kind: 'uniform' or 'logit_normal' (t = sigmoid(mean + std * n), SD3's choice, which spends
    more steps at mid noise levels). `shift` > 1 moves mass towards noise, for large latents.
    """
    if kind == "uniform":
        t = jax.random.uniform(rng, (batch,), minval=1e-4, maxval=1.0 - 1e-4)
    elif kind == "logit_normal":
        t = jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,)))
    else:
        raise ValueError(f"unknown time sampling {kind!r}; choose uniform or logit_normal")
    return shift_time(t, shift)


DDPM_TIME_SAMPLINGS = ("uniform", "logit_normal")


def sample_ddpm_time(rng, batch: int, num_steps: int = DDPM_STEPS, *, kind: str = "uniform",
                     mean: float = 0.0, std: float = 1.0):
    """Training times float32 [batch] for the DDPM path: a step n in 0 .. T-1, t = (n + 1) / T.

    kind 'uniform': n uniform (DDPM's draw). 'logit_normal': u = sigmoid(mean + std * normal)
    snapped down to a step, n = floor(u T) (so still only the trained steps); mean < 0 spends more
    steps at low noise (on the shapes world it kept no more shapes and cost text-only motion:
    benchmarks/README.md, issue 20, session 25).
    """
    if kind == "uniform":
        n = jax.random.randint(rng, (batch,), 0, num_steps)
    elif kind == "logit_normal":
        u = jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,)))
        n = jnp.clip(jnp.floor(u * num_steps), 0, num_steps - 1).astype(jnp.int32)
    else:
        raise ValueError(f"unknown DDPM time sampling {kind!r}; choose from {DDPM_TIME_SAMPLINGS}")
    return (n + 1).astype(jnp.float32) / num_steps


def shift_time(t, shift: float):
    """Resolution shift t' = s t / (1 + (s - 1) t): identity at s = 1."""
    return shift * t / (1.0 + (shift - 1.0) * t)


@functools.lru_cache(maxsize=None)
def ddpm_log_alpha_bar(num_steps: int = DDPM_STEPS, beta_start: float = DDPM_BETA_START,
                       beta_end: float = DDPM_BETA_END, zero_terminal_snr: bool = False) -> np.ndarray:
    """log alpha_bar float64 [T + 1] at t = 0, 1/T, ..., 1 (entry 0 is clean data: 0).

    zero_terminal_snr: sqrt(alpha_bar) of the T steps mapped linearly so that step 1 keeps its
    value and step T reaches 0 (floored at ZERO_SNR_ALPHA), the 'ddpm_zero_snr' path.
    """
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=np.float64) ** 2
    log_ab = np.cumsum(np.log1p(-betas))
    if zero_terminal_snr:
        alpha = np.exp(0.5 * log_ab)
        alpha = (alpha - alpha[-1]) * alpha[0] / (alpha[0] - alpha[-1])
        log_ab = 2.0 * np.log(np.maximum(alpha, ZERO_SNR_ALPHA))
    return np.concatenate([[0.0], log_ab])


def alpha_sigma(t, path: str):
    """(alpha, sigma) of x_t = alpha x0 + sigma eps at times t (any shape, float32, in [0, 1])."""
    if path == "flow":
        return 1.0 - t, t
    if path in DDPM_PATHS:
        # Linear interpolation on the uniform grid t = k / T: one gather, no search.
        table = jnp.asarray(ddpm_log_alpha_bar(zero_terminal_snr=path == "ddpm_zero_snr"), jnp.float32)
        steps = len(table) - 1
        pos = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, 1.0) * steps
        k = jnp.clip(jnp.floor(pos), 0, steps - 1).astype(jnp.int32)
        frac = pos - k
        log_ab = table[k] * (1.0 - frac) + table[k + 1] * frac
        return jnp.exp(0.5 * log_ab), jnp.sqrt(-jnp.expm1(log_ab))  # 1 - alpha_bar without cancellation
    raise ValueError(f"unknown diffusion path {path!r}; choose from {PATHS}")


def flow_coordinates(t, path: str):
    """(tau, scale): the rectified-flow time tau of t, and the factor with x_t = scale * y_tau.

    On the flow path tau = t and scale = 1 (multiplying by 1 is exact: flow sampling is unchanged).
    """
    if path == "flow":
        return t, jnp.ones_like(t)
    alpha, sigma = alpha_sigma(t, path)
    return sigma / (alpha + sigma), alpha + sigma


def time_grid(steps: int, shift: float = 1.0, path: str = "flow"):
    """Sampler grid float32 [steps + 1] from 1 (noise) down to 0 (data).

    On the DDPM path the grid is snapped to the trained steps (multiples of 1/T): with 1000 /
    steps an integer this is DDIM's "trailing" spacing, e.g. 50 steps visit n = 999, 979, ..., 19.
    """
    grid = shift_time(jnp.linspace(1.0, 0.0, steps + 1), shift)
    if path in DDPM_PATHS:
        if steps > DDPM_STEPS:
            raise ValueError(f"at most {DDPM_STEPS} sampling steps on the DDPM path, got {steps}")
        grid = jnp.round(grid * DDPM_STEPS) / DDPM_STEPS
    elif path != "flow":
        raise ValueError(f"unknown diffusion path {path!r}; choose from {PATHS}")
    return grid
