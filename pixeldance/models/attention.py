"""The one attention function every model calls; it picks the kernel for the backend.

The kernels ('implementation': xla, chunked, cudnn, splash) and their choice per platform are in
`attention_kernels.py`.

`chunked` and `splash` run per device under `jax.shard_map` when a mesh is set: batch and heads
split by the logical rules in force, keys and values gathered along their length (so queries
sharded on 'context' stay local).

Context parallelism (`context_parallel='ulysses' | 'ring'`, for self-attention, whose keys are
split along their length like the queries): where the mesh in context has a 'context' axis of
more than one device and the rules map 'length' to it (preset 'fsdp_context'), the attention runs
as in `context_parallel.py` instead of gathering the keys; elsewhere the argument changes nothing.

Axis letters (glossary: pixeldance/models/__init__.py): B batch, L query length, M key length,
N heads, K head width, T latent frames, P spatial positions per frame (T * P = L for video tokens).
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from pixeldance.models import attention_kernels as kernels
from pixeldance.models import context_parallel as cp


def dot_product_attention(q, k, v, *, key_mask=None, implementation: str | None = None,
                          context_parallel: str | None = None):
    """Softmax attention, softmax in float32.

    Args:
      q: [B, L, N, K]; k, v: [B, M, N, K].
      key_mask: optional bool [B, M], True where a key may be attended to.
      implementation: None picks per backend (`attention_kernels.pick_implementation`), or one
        of `attention_kernels.IMPLEMENTATIONS` to force it.
      context_parallel: None, or 'ulysses' | 'ring' for self-attention (L == M, keys split like
        the queries): used where the sequence is split over a 'context' axis (see the module
        docstring and `context_parallel.py`).
    Returns:
      [B, L, N, K] in q's dtype.
    """
    if context_parallel is not None:
        if context_parallel not in cp.FLAVOURS:
            raise ValueError(f"unknown context parallelism {context_parallel!r}; choose from {cp.FLAVOURS}")
        if q.shape[1] == k.shape[1] and cp.use_context_parallel(q.shape[1]):
            return cp.attention(q, k, v, key_mask=key_mask, flavour=context_parallel,
                                implementation=implementation)
    if implementation is None:
        implementation = kernels.pick_implementation(q.shape, k.shape, q.dtype, masked=key_mask is not None)
    if implementation in ("chunked", "splash"):  # per-example kernels: per device under shard_map
        return _per_device(kernels.per_example_kernel(implementation), q, k, v, key_mask)
    return kernels.local_attention(q, k, v, key_mask, implementation)


# ----------------------------------------------------------------------------------------------
# Factorised (space-then-time) attention: the same kernel on regrouped tokens.

def spatial_attention(q, k, v, num_frames: int, *, implementation: str | None = None):
    """Attention among the tokens of each frame. q, k, v: [B, T*P, N, K] (frame-major tokens)."""
    B, L, N, K = q.shape
    frames = lambda x: x.reshape(B * num_frames, L // num_frames, N, K)  # [B*T, P, N, K]
    out = dot_product_attention(frames(q), frames(k), frames(v), implementation=implementation)
    return out.reshape(B, L, N, K)


def temporal_attention(q, k, v, num_frames: int, *, implementation: str | None = None):
    """Attention among the tokens at the same spatial position across frames. [B, T*P, N, K]."""
    B, L, N, K = q.shape
    T, Pn = num_frames, L // num_frames

    def positions(x):  # [B, T, P, N, K] -> [B*P, T, N, K]
        return x.reshape(B, T, Pn, N, K).transpose(0, 2, 1, 3, 4).reshape(B * Pn, T, N, K)

    out = dot_product_attention(positions(q), positions(k), positions(v), implementation=implementation)
    return out.reshape(B, Pn, T, N, K).transpose(0, 2, 1, 3, 4).reshape(B, L, N, K)


# ----------------------------------------------------------------------------------------------
# Running a per-example kernel on each device's shard.

def _per_device(kernel, q, k, v, key_mask):
    """kernel(q, k, v, key_mask) on local shards when a multi-device mesh is in context.

    Batch and heads are split as the logical rules say (`batch`, `heads`); q keeps its
    `length` split; k, v and the mask are gathered along their length. A mesh axis that does not
    divide its dimension is dropped from the split (that dimension is then replicated).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, key_mask)
    batch, length, heads = (kernels.mesh_axes(name, mesh, n) for name, n in
                            (("batch", q.shape[0]), ("length", q.shape[1]), ("heads", q.shape[2])))
    q_spec, kv_spec = P(batch, length, heads, None), P(batch, None, heads, None)
    check = not kernels.is_pallas(kernel)
    if key_mask is None:
        fn = lambda q, k, v: kernel(q, k, v, None)
        return jax.shard_map(fn, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                             check_vma=check)(q, k, v)
    return jax.shard_map(kernel, in_specs=(q_spec, kv_spec, kv_spec, P(batch, None)),
                         out_specs=q_spec, check_vma=check)(q, k, v, key_mask)
