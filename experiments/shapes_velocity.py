r"""Ablation: rectified flow with the network predicting the velocity directly, against
`experiments/shapes_flow.py` (rectified flow predicting x0; the loss is on velocity in both).

  python -m pixeldance.main --config=experiments/shapes_velocity.py --workdir=workdirs/shapes_velocity
"""
from pixeldance import configs

flow = configs.import_sibling(__file__, "shapes_flow")


def get_config(arg=None):
    config = flow.get_config(arg)
    config.diffusion.prediction = "velocity"
    return config
