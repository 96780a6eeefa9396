"""VAE trainer: reconstruction, KL, optional perceptual and GAN losses, EMA, Orbax, resumable.

The loss (weights in ``config.vae``), on clips of `train_frames` frames (>= 9: the first frame
and two 4-frame groups, so the decoder learns group after group):

  l1 |x - x'| + l2 (x - x')^2                      reconstruction
  + temporal_diff_weight |(x'[f+1] - x'[f]) - (x[f+1] - x[f])|   if > 0 (motion between frames;
                                                   squared with temporal_diff_norm 'l2')
  + perceptual_weight * LPIPS-style distance        if `perceptual_path` names a weights file
  + kl_weight * KL(q(z|x) || N(0, 1))
  + disc_weight * lambda * (-D(x'))                 from step `disc_start`, if disc_weight > 0
  and the discriminator's hinge loss relu(1 - D(x)) + relu(1 + D(x')), trained in the same step.

lambda is VQGAN's adaptive weight: the ratio of the gradient norms of the reconstruction and GAN
losses at the decoder's last layer (or 1 with ``disc_adaptive=False``). After training (and every
config.evals.every steps), the evaluators of config.evals.vae score the EMA parameters (default
'reconstruction': held-out PSNR / SSIM as stage 'vae_eval' in metrics.jsonl and TensorBoard, an
image grid and a GIF in the workdir), and training clips are encoded for the latent statistics
(`workdir.LatentStats`, which the DiT normalises with).

Axis letters (glossary: pixeldance/models/__init__.py): B batch, F frames, H/W pixel height/width,
T latent frames, h/w latent height/width, C channels.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pixeldance import build, train_lib
from pixeldance import workdir as workdir_lib
from pixeldance.data import buckets, pipeline, sources
from pixeldance.evaluators import common as eval_common
from pixeldance.evaluators import registry as eval_registry
from pixeldance.evaluators.reconstruction import psnr, to_unit
from pixeldance.models import vae as vae_lib
from pixeldance.models.perceptual import PerceptualNet
from pixeldance.sample import VideoVAE


# Defaults of the config.vae fields added after the first release (as in experiments/base.py), for
# configs saved in older workdirs.
OPTIONS = dict(
    train_size=0,             # random spatial crops of this many pixels (0: full frames)
    perceptual_weight=0.0,
    perceptual_path="",       # safetensors of a VGG-layout feature net; "" or missing: no perceptual loss
    disc_weight=0.0,          # 0: no discriminator
    disc_start=0,             # step from which the GAN losses count
    disc_channels=(32, 64, 128),
    disc_adaptive=True,       # VQGAN's adaptive weight (else lambda = 1)
    eval_videos=8,            # held-out clips reconstructed after training (0: none)
    stats_videos=64,          # training clips encoded for latent_stats.json (0: left to the cache stage)
    temporal_diff_weight=0.0, # distance between consecutive-frame differences of recon and input (0: off)
    temporal_diff_norm="l1",  # 'l1' or 'l2' (squared) distance of those differences
    temporal_upsample_init="copy",  # decoder's temporal upsamplers at init: 'copy' | 'independent'
)


def option(stage_config, name: str):
    """config.vae.<name>, or its default from OPTIONS when the config has no such field."""
    return stage_config.get(name, OPTIONS[name])


# ---------------------------------------------------------------------------------------------
# The loss.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LossWeights:
    l1: float = 1.0
    l2: float = 1.0
    kl: float = 1e-6
    perceptual: float = 0.0
    disc: float = 0.0
    disc_start: int = 0
    adaptive: bool = True
    temporal_diff: float = 0.0
    temporal_diff_norm: str = "l1"


def loss_weights(stage_config) -> LossWeights:
    """The loss weights of config.vae (fields missing from older configs at their OPTIONS default)."""
    c = stage_config
    return LossWeights(l1=c.l1_weight, l2=c.l2_weight, kl=c.kl_weight,
                       perceptual=option(c, "perceptual_weight"), disc=option(c, "disc_weight"),
                       disc_start=option(c, "disc_start"), adaptive=option(c, "disc_adaptive"),
                       temporal_diff=option(c, "temporal_diff_weight"),
                       temporal_diff_norm=option(c, "temporal_diff_norm"))


def temporal_difference(recon, video, norm: str = "l1"):
    """Mean L1 (norm 'l1') or squared ('l2') distance between the consecutive-frame
    differences of `recon` and `video`.

    recon, video: float [B, F, H, W, 3] -> float32 scalar, the mean over [B, F-1, H, W, 3] of
    |(recon[f+1] - recon[f]) - (video[f+1] - video[f])|, i.e. of |err[f+1] - err[f]| with
    err = recon - video; 0 when F < 2 (an image batch has no motion). Why: the per-frame L1 / L2
    does not care how the error moves from frame to frame, and the causal VAE's decoder makes
    each 4-frame latent group's frames too alike (the object lags at the last frame of a group
    and jumps across the boundary: issue 19). This term is small only when each frame moves from
    the previous one as the input does, across group boundaries as inside them.
    """
    if recon.shape[1] < 2:
        return jnp.zeros((), jnp.float32)
    err = (recon - video).astype(jnp.float32)
    d = err[:, 1:] - err[:, :-1]
    if norm == "l1":
        return jnp.mean(jnp.abs(d))
    if norm == "l2":
        return jnp.mean(jnp.square(d))
    raise ValueError(f"temporal_diff_norm {norm!r} must be 'l1' or 'l2'")


def _reconstruction(recon, video, weights: LossWeights, perceptual):
    """(weighted reconstruction loss, its parts): l1, l2 and, with a feature net, perceptual;
    with weights.temporal_diff > 0 also 'temporal_diff' (`temporal_difference`). At weight 0 the
    term is not built at all, so the default loss and its compiled step are unchanged."""
    err = recon - video
    l1, l2 = jnp.mean(jnp.abs(err)), jnp.mean(jnp.square(err))
    loss, parts = weights.l1 * l1 + weights.l2 * l2, dict(l1=l1, l2=l2)
    if weights.temporal_diff > 0:
        parts["temporal_diff"] = temporal_difference(recon, video, weights.temporal_diff_norm)
        loss = loss + weights.temporal_diff * parts["temporal_diff"]
    if perceptual is not None:
        parts["perceptual"] = jnp.mean(perceptual.distance(recon, video))
        loss = loss + weights.perceptual * parts["perceptual"]
    return loss, parts


def _kl(mean, logvar):
    return 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def _quality(recon, video):
    """Per-step train-batch PSNR. SSIM is left to the held-out evaluation (`evaluate_vae`):
    computed every step, its Gaussian blurs halved the `shapes` VAE's step rate on the CPU."""
    return dict(psnr=psnr(lax.stop_gradient(recon), lax.stop_gradient(video)))


