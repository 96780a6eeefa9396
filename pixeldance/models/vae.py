"""Causal 3D convolutional video VAE (Flax Linen).

Axis glossary (shapes in docstrings and comments use these letters):
  B  batch
  F  pixel frames (``F = 1 + 4k`` at the default 4x temporal compression)
  T  latent frames (``T = 1 + k``); inside the networks also the frames of an inner level
  H  height, W  width (of pixels, latents or an inner level, as the comment says)
  C  channels

The first frame is encoded on its own and every further group of 4 frames becomes one latent
frame, so images (F = 1) and videos share one latent space. Everything is causal in time:

* every convolution pads time on the left only, by repeating the first frame;
* temporal downsampling pairs frames ``(2j-1, 2j)`` into channels and pairs frame 0 with itself;
* temporal upsampling turns frame 0 into one frame and every other frame into two;
* normalisation statistics are taken per frame (GroupNorm: over H, W and the channels of a
  group) or per position (channel RMS norm), never over T: statistics over time would let
  later frames leak into earlier ones.

Hence (at 4x) latent ``j`` depends only on pixel frames ``0..4j`` and pixel frame ``f >= 1``
depends only on latents ``0..ceil(f / 4)``; pixel frame 0 only on latent 0.

Spatial compression is a pixel-unshuffle "patch" of ``patch_size`` at the input followed by one
2x downsample per level transition (8x by default). The patch keeps every convolution off the
full-resolution grid, which is what makes the small variants cheap enough to train on a CPU.

Long and large videos. Because every layer is causal, a video can be encoded chunk by chunk
(frame 0 alone, then 4 frames at a time) and latents decoded one (or a few) latent frames at a
time, each causal conv keeping the per-frame outputs of its last ``kt - 1`` input frames in a
cache (the 'cache' variable collection, carried through `lax.scan`): `encode_chunked` and
`decode_chunked` equal `encode` / `decode` up to float rounding, in memory that does not grow
with the number of frames. `encode_tiled` / `decode_tiled` split large frames into overlapping
tiles and blend the seams with linear ramps; with the per-position norm (``norm_groups=0``) a
tile's interior is exact and only the blended overlaps differ from the one-pass result.
"""
from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from pixeldance.models import attention

Dtype = Any

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

_CONV_KERNEL_AXES = (None, None, None, "conv_in", "conv_out")


# ---------------------------------------------------------------------------------------------
# Rearrangements between space/time and channels.
# ---------------------------------------------------------------------------------------------

