r"""Table 3 ablation, without text: image instructions only.

The text is always dropped in training (p_drop_text = 1: every caption is the empty prompt), so
the model sees only the first (and last) frame; sampled without text guidance (guidance 1).
Colour can still come from the first frame; direction must be guessed, or read from the last.

  python -m pixeldance.main --config=experiments/shapes_no_text.py --workdir=workdirs/shapes_no_text
"""
from pixeldance import configs

base = configs.import_sibling(__file__, "base")


def get_config(arg=None):
    config = base.get_config(arg)
    config.cond.p_drop_text = 1.0
    config.sample.guidance = 1.0
    return config
