"""Diffusion time: sampling of training times and sampler time grids (pure functions).

Convention (rectified flow): t in [0, 1], x_t = (1 - t) x0 + t eps; t = 1 is pure noise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_time(rng, batch: int, *, kind: str = "logit_normal", mean: float = 0.0,
                std: float = 1.0, shift: float = 1.0):
    """Training times float32 [batch] in (0, 1).

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


def shift_time(t, shift: float):
    """Resolution shift t' = s t / (1 + (s - 1) t): identity at s = 1."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def time_grid(steps: int, shift: float = 1.0):
    """Sampler grid float32 [steps + 1] from 1 (noise) down to 0 (data)."""
    return shift_time(jnp.linspace(1.0, 0.0, steps + 1), shift)
