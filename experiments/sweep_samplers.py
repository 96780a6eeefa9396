r"""Faithfulness against the number of sampling steps, for each sampler.

Heun costs two model calls per step (its last step one), so compare it at equal calls, e.g.
heun at 8 steps against euler at 15. Sampling only, on a trained workdir:

  python -m pixeldance.tools.sweep --workdir=workdirs/shapes --config=experiments/sweep_samplers.py \
      --output=benchmarks/results/sweep_samplers.jsonl
"""
from pixeldance import configs

base = configs.import_sibling(__file__, "base")


def get_config(arg=None):
    config = base.get_config(arg)
    config.sweep.grid = "sampler=euler,heun,dpm++2m,ddim;steps=4,8,16,32"
    return config
