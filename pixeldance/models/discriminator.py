"""The 3D patch discriminator of the VAE's GAN loss (`trainers/vae.py`).

Axis letters (glossary: pixeldance/models/__init__.py): B batch, F frames, H/W height/width.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from pixeldance.models.causal_conv import CausalConv3d, space_to_depth

Dtype = Any


class PatchDiscriminator3D(nn.Module):
    """3D patch discriminator: a real/fake logit for every space-time patch.

    A (3, 3, 3) causal conv at full resolution, then per further width a 2x spatial
    pixel-unshuffle and a (3, 3, 3) causal conv (strided conv written as a rearrangement, as in
    `Downsample`), LeakyReLU(0.2) after each, and a (3, 3, 3) conv to one logit. Each logit sees
    a window of about 7 frames and ``2^n * 7`` pixels, so it judges local texture and motion,
    not whole frames. No normalisation: batches are small and per-frame statistics would need care.
    video [B, F, H, W, 3] in [-1, 1] -> logits float32 [B, F, H/2^n, W/2^n, 1], n = len(channels)-1.
    """
    channels: tuple[int, ...] = (32, 64, 128)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, video: jax.Array) -> jax.Array:
        x = video.astype(self.dtype)
        for i, c in enumerate(self.channels):
            if i > 0:
                x = space_to_depth(x, 2)
            x = nn.leaky_relu(CausalConv3d(c, (3, 3, 3), dtype=self.dtype, name=f"conv{i}")(x), 0.2)
        return CausalConv3d(1, (3, 3, 3), dtype=self.dtype, name="conv_out")(x).astype(jnp.float32)
