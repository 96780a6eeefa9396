r"""Table 3 ablation, trained without the last frame: first frame and text only (eta = 1).

Given a first frame, never a last one (p_last = 0). FLF2V sampling then shows a last frame the
model never learned to use; compare FLF2V direction and last-frame PSNR with the full model.

  python -m pixeldance.main --config=experiments/shapes_no_last.py --workdir=workdirs/shapes_no_last
"""
from pixeldance import configs

base = configs.import_sibling(__file__, "base")


def get_config(arg=None):
    config = base.get_config(arg)
    config.cond.p_last = 0.0
    return config
