"""The T5 v1.1 and umT5 text encoders (encoder stacks only), as frozen text encoders of the DiT.

Wan 2.1 conditions on umT5-XXL's per-token states, many image and video models on T5 v1.1 XXL's.
Both follow transformers' `T5EncoderModel` / `UMT5EncoderModel` (the parity reference,
tests/test_text_encoders.py) so that converted weights give the same `last_hidden_state`:

  - T5's LayerNorm is an RMS norm: no mean subtracted, no bias, computed in float32;
  - self-attention has no 1/sqrt(K) scaling (T5 folds it into the initialisation of q) and a
    learned bias per head and relative-position bucket added to the logits; the buckets are
    bidirectional, half of them exact for short distances, half logarithmic up to max_distance;
  - T5 learns one bias table, in layer 0, shared by every layer; umT5 one table per layer;
  - the feed-forward is gated (v1.1: act(x wi_0) * (x wi_1), then wo), `gelu_new` (GELU's tanh
    approximation) for both released models; the original T5's ungated ReLU is also supported;
  - no position embeddings, no embedding scaling, no biases anywhere; a final RMS norm.

  model = from_variant('umt5-xxl')                      or T5Encoder(**fields)
  model.apply(variables, ids, mask)                     -> float32 [B, S, D]

Inference only (no dropout). `dtype` is the compute dtype of the matmuls (float32 by default,
at HIGHEST precision: TPUs otherwise multiply float32 in bfloat16 passes and the states drift by
~1e-2; bfloat16 for speed); the residual stream, norms, softmax and the gate stay float32 and the
output is float32 either way. Parameters are created in `param_dtype` (float32 unless given).
Every parameter carries logical axis names (pixeldance/sharding.py) so umT5-XXL (5.7B
parameters) shards over 'fsdp' along 'embed' and over 'tensor' along 'mlp' and 'heads'.

Axis letters (glossary: pixeldance/models/__init__.py): B batch, S text tokens, M key length,
D width, N heads, K head width (T5's d_kv; N * K need not equal D), E MLP width. The number of
relative-position buckets has no letter: `num_buckets`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from pixeldance.models.layers import RMSNorm
from pixeldance.sharding import constrain

HIGHEST = jax.lax.Precision.HIGHEST

# Released sizes (the Hugging Face configs of google/t5-v1_1-xxl and google/umt5-xxl, the latter
# also Wan 2.1's text encoder), and tiny ones for tests. Both XXLs: 24 layers, 64 heads of 64,
# d_ff 10240; they differ in vocabulary and in umT5's per-layer position bias.
_XXL = dict(width=4096, layers=24, heads=64, head_width=64, mlp_width=10240, num_buckets=32, max_distance=128,
            eps=1e-6, act="gelu_new", gated=True)
_MU = dict(vocab_size=256, width=32, layers=2, heads=4, head_width=8, mlp_width=64, num_buckets=8, max_distance=20,
           eps=1e-6, act="gelu_new", gated=True)
VARIANTS = {
    "t5-v1_1-xxl": dict(_XXL, vocab_size=32128, per_layer_bias=False),
    "umt5-xxl": dict(_XXL, vocab_size=256384, per_layer_bias=True),
    "t5-mu": dict(_MU, per_layer_bias=False),
    "umt5-mu": dict(_MU, per_layer_bias=True),
}

# transformers' names (`dense_act_fn`): gelu_new and gelu_pytorch_tanh are both the tanh form.
ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def from_variant(name: str, **kw) -> "T5Encoder":
    """'t5-v1_1-xxl', 'umt5-xxl', 't5-mu' or 'umt5-mu' -> a T5Encoder (random weights until
    loaded); kw: dtype, param_dtype."""
    if name not in VARIANTS:
        raise ValueError(f"unknown T5 variant {name!r}; choose from {sorted(VARIANTS)}")
    return T5Encoder(**VARIANTS[name], **kw)


def relative_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """The bidirectional relative-position bucket of every (query s, key m) pair: int32
    [query_length, key_length] in [0, num_buckets).

    Keys after the query use the upper half of the buckets. In each half, distances below a
    quarter of num_buckets get a bucket each, longer ones share logarithmically wider buckets up
    to max_distance, and farther ones the last bucket. Computed in numpy at trace time (the
    lengths are static) with the float32 arithmetic of transformers' `_relative_position_bucket`,
    so distances on a bucket boundary round as theirs do.
    """
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]  # m - s
    half = num_buckets // 2
    out = np.where(relative > 0, half, 0)
    distance = np.abs(relative)
    exact = half // 2
    # log(0) never counts (those distances are exact); maximum() only keeps the warning away.
    ratio = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(exact))
    scaled = ratio / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
    large = np.minimum(exact + scaled.astype(np.int64), half - 1)
    return (out + np.where(distance < exact, distance, large)).astype(np.int32)


class _Dense(nn.Module):
    """Contracts the last `in_dims` axes of x with a bias-free kernel of shape in_shape + features
    (created in its final shape, so each axis has its logical name), in `dtype`, at HIGHEST
    precision when that is float32. pixeldance.models.layers.Dense takes no precision and no
    param_dtype, and always has the biases T5 has not."""
    features: Sequence[int]
    kernel_axes: Sequence[str | None]
    in_dims: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = tuple(self.features)
        in_shape = x.shape[x.ndim - self.in_dims:]
        n_in, n_out = math.prod(in_shape), math.prod(features)
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=tuple(range(self.in_dims)),
                                                out_axis=tuple(range(self.in_dims, self.in_dims + len(features))))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.kernel_axes)),
                            in_shape + features, self.param_dtype)
        precision = HIGHEST if jnp.dtype(self.dtype) == jnp.float32 else None
        # One 2D matmul: XLA:CPU runs multi-axis dot_generals as slow loops (layers.Dense).
        y = jnp.dot(x.astype(self.dtype).reshape(-1, n_in), kernel.astype(self.dtype).reshape(n_in, n_out),
                    precision=precision)
        return y.reshape(x.shape[:x.ndim - self.in_dims] + features)


class _Attention(nn.Module):
    """Unscaled multi-head self-attention with an additive relative-position bias."""
    heads: int
    head_width: int
    num_buckets: int
    max_distance: int
    has_bias_table: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, bias=None):
        """x: [B, S, D] (normalised); mask: bool [B, S], True for real tokens; bias: float32
        [N, S, M] from an earlier layer, used where this layer has no table of its own.
        Returns (float32 [B, S, D], the bias used)."""
        N, K, D = self.heads, self.head_width, x.shape[-1]
        dense = lambda features, axes, name, in_dims=1: _Dense(features, axes, in_dims, self.dtype,
                                                               self.param_dtype, name=name)
        q, k, v = (dense((N, K), ("embed", "heads", "kv"), n)(x) for n in "qkv")  # [B, S, N, K]
        q = constrain(q, ("batch", "text", "heads", "kv"))
        if self.has_bias_table:
            table = self.param("relative_bias", nn.with_logical_partitioning(
                nn.initializers.normal(D ** -0.5), (None, "heads")), (self.num_buckets, N), self.param_dtype)
            S = x.shape[1]
            buckets = relative_buckets(S, S, self.num_buckets, self.max_distance)  # [S, M]
            bias = jnp.take(table.astype(jnp.float32), jnp.asarray(buckets), axis=0).transpose(2, 0, 1)
        elif bias is None:
            raise ValueError("a T5 layer without its own position-bias table needs the bias of layer 0")
        precision = HIGHEST if jnp.dtype(self.dtype) == jnp.float32 else None
        logits = jnp.einsum("bsnk,bmnk->bnsm", q, k, precision=precision,
                            preferred_element_type=jnp.float32) + bias[None]  # [B, N, S, M]
        # The lowest float, not -inf: a row with no real key averages uniformly instead of giving
        # NaN (transformers adds the same value).
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        y = jnp.einsum("bnsm,bmnk->bsnk", probs, v, precision=precision)  # [B, S, N, K]
        out = dense((D,), ("heads", "kv", "embed"), "o", in_dims=2)(y)
        return out.astype(jnp.float32), bias


class _FeedForward(nn.Module):
    """Gated (T5 v1.1, umT5): wo(act(x wi_0) * (x wi_1)); ungated (T5 1.0): wo(act(x wi))."""
    mlp_width: int
    act: str
    gated: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x: [B, S, D] (normalised) -> float32 [B, S, D]."""
        dense = lambda features, axes, name: _Dense(features, axes, 1, self.dtype, self.param_dtype, name=name)
        act = ACTIVATIONS[self.act]
        if self.gated:
            # The activation and the gate in float32 (cheap next to the matmuls), then one rounding.
            h = act(dense((self.mlp_width,), ("embed", "mlp"), "wi_0")(x).astype(jnp.float32))
            h = h * dense((self.mlp_width,), ("embed", "mlp"), "wi_1")(x).astype(jnp.float32)
        else:
            h = act(dense((self.mlp_width,), ("embed", "mlp"), "wi")(x).astype(jnp.float32))
        h = constrain(h.astype(self.dtype), ("batch", "text", "mlp"))  # [B, S, E]
        return dense((x.shape[-1],), ("mlp", "embed"), "wo")(h).astype(jnp.float32)


