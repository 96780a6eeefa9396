r"""Ablation: DDPM with epsilon-prediction, the paper's objective (the default
predicts v on the same path).

T = 1000 steps with latent diffusion's scaled-linear betas (`pixeldance/diffusion/schedules.py`),
training steps drawn uniformly, loss on eps; `diffusion.prediction` is unused. Sampling keeps
the default Euler sampler, which on the DDPM path is the DDIM update (8 steps snap to the
trained steps n = 999, 874, ..., 124).

  python -m pixeldance.main --config=experiments/shapes_eps.py --workdir=workdirs/shapes_eps
"""
from pixeldance import configs

base = configs.import_sibling(__file__, "base")


def get_config(arg=None):
    config = base.get_config(arg)
    config.diffusion.objective = "eps"
    return config
