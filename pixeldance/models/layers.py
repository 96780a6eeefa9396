"""Layers shared by the transformer models, with logical axis names on every parameter.

Axis letters: the glossary in pixeldance/models/__init__.py; logical axis names: pixeldance/sharding.py.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn


def _flat_init(init, in_dims: int):
    """`init` run on the kernel as a [inputs, outputs] matrix, reshaped to the kernel's shape.

    The same values as drawing the N-D shape with the input axes as fan-in and the rest as
    fan-out (the random bits come flat either way; tested bit for bit), but XLA:CPU compiles a
    rank-2 draw in a third of the time of a rank-4 one: the DiT's jitted initialisation compiled
    in 3.1 s instead of 4.2 (the same trick as `causal_conv.matrix_init`).
    """
    def init_flat(key, shape, dtype=jnp.float32):
        matrix = (math.prod(shape[:in_dims]), math.prod(shape[in_dims:]))
        return init(key, matrix, dtype).reshape(shape)
    return init_flat


class Dense(nn.Module):
    """Contracts the last `in_dims` axes of x with a kernel of shape in_shape + features.

    Parameters are float32 whatever `dtype` is; they are cast to `dtype` (the compute dtype,
    e.g. bfloat16) at use, so the optimizer updates float32 master weights.

    Unlike flax's DenseGeneral (which initialises a flat kernel and reshapes it), the kernel is
    created in its final shape, so logical names apply per axis (e.g. ('embed', 'heads', 'kv')).
    kernel_axes: logical names of the kernel's axes (inputs then outputs).

    LoRA: when the parameters hold 'lora_a' [*in, R] and 'lora_b' [R, *out] beside the kernel
    (`lora.attach`, training a LoRA fine-tune; never created here), the output adds the side path
    (x A) B, so the update is trained without a merged copy of the kernel (models/lora.py).
    """
    features: Sequence[int] | int
    kernel_axes: Sequence[str | None]
    in_dims: int = 1
    use_bias: bool = True
    zero_init: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        in_shape = x.shape[x.ndim - self.in_dims:]
        if len(self.kernel_axes) != self.in_dims + len(features):
            raise ValueError(f"kernel_axes {self.kernel_axes} do not match {in_shape} -> {features}")
        if self.zero_init:
            init = nn.initializers.zeros_init()
        else:
            init = _flat_init(nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"), self.in_dims)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.kernel_axes)),
                            in_shape + features)
        # As one 2D matmul: XLA:CPU runs multi-axis dot_generals (and their gradients) as slow
        # loops, while [rows, in] @ [in, out] hits its GEMM kernel (measured 10x on the backward).
        n_in, n_out = math.prod(in_shape), math.prod(features)
        x2 = x.astype(self.dtype).reshape(-1, n_in)
        y = jnp.dot(x2, kernel.astype(self.dtype).reshape(n_in, n_out))
        if self.has_variable("params", "lora_a"):
            a, b = self.get_variable("params", "lora_a"), self.get_variable("params", "lora_b")
            rank = a.shape[-1]
            h = jnp.dot(x2, a.astype(self.dtype).reshape(n_in, rank))  # [rows, R]
            y = y + jnp.dot(h, b.astype(self.dtype).reshape(rank, n_out))
        y = y.reshape(x.shape[:x.ndim - self.in_dims] + features)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                   tuple(self.kernel_axes[self.in_dims:])), features)
            y = y + bias.astype(self.dtype)
        return y


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, computed in float32, with logically named scale/bias.

    With `shift` and `scale` (adaLN modulation, broadcastable to x) the result is
    `norm(x) * (1 + scale) + shift`, also in float32, before the cast to `dtype`: one fused pass,
    and no bfloat16 rounding between normalising and modulating.
    """
    use_scale: bool = True
    use_bias: bool = True
    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, shift=None, scale=None):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        d = x.shape[-1]
        if self.use_scale:
            y = y * self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (d,))
        if self.use_bias:
            y = y + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (d,))
        if scale is not None:
            y = y * (1.0 + scale.astype(jnp.float32))
        if shift is not None:
            y = y + shift.astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """RMS norm over the last axis in float32 (QK-normalisation); the scale's axis is named."""
    dtype: Any = jnp.float32
    scale_axis: str | None = "kv"
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.scale_axis,)),
                           (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale).astype(self.dtype)
