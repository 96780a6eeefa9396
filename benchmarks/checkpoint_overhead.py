r"""Per-step overhead of asynchronous checkpointing at one save per `--every` steps.

  python benchmarks/checkpoint_overhead.py --variant=shapes --batch=4 --output=benchmarks/results/checkpoint_overhead.json
  python benchmarks/checkpoint_overhead.py --variant=S --batch=1 --frames=2 --latent=8 --output=benchmarks/results/checkpoint_overhead.json

The DiT train step of `trainers/dit.py` (AdamW, EMA; donated state) runs in windows of `--every`
steps, with metrics fetched every `--log_every` steps as `train_lib.train_loop` does. Windows
alternate: one starts with `Checkpointer.save` (Orbax, async: the loop waits only while the
arrays are copied off the devices; the write runs in background threads during the next steps),
the next saves nothing; a save window ends when its write is complete. Overhead per step =
median(window with a save) / median(window without) - 1, in wall time and in this process's CPU
time. On a shared CPU the wall times swing with other jobs' load; the CPU times do not, and the
CPU overhead is what a save costs where compute and checkpoint writes share the cores. On an
accelerator the steps run on the device while the host writes, so only the blocking part
(`save_blocking_s`) delays training.
A checkpoint holds the parameters, the EMA and AdamW's two moments: 16 bytes per parameter.

Prints one JSON object and adds it (keyed by variant) to --output if given.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import jax
import numpy as np
from flax import linen as nn

from pixeldance import configs, sharding, train_lib
from pixeldance import workdir as workdir_lib
from pixeldance.checkpoint import Checkpointer
from pixeldance.trainers import dit as dit_trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(args):
    """(config, init_fn, loss_fn, host batch) for a DiT of `args.variant` on random latents."""
    config = configs.load_config(os.path.join(REPO, "experiments", "shapes.py"))
    config = configs.override(config, **{"dit.variant": args.variant, "train.batch_size": args.batch})
    T, h, C, S = args.frames, args.latent, 16, config.text.max_length
    stats = workdir_lib.LatentStats(np.zeros(C, np.float32), np.ones(C, np.float32))
    _, init_fn, _, loss_fn = dit_trainer.train_setup(config, (T, h, h, C), stats)
    rng = np.random.default_rng(0)
    batch = dict(z=rng.normal(size=(args.batch, T, h, h, C)).astype(np.float32),
                 z_last=rng.normal(size=(args.batch, config.cond.last_from, h, h, C)).astype(np.float32),
                 tokens=rng.integers(1, 20, (args.batch, S)).astype(np.int32))
    return config, init_fn, loss_fn, batch


def windows(*, args, state, step_fn, batch, batch_sh, checkpointer) -> dict:
    """Wall and CPU seconds of each window of args.every steps; even windows start with a save
    and end when its write is complete, so all the save's work is counted in its window."""
    seconds, cpu, blocking, step = {"save": [], "none": []}, {"save": [], "none": []}, [], int(state.step)
    device_batch = train_lib.to_global(batch, batch_sh)
    for w in range(2 * args.pairs):
        kind = "save" if w % 2 == 0 else "none"
        jax.block_until_ready(state)
        t0, c0 = time.perf_counter(), time.process_time()
        pending = []
        for i in range(args.every):
            state, metrics = step_fn(state, device_batch, jax.random.key(1))
            step += 1
            pending.append(metrics)
            if i == 0 and kind == "save":
                t1 = time.perf_counter()
                checkpointer.save(step, state, {"next_index": step})
                blocking.append(time.perf_counter() - t1)
            if step % args.log_every == 0:
                jax.device_get(pending)
                pending = []
        jax.block_until_ready(state)
        checkpointer.wait()
        seconds[kind].append(time.perf_counter() - t0)
        cpu[kind].append(time.process_time() - c0)
    return dict(seconds=seconds, cpu_seconds=cpu, save_blocking_s=blocking, state=state)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="shapes")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=5, help="latent frames T")
    p.add_argument("--latent", type=int, default=8, help="latent height = width")
    p.add_argument("--every", type=int, default=100, help="steps between saves")
    p.add_argument("--log_every", type=int, default=50)
    p.add_argument("--pairs", type=int, default=3, help="windows of each kind, alternating")
    p.add_argument("--output", default=None)
    args = p.parse_args()

    config, init_fn, loss_fn, batch = build(args)
    mesh = sharding.make_mesh((1, -1, 1, 1))
    preset = "fsdp"
    tx = train_lib.stage_optimizer(config.train)
    workdir = tempfile.mkdtemp(prefix="ckpt_overhead_")
    checkpointer = Checkpointer(os.path.join(workdir, "dit"), keep=2)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(preset)):
        abstract, state_sh = train_lib.state_shardings(init_fn, tx, mesh, preset, jax.random.key(0))
        batch_sh = sharding.batch_sharding(mesh)
        compiled = train_lib.compile_step(train_lib.make_scheduled_step(loss_fn, tx, config.train.ema_decay),
                                          state_sh, batch_sh, mesh)
        step_fn = lambda state, batch, rng: compiled(state, batch, rng, tx.lengths)  # noqa: E731
        state = train_lib.init_state(init_fn, tx, state_sh, jax.random.key(0))
        t0 = time.perf_counter()
        warm = windows(args=argparse.Namespace(**{**vars(args), "pairs": 1, "every": 5}), state=state,
                       step_fn=step_fn, batch=batch, batch_sh=batch_sh, checkpointer=checkpointer)
        compile_s = time.perf_counter() - t0
        run = windows(args=args, state=warm["state"], step_fn=step_fn, batch=batch, batch_sh=batch_sh,
                      checkpointer=checkpointer)
    checkpointer.close()
    shutil.rmtree(workdir, ignore_errors=True)

    save_s, none_s = (float(np.median(run["seconds"][k])) for k in ("save", "none"))
    save_cpu, none_cpu = (float(np.median(run["cpu_seconds"][k])) for k in ("save", "none"))
    num_params = sum(x.size for x in jax.tree.leaves(abstract.params))
    out = dict(
        benchmark="checkpoint_overhead", variant=args.variant, params=num_params,
        checkpoint_bytes=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract)),
        batch=args.batch, latent=[args.frames, args.latent, args.latent, 16], every=args.every,
        pairs=args.pairs, step_s=none_s / args.every, overhead_per_step=save_s / none_s - 1,
        seconds_per_save=save_s - none_s, save_blocking_s_median=float(np.median(run["save_blocking_s"])),
        cpu_overhead_per_step=save_cpu / none_cpu - 1, cpu_seconds_per_save=save_cpu - none_cpu,
        window_seconds=run["seconds"], window_cpu_seconds=run["cpu_seconds"], compile_and_warmup_s=compile_s, backend=jax.default_backend(),
        devices=jax.device_count(), jax=jax.__version__, cpus=os.cpu_count(), machine=platform.machine(),
        load_avg=os.getloadavg(), nice=os.nice(0))
    print(json.dumps(out, indent=1))
    if args.output:
        results = {}
        if os.path.exists(args.output):
            with open(args.output) as f:
                results = json.load(f)
        results[args.variant] = out
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
