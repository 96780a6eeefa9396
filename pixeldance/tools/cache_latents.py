"""Encodes training videos once with the frozen VAE into a latent cache the DiT trains from.

Writes `<workdir>/cache/latents.npz` (z [N, T, h, w, C]; z_last [N, K, h, w, C], the last K
frames each encoded as an image, latest first; tokens int32 [N, S]; captions) and the
per-channel latent statistics `<workdir>/latent_stats.json` that the DiT normalises with.
An existing cache of the requested size is kept (the stage is resumable by skipping).
"""
from __future__ import annotations

import json
import os

import numpy as np
from tqdm import tqdm

from pixeldance.data import synthetic


def cache_path(workdir: str) -> str:
    return os.path.join(workdir, "cache", "latents.npz")


def cache_latents(config, workdir: str, *, last_from: int | None = None) -> str:
    from pixeldance.sample import load_vae
    from pixeldance.trainers import dit as dit_trainer
    from pixeldance.trainers import vae as vae_trainer

    path = cache_path(workdir)
    n = config.cache.num_videos
    if os.path.exists(path) and os.path.exists(os.path.join(workdir, dit_trainer.LATENT_STATS)):
        with np.load(path) as f:
            if len(f["z"]) == n:
                print(f"latent cache: keeping {path} ({n} videos)")
                return path
    K = config.cond.last_from if last_from is None else last_from
    vae = load_vae(workdir)
    tokenizer = dit_trainer.build_tokenizer(config)
    source = synthetic.ShapesSource("train", size=n, config=vae_trainer.world_config(config))
    bs = config.cache.batch_size
    zs, z_lasts, captions = [], [], []
    for start in tqdm(range(0, n, bs), desc="cache", unit="batch"):
        items = [source[i] for i in range(start, min(start + bs, n))]
        videos = np.stack([it["video"] for it in items])  # [B, F, H, W, 3]
        zs.append(vae.encode(videos))
        # The last K frames as one-frame videos (images), as PixelDance's last-frame instruction.
        lasts = videos[:, ::-1][:, :K]  # [B, K, H, W, 3], latest first
        B = len(items)
        z_last = vae.encode(lasts.reshape(B * K, 1, *lasts.shape[2:]))[:, 0]
        z_lasts.append(z_last.reshape(B, K, *z_last.shape[1:]))
        captions += [it["caption"] for it in items]
    z = np.concatenate(zs)
    z_last = np.concatenate(z_lasts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, z=z, z_last=z_last, tokens=tokenizer(captions), captions=np.asarray(captions))
    os.replace(tmp, path)
    axes = tuple(range(z.ndim - 1))
    stats = dict(mean=z.mean(axes).tolist(), std=np.maximum(z.std(axes), 1e-3).tolist(), num_videos=n)
    with open(os.path.join(workdir, dit_trainer.LATENT_STATS), "w") as f:
        json.dump(stats, f, indent=1)
    print(f"latent cache: wrote {path}: z {z.shape}, z_last {z_last.shape}")
    return path
