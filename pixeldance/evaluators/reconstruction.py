"""VAE reconstruction quality: PSNR and SSIM of held-out clips encoded and decoded.

The evaluator 'reconstruction' (subject: a `sample.VideoVAE`) encodes config.vae.eval_videos
held-out clips of config.data to their posterior means, decodes them, and reports PSNR (dB) and
SSIM averaged over clips (float decoded videos, clipped to [-1, 1]); with an out_dir it also
writes an image grid (clip frames above their reconstructions) and a GIF there. The metric
functions are shared with the VAE trainer (its per-step train PSNR).

On the synthetic world (config.data.name 'shapes') it also scores the smoothness of the
reconstructions' motion (`synthetic.smoothness_from_centroids` with the VAE's own
temporal_factor as the group length: centroid step across latent-group boundaries over the step
inside groups, 1.0 for the clips themselves): the median, p90 and count over clips in the
result's report and the printed line (not among the logged scalars: the main job's TensorBoard
tags are fixed by workdir.TENSORBOARD_TAGS and the README's table); and whether the
reconstructions keep the objects' colours (`colour_report`: the fraction of clips whose
reconstruction the synthetic evaluator reads as the caption's colour, the same for the clips
themselves, and the background's RGB error), because a VAE can reach a fair PSNR while shifting
hues, and the DiT trained on its latents then gets colours wrong in every mode (issue 19, seed 1).

Axis letters (glossary: pixeldance/models/__init__.py): B batch (N clips), F frames, H/W pixel
height/width, T latent frames, h/w latent height/width, C channels.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from jax import lax

from pixeldance.data import sources, video_io
from pixeldance.evaluators import synthetic as scoring
from pixeldance.evaluators.common import Evaluator, Result

RECON_IMAGE = "vae_recon.png"
RECON_GIF = "vae_recon.gif"


def to_unit(video_u8):
    """uint8 [..., 3] in [0, 255] -> float32 in [-1, 1]."""
    return video_u8.astype(jnp.float32) / 127.5 - 1.0


def psnr(recon, video):
    """PSNR in dB of float videos in [-1, 1] (recon clipped), over all given pixels: float32 []."""
    return -10.0 * jnp.log10(jnp.mean(jnp.square(jnp.clip(recon, -1, 1) - video)) / 4.0)


def ssim(recon, video, window: int = 11, sigma: float = 1.5):
    """SSIM of float frames [..., H, W, 3] in [-1, 1] (recon clipped), per frame: float32 [...].

    Wang et al. 2004 with the usual constants: an 11 x 11 Gaussian window (sigma 1.5, smaller
    for frames under 11 pixels), valid positions only, the mean over positions and channels.
    """
    lead, (h, w, c) = recon.shape[:-3], recon.shape[-3:]
    a = (jnp.clip(recon, -1, 1).reshape((-1, h, w, c)) + 1.0) / 2.0  # [N, H, W, C] in [0, 1]
    b = (video.reshape((-1, h, w, c)) + 1.0) / 2.0
    k = min(window, h, w)
    k -= 1 - k % 2  # odd
    g = np.exp(-0.5 * ((np.arange(k) - k // 2) / sigma) ** 2)
    g = jnp.asarray(g / g.sum(), jnp.float32)

    def blur(x):  # separable depthwise Gaussian, 'VALID'
        for kernel in (g.reshape(k, 1, 1, 1), g.reshape(1, k, 1, 1)):
            x = lax.conv_general_dilated(x, jnp.tile(kernel, (1, 1, 1, c)), (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         feature_group_count=c)
        return x

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return jnp.mean(s, axis=(1, 2, 3)).reshape(lead)


def reconstruct(vae, videos: np.ndarray, batch_size: int = 8) -> dict:
    """Encode (posterior mean) and decode clips with a `sample.VideoVAE`. videos: uint8
    [N, F, H, W, 3] with F = 1 + 4k.

    Returns dict(recon uint8 [N, F, H, W, 3], psnr float [N] in dB, ssim float [N]) (per clip),
    computed on the float decoded videos clipped to [-1, 1].
    """
    recons, psnrs, ssims = [], [], []
    for start in range(0, len(videos), batch_size):
        batch = videos[start:start + batch_size]
        recon = vae.decode_float(vae.encode(batch))
        target = to_unit(jnp.asarray(batch))
        mse = jnp.mean(jnp.square(jnp.clip(recon, -1, 1) - target), axis=(1, 2, 3, 4))
        psnrs.append(np.asarray(-10.0 * jnp.log10(mse / 4.0)))
        ssims.append(np.asarray(jnp.mean(ssim(recon, target), axis=1)))
        recons.append(np.asarray(jnp.clip(jnp.round((recon + 1.0) * 127.5), 0, 255)).astype(np.uint8))
    return dict(recon=np.concatenate(recons), psnr=np.concatenate(psnrs), ssim=np.concatenate(ssims))


def smoothness_report(vae, videos: np.ndarray, recons: np.ndarray, captions: list[str]) -> dict:
    """Smoothness of synthetic-world clips' reconstructions, with the VAE's temporal_factor as the
    group length. videos, recons: uint8 [N, F, H, W, 3]; captions: N strings (their colours
    separate two objects). Returns `synthetic.smoothness_summary` of the reconstructions
    (smoothness_median, smoothness_p90, smoothness_n), group_frames, and under 'real' the same
    summary of the clips themselves (about 1.0: the reference the reconstructions are read
    against)."""
    g = vae.model.temporal_factor
    return dict(**scoring.smoothness_summary(scoring.smoothness_scores(recons, captions, g)),
                group_frames=g,
                real=scoring.smoothness_summary(scoring.smoothness_scores(videos, captions, g)))


def colour_report(videos: np.ndarray, recons: np.ndarray, captions: list[str]) -> dict:
    """Colour kept by reconstructions of synthetic-world clips. videos, recons: uint8
    [N, F, H, W, 3]; captions: N strings. Returns colour_acc (fraction of reconstructions whose
    objects the evaluator reads as the caption's colours), colour_acc_real (the same for the clips,
    about 1.0: the reference), background_error (mean over clips and frames of the largest
    channel's absolute error of the background colour, the border's median, 0-255); None / 0 for
    no clips."""
    if not len(videos):
        return dict(colour_acc=None, colour_acc_real=None, background_error=None)

    def acc(clips):
        return float(np.mean([scoring.score_video(v, c)["colour_correct"] for v, c in zip(clips, captions)]))

    def border(clips):  # [N, F, 3] median of each frame's border pixels
        x = clips.astype(np.float32)
        ring = np.concatenate([x[:, :, 0], x[:, :, -1], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], axis=2)
        return np.median(ring, axis=2)

    error = np.abs(border(recons) - border(videos)).max(axis=-1)
    return dict(colour_acc=acc(recons), colour_acc_real=acc(videos), background_error=float(error.mean()))


def recon_image(videos: np.ndarray, recons: np.ndarray, pad: int = 2) -> np.ndarray:
    """uint8 [N, F, H, W, 3] twice -> one image: per clip a row of its frames above a row of
    their reconstructions, white padding. uint8 [2N(H+pad), F(W+pad), 3]."""
    rows = np.stack([videos, recons], axis=1).reshape((-1,) + videos.shape[1:])  # [2N, F, H, W, 3]
    n, f, h, w, _ = rows.shape
    out = np.full((n * (h + pad), f * (w + pad), 3), 255, np.uint8)
    for r in range(n):
        for c in range(f):
            out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = rows[r, c]
    return out


class Reconstruction(Evaluator):
    """PSNR / SSIM (mean over clips, and the worst clip's PSNR) of config.vae.eval_videos held-out
    clips of config.data. (A video folder has no held-out part: its 'heldout' clips are other
    windows of its videos.) num_videos 0: nothing is evaluated."""

    name = "reconstruction"
    subject = "vae"

    def __init__(self, config, num_videos: int | None = None):
        self.config = config
        self.num_videos = config.vae.get("eval_videos", 8) if num_videos is None else num_videos

    def evaluate(self, vae, *, step: int, out_dir: str | None = None) -> Result:
        n = self.num_videos
        if n <= 0:
            return Result({})
        source = sources.make_source(self.config, "heldout", size=n)
        items = [source[i] for i in range(n)]
        videos = np.stack([it["video"] for it in items])
        out = reconstruct(vae, videos)
        scalars = dict(psnr=float(out["psnr"].mean()), ssim=float(out["ssim"].mean()),
                       psnr_min=float(out["psnr"].min()), num_videos=n)
        report, smooth = dict(scalars), ""
        if self.config.data.get("name", "shapes") == "shapes":  # one flat object: centroids are exact
            captions = [it["caption"] for it in items]
            report.update(smoothness_report(vae, videos, out["recon"], captions))
            report.update(colour_report(videos, out["recon"], captions))
            if report["smoothness_median"] is not None:
                smooth = (f", smoothness {report['smoothness_median']:.2f} median / "
                          f"{report['smoothness_p90']:.2f} p90 over {report['smoothness_n']} clips")
            smooth += (f", colour kept {report['colour_acc']:.2f} (clips {report['colour_acc_real']:.2f}), "
                       f"background error {report['background_error']:.1f}/255")
        shown = min(n, 4)
        image = recon_image(videos[:shown], out["recon"][:shown])
        pairs = np.concatenate([videos[:shown], out["recon"][:shown]], axis=3)  # clip | reconstruction
        pairs = video_io.video_grid(pairs, columns=1)
        if out_dir:
            video_io.write_image(os.path.join(out_dir, RECON_IMAGE), image)
            video_io.write_gif(os.path.join(out_dir, RECON_GIF), pairs, scale=2)
        print(f"vae eval (step {step}, {n} held-out clips, EMA): PSNR {scalars['psnr']:.2f} dB, "
              f"SSIM {scalars['ssim']:.4f}{smooth}" + (f"; {os.path.join(out_dir, RECON_IMAGE)}" if out_dir else ""))
        return Result(scalars, images=dict(reconstructions=image), videos=dict(reconstruction_videos=pairs),
                      report=report)
