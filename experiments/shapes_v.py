r"""Ablation: DDPM with v-prediction (v = alpha eps - sigma x0; the default is rectified flow).

The same T = 1000 path as `experiments/shapes_eps.py`, loss on v; `diffusion.prediction` is
unused. Against eps-prediction, v stays well-scaled at the noisiest steps, where eps says
little about x0.

  python -m pixeldance.main --config=experiments/shapes_v.py --workdir=workdirs/shapes_v
"""
from pixeldance import configs

base = configs.import_sibling(__file__, "base")


def get_config(arg=None):
    config = base.get_config(arg)
    config.diffusion.objective = "v"
    return config
