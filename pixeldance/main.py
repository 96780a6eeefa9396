r"""Entry point: `python -m pixeldance.main --config=experiments/x.py[:args] --workdir=DIR`.

Dispatches on `config.mode`:
  train      every stage in order: train_vae -> cache -> train_dit -> sample (evaluate)
  train_vae  the video VAE
  cache      encode training videos into the latent cache with the frozen VAE (and the images of
             config.train.image_source, if named, into the image cache); with config.data.buckets
             one cache per bucket
  train_dit  the DiT on the latent cache (with buckets: batches of one bucket's shape each)
  sample     sample the three modes, write videos and the faithfulness report
  plan       compile the DiT train step and sampler for config.plan's target mesh without its
             hardware; print memory per device and FLOPs, write plan.json (pixeldance/plan.py)

Each stage resumes from what the workdir holds: a restarted run continues from the newest
checkpoint of the stage it was in. Single fields: `--config.train.num_steps=100`.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from pixeldance import xla_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and samples.")

STAGES = ("train_vae", "cache", "train_dit", "sample")


def run_stage(stage: str, config, workdir: str):
    if stage == "train_vae":
        from pixeldance.trainers.vae import train_vae
        train_vae(config, workdir)
    elif stage == "cache":
        from pixeldance.tools.cache_latents import cache_latents
        cache_latents(config, workdir)
    elif stage == "train_dit":
        from pixeldance.trainers.dit import train_dit
        train_dit(config, workdir)
    elif stage == "sample":
        from pixeldance.evaluate import evaluate
        evaluate(config, workdir)
    else:
        raise ValueError(f"unknown mode {stage!r}; choose train or one of {STAGES}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config, workdir = _CONFIG.value, _WORKDIR.value
    if config is None or not workdir:
        raise app.UsageError("--config and --workdir are required")
    if config.mode == "plan":  # first: it may set the number of host devices (see plan.py)
        from pixeldance import plan
        os.makedirs(workdir, exist_ok=True)
        plan.run(config, workdir)
        return
    if config.get("xla_fast_compile") and not xla_flags.enable_fast_compile():
        logging.warning("xla_fast_compile ignored: a JAX backend was already running")
    stages = STAGES if config.mode == "train" else (config.mode,)
    for stage in stages:
        if stage not in STAGES:
            raise app.UsageError(f"unknown mode {config.mode!r}; choose train or one of {STAGES}")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=1))
    timing_path = os.path.join(workdir, "timing.json")
    timing = json.load(open(timing_path)) if os.path.exists(timing_path) else {}
    for stage in stages:
        t0 = time.time()
        logging.info("stage %s", stage)
        run_stage(stage, config, workdir)
        timing[stage] = timing.get(stage, 0.0) + time.time() - t0
        with open(timing_path, "w") as f:
            json.dump(timing, f, indent=1)
    print("seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in timing.items()))


def run():
    """Console script `pixeldance`."""
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)


if __name__ == "__main__":
    run()
