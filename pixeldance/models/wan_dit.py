"""The Wan 2.1 video DiT (diffusers' `WanTransformer3DModel`) in Flax, and its loader.

  dit = load_dit(DIR)        # a folder written by `python -m pixeldance.convert.wan_dit`
  v = dit.predict(latents, timesteps, text_states, text_mask=None)

  latents      float32 [B, T, h, w, C]   channels-last video latents (the Wan VAE's, normalised)
  timesteps    float   [B]               diffusers' units: 0 (clean) .. 1000 (pure noise)
  text_states  float   [B, S, D_text]    umT5 states (4096 wide for the released checkpoints)
  text_mask    bool    [B, S] or None    None: every text token is attended to, as diffusers does
  returns      float32 [B, T, h, w, C_out]  the network output (Wan's flow velocity)

Wan's pipeline attends to all 512 text positions, those past a prompt's end holding zero states
(not a mask); to reproduce it pass such states with text_mask=None. A mask instead hides the
padded positions from the cross-attention, which diffusers' model has no argument for.

The network, as diffusers 0.36 computes it (`models/transformers/transformer_wan.py`):
  patch embedding  a Conv3d whose kernel equals its stride (1, 2, 2): a Dense over each patch
  condition        sinusoidal features of the timestep (cos first, frequencies
                   exp(-ln(10000) i / (F/2))), time MLP (SiLU) -> temb [B, D], and
                   time_proj(SiLU(temb)) -> the six modulations of every block [B, 6, D];
                   text MLP (tanh-GELU) D_text -> D
  blocks           x + gate1 * SelfAttn(LN(x) * (1 + scale1) + shift1)  (RMSNorm over the whole
                   q / k width, 3D RoPE on interleaved pairs), x + CrossAttn(LN_affine(x), text),
                   x + gate2 * FFN(LN(x) * (1 + scale2) + shift2)  (tanh-GELU); shift / scale / gate
                   = the block's scale_shift_table + the six modulations
  output           LN(x) * (1 + scale) + shift with (shift, scale) = scale_shift_table + temb (no
                   SiLU), a Dense to the patch's pixels, unpatchify
  3D RoPE          the head width K split into t: K - 2 * 2(K // 6), h, w: 2(K // 6) each; per
                   part d frequencies theta^(-2i / d), theta = 10000, tables in float64 then
                   float32 as diffusers; position p of the frame / row / column patch index

Precision. Norms, modulation, RoPE, the timestep embedding and MLP, the patch embedding, the
output norm and projection always run in float32; `dtype` is the compute dtype of the text MLP
and the blocks' matmuls and attention (bfloat16 halves their memory and time), and the residual
stream between blocks is in `dtype` as in diffusers. `WanDiT.predict` in float32 runs every
matmul at HIGHEST precision (`jax.default_matmul_precision`: TPUs otherwise multiply float32 in
bfloat16 passes).

Parameters (`params/...`; the scanned blocks carry a leading 'layers' axis of length num_layers):
  patch_embedding/kernel [pt, ph, pw, C_in, D], bias [D]   the input channels C_in are one axis
                         of their own: widening the input (extra zero-initialised channels) is a
                         concatenate along axis 3
  time_embedder/linear_1, linear_2    kernel [F, D], [D, D]
  time_proj/kernel [D, 6, D], bias [6, D]
  text_embedder/linear_1, linear_2    kernel [D_text, D], [D, D]
  blocks/scale_shift_table [L, 6, D]  (shift1, scale1, gate1, shift2, scale2, gate2)
  blocks/attn1|attn2/to_q|to_k|to_v/kernel [L, D, N, K], bias [L, N, K]
  blocks/attn1|attn2/to_out/kernel [L, N, K, D], bias [L, D]
  blocks/attn1|attn2/norm_q|norm_k/scale [L, N, K]
  blocks/norm2/scale, bias [L, D]     (with cross_attn_norm)
  blocks/ffn/proj_in/kernel [L, D, E], blocks/ffn/proj_out/kernel [L, E, D] (and biases)
  scale_shift_table [2, D], proj_out/kernel [D, pt, ph, pw, C_out], bias [pt, ph, pw, C_out]
Logical axis names: 'embed' on D, 'heads' on N, 'kv' on K, 'mlp' on E (and the time MLP's
outputs), 'norm' on norm and modulation tables, 'layers' on the stacked axis (sharding.py's
glossary), so preset 'fsdp_tensor' splits the 14B over fsdp and tensor.

A converted folder (format pixeldance/models/weights.py):
  config.json  {"network": "wan_dit", "dit": {the fields of `WanTransformer`'s architecture},
               "dtype": default compute dtype, "source", "sha256"}
  params.safetensors  the parameters above, float32, flattened with '/'

Axis letters (glossary: pixeldance/models/__init__.py): B batch, T latent frames, h/w latent
height/width, C channels, L video tokens, S text tokens, D width, N heads, K head width, E MLP
width; F the timestep features (freq_dim) where a shape needs them.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from pixeldance import sharding
from pixeldance.models import attention as attn_lib
from pixeldance.models import weights
from pixeldance.models.dit import CONTEXT_PARALLEL, REMAT_POLICIES
from pixeldance.models.layers import Dense, LayerNorm
from pixeldance.sharding import constrain

NETWORK = "wan_dit"
ORIGIN = ("python -m pixeldance.convert.wan_dit --input=<diffusers WanTransformer3DModel folder, or the Wan "
          "diffusers repository root> --output=DIR")
ROPE_THETA = 10_000.0
MAX_PERIOD = 10_000.0  # of the sinusoidal timestep features
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# The architecture fields of `WanTransformer` (a folder's config.json "dit" entry).
_WAN21 = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
              cross_attn_norm=True, eps=1e-6, rope_max_seq_len=1024, head_dim=128)
# The released checkpoints' diffusers configs (Wan-AI/Wan2.1-T2V-*-Diffusers, transformer/), and
# a tiny one for tests.
WAN_DIT_CONFIGS = {
    "wan2.1-t2v-1.3b": dict(_WAN21, num_heads=12, ffn_dim=8960, num_layers=30),
    "wan2.1-t2v-14b": dict(_WAN21, num_heads=40, ffn_dim=13824, num_layers=40),
    "tiny": dict(patch_size=(1, 2, 2), in_channels=4, out_channels=4, text_dim=32, freq_dim=32,
                 cross_attn_norm=True, eps=1e-6, rope_max_seq_len=32, head_dim=16, num_heads=4,
                 ffn_dim=64, num_layers=2),
}
FIELDS = tuple(sorted(WAN_DIT_CONFIGS["tiny"]))


def config(name: str) -> dict:
    """The architecture fields of a named config (`WAN_DIT_CONFIGS`)."""
    if name not in WAN_DIT_CONFIGS:
        raise ValueError(f"unknown Wan DiT config {name!r}; choose from {sorted(WAN_DIT_CONFIGS)}")
    return dict(WAN_DIT_CONFIGS[name])


# ----------------------------------------------------------------------------------------------
# Embeddings.

def timestep_features(t, dim: int):
    """t: float [B] in diffusers' units (0..1000) -> float32 [B, dim]: [cos, sin] of t times
    exp(-ln(10000) i / (dim/2)), i < dim/2 (diffusers' Timesteps with flip_sin_to_cos=True,
    downscale_freq_shift=0); an odd dim gets a zero last column."""
    half = dim // 2
    freqs = jnp.exp(-math.log(MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    out = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(out, ((0, 0), (0, dim % 2)))


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Wan's share of the head width K among the (t, h, w) axes: h = w = 2 (K // 6), t the rest."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_tables(grid: tuple[int, int, int], head_dim: int, max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) float32 [L, K/2] for a (T, h, w) grid of patches, one angle per pair of
    channels (2i, 2i+1): the (t, h, w) parts' angles side by side. Computed in float64 with numpy
    (the grid is static), as diffusers does before its cast to float32."""
    if max(grid) > max_seq_len:
        raise ValueError(f"patch grid {grid} exceeds rope_max_seq_len {max_seq_len} along an axis")
    angles = []
    for axis, d in enumerate(rope_split(head_dim)):
        freqs = 1.0 / ROPE_THETA ** (np.arange(0, d, 2, dtype=np.float64) / d)  # [d/2]
        shape = [1, 1, 1, d // 2]
        shape[axis] = grid[axis]
        per_axis = (np.arange(grid[axis], dtype=np.float64)[:, None] * freqs).reshape(shape)
        angles.append(np.broadcast_to(per_axis, (*grid, d // 2)))
    angles = np.concatenate(angles, axis=-1).reshape(-1, head_dim // 2)  # [L, K/2]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x, cos, sin):
    """x: [B, L, N, K] -> x with each pair (x[2i], x[2i+1]) rotated by the angle of i, computed
    in float32 and returned in x's dtype. cos, sin: [L, K/2]."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]                       # [B, L, N, K/2]
    cos, sin = cos[None, :, None], sin[None, :, None]
    out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# The block.

_QKV_AXES = ("batch", "length", "heads", "kv")


class HeadsRMSNorm(nn.Module):
    """RMS norm over the heads and head width together (Wan's 'rms_norm_across_heads': the
    statistics of the whole q or k vector, not per head), in float32. x: [B, L, N, K]."""
    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("heads", "kv")),
                           x.shape[-2:])
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=(-2, -1), keepdims=True) + self.eps)
        return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


class MLP(nn.Module):
    """linear_2(act(linear_1(x))): the time and text embedders. x: [..., I] -> [..., D] in `dtype`."""
    width: int
    act: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = Dense(self.width, (None, "embed"), dtype=self.dtype, name="linear_1")(x)
        return Dense(self.width, ("embed", "mlp"), dtype=self.dtype, name="linear_2")(self.act(y))


class FeedForward(nn.Module):
    """proj_out(tanh-GELU(proj_in(x))): the block's FFN. x: [B, L, D] -> [B, L, D] in `dtype`."""
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = Dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="proj_in")(x)
        # The hidden activations carry dit.py's name, for its 'mlp' remat policy.
        y = jax.ad_checkpoint.checkpoint_name(constrain(y, ("batch", "length", "mlp")), "mlp_hidden")
        y = jax.ad_checkpoint.checkpoint_name(nn.gelu(y, approximate=True), "mlp_hidden")
        return Dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="proj_out")(y)


class WanAttention(nn.Module):
    """Self-attention (context None: RoPE on q and k) or cross-attention to `context`, with
    q / k normalised over their whole width. x: [B, L, D]; context: [B, S, D] -> [B, L, D]."""
    num_heads: int
    head_dim: int
    eps: float = 1e-6
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    context_parallel: str = "ulysses"

    @nn.compact
    def __call__(self, x, context=None, rope=None, key_mask=None):
        N, K, D = self.num_heads, self.head_dim, x.shape[-1]
        proj = lambda name: Dense((N, K), ("embed", "heads", "kv"), dtype=self.dtype, name=name)
        source = x if context is None else context
        q = HeadsRMSNorm(self.eps, self.dtype, name="norm_q")(proj("to_q")(x))       # [B, L, N, K]
        k = HeadsRMSNorm(self.eps, self.dtype, name="norm_k")(proj("to_k")(source))  # [B, M, N, K]
        v = proj("to_v")(source)
        if context is None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            # Only the self-attention q is constrained, as in dit.py (more constraints made XLA's
            # CPU collectives deadlock there).
            q = constrain(q, _QKV_AXES)
            y = attn_lib.dot_product_attention(q, k, v, implementation=self.attention_impl,
                                               context_parallel=self.context_parallel)
        else:
            y = attn_lib.dot_product_attention(q, k, v, key_mask=key_mask, implementation=self.attention_impl)
        return Dense(D, ("heads", "kv", "embed"), in_dims=2, dtype=self.dtype, name="to_out")(y)


class WanBlock(nn.Module):
    """One Wan block (see the module docstring). x: [B, L, D] in `dtype`; mods: float32 [B, 6, D];
    rope: ([L, K/2], [L, K/2]); text: [B, S, D]; text_mask: bool [B, S] or None."""
    num_heads: int
    head_dim: int
    ffn_dim: int
    cross_attn_norm: bool = True
    eps: float = 1e-6
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    context_parallel: str = "ulysses"

    @nn.compact
    def __call__(self, x, mods, rope, text, text_mask):
        D = self.num_heads * self.head_dim
        table = self.param("scale_shift_table", nn.with_logical_partitioning(
            lambda key, shape: jax.random.normal(key, shape) / D ** 0.5, (None, "norm")), (6, D))
        mods = table[None].astype(jnp.float32) + mods                                 # [B, 6, D]
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mods, 6, axis=1)    # [B, 1, D]
        ln = lambda name: LayerNorm(use_scale=False, use_bias=False, eps=self.eps, dtype=self.dtype, name=name)
        attention = lambda name: WanAttention(self.num_heads, self.head_dim, self.eps, self.dtype,
                                              self.attention_impl, self.context_parallel, name=name)
        # The gated residual adds run in float32 and round once, as diffusers' do.
        gated = lambda x, y, gate: (x.astype(jnp.float32) + y.astype(jnp.float32) * gate).astype(self.dtype)

        y = attention("attn1")(ln("norm1")(x, shift1, scale1), rope=rope)
        x = constrain(gated(x, y, gate1), ("batch", "length", "embed"))

        y = LayerNorm(eps=self.eps, dtype=self.dtype, name="norm2")(x) if self.cross_attn_norm else x
        x = x + attention("attn2")(y, context=text, key_mask=text_mask).astype(self.dtype)

        y = FeedForward(self.ffn_dim, self.dtype, name="ffn")(ln("norm3")(x, shift2, scale2))
        return constrain(gated(x, y, gate2), ("batch", "length", "embed")), None


# ----------------------------------------------------------------------------------------------
# The model.

class WanTransformer(nn.Module):
    """diffusers' WanTransformer3DModel on channels-last latents (see the module docstring).

    Architecture fields (`WAN_DIT_CONFIGS`): patch_size (pt, ph, pw); in_channels / out_channels
    C_in / C_out; num_heads N, head_dim K (width D = N K); ffn_dim E; num_layers; text_dim D_text;
    freq_dim F; cross_attn_norm (affine LayerNorm before the cross-attention); eps of every norm;
    rope_max_seq_len (the longest patch grid axis RoPE covers, diffusers' table length).
    Options: dtype (compute dtype of the text MLP and the blocks), remat (a dit.REMAT_POLICIES
    name, for training), attention_impl (None: per backend), context_parallel ('ulysses' | 'ring'
    under preset 'fsdp_context').

    __call__(latents [B, T, h, w, C_in], timesteps [B] (0..1000), text [B, S, D_text],
    text_mask bool [B, S] | None) -> float32 [B, T, h, w, C_out].
    """
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 16
    out_channels: int = 16
    num_heads: int = 12
    head_dim: int = 128
    ffn_dim: int = 8960
    num_layers: int = 30
    text_dim: int = 4096
    freq_dim: int = 256
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    dtype: Any = jnp.float32
    remat: str = "none"
    attention_impl: str | None = None
    context_parallel: str = "ulysses"

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @nn.compact
    def __call__(self, latents, timesteps, text, text_mask=None):
        B, T, h, w, C = latents.shape
        pt, ph, pw = self.patch_size
        if C != self.in_channels:
            raise ValueError(f"latents have {C} channels, the network takes {self.in_channels}")
        if T % pt or h % ph or w % pw:
            raise ValueError(f"latent shape {latents.shape} is not divisible by patch size {self.patch_size}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; choose from {sorted(REMAT_POLICIES)}")
        if self.context_parallel not in CONTEXT_PARALLEL:
            raise ValueError(f"unknown context_parallel {self.context_parallel!r}; choose from {CONTEXT_PARALLEL}")
        grid = (T // pt, h // ph, w // pw)
        D = self.width
        f32 = jnp.float32
        dense = lambda features, axes, name, dtype=f32, in_dims=1: Dense(features, axes, in_dims=in_dims,
                                                                         dtype=dtype, name=name)

        # Patches [B, L, pt, ph, pw, C], tokens in (t, h, w) order as diffusers' flatten.
        x = latents.astype(f32).reshape(B, grid[0], pt, grid[1], ph, grid[2], pw, C)
        x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(B, -1, pt, ph, pw, C)
        x = dense(D, (None, None, None, None, "embed"), "patch_embedding", in_dims=4)(x).astype(self.dtype)
        x = constrain(x, ("batch", "length", "embed"))                                # [B, L, D]

        # Conditions: temb [B, D], the blocks' modulations [B, 6, D] (float32), text [B, S, D].
        features = timestep_features(jnp.asarray(timesteps), self.freq_dim)
        temb = MLP(D, nn.silu, jnp.float32, name="time_embedder")(features)
        mods = dense((6, D), ("embed", None, "mlp"), "time_proj")(nn.silu(temb))
        text_h = MLP(D, lambda y: nn.gelu(y, approximate=True), self.dtype, name="text_embedder")(text)

        rope = tuple(jnp.asarray(a) for a in rope_tables(grid, self.head_dim, self.rope_max_seq_len))
        block = WanBlock
        if self.remat != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        # One compiled block body, iterated: compile time independent of depth.
        blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast,) * 4, length=self.num_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = blocks(self.num_heads, self.head_dim, self.ffn_dim, self.cross_attn_norm, self.eps, self.dtype,
                      self.attention_impl, self.context_parallel, name="blocks")(x, mods, rope, text_h, text_mask)

        # Output: modulated norm (the table plus temb itself, no SiLU), projection, unpatchify.
        table = self.param("scale_shift_table", nn.with_logical_partitioning(
            lambda key, shape: jax.random.normal(key, shape) / D ** 0.5, (None, "norm")), (2, D))
        shift, scale = jnp.split(table[None] + temb[:, None], 2, axis=1)               # [B, 1, D]
        x = LayerNorm(use_scale=False, use_bias=False, eps=self.eps, dtype=f32, name="norm_out")(x, shift, scale)
        x = dense((pt, ph, pw, self.out_channels), ("embed", None, None, None, None), "proj_out")(x)
        x = x.reshape(B, *grid, pt, ph, pw, self.out_channels).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return x.reshape(B, T, h, w, self.out_channels).astype(f32)


class WanVideo(nn.Module):
    """A WanTransformer as the video DiT of `dit.PixelDanceModel` (config.dit.family = 'wan'):
    (x, t, c_image, c_mask, text, text_mask) -> the velocity [B, T, h, w, C], as `dit.VideoDiT`.

    x, c_image [B, T, h, w, C]; c_mask [B, T, h, w, 1]; t [B] flow time in [0, 1] (Wan's
    x_t = (1 - t) x0 + t eps and velocity eps - x0, the 'flow' objective here), passed as
    1000 t; text [B, S, D_text] a frozen encoder's states, text_mask bool [B, S].

    widen: PixelDance's image instructions enter by channel concatenation, [x, c_image, c_mask]:
    the transformer's in_channels is then 2C + 1, and a text-to-video checkpoint is widened with
    zero input weights (`widen_params`) so that it computes exactly what it did. False: the
    text-to-video network, which ignores c_image and c_mask.
    mask_text: False (Wan's own convention, which its checkpoints were trained with) zeroes the
    states past each prompt's end and attends to every position; True hides them with a key mask.
    """
    transformer: WanTransformer
    widen: bool = True
    mask_text: bool = False

    def __call__(self, x, t, c_image, c_mask, text, text_mask):
        inputs = jnp.concatenate([x, c_image, c_mask.astype(x.dtype)], axis=-1) if self.widen else x
        if not self.mask_text:
            text = text * text_mask[..., None].astype(text.dtype)
        return self.transformer(inputs, 1000.0 * t, text, text_mask if self.mask_text else None)


def widen_params(params: dict, extra: int) -> dict:
    """A text-to-video WanTransformer's parameters with `extra` more input channels whose
    patch-embedding weights are zero (the conditioning channels of `WanVideo(widen=True)`): the
    widened network's output equals the original's for any values in them. params: the
    transformer's {'patch_embedding': {'kernel' [pt, ph, pw, C, D], ...}, ...}."""
    kernel = params["patch_embedding"]["kernel"]
    zeros = jnp.zeros(kernel.shape[:3] + (extra,) + kernel.shape[4:], kernel.dtype)
    embedding = dict(params["patch_embedding"], kernel=jnp.concatenate([kernel, zeros], axis=3))
    return dict(params, patch_embedding=embedding)


def model_from_config(fields: dict, *, dtype=jnp.float32, remat: str = "none", attention_impl: str | None = None,
                      context_parallel: str = "ulysses", where: str = "") -> WanTransformer:
    """The `WanTransformer` of architecture `fields` (a named config's or a folder's "dit" entry)."""
    unknown, missing = sorted(set(fields) - set(FIELDS)), sorted(set(FIELDS) - set(fields))
    if unknown:
        raise weights.WeightsError(f"{where}: unknown Wan DiT field(s) {unknown}; the fields are {list(FIELDS)}")
    if missing:
        raise weights.WeightsError(f"{where}: Wan DiT field(s) {missing} missing")
    return WanTransformer(**dict(fields, patch_size=tuple(fields["patch_size"])), dtype=dtype, remat=remat,
                          attention_impl=attention_impl, context_parallel=context_parallel)


def init_inputs(model: WanTransformer) -> tuple:
    """The smallest example inputs of `model.init`: one patch, one text token."""
    pt, ph, pw = model.patch_size
    return (jnp.zeros((1, pt, ph, pw, model.in_channels), jnp.float32), jnp.zeros((1,), jnp.float32),
            jnp.zeros((1, 1, model.text_dim), jnp.float32))


def boxed_params(model: WanTransformer) -> dict:
    """The parameters as ShapeDtypeStructs in `nn.Partitioned` boxes (logical names); nothing computed."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *init_inputs(model)))["params"]


def abstract_params(fields: dict) -> dict:
    """Flat {path: ShapeDtypeStruct} of the float32 parameters of architecture `fields` (what a
    converter must write), e.g. {('blocks', 'attn1', 'to_q', 'kernel'): [L, D, N, K]}."""
    return traverse_util.flatten_dict(nn.unbox(boxed_params(model_from_config(fields))))


def _dtype(value, where: str):
    """None -> None; 'float32' / 'bfloat16' or such a dtype -> that jnp dtype; else WeightsError."""
    if value is None:
        return None
    name = value if isinstance(value, str) else jnp.dtype(value).name
    if name not in DTYPES:
        raise weights.WeightsError(f"{where}: dtype {name!r} is not one of {sorted(DTYPES)}")
    return jnp.dtype(DTYPES[name])


# The parameters are an argument, not a closure (jit would bake them in as constants); the model
# is static and hashes by its fields, so every WanDiT of one architecture shares the compilations.
@functools.partial(jax.jit, static_argnums=0)
def _forward(model: WanTransformer, params, latents, timesteps, text, text_mask):
    return model.apply({"params": params}, latents, timesteps, text, text_mask)


class WanDiT:
    """A loaded Wan DiT for inference (`load_dit`): `.model` (the WanTransformer), `.params`
    (its parameters, on `mesh` when given), `.config` (the folder's config.json), and `predict`."""

    def __init__(self, model: WanTransformer, params: dict, config: dict, *, mesh=None,
                 preset: str = "fsdp_tensor"):
        self.model, self.params, self.config, self.mesh, self.preset = model, params, config, mesh, preset

    def predict(self, latents, timesteps, text_states, text_mask=None) -> jax.Array:
        """latents float32 [B, T, h, w, C_in]; timesteps float [B] (or a scalar for all) in 0..1000;
        text_states [B, S, D_text]; text_mask bool [B, S] or None (attend to every token) ->
        float32 [B, T, h, w, C_out]."""
        latents = jnp.asarray(latents, jnp.float32)
        B = latents.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (B,))
        text_states = jnp.asarray(text_states)
        if text_states.ndim != 3 or text_states.shape[0] != B or text_states.shape[2] != self.model.text_dim:
            raise ValueError(f"text_states {text_states.shape}: want [{B}, S, {self.model.text_dim}]")
        if text_mask is not None:
            text_mask = jnp.asarray(text_mask).astype(bool)
            if text_mask.shape != text_states.shape[:2]:
                raise ValueError(f"text_mask {text_mask.shape} does not match text_states {text_states.shape}")
        precision = "highest" if jnp.dtype(self.model.dtype) == jnp.float32 else None
        with jax.default_matmul_precision(precision):
            if self.mesh is None:
                return _forward(self.model, self.params, latents, timesteps, text_states, text_mask)
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.rules(self.preset)):
                return _forward(self.model, self.params, latents, timesteps, text_states, text_mask)


def load_dit(directory: str, dtype=None, *, param_dtype=None, remat: str = "none",
             attention_impl: str | None = None, context_parallel: str = "ulysses", mesh=None,
             preset: str = "fsdp_tensor", verify: bool = True) -> WanDiT:
    """The WanDiT of a folder written by `pixeldance.convert.wan_dit`.

    dtype: compute dtype ('float32', 'bfloat16' or a jnp dtype; None: the folder's, i.e. the
      converter's --dtype).
    param_dtype: the dtype the parameters are held in (None: float32; bfloat16 halves the 14B's
      57 GB; the float32 norms and modulation then use bfloat16-rounded tables).
    remat, attention_impl, context_parallel: `WanTransformer`'s options.
    mesh, preset: shard the parameters over `mesh` by their logical names under `preset`'s rules
      (pixeldance/sharding.py; 'fsdp_tensor' splits D over fsdp and heads / E over tensor), each
      array read and placed one at a time (host memory: one stacked array); None: default device.
    verify: re-hash params.safetensors against config.json's sha256 first (`weights.check_sha256`).

    WeightsError (one line naming the path and, for a missing folder or file, the converter
    command) if the folder or its weights are missing or do not fit.
    """
    from safetensors import SafetensorError, safe_open  # only loaders read

    cfg = weights.read_config(directory, NETWORK, ORIGIN)
    where = os.path.join(directory, weights.CONFIG)
    dtype = _dtype(dtype, where) or _dtype(cfg.get("dtype", "float32"), where)
    param_dtype = _dtype(param_dtype, where) or jnp.dtype(jnp.float32)
    model = model_from_config(cfg.get("dit") or {}, dtype=dtype, remat=remat, attention_impl=attention_impl,
                              context_parallel=context_parallel, where=where)
    params_path = os.path.join(directory, weights.PARAMS)
    if not os.path.isfile(params_path):
        raise weights.WeightsError(f"{directory}: no {weights.PARAMS} ({ORIGIN})")
    if verify:
        weights.check_sha256(params_path, cfg)
    boxed = boxed_params(model)
    if mesh is not None:
        shardings = traverse_util.flatten_dict(sharding.tree_shardings(mesh, boxed, preset))
    try:
        with safe_open(params_path, framework="numpy") as f:
            stored = {tuple(k.split("/")): jax.ShapeDtypeStruct(tuple(f.get_slice(k).get_shape()), jnp.float32)
                      for k in f.keys()}
            weights.check_like({"params": nn.unbox(boxed)}, traverse_util.unflatten_dict(stored), directory)
            flat = {}
            for path in stored:  # one array in host memory at a time
                value = np.asarray(f.get_tensor("/".join(path)), param_dtype)
                flat[path[1:]] = (jax.device_put(value, shardings[path[1:]]) if mesh is not None
                                  else jnp.asarray(value))
    except SafetensorError as e:
        raise weights.WeightsError(f"cannot read {params_path} as safetensors: "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return WanDiT(model, traverse_util.unflatten_dict(flat), cfg, mesh=mesh, preset=preset)


def read_params(directory: str, abstract: dict, place, *, verify: bool = True) -> dict:
    """A converted folder's parameters into a WanTransformer of architecture `abstract` (flat
    {path: ShapeDtypeStruct}, paths below 'params', e.g. ('blocks', 'attn1', 'to_q', 'kernel')),
    each array read, fitted and placed one at a time (`place(path, numpy array) -> array`, e.g. a
    device_put with the training state's sharding): host memory holds one stacked array.

    A network widened for PixelDance's instructions (`WanVideo(widen=True)`: more input channels
    than the folder's) gets the folder's patch embedding with zero weights for the extra
    channels (`widen_params`' rule). Any other difference from the folder is a WeightsError (one
    line naming the path), as a missing folder or file is.
    """
    from safetensors import SafetensorError, safe_open  # only loaders read

    cfg = weights.read_config(directory, NETWORK, ORIGIN)
    params_path = os.path.join(directory, weights.PARAMS)
    if not os.path.isfile(params_path):
        raise weights.WeightsError(f"{directory}: no {weights.PARAMS} ({ORIGIN})")
    if verify:
        weights.check_sha256(params_path, cfg)
    out = {}
    try:
        with safe_open(params_path, framework="numpy") as f:
            stored = {tuple(k.split("/"))[1:]: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            if set(stored) != set(abstract):
                odd = sorted(set(stored) ^ set(abstract))[0]
                raise weights.WeightsError(f"{params_path}: {'/'.join(odd)} is "
                                           f"{'not in the network' if odd in stored else 'missing'}")
            for path, want in abstract.items():
                shape = stored[path]
                widened = path == ("patch_embedding", "kernel") and len(shape) == 5 and \
                    shape[:3] + shape[4:] == want.shape[:3] + want.shape[4:] and shape[3] < want.shape[3]
                if shape != want.shape and not widened:
                    raise weights.WeightsError(f"{params_path}: {'/'.join(path)} is {list(shape)}, the network's "
                                               f"{list(want.shape)}")
                value = np.asarray(f.get_tensor("/".join(("params",) + path)), np.float32)
                if widened:  # zero weights for the instruction channels: the output is unchanged
                    value = np.concatenate([value, np.zeros(shape[:3] + (want.shape[3] - shape[3],) + shape[4:],
                                                            np.float32)], axis=3)
                out[path] = place(path, value.astype(want.dtype))
    except SafetensorError as e:
        raise weights.WeightsError(f"cannot read {params_path} as safetensors: "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return out
