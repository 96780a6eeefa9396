"""The one attention function every model calls; it picks the kernel for the backend.

Axis glossary: B batch, L query length, M key length, N heads, K head width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_product_attention(q, k, v, *, key_mask=None, implementation: str | None = None):
    """Softmax attention.

    Args:
      q: [B, L, N, K]; k, v: [B, M, N, K].
      key_mask: optional bool [B, M], True where a key may be attended to.
      implementation: None picks per backend ('cudnn' on GPU for float16/bfloat16, XLA
        elsewhere); or 'xla' / 'cudnn' to force one.
    Returns:
      [B, L, N, K] in q's dtype.
    """
    if implementation is None:
        backend = jax.default_backend()
        implementation = "cudnn" if backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) else "xla"
    mask = None
    if key_mask is not None:
        mask = key_mask[:, None, None, :]  # [B, 1(N), 1(L), M]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
