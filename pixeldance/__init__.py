"""pixeldance: PixelDance-style text + image-instruction video diffusion in JAX/Flax.

Public API for notebooks and scripts:
  pixeldance.load_pipeline(workdir).generate(prompt, first_frame=None, last_frame=None, ...)
  pixeldance.load_vae(workdir_or_path).encode(video) / .decode(latents)
  pixeldance.load_text_encoder(dir).tokenize(texts) / .embed(ids, mask)   (CLIP, T5, umT5)
  pixeldance.load_dit(dir).predict(latents, timesteps, text_states)         (the Wan 2.1 DiT)
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


def load_text_encoder(directory: str, dtype=None, **kwargs):
    """A converted CLIP / T5 / umT5 text encoder; see `pixeldance.models.text_encoder.load_text_encoder`."""
    from pixeldance.models.text_encoder import load_text_encoder as _load
    return _load(directory, dtype, **kwargs)


def load_dit(directory: str, dtype=None, **kwargs):
    """A converted Wan 2.1 video DiT; see `pixeldance.models.wan_dit.load_dit`."""
    from pixeldance.models.wan_dit import load_dit as _load
    return _load(directory, dtype, **kwargs)
