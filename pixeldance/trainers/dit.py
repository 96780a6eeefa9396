"""DiT trainer: rectified flow on cached VAE latents with PixelDance image instructions.

Data: the latent cache (ArrayRecord shards) of the `cache` stage, in config.cache.path or
`<workdir>/cache` (`pixeldance.data.latent_cache`); with config.train.image_every = k, every k-th
batch is images: from the image cache (config.cache.image_path or `<workdir>/cache_images`)
when config.train.image_source names an image source, else the clips' first latent frames.
With config.data.buckets (and config.cache.bucketed): one cache per bucket and batches of one
bucket's shape each (`bucketed_batches`); images are then the one-frame buckets.

Axis glossary: B batch, T latent frames, h/w latent height/width, C channels, S text tokens,
K candidate last frames.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from pixeldance import rng as rng_lib
from pixeldance import train_lib
from pixeldance.data import buckets, latent_cache, pipeline, synthetic
from pixeldance.diffusion import conditioning, objectives, schedules
from pixeldance.models import dit as dit_lib
from pixeldance.models import text as text_lib

LATENT_STATS = "latent_stats.json"


def build_tokenizer(config):
    """config.text.tokenizer: 'words' (default; the shapes world's closed vocabulary), or for
    free-text captions 'hashed' (words hashed into config.text.vocab_size ids) or 'bytes'."""
    kind = config.text.get("tokenizer", "words")
    if kind == "hashed":
        return text_lib.HashedTokenizer(config.text.get("vocab_size", 4096), config.text.max_length)
    if kind == "bytes":
        return text_lib.ByteTokenizer(config.text.max_length)
    if kind != "words":
        raise ValueError(f"unknown config.text.tokenizer {kind!r}; expected 'words', 'hashed' or 'bytes'")
    if config.data.name != "shapes":
        raise ValueError(f"no word tokenizer for dataset {config.data.name!r}: set "
                         f"config.text.tokenizer='hashed' or 'bytes' for free-text captions")
    words = ("a", "moves", "and") + synthetic.COLOURS + synthetic.SHAPES + synthetic.DIRECTIONS
    return text_lib.WordTokenizer(words, config.text.max_length)


def build_model(config, latent_channels: int) -> dit_lib.PixelDanceModel:
    tok = build_tokenizer(config)
    dtype = jnp.dtype(config.dit.dtype)
    text = text_lib.TextEncoder(vocab_size=tok.vocab_size, max_length=config.text.max_length,
                                width=config.text.width, num_layers=config.text.num_layers,
                                num_heads=config.text.num_heads, dtype=dtype)
    kwargs = dit_lib.decode_variant(config.dit.variant)
    kwargs.setdefault("patch_size", tuple(config.dit.patch_size))
    dit = dit_lib.VideoDiT(latent_channels=latent_channels, remat=config.dit.remat, dtype=dtype,
                           attention=config.dit.attention,
                           context_parallel=config.dit.get("context_parallel", "ulysses"), **kwargs)
    return dit_lib.PixelDanceModel(text, dit)


def null_tokens(batch: int, length: int):
    """The empty prompt: BOS then padding (the unconditional input for guidance)."""
    return jnp.zeros((batch, length), jnp.int32).at[:, 0].set(text_lib.BOS)


def load_latent_stats(workdir: str) -> tuple[np.ndarray, np.ndarray]:
    path = os.path.join(workdir, LATENT_STATS)
    if not os.path.exists(path):
        raise FileNotFoundError(f"latent statistics not found: {path} (run the 'cache' stage first)")
    with open(path) as f:
        stats = json.load(f)
    return np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)


def dit_loss(params, batch, rng, *, model, cond, diffusion, latent_mean, latent_std):
    """PixelDance training loss on a batch of cached latents.

    batch: z [B, T, h, w, C], z_last [B, K, h, w, C], tokens int32 [B, S].
    Per example: a first-frame instruction with probability p_first; given one, a last-frame
    instruction (picked among the last K frames) with probability p_last; noise on c_image;
    text dropped with probability p_drop_text. One-frame batches (images, see
    `ImageVideoBatches`) get no image instructions. The objective (`diffusion.objective`: flow, eps
    or v) sets the noise path, the training times (flow: `time_sampling`; eps / v: uniform over
    DDPM's 1000 steps) and the regression target.
    """
    objective = diffusion.objective
    path = objectives.path(objective)  # also rejects unknown objectives
    z = (batch["z"] - latent_mean) / latent_std
    z_last_all = (batch["z_last"] - latent_mean) / latent_std
    B, T = z.shape[:2]
    keys = jax.random.split(rng, 7)
    has_first = jax.random.uniform(keys[0], (B,)) < cond.p_first
    if T == 1:  # an image batch (joint image-video training): text-to-image, no instructions
        has_first = jnp.zeros_like(has_first)
    has_last = has_first & (jax.random.uniform(keys[1], (B,)) < cond.p_last)
    pick = jax.random.randint(keys[2], (B,), 0, min(cond.last_from, z_last_all.shape[1]))
    z_last = jnp.take_along_axis(z_last_all, pick[:, None, None, None, None], axis=1)[:, 0]
    c_image, c_mask = conditioning.make_instructions(z[:, 0], z_last, has_first, has_last, T)
    c_image = conditioning.noise_instructions(keys[3], c_image, c_mask, cond.noise)

    drop = jax.random.uniform(keys[4], (B,)) < cond.p_drop_text
    tokens = jnp.where(drop[:, None], null_tokens(B, batch["tokens"].shape[1]), batch["tokens"])

    if path == "flow":
        t = schedules.sample_time(keys[5], B, kind=diffusion.time_sampling, mean=diffusion.logit_mean,
                                  std=diffusion.logit_std)
    else:
        t = schedules.sample_ddpm_time(keys[5], B)
    noise = rng_lib.normal(keys[6], z.shape)
    x_t = objectives.add_noise(z, noise, t, objective=objective)
    replace = cond.first_frame == "replace"
    if replace:
        x_t = conditioning.replace_first(x_t, z[:, 0], has_first)
    out = model.apply(params, x_t, t, c_image, c_mask, tokens)
    loss_mask = conditioning.first_frame_loss_mask(has_first, T, replace)
    loss, _ = objectives.loss(out, z, noise, t, loss_mask, objective=objective,
                              prediction=diffusion.prediction, min_t=diffusion.min_t_for_x0)
    x0_hat, _ = objectives.denoise(out, x_t, t, objective=objective, prediction=diffusion.prediction,
                                   min_t=diffusion.min_t_for_x0)
    x0_err = jnp.mean(jnp.square(x0_hat - z) * loss_mask) / jnp.mean(loss_mask)
    return loss, dict(x0_mse=x0_err)


def image_source_name(config) -> str:
    """config.train.image_source: the source (a name in config.data.sources, or a dataset kind)
    whose images the cache stage encodes into the image cache for the DiT's image batches; ""
    (default): image batches are the first latent frames of the cached clips. Naming one needs
    image batches (config.train.image_every >= 1)."""
    name = config.train.get("image_source", "")
    if name and not config.train.get("image_every", 0):
        raise ValueError(f"config.train.image_source={name!r} needs config.train.image_every >= 1 "
                         f"(every k-th DiT batch is images); set one, or image_source=''")
    return name


class ImageVideoBatches:
    """Joint image-video training: every `image_every`-th batch is a batch of images.

    Batch i (1-based) is an image batch when i % image_every == 0; `dit_loss` trains one-frame
    batches text-to-image (no image instructions). Images are one-frame videos in the same latent
    space (the causal VAE encodes a frame alone exactly as the first frame of a video). An image
    batch is
      with `images` (batches of the image cache of config.train.image_source: z float32
        [B, 1, h, w, C], z_last = z, tokens int32 [B, S]): its next batch; image steps then
        consume no video batches;
      without: the next video batch cut to its first latent frame, z [B, 1, h, w, C], with its
        captions.
    The resumable state is the position of each iterator and the count of batches drawn.
    """

    def __init__(self, batches, image_every: int, images=None):
        if image_every < 1:
            raise ValueError(f"config.train.image_every must be >= 1 (0: off), got {image_every}")
        self._batches, self._images, self._every, self._drawn = batches, images, image_every, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        i = self._drawn + 1
        if i % self._every:
            batch = next(self._batches)
        elif self._images is not None:
            batch = next(self._images)
        else:
            video = next(self._batches)
            batch = dict(video, z=video["z"][:, :1], z_last=video["z"][:, :1])
        self._drawn = i  # counted once a batch came: a failed read is retried as the same batch
        return batch

    def get_state(self) -> dict:
        state = dict(inner=self._batches.get_state(), drawn=self._drawn)
        if self._images is not None:
            state["images"] = self._images.get_state()
        return state

    def set_state(self, state: dict):
        if not state:
            return
        self._batches.set_state(state["inner"])
        self._drawn = int(state["drawn"])
        if (self._images is not None) != ("images" in state):
            # config.train.image_source switched on or off between runs: the video stream goes on
            # where it was, the image stream cannot (a new one starts at its beginning).
            logging.warning("data state saved %s an image cache, resumed %s one: video batches resume "
                            "exactly, image batches do not", "with" if "images" in state else "without",
                            "with" if self._images is not None else "without")
        elif self._images is not None:
            self._images.set_state(state["images"])


def image_batches(config, workdir: str, video_source):
    """The DiT's image batches from the image cache (`latent_cache.image_cache_dir`), or None
    when config.train.image_source is "" (first frames of the cached clips instead). Same seed
    and batch size as the video batches. The image latents must have the videos' h, w, C."""
    name = image_source_name(config)
    if not name:
        return None
    source = pipeline.LatentCacheSource(latent_cache.image_cache_dir(config, workdir))
    T, *hwc = source.meta["fields"]["z"]["shape"]
    video_hwc = video_source.meta["fields"]["z"]["shape"][1:]
    if T != 1 or hwc != video_hwc:
        raise ValueError(f"image cache {source.path}: latents [{T}, {', '.join(map(str, hwc))}], expected "
                         f"[1, {', '.join(map(str, video_hwc))}] (the video cache's h, w, C): set "
                         f"config.data.sources.{name}.resolution to the videos' and rerun the 'cache' stage")
    k = config.train.image_every
    print(f"dit: batches {k}, {2 * k}, ... are images from the image cache {source.path} "
          f"({len(source)} images of config.train.image_source={name!r})")
    return pipeline.make_batches(source, batch_size=config.train.batch_size, seed=config.seed)


class ShapeLog:
    """Passes batches through and prints the first batch of each new latent shape (one compile of
    the train step each): `dit: batch 3 of this run is the first of shape z [8, 1, 4, 4, 16]`. The
    resumable state is the inner iterator's."""

    def __init__(self, batches):
        self._batches, self._seen, self._drawn = batches, set(), 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._batches)
        self._drawn += 1
        shape = tuple(batch["z"].shape)
        if shape not in self._seen:
            self._seen.add(shape)
            print(f"dit: batch {self._drawn} of this run is the first of shape z {list(shape)}", flush=True)
        return batch

    def get_state(self) -> dict:
        return self._batches.get_state()

    def set_state(self, state: dict):
        self._batches.set_state(state)


def bucketed_batches(config, workdir: str, shapes):
    """(batches, a non-empty cache) for bucketed training: `buckets.CachedBucketBatches` over the
    per-bucket caches of the cache stage (`latent_cache.open_bucket_caches`), this host's rows of
    config.train.batch_size, in the seed's order; resumable (the position). Batch g: z float32
    [B/P, T, h, w, C], z_last [B/P, K, h, w, C], tokens int32 [B/P, S] of one bucket."""
    path = latent_cache.cache_dir(config, workdir)
    caches = latent_cache.open_bucket_caches(path, shapes)
    channels = {c.meta["fields"]["z"]["shape"][-1] for c in caches if len(c)}
    if len(channels) > 1:
        raise ValueError(f"bucketed latent cache {path}: buckets of {sorted(channels)} latent channels; "
                         f"run the 'cache' stage again")
    # The DiT cuts latents into patches: a bucket whose latent grid they do not tile would fail
    # at its first batch, mid-run; say so before training starts.
    patch = dit_lib.decode_variant(config.dit.variant).get("patch_size", tuple(config.dit.patch_size))
    for shape, cache in zip(shapes, caches):
        grid = cache.meta["fields"]["z"]["shape"][:3] if len(cache) else [1, 0, 0]
        if any(g % p for g, p in zip(grid, patch)):
            raise ValueError(f"bucket {buckets.shape_name(shape)} of config.data.buckets gives latents "
                             f"{grid[0]}x{grid[1]}x{grid[2]}, not divisible by the DiT's patch {tuple(patch)} "
                             f"(config.dit.patch_size): use heights and widths that are multiples of "
                             f"{8 * max(patch[1:])}")
    fields = f"config.data.buckets, config.cache.num_videos and config.train.batch_size={config.train.batch_size}"
    batches = buckets.make_cached_bucket_batches(caches, shapes, batch_size=config.train.batch_size,
                                                 seed=config.seed, fields=fields)
    counts = ", ".join(f"{buckets.shape_name(s)}: {len(c)}" for s, c in zip(shapes, caches))
    print(f"dit: bucketed batches from {path} (items per bucket {counts})")
    return ShapeLog(batches), next(c for c in caches if len(c))


def train_dit(config, workdir: str):
    c = config.train
    if config.cond.first_frame not in ("replace", "concat"):
        raise ValueError(f"config.cond.first_frame must be 'replace' or 'concat', got {config.cond.first_frame!r}")
    # Mesh and data: the latent cache written by the 'cache' stage.
    mesh, preset = train_lib.mesh_from_config(config.mesh)
    shapes = buckets.dit_buckets(config)
    if shapes:  # config.data.buckets: one cache per bucket, each batch one bucket's latent shape
        batches, source = bucketed_batches(config, workdir, shapes)
    else:
        source = pipeline.LatentCacheSource(latent_cache.cache_dir(config, workdir))
        batches = pipeline.make_batches(source, batch_size=c.batch_size, seed=config.seed)
        if c.get("image_every", 0):
            batches = ImageVideoBatches(batches, c.image_every, image_batches(config, workdir, source))
        else:
            image_source_name(config)  # an image source without image batches is a config error
    latent_mean, latent_std = load_latent_stats(workdir)
    example = source[0]
    # The model is initialised once at this shape: its parameters do not depend on T, h, w (patches
    # and 3D RoPE are computed from the input), so jit compiles the step once per bucket shape.
    T, h, w, C = example["z"].shape

    # Model, optimizer, sharded init or restore.
    model = build_model(config, C)
    S = config.text.max_length
    dummy = (jnp.zeros((1, T, h, w, C)), jnp.zeros((1,)), jnp.zeros((1, T, h, w, C)),
             jnp.zeros((1, T, h, w, 1)), jnp.zeros((1, S), jnp.int32))
    init_fn = lambda rng: model.init(rng, *dummy)
    tx = train_lib.stage_optimizer(c)
    rng = jax.random.key(config.seed + 1)
    loss_fn = functools.partial(dit_loss, model=model, cond=config.cond, diffusion=config.diffusion,
                                latent_mean=jnp.asarray(latent_mean), latent_std=jnp.asarray(latent_std))
    return train_lib.fit(stage="dit", workdir=workdir, mesh=mesh, preset=preset, init_fn=init_fn,
                         loss_fn=loss_fn, tx=tx, batches=batches, stage_config=c, rng=rng)
