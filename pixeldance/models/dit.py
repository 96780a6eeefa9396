"""Video DiT with PixelDance conditioning.

The noisy latent video is concatenated along channels with the image-instruction latents
`c_image = [z_first, 0, ..., 0, z_last]` and their mask, cut into (t, h, w) patches, and run
through transformer blocks with 3D-RoPE self-attention over space-time, cross-attention to the
text tokens and adaLN-Zero modulation by the diffusion time (plus pooled text).

Options (constructor arguments of `VideoDiT`, set from `config.dit` by the trainer):
  variant    size table `DIT_VARIANTS` (`decode_variant('B/2')`: the suffix is the spatial patch).
  dtype      compute dtype. Parameters are always float32; with bfloat16 the activations and
             matmuls are bfloat16 while norms, softmax, RoPE and the output stay float32.
  remat      rematerialisation of each block in the backward pass, `REMAT_POLICIES`.
  attention  'full' space-time self-attention, or 'factorised': attention within each frame,
             then a second attention across frames at each spatial position (PixelDance's UNet
             pairs spatial with temporal attention the same way).
  attention_impl  the attention kernel, None = per backend (`attention_kernels.pick_implementation`).
  context_parallel  'ulysses' (default) or 'ring': how the full self-attention runs where the
             video tokens are split over a 'context' mesh axis (preset 'fsdp_context'); see
             `context_parallel.py`. Without such a split it changes nothing.

Axis letters (glossary: pixeldance/models/__init__.py): B batch, T latent frames, h/w latent
height/width, C latent channels, L video tokens, M key length, S text tokens, D model width,
N heads, K head width, E MLP width.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from pixeldance.models import attention as attn_lib
from pixeldance.models import attention_kernels
from pixeldance.models.layers import Dense, LayerNorm, RMSNorm
from pixeldance.models.text import FrozenText, TextEncoder
from pixeldance.sharding import constrain

# Size table: width D, depth, heads N (head width K = D / N), MLP width E = mlp_ratio * D.
# `mu` is for tests; `shapes` for the built-in world on a CPU (`shapes_wide`: twice as wide, for
# issue 20's question whether width keeps the world's shapes); S, B, L, XL follow DiT's widths
# and depths; `1.5B` matches the parameter count of PixelDance's UNet (1.5B) with the head count
# and width of Wan 2.1's 1.3B model (12 x 128) at DiT-XL's depth.
DIT_VARIANTS = {
    "mu": dict(width=32, depth=2, num_heads=2, mlp_ratio=2),
    "shapes": dict(width=128, depth=4, num_heads=4, mlp_ratio=4),
    "shapes_wide": dict(width=256, depth=4, num_heads=8, mlp_ratio=4),
    "S": dict(width=384, depth=12, num_heads=6, mlp_ratio=4),
    "B": dict(width=768, depth=12, num_heads=12, mlp_ratio=4),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_ratio=4),
    "XL": dict(width=1152, depth=28, num_heads=16, mlp_ratio=4),
    "1.5B": dict(width=1536, depth=28, num_heads=12, mlp_ratio=4),
}

ATTENTION_KINDS = ("full", "factorised")
CONTEXT_PARALLEL = ("ulysses", "ring")  # = context_parallel.FLAVOURS
# Absolute positions added to the patch embeddings, besides 3D RoPE: 'none' (RoPE only, relative)
# or 'sincos' (fixed sinusoids of each token's (t, h, w) grid index, no parameters).
POS_EMBEDS = ("none", "sincos")
TIME_FEATURES = 256  # sinusoidal features of the diffusion time


def decode_variant(name: str) -> dict:
    """'B' or 'B/2' (the suffix is the spatial patch size) -> constructor kwargs."""
    base, _, patch = name.partition("/")
    if base not in DIT_VARIANTS:
        raise ValueError(f"unknown DiT variant {name!r}; choose from {sorted(DIT_VARIANTS)}")
    out = dict(DIT_VARIANTS[base])
    if patch:
        out["patch_size"] = (1, int(patch), int(patch))
    return out


# ----------------------------------------------------------------------------------------------
# Analytic parameter and FLOP counts.

def count_params(*, width: int, depth: int, num_heads: int, mlp_ratio: int, text_width: int,
                 patch_size=(1, 2, 2), latent_channels: int = 16, attention: str = "full") -> int:
    """Parameters of `VideoDiT` (not the text encoder), from the architecture alone.

    Per block: adaLN 6D(D+1); self-attention qkv 3D(D+1), out D(D+1), q/k norms 2K;
    cross-attention LayerNorm 2D, q D(D+1), kv 2D(D+1), out D(D+1), q/k norms 2K;
    MLP 2DE + E + D; 'factorised' adds a temporal attention (LayerNorm 2D, qkv, out, norms).
    Outside the blocks: patch embedding, time MLP, pooled-text and text projections, final
    adaLN and output projection.
    """
    D, K, E = width, width // num_heads, mlp_ratio * width
    p_in = math.prod(patch_size) * (2 * latent_channels + 1)
    p_out = math.prod(patch_size) * latent_channels
    dense = lambda i, o: i * o + o
    self_attn = dense(D, 3 * D) + dense(D, D) + 2 * K
    block = (dense(D, 6 * D) + self_attn
             + 2 * D + dense(D, D) + dense(D, 2 * D) + dense(D, D) + 2 * K
             + dense(D, E) + dense(E, D))
    if attention == "factorised":
        block += 2 * D + self_attn
    top = (dense(p_in, D) + dense(TIME_FEATURES, D) + dense(D, D) + 2 * dense(text_width, D)
           + dense(D, 2 * D) + dense(D, p_out))
    return depth * block + top


def dit_flops_per_sample(*, num_tokens: int, text_len: int, width: int, depth: int,
                         mlp_ratio: int, patch_dim_in: int, patch_dim_out: int,
                         attention: str = "full", num_frames: int = 1) -> float:
    """Analytic forward FLOPs of the DiT blocks + patch in/out for one sample (2 per MAC).

    Per layer: 2L(4D^2 qkv+out, 2DE mlp, 2D^2 cross q+out) + 2S(2D^2) cross kv
    + self-attention 4 L M D (M keys per query: L for 'full'; for 'factorised' L/T spatial plus
    T temporal, and another 2L(4D^2) for the temporal projections) + cross-attention 4LSD.
    Per-sample terms (adaLN, time MLP) are left out: they do not scale with tokens.
    """
    L, S, D, E = num_tokens, text_len, width, mlp_ratio * width
    per_layer = 2 * L * (4 * D * D + 2 * D * E + 2 * D * D) + 2 * S * 2 * D * D + 4 * L * S * D
    if attention == "full":
        per_layer += 4 * L * L * D
    elif attention == "factorised":
        per_layer += 4 * L * (L // num_frames) * D + 2 * L * 4 * D * D + 4 * L * num_frames * D
    else:
        raise ValueError(f"unknown attention {attention!r}; choose from {ATTENTION_KINDS}")
    return depth * per_layer + 2 * L * D * (patch_dim_in + patch_dim_out)


# ----------------------------------------------------------------------------------------------
# Embeddings.

def _dense(features, names, dtype, name, zero=False, in_dims=1):
    return Dense(features, names, in_dims=in_dims, zero_init=zero, dtype=dtype, name=name)


def timestep_embedding(t, dim: int, max_period: float = 10_000.0):
    """t: float [B] in [0, 1] -> sinusoidal features float32 [B, dim] (t scaled by 1000 like DDPM steps)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = 1000.0 * t[:, None].astype(jnp.float32) * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_3d(grid: tuple[int, int, int], dim: int, max_period: float = 10_000.0):
    """Fixed absolute position features float32 [L, dim] of a (T, h, w) token grid (row-major, as
    the patchified tokens): each axis gets a share of `dim` (`rope_split`'s proportions) of cos
    and sin of its integer index at geometric frequencies 1 .. 1/max_period.

    Why, beside RoPE: RoPE only tells a token the offsets to others, so the model cannot say where
    the frame's edges or the clip's first frame are. Without a first-frame instruction that is
    what text-to-video needs to turn "moves left" into a start on the right and an end on the
    left (README, issue 19).
    """
    coords = jnp.stack(jnp.meshgrid(*[jnp.arange(n) for n in grid], indexing="ij"), -1)
    coords = coords.reshape(-1, 3).astype(jnp.float32)  # [L, 3]
    feats = []
    for axis, d in enumerate(rope_split(dim)):
        half = d // 2
        freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half, 1))
        args = coords[:, axis:axis + 1] * freqs[None]
        feats += [jnp.cos(args), jnp.sin(args)]
    return jnp.concatenate(feats, axis=-1)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """How the head width K is shared among the (t, h, w) axes of 3D RoPE; each part even."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_3d(grid: tuple[int, int, int], head_dim: int, theta: float = 10_000.0):
    """Rotary angles for a (T, h, w) token grid (in patches) -> (cos, sin) each float32 [L, K/2]."""
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
    """x: [B, L, N, K]; rotates pairs (x[..., :K/2], x[..., K/2:]) by the angles, in float32."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[None, :, None], sin[None, :, None]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Transformer block.

