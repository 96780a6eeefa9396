r"""Ablation: rectified flow (x_t = (1 - t) x0 + t eps), the network predicting x0 with the loss on
velocity, logit-normal training times: the main job's objective before issue 19 (the default is
now DDPM v-prediction, `experiments/base.py`).

Measured against v-prediction on two seeds (3,500 DiT steps): text-only direction 0.22-0.23
against 0.38-0.44, consistency lower; with uniform training times and 1,600 steps it failed
outright (text-only colour 0.11, consistency 0.03-0.08; benchmarks/README.md, issue 19).

  python -m pixeldance.main --config=experiments/shapes_flow.py --workdir=workdirs/shapes_flow
"""
from pixeldance import configs

base = configs.import_sibling(__file__, "base")


def get_config(arg=None):
    config = base.get_config(arg)
    config.diffusion.objective = "flow"
    config.diffusion.prediction = "x0"
    return config