def vae_loss(params, batch, rng, *, model, weights: LossWeights, perceptual=None):
    """batch['video']: uint8 [B, F, H, W, 3] (and 'step' int32 [B] with a discriminator)
    -> (loss, metrics). Without a discriminator the gradient flows through the losses as written."""
    video = to_unit(batch["video"])
    if weights.disc > 0:
        return _vae_gan_loss(params, batch["step"][0], video, rng, model=model, weights=weights,
                             perceptual=perceptual)
    out = model.apply(params, video, sample_rng=rng)
    rec, parts = _reconstruction(out["recon"], video, weights, perceptual)
    kl = _kl(out["mean"], out["logvar"])
    loss = rec + weights.kl * kl
    return loss, dict(**parts, kl=kl, **_quality(out["recon"], video))


def _vae_gan_loss(params, step, video, rng, *, model, weights: LossWeights, perceptual):
    """The loss with the GAN terms; `params` holds the VAE and its discriminator.

    One scalar whose gradient is, for the VAE, that of rec + w * gen (+ KL) and, for the
    discriminator, that of its hinge loss: the generator term sees the discriminator's
    parameters through stop_gradient, the hinge loss sees reconstructions through it. The
    gradients of the reconstruction and generator losses with respect to the reconstruction
    are taken once, give the adaptive weight at the last layer, and reach the VAE through
    ``sum(stop_gradient(g) * recon)`` (same gradient as the losses themselves), so the
    discriminator runs forward and backward once per loss rather than once more for lambda.
    """
    sg = lax.stop_gradient
    out = model.apply(params, video, sample_rng=rng, with_features=True)
    recon = out["recon"]
    rec_fn = lambda r: _reconstruction(r, video, weights, perceptual)
    (rec, parts), g_rec = jax.value_and_grad(rec_fn, has_aux=True)(sg(recon))
    frozen = sg(params)
    on = step >= weights.disc_start

    def gan(params):
        gen_fn = lambda r: -jnp.mean(model.apply(frozen, r, method=vae_lib.CausalVAE.discriminate))
        gen, g_gen = jax.value_and_grad(gen_fn)(sg(recon))
        lam = jnp.ones((), jnp.float32)
        if weights.adaptive:
            conv_out = frozen["params"]["decoder"]["conv_out"]
            head = lambda k: vae_lib.decoder_head(model, {**conv_out, "kernel": k}, sg(out["features"]))
            _, head_vjp = jax.vjp(head, conv_out["kernel"])
            norm = lambda g: jnp.sqrt(jnp.sum(jnp.square(head_vjp(g)[0])))
            lam = jnp.clip(norm(g_rec) / (norm(g_gen) + 1e-4), 0.0, 1e4)
        logits = model.apply(params, jnp.concatenate([video, sg(recon)]),
                             method=vae_lib.CausalVAE.discriminate)
        real, fake = jnp.split(logits, 2)
        disc = jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))
        return gen, g_gen, sg(lam), disc, jnp.mean(real), jnp.mean(fake)

    def off(params):
        z = jnp.zeros((), jnp.float32)
        return z, jnp.zeros_like(recon), z, z, z, z

    gen, g_gen, lam, disc, real, fake = lax.cond(on, gan, off, params)
    w_gen = weights.disc * lam
    surrogate = jnp.sum(sg(g_rec + w_gen * g_gen) * recon)
    kl = _kl(out["mean"], out["logvar"])
    loss = (surrogate - sg(surrogate)) + rec + w_gen * gen + weights.kl * kl + disc
    return loss, dict(**parts, kl=kl, gen=gen, disc=disc, adaptive_weight=lam, logits_real=real,
                      logits_fake=fake, **_quality(recon, video))


