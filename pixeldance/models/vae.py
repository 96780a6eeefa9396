"""Causal 3D convolutional video VAE (Flax Linen).

Axis letters (glossary: pixeldance/models/__init__.py): B batch, F pixel frames (``F = 1 + 4k``
at the default 4x temporal compression), T latent frames (``T = 1 + k``; inside the networks the
frames of the current level), H/W height/width (of pixels or of the current level), h/w latent
height/width, C channels, O a conv's output channels.

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
cache (the 'cache' variable collection, carried through `lax.scan`): `vae_inference.encode_chunked`
and `decode_chunked` equal `encode` / `decode` up to float rounding, in memory that does not grow
with the number of frames. `vae_inference.encode_tiled` / `decode_tiled` split large frames into
overlapping tiles and blend the seams with linear ramps; with the per-position norm
(``norm_groups=0``) a tile's interior is exact and only the blended overlaps differ from the
one-pass result. The conv primitives are in `causal_conv.py`, the GAN's discriminator in
`discriminator.py`, the perceptual loss's network in `perceptual.py`.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from pixeldance.models.causal_conv import (CausalConv3d, causal_conv, depth_to_space, pair_frames,
                                           space_to_depth, unpair_frames)
from pixeldance.models.discriminator import PatchDiscriminator3D

Dtype = Any

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


# ---------------------------------------------------------------------------------------------
# Blocks.
# ---------------------------------------------------------------------------------------------

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
    ``temporal_init``: 'copy' starts the two new frames equal too (nearest neighbour in time);
    'independent' draws each new frame's kernel on its own (still ICNR over the 4 sub-pixels),
    so the decoder does not start from (and, in a short run, stay near) "every latent's frames
    alike", the stepwise motion of issue 19.
    [B, T, H, W, C] -> [B, T', 2H, 2W, features], T' = 2T-1 if temporal else T
    (2T for a later chunk, ``first=False``).
    """
    features: int
    temporal: bool
    dtype: Dtype = jnp.float32
    temporal_init: str = "copy"

    @nn.compact
    def __call__(self, x: jax.Array, first: bool = True) -> jax.Array:
        mult = 8 if self.temporal else 4
        if self.temporal and self.temporal_init == "independent":
            init = _icnr_init(4, frames=2)
        elif self.temporal_init in ("copy", "independent"):
            init = _icnr_init(mult)
        else:
            raise ValueError(f"Upsample: temporal_init {self.temporal_init!r} must be 'copy' or 'independent'")
        x = CausalConv3d(self.features * mult, (1, 1, 1), dtype=self.dtype,
                         kernel_init=init, name="proj")(x)
        if self.temporal:
            x = unpair_frames(x, first)
        return depth_to_space(x, 2)


def _icnr_init(mult: int, base_init=nn.initializers.lecun_normal(), frames: int = 1):
    """Kernel init whose output channels are `mult` copies of one [.., C, O/mult] kernel.

    `unpair_frames` and `depth_to_space` read output channel ``m * O/mult + c`` as copy
    ``m`` (frame / sub-pixel) of channel ``c``, so tiling along the last axis makes every copy equal.
    ``frames > 1``: that many independent draws side by side, each tiled `mult` times
    (``O = frames * mult * O'``: `unpair_frames` reads the frame from the outermost block), i.e.
    ICNR over sub-pixels only, each new frame with its own kernel.
    """
    def init(key, shape, dtype=jnp.float32):
        # One [.., C, frames * O'] draw (one fan-in for all), each frame's block tiled `mult` times.
        base = base_init(key, tuple(shape[:-1]) + (shape[-1] // mult,), dtype)
        blocks = jnp.split(base, frames, axis=-1)
        return jnp.concatenate([jnp.tile(b, (1,) * (len(shape) - 1) + (mult,)) for b in blocks], axis=-1)
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
    temporal_upsample_init: str = "copy"

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
                             temporal_init=self.temporal_upsample_init, name=f"level{i}_up")(x, first)
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
      temporal_upsample_init: how the decoder's temporal upsamplers start (`Upsample`): 'copy'
        (default: each latent's frames start equal) or 'independent' (each new frame its own
        kernel). Initialisation only: same parameters and compute.
      disc_channels: widths of a `PatchDiscriminator3D` trained with the VAE (GAN loss); () for
        none. It lives in the same parameter tree so that a checkpoint is one train state and
        `load_vae` needs nothing else; encode and decode never run it.
      dtype: computation dtype; parameters are float32.

    Use through ``model.apply(params, x, method=CausalVAE.encode)`` / ``.decode`` or call it;
    `vae_inference.encode_chunked`, `decode_chunked`, `encode_tiled`, `decode_tiled` for long or
    large videos.
    """
    channels: tuple[int, ...] = (16, 32, 64)
    num_res_blocks: int = 1
    latent_channels: int = 16
    temporal_downsample: tuple[bool, ...] = (True, True)
    time_kernels: tuple[int, ...] = (1, 3, 3)
    patch_size: int = 2
    norm_groups: int = 8
    disc_channels: tuple[int, ...] = ()
    temporal_upsample_init: str = "copy"
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
        self.decoder = Decoder(temporal_upsample_init=self.temporal_upsample_init, **common)
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
            # Drawn flat: XLA:CPU takes ~10 s to compile a random draw of rank 5 (see causal_conv.matrix_init).
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
