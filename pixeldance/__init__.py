"""pixeldance: PixelDance-style text + image-instruction video diffusion in JAX/Flax.

Public API for notebooks and scripts:
  pixeldance.load_pipeline(workdir).generate(prompt, first_frame=None, last_frame=None, ...)
  pixeldance.load_vae(workdir_or_path).encode(video) / .decode(latents)
"""
__version__ = "0.1.0"

# The loaders import lazily: `import pixeldance.data.synthetic` (or a converter's --help) should
# not pay for JAX, Flax and every model module that `pixeldance.sample` pulls in.


def load_pipeline(workdir: str):
    """See `pixeldance.sample.load_pipeline`."""
    from pixeldance.sample import load_pipeline as _load
    return _load(workdir)


def load_vae(workdir_or_path: str):
    """See `pixeldance.sample.load_vae`."""
    from pixeldance.sample import load_vae as _load
    return _load(workdir_or_path)
