r"""A/B the main job's DiT train step under config overrides, interleaved in one process.

  python benchmarks/step_ab.py --workdir=WORKDIR \
      --variants='{"default": {}, "flow": {"diffusion.objective": "flow"}}' \
      [--config=experiments/shapes.py] [--steps=40] [--rounds=4] [--output=results/x.jsonl]

WORKDIR is a main-job workdir with a latent cache (after its `cache` stage). Each variant's train
step (`trainers.dit.train_setup`, jitted with the state donated, one device) is compiled first;
then `--rounds` rounds each time `--steps` steps of every variant in turn on the same four cached
batches, so a load that comes and goes falls on all variants alike. Reported: steps/s per round
and the best round per variant, with the CPU model. Use it to tell a change in the step from a
change in the machine: the main job's per-window rates vary by 30 % within one run.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from pixeldance import configs, train_lib
from pixeldance import workdir as workdir_lib
from pixeldance.data import pipeline
from pixeldance.models import text as text_lib
from pixeldance.trainers import dit as dit_trainer


def build_step(config, workdir: str, num_batches: int = 4):
    """(jitted step, initial state, device batches) of the DiT stage for `config` on `workdir`'s cache."""
    source = dit_trainer.video_cache_source(config, workdir)
    it = iter(pipeline.make_batches(source, batch_size=config.train.batch_size, seed=0))
    batches = [jax.device_put({k: np.asarray(v) for k, v in next(it).items()}) for _ in range(num_batches)]
    stats = workdir_lib.LatentStats.read(workdir)
    first = source[0]
    example = jax.tree.map(lambda v: np.asarray(v)[None], text_lib.text_input(first))
    _, init_fn, tx, loss_fn = dit_trainer.train_setup(config, first["z"].shape, stats, example, None)
    params = train_lib.strip_boxes(init_fn(jax.random.key(0)))
    state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                 ema_params=jax.tree.map(jnp.copy, params))  # donated: no shared buffers
    step = jax.jit(train_lib.make_train_step(loss_fn, tx, config.train.ema_decay), donate_argnums=0)
    return step, state, batches


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default="experiments/shapes.py")
    p.add_argument("--variants", required=True, help='JSON {name: {dotted.key: value}}')
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    base = configs.load_config(args.config)
    runs = {}
    for name, overrides in json.loads(args.variants).items():
        step, state, batches = build_step(configs.override(base, **overrides), args.workdir)
        t0 = time.perf_counter()
        state, m = step(state, batches[0], jax.random.key(0))
        jax.block_until_ready(m)
        print(f"{name}: compiled and ran one step in {time.perf_counter() - t0:.1f} s", flush=True)
        runs[name] = dict(step=step, state=state, batches=batches, rates=[])
    for _ in range(args.rounds):
        for r in runs.values():
            t0 = time.perf_counter()
            for i in range(args.steps):
                r["state"], m = r["step"](r["state"], r["batches"][i % len(r["batches"])], jax.random.key(i))
            jax.block_until_ready(m)
            r["rates"].append(round(args.steps / (time.perf_counter() - t0), 3))
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor()) if platform.system() == "Linux" else platform.processor()
    result = dict(benchmark="step_ab", config=args.config, workdir=args.workdir, steps=args.steps,
                  rounds=args.rounds, cpu=cpu, devices=str(jax.devices()[0]),
                  variants={n: dict(overrides=json.loads(args.variants)[n], steps_per_sec=r["rates"],
                                    best=max(r["rates"])) for n, r in runs.items()})
    print(json.dumps(result))
    if args.output:
        with open(args.output, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
