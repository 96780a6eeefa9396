"""The Wan 2.1 video VAE in Flax Linen: the architecture of its open weights.

Layer for layer the model of diffusers' `AutoencoderKLWan` (Wan 2.1, not the residual Wan 2.2
variant), so that `pixeldance.convert.wan_vae` can load its released weights. 4x8x8 compression,
16 latent channels; ``F = 1 + 4k`` frames give ``T = 1 + k`` latent frames.

Axis letters (glossary: pixeldance/models/__init__.py): B batch; F pixel frames; T frames of a
level (latent frames at the bottleneck); H/W height/width (of pixels or of a level); h/w latent
height/width; C channels, O output channels; Z latent channels (``z_dim``); kt time taps of a
causal convolution.

What the released weights fix, and how it differs from pixeldance's own `CausalVAE` (vae.py):

* Causal convolutions pad time on the left with *zeros* (``kt - 1`` frames), not with copies of
  frame 0; space is zero-padded 'SAME'.
* Norms are ``x / ||x||_2 * sqrt(C) * scale`` over the channels at each position (torch's
  ``F.normalize`` with eps 1e-12), no bias.
* Residual blocks: (norm, SiLU, 3x3x3 conv) x 2, plus a 1x1x1 conv shortcut where the width
  changes. A mid block (residual, single-head spatial attention within each frame, residual) sits
  at the bottleneck of both encoder and decoder.
* Spatial downsampling: zero pad right and bottom by one, 3x3 conv with stride 2. Temporal
  downsampling (after it): frame 0 passes unchanged; frame ``j >= 1`` is a 3-tap conv over
  frames ``(2j-2, 2j-1, 2j)``.
* Temporal upsampling (before the spatial one): frame 0 stays one frame; frames ``1..`` go
  through a 3-tap causal conv that does not see frame 0, to 2C channels whose two halves become
  two frames. Spatial upsampling: nearest 2x, then a 3x3 conv that halves the channels
  (computed as four 2x2 convs at the low resolution, `UpsampleConv`).
* 1x1x1 convs around the bottleneck (``quant_conv``, ``post_quant_conv``); decoded video is
  clipped to [-1, 1]; log-variances to [-30, 20].

Chunks and the causal cache. diffusers encodes frame 0 alone and then 4 frames at a time, and
decodes one latent frame at a time, keeping the last inputs of every causal conv in a cache. As
every layer is causal, that is the same function as one pass over the whole video with the rules
above (an empty cache is zero padding; the special cases of frame 0 are those of the first chunk).
`WanVAE.encode` / `.decode` take the one pass: every conv is a sum of 2D convs over all B*T
frames, one per time tap (what XLA:CPU runs fastest), skipping the taps that fall on the zero
padding (`causal_conv.causal_conv`); on the CPU, wide 3x3 convs use Winograd's F(2x2, 3x3)
(`winograd.py`) and large frames go one at a time (`per_frame=None`: an inference model; the
frame loop's gradient is slow, see `causal_conv.conv_frames`). `vae_inference.encode_chunked` /
`decode_chunked` run the same layers
chunk by chunk, carrying the cache in the 'cache' variable collection through `lax.scan`, so that
memory does not grow with the length of the video; both equal the one-pass result.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from pixeldance.models import attention, attention_kernels, layers, winograd
from pixeldance.models.causal_conv import caching, causal_conv, conv_frames, matrix_init
from pixeldance.models.vae import LOGVAR_MAX, LOGVAR_MIN

Dtype = Any

_CONV3D_AXES = (None, None, None, "conv_in", "conv_out")
_CONV2D_AXES = (None, None, "conv_in", "conv_out")

# The released Wan 2.1 VAE (diffusers' defaults for `AutoencoderKLWan`).
WAN21 = dict(base_dim=96, decoder_base_dim=None, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
             temporal_downsample=(False, True, True))


def _conv_params(module: nn.Module, shape: tuple[int, ...], axes, dtype):
    kernel = module.param("kernel", nn.with_logical_partitioning(
        matrix_init(nn.initializers.lecun_normal()), axes), shape, jnp.float32)
    bias = module.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                        (shape[-1],), jnp.float32)
    return kernel.astype(dtype), bias.astype(dtype)


# ---------------------------------------------------------------------------------------------
# Layers.
# ---------------------------------------------------------------------------------------------

class CausalConv(nn.Module):
    """3D convolution, causal in time (zero padding on the left, or the cache), 'SAME' in space.

    Output frame t sees input frames ``t-kt+1 .. t``: tap a (kernel[a]) reads input frame
    ``t-(kt-1)+a``. Computed as one 2D conv per tap over the frames it reads. In the one pass the
    products with the zero padding are skipped (tap a starts at output ``kt-1-a``), which saves
    ``kt-1`` of every ``kt*T`` frame convolutions; diffusers computes them. In a chunked pass the
    cache holds the last kt-1 input frames ([B, kt-1, H, W, C], zeros before the first chunk),
    as diffusers' does. Kernel [kt, kh, kw, C, O].
    Input ``[B, T, H, W, C]`` -> ``[B, T, H, W, features]``.
    """
    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kt, kh, kw = self.kernel_size
        kernel, bias = _conv_params(self, (kt, kh, kw, x.shape[-1], self.features), _CONV3D_AXES,
                                    self.dtype)
        x = x.astype(self.dtype)
        # Both take (x, kernel, past=None) with zero padding before frame 0.
        conv = (winograd.causal_conv if _use_winograd(x.shape, kernel.shape)
                else functools.partial(causal_conv, pad="zeros", per_frame=None))
        if caching(self) and kt > 1:
            cache = self.variable("cache", "frames", jnp.zeros, (x.shape[0], kt - 1) + x.shape[2:], x.dtype)
            seq = jnp.concatenate([cache.value, x], axis=1)
            cache.value = seq[:, -(kt - 1):]
            if x.shape[1] == 0:  # a chunk of no frames (see `Resample`) only creates the cache
                return jnp.zeros(x.shape[:-1] + (self.features,), x.dtype)
            return conv(x, kernel, past=seq[:, :kt - 1]) + bias
        return conv(x, kernel) + bias


# On the CPU, wide 3x3 causal convs run by Winograd's F(2x2, 3x3) (`winograd.py`): against the
# direct per-tap convs it measured 1.16x at 64² x 192 channels and 1.34x at 32² x 384, but 0.86x
# at 128² x 96 and 0.55x at 16² x 384 (one thread, this repository's CPU; benchmarks/README.md).
CPU_WINOGRAD_MIN_CHANNELS = 192
CPU_WINOGRAD_MIN_SIZE = 32


def _use_winograd(x_shape, kernel_shape) -> bool:
    """Whether a causal conv of input [B, T, H, W, C] and kernel [kt, kh, kw, C, O] takes Winograd."""
    _, t, h, w, _ = x_shape
    _, kh, kw, c_in, c_out = kernel_shape
    return ((kh, kw) == (3, 3) and t > 0 and h % 2 == 0 and w % 2 == 0
            and min(h, w) >= CPU_WINOGRAD_MIN_SIZE and min(c_in, c_out) >= CPU_WINOGRAD_MIN_CHANNELS
            and attention_kernels.target_platform() == "cpu")


class TimeDownConv(nn.Module):
    """Causal 2x temporal downsampling: a 3-tap conv with stride 2 over time; frame 0 passes.

    ``first``: the input starts at frame 0 of the video. Then output frame 0 is input frame 0
    (no conv, no bias) and output j >= 1 convolves input frames (2j-2, 2j-1, 2j). Otherwise (a
    later chunk) the windows start at the last frame of the previous chunk, kept in the cache.
    Input ``[B, 1+2m, H, W, C]`` (first) or ``[B, 2m, H, W, C]`` -> ``[B, 1+m or m, H, W, C]``.
    """
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        c = x.shape[-1]
        kernel, bias = _conv_params(self, (3, 1, 1, c, c), _CONV3D_AXES, self.dtype)
        seq = x
        if caching(self):
            last = self.variable("cache", "last", jnp.zeros, (x.shape[0], 1) + x.shape[2:], x.dtype)
            if not first:
                seq = jnp.concatenate([last.value, x], axis=1)
            last.value = seq[:, -1:]
        if seq.shape[1] % 2 != 1:
            raise ValueError(f"TimeDownConv: {x.shape[1]} frames do not pair up causally "
                             f"(need 1 + 2m frames from the start of a video, 2m in a later chunk)")
        m = (seq.shape[1] - 1) // 2
        # Output j reads frames 2j, 2j+1, 2j+2 of seq: each tap is one matmul over m frames.
        out = sum(conv_frames(seq[:, a:a + 2 * m:2], kernel[a], per_frame=None) for a in range(3)) + bias
        return jnp.concatenate([x[:, :1], out], axis=1) if first else out


class SpatialConv(nn.Module):
    """2D convolution applied to every frame. Kernel [kh, kw, C, O].

    Input ``[B, T, H, W, C]`` -> ``[B, T, H', W', features]``; `padding` as for `lax.conv`.
    """
    features: int
    strides: tuple[int, int] = (1, 1)
    padding: Any = ((1, 1), (1, 1))
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = _conv_params(self, (3, 3, x.shape[-1], self.features), _CONV2D_AXES, self.dtype)
        return conv_frames(x.astype(self.dtype), kernel, self.strides, self.padding, per_frame=None) + bias


# Which of the 3 taps of a 3-tap conv on a nearest-2x-upsampled signal fall on each of the 2
# low-resolution inputs of output phase a (even or odd output pixel): [a, low tap, high tap].
_UP_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)


class UpsampleConv(nn.Module):
    """Nearest 2x upsampling then a 3x3 'SAME' conv, computed at the low resolution.

    Output pixel (2i+a, 2j+b) of the upsampled conv reads only low-resolution pixels
    i-1+a .. i+a and j-1+b .. j+b, so each of the four phases (a, b) is a 2x2 conv of the input
    with the 3x3 kernel's taps summed where they land on the same input pixel. One 2x2 conv with
    4 * O outputs over the zero-padded input computes all four (16 instead of 36
    multiply-adds per input pixel and channel pair, and no 4x larger input), then the phases
    are interleaved. Parameters are those of the 3x3 conv (kernel [3, 3, C, O], bias),
    and the result equals it up to float rounding.
    Input ``[B, T, H, W, C]`` -> ``[B, T, 2H, 2W, features]``.
    """
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = _conv_params(self, (3, 3, x.shape[-1], self.features), _CONV2D_AXES, self.dtype)
        up = jnp.asarray(_UP_TAPS, kernel.dtype)
        phases = jnp.einsum("auy,bvx,yxio->uvioab", up, up, kernel)  # [2, 2, C, O, 2, 2]
        phases = phases.reshape(2, 2, kernel.shape[2], self.features * 4)
        y = conv_frames(x.astype(self.dtype), phases, padding=((1, 1), (1, 1)), per_frame=None)
        b, t, h1, w1, _ = y.shape  # [B, T, H+1, W+1, O * 4], channels (o, a, b)
        y = y.reshape(b, t, h1, w1, self.features, 2, 2)
        h, w = h1 - 1, w1 - 1
        # Phase (a, b) of output pixel (i, j) is window (i + a, j + b).
        rows = [jnp.stack([y[:, :, a:a + h, c:c + w, :, a, c] for c in range(2)], axis=4)
                for a in range(2)]  # each [B, T, H, W, 2 (b), O]
        y = jnp.stack(rows, axis=3)  # [B, T, H, 2 (a), W, 2 (b), O]
        return y.reshape(b, t, 2 * h, 2 * w, self.features) + bias


class RMSNorm(nn.Module):
    """``x / max(||x||_2, 1e-12) * sqrt(C) * scale`` over channels, per position (statistics in float32).

    Input and output ``[..., C]``.
    """
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x32 = x.astype(jnp.float32)
        inv_norm = lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x32), axis=-1, keepdims=True), 1e-24))
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (c,), jnp.float32)
        return (x32 * inv_norm * (math.sqrt(c) * scale)).astype(self.dtype)


class ResBlock(nn.Module):
    """(norm, SiLU, causal 3x3x3 conv) x 2 plus a shortcut. [B, T, H, W, C] -> [B, T, H, W, features]."""
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        if x.shape[-1] != self.features:
            shortcut = CausalConv(self.features, (1, 1, 1), self.dtype, name="conv_shortcut")(x)
        x = nn.silu(RMSNorm(self.dtype, name="norm1")(x))
        x = CausalConv(self.features, dtype=self.dtype, name="conv1")(x)
        x = nn.silu(RMSNorm(self.dtype, name="norm2")(x))
        x = CausalConv(self.features, dtype=self.dtype, name="conv2")(x)
        return x + shortcut


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame, plus identity.

    Within a frame only, so it is causal. [B, T, H, W, C] -> same.
    """
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        y = RMSNorm(self.dtype, name="norm")(x)
        qkv = layers.Dense(3 * c, ("conv_in", "conv_out"), dtype=self.dtype, name="to_qkv")(y)
        qkv = qkv.reshape(b * t, h * w, 3, 1, c)  # [B*T, H*W, (q k v), N=1, C]
        y = attention.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        y = layers.Dense(c, ("conv_in", "conv_out"), dtype=self.dtype, name="proj")(y.reshape(x.shape))
        return x + y


