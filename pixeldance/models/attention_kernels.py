"""The attention kernels behind `attention.dot_product_attention`, each on one device's data.

Kernels ('implementation'):
  xla      `jax.nn.dot_product_attention` as plain XLA ops: the logits [B, N, L, M] are
           materialised. Used on TPU and GPU where their kernels do not apply (e.g. masked
           cross-attention to text), and wherever it is asked for.
  dense    plain-JAX softmax attention with the logits materialised, as 'xla', and a custom VJP
           that keeps the probabilities [B, N, L, M] from the forward pass: the backward pass is
           four matmuls and one elementwise pass, where autodiff of 'xla' goes back through the
           max, exp, sum and divide. Picked on the CPU for short sequences (e.g. the main job's
           80 video tokens, cross-attention to text); its memory is 'xla''s.
  chunked  heads-major, query-chunked softmax attention with a flash-style custom VJP, in plain
           JAX: 2D matmuls per (batch, head, query chunk), softmax statistics saved instead of
           the probabilities, which the backward pass recomputes chunk by chunk. Memory O(L) per
           head. Picked on the CPU for long sequences, where XLA:CPU runs batched (3D) dots and
           passes over materialised [B, N, L, M] tensors far below its 2D GEMM speed.
  cudnn    `jax.nn.dot_product_attention(implementation='cudnn')`: flash attention on NVIDIA GPUs
           (bfloat16/float16 only).
  splash   the Pallas splash-attention kernel on TPU (needs L and M multiples of 128).

`local_attention` runs the kernel an implementation names; `attention.dot_product_attention`
(the front door every model calls) wraps it per device under `jax.shard_map`, and
`context_parallel.py` calls it inside its own `shard_map`. `pick_implementation` chooses the
kernel for the target platform (`target_platform`: the mesh's, when compiling ahead for another).

Axis letters (glossary: pixeldance/models/__init__.py): B batch, L query length, M key length,
N heads, K head width, Q query chunk, G batch x heads (B * N, inside the chunked kernel).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

try:  # the TPU kernel; absent or unusable on some installs, and only ever used on TPU
    from jax.experimental.pallas.ops.tpu import splash_attention as _splash
except Exception:  # noqa: BLE001 - any import failure just disables the TPU kernel
    _splash = None

IMPLEMENTATIONS = ("xla", "dense", "chunked", "cudnn", "splash")
# Checkpoint names of the attention residuals of the 'chunked' and 'splash' kernels (output,
# softmax log-normalisers): remat policies that keep these skip the attention forward pass
# when they recompute a block.
REMAT_NAMES = ("attention_out", "attention_lse")
MASK_VALUE = -1e30  # finite, so a fully masked row gives a uniform softmax instead of NaN
# On the CPU, logits tensors up to this many elements (all heads) stay materialised ('dense'):
# for small ones the loop of the chunked kernel costs more than the passes over memory it saves.
CPU_CHUNKED_MIN_LOGITS = 1 << 22
# Target query-chunk size: Q * M logits (4 MiB in float32) stay in the CPU's caches.
_CHUNK_LOGITS = 1 << 20


def target_platform() -> str:
    """The platform the computation is for: that of the mesh in context, else JAX's backend.

    They differ when compiling ahead for another target (`pixeldance.tools.plan` compiles for TPU
    topologies from a CPU host): the kernel must suit the target, not the host.
    """
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    platform = getattr(device, "platform", None)
    return platform or jax.default_backend()


def pick_implementation(q_shape, k_shape, dtype, masked: bool = False) -> str:
    """The kernel for this backend and shape: splash on TPU, cuDNN on GPU, chunked on CPU.

    Each falls back to 'xla' where its kernel does not apply (splash takes any length: it pads
    to multiples of 128 itself); cuDNN half precision, head width <= 128 (multiple of 8) and no key mask
    (masked attention here is cross-attention to a few dozen text tokens, whose logits are
    small: cuDNN's flash kernel gains nothing there, and its mask support varies by version);
    chunked pays off only for large logits tensors.
    """
    (B, L, N, K), M = q_shape, k_shape[1]
    backend = target_platform()
    if backend == "tpu":
        return "splash" if _splash is not None else "xla"
    if backend == "gpu":
        half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        return "cudnn" if half and K <= 128 and K % 8 == 0 and not masked else "xla"
    return "chunked" if B * N * L * M >= CPU_CHUNKED_MIN_LOGITS else "dense"


def local_attention(q, k, v, key_mask=None, implementation: str | None = None):
    """Softmax attention on data already local to one device. q: [B, L, N, K]; k, v: [B, M, N, K];
    key_mask: optional bool [B, M]; implementation: one of IMPLEMENTATIONS, None to pick one.
    Returns [B, L, N, K] in q's dtype."""
    impl = implementation or pick_implementation(q.shape, k.shape, q.dtype, masked=key_mask is not None)
    if impl == "dense":
        return dense_attention(q, k, v, key_mask)
    if impl in ("xla", "cudnn"):
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1(N), 1(L), M]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    return per_example_kernel(impl)(q, k, v, key_mask)


