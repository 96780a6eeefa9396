r"""Export a fine-tuned Wan-family DiT as a converted Wan DiT folder.

  python -m pixeldance.tools.export_dit --workdir=W --output=DIR

Writes what the workdir's Pipeline samples with: the EMA weights of the newest DiT checkpoint,
with LoRA adapters (config.train.lora_rank > 0) merged into the converted base weights
(`models/lora.py`), or the converted weights themselves before any fine-tuning. DIR holds
params.safetensors and config.json in `pixeldance.convert.wan_dit`'s layout, the input width
widened for PixelDance's instructions ([x, c_image, c_mask]: 2C + 1 channels) where
config.dit.widen is set, so that

  pixeldance.load_dit(DIR)                 loads it (latents of 2C + 1 channels in)
  config.dit.init_from = DIR               starts another fine-tune from it (full or LoRA)

and its config.json records the workdir, the step and whether adapters were merged. Weights are
gathered to this host and written in float32 (a 14B DiT needs 56 GB of host memory): run it on
one host. Bad input (no such workdir, not a Wan-family DiT, a non-empty output) is one line on
stderr and exit code 2.
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np
from absl import flags

from pixeldance import build, cli
from pixeldance import workdir as workdir_lib
from pixeldance.models import wan_dit, weights


def export(workdir: str, output: str) -> dict:
    """Writes OUTPUT from WORKDIR (module docstring); returns the written config.json's dict.
    ValueError (one line) on bad input, before anything is written."""
    from pixeldance import sample  # the Pipeline: heavy, and only this command needs it here

    if not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir}: no such folder")
    config = workdir_lib.read_config(workdir)
    if config.dit.get("family", "pixeldance") != "wan":
        raise ValueError(f"{workdir}: config.dit.family={config.dit.get('family', 'pixeldance')!r}; "
                              f"export_dit writes Wan-family DiTs (this codebase's own DiT is its workdir)")
    if os.path.isdir(output) and os.listdir(output):
        raise ValueError(f"output {output} is not empty (export writes a new folder)")
    pipe = sample.load_pipeline(workdir)
    transformer = pipe.params["params"]["dit"]["transformer"]
    fields = dict(build.wan_fields(config))
    fields["in_channels"] = int(transformer["patch_embedding"]["kernel"].shape[3])
    lora = build.dit_lora(config)
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), transformer)
    meta = dict(network=wan_dit.NETWORK, dit=fields, dtype="float32", source=os.path.abspath(workdir),
                step=int(pipe.step or 0), lora_merged=lora is not None and bool(pipe.step),
                init_from=config.dit.get("init_from", ""),
                num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(host)))
    return weights.save(output, meta, {"params": host})


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    meta = export(FLAGS.workdir, FLAGS.output)
    print(f"wrote {FLAGS.output} (Wan DiT, {meta['num_params'] / 1e9:.3f}B parameters, step {meta['step']}"
          f"{', LoRA merged' if meta['lora_merged'] else ''}, {meta['dit']['in_channels']} input channels); "
          f"load it with pixeldance.load_dit({FLAGS.output!r}) or set config.dit.init_from={FLAGS.output!r}")


def run():
    flags.DEFINE_string("workdir", None, "Workdir of a Wan-family fine-tune (config.dit.family='wan').",
                        required=True)
    flags.DEFINE_string("output", None, "New (or empty) output folder.", required=True)
    cli.run(main)


if __name__ == "__main__":
    run()