def space_to_depth(x: jax.Array, p: int) -> jax.Array:
    """Pixel-unshuffle: [B, F, H, W, C] -> [B, F, H/p, W/p, p*p*C]."""
    if p == 1:
        return x
    b, f, h, w, c = x.shape
    x = x.reshape(b, f, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 2, 4, 3, 5, 6)  # [B, F, H/p, W/p, p, p, C]
    return x.reshape(b, f, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
    """Pixel-shuffle, the inverse of `space_to_depth`: [B, F, H, W, p*p*C] -> [B, F, pH, pW, C]."""
    if p == 1:
        return x
    b, f, h, w, c = x.shape
    x = x.reshape(b, f, h, w, p, p, c // (p * p))
    x = x.transpose(0, 1, 2, 4, 3, 5, 6)  # [B, F, H, p, W, p, C]
    return x.reshape(b, f, h * p, w * p, c // (p * p))


def pair_frames(x: jax.Array, first: bool = True) -> jax.Array:
    """Causal 2x temporal merge: [B, 1+2m, H, W, C] -> [B, 1+m, H, W, 2C].

    Output frame 0 is input frame 0 paired with itself; output frame j >= 1 is the pair of input
    frames (2j-1, 2j). No output frame sees an input frame later than 2j.
    ``first=False``: x is a later chunk of a video, [B, 2m, H, W, C] -> [B, m, H, W, 2C], plain pairs.
    """
    if first:
        x = jnp.concatenate([x[:, :1], x], axis=1)  # [B, 2+2m, H, W, C]
    b, f, h, w, c = x.shape
    if f % 2:
        raise ValueError(f"pair_frames: {f - first} frames do not pair up causally "
                         f"(need 1 + 2m frames from the start of a video, 2m in a later chunk)")
    x = x.reshape(b, f // 2, 2, h, w, c)
    x = x.transpose(0, 1, 3, 4, 2, 5)  # [B, F/2, H, W, 2, C]
    return x.reshape(b, f // 2, h, w, 2 * c)


def unpair_frames(x: jax.Array, first: bool = True) -> jax.Array:
    """Causal 2x temporal split, the inverse of `pair_frames`: [B, T, H, W, 2C] -> [B, 2T-1, H, W, C].

    Frame j becomes frames (2j-1, 2j); for frame 0 only the second half is kept, so frame 0
    stays one frame. ``first=False`` (a later chunk): every frame becomes two, [B, 2T, H, W, C].
    """
    b, t, h, w, c2 = x.shape
    x = x.reshape(b, t, h, w, 2, c2 // 2)
    x = x.transpose(0, 1, 4, 2, 3, 5)  # [B, T, 2, H, W, C]
    x = x.reshape(b, 2 * t, h, w, c2 // 2)
    return x[:, 1:] if first else x


# ---------------------------------------------------------------------------------------------
# Layers.
# ---------------------------------------------------------------------------------------------

class CausalConv3d(nn.Module):
    """3D convolution, causal in time and 'SAME' in space.

    Time is padded on the left only with ``kt - 1`` copies of the first frame, so output frame
    ``t`` sees input frames ``t-kt+1 .. t`` and frame 0 sees only itself. Spatial padding is zeros.

    Chunked passes (the 'cache' collection mutable): the cache holds the last ``kt - 1`` input
    frames, [B, kt-1, H, W, C_in]. A chunk with ``first=True``
    starts a video (padding as above); a later chunk reads its past from the cache instead, so
    the chunks together compute exactly the one-pass convolution and nothing twice.

    Attributes:
      features: output channels.
      kernel_size: (kt, kh, kw); kh and kw odd.
    Input ``[B, T, H, W, C_in]`` -> output ``[B, T, H, W, features]``.
    """
    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array, first: bool = True) -> jax.Array:
        kt, kh, kw = self.kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"CausalConv3d: spatial kernel {self.kernel_size} must be odd")
        c_in = x.shape[-1]
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(_matrix_init(self.kernel_init), _CONV_KERNEL_AXES),
            (kt, kh, kw, c_in, self.features), self.param_dtype)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        if kt > 1 and _caching(self):
            cache = self.variable("cache", "frames", jnp.zeros, (x.shape[0], kt - 1) + x.shape[2:], x.dtype)
            past = (jnp.broadcast_to(x[:, :1], cache.value.shape) if first
                    else cache.value.astype(x.dtype))
            y = causal_conv(x, kernel, past=past)
            cache.value = jnp.concatenate([past, x], axis=1)[:, -(kt - 1):]
        else:
            y = causal_conv(x, kernel, pad="first")
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, ("conv_out",)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def _matrix_init(init):
    """Runs a kernel initialiser on the [kt*kh*kw*C_in, C_out] matrix and reshapes the result.

    Same fan-in and distribution as on the 5D shape, but XLA:CPU takes ~10 s to compile one
    random draw of rank >= 4 (and well under a second for rank 2), which made `jax.jit(init)`
    of even the tiny model take a minute.
    """
    def matrix_init(key, shape, dtype=jnp.float32):
        return init(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)
    return matrix_init


def _caching(module: nn.Module) -> bool:
    """True in a chunked pass: the 'cache' collection is mutable (and this is not `init`)."""
    return module.is_mutable_collection("cache") and not module.is_initializing()


# Frames of at least this many values (H * W * channels, input or output) are convolved one at a
# time on the CPU: XLA:CPU's conv batched over frames ran 66 GFLOP/s on 17 frames of 128² x 96
# channels and 81 on 64² x 192, one frame at a time 79 and 92; from 32² x 384 down both ran at
# the core's matmul rate (one thread, this repository's CPU).
CPU_PER_FRAME_MIN_VALUES = 1 << 19


def _per_frame(x_shape, kernel_shape) -> bool:
    """Whether a conv of frames x [B, T, H, W, C_in] with kernel [..., C_in, C_out] loops over T."""
    _, t, h, w, c_in = x_shape
    return (t > 1 and h * w * max(c_in, kernel_shape[-1]) >= CPU_PER_FRAME_MIN_VALUES
            and attention.target_platform() == "cpu")


def conv_frames(x: jax.Array, kernel: jax.Array, strides=(1, 1), padding="SAME",
                per_frame: bool | None = False) -> jax.Array:
    """A 2D conv applied to every frame: x [B, T, H, W, C_in], kernel [kh, kw, C_in, C_out]
    -> [B, T, H', W', C_out]; 'SAME' is zero padding in space, else `padding` as for `lax.conv`.

    One 2D conv over all B*T frames (a matmul for 1x1 kernels). Why not `lax.conv` in 3D:
    XLA:CPU runs 2D convolutions and their gradients 3-5x faster. per_frame: loop over T with
    `lax.map` (one conv over B frames at a time); None: for large frames on the CPU (see
    CPU_PER_FRAME_MIN_VALUES). The batch axis stays inside each conv, so a sharded batch is
    never sliced. For inference only: the loop's gradient ran 5.6x slower than the batched
    conv's (a VAE train step on 5 x 96² frames), so models that train keep the default False.
    """
    kh, kw, c_in, c_out = kernel.shape
    b, t, h, w, _ = x.shape
    if (kh, kw, tuple(strides)) == (1, 1, (1, 1)):
        y = jnp.dot(x.reshape(-1, c_in), kernel.reshape(c_in, c_out))
        return y.reshape(b, t, h, w, c_out)
    if padding == "SAME":
        padding = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    conv = lambda frames: lax.conv_general_dilated(frames, kernel, strides, padding,
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if per_frame is None:
        per_frame = _per_frame(x.shape, kernel.shape)
    if per_frame:
        return jnp.moveaxis(lax.map(conv, jnp.moveaxis(x, 1, 0)), 0, 1)
    y = conv(x.reshape(b * t, h, w, c_in))
    return y.reshape(b, t, y.shape[1], y.shape[2], c_out)


def causal_conv(x: jax.Array, kernel: jax.Array, *, past: jax.Array | None = None,
                pad: str = "first", per_frame: bool | None = False) -> jax.Array:
    """Causal 3D conv ('SAME' zero padding in space) as one 2D conv per time tap.

    x [B, T, H, W, C_in], kernel [kt, kh, kw, C_in, C_out] -> [B, T, H, W, C_out]. Tap a
    (kernel[a]) of output frame t reads input frame ``t - (kt-1) + a``. Before frame 0 the input
    is `past` ([B, kt-1, H, W, C_in]: a chunk's cache) or, without it, padding: 'first' (copies
    of frame 0) or 'zeros'. The products with padding are not computed: zeros are skipped, and
    for copies of frame 0 the tap's output on frame 0 is repeated. So the one-pass conv costs
    ``kt*T - (kt-1)`` frame convs, not ``kt*T``; each is a plain 2D conv with C_out outputs,
    which XLA:CPU ran 20-30 % faster than one conv with kt*C_out outputs plus a shifted sum.
    per_frame: one `lax.map` over the output frames, each summing its taps (None: as
    `conv_frames` decides, for large frames on the CPU; inference only, as there); the outputs
    that read padding are computed as above, on the first kt-1 frames.
    """
    kt = kernel.shape[0]
    b, t = x.shape[:2]
    if pad not in ("first", "zeros"):
        raise ValueError(f"causal_conv: pad {pad!r} must be 'first' or 'zeros'")
    if kt == 1:
        return conv_frames(x, kernel[0], per_frame=per_frame)
    if per_frame is None:
        per_frame = _per_frame(x.shape, kernel.shape)
    if per_frame:
        return _causal_conv_per_frame(x, kernel, past, pad)
    if past is not None:
        seq = jnp.concatenate([past.astype(x.dtype), x], axis=1)  # output t reads t .. t+kt-1
        return sum(conv_frames(seq[:, a:a + t], kernel[a]) for a in range(kt))
    y = conv_frames(x, kernel[kt - 1])  # the tap on the current frame
    for a in range(kt - 1):
        lag = kt - 1 - a  # tap a reads `lag` frames back: padding for outputs < lag
        n = t - lag  # outputs of tap a that read a real frame
        if pad == "zeros":
            if n > 0:
                y = y + jnp.pad(conv_frames(x[:, :n], kernel[a]), ((0, 0), (lag, 0)) + ((0, 0),) * 3)
            continue
        y_a = conv_frames(x[:, :max(n, 1)], kernel[a])
        head = jnp.broadcast_to(y_a[:, :1], (b, min(lag, t)) + y_a.shape[2:])
        y = y + jnp.concatenate([head, y_a[:, :max(n, 0)]], axis=1)
    return y


def _causal_conv_per_frame(x: jax.Array, kernel: jax.Array, past: jax.Array | None, pad: str) -> jax.Array:
    """`causal_conv` one output frame at a time: a `lax.map` whose step sums the frame's kt taps,
    so each output is written once (three per-tap loops wrote three outputs, each into a zeroed
    buffer, then padded and added them: 0.1-0.2 s per conv of 17 frames at 128² x 96)."""
    kt = kernel.shape[0]
    b, t = x.shape[:2]
    if past is not None:
        frames, offset, head = jnp.concatenate([past.astype(x.dtype), x], axis=1), 0, None
        first = 0  # output i reads frames i .. i+kt-1 of past + x
    else:  # outputs 0 .. kt-2 read padding: the per-tap path on those frames (cheap)
        first = min(kt - 1, t)
        head = causal_conv(x[:, :first], kernel, pad=pad)
        frames, offset = x, -(kt - 1)  # output i reads frames i-kt+1 .. i of x
    if first == t:
        return head
    frames = jnp.moveaxis(frames, 1, 0)  # [T', B, H, W, C_in]

    def one(i):
        taps = [lax.dynamic_index_in_dim(frames, i + offset + a, keepdims=True) for a in range(kt)]
        return sum(conv_frames(jnp.moveaxis(f, 0, 1), kernel[a])[:, 0]
                   for a, f in enumerate(taps))

    y = jnp.moveaxis(lax.map(one, jnp.arange(first, t)), 0, 1)  # [B, T - first, H, W, C_out]
    return y if head is None else jnp.concatenate([head, y], axis=1)


class FrameGroupNorm(nn.Module):
    """GroupNorm with statistics per frame: over H, W and the channels of a group, never over T.

    Uses ``gcd(num_groups, C)`` groups so any channel count works. Statistics in float32.
    Input and output ``[B, T, H, W, C]``.
    """
    num_groups: int = 8
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        g = math.gcd(self.num_groups, c)
        xg = x.astype(jnp.float32).reshape(b, t, h, w, g, c // g)
        # One pass over the data for both moments (E[x^2] - E[x]^2); the norms are a large
        # share of the step time at these small channel counts.
        mean = jnp.mean(xg, axis=(2, 3, 5), keepdims=True)
        mean_sq = jnp.mean(jnp.square(xg), axis=(2, 3, 5), keepdims=True)
        var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
        y = ((xg - mean) * lax.rsqrt(var + self.epsilon)).reshape(b, t, h, w, c)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (c,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                          (c,), self.param_dtype)
        return (y * scale + bias).astype(self.dtype)


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels at each (t, h, w) position (as in Wan's VAE).

    Unlike GroupNorm it keeps each position's absolute level, so a flat background colour
    survives normalisation (GroupNorm over H, W maps it to zero); trivially causal.
    Input and output ``[B, T, H, W, C]``.
    """
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), jnp.float32)
        return (y * scale).astype(self.dtype)


def make_norm(norm_groups: int, dtype: Dtype, name: str) -> nn.Module:
    """norm_groups > 0: per-frame GroupNorm with that many groups; 0: per-position channel RMS norm."""
    if norm_groups == 0:
        return ChannelRMSNorm(dtype=dtype, name=name)
    return FrameGroupNorm(norm_groups, dtype=dtype, name=name)


class ResBlock(nn.Module):
    """Pre-norm residual block: (norm, SiLU, conv) x 2 plus identity. [B, T, H, W, C] -> same."""
    time_kernel: int = 3
    norm_groups: int = 8
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool = True) -> jax.Array:
        c = x.shape[-1]
        k = (self.time_kernel, 3, 3)
        h = nn.silu(make_norm(self.norm_groups, self.dtype, "norm1")(x))
        h = CausalConv3d(c, k, dtype=self.dtype, name="conv1")(h, first)
        h = nn.silu(make_norm(self.norm_groups, self.dtype, "norm2")(h))
        h = CausalConv3d(c, k, dtype=self.dtype, name="conv2")(h, first)
        return x + h


class Downsample(nn.Module):
    """2x spatial (and optionally 2x causal temporal) downsampling with a channel change.

    Merges 2x2 pixels (and, if `temporal`, frame pairs) into channels, then a learned linear map:
    a non-overlapping strided conv written as a rearrangement, so it runs at the low resolution.
    [B, T, H, W, C] -> [B, T' , H/2, W/2, features], T' = (T+1)/2 if temporal else T
    (T/2 for a later chunk, ``first=False``).
    """
    features: int
    temporal: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool = True) -> jax.Array:
        if self.temporal:
            x = pair_frames(x, first)
        x = space_to_depth(x, 2)
        return CausalConv3d(self.features, (1, 1, 1), dtype=self.dtype, name="proj")(x)


class Upsample(nn.Module):
    """Mirror of `Downsample`: a linear map to 4x (or 8x) the channels, then pixel-shuffle.

    Runs at the low resolution (the residual blocks after it supply the spatial context). The
    kernel starts as the same map for every new sub-pixel / frame ("ICNR"), i.e. as nearest
    neighbour upsampling, which avoids the checkerboard that pixel-shuffle starts with otherwise.
    Temporal: frame 0 -> 1 frame, every other frame -> 2 frames.
    [B, T, H, W, C] -> [B, T', 2H, 2W, features], T' = 2T-1 if temporal else T
    (2T for a later chunk, ``first=False``).
    """
    features: int
    temporal: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool = True) -> jax.Array:
        mult = 8 if self.temporal else 4
        x = CausalConv3d(self.features * mult, (1, 1, 1), dtype=self.dtype,
                         kernel_init=_icnr_init(mult), name="proj")(x)
        if self.temporal:
            x = unpair_frames(x, first)
        return depth_to_space(x, 2)


def _icnr_init(mult: int, base_init=nn.initializers.lecun_normal()):
    """Kernel init whose output channels are `mult` copies of one [.., C_in, C_out/mult] kernel.

    `unpair_frames` and `depth_to_space` read output channel ``m * C_out/mult + c`` as copy
    ``m`` (frame / sub-pixel) of channel ``c``, so tiling along the last axis makes every copy equal.
    """
    def init(key, shape, dtype=jnp.float32):
        base = base_init(key, tuple(shape[:-1]) + (shape[-1] // mult,), dtype)
        return jnp.tile(base, (1,) * (len(shape) - 1) + (mult,))
    return init


# ---------------------------------------------------------------------------------------------
# Encoder, decoder, VAE.
# ---------------------------------------------------------------------------------------------

class Encoder(nn.Module):
    """video [B, F, H, W, 3] -> moments [B, T, H/s, W/s, 2 * latent_channels] (see CausalVAE).

    ``first``: the video starts at its frame 0 (False: a later chunk, 4k frames -> k latents).
    """
    channels: tuple[int, ...]
    num_res_blocks: int
    latent_channels: int
    temporal_downsample: tuple[bool, ...]
    time_kernels: tuple[int, ...]
    patch_size: int
    norm_groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, video: jax.Array, first: bool = True) -> jax.Array:
        x = space_to_depth(video.astype(self.dtype), self.patch_size)  # [B, F, H/p, W/p, 3p²]
        x = CausalConv3d(self.channels[0], (self.time_kernels[0], 3, 3), dtype=self.dtype,
                         name="conv_in")(x, first)
        for i, c in enumerate(self.channels):
            for r in range(self.num_res_blocks):
                x = ResBlock(self.time_kernels[i], self.norm_groups, self.dtype,
                             name=f"level{i}_res{r}")(x, first)
            if i + 1 < len(self.channels):
                x = Downsample(self.channels[i + 1], self.temporal_downsample[i], self.dtype,
                               name=f"level{i}_down")(x, first)
        x = nn.silu(make_norm(self.norm_groups, self.dtype, "norm_out")(x))
        return CausalConv3d(2 * self.latent_channels, (self.time_kernels[-1], 3, 3),
                            dtype=self.dtype, bias_init=_moments_bias_init(self.latent_channels),
                            name="conv_out")(x, first)


def _moments_bias_init(latent_channels: int, logvar: float = -6.0):
    """Bias of the encoder output: 0 for the means, `logvar` for the log-variances.

    With logvar 0 at init the sampled latents are mostly unit noise and the decoder learns for
    hundreds of steps to output the average frame; starting at std exp(-3) ~ 0.05 the signal
    gets through from the first step (the KL term still shapes the posterior later).
    """
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.concatenate([jnp.zeros((latent_channels,), dtype),
                                jnp.full((shape[0] - latent_channels,), logvar, dtype)])
    return init


class Decoder(nn.Module):
    """z [B, T, h, w, latent_channels] -> video [B, 1 + t(T-1), s*h, s*w, 3] (see CausalVAE).

    ``first``: z starts at latent 0 (False: a later chunk, k latents -> t*k frames).
    ``with_features``: also return the input of the last conv, [B, F, H/p, W/p, channels[0]]
    (the adaptive GAN weight differentiates the losses with respect to that conv).
    """
    channels: tuple[int, ...]
    num_res_blocks: int
    temporal_downsample: tuple[bool, ...]
    time_kernels: tuple[int, ...]
    patch_size: int
    norm_groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, first: bool = True, with_features: bool = False):
        x = CausalConv3d(self.channels[-1], (self.time_kernels[-1], 3, 3), dtype=self.dtype,
                         name="conv_in")(z.astype(self.dtype), first)
        for i in reversed(range(len(self.channels))):
            for r in range(self.num_res_blocks):
                x = ResBlock(self.time_kernels[i], self.norm_groups, self.dtype,
                             name=f"level{i}_res{r}")(x, first)
            if i > 0:
                x = Upsample(self.channels[i - 1], self.temporal_downsample[i - 1], self.dtype,
                             name=f"level{i}_up")(x, first)
        features = nn.silu(make_norm(self.norm_groups, self.dtype, "norm_out")(x))
        x = CausalConv3d(3 * self.patch_size ** 2, (self.time_kernels[0], 3, 3), dtype=self.dtype,
                         name="conv_out")(features, first)
        video = depth_to_space(x, self.patch_size)  # [B, F, H, W, 3]
        return (video, features) if with_features else video


class CausalVAE(nn.Module):
    """Causal 3D convolutional video VAE.

    Level ``i`` of the encoder runs `num_res_blocks` residual blocks with ``channels[i]``
    channels and ``(time_kernels[i], 3, 3)`` kernels; between levels ``i`` and ``i+1`` the
    resolution halves (and time halves causally where ``temporal_downsample[i]``). The decoder
    mirrors it. Compression: ``temporal_factor = 2 ** sum(temporal_downsample)`` in time,
    ``spatial_factor = patch_size * 2 ** (len(channels) - 1)`` in space.

    Attributes:
      channels: channels per level, highest resolution first.
      num_res_blocks: residual blocks per level (encoder and decoder each).
      latent_channels: C of the latents.
      temporal_downsample: one flag per level transition (``len(channels) - 1`` entries).
      time_kernels: temporal kernel size per level; 1 = spatial-only (cheap at high resolution).
      patch_size: pixel-unshuffle factor applied to the input (and pixel-shuffle at the output).
      norm_groups: GroupNorm groups (``gcd(norm_groups, C)`` used per layer); 0 selects a
        per-position channel RMS norm instead (keeps flat colours; Wan's choice).
      disc_channels: widths of a `PatchDiscriminator3D` trained with the VAE (GAN loss); () for
        none. It lives in the same parameter tree so that a checkpoint is one train state and
        `load_vae` needs nothing else; encode and decode never run it.
      dtype: computation dtype; parameters are float32.

    Use through ``model.apply(params, x, method=CausalVAE.encode)`` / ``.decode`` or call it;
    `encode_chunked`, `decode_chunked`, `encode_tiled`, `decode_tiled` for long or large videos.
    """
    channels: tuple[int, ...] = (16, 32, 64)
    num_res_blocks: int = 1
    latent_channels: int = 16
    temporal_downsample: tuple[bool, ...] = (True, True)
    time_kernels: tuple[int, ...] = (1, 3, 3)
    patch_size: int = 2
    norm_groups: int = 8
    disc_channels: tuple[int, ...] = ()
    dtype: Dtype = jnp.float32

    def setup(self):
        n = len(self.channels)
        if n < 1:
            raise ValueError("CausalVAE: channels must have at least one level")
        if len(self.temporal_downsample) != n - 1:
            raise ValueError(f"CausalVAE: temporal_downsample {self.temporal_downsample} needs "
                             f"{n - 1} entries (one per level transition of channels {self.channels})")
        if len(self.time_kernels) != n:
            raise ValueError(f"CausalVAE: time_kernels {self.time_kernels} needs {n} entries "
                             f"(one per level of channels {self.channels})")
        common = dict(channels=tuple(self.channels), num_res_blocks=self.num_res_blocks,
                      temporal_downsample=tuple(self.temporal_downsample),
                      time_kernels=tuple(self.time_kernels), patch_size=self.patch_size,
                      norm_groups=self.norm_groups, dtype=self.dtype)
        self.encoder = Encoder(latent_channels=self.latent_channels, **common)
        self.decoder = Decoder(**common)
        if self.disc_channels:
            self.discriminator = PatchDiscriminator3D(tuple(self.disc_channels), dtype=self.dtype)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.channels) - 1)

    def check_video(self, video: jax.Array, what: str = "encode"):
        """Raises a one-line ValueError unless video is [B, 1 + 4k, H, W, 3] with 8 | H, W."""
        t, s = self.temporal_factor, self.spatial_factor
        shape = tuple(video.shape)
        if video.ndim != 5 or shape[-1] != 3:
            raise ValueError(f"CausalVAE.{what}: video shape {shape} must be [B, F, H, W, 3]")
        _, f, h, w, _ = shape
        if f < 1 or (f - 1) % t:
            raise ValueError(f"CausalVAE.{what}: video shape {shape} has F={f} frames; "
                             f"need F = 1 + {t}k (1, {1 + t}, {1 + 2 * t}, ...)")
        if h % s or w % s:
            raise ValueError(f"CausalVAE.{what}: video shape {shape} has H={h}, W={w}; "
                             f"both must be divisible by {s}")

    def check_latents(self, z: jax.Array, what: str = "decode"):
        """Raises a one-line ValueError unless z is [B, T >= 1, h, w, latent_channels]."""
        shape = tuple(z.shape)
        if z.ndim != 5 or shape[-1] != self.latent_channels or shape[1] < 1:
            raise ValueError(f"CausalVAE.{what}: latent shape {shape} must be "
                             f"[B, T>=1, h, w, {self.latent_channels}]")

    def _moments(self, video: jax.Array, first: bool) -> tuple[jax.Array, jax.Array]:
        moments = self.encoder(video, first).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def encode(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """video: float [B, F, H, W, 3] in [-1, 1], F = 1 + 4k, H and W divisible by 8.

        Returns (mean, logvar), each float32 [B, 1+k, H/8, W/8, latent_channels]; logvar is
        clipped to [-30, 20]. (4 and 8 are `temporal_factor` and `spatial_factor`.)
        """
        self.check_video(video, "encode")
        return self._moments(video, True)

    def decode(self, z: jax.Array) -> jax.Array:
        """z: float [B, T, h, w, latent_channels] -> float32 [B, 1 + 4(T-1), 8h, 8w, 3].

        Unbounded output, trained towards [-1, 1]. Pixel frame 0 depends only on latent 0 and
        pixel frame f >= 1 only on latents 0..ceil(f/4).
        """
        self.check_latents(z, "decode")
        return self.decoder(z).astype(jnp.float32)

    def encode_chunk(self, video: jax.Array, first: bool) -> tuple[jax.Array, jax.Array]:
        """One chunk of `encode_chunked` (the 'cache' collection mutable): frame 0 alone
        (``first``) or 4k later frames -> k latent frames."""
        return self._moments(video, first)

    def decode_chunk(self, z: jax.Array, first: bool) -> jax.Array:
        """One chunk of `decode_chunked` (the 'cache' collection mutable): k latent frames ->
        1 + 4(k-1) pixel frames (``first``) or 4k."""
        return self.decoder(z, first).astype(jnp.float32)

    def discriminate(self, video: jax.Array) -> jax.Array:
        """Patch logits of the discriminator (needs ``disc_channels``): float [B, F, H, W, 3] in
        [-1, 1] -> float32 [B, F, H/2^n, W/2^n, 1], n = len(disc_channels) - 1."""
        if not self.disc_channels:
            raise ValueError("CausalVAE.discriminate: this VAE has no discriminator (disc_channels=())")
        return self.discriminator(video)

    def __call__(self, video: jax.Array, sample_rng: jax.Array | None = None,
                 with_features: bool = False) -> dict[str, jax.Array]:
        """Encode, sample (if `sample_rng` is given; else z = mean) and decode.

        Returns dict(recon [B, F, H, W, 3], mean, logvar, z [B, T, H/8, W/8, C]), float32; with
        `with_features` also 'features', the input of the decoder's last conv (see `decoder_head`).
        """
        mean, logvar = self.encode(video)
        z = mean
        if sample_rng is not None:
            # Drawn flat: XLA:CPU takes ~10 s to compile a random draw of rank 5 (see _matrix_init).
            noise = jax.random.normal(sample_rng, (mean.size,), mean.dtype).reshape(mean.shape)
            z = mean + jnp.exp(0.5 * logvar) * noise
        recon, features = self.decoder(z, with_features=True)
        out = dict(recon=recon.astype(jnp.float32), mean=mean, logvar=logvar, z=z)
        if with_features:
            out["features"] = features
        if self.disc_channels and self.is_initializing():
            self.discriminator(recon)  # creates its parameters
        return out


def decoder_head(model: CausalVAE, conv_out, features: jax.Array) -> jax.Array:
    """The decoder's last conv and pixel-shuffle as a function of its parameters, for whole
    videos: conv_out = ``params['params']['decoder']['conv_out']`` (kernel, bias); features
    [B, F, H/p, W/p, channels[0]] (``model(..., with_features=True)['features']``) -> recon
    float32 [B, F, H, W, 3], as at the end of `model.decode`. The adaptive GAN weight
    differentiates the losses through it with respect to that last layer alone.
    """
    kernel, bias = nn.unbox(conv_out["kernel"]), nn.unbox(conv_out["bias"])
    y = causal_conv(features.astype(model.dtype), kernel.astype(model.dtype)) + bias.astype(model.dtype)
    return depth_to_space(y, model.patch_size).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Chunked encoding and decoding: memory flat in the number of frames.
# ---------------------------------------------------------------------------------------------

def _scan_chunks(model: CausalVAE, params, method, first_chunk: jax.Array, chunks: jax.Array,
                 tail: jax.Array | None):
    """Runs `method` on `first_chunk` (first=True), then on each of `chunks` [N, ...] in a
    `lax.scan` carrying the causal cache, then on `tail` (a shorter last chunk, or None).

    Returns (output of the first chunk, stacked outputs of the others [N, ...], tail output).
    """
    params = {"params": params["params"]}
    out0, variables = model.apply(params, first_chunk, True, method=method, mutable=["cache"])

    def step(cache, chunk):
        out, new = model.apply({**params, "cache": cache}, chunk, False, method=method,
                               mutable=["cache"])
        return new["cache"], out

    cache, outs = lax.scan(step, variables["cache"], chunks)
    out_tail = None
    if tail is not None:
        out_tail, _ = model.apply({**params, "cache": cache}, tail, False, method=method,
                                  mutable=["cache"])
    return out0, outs, out_tail


def _join_chunks(first: jax.Array, rest: jax.Array, tail: jax.Array | None) -> jax.Array:
    """[B, T0, ...], [N, B, Tc, ...] and [B, Tt, ...] or None -> [B, T0 + N*Tc (+ Tt), ...]."""
    n, b, tc = rest.shape[:3]
    parts = [first, jnp.moveaxis(rest, 0, 1).reshape((b, n * tc) + rest.shape[3:])]
    return jnp.concatenate(parts + ([tail] if tail is not None else []), axis=1)


def _split_chunks(x: jax.Array, start: int, size: int) -> tuple[jax.Array, jax.Array | None]:
    """x[:, start:] as chunks of `size` frames [N, B, size, ...] plus a shorter tail (or None)."""
    b, t = x.shape[0], x.shape[1] - start
    n = t // size
    body = x[:, start:start + n * size].reshape((b, n, size) + x.shape[2:])
    tail = x[:, start + n * size:] if t % size else None
    return jnp.moveaxis(body, 1, 0), tail


def encode_chunked(model: CausalVAE, params, video: jax.Array, chunk: int = 1):
    """`model.encode` frame 0 alone, then ``4 * chunk`` frames (`chunk` latent frames) at a time.

    params: {'params': ...}; video as for `CausalVAE.encode`. Returns (mean, logvar) as
    `encode` does, equal to it up to float rounding; activations are those of one chunk.
    """
    model.check_video(video, "encode_chunked")
    chunks, tail = _split_chunks(video, 1, model.temporal_factor * chunk)
    (m0, l0), (ms, ls), tails = _scan_chunks(model, params, CausalVAE.encode_chunk, video[:, :1],
                                             chunks, tail)
    mt, lt = tails if tails is not None else (None, None)
    return _join_chunks(m0, ms, mt), _join_chunks(l0, ls, lt)


def decode_chunked(model: CausalVAE, params, z: jax.Array, chunk: int = 1) -> jax.Array:
    """`model.decode` latent 0 alone, then `chunk` latent frames at a time.

    params: {'params': ...}; z [B, T, h, w, C] -> float32 [B, 1 + 4(T-1), 8h, 8w, 3], equal to
    `decode` up to float rounding; activations are those of one chunk, so memory grows with T
    only by the output itself.
    """
    model.check_latents(z, "decode_chunked")
    chunks, tail = _split_chunks(z, 1, chunk)
    first, rest, tail = _scan_chunks(model, params, CausalVAE.decode_chunk, z[:, :1], chunks, tail)
    return _join_chunks(first, rest, tail)


# ---------------------------------------------------------------------------------------------
# Spatial tiling with blended seams: memory of one tile, for high resolutions.
# ---------------------------------------------------------------------------------------------

def _tiles_1d(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of equal tiles covering [0, size), neighbours overlapping by >= `overlap`
    (the last tile is aligned to the end, so its overlap may be larger)."""
    if tile >= size:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be in [0, tile={tile})")
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def _ramp_1d(starts: list[int], tile: int, scale: float) -> np.ndarray:
    """Blend weights [num_tiles, tile * scale]: 1 inside a tile, linear ramps across each overlap
    with a neighbour (the two ramps of an overlap sum to 1), so seams cross-fade."""
    n = round(tile * scale)
    pos = np.arange(n) + 0.5
    weights = []
    for i, s in enumerate(starts):
        w = np.ones(n)
        if i > 0:  # overlap with the previous tile, in output units
            w = np.minimum(w, pos / ((starts[i - 1] + tile - s) * scale))
        if i + 1 < len(starts):
            w = np.minimum(w, (n - pos) / ((s + tile - starts[i + 1]) * scale))
        weights.append(w)
    return np.stack(weights)


def _tiled(fn, x: jax.Array, tile: int, overlap: int, scale: float, out_channels: int):
    """Applies fn to overlapping spatial tiles of x [B, T, H, W, C] and blends the outputs.

    fn: tile [B, T, tile', tile', C] -> [B, T', tile' * scale, tile' * scale, out_channels]
    (tile' = min(tile, H) and likewise in W). The tiles run one at a time in a `lax.scan`
    that accumulates weighted outputs into one buffer, so memory is one tile's activations
    plus the output.
    """
    b, _, h, w, _ = x.shape
    th, tw = min(tile, h), min(tile, w)
    ys, xs = _tiles_1d(h, th, overlap), _tiles_1d(w, tw, overlap)
    wy, wx = _ramp_1d(ys, th, scale), _ramp_1d(xs, tw, scale)
    out_shape = jax.eval_shape(fn, jax.ShapeDtypeStruct((b,) + x.shape[1:2] + (th, tw) + x.shape[4:],
                                                        x.dtype)).shape
    t_out, oh, ow = out_shape[1], round(h * scale), round(w * scale)
    total = np.zeros((oh, ow))
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            oy, ox = round(y0 * scale), round(x0 * scale)
            total[oy:oy + wy.shape[1], ox:ox + wx.shape[1]] += np.outer(wy[i], wx[j])
    index = np.array([(i, j) for i in range(len(ys)) for j in range(len(xs))], np.int32)
    starts = np.array([(ys[i], xs[j]) for i, j in index], np.int32)

    def step(acc, item):
        (i, j), (y0, x0) = item
        part = lax.dynamic_slice(x, (0, 0, y0, x0, 0), (b, x.shape[1], th, tw, x.shape[4]))
        weight = jnp.asarray(wy, jnp.float32)[i][:, None] * jnp.asarray(wx, jnp.float32)[j][None, :]
        out = fn(part).astype(jnp.float32) * weight[:, :, None]
        at = (0, 0, (y0 * scale).astype(jnp.int32), (x0 * scale).astype(jnp.int32), 0)
        return lax.dynamic_update_slice(acc, lax.dynamic_slice(acc, at, out.shape) + out, at), None

    acc = jnp.zeros((b, t_out, oh, ow, out_channels), jnp.float32)
    acc, _ = lax.scan(step, acc, (jnp.asarray(index), jnp.asarray(starts)))
    return acc / jnp.asarray(total, jnp.float32)[:, :, None]


def decode_tiled(model: CausalVAE, params, z: jax.Array, tile: int = 16, overlap: int = 4,
                 chunk: int | None = None) -> jax.Array:
    """`model.decode` on overlapping spatial tiles of `tile` x `tile` latent pixels (neighbours
    sharing at least `overlap`), blended with linear ramps across each overlap.

    params: {'params': ...}; z [B, T, h, w, C] -> float32 [B, 1 + 4(T-1), 8h, 8w, 3].
    `chunk`: also decode each tile `chunk` latent frames at a time (`decode_chunked`), for long
    and large videos. With ``norm_groups=0`` pixels far enough from a tile border (the
    decoder's receptive field) equal the one-pass decode; with GroupNorm the statistics are the
    tile's, so tiles differ everywhere (as in other tiled VAEs with GroupNorm).
    """
    model.check_latents(z, "decode_tiled")
    if chunk is None:
        fn = lambda part: model.apply({"params": params["params"]}, part, method=CausalVAE.decode)
    else:
        fn = lambda part: decode_chunked(model, params, part, chunk)
    return _tiled(fn, z, tile, overlap, model.spatial_factor, 3)


def encode_tiled(model: CausalVAE, params, video: jax.Array, tile: int = 128, overlap: int = 32,
                 chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """`model.encode` on overlapping spatial tiles of `tile` x `tile` pixels (multiples of 8;
    neighbours sharing at least `overlap` pixels), means and log-variances blended with linear
    ramps. `chunk`: also encode each tile chunk by chunk. Returns (mean, logvar) as `encode`."""
    model.check_video(video, "encode_tiled")
    s = model.spatial_factor
    if tile % s or overlap % s:
        raise ValueError(f"encode_tiled: tile {tile} and overlap {overlap} must be multiples of {s}")
    c = model.latent_channels

    def fn(part):
        if chunk is None:
            mean, logvar = model.apply({"params": params["params"]}, part, method=CausalVAE.encode)
        else:
            mean, logvar = encode_chunked(model, params, part, chunk)
        return jnp.concatenate([mean, logvar], axis=-1)

    moments = _tiled(fn, video, tile, overlap, 1 / s, 2 * c)
    return moments[..., :c], moments[..., c:]


# ---------------------------------------------------------------------------------------------
# The discriminator of the GAN loss.
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# The feature network of the perceptual loss (weights from a local safetensors file).
# ---------------------------------------------------------------------------------------------

# LPIPS' input normalisation for [-1, 1] images (per RGB channel).
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class PerceptualNet:
    """An LPIPS-style distance on a VGG-layout feature network whose weights come from a file.

    The safetensors file holds a torchvision-style ``features`` stack: ``features.{i}.weight``
    [C_out, C_in, 3, 3] and ``features.{i}.bias`` at the conv indices of the sequence, each conv
    followed by a ReLU, and a 2x2 max-pool wherever the next conv index is 3 further on (as in
    torchvision's VGG16, whose converted weights load as they are). Features are taken at the
    ReLU before each pool and after the last conv (relu1_2 .. relu5_3 for VGG16). Optional
    ``lin{k}.weight`` ([C_k] or [1, C_k, 1, 1], LPIPS' learned channel weights) weight the
    squared differences of tap k; without them every channel counts equally.

    distance(a, b): frames float [..., H, W, 3] in [-1, 1] -> float32 [...], per frame:
    ``sum_k mean_hw sum_c w_kc (f_k(a) / |f_k(a)| - f_k(b) / |f_k(b)|)^2``; 0 for equal inputs.
    """

    def __init__(self, path: str):
        from safetensors.numpy import load_file
        if not os.path.exists(path):
            raise FileNotFoundError(f"perceptual network weights not found: {path}")
        tensors = load_file(path)
        index = sorted(int(k.split(".")[1]) for k in tensors
                       if k.startswith("features.") and k.endswith(".weight"))
        if not index:
            raise ValueError(f"{path}: no features.<i>.weight tensors (a VGG-layout feature stack)")
        self.convs, self.taps = [], []
        for n, i in enumerate(index):
            weight = np.asarray(tensors[f"features.{i}.weight"], np.float32)  # [C_out, C_in, 3, 3]
            bias = np.asarray(tensors.get(f"features.{i}.bias", np.zeros(weight.shape[0])), np.float32)
            pool = n + 1 < len(index) and index[n + 1] - i == 3
            self.convs.append((jnp.asarray(weight.transpose(2, 3, 1, 0)), jnp.asarray(bias), pool))
            if pool or n + 1 == len(index):
                self.taps.append(n)
        self.lins = []
        for k, n in enumerate(self.taps):
            c = self.convs[n][0].shape[-1]
            lin = tensors.get(f"lin{k}.weight")
            self.lins.append(jnp.ones((c,), jnp.float32) if lin is None
                             else jnp.asarray(np.asarray(lin, np.float32).reshape(c)))

    def features(self, x: jax.Array) -> list[jax.Array]:
        """x float [N, H, W, 3] in [-1, 1] -> the tapped feature maps [N, H_k, W_k, C_k]."""
        x = (x.astype(jnp.float32) - jnp.asarray(_LPIPS_SHIFT)) / jnp.asarray(_LPIPS_SCALE)
        out = []
        for n, (kernel, bias, pool) in enumerate(self.convs):
            x = lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=lax.Precision.HIGHEST)
            x = nn.relu(x + bias)
            if n in self.taps:
                out.append(x)
            if pool:
                x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return out

    def distance(self, a: jax.Array, b: jax.Array) -> jax.Array:
        lead = a.shape[:-3]
        fa = self.features(a.reshape((-1,) + a.shape[-3:]))
        fb = self.features(b.reshape((-1,) + b.shape[-3:]))
        total = 0.0
        for x, y, lin in zip(fa, fb, self.lins):
            x = x * lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-10)
            y = y * lax.rsqrt(jnp.sum(jnp.square(y), axis=-1, keepdims=True) + 1e-10)
            total = total + jnp.mean(jnp.sum(jnp.square(x - y) * lin, axis=-1), axis=(1, 2))
        return total.reshape(lead)


# ---------------------------------------------------------------------------------------------
# Size table.
# ---------------------------------------------------------------------------------------------

VAE_VARIANTS: dict[str, dict] = {
    # Tiny, for tests.
    "mu": dict(channels=(8, 16, 16), num_res_blocks=1, temporal_downsample=(True, True),
               time_kernels=(1, 3, 3), patch_size=2, norm_groups=8),
    # The built-in synthetic world (17 x 64 x 64 videos), sized to train on a 2-core CPU: about
    # 0.7 s for forward + backward of 4 videos there. Most of that time is at level 0 (32 x 32
    # after the 2x2 patch), hence only 16 channels and spatial-only kernels at that level.
    "shapes": dict(channels=(16, 32, 64), num_res_blocks=1, temporal_downsample=(True, True),
                   time_kernels=(1, 3, 3), patch_size=2, norm_groups=0),
    # The same design 4x wider with two residual blocks per level (about 11M parameters): the
    # reconstruction-quality run on the synthetic world (experiments/vae_shapes.py:vae=shapes_wide),
    # where the 0.69M `shapes` VAE levels off near 28.5 dB on training crops.
    "shapes_wide": dict(channels=(64, 128, 256), num_res_blocks=2, temporal_downsample=(True, True),
                        time_kernels=(1, 3, 3), patch_size=2, norm_groups=0),
    # Research sizes.
    "S": dict(channels=(64, 128, 256, 256), num_res_blocks=2, temporal_downsample=(False, True, True),
              time_kernels=(3, 3, 3, 3), patch_size=1, norm_groups=32),
    "B": dict(channels=(128, 256, 512, 512), num_res_blocks=2, temporal_downsample=(False, True, True),
              time_kernels=(3, 3, 3, 3), patch_size=1, norm_groups=32),
}


def vae_from_variant(name: str, **overrides) -> CausalVAE:
    """A `CausalVAE` of the named size (a key of `VAE_VARIANTS`), with fields overridden."""
    if name not in VAE_VARIANTS:
        raise ValueError(f"unknown VAE variant {name!r}; valid variants: {sorted(VAE_VARIANTS)}")
    return CausalVAE(**{**VAE_VARIANTS[name], **overrides})
