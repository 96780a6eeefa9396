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
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

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


def pair_frames(x: jax.Array) -> jax.Array:
    """Causal 2x temporal merge: [B, 1+2m, H, W, C] -> [B, 1+m, H, W, 2C].

    Output frame 0 is input frame 0 paired with itself; output frame j >= 1 is the pair of input
    frames (2j-1, 2j). No output frame sees an input frame later than 2j.
    """
    b, f, h, w, c = x.shape
    x = jnp.concatenate([x[:, :1], x], axis=1)  # [B, 2+2m, H, W, C]
    x = x.reshape(b, (f + 1) // 2, 2, h, w, c)
    x = x.transpose(0, 1, 3, 4, 2, 5)  # [B, 1+m, H, W, 2, C]
    return x.reshape(b, (f + 1) // 2, h, w, 2 * c)


def unpair_frames(x: jax.Array) -> jax.Array:
    """Causal 2x temporal split, the inverse of `pair_frames`: [B, T, H, W, 2C] -> [B, 2T-1, H, W, C].

    Frame j becomes frames (2j-1, 2j); for frame 0 only the second half is kept, so frame 0
    stays one frame.
    """
    b, t, h, w, c2 = x.shape
    x = x.reshape(b, t, h, w, 2, c2 // 2)
    x = x.transpose(0, 1, 4, 2, 3, 5)  # [B, T, 2, H, W, C]
    x = x.reshape(b, 2 * t, h, w, c2 // 2)
    return x[:, 1:]


# ---------------------------------------------------------------------------------------------
# Layers.
# ---------------------------------------------------------------------------------------------

class CausalConv3d(nn.Module):
    """3D convolution, causal in time and 'SAME' in space.

    Time is padded on the left only with ``kt - 1`` copies of the first frame, so output frame
    ``t`` sees input frames ``t-kt+1 .. t`` and frame 0 sees only itself. Spatial padding is zeros.

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
    def __call__(self, x: jax.Array) -> jax.Array:
        kt, kh, kw = self.kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"CausalConv3d: spatial kernel {self.kernel_size} must be odd")
        c_in = x.shape[-1]
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(_matrix_init(self.kernel_init), _CONV_KERNEL_AXES),
            (kt, kh, kw, c_in, self.features), self.param_dtype)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        y = _causal_conv(x, kernel)
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


def _causal_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [B, T, H, W, C_in], kernel [kt, kh, kw, C_in, C_out] -> [B, T, H, W, C_out].

    One 2D convolution over all B*T frames computes every time tap at once (kt*C_out output
    channels); the taps are then summed with a time shift. Padding the input with copies of
    frame 0 equals padding these per-frame outputs with copies of frame 0, so this is exactly
    the causal 3D convolution. Why not `lax.conv` in 3D: XLA:CPU runs 2D convolutions and their
    gradients 3-5x faster, and one conv per layer keeps compile times down.
    """
    kt, kh, kw, c_in, c_out = kernel.shape
    b, t, h, w, _ = x.shape
    taps = kernel.transpose(1, 2, 3, 0, 4).reshape(kh, kw, c_in, kt * c_out)
    y = lax.conv_general_dilated(
        x.reshape(b * t, h, w, c_in), taps, window_strides=(1, 1),
        padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y.reshape(b, t, h, w, kt, c_out)
    if kt == 1:
        return y[..., 0, :]
    first = jnp.broadcast_to(y[:, :1], (b, kt - 1) + y.shape[2:])
    y = jnp.concatenate([first, y], axis=1)  # [B, kt-1+T, H, W, kt, C_out]
    # Tap a of output frame t reads input frame t - (kt-1) + a, i.e. padded frame t + a.
    return sum(y[:, a:a + t, :, :, a] for a in range(kt))


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
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        k = (self.time_kernel, 3, 3)
        h = nn.silu(make_norm(self.norm_groups, self.dtype, "norm1")(x))
        h = CausalConv3d(c, k, dtype=self.dtype, name="conv1")(h)
        h = nn.silu(make_norm(self.norm_groups, self.dtype, "norm2")(h))
        h = CausalConv3d(c, k, dtype=self.dtype, name="conv2")(h)
        return x + h


class Downsample(nn.Module):
    """2x spatial (and optionally 2x causal temporal) downsampling with a channel change.

    Merges 2x2 pixels (and, if `temporal`, frame pairs) into channels, then a learned linear map:
    a non-overlapping strided conv written as a rearrangement, so it runs at the low resolution.
    [B, T, H, W, C] -> [B, T' , H/2, W/2, features], T' = (T+1)/2 if temporal else T.
    """
    features: int
    temporal: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.temporal:
            x = pair_frames(x)
        x = space_to_depth(x, 2)
        return CausalConv3d(self.features, (1, 1, 1), dtype=self.dtype, name="proj")(x)


class Upsample(nn.Module):
    """Mirror of `Downsample`: a linear map to 4x (or 8x) the channels, then pixel-shuffle.

    Runs at the low resolution (the residual blocks after it supply the spatial context). The
    kernel starts as the same map for every new sub-pixel / frame ("ICNR"), i.e. as nearest
    neighbour upsampling, which avoids the checkerboard that pixel-shuffle starts with otherwise.
    Temporal: frame 0 -> 1 frame, every other frame -> 2 frames.
    [B, T, H, W, C] -> [B, T', 2H, 2W, features], T' = 2T-1 if temporal else T.
    """
    features: int
    temporal: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        mult = 8 if self.temporal else 4
        x = CausalConv3d(self.features * mult, (1, 1, 1), dtype=self.dtype,
                         kernel_init=_icnr_init(mult), name="proj")(x)
        if self.temporal:
            x = unpair_frames(x)
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
    """video [B, F, H, W, 3] -> moments [B, T, H/s, W/s, 2 * latent_channels] (see CausalVAE)."""
    channels: tuple[int, ...]
    num_res_blocks: int
    latent_channels: int
    temporal_downsample: tuple[bool, ...]
    time_kernels: tuple[int, ...]
    patch_size: int
    norm_groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, video: jax.Array) -> jax.Array:
        x = space_to_depth(video.astype(self.dtype), self.patch_size)  # [B, F, H/p, W/p, 3p²]
        x = CausalConv3d(self.channels[0], (self.time_kernels[0], 3, 3), dtype=self.dtype,
                         name="conv_in")(x)
        for i, c in enumerate(self.channels):
            for r in range(self.num_res_blocks):
                x = ResBlock(self.time_kernels[i], self.norm_groups, self.dtype,
                             name=f"level{i}_res{r}")(x)
            if i + 1 < len(self.channels):
                x = Downsample(self.channels[i + 1], self.temporal_downsample[i], self.dtype,
                               name=f"level{i}_down")(x)
        x = nn.silu(make_norm(self.norm_groups, self.dtype, "norm_out")(x))
        return CausalConv3d(2 * self.latent_channels, (self.time_kernels[-1], 3, 3),
                            dtype=self.dtype, bias_init=_moments_bias_init(self.latent_channels),
                            name="conv_out")(x)


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
    """z [B, T, h, w, latent_channels] -> video [B, 1 + t(T-1), s*h, s*w, 3] (see CausalVAE)."""
    channels: tuple[int, ...]
    num_res_blocks: int
    temporal_downsample: tuple[bool, ...]
    time_kernels: tuple[int, ...]
    patch_size: int
    norm_groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        x = CausalConv3d(self.channels[-1], (self.time_kernels[-1], 3, 3), dtype=self.dtype,
                         name="conv_in")(z.astype(self.dtype))
        for i in reversed(range(len(self.channels))):
            for r in range(self.num_res_blocks):
                x = ResBlock(self.time_kernels[i], self.norm_groups, self.dtype,
                             name=f"level{i}_res{r}")(x)
            if i > 0:
                x = Upsample(self.channels[i - 1], self.temporal_downsample[i - 1], self.dtype,
                             name=f"level{i}_up")(x)
        x = nn.silu(make_norm(self.norm_groups, self.dtype, "norm_out")(x))
        x = CausalConv3d(3 * self.patch_size ** 2, (self.time_kernels[0], 3, 3), dtype=self.dtype,
                         name="conv_out")(x)
        return depth_to_space(x, self.patch_size)  # [B, F, H, W, 3]


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
      dtype: computation dtype; parameters are float32.

    Use through ``model.apply(params, x, method=CausalVAE.encode)`` / ``.decode`` or call it.
    """
    channels: tuple[int, ...] = (16, 32, 64)
    num_res_blocks: int = 1
    latent_channels: int = 16
    temporal_downsample: tuple[bool, ...] = (True, True)
    time_kernels: tuple[int, ...] = (1, 3, 3)
    patch_size: int = 2
    norm_groups: int = 8
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

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.channels) - 1)

    def encode(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """video: float [B, F, H, W, 3] in [-1, 1], F = 1 + 4k, H and W divisible by 8.

        Returns (mean, logvar), each float32 [B, 1+k, H/8, W/8, latent_channels]; logvar is
        clipped to [-30, 20]. (4 and 8 are `temporal_factor` and `spatial_factor`.)
        """
        t, s = self.temporal_factor, self.spatial_factor
        shape = tuple(video.shape)
        if video.ndim != 5 or shape[-1] != 3:
            raise ValueError(f"CausalVAE.encode: video shape {shape} must be [B, F, H, W, 3]")
        _, f, h, w, _ = shape
        if f < 1 or (f - 1) % t:
            raise ValueError(f"CausalVAE.encode: video shape {shape} has F={f} frames; "
                             f"need F = 1 + {t}k (1, {1 + t}, {1 + 2 * t}, ...)")
        if h % s or w % s:
            raise ValueError(f"CausalVAE.encode: video shape {shape} has H={h}, W={w}; "
                             f"both must be divisible by {s}")
        moments = self.encoder(video).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: jax.Array) -> jax.Array:
        """z: float [B, T, h, w, latent_channels] -> float32 [B, 1 + 4(T-1), 8h, 8w, 3].

        Unbounded output, trained towards [-1, 1]. Pixel frame 0 depends only on latent 0 and
        pixel frame f >= 1 only on latents 0..ceil(f/4).
        """
        shape = tuple(z.shape)
        if z.ndim != 5 or shape[-1] != self.latent_channels or shape[1] < 1:
            raise ValueError(f"CausalVAE.decode: latent shape {shape} must be "
                             f"[B, T>=1, h, w, {self.latent_channels}]")
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, video: jax.Array, sample_rng: jax.Array | None = None) -> dict[str, jax.Array]:
        """Encode, sample (if `sample_rng` is given; else z = mean) and decode.

        Returns dict(recon [B, F, H, W, 3], mean, logvar, z [B, T, H/8, W/8, C]), float32.
        """
        mean, logvar = self.encode(video)
        z = mean
        if sample_rng is not None:
            # Drawn flat: XLA:CPU takes ~10 s to compile a random draw of rank 5 (see _matrix_init).
            noise = jax.random.normal(sample_rng, (mean.size,), mean.dtype).reshape(mean.shape)
            z = mean + jnp.exp(0.5 * logvar) * noise
        return dict(recon=self.decode(z), mean=mean, logvar=logvar, z=z)


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
