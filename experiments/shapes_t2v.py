r"""Table 3 ablation, text-to-video baseline: trained and sampled without image instructions.

No first or last frame ever (p_first = 0): the DiT learns text-to-video only. Compare its T2V
rows with the full model's (`experiments/shapes.py`), and its I2V / FLF2V rows to see what the
image instructions add (here they are ignored: the model never learned to read c_image).

  python -m pixeldance.main --config=experiments/shapes_t2v.py --workdir=workdirs/shapes_t2v
"""
from pixeldance import configs

base = configs.import_sibling(__file__, "base")


def get_config(arg=None):
    config = base.get_config(arg)
    config.cond.p_first = 0.0
    config.sample.text_to_video = "direct"  # a first frame of its own would be ignored: one pass
    return config
