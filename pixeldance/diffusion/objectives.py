"""Training objectives (pure functions). Rectified flow is the default.

Flow: x_t = (1 - t) x0 + t eps, velocity v = eps - x0. The network may predict the velocity
directly or the clean sample x0; either way its output is turned into a velocity, and the loss
is on velocity. Predicting x0 keeps the regression target inside the data range when a token's
output is wider than the model, which made small models learn motion at all (see README).

Axis glossary: B batch, T latent frames, H/W latent height/width, C channels.
"""
from __future__ import annotations

import jax.numpy as jnp

PREDICTIONS = ("velocity", "x0")


def interpolate(x0, noise, t):
    """x_t for x0, noise [B, ...] and t [B]."""
    tb = t.reshape((-1,) + (1,) * (x0.ndim - 1))
    return (1.0 - tb) * x0 + tb * noise


def to_velocity(output, x_t, t, *, prediction: str, min_t: float = 0.05):
    """Network output -> velocity estimate. For x0: v = (x_t - x0_hat) / t, t clipped at min_t."""
    if prediction == "velocity":
        return output
    if prediction == "x0":
        tb = jnp.maximum(t, min_t).reshape((-1,) + (1,) * (x_t.ndim - 1))
        return (x_t - output) / tb
    raise ValueError(f"unknown prediction {prediction!r}; choose from {PREDICTIONS}")


def to_x0(output, x_t, t, *, prediction: str):
    """Network output -> clean-sample estimate."""
    if prediction == "x0":
        return output
    if prediction == "velocity":
        tb = t.reshape((-1,) + (1,) * (x_t.ndim - 1))
        return x_t - tb * output
    raise ValueError(f"unknown prediction {prediction!r}; choose from {PREDICTIONS}")


def flow_loss(output, x0, noise, t, loss_mask, *, prediction: str, min_t: float = 0.05):
    """Mean squared velocity error over the elements where loss_mask is 1.

    output, x0, noise: [B, T, H, W, C]; t: [B]; loss_mask: broadcastable to x0 (e.g. [B, T, 1, 1, 1]).
    Returns (scalar loss, per-example loss [B]).
    """
    x_t = interpolate(x0, noise, t)
    v_hat = to_velocity(output, x_t, t, prediction=prediction, min_t=min_t)
    err = jnp.square(v_hat - (noise - x0)) * loss_mask
    denom = jnp.maximum(jnp.broadcast_to(loss_mask, x0.shape).reshape(x0.shape[0], -1).sum(-1), 1.0)
    per_example = err.reshape(x0.shape[0], -1).sum(-1) / denom
    return per_example.mean(), per_example
