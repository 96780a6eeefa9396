r"""DiT train-step throughput: achieved FLOP/s against a matmul peak measured in-process.

  nice -n 5 python benchmarks/train_step.py --variant=S --batch=2 --frames=4 --latent=32 --remat=dots
  nice -n 5 python benchmarks/train_step.py --variant=B --batch=1 --frames=4 --latent=32 --remat=dots
  python benchmarks/train_step.py --variant=shapes [--batch=32 --frames=5 --latent=8 --repeats=5]
  # GPU: bfloat16 compute (cuDNN attention), float32 parameters, against a bfloat16 peak
  python benchmarks/train_step.py --variant=B --batch=16 --frames=5 --latent=32 --dtype=bfloat16 \
      --peak_dtype=bfloat16 --peak_n=8192 --repeats=10

Prints one JSON object (and appends it to --output if given). Model FLOPs are counted
analytically (`pixeldance.models.dit.dit_flops_per_sample` plus the text encoder): XLA's
cost analysis counts a scanned layer loop once. A train step is counted as 3x the forward
(recomputation under remat is not counted: it is overhead, not model FLOPs).

Fair timing on a shared CPU: each repeat times one train step and then the peak matmul (best
of 3 calls), back to back, so both see the same load. The ratio reported is best step over best
peak (`ratio`, the uncontended estimate) and the median of the per-repeat ratios
(`ratio_paired_median`); the load average before and after and the process's nice value are
recorded, so contended runs can be recognised.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from pixeldance import train_lib
from pixeldance.models import dit as dit_lib
from pixeldance.models import text as text_lib


def make_peak(n: int = 2048, dtype=jnp.float32):
    """A jitted n x n matmul in `dtype` (warmed up) -> a function timing one call in FLOP/s.

    float32 at 2048 on the CPU; on a GPU the compute dtype (bfloat16) at 8192, large enough to
    reach the tensor cores' rate.
    """
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    # Best of `reps` calls: one call right after a train step measured 40 % under the steady rate.
    return lambda reps=3: max(2 * n ** 3 / _timed(lambda: f(a, b).block_until_ready()) for _ in range(reps))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def text_flops_per_sample(length: int, width: int, layers: int) -> float:
    """Text encoder forward: per layer 2S(4W^2 attention projections + 8W^2 MLP) + 4S^2 W."""
    per_layer = 2 * length * (4 * width * width + 8 * width * width) + 4 * length * length * width
    return layers * per_layer


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="shapes", help="DiT size-table name (pixeldance.models.dit.DIT_VARIANTS)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--frames", type=int, default=5, help="latent frames T")
    p.add_argument("--latent", type=int, default=8, help="latent height = width")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--patch", type=int, default=2, help="spatial patch size")
    p.add_argument("--text_len", type=int, default=12)
    p.add_argument("--text_width", type=int, default=128)
    p.add_argument("--text_layers", type=int, default=2)
    p.add_argument("--remat", default="none", help=f"one of {sorted(dit_lib.REMAT_POLICIES)}")
    p.add_argument("--attention", default="full", help="full | factorised")
    p.add_argument("--attention_impl", default=None, help="attention kernel (default: per backend)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--scan_unroll", type=int, default=1, help="layers per iteration of the layer loop "
                   "(VideoDiT.scan_unroll; the main job's shapes DiT: 4, its whole depth)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak_dtype", default="float32", help="dtype of the peak matmul (bfloat16 on GPUs)")
    p.add_argument("--peak_n", type=int, default=2048, help="size of the peak matmul (8192 on GPUs)")
    p.add_argument("--output", default=None, help="append the JSON line to this file")
    args = p.parse_args()

    kwargs = dit_lib.decode_variant(args.variant)
    kwargs["patch_size"] = (1, args.patch, args.patch)
    dtype = jnp.dtype(args.dtype)
    model = dit_lib.PixelDanceModel(
        text_lib.TextEncoder(vocab_size=32, max_length=args.text_len, width=args.text_width,
                             num_layers=args.text_layers, num_heads=4, dtype=dtype),
        dit_lib.VideoDiT(latent_channels=args.channels, remat=args.remat, attention=args.attention,
                         attention_impl=args.attention_impl, dtype=dtype, scan_unroll=args.scan_unroll,
                         **kwargs))
    B, T, H, C, S = args.batch, args.frames, args.latent, args.channels, args.text_len
    rng = np.random.default_rng(0)
    batch = dict(x=rng.normal(size=(B, T, H, H, C)).astype(np.float32),
                 t=rng.uniform(size=(B,)).astype(np.float32),
                 c=rng.normal(size=(B, T, H, H, C)).astype(np.float32),
                 m=np.ones((B, T, H, H, 1), np.float32),
                 tokens=rng.integers(3, 32, size=(B, S)).astype(np.int32),
                 target=rng.normal(size=(B, T, H, H, C)).astype(np.float32))
    batch = jax.device_put(batch)  # on the device once: the step is timed, not the transfer
    params = nn.unbox(model.init(jax.random.key(0), batch["x"][:1], batch["t"][:1], batch["c"][:1],
                                 batch["m"][:1], batch["tokens"][:1]))
    tx = optax.adamw(1e-4)

    def loss_fn(p, b, rng):
        out = model.apply(p, b["x"], b["t"], b["c"], b["m"], b["tokens"])
        return jnp.mean(jnp.square(out - b["target"])), {}

    state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                 ema_params=jax.tree.map(jnp.copy, params))
    step = jax.jit(train_lib.make_train_step(loss_fn, tx, 0.999), donate_argnums=0)
    key = jax.random.key(0)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    state, m = step(state, batch, key)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    peak_fn = make_peak(args.peak_n, jnp.dtype(args.peak_dtype))
    times, peaks = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        state, m = step(state, batch, key)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
        peaks.append(peak_fn())

    tokens = T * (H // args.patch) ** 2
    fwd = dit_lib.dit_flops_per_sample(num_tokens=tokens, text_len=S, width=kwargs["width"],
                                       depth=kwargs["depth"], mlp_ratio=kwargs["mlp_ratio"],
                                       patch_dim_in=args.patch ** 2 * (2 * C + 1),
                                       patch_dim_out=args.patch ** 2 * C, attention=args.attention,
                                       num_frames=T)
    fwd += text_flops_per_sample(S, args.text_width, args.text_layers)
    flops = 3 * fwd * B
    median = float(np.median(times))
    result = dict(
        benchmark="train_step", variant=args.variant, batch=B, latent=[T, H, H, C], patch=args.patch,
        tokens=tokens, remat=args.remat, scan_unroll=args.scan_unroll, attention=args.attention,
        attention_impl=args.attention_impl,
        dtype=args.dtype, peak_dtype=args.peak_dtype, peak_n=args.peak_n, params=int(sum(x.size for x in jax.tree.leaves(params))),
        flops_per_step=flops, step_time_median_s=median, step_time_min_s=float(min(times)),
        compile_s=compile_s, achieved_flops=flops / min(times), peak_flops=float(max(peaks)),
        peak_flops_median=float(np.median(peaks)), ratio=flops / min(times) / max(peaks),
        ratio_paired_median=float(np.median([flops / t / pk for t, pk in zip(times, peaks)])),
        load_avg_before=load_before, load_avg_after=os.getloadavg(), nice=os.nice(0),
        backend=jax.default_backend(), devices=jax.device_count(), device=jax.devices()[0].device_kind, jax=jax.__version__,
        machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
        xla_flags=os.environ.get("XLA_FLAGS", ""), date=time.strftime("%Y-%m-%d %H:%M"))
    line = json.dumps(result)
    print(line)
    if args.output:
        with open(args.output, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