def load_perceptual(stage_config) -> PerceptualNet | None:
    """The perceptual feature network of config.vae, or None (weight 0, or no weights file)."""
    path = option(stage_config, "perceptual_path")
    if option(stage_config, "perceptual_weight") <= 0 or not path:
        return None
    if not os.path.exists(path):
        print(f"perceptual loss off: no weights file at {path}")
        return None
    return PerceptualNet(path)


class StepBatches:
    """Batches with their global step added ('step': int32 [B_host]), for the GAN start step.

    The position it saves with a checkpoint is the wrapped iterator's plus the count.
    """

    def __init__(self, batches):
        self._batches, self._count = batches, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._batches)
        batch["step"] = np.full((len(batch["video"]),), self._count, np.int32)
        self._count += 1
        return batch

    def get_state(self) -> dict:
        return dict(batches=self._batches.get_state(), count=self._count)

    def set_state(self, state: dict):
        if state:
            self._batches.set_state(state["batches"])
            self._count = int(state["count"])


# ---------------------------------------------------------------------------------------------
# After training: latent statistics.
# ---------------------------------------------------------------------------------------------

def latent_statistics(vae: VideoVAE, batches) -> workdir_lib.LatentStats:
    """Per-channel mean and std (std >= 1e-3) of the posterior means of `batches` (an iterable of
    uint8 [B, F, H, W, 3]), accumulated in float64; source 'train_vae' (vae_step left unset)."""
    total, total_sq, count, n = 0.0, 0.0, 0, 0
    for batch in batches:
        z = np.asarray(vae.encode(batch), np.float64)
        flat = z.reshape(-1, z.shape[-1])
        total, total_sq = total + flat.sum(0), total_sq + np.square(flat).sum(0)
        count, n = count + len(flat), n + len(batch)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    return workdir_lib.LatentStats.from_moments(mean, std, source="train_vae", num_videos=n)


def write_latent_stats(config, vae: VideoVAE, workdir: str, step: int) -> workdir_lib.LatentStats | None:
    """latent_stats.json from config.vae.stats_videos training clips, tagged with the VAE step
    (source 'train_vae'); the cache stage keeps them while that step is the newest."""
    n = option(config.vae, "stats_videos")
    if n <= 0:
        return None
    source = sources.make_source(config, "train", size=n)
    batches = (np.stack([source[i]["video"] for i in range(s, min(s + 8, n))]) for s in range(0, n, 8))
    stats = dataclasses.replace(latent_statistics(vae, batches), vae_step=step)
    stats.write(workdir)
    return stats


# ---------------------------------------------------------------------------------------------
# The trainer.
# ---------------------------------------------------------------------------------------------

