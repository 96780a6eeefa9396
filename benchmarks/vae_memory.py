r"""Peak memory of decoding a long video in one pass against chunk by chunk (causal cache).

  nice -n 15 python benchmarks/vae_memory.py --variant=S --size=128 --latents=2,5,9,17,33 \
      --rss=2,9,33 --output=benchmarks/results/vae_memory.json

For each number of latent frames T (F = 1 + 4(T-1) pixel frames) it compiles
`CausalVAE.decode` and `vae_inference.decode_chunked` (one latent frame per chunk) for abstract
inputs and reads XLA's `memory_analysis()`: temporaries (activations) and output bytes, so no
parameters are allocated and nothing runs. With `--rss`, it also decodes for real in a fresh
subprocess per (T, mode) and records the child's peak resident set size (includes the JAX
runtime, ~0.3-0.5 GB, the parameters and the output), so the compiled numbers are checked
against the process's actual footprint.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(variant: str, size: int, latents: int):
    import jax
    import jax.numpy as jnp
    from flax import linen as nn
    from pixeldance.models import vae as vae_lib
    from pixeldance.models import vae_inference
    model = vae_lib.vae_from_variant(variant)
    s = model.spatial_factor
    params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1, size, size, 3))))
    z = jax.ShapeDtypeStruct((1, latents, size // s, size // s, model.latent_channels), jnp.float32)
    fns = dict(whole=lambda p, z: model.apply(p, z, method=model.decode),
               chunked=lambda p, z: vae_inference.decode_chunked(model, p, z))
    return model, params, z, fns


def compiled_memory(variant: str, size: int, latents: int) -> dict:
    import jax
    _, params, z, fns = _setup(variant, size, latents)
    out = {}
    for mode, fn in fns.items():
        mem = jax.jit(fn).lower(params, z).compile().memory_analysis()
        out[mode] = dict(temp_bytes=int(mem.temp_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
                         argument_bytes=int(mem.argument_size_in_bytes))
    return out


def rss_child(variant: str, size: int, latents: int, mode: str):
    """Decodes once for real and prints the peak RSS in bytes (after the run)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    _, params, z, fns = _setup(variant, size, latents)
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.02, x.shape), jnp.float32), params)
    zz = jnp.asarray(rng.normal(size=z.shape), jnp.float32)
    compiled = jax.jit(fns[mode]).lower(params, zz).compile()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    compiled(params, zz).block_until_ready()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(peak_rss_bytes=after, peak_rss_before_run_bytes=before)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="S", help="CausalVAE size-table name")
    p.add_argument("--size", type=int, default=128, help="frame height and width in pixels")
    p.add_argument("--latents", default="2,5,9,17,33", help="latent frame counts T (compiled memory)")
    p.add_argument("--rss", default="", help="latent frame counts to also run for real (peak RSS)")
    p.add_argument("--output", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, latents = args.child.split(":")
        return rss_child(args.variant, args.size, int(latents), mode)

    import jax
    rows = []
    for t in [int(x) for x in args.latents.split(",")]:
        mem = compiled_memory(args.variant, args.size, t)
        rows.append(dict(latents=t, frames=1 + 4 * (t - 1), compiled=mem))
        print(f"T={t:3d} F={1 + 4 * (t - 1):4d}: " + ", ".join(
            f"{m} temp {v['temp_bytes'] / 2**20:8.1f} MiB out {v['output_bytes'] / 2**20:6.1f} MiB"
            for m, v in mem.items()), file=sys.stderr)
    rss = []
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for t in [int(x) for x in args.rss.split(",") if x]:
        for mode in ("whole", "chunked"):
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={mode}:{t}",
                                   f"--variant={args.variant}", f"--size={args.size}"],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-2000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rss.append(dict(latents=t, frames=1 + 4 * (t - 1), mode=mode, **r))
            print(f"RSS T={t} {mode}: {r['peak_rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    result = dict(benchmark="vae_memory", date=time.strftime("%Y-%m-%d %H:%M"), variant=args.variant,
                  frame_size=args.size, jax=jax.__version__, backend=jax.default_backend(),
                  chunk="1 latent frame", compiled=rows, rss=rss)
    print(json.dumps(result, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
