r"""Sampling sweeps on a trained workdir: faithfulness for each setting of a grid, one model load.

  python -m pixeldance.tools.sweep --workdir=workdirs/shapes --config=experiments/sweep_tau.py \
      --output=benchmarks/results/sweep_tau.jsonl

The grid is `config.sweep.grid`, e.g. "sampler=euler,heun;steps=4,8,16" (fields of
`config.sample`: sampler, steps, guidance, image_guidance, tau, shift, guidance_rescale,
text_to_video; values
comma-separated, fields `;`-separated: every combination is run);
`config.sweep.num_per_mode` videos per mode (half held-out). Each setting samples the same
evaluation videos as the main job's last stage (the 'faithfulness' evaluator,
`evaluators/samples.py`), with the same seeds, so rows differ only by the setting. The workdir is
only read (no samples are written), and each row (the setting, seconds, and per mode and split
the faithfulness report) is appended to `--output` as one JSON line and printed as a table row.
"""
from __future__ import annotations

import itertools
import json
import os
import time

from absl import app, flags
from ml_collections import config_flags

from pixeldance import cli
from pixeldance import workdir as workdir_lib
from pixeldance.evaluators import samples
from pixeldance.sample import check_sample_config, load_pipeline

GRID_FIELDS = {"sampler": str, "steps": int, "guidance": float, "image_guidance": float, "tau": int,
               "shift": float, "guidance_rescale": float, "text_to_video": str}


def parse_grid(grid: str) -> list[dict]:
    """"a=1,2;b=x" -> [{'a': 1, 'b': 'x'}, {'a': 2, 'b': 'x'}] (fields of config.sample only)."""
    axes = []
    for part in grid.split(";"):
        part = part.strip()
        if not part:
            continue
        name, sep, values = part.partition("=")
        name = name.strip()
        if not sep or name not in GRID_FIELDS:
            raise ValueError(f"bad sweep grid entry {part!r}: want FIELD=V1,V2 with FIELD one of {sorted(GRID_FIELDS)}")
        cast = GRID_FIELDS[name]
        axes.append([(name, cast(v.strip())) for v in values.split(",") if v.strip()])
    if not axes:
        raise ValueError(f"empty sweep grid {grid!r}")
    return [dict(combo) for combo in itertools.product(*axes)]


def summary(report: dict) -> dict:
    """The numbers a sweep table shows, from an evaluator report."""
    out = {}
    for mode, split in (("T2V", "heldout"), ("I2V", "heldout"), ("FLF2V", "heldout"), ("FLF2V", "all")):
        r = report[mode][split]
        out[f"{mode}_{split}"] = dict(colour=r["colour_acc"], direction=r["direction_acc"],
                                      consistency=r["consistency_acc"], last_psnr=r["last_psnr"])
    return out


def run_sweep(config, workdir: str, output: str | None = None) -> list[dict]:
    settings = parse_grid(config.sweep.grid)
    for setting in settings:  # all of them before the model loads and the first setting runs
        check_sample_config(setting, prefix="config.sweep.grid: ")
    faithfulness = samples.Faithfulness(config, num_per_mode=config.sweep.num_per_mode)
    pipe = load_pipeline(workdir)
    rows = []
    for setting in settings:
        with pipe.config.unlocked():  # a workdir older than a field (text_to_video) lacks it
            for key, value in setting.items():
                pipe.config.sample[key] = value
        t0 = time.time()
        report = faithfulness.report(pipe)
        row = dict(setting=setting, seconds=round(time.time() - t0, 1),
                   num_per_mode=config.sweep.num_per_mode, **summary(report), report=report)
        rows.append(row)
        print("sweep " + json.dumps({k: v for k, v in row.items() if k != "report"}), flush=True)
        if output:
            os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
            with open(output, "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


def main(argv):
    del argv
    flags_ = flags.FLAGS
    config, workdir = flags_.config, flags_.workdir
    if not os.path.exists(os.path.join(workdir, workdir_lib.CONFIG)):
        raise app.UsageError(f"--workdir {workdir} holds no trained run (no {workdir_lib.CONFIG})")
    run_sweep(config, workdir, flags_.output)


def run():
    """Defines the flags (only here: importing this module defines none) and runs `main`."""
    config_flags.DEFINE_config_file("config", None, "Experiment file with config.sweep.", lock_config=True)
    flags.DEFINE_string("workdir", None, "A trained workdir (read only).")
    flags.DEFINE_string("output", None, "Append one JSON line per setting here.")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)


if __name__ == "__main__":
    run()
