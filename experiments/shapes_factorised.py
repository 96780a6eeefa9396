r"""Ablation: factorised space-then-time self-attention instead of full space-time attention.

Each DiT block attends within every latent frame, then across frames at every spatial position
(a second, temporal self-attention sub-layer, as PixelDance's UNet pairs a temporal attention
with each spatial one). Attention cost per layer falls from L^2 to L (L/T + T) token pairs, at
4 D^2 more parameters per block; everything else is the default main job.

  python -m pixeldance.main --config=experiments/shapes_factorised.py --workdir=workdirs/shapes_factorised
"""
from pixeldance import configs

base = configs.import_sibling(__file__, "base")


def get_config(arg=None):
    config = base.get_config(arg)
    config.dit.attention = "factorised"
    return config
