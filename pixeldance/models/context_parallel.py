"""Context parallelism: self-attention over a token sequence sharded on the 'context' mesh axis.

Queries, keys and values [B, L, N, K] arrive split along their length over the 'context' axis
(c devices, L/c tokens each); every query must still see every key. Two flavours, both under
`jax.shard_map` (batch and heads stay split as the logical rules say):

  ulysses  (DeepSpeed-Ulysses) an all-to-all turns the sequence-sharded [B, L/c, N, K] into
           head-sharded [B, L, N/c, K]; each device runs full attention for its N/c heads with
           the ordinary kernels (`attention_kernels.local_attention`), and a second all-to-all turns
           the output back. Communication: 4 all-to-alls of an activation, independent of c.
           Needs the (per-'tensor'-shard) head count to be divisible by c.
  ring     (Ring Attention) each device keeps its queries; the key/value blocks travel around
           the ring of c devices with `lax.ppermute`, one hop per step, and the output is
           accumulated with an online softmax (running max and sum, float32). Any head count;
           c - 1 hops of a K/V block. Its gradient is a flash-style custom VJP that rings too:
           the K/V blocks go round again, carrying their dK/dV accumulators home.

`attention` picks nothing itself: `use_context_parallel` says whether the mesh and the logical
rules in context ask for it (a 'context' axis of more than one device, and 'length' mapped to
exactly 'context'); `attention.dot_product_attention(..., context_parallel=...)` dispatches.

Axis letters (glossary: pixeldance/models/__init__.py): B batch, L query length, M key length,
N heads, K head width, c context devices.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pixeldance.models import attention_kernels as kernels

FLAVOURS = ("ulysses", "ring")
AXIS = "context"


def use_context_parallel(length: int) -> bool:
    """Whether a sequence of this length is split over a 'context' axis of > 1 device here: the
    abstract mesh in context has one and the logical rules map 'length' to exactly 'context'."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AXIS not in mesh.axis_names or mesh.shape[AXIS] == 1:
        return False
    return kernels.mesh_axes("length", mesh, length) == (AXIS,)


def attention(q, k, v, *, key_mask=None, flavour: str = "ulysses", implementation: str | None = None):
    """Context-parallel softmax attention; same contract as `attention.dot_product_attention`.

    q: [B, L, N, K]; k, v: [B, M, N, K]; L and M split over the 'context' axis of the mesh in
    context; key_mask: optional bool [B, M] (split like the keys). implementation: the per-device
    kernel of 'ulysses' (None: per backend); 'ring' computes its blocks itself.
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown context parallelism {flavour!r}; choose from {FLAVOURS}")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AXIS not in mesh.axis_names:
        raise ValueError(f"context-parallel attention needs a mesh with a {AXIS!r} axis in context")
    c = mesh.shape[AXIS]
    (B, L, N, K), M = q.shape, k.shape[1]
    if L % c or M % c:
        raise ValueError(f"context parallelism over {c} devices needs query and key lengths divisible "
                         f"by {c}; got {L} and {M}")
    batch, heads = kernels.mesh_axes("batch", mesh, B), kernels.mesh_axes("heads", mesh, N)
    if (batch and AXIS in batch) or (heads and AXIS in heads):
        raise ValueError(f"the {AXIS!r} axis splits the sequence; it cannot also split batch or heads")
    local_heads = N // (math.prod(mesh.shape[a] for a in heads) if heads else 1)
    local = None
    if flavour == "ulysses":
        if local_heads % c:
            per = "" if local_heads == N else f" ({local_heads} per 'tensor' shard)"
            raise ValueError(f"Ulysses context parallelism splits the attention heads over the {c}-way "
                             f"{AXIS!r} axis, but {N} heads{per} are not divisible by {c}; use a head "
                             f"count divisible by {c}, a smaller 'context' axis, or context_parallel='ring'")
        # The kernel for the N/c heads each device attends over, chosen once here. The TPU's is a
        # Pallas call (splash), whose outputs carry no varying-axes type: the check is off for it.
        b, n = B // (math.prod(mesh.shape[a] for a in batch) if batch else 1), local_heads // c
        local = implementation or kernels.pick_implementation((b, L, n, K), (b, M, n, K), q.dtype,
                                                               masked=key_mask is not None)
        fn = functools.partial(_ulysses_local, implementation=local)
    else:
        fn = functools.partial(_ring_local, num_devices=c)
    spec = P(batch, AXIS, heads, None)
    check = not (flavour == "ulysses" and local == "splash")
    if key_mask is None:
        return jax.shard_map(lambda q, k, v: fn(q, k, v, None), in_specs=(spec,) * 3,
                             out_specs=spec, check_vma=check)(q, k, v)
    return jax.shard_map(fn, in_specs=(spec,) * 3 + (P(batch, AXIS),), out_specs=spec,
                         check_vma=check)(q, k, v, key_mask)


# ----------------------------------------------------------------------------------------------
# Ulysses: sequence-sharded -> head-sharded -> sequence-sharded.

def _ulysses_local(q, k, v, key_mask, implementation=None):
    """Local shards [B, L/c, N, K] -> [B, L/c, N, K]; full attention for N/c heads in between."""
    to_heads = lambda x: jax.lax.all_to_all(x, AXIS, split_axis=2, concat_axis=1, tiled=True)
    q, k, v = to_heads(q), to_heads(k), to_heads(v)  # [B, L, N/c, K]
    if key_mask is not None:
        key_mask = jax.lax.all_gather(key_mask, AXIS, axis=1, tiled=True)  # [B, M]
    out = kernels.local_attention(q, k, v, key_mask, implementation)
    return jax.lax.all_to_all(out, AXIS, split_axis=1, concat_axis=2, tiled=True)


# ----------------------------------------------------------------------------------------------
# Ring attention: K/V blocks around the ring, online softmax, flash-style ring backward.

def _ring_local(q, k, v, key_mask, num_devices):
    bias = None
    if key_mask is not None:
        bias = kernels.vary_like(jnp.where(key_mask, 0.0, kernels.MASK_VALUE).astype(jnp.float32), q)
    return _ring(q, k, v, bias, num_devices)


def _shift(x, n):
    """One hop round the ring: device i's block goes to device i + 1 (mod n)."""
    return jax.lax.ppermute(x, AXIS, perm=[(i, (i + 1) % n) for i in range(n)])


