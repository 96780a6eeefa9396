r"""The VAE of `vae_shapes.py` with a 3D patch discriminator (hinge loss, adaptive weight).

Reconstruction alone first; from `disc_start` the GAN terms join, weighted by VQGAN's adaptive
weight (the ratio of the reconstruction and GAN gradient norms at the decoder's last layer)
times `disc_weight`. The discriminator is trained in the same step by the same optimizer.

  python -m pixeldance.main --config=experiments/vae_gan.py --workdir=workdirs/vae_gan

With a perceptual loss: convert a VGG16 `features` stack (torchvision layout, e.g.
`features.0.weight` [64, 3, 3, 3], optionally LPIPS' `lin0.weight` .. `lin4.weight`) to
safetensors and add
  --config.vae.perceptual_path=/path/to/vgg16.safetensors --config.vae.perceptual_weight=0.1
(no file at the path: the run goes on without it and says so).
"""
from pixeldance import configs

vae_shapes = configs.import_sibling(__file__, "vae_shapes")


def get_config(arg=None):
    config = vae_shapes.get_config(arg)
    c = config.vae
    c.disc_weight = 0.5
    c.disc_start = 5_000
    c.disc_channels = (32, 64, 128)
    c.disc_adaptive = True
    if configs.parse_arg(arg, runlocal=False, vae="shapes", dit="shapes").runlocal:
        c.disc_start = 2
        c.disc_channels = (8, 16)
    return config
