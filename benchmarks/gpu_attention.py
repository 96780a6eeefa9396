r"""Attention kernels on a GPU: cuDNN flash attention against plain XLA, agreement and speed.

  python benchmarks/gpu_attention.py --output=benchmarks/results/gpu_attention.jsonl
  python benchmarks/gpu_attention.py --quick            # one small shape, agreement only

For each shape [B, L, N, K] (self-attention, L = M) and for cross-attention to a short text
(M = 12 or 64 keys, some masked out), in bfloat16:
  * agreement: the output and the gradients of sum(out * w) with respect to q, k and v from
    `pixeldance.models.attention.dot_product_attention` with implementation 'cudnn' and 'xla',
    each against a float32 XLA reference (max-abs error over the max-abs of the reference);
  * which kernel the library picks on this backend (`pick_implementation`);
  * speed: forward and forward + backward times (median of --iters calls after warm-up, each
    call synchronised), and the achieved TFLOP/s (4 B N L M K per forward, 2.5x that for
    forward + backward: the backward pass recomputes the scores once).
One JSON line per shape. Absolute times are only meaningful on an accelerator.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from pixeldance.models import attention, attention_kernels

# Video self-attention at the flagship's token counts (256^2 x 17 frames -> 1,280 tokens, 5 x
# 512^2 -> 5,120, 31 x 64 x 64 / 4 -> 7,936 per context shard of the long config), and the
# size-table head widths (64 for S/B/L/XL, 128 for the 1.5B).
SHAPES = [(8, 1280, 12, 64), (4, 1280, 12, 128), (2, 5120, 16, 64), (1, 7936, 12, 128)]
CROSS = [(8, 1280, 12, 64, 12), (4, 1280, 12, 128, 64)]


def _timed(fn, iters: int) -> float:
    fn()  # warm-up (compiles)
    jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def measure(B, L, N, K, M=None, iters=10, timing=True) -> dict:
    M = L if M is None else M
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, L, N, K), jnp.float32)
    k = jax.random.normal(ks[1], (B, M, N, K), jnp.float32)
    v = jax.random.normal(ks[2], (B, M, N, K), jnp.float32)
    w = jax.random.normal(ks[3], (B, L, N, K), jnp.float32)
    # Cross-attention: the text's padding is masked (the last quarter of the keys).
    key_mask = None if M == L else jnp.arange(M)[None, :].repeat(B, 0) < (3 * M) // 4

    def loss(q, k, v, impl, dtype):
        out = attention.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                              key_mask=key_mask, implementation=impl)
        return jnp.sum(out.astype(jnp.float32) * w), out

    def fwd_bwd(impl, dtype):
        return jax.jit(jax.value_and_grad(lambda q, k, v: loss(q, k, v, impl, dtype), argnums=(0, 1, 2),
                                          has_aux=True))

    (_, ref_out), ref_grads = fwd_bwd("xla", jnp.float32)(q, k, v)
    row = dict(benchmark="gpu_attention", shape=dict(B=B, L=L, M=M, N=N, K=K), masked=key_mask is not None,
               picked=attention_kernels.pick_implementation(q.shape, k.shape, jnp.bfloat16))
    for impl in ("cudnn", "xla"):
        try:
            (_, out), grads = fwd_bwd(impl, jnp.bfloat16)(q, k, v)
            err = dict(out=_rel_err(out, ref_out),
                       **{f"d{n}": _rel_err(g, r) for n, g, r in zip("qkv", grads, ref_grads)})
            r = dict(rel_err_vs_f32=err)
            if timing:
                qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
                f = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, key_mask=key_mask,
                                                                            implementation=impl))
                g = fwd_bwd(impl, jnp.bfloat16)
                t_f = _timed(lambda: f(qb, kb, vb), iters)
                t_fb = _timed(lambda: g(q, k, v), iters)
                flops = 4 * B * N * L * M * K
                r.update(fwd_ms=t_f * 1e3, fwd_bwd_ms=t_fb * 1e3, fwd_tflops=flops / t_f / 1e12,
                         fwd_bwd_tflops=2.5 * flops / t_fb / 1e12)
        except Exception as e:  # noqa: BLE001 - record which kernel refuses which shape
            r = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        row[impl] = r
    if "fwd_ms" in row["cudnn"] and "fwd_ms" in row["xla"]:
        row["speedup_fwd"] = row["xla"]["fwd_ms"] / row["cudnn"]["fwd_ms"]
        row["speedup_fwd_bwd"] = row["xla"]["fwd_bwd_ms"] / row["cudnn"]["fwd_bwd_ms"]
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="one small self- and cross-attention shape, no timing")
    p.add_argument("--output", default=None, help="append JSON lines to this file")
    args = p.parse_args()
    if args.quick:
        cases, timing = [(2, 256, 4, 64, None), (2, 256, 4, 64, 12)], False
    else:
        cases, timing = [s + (None,) for s in SHAPES] + [tuple(c) for c in CROSS], True
    info = dict(backend=jax.default_backend(), device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                host=platform.node(), date=time.strftime("%Y-%m-%d %H:%M"))
    for B, L, N, K, M in cases:
        row = measure(B, L, N, K, M, iters=args.iters, timing=timing)
        row.update(info)
        line = json.dumps(row)
        print(line, flush=True)
        if args.output:
            with open(args.output, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
