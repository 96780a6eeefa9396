r"""VAE only, trained longer on the synthetic shapes world: the reconstruction-quality run.

Reaches 32 dB PSNR on held-out clips (posterior mean, EMA) with the `shapes_wide` VAE (19.0M
parameters, the `shapes` design 4x wider with two residual blocks per level): 32.92 dB / SSIM
0.942 on 32 held-out 17-frame 64 x 64 clips after 12,000 steps, 168 s on one H200
(`benchmarks/results/vae_psnr_shapes_wide_h200.json`). The 0.69M-parameter `shapes` VAE levels
off near 28.5 dB train-crop PSNR at 19,000 steps (`:vae=shapes`). Same losses as the main job
(L1 + L2 + small KL, no perceptual loss, no discriminator), but more steps and more clips per
step: random 32 x 32 crops of 9-frame windows, 8 per batch, cost what 2 full 64 x 64 clips do,
and show 4x as many objects and edges. The VAE is convolutional with a per-position norm, so
training on crops and reconstructing full frames is the same function. On a GPU, feed it with
grain worker processes (`--config.data.num_workers=6`: 100-200 steps/s there).

  python -m pixeldance.main --config=experiments/vae_shapes.py --workdir=workdirs/vae_shapes
  python -m pixeldance.main --config=experiments/vae_shapes.py:vae=shapes --workdir=DIR   # the small VAE

Then the DiT on this VAE, in the same workdir:
  python -m pixeldance.main --config=experiments/shapes.py --config.mode=cache --workdir=workdirs/vae_shapes
"""
from pixeldance import configs

base = configs.import_sibling(__file__, "base")


def get_config(arg=None):
    # The VAE variant defaults to shapes_wide here (base's default is the main job's `shapes`).
    if "vae=" not in (arg or ""):
        arg = ",".join(x for x in ((arg or ""), "vae=shapes_wide") if x)
    config = base.get_config(arg)
    config.mode = "train_vae"
    c = config.vae
    c.batch_size = 8
    c.train_size = 32        # random spatial crops (pixels; 0: full frames)
    if c.variant == "shapes_wide":
        c.num_steps = 12_000
        c.lr = 1e-3          # the main job's (2e-3 lost colours there), for the wider VAE too
    else:
        c.num_steps = 20_000
    c.warmup_steps = 100
    c.log_every = 50
    c.ckpt_every = 250
    c.keep_checkpoints = 3
    # Training losses beyond L1 + L2 + KL, all off here (see experiments/vae_gan.py).
    c.perceptual_weight = 0.0
    c.perceptual_path = ""   # safetensors of the feature network (VGG layout); "" = off
    c.disc_weight = 0.0      # 0 = no discriminator
    c.disc_start = 0
    c.disc_channels = (32, 64, 128)
    c.disc_adaptive = True
    # After training: held-out reconstructions (PSNR, SSIM, image grid) and latent statistics.
    c.eval_videos = 32
    c.stats_videos = 256
    if configs.parse_arg(arg, runlocal=False, vae="shapes", dit="shapes").runlocal:
        c.batch_size = 8
        c.train_size = 0
        c.num_steps = 4
        c.log_every = 2
        c.ckpt_every = 2
        c.eval_videos = 8   # one batch, like the statistics: one compiled encode for both
        c.stats_videos = 8
    return config
