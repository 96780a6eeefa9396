r"""Ablation: the first frame by channel concatenation only (no replacement of the noisy latent).

The default (`experiments/shapes.py`) also puts the clean first latent into the noisy input and
masks it out of the loss; here the model must copy it from the concatenated c_image.

  python -m pixeldance.main --config=experiments/shapes_concat.py --workdir=workdirs/shapes_concat
"""
from pixeldance import configs

base = configs.import_sibling(__file__, "base")


def get_config(arg=None):
    config = base.get_config(arg)
    config.cond.first_frame = "concat"
    return config