class MidBlock(nn.Module):
    """Residual, attention, residual at constant width. [B, T, H, W, C] -> same."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = ResBlock(c, self.dtype, name="resnets_0")(x)
        x = AttentionBlock(self.dtype, name="attentions_0")(x)
        return ResBlock(c, self.dtype, name="resnets_1")(x)


class Resample(nn.Module):
    """2x resampling in space, and causally in time for the '3d' modes.

    mode: 'down2d' | 'down3d' (C -> C channels) or 'up2d' | 'up3d' (C -> C/2 channels).
    ``first``: the input starts at frame 0 of the video (see `TimeDownConv`, and below).
    down: [B, T, H, W, C] -> [B, T', H/2, W/2, C], T' = (T+1)/2 for down3d (from frame 0).
    up:   [B, T, H, W, C] -> [B, T', 2H, 2W, C/2], T' = 2T-1 for up3d from frame 0, else 2T.
    """
    mode: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        c = x.shape[-1]
        if self.mode in ("down2d", "down3d"):
            x = SpatialConv(c, (2, 2), ((0, 1), (0, 1)), self.dtype, name="spatial_conv")(x)
            if self.mode == "down3d":
                x = TimeDownConv(self.dtype, name="time_conv")(x, first)
            return x
        if self.mode not in ("up2d", "up3d"):
            raise ValueError(f"Resample: unknown mode {self.mode!r}")
        if self.mode == "up3d":
            # Frame 0 of the video stays one frame and is not seen by the time conv (in diffusers'
            # chunks its cache starts empty after the first chunk); from a chunk of 0 frames the
            # conv only creates its (zero) cache.
            head, rest = (x[:, :1], x[:, 1:]) if first else (x[:, :0], x)
            y = CausalConv(2 * c, (3, 1, 1), self.dtype, name="time_conv")(rest)  # [B, T_rest, H, W, 2C]
            b, r, h, w, _ = y.shape
            y = y.reshape(b, r, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * r, h, w, c)
            x = jnp.concatenate([head.astype(y.dtype), y], axis=1)
        return UpsampleConv(c // 2, self.dtype, name="spatial_conv")(x)


class UpBlock(nn.Module):
    """num_res_blocks + 1 residual blocks at `features` channels, then an optional upsampler."""
    features: int
    num_res_blocks: int
    upsample: str | None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        for j in range(self.num_res_blocks + 1):
            x = ResBlock(self.features, self.dtype, name=f"resnets_{j}")(x)
        if self.upsample:
            x = Resample(self.upsample, self.dtype, name="upsamplers_0")(x, first)
        return x


# ---------------------------------------------------------------------------------------------
# Encoder, decoder, VAE.
# ---------------------------------------------------------------------------------------------

class Encoder(nn.Module):
    """video [B, F, H, W, 3] -> [B, T, H/s, W/s, out_channels]; `first` as in `Resample`."""
    base_dim: int
    out_channels: int
    dim_mult: tuple[int, ...]
    num_res_blocks: int
    temporal_downsample: tuple[bool, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        dims = [self.base_dim * m for m in (1,) + tuple(self.dim_mult)]
        x = CausalConv(dims[0], dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
        k = 0  # diffusers numbers residual blocks and resamplers in one list
        for i, width in enumerate(dims[1:]):
            for _ in range(self.num_res_blocks):
                x = ResBlock(width, self.dtype, name=f"down_blocks_{k}")(x)
                k += 1
            if i < len(self.dim_mult) - 1:
                mode = "down3d" if self.temporal_downsample[i] else "down2d"
                x = Resample(mode, self.dtype, name=f"down_blocks_{k}")(x, first)
                k += 1
        x = MidBlock(self.dtype, name="mid_block")(x)
        x = nn.silu(RMSNorm(self.dtype, name="norm_out")(x))
        return CausalConv(self.out_channels, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
    """z [B, T, h, w, Z] -> video [B, F, s*h, s*w, 3] (unclipped); `first` as in `Resample`."""
    base_dim: int
    dim_mult: tuple[int, ...]
    num_res_blocks: int
    temporal_upsample: tuple[bool, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, first: bool) -> jax.Array:
        mult = tuple(self.dim_mult)
        dims = [self.base_dim * m for m in (mult[-1],) + mult[::-1]]
        x = CausalConv(dims[0], dtype=self.dtype, name="conv_in")(z.astype(self.dtype))
        x = MidBlock(self.dtype, name="mid_block")(x)
        for i, width in enumerate(dims[1:]):
            upsample = None
            if i < len(mult) - 1:
                upsample = "up3d" if self.temporal_upsample[i] else "up2d"
            x = UpBlock(width, self.num_res_blocks, upsample, self.dtype, name=f"up_blocks_{i}")(x, first)
        x = nn.silu(RMSNorm(self.dtype, name="norm_out")(x))
        return CausalConv(3, dtype=self.dtype, name="conv_out")(x)


class WanVAE(nn.Module):
    """The Wan 2.1 video VAE (diffusers `AutoencoderKLWan`); the interface of `CausalVAE`.

    Attributes (diffusers' config names, `temperal_downsample` spelt right):
      base_dim: encoder width of the first level; level i has ``base_dim * dim_mult[i]``.
      decoder_base_dim: the same for the decoder (None: base_dim).
      z_dim: latent channels Z.
      dim_mult: width multipliers per level; ``len(dim_mult) - 1`` spatial 2x downsamplings.
      num_res_blocks: residual blocks per encoder level (the decoder has one more).
      temporal_downsample: per level transition, whether time is halved too (the decoder mirrors it).
      dtype: computation dtype; parameters are float32.

    Parameters are named after diffusers' tensors (``encoder/down_blocks_3/conv1/kernel`` is
    ``encoder.down_blocks.3.conv1.weight``); see `pixeldance.convert.wan_vae`.
    """
    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    dtype: Dtype = jnp.float32

    def setup(self):
        levels = len(self.dim_mult)
        if len(self.temporal_downsample) != levels - 1:
            raise ValueError(f"WanVAE: temporal_downsample {tuple(self.temporal_downsample)} needs "
                             f"{levels - 1} entries (one per level transition of dim_mult {tuple(self.dim_mult)})")
        self.encoder = Encoder(self.base_dim, 2 * self.z_dim, tuple(self.dim_mult), self.num_res_blocks,
                               tuple(self.temporal_downsample), self.dtype)
        self.quant_conv = CausalConv(2 * self.z_dim, (1, 1, 1), self.dtype)
        self.post_quant_conv = CausalConv(self.z_dim, (1, 1, 1), self.dtype)
        self.decoder = Decoder(self.decoder_base_dim or self.base_dim, tuple(self.dim_mult),
                               self.num_res_blocks, tuple(self.temporal_downsample)[::-1], self.dtype)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.z_dim

    def check_video(self, video: jax.Array, what: str):
        t, s = self.temporal_factor, self.spatial_factor
        shape = tuple(video.shape)
        if video.ndim != 5 or shape[-1] != 3:
            raise ValueError(f"WanVAE.{what}: video shape {shape} must be [B, F, H, W, 3]")
        if shape[1] < 1 or (shape[1] - 1) % t:
            raise ValueError(f"WanVAE.{what}: video shape {shape} has F={shape[1]} frames; "
                             f"need F = 1 + {t}k (1, {1 + t}, {1 + 2 * t}, ...)")
        if shape[2] % s or shape[3] % s:
            raise ValueError(f"WanVAE.{what}: video shape {shape} has H={shape[2]}, W={shape[3]}; "
                             f"both must be divisible by {s}")

    def check_latents(self, z: jax.Array, what: str):
        if z.ndim != 5 or z.shape[-1] != self.z_dim or z.shape[1] < 1:
            raise ValueError(f"WanVAE.{what}: latent shape {tuple(z.shape)} must be "
                             f"[B, T>=1, h, w, {self.z_dim}]")

    def _moments(self, video: jax.Array, first: bool) -> tuple[jax.Array, jax.Array]:
        moments = self.quant_conv(self.encoder(video, first)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def encode(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """video: float [B, F, H, W, 3] in [-1, 1], F = 1 + 4k, H and W divisible by 8.

        Returns (mean, logvar), each float32 [B, 1+k, H/8, W/8, Z]; logvar clipped to [-30, 20].
        """
        self.check_video(video, "encode")
        return self._moments(video, True)

    def decode(self, z: jax.Array) -> jax.Array:
        """z: float [B, T, h, w, Z] -> float32 video [B, 1 + 4(T-1), 8h, 8w, 3], clipped to [-1, 1]."""
        self.check_latents(z, "decode")
        return self._decode(z, True)

    def _decode(self, z: jax.Array, first: bool) -> jax.Array:
        x = self.decoder(self.post_quant_conv(z.astype(self.dtype)), first)
        return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)

    def encode_chunk(self, video: jax.Array, first: bool) -> tuple[jax.Array, jax.Array]:
        """One chunk of `vae_inference.encode_chunked` (needs the 'cache' collection mutable)."""
        return self._moments(video, first)

    def decode_chunk(self, z: jax.Array, first: bool) -> jax.Array:
        """One chunk of `vae_inference.decode_chunked` (needs the 'cache' collection mutable)."""
        return self._decode(z, first)

    def __call__(self, video: jax.Array, sample_rng: jax.Array | None = None) -> dict[str, jax.Array]:
        """Encode, sample (if `sample_rng` is given; else z = mean) and decode.

        Returns dict(recon [B, F, H, W, 3], mean, logvar, z [B, T, H/8, W/8, Z]), float32.
        """
        mean, logvar = self.encode(video)
        z = mean
        if sample_rng is not None:
            noise = jax.random.normal(sample_rng, (mean.size,), mean.dtype).reshape(mean.shape)
            z = mean + jnp.exp(0.5 * logvar) * noise
        return dict(recon=self.decode(z), mean=mean, logvar=logvar, z=z)