def new_or_saved_vae(config, workdir: str):
    """The VAE the stage trains: the architecture saved in `workdir` when there is one (resuming
    keeps it), else config.vae's (`build.vae`) with config.vae.temporal_upsample_init applied to
    a `CausalVAE` (an initialisation choice, saved in vae_model.json with the architecture)."""
    spec = workdir_lib.read_model_spec(workdir)
    model = build.vae(config, spec)
    init = option(config.vae, "temporal_upsample_init")
    if spec is None and isinstance(model, vae_lib.CausalVAE) and init != model.temporal_upsample_init:
        model = model.clone(temporal_upsample_init=init)
    return model


def train_vae(config, workdir: str):
    c = config.vae
    # Mesh and data.
    mesh, preset = train_lib.mesh_from_config(config.mesh)
    frames = c.train_frames
    res = config.data.resolution
    size = option(c, "train_size") or res

    def crop(example, rng):
        # A random window of `frames` frames (and of size x size pixels): the VAE is causal and
        # convolutional, so short clips and small crops teach it what it needs at a fraction of
        # the cost of full ones. Shorter items (images: one frame) stay whole in time; items of
        # a bucket's H x W are cropped to at most train_size on each side.
        video = example["video"]
        n = min(frames, video.shape[0])
        start = rng.integers(0, video.shape[0] - n + 1)
        video = video[start:start + n]
        h, w = video.shape[1:3]
        if option(c, "train_size") and size < max(h, w):
            ch, cw = min(size, h), min(size, w)
            y, x = rng.integers(0, [h - ch + 1, w - cw + 1])
            video = video[:, y:y + ch, x:x + cw]
        return dict(video=video)

    # config.data.name: the synthetic world, a video or image folder (item i: a clip of entry
    # i % N), a mixture. With config.data.buckets, batches of one bucket's shape each (jit
    # compiles the step once per shape).
    bucket_spec = config.data.get("buckets", "")
    source = sources.make_source(config, "train", size=1_000_000, mixed_shapes=True)
    if bucket_spec:
        batches = buckets.make_bucketed_batches(source, bucket_spec, batch_size=c.batch_size, seed=config.seed,
                                                transform=crop, num_workers=config.data.num_workers)
    else:
        if getattr(source, "item_shape", ()) is None:
            raise ValueError(f"config.data.mixture={config.data.mixture!r} mixes item shapes "
                             f"{source.item_shapes()}: set config.data.buckets (e.g. '9x64x64,1x64x64') "
                             f"so that every batch has one shape")
        batches = pipeline.make_batches(source, batch_size=c.batch_size, seed=config.seed, transform=crop,
                                        num_workers=config.data.num_workers)
    weights = loss_weights(c)
    if weights.disc > 0:
        batches = StepBatches(batches)
    evaluators = eval_registry.make(config.evals.vae, config, "vae")

    # Model, optimizer, sharded init or restore. The discriminator (if any) is part of the
    # parameters and trained by the same optimizer. The architecture saved in the workdir wins
    # over the config's, so a changed size table never breaks resuming.
    model = new_or_saved_vae(config, workdir)
    if weights.disc > 0 and not model.disc_channels:
        raise ValueError(f"config.vae.disc_weight={weights.disc} but the VAE saved in {workdir} has no "
                         f"discriminator; use a new workdir")
    workdir_lib.write_model_spec(workdir, model)
    init_fn = build.vae_init_fn(model, frames, size, size)
    tx = train_lib.stage_optimizer(c)
    rng = jax.random.key(config.seed)
    loss_fn = functools.partial(vae_loss, model=model, weights=weights, perceptual=load_perceptual(c))
    vae = VideoVAE(model, None)  # the EMA weights being evaluated (compiled once for every evaluation)

    def evaluate(state, step: int, out_dir: str | None = None):
        vae.params = state.ema_params
        eval_common.run(evaluators, vae, workdir=workdir, step=step, out_dir=out_dir)

    state = train_lib.fit(stage="vae", workdir=workdir, mesh=mesh, preset=preset, init_fn=init_fn,
                          loss_fn=loss_fn, tx=tx, batches=batches, stage_config=c, rng=rng,
                          evaluate=evaluate if evaluators else None, eval_every=config.evals.every)

    # Evaluation and latent statistics of the final EMA parameters (once per final step: a re-run
    # of a finished stage leaves them, and the log, as they are).
    sources.log_summary(source, "train_vae")
    step = int(jax.device_get(state.step))
    if evaluators and not train_lib.logged(workdir, eval_common.STAGES["vae"], step):
        evaluate(state, step, out_dir=workdir)
    if not workdir_lib.LatentStats.from_vae_stage(workdir, step):
        vae.params = state.ema_params
        write_latent_stats(config, vae, workdir, step)
    return state
