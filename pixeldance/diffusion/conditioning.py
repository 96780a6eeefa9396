"""PixelDance image instructions as pure functions: c_image, its mask, its noise, replacement.

c_image holds the VAE latents of the given keyframes at their latent positions (zeros elsewhere),
with a 1-channel mask that is 1 at the frames that carry an instruction; both are concatenated to
the noisy latent along channels. PixelDance's [z_first, 0, ..., 0, z_last] is the special case
of keyframes at latent 0 and T - 1 (`make_instructions` = `place_keyframes` of those two).

Keyframes anywhere. A keyframe is one pixel frame, encoded alone as a one-frame video (as the
first and last frames always were). The causal VAE maps F = 1 + 4(T - 1) pixel frames to T
latent frames: latent 0 is pixel frame 0, latent k >= 1 is pixel frames 4k-3..4k. A one-frame
encoding stands for the *last* frame of a group: the cached last frame (pixel F - 1 = 4(T - 1))
has always been placed at latent T - 1, and training's middle keyframes are one-frame encodings
of pixel frames 4k (`trainers/cache.py`, z_frames). So pixel frame 4k sits exactly at latent k
and any other pixel frame p goes to the nearest such anchor, ties to the group p falls in
(`latent_index`: p = 1 -> 0, 2..5 -> 1, 6..9 -> 2, ...): at most 2 pixel frames (half a group)
early or late, and no decode-encode of a neighbouring group the caller does not have.

Axis letters (glossary: pixeldance/models/__init__.py): B batch, T latent frames, h/w latent
height/width, C channels.
"""
from __future__ import annotations

import jax.numpy as jnp

from pixeldance import rng as rng_lib


ALWAYS = 2 ** 31 - 1  # a keyframe tau that outlasts any number of steps: the first frame's


def latent_index(pixel: int, num_frames: int, temporal_factor: int) -> int:
    """The latent frame a keyframe at pixel frame `pixel` of an F = `num_frames` clip is placed at
    (host-side ints): 0 for pixel 0, else the nearest anchor pixel frame tf * k, ties to the group
    the frame falls in (module docstring). Negative `pixel` counts from the end (-1: the last
    frame). Refuses frames outside the clip in one line."""
    p = pixel + num_frames if pixel < 0 else pixel
    if not 0 <= p < num_frames:
        raise ValueError(f"keyframe at pixel frame {pixel} is outside the clip's {num_frames} frames")
    return 0 if p == 0 else (p + temporal_factor // 2) // temporal_factor


def anchor_pixel(latent: int, temporal_factor: int) -> int:
    """The pixel frame a keyframe placed at latent frame `latent` stands for: tf * latent."""
    return temporal_factor * latent


def place_keyframes(z_keys, positions, given, num_frames: int, values=None):
    """Keyframe latents at their latent positions.

    z_keys [B, K, h, w, C]: K keyframe slots; positions int32 [B, K] (or [K]): each slot's latent
    frame (traced is fine; outside [0, T) places nothing: an unused slot); given bool [B, K]:
    whether the slot carries a keyframe. A slot that is placed but not given writes z * 0 and
    mask 0. Where slots share a position the later one wins.

    Returns c_image [B, T, h, w, C], c_mask [B, T, h, w, 1] and, with `values` [B, K] (e.g. each
    slot's tau), their placement [B, T] (0 where no slot sits), else None.
    """
    B, K, h, w, C = z_keys.shape
    positions = jnp.broadcast_to(jnp.asarray(positions), (B, K))
    frames = jnp.arange(num_frames)
    c_image = jnp.zeros((B, num_frames, h, w, C), z_keys.dtype)
    c_mask = jnp.zeros((B, num_frames, h, w, 1), z_keys.dtype)
    placed = None if values is None else jnp.zeros((B, num_frames), jnp.asarray(values).dtype)
    for k in range(K):  # K is small and static (2 for PixelDance's first and last frame)
        at = positions[:, k, None] == frames[None]  # [B, T]
        g = given[:, k].astype(z_keys.dtype)[:, None, None, None]
        c_image = jnp.where(at[:, :, None, None, None], (z_keys[:, k] * g)[:, None], c_image)
        c_mask = jnp.where(at[:, :, None, None, None], jnp.broadcast_to(g, (B, h, w, 1))[:, None], c_mask)
        if values is not None:
            placed = jnp.where(at, values[:, k, None], placed)
    return c_image, c_mask, placed


def make_instructions(z_first, z_last, has_first, has_last, num_frames: int):
    """z_first, z_last: [B, h, w, C]; has_first, has_last: bool [B].

    Returns c_image [B, T, h, w, C] and c_mask [B, T, h, w, 1]: keyframes at latent 0 and T - 1
    (`place_keyframes`). With T = 1 only the first frame can be given (the last frame is the
    first frame).
    """
    z_keys = jnp.stack([z_last, z_first], axis=1)  # the first frame last: it wins at T = 1
    given = jnp.stack([has_last, has_first], axis=1)
    c_image, c_mask, _ = place_keyframes(z_keys, jnp.array([num_frames - 1, 0]), given, num_frames)
    return c_image, c_mask


def keep_frames(c_image, c_mask, keep):
    """The instructions at the latent frames where keep [B, T] (bool) holds, zeroed elsewhere:
    the tau switch per keyframe."""
    k = keep.astype(c_image.dtype)[:, :, None, None, None]
    return c_image * k, c_mask * k


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


def replace_frames(x, clean, where):
    """x [B, T, h, w, C] with the latent frames where `where` (bool [B, T]) holds taken from
    `clean` [B, T, h, w, C]: context latents put back clean (continuation in latent space)."""
    return jnp.where(where[:, :, None, None, None], clean, x)


def first_frame_loss_mask(has_first, num_frames: int, replace: bool):
    """[B, T, 1, 1, 1] loss mask: frame 0 is excluded where it was given by replacement."""
    mask = jnp.ones((has_first.shape[0], num_frames), jnp.float32)
    if replace:
        mask = mask.at[:, 0].set(jnp.where(has_first, 0.0, 1.0))
    return mask[:, :, None, None, None]