_QKV_AXES = ("batch", "length", "heads", "kv")


class DiTBlock(nn.Module):
    """One block: adaLN-Zero self-attention (3D RoPE), cross-attention to text, adaLN-Zero MLP.

    With attention='factorised' the self-attention is spatial (within each of `num_frames`
    frames) and a temporal self-attention sub-layer (pre-LayerNorm, residual) follows it.
    """
    width: int
    num_heads: int
    mlp_ratio: int
    dtype: Any = jnp.float32
    attention: str = "full"
    num_frames: int = 1
    attention_impl: str | None = None
    context_parallel: str = "ulysses"

    def _self_attention(self, y, rope, prefix: str, kind: str):
        """y: [B, L, D] -> [B, L, D]; kind 'full' | 'spatial' | 'temporal'."""
        D, N = self.width, self.num_heads
        K = D // N
        qkv = _dense((3, N, K), ("embed", None, "heads", "kv"), self.dtype, prefix + "qkv")(y)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, N, K]
        q = apply_rope(RMSNorm(self.dtype, name=prefix + "q_norm")(q), *rope)
        k = apply_rope(RMSNorm(self.dtype, name=prefix + "k_norm")(k), *rope)
        # Only the self-attention q is constrained (as the residual stream): also constraining
        # k, v, the attention output, the text projection and the cross-attention q made the
        # 8-device CPU training tests deadlock in an XLA collective rendezvous (jax 0.10.2).
        q = constrain(q, _QKV_AXES)
        if kind == "full":
            y = attn_lib.dot_product_attention(q, k, v, implementation=self.attention_impl,
                                               context_parallel=self.context_parallel)
        elif kind == "spatial":
            y = attn_lib.spatial_attention(q, k, v, self.num_frames, implementation=self.attention_impl)
        else:
            y = attn_lib.temporal_attention(q, k, v, self.num_frames, implementation=self.attention_impl)
        out_name = "self_out" if prefix == "" else prefix + "out"
        return _dense(D, ("heads", "kv", "embed"), self.dtype, out_name, in_dims=2)(y)

    @nn.compact
    def __call__(self, x, cond, rope, text, text_mask):
        # x: [B, L, D]; cond: [B, D]; rope: ([L, K/2], [L, K/2]); text: [B, S, D]; text_mask: [B, S]
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention {self.attention!r}; choose from {ATTENTION_KINDS}")
        D, N = self.width, self.num_heads
        K = D // N
        mod = _dense(6 * D, ("embed", "mlp"), self.dtype, "adaln", zero=True)(nn.silu(cond))
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod[:, None], 6, axis=-1)  # [B, 1, D]
        ln = lambda name: LayerNorm(use_scale=False, use_bias=False, dtype=self.dtype, name=name)

        # Self-attention: over all video tokens, or within frames then across frames.
        y = ln("ln_self")(x, shift1, scale1)
        kind = "full" if self.attention == "full" else "spatial"
        x = x + gate1 * self._self_attention(y, rope, "", kind)
        x = constrain(x, ("batch", "length", "embed"))
        if self.attention == "factorised":
            y = LayerNorm(dtype=self.dtype, name="ln_time")(x)
            x = x + self._self_attention(y, rope, "time_", "temporal")
            x = constrain(x, ("batch", "length", "embed"))

        # Cross-attention to text (no modulation, as in PixArt/Wan).
        y = LayerNorm(dtype=self.dtype, name="ln_cross")(x)
        q = _dense((N, K), ("embed", "heads", "kv"), self.dtype, "cross_q")(y)
        kv = _dense((2, N, K), ("embed", None, "heads", "kv"), self.dtype, "cross_kv")(text)
        q = RMSNorm(self.dtype, name="cross_q_norm")(q)
        k = RMSNorm(self.dtype, name="cross_k_norm")(kv[:, :, 0])
        y = attn_lib.dot_product_attention(q, k, kv[:, :, 1], key_mask=text_mask,
                                           implementation=self.attention_impl)
        x = x + _dense(D, ("heads", "kv", "embed"), self.dtype, "cross_out", in_dims=2)(y)

        # MLP. Its hidden activations carry a name for the 'mlp' remat policy.
        y = ln("ln_mlp")(x, shift2, scale2)
        y = _dense(self.mlp_ratio * D, ("embed", "mlp"), self.dtype, "mlp_in")(y)
        y = jax.ad_checkpoint.checkpoint_name(constrain(y, ("batch", "length", "mlp")), "mlp_hidden")
        y = jax.ad_checkpoint.checkpoint_name(nn.gelu(y, approximate=True), "mlp_hidden")
        y = _dense(D, ("mlp", "embed"), self.dtype, "mlp_out")(y)
        x = x + gate2 * y
        return constrain(x, ("batch", "length", "embed")), None


