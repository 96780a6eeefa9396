r"""Memory of loading a DiT's weights for sampling: the whole train state before, EMA only now.

  python benchmarks/load_memory.py --output=benchmarks/results/load_memory.json

Until the workdir module (issue 14), `load_ema_params` rebuilt AdamW from the training config and
restored the whole TrainState (parameters, AdamW's two moments, EMA, step) onto one device, then
kept only the EMA. `workdir.load_ema_params` reads the EMA subtree alone, straight into its shards
on a mesh. Two parts:

1. Accounting for `--variant` (default the 1.5B flagship), from `jax.eval_shape` and the
   shardings of the 'fsdp' preset (nothing allocated): bytes the old loader put on its one
   device, against the bytes per device of the EMA weights over meshes of 1 and 8 devices (and,
   for scale, 64 and 256: the per-device bytes of an fsdp-sharded tree are computed from the
   shardings of an 8-device mesh scaled by the axis size, exact for leaves the axis divides).
2. Measured for `--measure_variant` (default 'B', small enough to checkpoint here): a random
   train state is saved, then each loader runs in a fresh process on 8 forced CPU devices and
   reports its peak resident memory (VmHWM of /proc/self/status: unlike ru_maxrss it is not
   inherited from the parent process) over the same process doing everything but the load
   (imports, abstract trees, mesh).

Prints one JSON object and writes it to --output if given.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30


def _setup(variant: str):
    """(config, model init_fn, tx) of the runlocal-sized config with DiT `variant` at the main job's
    latent shape."""
    import numpy as np
    from pixeldance import configs
    from pixeldance import workdir as workdir_lib
    from pixeldance.trainers import dit as dit_trainer
    config = configs.load_config(os.path.join(REPO, f"experiments/base.py:dit={variant}"))
    latent = (5, 8, 8, 16)
    stats = workdir_lib.LatentStats(np.zeros(16, np.float32), np.ones(16, np.float32))
    _, init_fn, tx, _ = dit_trainer.train_setup(config, latent, stats)
    return config, init_fn, tx


def _tree_bytes(tree) -> int:
    import jax
    import numpy as np
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def accounting(variant: str) -> dict:
    import jax
    from pixeldance import sharding, train_lib
    from pixeldance import workdir as workdir_lib
    from pixeldance.tools.plan import shard_bytes
    _, init_fn, tx = _setup(variant)
    rng = jax.random.key(0)
    out = dict(variant=variant)
    mesh1 = sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1])
    abstract, _ = train_lib.state_shardings(init_fn, tx, mesh1, "fsdp", rng)
    out["num_params"] = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    out["before_train_state_bytes_one_device"] = _tree_bytes(abstract)
    ema_total = _tree_bytes(abstract.ema_params)
    out["ema_bytes"] = ema_total
    per_device = {}
    for n in (1, 8):
        mesh = sharding.make_mesh((1, n, 1, 1), jax.devices()[:n])
        params, shardings = workdir_lib.abstract_params(init_fn, mesh, "fsdp")
        per_device[n] = shard_bytes(params, shardings)
    # Larger meshes: the bytes sharded over 'fsdp' shrink with the axis; the replicated rest stays.
    replicated = (per_device[8] * 8 - ema_total) / 7
    for n in (64, 256):
        per_device[n] = int(replicated + (ema_total - replicated) / n)
    out["after_ema_bytes_per_device"] = {str(k): int(v) for k, v in per_device.items()}
    return out


def _peak_rss_kib() -> int:
    """This process's peak resident memory (VmHWM), KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _child(mode: str, directory: str, variant: str):
    """Runs in a fresh process: prints {'baseline_kib', 'peak_kib'} for loading with `mode`."""
    import jax
    from pixeldance import sharding, train_lib
    from pixeldance import workdir as workdir_lib
    from pixeldance.checkpoint import Checkpointer, abstract_like
    _, init_fn, tx = _setup(variant)
    mesh = sharding.make_mesh((1, -1, 1, 1)) if mode == "ema_sharded_8" else \
        sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1])
    abstract, _ = train_lib.state_shardings(init_fn, tx, mesh, "fsdp", jax.random.key(0))
    workdir_lib.abstract_params(init_fn, mesh, "fsdp")
    baseline = _peak_rss_kib()
    if mode == "whole_state":  # the old loader: every part of the train state on one device
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        ckpt = Checkpointer(directory, use_async=False)
        state, _ = ckpt.restore(abstract_like(abstract, jax.tree.map(lambda _: device, abstract)))
        ckpt.close()
        params = state.ema_params
    else:
        params, _ = workdir_lib.load_ema_params(directory, init_fn, mesh, "fsdp")
    jax.block_until_ready(params)
    peak = _peak_rss_kib()
    print(json.dumps(dict(baseline_kib=baseline, peak_kib=peak, loaded_bytes=_tree_bytes(params))))


def measure(variant: str) -> dict:
    import jax
    from pixeldance import sharding, train_lib
    from pixeldance.checkpoint import Checkpointer
    _, init_fn, tx = _setup(variant)
    mesh = sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1])
    rng = jax.random.key(0)
    out = dict(variant=variant, devices=8)
    with tempfile.TemporaryDirectory() as tmp:
        directory = os.path.join(tmp, "dit")
        abstract, shardings = train_lib.state_shardings(init_fn, tx, mesh, "fsdp", rng)
        state = train_lib.init_state(init_fn, tx, shardings, rng)
        out["checkpoint_bytes"] = _tree_bytes(abstract)
        ckpt = Checkpointer(directory, use_async=False)
        ckpt.save(1, state, force=True)
        ckpt.close()
        del state
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
        for mode in ("whole_state", "ema_one_device", "ema_sharded_8"):
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--dir", directory,
                                   "--measure_variant", variant], env=env, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            out[mode] = dict(peak_rss_over_baseline_bytes=(got["peak_kib"] - got["baseline_kib"]) * 1024,
                             loaded_bytes=got["loaded_bytes"])
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="1.5B")
    ap.add_argument("--measure_variant", default="B")
    ap.add_argument("--output", default="")
    ap.add_argument("--child", default="")
    ap.add_argument("--dir", default="")
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.dir, args.measure_variant)
        return
    import jax
    if len(jax.devices()) < 8:
        raise SystemExit("run with 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 "
                         "JAX_PLATFORMS=cpu python benchmarks/load_memory.py ...")
    result = dict(accounting=accounting(args.variant), measured=measure(args.measure_variant),
                  cpu=_cpu_model(), jax=jax.__version__)
    print(json.dumps(result, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
