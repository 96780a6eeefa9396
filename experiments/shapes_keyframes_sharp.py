r"""Issue 20: shapes_keyframes on a VAE that keeps the world's shapes (the long-video shape target).

The main job's VAE stage until issue 19's session 25 (1,500 steps, batches of 4 whole 64 x 64
clips) turned a 13-16 px square or triangle into a rounded blob: real held-out clips, encoded and
decoded, read as their own shape in 0.31 of 64 (`benchmarks/vae_shape_ceiling.py`), so no DiT on
its latents could keep shape in 0.9 of long-video clips. Trained on random 32 x 32 crops of the
9-frame clips, 8 per batch (each step costs about what 2 whole clips do and shows twice the
objects), it reads shape in 0.39-0.45 of 64 after 3,000 steps (today's main job) and in all 64 at
30.1 dB after 9,000 (here; 0.875 at the evaluator's 32 px thresholds, which read 64 px clips until
session 25). Everything else — data, DiT, keyframe sets, the
1,600-step DiT budget, sampling — is shapes_keyframes'. Measured (benchmarks/README.md, issue 20,
"Sessions 23-24: a VAE that keeps shapes"): VAE 727 s, cache 76 s, DiT 463 s, sampling 30 s on a
2-core CPU; text-only direction 0.88, consistency 0.77-0.97, first-frame PSNR 30.6 dB; in 64-clip
stories latent continuation keeps colour, direction and size as often as re-encoding does.

  python -m pixeldance.main --config=experiments/shapes_keyframes_sharp.py --workdir=workdirs/shapes_keyframes_sharp
"""
from pixeldance import configs

keyframes = configs.import_sibling(__file__, "shapes_keyframes")


def get_config(arg=None):
    config = keyframes.get_config(arg)
    if not configs.parse_arg(arg, runlocal=False, vae="shapes", dit="shapes").runlocal:
        c = config.vae
        c.train_size = 32    # random spatial crops (the VAE is convolutional: full frames at inference)
        c.batch_size = 8
        c.num_steps = 9_000
        # The 4-layer 'shapes' DiT its results were measured with (the main job's has 3 since
        # session 28), so its recorded workdirs and numbers stay this experiment's.
        config.dit.depth = 4
    return config
