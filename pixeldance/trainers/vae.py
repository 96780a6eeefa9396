"""VAE trainer: reconstruction (L1 + L2) + KL on the synthetic world, EMA, Orbax, resumable.

Axis glossary: B batch, F frames, H/W pixels, T latent frames, h/w latent height/width, C channels.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp

from pixeldance import train_lib
from pixeldance.data import pipeline, synthetic
from pixeldance.models import vae as vae_lib
from pixeldance.models import wan_vae


MODEL_SPEC = "vae_model.json"


def build_vae(config, workdir: str | None = None) -> vae_lib.CausalVAE | wan_vae.WanVAE:
    """The VAE of `config`; with `workdir`, the architecture saved there when it was trained
    (so a changed size table never breaks loading an older checkpoint).

    ``config.vae.family == 'wan'`` (a folder written by `pixeldance.convert.wan_vae`) gives the
    `WanVAE` of the converted open weights; otherwise a `CausalVAE`.
    """
    path = os.path.join(workdir, MODEL_SPEC) if workdir else None
    spec = None
    if path and os.path.exists(path):
        with open(path) as f:
            spec = {k: tuple(v) if isinstance(v, list) else v for k, v in json.load(f).items()}
    if config.vae.get("family", "causal") == "wan":
        if spec is None:
            raise FileNotFoundError(f"converted Wan VAE without its architecture (missing {path})")
        return wan_vae.WanVAE(**spec)
    if spec is not None:
        return vae_lib.CausalVAE(**spec)
    return vae_lib.vae_from_variant(config.vae.variant)


def save_model_spec(model: vae_lib.CausalVAE, workdir: str):
    spec = {f.name: getattr(model, f.name) for f in dataclasses.fields(vae_lib.CausalVAE)
            if f.name not in ("parent", "name") and f.name != "dtype"}
    with open(os.path.join(workdir, MODEL_SPEC), "w") as f:
        json.dump(spec, f, indent=1)


def world_config(config) -> synthetic.WorldConfig:
    return synthetic.WorldConfig(num_frames=config.data.num_frames, resolution=config.data.resolution,
                                 num_objects=config.data.num_objects, seed=config.data.world_seed)


def to_unit(video_u8):
    """uint8 [..., 3] in [0, 255] -> float32 in [-1, 1]."""
    return video_u8.astype(jnp.float32) / 127.5 - 1.0


def vae_loss(params, batch, rng, *, model, l1_weight, l2_weight, kl_weight):
    """batch['video']: uint8 [B, F, H, W, 3] -> (loss, metrics)."""
    video = to_unit(batch["video"])
    out = model.apply(params, video, sample_rng=rng)
    err = out["recon"] - video
    l1, l2 = jnp.mean(jnp.abs(err)), jnp.mean(jnp.square(err))
    mean, logvar = out["mean"], out["logvar"]
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    psnr = -10.0 * jnp.log10(jnp.mean(jnp.square(jnp.clip(out["recon"], -1, 1) - video)) / 4.0)
    loss = l1_weight * l1 + l2_weight * l2 + kl_weight * kl
    return loss, dict(l1=l1, l2=l2, kl=kl, psnr=psnr)


def train_vae(config, workdir: str):
    c = config.vae
    # Mesh and data.
    mesh, preset = train_lib.mesh_from_config(config.mesh)
    frames = c.train_frames

    def crop(example, rng):
        # A random window of `frames` frames: the VAE is causal and convolutional, so short clips
        # teach it what it needs and cost a fraction of full ones.
        start = rng.integers(0, example["video"].shape[0] - frames + 1)
        return dict(video=example["video"][start:start + frames])

    source = synthetic.ShapesSource("train", size=1_000_000, config=world_config(config))
    batches = pipeline.make_batches(source, batch_size=c.batch_size, seed=config.seed, transform=crop,
                                    num_workers=config.data.num_workers)

    # Model, optimizer, sharded init or restore.
    model = build_vae(config, workdir)
    save_model_spec(model, workdir)
    res = config.data.resolution
    dummy = jnp.zeros((1, frames, res, res, 3), jnp.float32)
    init_fn = lambda rng: model.init(rng, dummy)
    tx = train_lib.stage_optimizer(c)
    rng = jax.random.key(config.seed)
    loss_fn = functools.partial(vae_loss, model=model, l1_weight=c.l1_weight,
                                l2_weight=c.l2_weight, kl_weight=c.kl_weight)
    return train_lib.fit(stage="vae", workdir=workdir, mesh=mesh, preset=preset, init_fn=init_fn,
                         loss_fn=loss_fn, tx=tx, batches=batches, stage_config=c, rng=rng)
