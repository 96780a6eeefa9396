"""Flax Linen models: the video VAEs, the PixelDance DiT, the text encoder, attention.

Axis glossary. Every shape in the docstrings, comments, einsum and einops patterns of the model
files (and of diffusion/, build, sample, trainers) uses these letters, each with one meaning:

  B   batch
  F   pixel frames (``F = 1 + 4k`` at the VAEs' 4x temporal compression)
  T   latent frames (``T = 1 + k``); inside a VAE, the frames of the level a layer runs at
  H, W  pixel height and width; inside a VAE, those of the level a layer runs at
  h, w  latent height and width
  C   channels (at the VAE/DiT interface: latent channels); O  output channels of a conv
  Z   the VAE's latent channels, where a file must tell them from C
  L   video tokens (the query length of attention); M  key length; S  text tokens
  P   spatial positions (patches) per latent frame, ``T * P = L``
  D   model width; N  attention heads; K  head width (``D = N * K``); E  MLP width
  Q   query chunk of the chunked attention kernel; G  batch x heads inside that kernel
  J   candidate last frames of the PixelDance instruction (config.cond.last_from)
  kt, kh, kw  a kernel's taps in time, height and width
  c   devices of the 'context' mesh axis

Logical axis names (for sharding; the mapping to mesh axes is in pixeldance/sharding.py) are a
separate vocabulary: 'batch', 'length', 'embed', 'mlp', 'heads', 'kv', ...
"""
