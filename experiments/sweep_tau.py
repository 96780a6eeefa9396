r"""The tau sweep: how long the last frame guides sampling (PixelDance's strength knob).

tau = 0 ignores the last frame; tau = steps uses it at every step. Sampling only, on a trained
workdir of the main job (or any PixelDance experiment); the FLF2V rows are the ones that move.

  python -m pixeldance.tools.sweep --workdir=workdirs/shapes --config=experiments/sweep_tau.py \
      --output=benchmarks/results/sweep_tau.jsonl
"""
from pixeldance import configs

base = configs.import_sibling(__file__, "base")


def get_config(arg=None):
    config = base.get_config(arg)
    config.sweep.grid = "tau=0,3,6,10,15,25"
    return config
