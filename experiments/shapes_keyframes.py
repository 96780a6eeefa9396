r"""The main job with keyframes anywhere: image instructions at any latent frames, not only first and last.

Same data, VAE and DiT budget as experiments/shapes.py; only the DiT's image instructions
change (issue 20, items 1 and 2). Each training clip draws one keyframe set: none 0.20, first
frame 0.25, first + last 0.25 (PixelDance's three modes keep most of the batch: 0.30 / 0.35 /
0.35 in the main job), first + one middle latent frame 0.10, random positions 0.10 (each of the
5 latent frames a keyframe with probability 0.25), and continue 0.10: the first 1 or 2 latents,
clean, of the window one latent later (the item read 4 frames longer, latents 1..5: the cache
stage adds them to each record as z_shift), which is how a clip continues the previous one in
latent space: its last latents, each a 4-frame group's, become the next clip's context
(`Pipeline.generate_clips(..., continuation='latent')`). The earlier 'context' set (the clip's own
first latents, so a one-frame latent at position 0) trained a DiT whose latent continuation fell
below re-encoding on colour and consistency (benchmarks/README.md, issue 20). Middle keyframes are one-frame encodings of
pixel frames 4k, which the cache stage adds to each record as z_frames (so the cache is rebuilt
once: its meta.json records keyframe_frames), because sampling encodes a user's keyframe image
alone; the noise on c_image and the first-frame replacement are PixelDance's. Sample with
`pipe.generate(prompt, first_frame, keyframes={8: image})` or `--keyframe=8:image.png[:TAU]`.

  python -m pixeldance.main --config=experiments/shapes_keyframes.py --workdir=workdirs/shapes_keyframes
"""
from pixeldance import configs

base = configs.import_sibling(__file__, "base")


def get_config(arg=None):
    config = base.get_config(arg)
    config.cond.keyframe_sets = "none:0.2,first:0.25,first_last:0.25,first_middle:0.1,random:0.1,continue:0.1"
    config.cond.keyframe_rate = 0.25
    config.cond.keyframe_latents = "frames"
    config.cond.context_frames = 2
    # Long videos keep their objects under strong text guidance: on this model's 24-clip videos
    # consistency fell from 0.864 to 0.707 (re-encoding) and from 0.690 to 0.592 (latent
    # continuation) at the main job's guidance 4 (benchmarks/results/issue20_size_drift_guidance.json).
    config.sample.guidance = 8.0
    # The settings issue 20's long-video numbers were measured with (benchmarks/README.md), kept
    # when the main job moved to zero SNR, 2,000 steps and shift 2 (issue 19). Zero SNR at 1,600
    # steps here: 24-clip consistency 0.86 -> 0.90 re-encoding, 0.69 -> 0.71 in latent space
    # (results/issue20_size_drift_zero_snr.json); the 64-clip benchmark has not been rerun on it.
    config.diffusion.objective = "v"
    config.train.num_steps = min(config.train.num_steps, 1600)  # (runlocal keeps its few steps)
    config.sample.shift = 1.0
    return config