class _Block(nn.Module):
    """x + attention(norm(x)), then x + feed_forward(norm(x)); the residual stream in float32."""
    heads: int
    head_width: int
    mlp_width: int
    num_buckets: int
    max_distance: int
    has_bias_table: bool
    eps: float
    act: str
    gated: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, bias=None):
        """x: float32 [B, S, D]; mask: bool [B, S]; bias: float32 [N, S, M] or None ->
        (float32 [B, S, D], the bias used)."""
        y = RMSNorm(dtype=self.dtype, scale_axis="norm", eps=self.eps, name="attn_norm")(x)
        y, bias = _Attention(self.heads, self.head_width, self.num_buckets, self.max_distance, self.has_bias_table,
                             self.dtype, self.param_dtype, name="attn")(y, mask, bias)
        x = constrain(x + y, ("batch", "text", "embed"))
        y = RMSNorm(dtype=self.dtype, scale_axis="norm", eps=self.eps, name="mlp_norm")(x)
        y = _FeedForward(self.mlp_width, self.act, self.gated, self.dtype, self.param_dtype, name="mlp")(y)
        return constrain(x + y, ("batch", "text", "embed")), bias


class T5Encoder(nn.Module):
    """Token ids -> per-token states after the final norm (transformers' last_hidden_state).

    per_layer_bias: False for T5 / mT5 (one relative-position bias table, in layer 0, used by
      every layer), True for umT5 (a table in each layer).
    act, gated: transformers' `dense_act_fn` and `is_gated_act` (both from `feed_forward_proj`,
      e.g. 'gated-gelu' -> 'gelu_new', gated).
    """
    vocab_size: int
    width: int
    layers: int
    heads: int
    head_width: int
    mlp_width: int
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    act: str = "gelu_new"
    gated: bool = True
    per_layer_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids, mask):
        """ids: int32 [B, S]; mask: int32/bool [B, S], nonzero for real tokens -> float32 [B, S, D].

        Padded positions get states too (their queries see the real tokens), as transformers'
        do; callers that want zeros there multiply by the mask.
        """
        if self.act not in ACTIVATIONS:
            raise ValueError(f"unknown T5 activation {self.act!r}; choose from {sorted(ACTIVATIONS)}")
        embedding = self.param("token_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("vocab", "embed")), (self.vocab_size, self.width), self.param_dtype)
        x = jnp.take(embedding, ids, axis=0).astype(jnp.float32)  # [B, S, D]
        x = constrain(x, ("batch", "text", "embed"))
        mask = jnp.asarray(mask) != 0
        bias = None
        for i in range(self.layers):
            x, bias = _Block(self.heads, self.head_width, self.mlp_width, self.num_buckets, self.max_distance,
                             self.per_layer_bias or i == 0, self.eps, self.act, self.gated, self.dtype,
                             self.param_dtype, name=f"layers_{i}")(x, mask, bias)
        return RMSNorm(dtype=jnp.float32, scale_axis="norm", eps=self.eps, name="final_norm")(x)


def init_inputs(batch: int = 1, length: int = 8) -> dict:
    """Example inputs of `T5Encoder.init` (the parameters do not depend on their shape)."""
    return dict(ids=jnp.zeros((batch, length), jnp.int32), mask=jnp.ones((batch, length), jnp.int32))


def abstract_variables(model: T5Encoder, *, boxed: bool = False) -> dict:
    """{'params': tree of ShapeDtypeStruct} of `model`, nothing computed; `boxed` keeps the
    `nn.Partitioned` logical names (for `sharding.tree_shardings`)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), **init_inputs()))
    return {"params": shapes["params"] if boxed else nn.unbox(shapes["params"])}
