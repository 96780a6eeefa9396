"""PixelDance image instructions as pure functions: c_image, its mask, its noise, replacement.

c_image = [z_first, 0, ..., 0, z_last] along latent time, with a 1-channel mask that is 1 at
the frames that carry an instruction; both are concatenated to the noisy latent along channels.

Axis letters (glossary: pixeldance/models/__init__.py): B batch, T latent frames, h/w latent
height/width, C channels.
"""
from __future__ import annotations

import jax.numpy as jnp

from pixeldance import rng as rng_lib


def make_instructions(z_first, z_last, has_first, has_last, num_frames: int):
    """z_first, z_last: [B, h, w, C]; has_first, has_last: bool [B].

    Returns c_image [B, T, h, w, C] and c_mask [B, T, h, w, 1]. With T = 1 only the first
    frame can be given (the last frame is the first frame).
    """
    B, h, w, C = z_first.shape
    f = has_first.astype(z_first.dtype)[:, None, None, None]
    l = has_last.astype(z_first.dtype)[:, None, None, None]
    c_image = jnp.zeros((B, num_frames, h, w, C), z_first.dtype)
    c_mask = jnp.zeros((B, num_frames, h, w, 1), z_first.dtype)
    if num_frames > 1:
        c_image = c_image.at[:, -1].set(z_last * l)
        c_mask = c_mask.at[:, -1].set(jnp.broadcast_to(l, (B, h, w, 1)))
    c_image = c_image.at[:, 0].set(z_first * f)
    c_mask = c_mask.at[:, 0].set(jnp.broadcast_to(f, (B, h, w, 1)))
    return c_image, c_mask


def drop_last(c_image, c_mask):
    """The instructions without the last frame (frames after the first zeroed): the tau switch."""
    keep = jnp.zeros((c_image.shape[1],), c_image.dtype).at[0].set(1.0)[None, :, None, None, None]
    return c_image * keep, c_mask * keep


def noise_instructions(rng, c_image, c_mask, level: float):
    """Adds flow-style noise of time `level` to the given instruction frames (zeros stay zero).

    level 0.1 corresponds to about 100 of 1000 DDPM steps: the paper's looseness for the last frame.
    """
    if level <= 0:
        return c_image
    noise = rng_lib.normal(rng, c_image.shape, c_image.dtype)
    return c_image + c_mask * (level * (noise - c_image))


def replace_first(x, z_first, has_first):
    """Puts the clean first latent frame into x [B, T, h, w, C] where has_first."""
    first = jnp.where(has_first[:, None, None, None], z_first, x[:, 0])
    return x.at[:, 0].set(first)


def first_frame_loss_mask(has_first, num_frames: int, replace: bool):
    """[B, T, 1, 1, 1] loss mask: frame 0 is excluded where it was given by replacement."""
    mask = jnp.ones((has_first.shape[0], num_frames), jnp.float32)
    if replace:
        mask = mask.at[:, 0].set(jnp.where(has_first, 0.0, 1.0))
    return mask[:, :, None, None, None]
