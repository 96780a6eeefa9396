"""VAE trainer: reconstruction, KL, optional perceptual and GAN losses, EMA, Orbax, resumable.

Axis glossary: B batch, F frames, H/W pixels, T latent frames, h/w latent height/width, C channels.

The loss (weights in ``config.vae``), on clips of `train_frames` frames (>= 9: the first frame
and two 4-frame groups, so the decoder learns group after group):

  l1 |x - x'| + l2 (x - x')^2                      reconstruction
  + perceptual_weight * LPIPS-style distance        if `perceptual_path` names a weights file
  + kl_weight * KL(q(z|x) || N(0, 1))
  + disc_weight * lambda * (-D(x'))                 from step `disc_start`, if disc_weight > 0
  and the discriminator's hinge loss relu(1 - D(x)) + relu(1 + D(x')), trained in the same step.

lambda is VQGAN's adaptive weight: the ratio of the gradient norms of the reconstruction and GAN
losses at the decoder's last layer (or 1 with ``disc_adaptive=False``). After training, the EMA
parameters reconstruct held-out clips (PSNR and SSIM to TensorBoard and metrics.jsonl as stage
'vae_eval', an image grid and a GIF in the workdir) and encode training clips for the latent
statistics (`latent_stats.json`, which the DiT normalises with).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pixeldance import train_lib
from pixeldance.data import buckets, pipeline, synthetic, video_folder, video_io
from pixeldance.models import vae as vae_lib
from pixeldance.models import wan_vae


MODEL_SPEC = "vae_model.json"
LATENT_STATS = "latent_stats.json"  # = trainers.dit.LATENT_STATS (not imported: it pulls in the DiT)
RECON_IMAGE = "vae_recon.png"
RECON_GIF = "vae_recon.gif"

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
)


def option(stage_config, name: str):
    """config.vae.<name>, or its default from OPTIONS when the config has no such field."""
    return stage_config.get(name, OPTIONS[name])


def build_vae(config, workdir: str | None = None) -> vae_lib.CausalVAE | wan_vae.WanVAE:
    """The VAE of `config`; with `workdir`, the architecture saved there when it was trained
    (so a changed size table never breaks loading an older checkpoint).

    ``config.vae.family == 'wan'`` (a folder written by `pixeldance.convert.wan_vae`) gives the
    `WanVAE` of the converted open weights; otherwise a `CausalVAE` (with a discriminator when
    ``config.vae.disc_weight > 0``).
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
    disc = tuple(option(config.vae, "disc_channels")) if option(config.vae, "disc_weight") > 0 else ()
    return vae_lib.vae_from_variant(config.vae.variant, disc_channels=disc)


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


# ---------------------------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------------------------

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


def _reconstruction(recon, video, weights: LossWeights, perceptual):
    """(weighted reconstruction loss, its parts): l1, l2 and, with a feature net, perceptual."""
    err = recon - video
    l1, l2 = jnp.mean(jnp.abs(err)), jnp.mean(jnp.square(err))
    loss, parts = weights.l1 * l1 + weights.l2 * l2, dict(l1=l1, l2=l2)
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


def load_perceptual(stage_config) -> vae_lib.PerceptualNet | None:
    """The perceptual feature network of config.vae, or None (weight 0, or no weights file)."""
    path = option(stage_config, "perceptual_path")
    if option(stage_config, "perceptual_weight") <= 0 or not path:
        return None
    if not os.path.exists(path):
        print(f"perceptual loss off: no weights file at {path}")
        return None
    return vae_lib.PerceptualNet(path)


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
# After training: reconstructions of held-out clips, latent statistics.
# ---------------------------------------------------------------------------------------------

def _encode_decode_fns(model):
    encode = jax.jit(lambda p, v: model.apply(p, to_unit(v), method=vae_lib.CausalVAE.encode)[0])
    decode = jax.jit(lambda p, z: model.apply(p, z, method=vae_lib.CausalVAE.decode))
    return encode, decode