_policies = jax.checkpoint_policies
_KEEP_ATTENTION = _policies.save_only_these_names(*attention_kernels.REMAT_NAMES)

# What the backward pass recomputes instead of storing, per block:
REMAT_POLICIES = {
    # Nothing: every activation the backward pass needs is stored (fastest where memory is
    # plentiful and fast; most memory).
    "none": None,
    # Everything: only each block's input is stored; the block's forward pass runs again in the
    # backward pass (least memory: O(depth) block inputs; about 1/3 more compute).
    "full": None,
    # Matmul outputs without batch dimensions (projections, MLP) and the attention kernels'
    # outputs and softmax statistics are stored; norms, RoPE, activations and, for the 'xla'
    # and 'dense' kernels, attention are recomputed. About a fifth of 'none''s activation
    # memory, and elementwise recompute only.
    "dots": _policies.save_from_both_policies(_policies.checkpoint_dots_with_no_batch_dims,
                                              _KEEP_ATTENTION),
    # As 'dots', plus batched matmul outputs: the 'xla' kernel's logits [B, N, L, M] too
    # (O(L^2) memory per layer, no attention recompute).
    "dots_saveable": _policies.save_from_both_policies(_policies.dots_saveable, _KEEP_ATTENTION),
    # Everything except the MLP's hidden activations ([B, L, E], the widest per-token tensors):
    # the backward pass recomputes only mlp_in and the GELU.
    "mlp": _policies.save_anything_except_these_names("mlp_hidden"),
}


