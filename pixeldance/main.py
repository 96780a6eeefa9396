r"""Train and sample an experiment, stage by stage, in one workdir.

  python -m pixeldance.main --config=experiments/x.py[:args] --workdir=DIR

Dispatches on `config.mode`:
  train      every stage in order: train_vae -> cache -> train_dit -> sample (evaluate)
  train_vae  the video VAE
  cache      encode training videos into the latent cache with the frozen VAE (and the images of
             config.train.image_source, if named, into the image cache); with config.data.buckets
             one cache per bucket
  train_dit  the DiT on the latent cache (with buckets: batches of one bucket's shape each)
  sample     sample the three modes, write videos and the faithfulness report
  plan       compile the DiT train step and sampler for config.plan's target mesh without its
             hardware; print memory per device and FLOPs, write plan.json (pixeldance/tools/plan.py)

Each stage resumes from what the workdir holds: a restarted run continues from the newest
checkpoint of the stage it was in. Single fields: `--config.train.num_steps=100`.
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before JAX is imported: glibc reads it only at start (hugepages.py)
    from pixeldance import hugepages
    hugepages.reexec()

import glob
import json
import os
import threading
import time

from absl import app, flags, logging
from ml_collections import config_flags

from pixeldance import build, cli, logs, train_lib, xla_flags
from pixeldance.checkpoint import CheckpointWriteError
from pixeldance import workdir as workdir_lib
from pixeldance.evaluators import common as eval_common
from pixeldance.evaluators import registry as eval_registry
from pixeldance.sample import check_sample_config, load_pipeline
from pixeldance.tools import plan
from pixeldance.trainers.cache import cache_latents
from pixeldance.trainers.dit import train_dit
from pixeldance.trainers.vae import train_vae


def define_flags():
    """--config and --workdir, defined only when run as a program: importing this module (tests,
    notebooks call run_stage / sample_stage) must not claim flag names that pixeldance.sample or
    pixeldance.tools.metrics define for their own command lines in the same process."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and samples.")

STAGES = ("train_vae", "cache", "train_dit", "sample")


def run_stage(stage: str, config, workdir: str):
    if stage == "train_vae":
        train_vae(config, workdir)
    elif stage == "cache":
        cache_latents(config, workdir)
    elif stage == "train_dit":
        train_dit(config, workdir)
    elif stage == "sample":
        sample_stage(config, workdir)
    else:
        raise ValueError(f"unknown mode {stage!r}; choose train or one of {STAGES}")


def sample_stage(config, workdir: str) -> dict:
    """The last stage: the evaluators of config.evals.dit on the workdir's trained pipeline, with
    their files in the workdir (samples/, faithfulness.json) and scalars as stage 'dit_eval'; the
    stage's own (seconds, of which loading the pipeline; videos written) as stage 'sample'."""
    t0 = time.time()
    pipe = load_pipeline(workdir)
    load_seconds = time.time() - t0
    evaluators = eval_registry.make(config.evals.dit, config, "pipeline")
    results = eval_common.run(evaluators, pipe, workdir=workdir, step=pipe.step, out_dir=workdir)
    videos = [p for p in glob.glob(os.path.join(workdir, "samples", "*.mp4")) if os.path.getmtime(p) >= t0]
    train_lib.log_stage(workdir, "sample", pipe.step,
                        dict(seconds=time.time() - t0, load_seconds=load_seconds, videos=len(videos)))
    return results


def main(argv):
    """The stages, with every user error (bad config values, missing or damaged files, a full or
    read-only disk, a failed checkpoint write) as one line `error: ...` and exit code 2
    (pixeldance/cli.py); `--verbosity=1` shows the traceback instead."""
    try:
        _main(argv)
    except CheckpointWriteError as e:
        if cli.debug(argv):
            raise
        # Orbax's writer threads of the failed save end within seconds: wait for them, so that this
        # line comes last, then exit at once (nothing prints while the interpreter shuts down;
        # the logs and metrics are closed already).
        deadline = time.time() + 5
        for thread in threading.enumerate():
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.time()))
        cli.fail(cli.first_line(e), hard=True)


def _main(argv):
    logs.setup()  # the libraries' INFO lines only with --verbosity=1; lines around the progress bars
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if config is None or not workdir:
        raise app.UsageError("--config and --workdir are required")
    if config.mode == "plan":  # first: it may set the number of host devices (see tools/plan.py)
        os.makedirs(workdir, exist_ok=True)
        plan.run(config, workdir)
        return
    if config.get("xla_fast_compile") and not xla_flags.enable_fast_compile():
        logging.warning("xla_fast_compile ignored: a JAX backend was already running")
    stages = STAGES if config.mode == "train" else (config.mode,)
    for stage in stages:
        if stage not in STAGES:
            raise app.UsageError(f"unknown mode {config.mode!r}; choose train or one of {STAGES}")
    if config.text.get("encoder", "word") != "word" and ("cache" in stages or "sample" in stages):
        # A frozen encoder's folder is read by the cache and sample stages: check it before the
        # VAE stage spends hours (its config.json only; the weights load where they are used).
        build.text_conditioner(config)
    if "train_dit" in stages or "sample" in stages:
        # Settings the last stages read, checked before the first one spends minutes to hours:
        # config.diffusion and config.cond (the task) and config.sample; one line each, exit 2.
        build.task(config)
        build.check_dit_loop(config)
        check_sample_config(config.sample)
    workdir_lib.write_config(workdir, config)
    timing_path = os.path.join(workdir, workdir_lib.TIMING)
    timing = json.load(open(timing_path)) if os.path.exists(timing_path) else {}
    for stage in stages:
        t0 = time.time()
        with logs.stage(stage, workdir_lib.stage_outputs(config, workdir, stage)):
            run_stage(stage, config, workdir)
        timing[stage] = timing.get(stage, 0.0) + time.time() - t0
        with open(timing_path, "w") as f:
            json.dump(timing, f, indent=1)
    print("seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in timing.items()))


def run():
    """Console script `pixeldance`."""
    define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)


if __name__ == "__main__":
    run()
