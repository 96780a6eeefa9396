"""Encodes training videos once with the frozen VAE into a latent cache the DiT trains from.

Writes `<workdir>/cache/latents.npz` (z [N, T, h, w, C]; z_last [N, K, h, w, C], the last K
frames each encoded as an image, latest first; tokens int32 [N, S]; captions).
An existing cache of the requested size is kept (the stage is resumable by skipping).

Latent statistics. The DiT normalises latents with the per-channel mean and std in
`<workdir>/latent_stats.json`. The VAE stage writes them with its checkpoint (source
'train_vae', computed on `config.vae.stats_videos` training clips, tagged with the VAE step);
this stage keeps them while that step is the newest VAE checkpoint, and otherwise (no file, an
older VAE, or statistics of another origin) computes them over the cache it writes.
"""
from __future__ import annotations

import json
import os

import numpy as np
from tqdm import tqdm

from pixeldance.data import video_folder


def cache_path(workdir: str) -> str:
    return os.path.join(workdir, "cache", "latents.npz")


def vae_stats_current(workdir: str) -> bool:
    """True if latent_stats.json was written by the VAE stage for the newest VAE checkpoint."""
    from pixeldance.trainers import dit as dit_trainer
    path, vae_dir = os.path.join(workdir, dit_trainer.LATENT_STATS), os.path.join(workdir, "vae")
    if not os.path.exists(path) or not os.path.isdir(vae_dir):
        return False
    with open(path) as f:
        stats = json.load(f)
    steps = [int(d) for d in os.listdir(vae_dir) if d.isdigit()]
    return stats.get("source") == "train_vae" and bool(steps) and stats.get("vae_step") == max(steps)


def cache_latents(config, workdir: str, *, last_from: int | None = None) -> str:
    from pixeldance.sample import load_vae
    from pixeldance.trainers import dit as dit_trainer

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
    source = video_folder.make_source(config, "train", size=n)
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
    if vae_stats_current(workdir):
        print(f"latent cache: keeping the VAE stage's {dit_trainer.LATENT_STATS}")
    else:
        axes = tuple(range(z.ndim - 1))
        stats = dict(mean=z.mean(axes).tolist(), std=np.maximum(z.std(axes), 1e-3).tolist(),
                     num_videos=n, source="cache")
        with open(os.path.join(workdir, dit_trainer.LATENT_STATS), "w") as f:
            json.dump(stats, f, indent=1)
    print(f"latent cache: wrote {path}: z {z.shape}, z_last {z_last.shape}")
    video_folder.log_summary(source, "cache")
    return path