def _batched(items: np.ndarray, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def reconstruct(model, params, videos: np.ndarray, batch_size: int = 8, fns=None) -> dict:
    """Encode (posterior mean) and decode clips. videos: uint8 [N, F, H, W, 3] with F = 1 + 4k.

    Returns dict(recon uint8 [N, F, H, W, 3], psnr float [N] in dB, ssim float [N]) (per clip).
    """
    encode, decode = fns or _encode_decode_fns(model)
    recons, psnrs, ssims = [], [], []
    for batch in _batched(videos, batch_size):
        recon = decode(params, encode(params, batch))
        target = to_unit(jnp.asarray(batch))
        mse = jnp.mean(jnp.square(jnp.clip(recon, -1, 1) - target), axis=(1, 2, 3, 4))
        psnrs.append(np.asarray(-10.0 * jnp.log10(mse / 4.0)))
        ssims.append(np.asarray(jnp.mean(ssim(recon, target), axis=1)))
        recons.append(np.asarray(jnp.clip(jnp.round((recon + 1.0) * 127.5), 0, 255)).astype(np.uint8))
    return dict(recon=np.concatenate(recons), psnr=np.concatenate(psnrs), ssim=np.concatenate(ssims))


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


def evaluate_vae(config, model, params, workdir: str, step: int, fns=None) -> dict:
    """Held-out reconstructions after training: PSNR/SSIM (mean over clips) to metrics.jsonl and
    TensorBoard (stage 'vae_eval'), the image grid (also in TensorBoard) and a GIF to the workdir."""
    n = option(config.vae, "eval_videos")
    if n <= 0:
        return {}
    # (a video folder has no held-out part: its 'heldout' clips are other windows of its videos)
    source = video_folder.make_source(config, "heldout", size=n)
    videos = np.stack([source[i]["video"] for i in range(n)])
    out = reconstruct(model, params, videos, fns=fns)
    scalars = dict(psnr=float(out["psnr"].mean()), ssim=float(out["ssim"].mean()),
                   psnr_min=float(out["psnr"].min()), num_videos=n)
    writer = train_lib.MetricWriter(workdir, "vae_eval")
    writer.truncate_after(step - 1)  # a re-run replaces this step's line
    writer.write(step, scalars)
    writer.close()
    shown = min(n, 4)
    image = recon_image(videos[:shown], out["recon"][:shown])
    video_io.write_image(os.path.join(workdir, RECON_IMAGE), image)
    pairs = np.concatenate([videos[:shown], out["recon"][:shown]], axis=3)  # clip | reconstruction
    video_io.write_gif(os.path.join(workdir, RECON_GIF), video_io.video_grid(pairs, columns=1), scale=2)
    if jax.process_index() == 0:
        from tensorboardX import SummaryWriter
        with SummaryWriter(os.path.join(workdir, "tensorboard", "vae_eval")) as tb:
            tb.add_image("vae_eval/reconstructions", image, step, dataformats="HWC")
    print(f"vae eval (step {step}, {n} held-out clips, EMA): PSNR {scalars['psnr']:.2f} dB, "
          f"SSIM {scalars['ssim']:.4f}; {os.path.join(workdir, RECON_IMAGE)}")
    return scalars


def latent_statistics(model, params, videos, batch_size: int = 8, fns=None) -> dict:
    """Per-channel mean and std of the posterior means of `videos` (an iterable of uint8
    [B, F, H, W, 3] batches, or one array): dict(mean [C], std [C] (>= 1e-3), num_videos)."""
    encode = (fns or _encode_decode_fns(model))[0]
    total, total_sq, count, n = 0.0, 0.0, 0, 0
    batches = _batched(videos, batch_size) if isinstance(videos, np.ndarray) else videos
    for batch in batches:
        z = np.asarray(encode(params, batch), np.float64)
        flat = z.reshape(-1, z.shape[-1])
        total, total_sq = total + flat.sum(0), total_sq + np.square(flat).sum(0)
        count, n = count + len(flat), n + len(batch)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    return dict(mean=mean.tolist(), std=np.maximum(std, 1e-3).tolist(), num_videos=n)


def write_latent_stats(config, model, params, workdir: str, step: int, fns=None) -> dict | None:
    """`latent_stats.json` from `stats_videos` training clips, stored with the VAE checkpoint
    (source 'train_vae', vae_step); the cache stage keeps them while that step is the newest."""
    n = option(config.vae, "stats_videos")
    if n <= 0:
        return None
    source = video_folder.make_source(config, "train", size=n)
    batches = (np.stack([source[i]["video"] for i in range(s, min(s + 8, n))]) for s in range(0, n, 8))
    stats = dict(latent_statistics(model, params, batches, fns=fns), source="train_vae", vae_step=step)
    tmp = os.path.join(workdir, LATENT_STATS + ".tmp")
    with open(tmp, "w") as f:
        json.dump(stats, f, indent=1)
    os.replace(tmp, os.path.join(workdir, LATENT_STATS))
    return stats


# ---------------------------------------------------------------------------------------------
# The trainer.
# ---------------------------------------------------------------------------------------------

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
    source = video_folder.make_source(config, "train", size=1_000_000, mixed_shapes=True)
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
    weights = LossWeights(l1=c.l1_weight, l2=c.l2_weight, kl=c.kl_weight,
                          perceptual=option(c, "perceptual_weight"), disc=option(c, "disc_weight"),
                          disc_start=option(c, "disc_start"), adaptive=option(c, "disc_adaptive"))
    if weights.disc > 0:
        batches = StepBatches(batches)

    # Model, optimizer, sharded init or restore. The discriminator (if any) is part of the
    # parameters and trained by the same optimizer.
    model = build_vae(config, workdir)
    if weights.disc > 0 and not model.disc_channels:
        raise ValueError(f"config.vae.disc_weight={weights.disc} but the VAE saved in {workdir} has no "
                         f"discriminator; use a new workdir")
    save_model_spec(model, workdir)
    dummy = jnp.zeros((1, frames, size, size, 3), jnp.float32)
    init_fn = lambda rng: model.init(rng, dummy)
    tx = train_lib.stage_optimizer(c)
    rng = jax.random.key(config.seed)
    loss_fn = functools.partial(vae_loss, model=model, weights=weights, perceptual=load_perceptual(c))
    state = train_lib.fit(stage="vae", workdir=workdir, mesh=mesh, preset=preset, init_fn=init_fn,
                          loss_fn=loss_fn, tx=tx, batches=batches, stage_config=c, rng=rng)

    # Held-out reconstructions and latent statistics, with the EMA parameters (once per final
    # step: a re-run of a finished stage leaves them, and the log, as they are).
    video_folder.log_summary(source, "train_vae")
    step = int(jax.device_get(state.step))
    fns = _encode_decode_fns(model)
    if not _evaluated(workdir, step):
        evaluate_vae(config, model, state.ema_params, workdir, step, fns=fns)
    if not _stats_written(workdir, step):
        write_latent_stats(config, model, state.ema_params, workdir, step, fns=fns)
    return state


def _evaluated(workdir: str, step: int) -> bool:
    """Whether metrics.jsonl already holds the 'vae_eval' line of this step."""
    path = os.path.join(workdir, train_lib.METRICS_FILE)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("stage") == "vae_eval" and entry.get("step") == step:
                return True
    return False


def _stats_written(workdir: str, step: int) -> bool:
    """Whether latent_stats.json holds this VAE step's statistics."""
    path = os.path.join(workdir, LATENT_STATS)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        stats = json.load(f)
    return stats.get("source") == "train_vae" and stats.get("vae_step") == step