def per_example_kernel(implementation: str):
    """kernel(q, k, v, key_mask) of 'chunked' or 'splash': per example, so it runs on any split
    of the batch (and heads) under `jax.shard_map`."""
    if implementation == "chunked":
        return chunked_attention
    if implementation == "splash":
        if _splash is None:
            raise RuntimeError("the splash attention kernel could not be imported from "
                               "jax.experimental.pallas.ops.tpu")
        return splash_attention
    raise ValueError(f"unknown attention implementation {implementation!r}; choose from {IMPLEMENTATIONS}")


def is_pallas(kernel) -> bool:
    """Whether a kernel is a Pallas call: shard_map must then run with check_vma=False, since
    Pallas declares its outputs without the mesh axes they vary over (jax 0.10)."""
    return getattr(kernel, "func", kernel) is splash_attention


def mesh_axes(logical: str, mesh, size: int):
    """Mesh axes of a logical name under the rules in context, if their product divides size."""
    rules = nn.get_logical_axis_rules()
    axes = nn.logical_to_mesh_axes((logical,), rules)[0] if rules else None
    if axes is None:
        return None
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in mesh.axis_names)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes


# ----------------------------------------------------------------------------------------------
# Dense attention (CPU, short sequences): materialised probabilities, kept for the backward pass.

def dense_attention(q, k, v, key_mask=None):
    """[B, L, N, K] x [B, M, N, K] (key_mask: bool [B, M] | None) -> [B, L, N, K] in q's dtype;
    see the module docstring ('dense'). Masked keys get MASK_VALUE logits, as in 'chunked'."""
    bias = None if key_mask is None else jnp.where(key_mask, 0.0, MASK_VALUE).astype(jnp.float32)
    return _dense(q, k, v, bias)


