r"""Encode and decode throughput: our Flax port of the Wan 2.1 VAE against diffusers' model.

  nice -n 15 python benchmarks/vae_wan_speed.py --frames=17 --size=128 --rounds=5 \
      --output=benchmarks/results/vae_wan_speed.json

Both sides build the released Wan 2.1 architecture (`AutoencoderKLWan()` defaults, 127M
parameters) with random weights and run the same clip, float32 on the CPU. Protocol
(shared/refs/BENCHMARKS.md): each side in its own subprocess, pinned to the same core
(`--cpu`), one thread each (`torch.set_num_threads(1)`; XLA's single-threaded Eigen and one
intra-op thread), interleaved jax / torch / jax / torch per measurement so both see the same
load, warm-up (and the JAX compile) excluded, medians and minimums reported. The children stay
alive and time one call per request on stdin, so each compiles once. Each call records wall
time and the process's CPU time (user + system, all threads): on a shared, oversubscribed
machine the wall time mostly measures the share of the core a side got, while the CPU time
still measures the work, so the ratios are given for both.

Sides: `jax` = `WanVAE.encode` / `.decode` (one pass, jitted); `jax_nearest` = the same with the
decoder's upsampling as nearest 2x then a 3x3 conv at the high resolution (before `UpsampleConv`),
to measure that change; `torch` = diffusers' `encode` / `decode` (its own chunked passes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Children: build one side, then time one call per line read from stdin.
# ---------------------------------------------------------------------------------------------

def _video(frames: int, size: int, seed: int = 0):
    import numpy as np
    rng = np.random.RandomState(seed)
    coarse = rng.uniform(-1, 1, (1, frames, size // 8, size // 8, 3)).astype(np.float32)
    return np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)  # [1, F, H, W, 3], smooth


def _jax_side(frames: int, size: int, nearest: bool):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from pixeldance.convert import wan_vae as convert
    from pixeldance.models import causal_conv, wan_vae

    if nearest:
        class NearestUpsampleConv(wan_vae.UpsampleConv):
            """The upsampling before `UpsampleConv`: nearest 2x, then the 3x3 conv (same parameters)."""
            @wan_vae.nn.compact
            def __call__(self, x):
                kernel, bias = wan_vae._conv_params(self, (3, 3, x.shape[-1], self.features),
                                                    wan_vae._CONV2D_AXES, self.dtype)
                x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
                return causal_conv.conv_frames(x.astype(self.dtype), kernel, per_frame=None) + bias
        wan_vae.UpsampleConv = NearestUpsampleConv
    model = wan_vae.WanVAE(**wan_vae.WAN21)
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.02, x.shape), jnp.float32),
                          convert.abstract_params(model))
    video = jnp.asarray(_video(frames, size))
    encode = jax.jit(lambda p, v: model.apply(p, v, method=model.encode)[0])
    decode = jax.jit(lambda p, z: model.apply(p, z, method=model.decode))
    z = encode(params, video).block_until_ready()
    decode(params, z).block_until_ready()
    return dict(encode=lambda: encode(params, video).block_until_ready(),
                decode=lambda: decode(params, z).block_until_ready())


def _torch_side(frames: int, size: int):
    import torch
    from diffusers import AutoencoderKLWan
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = AutoencoderKLWan().eval()
    video = torch.from_numpy(_video(frames, size)).permute(0, 4, 1, 2, 3).contiguous()
    with torch.no_grad():
        z = model.encode(video).latent_dist.mean
        model.decode(z)

    def encode():
        with torch.no_grad():
            model.encode(video)

    def decode():
        with torch.no_grad():
            model.decode(z)
    return dict(encode=encode, decode=decode)


def child(side: str, frames: int, size: int):
    fns = _torch_side(frames, size) if side == "torch" else _jax_side(frames, size, side == "jax_nearest")
    print("ready", flush=True)
    for line in sys.stdin:
        what = line.strip()
        if what == "quit":
            break
        t0, c0 = time.perf_counter(), time.process_time()
        fns[what]()
        print(f"{time.perf_counter() - t0:.6f} {time.process_time() - c0:.6f}", flush=True)


# ---------------------------------------------------------------------------------------------
# Parent: start the children, interleave, summarise.
# ---------------------------------------------------------------------------------------------

def _env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    return env


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="timed calls per side and direction")
    p.add_argument("--sides", default="jax,torch", help="comma-separated, of jax, torch, jax_nearest")
    p.add_argument("--cpu", default="1", help="core all sides are pinned to (taskset -c)")
    p.add_argument("--output", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.frames, args.size)

    sides = args.sides.split(",")
    load_before = os.getloadavg()
    procs = {}
    for side in sides:  # started one after another: the builds and compiles do not overlap
        cmd = ["taskset", "-c", args.cpu, sys.executable, os.path.abspath(__file__), f"--child={side}",
               f"--frames={args.frames}", f"--size={args.size}"]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(1))
        line = proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"{side} side failed to start (exit {proc.wait()})")
        procs[side] = proc
        print(f"{side}: ready", file=sys.stderr)

    times = {side: dict(encode=[], decode=[]) for side in sides}  # (wall s, CPU s) per call
    for r in range(args.rounds):
        for what in ("encode", "decode"):
            for side in sides:
                proc = procs[side]
                proc.stdin.write(what + "\n")
                proc.stdin.flush()
                times[side][what].append(tuple(float(x) for x in proc.stdout.readline().split()))
        print(f"round {r + 1}/{args.rounds} (wall / CPU s, encode; decode): " + ", ".join(
            f"{s} {times[s]['encode'][-1][0]:.1f}/{times[s]['encode'][-1][1]:.1f}; "
            f"{times[s]['decode'][-1][0]:.1f}/{times[s]['decode'][-1][1]:.1f}" for s in sides), file=sys.stderr)
    for proc in procs.values():
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        proc.wait()

    summary = {side: {what: dict(wall_median_s=statistics.median(w for w, _ in t), wall_min_s=min(w for w, _ in t),
                                 cpu_median_s=statistics.median(c for _, c in t), cpu_min_s=min(c for _, c in t),
                                 all_wall_cpu_s=t)
                      for what, t in d.items()} for side, d in times.items()}
    ratios = {}
    for side in sides:
        for base in ("torch", "jax_nearest"):
            if side == base or base not in sides or (base == "jax_nearest" and side != "jax"):
                continue
            for what in ("encode", "decode"):
                for stat in ("cpu_median_s", "cpu_min_s", "wall_median_s", "wall_min_s"):
                    ratios[f"{what}_speedup_{side}_over_{base}_{stat[:-2]}"] = (
                        summary[base][what][stat] / summary[side][what][stat])
    import diffusers
    import jax
    import torch
    result = dict(
        benchmark="vae_wan_speed", date=time.strftime("%Y-%m-%d %H:%M"), model="Wan 2.1 VAE (AutoencoderKLWan defaults)",
        input=dict(shape_bcthw=[1, 3, args.frames, args.size, args.size], dtype="float32"),
        threads=1, pinned_cpu=args.cpu, xla_flags=_env(1)["XLA_FLAGS"], rounds=args.rounds,
        versions=dict(jax=jax.__version__, torch=torch.__version__, diffusers=diffusers.__version__,
                      python=platform.python_version()),
        machine=platform.processor() or platform.machine(), nice=os.nice(0),
        load_average_before=load_before, load_average_after=os.getloadavg(),
        times=summary, **ratios)
    print(json.dumps({k: v for k, v in result.items() if k != "times"}, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
