"""Training objectives and the denoiser interface (pure functions). Rectified flow is the default.

Three objectives, `config.diffusion.objective`:

  'flow'  rectified flow: x_t = (1 - t) x0 + t eps, velocity v = eps - x0. The network predicts the
          velocity directly or the clean sample x0 (`prediction`); either way its output is turned
          into a velocity, and the loss is on velocity. Predicting x0 keeps the regression target
          inside the data range when a token's output is wider than the model, which made small
          models learn motion at all (see README).
  'eps'   DDPM (T = 1000, the paper's objective): x_t = alpha x0 + sigma eps on the DDPM path of
          `schedules`, the network predicts eps, the loss is on eps.
  'v'     the same path, the network predicts v = alpha eps - sigma x0, the loss is on v.
  'v_zero_snr'  v-prediction on the DDPM steps rescaled to zero signal at the last step
          (`schedules` 'ddpm_zero_snr'): the noisiest step is pure noise, as sampling starts, so
          the model cannot learn to read a trace of the clip there (issue 19: text-only motion).

Samplers and guidance never look at the objective: `denoise` turns any network output into
(x0_hat, v_hat), the clean-sample estimate and the flow velocity v_hat = eps_hat - x0_hat (so
eps_hat = x0_hat + v_hat), which is all they need.

Axis letters (glossary: pixeldance/models/__init__.py): B batch, T latent frames, h/w latent
height/width, C channels.
"""
from __future__ import annotations

import jax.numpy as jnp

from pixeldance.diffusion import schedules

OBJECTIVES = ("flow", "eps", "v", "v_zero_snr")
PREDICTIONS = ("velocity", "x0")  # what a flow network may output


def path(objective: str) -> str:
    """The noise path of an objective: 'flow', 'ddpm' or 'ddpm_zero_snr' (see `schedules`)."""
    if objective == "flow":
        return "flow"
    if objective in ("eps", "v"):
        return "ddpm"
    if objective == "v_zero_snr":
        return "ddpm_zero_snr"
    raise ValueError(f"unknown objective {objective!r}; choose from {OBJECTIVES}")


def _per_example(t, ndim: int):
    """t [B] -> [B, 1, ...] broadcastable against [B, ...] arrays of `ndim` dims (scalars pass)."""
    return jnp.reshape(t, (-1,) + (1,) * (ndim - 1)) if jnp.ndim(t) else t


def interpolate(x0, noise, t):
    """Flow x_t for x0, noise [B, ...] and t [B]."""
    tb = t.reshape((-1,) + (1,) * (x0.ndim - 1))
    return (1.0 - tb) * x0 + tb * noise


def add_noise(x0, noise, t, *, objective: str):
    """x_t = alpha(t) x0 + sigma(t) noise on the objective's path; x0, noise [B, ...], t [B]."""
    if path(objective) == "flow":
        return interpolate(x0, noise, t)
    alpha, sigma = schedules.alpha_sigma(_per_example(t, x0.ndim), path(objective))
    return alpha * x0 + sigma * noise


def to_velocity(output, x_t, t, *, prediction: str, min_t: float = 0.05):
    """Flow network output -> velocity estimate. For x0: v = (x_t - x0_hat) / t, t clipped at min_t."""
    if prediction == "velocity":
        return output
    if prediction == "x0":
        tb = jnp.maximum(t, min_t).reshape((-1,) + (1,) * (x_t.ndim - 1))
        return (x_t - output) / tb
    raise ValueError(f"unknown prediction {prediction!r}; choose from {PREDICTIONS}")


def to_x0(output, x_t, t, *, prediction: str):
    """Flow network output -> clean-sample estimate."""
    if prediction == "x0":
        return output
    if prediction == "velocity":
        tb = t.reshape((-1,) + (1,) * (x_t.ndim - 1))
        return x_t - tb * output
    raise ValueError(f"unknown prediction {prediction!r}; choose from {PREDICTIONS}")


def denoise(output, x_t, t, *, objective: str, prediction: str = "x0", min_t: float = 0.05):
    """Any network output -> (x0_hat, v_hat), the interface of samplers and guidance.

    v_hat = eps_hat - x0_hat is the velocity of the rectified flow that every Gaussian path is
    after rescaling (`schedules.flow_coordinates`), i.e. the derivative the samplers integrate;
    eps_hat = x0_hat + v_hat. Carrying v rather than eps also hands the flow models' velocity
    (for x0-predictions: clipped below min_t, as in the loss) to the sampler unchanged, bit for bit.

    output, x_t: [B, ...]; t: [B] or a scalar, in [0, 1]. `prediction` and `min_t` matter for
    'flow' only. Returns two arrays shaped like x_t.
    """
    if objective == "flow":
        tb = jnp.broadcast_to(t, (x_t.shape[0],)) if not jnp.ndim(t) else t
        return (to_x0(output, x_t, tb, prediction=prediction),
                to_velocity(output, x_t, tb, prediction=prediction, min_t=min_t))
    alpha, sigma = schedules.alpha_sigma(_per_example(t, x_t.ndim), path(objective))
    if objective == "eps":
        # alpha >= 0.068 on the DDPM path (its last step), so the division is safe.
        x0_hat, eps_hat = (x_t - sigma * output) / alpha, output
    else:
        # 'v', 'v_zero_snr': alpha^2 + sigma^2 = 1 inverts v = alpha eps - sigma x0 together with x_t.
        x0_hat, eps_hat = alpha * x_t - sigma * output, sigma * x_t + alpha * output
    return x0_hat, eps_hat - x0_hat


def target(x0, noise, t, *, objective: str):
    """The regression target of an objective's loss: velocity (flow), eps, or v. Shapes as x0."""
    if objective == "flow":
        return noise - x0
    if objective == "eps":
        return noise
    alpha, sigma = schedules.alpha_sigma(_per_example(t, x0.ndim), path(objective))
    return alpha * noise - sigma * x0


def _masked_mse(err, loss_mask, shape):
    """err [B, ...] squared errors already masked -> (mean over B, per-example mean [B])."""
    denom = jnp.maximum(jnp.broadcast_to(loss_mask, shape).reshape(shape[0], -1).sum(-1), 1.0)
    per_example = err.reshape(shape[0], -1).sum(-1) / denom
    return per_example.mean(), per_example


def flow_loss(output, x0, noise, t, loss_mask, *, prediction: str, min_t: float = 0.05):
    """Mean squared velocity error over the elements where loss_mask is 1.

    output, x0, noise: [B, T, h, w, C]; t: [B]; loss_mask: broadcastable to x0 (e.g. [B, T, 1, 1, 1]).
    Returns (scalar loss, per-example loss [B]).
    """
    x_t = interpolate(x0, noise, t)
    v_hat = to_velocity(output, x_t, t, prediction=prediction, min_t=min_t)
    err = jnp.square(v_hat - (noise - x0)) * loss_mask
    return _masked_mse(err, loss_mask, x0.shape)


def loss(output, x0, noise, t, loss_mask, *, objective: str, prediction: str = "x0",
         min_t: float = 0.05):
    """The objective's loss: flow -> `flow_loss`; eps / v -> mean squared error on eps / v.

    Shapes as `flow_loss`; t [B] on the objective's path. Returns (scalar, per-example [B]).
    """
    if objective == "flow":
        return flow_loss(output, x0, noise, t, loss_mask, prediction=prediction, min_t=min_t)
    err = jnp.square(output - target(x0, noise, t, objective=objective)) * loss_mask
    return _masked_mse(err, loss_mask, x0.shape)
