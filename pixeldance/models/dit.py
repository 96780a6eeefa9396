"""Video DiT with PixelDance conditioning.

The noisy latent video is concatenated along channels with the image-instruction latents
`c_image = [z_first, 0, ..., 0, z_last]` and their mask, cut into (t, h, w) patches, and run
through transformer blocks with 3D-RoPE self-attention over space-time, cross-attention to the
text tokens and adaLN-Zero modulation by the diffusion time (plus pooled text).

Axis glossary:
  B batch   T latent frames   H, W latent height/width   C latent channels
  L video tokens   S text tokens   D model width   N heads   K head width   F MLP width
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from pixeldance.models import attention
from pixeldance.models.layers import Dense, LayerNorm
from pixeldance.models.text import TextEncoder
from pixeldance.sharding import constrain

# Size table: width D, depth, heads N. `mu` is for tests; `shapes` for the built-in world on a CPU.
DIT_VARIANTS = {
    "mu": dict(width=32, depth=2, num_heads=2, mlp_ratio=2),
    "shapes": dict(width=128, depth=4, num_heads=4, mlp_ratio=4),
    "S": dict(width=384, depth=12, num_heads=6, mlp_ratio=4),
    "B": dict(width=768, depth=12, num_heads=12, mlp_ratio=4),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_ratio=4),
    "XL": dict(width=1152, depth=28, num_heads=16, mlp_ratio=4),
}


def decode_variant(name: str) -> dict:
    """'B' or 'B/2' (the suffix is the spatial patch size) -> constructor kwargs."""
    base, _, patch = name.partition("/")
    if base not in DIT_VARIANTS:
        raise ValueError(f"unknown DiT variant {name!r}; choose from {sorted(DIT_VARIANTS)}")
    out = dict(DIT_VARIANTS[base])
    if patch:
        out["patch_size"] = (1, int(patch), int(patch))
    return out


def _dense(features, names, dtype, name, zero=False, in_dims=1):
    return Dense(features, names, in_dims=in_dims, zero_init=zero, dtype=dtype, name=name)


def timestep_embedding(t, dim: int, max_period: float = 10_000.0):
    """t: float [B] in [0, 1] -> sinusoidal features [B, dim] (t scaled by 1000 like DDPM steps)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = 1000.0 * t[:, None].astype(jnp.float32) * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """How the head width K is shared among the (t, h, w) axes of 3D RoPE; each part even."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_3d(grid: tuple[int, int, int], head_dim: int, theta: float = 10_000.0):
    """Rotary angles for a (T, H, W) token grid -> (cos, sin) each float32 [L, K/2]."""
    parts = rope_split(head_dim)
    coords = jnp.stack(jnp.meshgrid(*[jnp.arange(n) for n in grid], indexing="ij"), -1)
    coords = coords.reshape(-1, 3).astype(jnp.float32)  # [L, 3]
    angles = []
    for axis, d in enumerate(parts):
        freqs = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # [d/2]
        angles.append(coords[:, axis:axis + 1] * freqs[None])
    angles = jnp.concatenate(angles, axis=-1)  # [L, K/2]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """x: [B, L, N, K]; rotates pairs (x[..., :K/2], x[..., K/2:]) by the angles."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[None, :, None], sin[None, :, None]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class RMSNorm(nn.Module):
    """RMS norm over the last axis (used for QK-normalisation)."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("kv",)),
                           (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
        return (x32 * scale).astype(self.dtype)


class DiTBlock(nn.Module):
    """One block: adaLN-Zero self-attention (3D RoPE), cross-attention to text, adaLN-Zero MLP."""
    width: int
    num_heads: int
    mlp_ratio: int
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, cond, rope, text, text_mask):
        # x: [B, L, D]; cond: [B, D]; rope: ([L, K/2], [L, K/2]); text: [B, S, D]; text_mask: [B, S]
        D, N = self.width, self.num_heads
        K = D // N
        ln = functools.partial(LayerNorm, use_scale=False, use_bias=False, dtype=self.dtype)
        mod = _dense(6 * D, ("embed", "mlp"), self.dtype, "adaln", zero=True)(nn.silu(cond))
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod[:, None], 6, axis=-1)

        # Self-attention over all video tokens.
        y = ln(name="ln_self")(x) * (1 + scale1) + shift1
        qkv = _dense((3, N, K), ("embed", None, "heads", "kv"), self.dtype, "qkv")(y)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, N, K]
        q = RMSNorm(self.dtype, name="q_norm")(q)
        k = RMSNorm(self.dtype, name="k_norm")(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q = constrain(q, ("batch", "length", "heads", "kv"))
        y = attention.dot_product_attention(q, k, v, implementation=self.attention_impl)
        y = _dense(D, ("heads", "kv", "embed"), self.dtype, "self_out", in_dims=2)(y)
        x = x + gate1 * y
        x = constrain(x, ("batch", "length", "embed"))

        # Cross-attention to text (no modulation, as in PixArt/Wan).
        y = LayerNorm(dtype=self.dtype, name="ln_cross")(x)
        q = _dense((N, K), ("embed", "heads", "kv"), self.dtype, "cross_q")(y)
        kv = _dense((2, N, K), ("embed", None, "heads", "kv"), self.dtype, "cross_kv")(text)
        q = RMSNorm(self.dtype, name="cross_q_norm")(q)
        k = RMSNorm(self.dtype, name="cross_k_norm")(kv[:, :, 0])
        y = attention.dot_product_attention(q, k, kv[:, :, 1], key_mask=text_mask,
                                            implementation=self.attention_impl)
        x = x + _dense(D, ("heads", "kv", "embed"), self.dtype, "cross_out", in_dims=2)(y)

        # MLP.
        y = ln(name="ln_mlp")(x) * (1 + scale2) + shift2
        y = _dense(self.mlp_ratio * D, ("embed", "mlp"), self.dtype, "mlp_in")(y)
        y = constrain(nn.gelu(y, approximate=True), ("batch", "length", "mlp"))
        y = _dense(D, ("mlp", "embed"), self.dtype, "mlp_out")(y)
        x = x + gate2 * y
        return constrain(x, ("batch", "length", "embed")), None


_REMAT_POLICIES = {
    "full": None,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class VideoDiT(nn.Module):
    """Denoiser for latent video with PixelDance image instructions.

    __call__ args:
      x: noisy latents float [B, T, H, W, C]
      t: flow time float [B] in [0, 1] (1 = pure noise)
      c_image: instruction latents [B, T, H, W, C] (zeros where not given)
      c_mask: [B, T, H, W, 1], 1 at frames with an instruction
      text: [B, S, Dt] text embeddings; text_mask: bool [B, S]
    Returns: [B, T, H, W, C] network output (x0 or velocity, per the objective).
    """
    latent_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    width: int = 192
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: int = 4
    remat: str = "none"
    scan_layers: bool = True
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, t, c_image, c_mask, text, text_mask):
        B, T, H, W, C = x.shape
        pt, ph, pw = self.patch_size
        if T % pt or H % ph or W % pw:
            raise ValueError(f"latent shape {x.shape} is not divisible by patch size {self.patch_size}")
        grid = (T // pt, H // ph, W // pw)
        D = self.width

        # Patchify [B, T, H, W, 2C+1] -> [B, L, pt*ph*pw*(2C+1)].
        inp = jnp.concatenate([x, c_image, c_mask], axis=-1).astype(self.dtype)
        Cin = inp.shape[-1]
        inp = inp.reshape(B, grid[0], pt, grid[1], ph, grid[2], pw, Cin)
        inp = inp.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(B, -1, pt * ph * pw * Cin)
        h = _dense(D, (None, "embed"), self.dtype, "patch_embed")(inp)
        h = constrain(h, ("batch", "length", "embed"))

        # Conditioning vector: diffusion time plus pooled text (global colour/shape cues).
        cond = _dense(D, (None, "embed"), self.dtype, "time_in")(timestep_embedding(t, 256))
        cond = _dense(D, ("embed", "mlp"), self.dtype, "time_out")(nn.silu(cond))
        m = text_mask[..., None].astype(text.dtype)
        pooled = (text * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        cond = cond + _dense(D, (None, "embed"), self.dtype, "text_pool")(pooled)
        text_h = _dense(D, (None, "embed"), self.dtype, "text_proj")(text.astype(self.dtype))

        rope = rope_3d(grid, D // self.num_heads)
        block = DiTBlock
        if self.remat != "none":
            if self.remat not in _REMAT_POLICIES:
                raise ValueError(f"unknown remat policy {self.remat!r}; choose none/{'/'.join(_REMAT_POLICIES)}")
            block = nn.remat(block, policy=_REMAT_POLICIES[self.remat], prevent_cse=False)
        if self.scan_layers:
            # One compiled layer body, iterated: compile time independent of depth.
            blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=(nn.broadcast,) * 4, length=self.depth,
                             metadata_params={nn.PARTITION_NAME: "layers"})
            h, _ = blocks(D, self.num_heads, self.mlp_ratio, self.dtype, self.attention_impl,
                          name="blocks")(h, cond, rope, text_h, text_mask)
        else:
            for i in range(self.depth):
                h, _ = block(D, self.num_heads, self.mlp_ratio, self.dtype, self.attention_impl,
                             name=f"block_{i}")(h, cond, rope, text_h, text_mask)

        # adaLN-modulated final layer, zero-initialised so training starts from output 0.
        shift, scale = jnp.split(_dense(2 * D, ("embed", "mlp"), self.dtype, "final_adaln",
                                        zero=True)(nn.silu(cond))[:, None], 2, axis=-1)
        h = LayerNorm(use_scale=False, use_bias=False, dtype=self.dtype)(h) * (1 + scale) + shift
        out = _dense(pt * ph * pw * C, ("embed", None), self.dtype, "final", zero=True)(h)
        out = out.reshape(B, *grid, pt, ph, pw, C).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return out.reshape(B, T, H, W, C).astype(jnp.float32)


class PixelDanceModel(nn.Module):
    """Text encoder + video DiT, trained together: (x, t, c_image, c_mask, tokens) -> output."""
    text_encoder: TextEncoder
    dit: VideoDiT

    def __call__(self, x, t, c_image, c_mask, tokens):
        text, text_mask = self.text_encoder(tokens)
        return self.dit(x, t, c_image, c_mask, text, text_mask)


def dit_flops_per_sample(*, num_tokens: int, text_len: int, width: int, depth: int,
                         mlp_ratio: int, patch_dim_in: int, patch_dim_out: int) -> float:
    """Analytic forward FLOPs of the DiT blocks + patch in/out for one sample (2 per MAC).

    Per layer: 2L(4D^2 qkv+out, 2DF mlp, 2D^2 cross q+out) + 2S(2D^2) cross kv
    + attention 4L^2 D + cross attention 4LSD.
    """
    L, S, D, F = num_tokens, text_len, width, mlp_ratio * width
    per_layer = 2 * L * (4 * D * D + 2 * D * F + 2 * D * D) + 2 * S * 2 * D * D + 4 * L * L * D + 4 * L * S * D
    return depth * per_layer + 2 * L * D * (patch_dim_in + patch_dim_out)
