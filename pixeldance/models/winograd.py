"""Causal 3D convolutions with 3x3 spatial kernels by Winograd's minimal filtering, F(2x2, 3x3).

Axis letters (glossary: pixeldance/models/__init__.py): B batch, T frames, H and W height and
width (even), C input and O output channels, kt time taps; Ht = H/2 and Wt = W/2 count the 2x2
output tiles.

Each 2x2 output tile of a 3x3 'SAME' conv is computed from its 4x4 input tile as
``A^T [(G g G^T) * (B^T d B)] A``: 16 products per input and output channel pair instead of 36
(2.25x fewer multiplies), as 16 matmuls [tiles, C] @ [C, O], one per tile element. For a causal
3D conv the transformed input of a frame is the same for all of its time taps, so each frame is
transformed once, the taps are summed in the transformed domain, and one output transform
follows: the transforms cost O(C + O) per pixel against O(C * O) for the matmuls, which is why
this wins only for wide convs (on this repository's CPU, at 192 channels and more; see
`benchmarks/README.md`). Results equal the direct conv up to float32 rounding (relative error
about 1e-6: the transforms only add, subtract and halve).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# F(2, 3): output tile y = A^T [(G g) * (B^T d)], for a 4-tap input tile d and a 3-tap filter g.
_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], np.float32)


def _input_1d(x: jax.Array, axis: int) -> list[jax.Array]:
    """B^T d along `axis` for every tile: x of length 2n + 2 (zero padded) -> 4 arrays of length n."""
    n = (x.shape[axis] - 2) // 2
    d = [lax.slice_in_dim(x, k, k + 2 * n - 1, stride=2, axis=axis) for k in range(4)]
    return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _output_1d(m: list[jax.Array]) -> list[jax.Array]:
    """A^T m: 4 transformed values -> the 2 outputs of a tile."""
    return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def transform_input(x: jax.Array) -> list[jax.Array]:
    """x [B, T, H, W, C] -> 16 arrays [B, T, Ht, Wt, C] (index 4a + b): every 4x4 tile (stride 2,
    'SAME' zero padding) transformed as B^T d B."""
    xp = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
    return [v for rows in _input_1d(xp, 2) for v in _input_1d(rows, 3)]


def transform_kernel(kernel: jax.Array) -> jax.Array:
    """kernel [3, 3, C, O] -> G g G^T [16, C, O] (index 4a + b)."""
    g = jnp.asarray(_G, kernel.dtype)
    u = jnp.einsum("ay,bx,yxio->abio", g, g, kernel)
    return u.reshape((16,) + kernel.shape[2:])


def transform_output(m: list[jax.Array]) -> jax.Array:
    """16 arrays [B, T, Ht, Wt, O] (index 4a + b) -> the output tiles A^T m A, [B, T, 2Ht, 2Wt, O]."""
    cols = [_output_1d([m[4 * a + b] for a in range(4)]) for b in range(4)]  # cols[b][i]
    y = [_output_1d([cols[b][i] for b in range(4)]) for i in range(2)]  # y[i][j]
    y = jnp.stack([jnp.stack(y[i], axis=-2) for i in range(2)], axis=-4)  # [B, T, Ht, 2, Wt, 2, O]
    b, t, ht, _, wt, _, o = y.shape
    return y.reshape(b, t, 2 * ht, 2 * wt, o)


def _matmul(v: jax.Array, u: jax.Array) -> jax.Array:
    """[..., C] @ [C, O] as one 2D matmul (the form XLA:CPU runs at its GEMM rate)."""
    return jnp.dot(v.reshape(-1, v.shape[-1]), u).reshape(v.shape[:-1] + (u.shape[-1],))


def causal_conv(x: jax.Array, kernel: jax.Array, *, past: jax.Array | None = None) -> jax.Array:
    """The causal conv of `causal_conv.causal_conv` with zero padding (or `past`), by F(2x2, 3x3).

    x [B, T, H, W, C] with H and W even, kernel [kt, 3, 3, C, O], past [B, kt-1, H, W, C] or None
    (zero frames before frame 0, whose products are skipped) -> [B, T, H, W, O].
    """
    kt, kh, kw = kernel.shape[:3]
    t, height, width = x.shape[1:4]
    if (kh, kw) != (3, 3) or height % 2 or width % 2:
        raise ValueError(f"winograd.causal_conv: needs a 3x3 spatial kernel and even H, W; got kernel "
                         f"{tuple(kernel.shape)} on frames {height}x{width}")
    seq = x if past is None else jnp.concatenate([past.astype(x.dtype), x], axis=1)
    v = transform_input(seq)  # each frame once, for all of its taps
    u = [transform_kernel(kernel[a]) for a in range(kt)]
    m = []
    for e in range(16):
        if past is not None:  # output t reads seq frames t .. t+kt-1
            acc = sum(_matmul(v[e][:, a:a + t], u[a][e]) for a in range(kt))
        else:
            acc = _matmul(v[e], u[kt - 1][e])
            for a in range(kt - 1):
                lag = kt - 1 - a  # zero padding for outputs < lag
                if lag < t:
                    acc = acc + jnp.pad(_matmul(v[e][:, :t - lag], u[a][e]), ((0, 0), (lag, 0)) + ((0, 0),) * 3)
        m.append(acc)
    return transform_output(m)