def _dense_forward(q, k, v, bias):
    """(out [B, L, N, K] in q's dtype, residuals for `_dense_bwd`)."""
    qs = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = jnp.einsum("blnk,bmnk->bnlm", qs, k, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    p = e / jnp.sum(e, axis=-1, keepdims=True)  # [B, N, L, M] float32
    out = jnp.einsum("bnlm,bmnk->blnk", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype), (qs, k, v, p, out)


@jax.custom_vjp
def _dense(q, k, v, bias):
    return _dense_forward(q, k, v, bias)[0]


def _dense_bwd(res, dout):
    qs, k, v, p, out = res
    f32 = jnp.float32
    dv = jnp.einsum("bnlm,blnk->bmnk", p.astype(dout.dtype), dout, preferred_element_type=f32)
    dp = jnp.einsum("blnk,bmnk->bnlm", dout, v, preferred_element_type=f32)
    # rowsum(dp * p) = rowsum(dout * out): the softmax backward's per-row constant, from the
    # [B, L, N, K] output instead of another pass over the [B, N, L, M] probabilities.
    delta = jnp.einsum("blnk,blnk->bnl", dout.astype(f32), out)[..., None]
    ds = (p * (dp - delta)).astype(qs.dtype)
    dq = jnp.einsum("bnlm,bmnk->blnk", ds, k, preferred_element_type=f32) * (qs.shape[-1] ** -0.5)
    dk = jnp.einsum("bnlm,blnk->bmnk", ds, qs, preferred_element_type=f32)
    # None: no cotangent for the bias (a key mask is not trained).
    return dq.astype(qs.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_dense.defvjp(_dense_forward, _dense_bwd)


# ----------------------------------------------------------------------------------------------
# Chunked attention (CPU): heads-major 2D matmuls, flash-style backward.

def chunked_attention(q, k, v, key_mask):
    """[B, L, N, K] x [B, M, N, K] -> [B, L, N, K]; see the module docstring ('chunked')."""
    B, L, N, K = q.shape
    M = k.shape[1]
    heads = lambda x: x.transpose(0, 2, 1, 3).reshape(B * N, x.shape[1], K)  # [B*N, L|M, K]
    qh = heads(q * jnp.asarray(K ** -0.5, q.dtype))
    kh, vh = vary_like(heads(k), qh), vary_like(heads(v), qh)
    bias = None  # no mask: no bias pass over the logits
    if key_mask is not None:
        bias = jnp.repeat(jnp.where(key_mask, 0.0, MASK_VALUE), N, axis=0)  # [B*N, M], row b*N + n
        bias = vary_like(bias, qh)
    chunk = _chunk_size(L, M)
    # The forward pass runs outside autodiff and its results carry checkpoint names, so a remat
    # policy can keep them (REMAT_NAMES) instead of running the attention forward again;
    # `_attach_grad` then supplies the gradient with respect to q, k, v.
    stop = jax.lax.stop_gradient
    out, lse = _run_forward(stop(qh), stop(kh), stop(vh), bias, chunk)
    out = jax.ad_checkpoint.checkpoint_name(out, "attention_out")
    lse = jax.ad_checkpoint.checkpoint_name(lse, "attention_lse")
    out = _attach_grad(qh, kh, vh, bias, out, lse, chunk)
    return out.reshape(B, N, L, K).transpose(0, 2, 1, 3)


def vary_like(x, like):
    """Under shard_map, mark x as varying over the mesh axes that `like` varies over.

    Keys gathered along their length are the same on every 'context' shard while the queries
    differ; the custom VJP needs all inputs typed alike, and this cast's transpose sums the key
    gradients over those shards.
    """
    def varying(a):  # the mesh axes a value varies over (`vma`; renamed across jax versions)
        aval = jax.typeof(a)
        mat = getattr(aval, "manual_axis_type", None)
        return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))

    missing = tuple(sorted(varying(like) - varying(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _chunk_size(L: int, M: int) -> int:
    """The largest divisor of L with Q * M <= _CHUNK_LOGITS (at least 1)."""
    target = max(1, _CHUNK_LOGITS // M)
    return max(d for d in range(1, min(L, target) + 1) if L % d == 0)


def _chunk_forward(qc, kh, vh, bias):
    """One (head, query chunk): qc [Q, K], kh/vh [M, K], bias [M] | None -> (out [Q, K], lse [Q])."""
    logits = jnp.dot(qc, kh.T, preferred_element_type=jnp.float32)  # [Q, M]
    if bias is not None:
        logits = logits + bias
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    out = jnp.dot(e.astype(vh.dtype), vh, preferred_element_type=jnp.float32) / s
    return out.astype(qc.dtype), (m + jnp.log(s))[:, 0]


def _run_forward(qh, kh, vh, bias, chunk):
    G, L, K = qh.shape
    nc = L // chunk

    def body(i):  # i enumerates (head, chunk) pairs
        h, j = i // nc, i % nc
        qc = jax.lax.dynamic_slice(qh, (h, j * chunk, 0), (1, chunk, K))[0]
        return _chunk_forward(qc, kh[h], vh[h], None if bias is None else bias[h])

    out, lse = jax.lax.map(body, jnp.arange(G * nc))
    return out.reshape(G, L, K), lse.reshape(G, L)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attach_grad(qh, kh, vh, bias, out, lse, chunk):
    """Returns `out` (the attention of qh [G, L, K] (pre-scaled), kh/vh [G, M, K] and bias
    float32 [G, M] or None, computed by `_run_forward` with softmax log-normalisers lse [G, L]), with
    the attention's gradient with respect to qh, kh and vh attached."""
    del qh, kh, vh, bias, lse, chunk
    return out


def _attach_grad_fwd(qh, kh, vh, bias, out, lse, chunk):
    del chunk
    return out, (qh, kh, vh, bias, out, lse)


def _attach_grad_bwd(chunk, res, dout):
    qh, kh, vh, bias, out, lse = res
    G, L, K = qh.shape
    M = kh.shape[1]
    nc = L // chunk
    # delta = rowsum(dP * P) = rowsum(dout * out), the softmax backward's per-row constant.
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [G, L]

    # The backward pass works on transposed [M, Q] tiles, so that every matmul is a plain
    # [m, n] @ [n, p] or [m, n] @ [p, n]^T: XLA:CPU's GEMM ran matmuls with a transposed left
    # operand (p^T @ dout, the textbook form) 2-3x slower. dq is computed transposed,
    # k^T @ ds^T, from k^T made once per call; the optimization barrier keeps XLA from folding
    # that transpose back into the matmul.
    kh_t = jax.lax.optimization_barrier(kh.transpose(0, 2, 1))  # [G, K, M]

    def body(i):
        h, j = i // nc, i % nc
        rows = lambda x: jax.lax.dynamic_slice(x, (h, j * chunk, 0), (1, chunk, K))[0]
        vec = lambda x: jax.lax.dynamic_slice(x, (h, j * chunk), (1, chunk))[0]
        qc, dc = rows(qh), rows(dout)  # [Q, K]
        kc, vc = kh[h], vh[h]  # [M, K]
        logits_t = jnp.dot(kc, qc.T, preferred_element_type=jnp.float32)  # [M, Q]
        if bias is not None:
            logits_t = logits_t + bias[h][:, None]
        p_t = jnp.exp(logits_t - vec(lse)[None, :])  # recomputed instead of stored
        dv = jnp.dot(p_t.astype(dc.dtype), dc, preferred_element_type=jnp.float32)  # [M, K]
        dp_t = jnp.dot(vc, dc.T, preferred_element_type=jnp.float32)  # [M, Q]
        ds_t = (p_t * (dp_t - vec(delta)[None, :])).astype(qc.dtype)
        dk = jnp.dot(ds_t, qc, preferred_element_type=jnp.float32)  # [M, K]
        dq_t = jnp.dot(kh_t[h], ds_t, preferred_element_type=jnp.float32)  # [K, Q]
        return dq_t, dk, dv

    dq_t, dk, dv = jax.lax.map(body, jnp.arange(G * nc))
    dq = dq_t.reshape(G, nc, K, chunk).transpose(0, 1, 3, 2).reshape(G, L, K).astype(qh.dtype)
    dk = dk.reshape(G, nc, M, K).sum(1).astype(kh.dtype)  # partial sums over query chunks
    dv = dv.reshape(G, nc, M, K).sum(1).astype(vh.dtype)
    # out and lse are results of the forward pass, not inputs of the attention: no gradient.
    dbias = None if bias is None else jnp.zeros_like(bias)
    return dq, dk, dv, dbias, jnp.zeros_like(out), jnp.zeros_like(lse)


_attach_grad.defvjp(_attach_grad_fwd, _attach_grad_bwd)


# ----------------------------------------------------------------------------------------------
# Splash attention (TPU).

def splash_attention(q, k, v, key_mask, interpret: bool = False):
    """Pallas splash attention, vmapped over the batch. [B, L, N, K] -> [B, L, N, K].

    The kernel works per example on heads-major [N, L, K] and does not scale the logits, so q
    is scaled here. Padded keys are excluded through segment ids (query segment 1, padded keys
    segment 0). Lengths that are not multiples of 128 (the kernel's blocks; Wan 2.1's 480 x 832 x
    81 frames is L = 32,760) are padded with zeros to the next one: padded keys are masked out,
    padded queries cut from the output. interpret=True runs the kernel in the Pallas interpreter
    (any backend; tests).
    """
    B, L, N, K = q.shape
    M = k.shape[1]
    Lp, Mp = -(-L // 128) * 128, -(-M // 128) * 128
    if Mp != M:
        key_mask = jnp.ones((B, M), bool) if key_mask is None else key_mask
        key_mask = jnp.pad(key_mask, ((0, 0), (0, Mp - M)))  # False: padded keys
    pad = lambda x, n: x if n == x.shape[1] else jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
    kernel = _splash_kernel(N, Lp, Mp, interpret)
    heads = lambda x: x.transpose(0, 2, 1, 3)  # [B, N, L|M, K]
    qh = heads(pad(q * jnp.asarray(K ** -0.5, q.dtype), Lp))
    kh, vh = heads(pad(k, Mp)), heads(pad(v, Mp))
    if key_mask is None:
        out = jax.vmap(kernel)(qh, kh, vh)
    else:
        seg = _splash.SegmentIds(q=jnp.ones((B, Lp), jnp.int32), kv=key_mask.astype(jnp.int32))
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(qh, kh, vh, seg)
    return out[:, :, :L].transpose(0, 2, 1, 3).astype(q.dtype)


@functools.lru_cache(maxsize=None)
def _splash_kernel(num_heads: int, q_len: int, kv_len: int, interpret: bool = False):
    """A splash kernel for full (non-causal) attention at these static shapes, built once."""
    block_q, block_kv = _largest_block(q_len), _largest_block(kv_len)
    sizes = _splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                               block_q_dkv=block_q, block_kv_dkv=block_kv,
                               block_kv_dkv_compute=block_kv, block_q_dq=block_q, block_kv_dq=block_kv)
    mask = _splash.MultiHeadMask([_splash.FullMask((q_len, kv_len))] * num_heads)
    # Its residuals (output and log-normalisers) carry the name the remat policies keep.
    return _splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                   residual_checkpoint_name="attention_out", interpret=interpret)


def _largest_block(n: int, cap: int = 512) -> int:
    """The largest multiple of 128 up to cap that divides n (n is a multiple of 128)."""
    return max(b for b in range(128, min(cap, n) + 1, 128) if n % b == 0)
