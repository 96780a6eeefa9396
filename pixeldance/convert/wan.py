r"""Convert a whole Wan 2.1 text-to-video diffusers folder into one folder the Pipeline loads.

  python -m pixeldance.convert.wan --input=WAN --output=DIR [--dtype=bfloat16]
  pipe = pixeldance.load_pipeline(DIR)                   # text-to-video Wan, this codebase's samplers
  video = pipe.generate("a cat walks in the snow", height=480, width=832)

WAN: a diffusers Wan 2.1 T2V repository (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers): vae/,
text_encoder/ (umT5-XXL), tokenizer/, transformer/ and scheduler/ (its flow_shift). Each part
goes through its own converter (safetensors only, one-line errors naming the file):

  DIR/config.json, vae/, vae_model.json, latent_stats.json
                  the Wan VAE (`convert.wan_vae`) at the top level, as in a workdir, and the
                  workdir config: experiments/wan_pixeldance.py (or --config) as text-to-video
                  (dit.widen = False) with dit.init_from = DIR/wan_dit, text.encoder_path =
                  DIR/umt5 (absolute paths) and sample.shift = the scheduler's flow_shift
  DIR/umt5/       the text encoder and its tokenizer (`convert.text_encoder --kind=umt5`)
  DIR/wan_dit/    the DiT (`convert.wan_dit`)

DIR is then also the start of a PixelDance fine-tune (`--workdir=DIR --config.dit.widen=True`,
stages cache, train_dit, sample: experiments/wan_pixeldance.py); fine-tuned DiT checkpoints go
to DIR/dit/ as in any workdir. --dtype: the compute dtype recorded for the encoder and the DiT
(weights are stored float32).
"""
from __future__ import annotations

import json
import os
import shutil

from absl import flags

from pixeldance import cli, configs
from pixeldance import workdir as workdir_lib
from pixeldance.convert import text_encoder as convert_text
from pixeldance.convert import wan_dit as convert_dit
from pixeldance.convert import wan_vae as convert_vae
from pixeldance.convert.common import ConversionError

DIT, TEXT = "wan_dit", "umt5"
PARTS = ("vae", "text_encoder", "tokenizer", "transformer")
DEFAULT_SHIFT = 3.0  # Wan 2.1's flow_shift at 480p, where the scheduler config has none


def default_config_path() -> str:
    """experiments/wan_pixeldance.py of the repository this package runs from."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(root, "experiments", "wan_pixeldance.py")


def flow_shift(input_dir: str) -> float:
    """The scheduler's flow_shift (scheduler/scheduler_config.json), DEFAULT_SHIFT without one."""
    path = os.path.join(input_dir, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        return DEFAULT_SHIFT
    try:
        with open(path) as f:
            shift = json.load(f).get("flow_shift", DEFAULT_SHIFT)
    except (OSError, ValueError, AttributeError) as e:
        raise ConversionError(f"{path}: not a readable scheduler config ({str(e).splitlines()[0]})") from None
    if not isinstance(shift, (int, float)) or shift <= 0:
        raise ConversionError(f"{path}: flow_shift must be a positive number, got {shift!r}")
    return float(shift)


def convert(input_dir: str, output_dir: str, *, dtype: str = "float32", config_path: str | None = None) -> dict:
    """Converts the repository INPUT_DIR into OUTPUT_DIR (module docstring); returns the written
    workdir config as a dict. ConversionError / WeightsError (one line) on bad input; the parts
    are written to OUTPUT_DIR.partial, renamed OUTPUT_DIR once all are converted."""
    missing = [p for p in PARTS if not os.path.isdir(os.path.join(input_dir, p))]
    if missing:
        raise ConversionError(f"{input_dir}: no {', '.join(p + '/' for p in missing)} (a diffusers Wan 2.1 "
                              f"text-to-video repository has {', '.join(p + '/' for p in PARTS)})")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ConversionError(f"output {output_dir} is not empty (the converter writes a new folder)")
    config_path = config_path or default_config_path()
    if not os.path.isfile(config_path.split(":")[0]):
        raise ConversionError(f"config {config_path} not found: pass --config=experiments/wan_pixeldance.py "
                              f"of this repository")
    shift = flow_shift(input_dir)
    config = configs.load_config(config_path)
    out = os.path.abspath(output_dir)
    config = configs.override(config, **{
        "dit.family": "wan", "dit.init_from": os.path.join(out, DIT), "dit.widen": False,
        "dit.dtype": dtype, "text.encoder": "umt5", "text.encoder_path": os.path.join(out, TEXT),
        "text.encoder_dtype": dtype, "vae.family": "wan", "sample.shift": shift})

    # Into a scratch folder renamed at the end: a part that fails to convert leaves no half folder.
    scratch = out + ".partial"
    if os.path.isdir(scratch):
        shutil.rmtree(scratch)
    convert_vae.convert(os.path.join(input_dir, "vae"), scratch)  # the top level: a workdir's VAE
    convert_text.convert("umt5", os.path.join(input_dir, "text_encoder"), os.path.join(scratch, TEXT),
                         tokenizer_dir=os.path.join(input_dir, "tokenizer"), dtype=dtype)
    convert_dit.convert(os.path.join(input_dir, "transformer"), os.path.join(scratch, DIT), dtype=dtype)
    workdir_lib.write_config(scratch, config)  # over the VAE converter's: the whole folder's
    if os.path.isdir(out):
        os.rmdir(out)  # empty (checked above)
    os.replace(scratch, out)
    return config.to_dict()


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    config = convert(FLAGS.input, FLAGS.output, dtype=FLAGS.dtype, config_path=FLAGS.config)
    print(f"wrote {FLAGS.output} (Wan 2.1 text-to-video: VAE, umT5 in {TEXT}/, DiT in {DIT}/, sampling shift "
          f"{config['sample']['shift']:g}); load it with pixeldance.load_pipeline({FLAGS.output!r})")


def run():
    flags.DEFINE_string("input", None, "A diffusers Wan 2.1 text-to-video repository folder.", required=True)
    flags.DEFINE_string("output", None, "New (or empty) output folder.", required=True)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the encoder and the DiT.")
    flags.DEFINE_string("config", None, "Experiment config of the folder (default: this repository's "
                        "experiments/wan_pixeldance.py).")
    cli.run(main)


if __name__ == "__main__":
    run()
