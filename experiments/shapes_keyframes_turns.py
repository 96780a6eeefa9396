r"""Issue 20 ablation: shapes_keyframes whose continued windows may change direction at the context.

The 'continue' set trains a clip on the window of its item read 4 frames longer, its first n
latents clean as context (how a story's clip k + 1 continues clip k in latent space). In
`experiments/shapes_keyframes.py` every such window moves one way, the caption's, while a story
whose prompts keep the object inside the frame (right, left, right, ...) reverses at every clip:
its context latents move as the previous prompt said, its prompt says another way. Here 0.75 of
the 'continue' windows move another way (uniform among the three others) up to the end of their
n context latents and then as the caption says (`synthetic.TurnWindows`; the cache stores each
window's n, so the context covers exactly the frames before the turn). Everything else, the
budget included, is shapes_keyframes'; compare `benchmarks/long_video.py` on both (consistency of
latent continuation against re-encoding), and the three standard modes.

  python -m pixeldance.main --config=experiments/shapes_keyframes_turns.py --workdir=workdirs/shapes_keyframes_turns
"""
from pixeldance import configs

keyframes = configs.import_sibling(__file__, "shapes_keyframes")


def get_config(arg=None):
    config = keyframes.get_config(arg)
    config.cond.continue_turns = 0.75
    return config
