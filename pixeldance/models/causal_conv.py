"""Causal 3D convolutions and the space/time rearrangements both video VAEs are built from.

`CausalConv3d` (pixeldance's own VAE: time padded with copies of frame 0) and the Wan 2.1 VAE's
convs (`wan_vae.CausalConv`: zero padding) compute through `causal_conv`, one 2D conv per time tap
that skips the products with the padding; `conv_frames` is the 2D conv over every frame. The
chunked passes of `vae_inference` carry each conv's last input frames in the 'cache' variable
collection (`caching`).

Axis letters (glossary: pixeldance/models/__init__.py): B batch, F pixel frames (the
rearrangements at a VAE's input and output), T frames (of whatever level the conv runs at), H/W
height/width, C channels (a conv's input channels), O a conv's output channels, kt time taps.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from pixeldance.models import attention_kernels

Dtype = Any

CONV_KERNEL_AXES = (None, None, None, "conv_in", "conv_out")


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
    x = x.transpose(0, 1, 3, 4, 2, 5)  # [B, T/2, H, W, 2, C]
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
# Causal convolutions.
# ---------------------------------------------------------------------------------------------

class CausalConv3d(nn.Module):
    """3D convolution, causal in time and 'SAME' in space.

    Time is padded on the left only with ``kt - 1`` copies of the first frame, so output frame
    ``t`` sees input frames ``t-kt+1 .. t`` and frame 0 sees only itself. Spatial padding is zeros.

    Chunked passes (the 'cache' collection mutable): the cache holds the last ``kt - 1`` input
    frames, [B, kt-1, H, W, C]. A chunk with ``first=True``
    starts a video (padding as above); a later chunk reads its past from the cache instead, so
    the chunks together compute exactly the one-pass convolution and nothing twice.

    Attributes:
      features: output channels.
      kernel_size: (kt, kh, kw); kh and kw odd.
    Input ``[B, T, H, W, C]`` -> output ``[B, T, H, W, features]``.
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
            "kernel", nn.with_logical_partitioning(matrix_init(self.kernel_init), CONV_KERNEL_AXES),
            (kt, kh, kw, c_in, self.features), self.param_dtype)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        if kt > 1 and caching(self):
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


def matrix_init(init):
    """Runs a kernel initialiser on the [kt*kh*kw*C, O] matrix and reshapes the result.

    Same fan-in and distribution as on the 5D shape, but XLA:CPU takes ~10 s to compile one
    random draw of rank >= 4 (and well under a second for rank 2), which made `jax.jit(init)`
    of even the tiny model take a minute.
    """
    def init_matrix(key, shape, dtype=jnp.float32):
        return init(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)
    return init_matrix


def caching(module: nn.Module) -> bool:
    """True in a chunked pass: the 'cache' collection is mutable (and this is not `init`)."""
    return module.is_mutable_collection("cache") and not module.is_initializing()


# Frames of at least this many values (H * W * channels, input or output) are convolved one at a
# time on the CPU: XLA:CPU's conv batched over frames ran 66 GFLOP/s on 17 frames of 128² x 96
# channels and 81 on 64² x 192, one frame at a time 79 and 92; from 32² x 384 down both ran at
# the core's matmul rate (one thread, this repository's CPU).
CPU_PER_FRAME_MIN_VALUES = 1 << 19


def _per_frame(x_shape, kernel_shape) -> bool:
    """Whether a conv of frames x [B, T, H, W, C] with kernel [..., C, O] loops over T."""
    _, t, h, w, c_in = x_shape
    return (t > 1 and h * w * max(c_in, kernel_shape[-1]) >= CPU_PER_FRAME_MIN_VALUES
            and attention_kernels.target_platform() == "cpu")


def conv_frames(x: jax.Array, kernel: jax.Array, strides=(1, 1), padding="SAME",
                per_frame: bool | None = False) -> jax.Array:
    """A 2D conv applied to every frame: x [B, T, H, W, C], kernel [kh, kw, C, O]
    -> [B, T, H', W', O]; 'SAME' is zero padding in space, else `padding` as for `lax.conv`.

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

    x [B, T, H, W, C], kernel [kt, kh, kw, C, O] -> [B, T, H, W, O]. Tap a
    (kernel[a]) of output frame t reads input frame ``t - (kt-1) + a``. Before frame 0 the input
    is `past` ([B, kt-1, H, W, C]: a chunk's cache) or, without it, padding: 'first' (copies
    of frame 0) or 'zeros'. The products with padding are not computed: zeros are skipped, and
    for copies of frame 0 the tap's output on frame 0 is repeated. So the one-pass conv costs
    ``kt*T - (kt-1)`` frame convs, not ``kt*T``; each is a plain 2D conv with O outputs,
    which XLA:CPU ran 20-30 % faster than one conv with kt*O outputs plus a shifted sum.
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
    frames = jnp.moveaxis(frames, 1, 0)  # [T', B, H, W, C]

    def one(i):
        taps = [lax.dynamic_index_in_dim(frames, i + offset + a, keepdims=True) for a in range(kt)]
        return sum(conv_frames(jnp.moveaxis(f, 0, 1), kernel[a])[:, 0]
                   for a, f in enumerate(taps))

    y = jnp.moveaxis(lax.map(one, jnp.arange(first, t)), 0, 1)  # [B, T - first, H, W, O]
    return y if head is None else jnp.concatenate([head, y], axis=1)