def _logits(q, k, bias):
    """[B, L, N, K] x [B, M, N, K] -> float32 [B, N, L, M], scaled, padded keys pushed to -1e30."""
    s = jnp.einsum("blnk,bmnk->bnlm", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    return s if bias is None else s + bias[:, None, None, :]


def _ring_forward(q, k, v, bias, n):
    """(out [B, L, N, K] in q's dtype, lse float32 [B, N, L]) of q against all n K/V blocks."""
    B, L, N, K = q.shape
    init = lambda shape, value: kernels.vary_like(jnp.full(shape, value, jnp.float32), q)
    # Finite start for the running max: exp(m - m_new) is then 0, never NaN.
    m, l, acc = init((B, N, L), kernels.MASK_VALUE), init((B, N, L), 0.0), init((B, N, L, K), 0.0)

    def accumulate(kb, vb, bb, m, l, acc):
        s = _logits(q, kb, bb)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l = l * corr + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bnlm,bmnk->bnlk", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        return m_new, l, acc * corr[..., None] + pv

    def step(_, carry):  # the next block arrives, then joins the running statistics
        kb, vb, bb, m, l, acc = carry
        kb, vb = _shift(kb, n), _shift(vb, n)
        bb = None if bb is None else _shift(bb, n)
        return (kb, vb, bb, *accumulate(kb, vb, bb, m, l, acc))

    m, l, acc = accumulate(k, v, bias, m, l, acc)  # the device's own block first
    _, _, _, m, l, acc = jax.lax.fori_loop(1, n, step, (k, v, bias, m, l, acc))
    out = (acc / l[..., None]).transpose(0, 2, 1, 3).astype(q.dtype)
    return out, m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring(q, k, v, bias, n):
    return _ring_forward(q, k, v, bias, n)[0]


def _ring_fwd(q, k, v, bias, n):
    out, lse = _ring_forward(q, k, v, bias, n)
    return out, (q, k, v, bias, out, lse)


def _ring_bwd(n, res, dout):
    q, k, v, bias, out, lse = res
    scale = q.shape[-1] ** -0.5
    f32 = lambda x: x.astype(jnp.float32)
    # delta = rowsum(dout * out), the softmax backward's per-row constant: [B, N, L].
    delta = jnp.sum(f32(dout) * f32(out), axis=-1).transpose(0, 2, 1)

    def grads(kb, vb, bb, dq, dk, dv):
        p = jnp.exp(_logits(q, kb, bb) - lse[..., None])  # [B, N, L, M], recomputed
        dv = dv + jnp.einsum("bnlm,blnk->bmnk", p, f32(dout))
        dp = jnp.einsum("blnk,bmnk->bnlm", dout, vb, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None])
        dq = dq + scale * jnp.einsum("bnlm,bmnk->blnk", ds, f32(kb))
        dk = dk + scale * jnp.einsum("bnlm,blnk->bmnk", ds, f32(q))
        return dq, dk, dv

    def step(_, carry):  # each K/V block travels with its dK/dV accumulators
        kb, vb, bb, dq, dk, dv = carry
        kb, vb, dk, dv = (_shift(x, n) for x in (kb, vb, dk, dv))
        bb = None if bb is None else _shift(bb, n)
        return (kb, vb, bb, *grads(kb, vb, bb, dq, dk, dv))

    zeros = lambda x: kernels.vary_like(jnp.zeros(x.shape, jnp.float32), q)
    dq, dk, dv = grads(k, v, bias, zeros(q), zeros(k), zeros(v))
    _, _, _, dq, dk, dv = jax.lax.fori_loop(1, n, step, (k, v, bias, dq, dk, dv))
    dk, dv = _shift(dk, n), _shift(dv, n)  # after n - 1 hops, one more brings them home
    dbias = None if bias is None else jnp.zeros_like(bias)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias


_ring.defvjp(_ring_fwd, _ring_bwd)