# ----------------------------------------------------------------------------------------------
# The model.

class VideoDiT(nn.Module):
    """Denoiser for latent video with PixelDance image instructions.

    __call__ args:
      x: noisy latents float [B, T, h, w, C]
      t: flow time float [B] in [0, 1] (1 = pure noise)
      c_image: instruction latents [B, T, h, w, C] (zeros where not given)
      c_mask: [B, T, h, w, 1], 1 at frames with an instruction
      text: [B, S, Dt] text embeddings; text_mask: bool [B, S]
    Returns: float32 [B, T, h, w, C] network output (x0 or velocity, per the objective).
    pos_embed: one of POS_EMBEDS ('sincos' adds `sincos_3d` absolute positions to the tokens).
    """
    latent_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    width: int = 192
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: int = 4
    remat: str = "none"
    scan_layers: bool = True
    # Layers per iteration of the scanned loop (lax.scan's `unroll`; >= depth: straight-line code
    # over the same stacked parameters). On a CPU the loop's own work — stacking residuals and
    # per-layer gradients (dynamic-update-slices, broadcasts, copies) — weighs on a small DiT:
    # the shapes DiT's train step runs 1.2x faster unrolled (benchmarks/README.md, issue 19).
    # Large models keep 1: one compiled body, compile time independent of depth.
    scan_unroll: int = 1
    dtype: Any = jnp.float32
    attention: str = "full"
    attention_impl: str | None = None
    context_parallel: str = "ulysses"
    pos_embed: str = "none"

    @nn.compact
    def __call__(self, x, t, c_image, c_mask, text, text_mask):
        B, T, h, w, C = x.shape
        pt, ph, pw = self.patch_size
        if T % pt or h % ph or w % pw:
            raise ValueError(f"latent shape {x.shape} is not divisible by patch size {self.patch_size}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; choose from {sorted(REMAT_POLICIES)}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention {self.attention!r}; choose from {ATTENTION_KINDS}")
        if self.context_parallel not in CONTEXT_PARALLEL:
            raise ValueError(f"unknown context_parallel {self.context_parallel!r}; choose from {CONTEXT_PARALLEL}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"unknown pos_embed {self.pos_embed!r}; choose from {POS_EMBEDS}")
        if self.scan_unroll < 1:
            raise ValueError(f"scan_unroll must be >= 1 (layers per loop iteration), got {self.scan_unroll}")
        grid = (T // pt, h // ph, w // pw)
        D = self.width

        # Patchify [B, T, h, w, 2C+1] -> [B, L, pt*ph*pw*(2C+1)].
        inp = jnp.concatenate([x, c_image, c_mask], axis=-1).astype(self.dtype)
        Cin = inp.shape[-1]
        inp = inp.reshape(B, grid[0], pt, grid[1], ph, grid[2], pw, Cin)
        inp = inp.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(B, -1, pt * ph * pw * Cin)
        hidden = _dense(D, (None, "embed"), self.dtype, "patch_embed")(inp)
        if self.pos_embed == "sincos":
            hidden = hidden + sincos_3d(grid, D).astype(self.dtype)[None]
        hidden = constrain(hidden, ("batch", "length", "embed"))

        # Conditioning vector: diffusion time plus pooled text (global colour/shape cues).
        cond = _dense(D, (None, "embed"), self.dtype, "time_in")(timestep_embedding(t, TIME_FEATURES))
        cond = _dense(D, ("embed", "mlp"), self.dtype, "time_out")(nn.silu(cond))
        m = text_mask[..., None].astype(jnp.float32)
        pooled = (text.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        cond = cond + _dense(D, (None, "embed"), self.dtype, "text_pool")(pooled)
        text_h = _dense(D, (None, "embed"), self.dtype, "text_proj")(text.astype(self.dtype))

        rope = rope_3d(grid, D // self.num_heads)
        block = DiTBlock
        if self.remat != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        block_kwargs = dict(width=D, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, dtype=self.dtype,
                            attention=self.attention, num_frames=grid[0], attention_impl=self.attention_impl,
                            context_parallel=self.context_parallel)
        if self.scan_layers:
            # One compiled layer body, iterated: compile time independent of depth.
            blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=(nn.broadcast,) * 4, length=self.depth,
                             unroll=min(self.scan_unroll, self.depth),
                             metadata_params={nn.PARTITION_NAME: "layers"})
            hidden, _ = blocks(**block_kwargs, name="blocks")(hidden, cond, rope, text_h, text_mask)
        else:
            for i in range(self.depth):
                hidden, _ = block(**block_kwargs, name=f"block_{i}")(hidden, cond, rope, text_h, text_mask)

        # adaLN-modulated final layer, zero-initialised so training starts from output 0.
        shift, scale = jnp.split(_dense(2 * D, ("embed", "mlp"), self.dtype, "final_adaln",
                                        zero=True)(nn.silu(cond))[:, None], 2, axis=-1)
        hidden = LayerNorm(use_scale=False, use_bias=False, dtype=self.dtype)(hidden, shift, scale)
        out = _dense(pt * ph * pw * C, ("embed", None), self.dtype, "final", zero=True)(hidden)
        out = out.reshape(B, *grid, pt, ph, pw, C).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return out.reshape(B, T, h, w, C).astype(jnp.float32)


class PixelDanceModel(nn.Module):
    """Text encoder + video DiT: (x, t, c_image, c_mask, text) -> output. text: tokens int32
    [B, S] for a `TextEncoder` trained with the DiT, or dict(states [B, S, D], mask [B, S]) for
    `FrozenText` (a pretrained encoder's cached output; see models/text.py)."""
    text_encoder: TextEncoder | FrozenText
    dit: VideoDiT

    def __call__(self, x, t, c_image, c_mask, text_input):
        text, text_mask = self.text_encoder(text_input)
        return self.dit(x, t, c_image, c_mask, text, text_mask)
