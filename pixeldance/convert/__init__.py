"""Converters of other frameworks' weights (safetensors only, never pickle) into pixeldance checkpoints.

  wan_vae: the open Wan 2.1 video VAE (diffusers `AutoencoderKLWan`) -> `pixeldance.load_vae(DIR)`.
"""
