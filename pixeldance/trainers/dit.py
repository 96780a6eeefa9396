"""DiT trainer: rectified flow on cached VAE latents with PixelDance image instructions.

Data: the latent cache (ArrayRecord shards) of the `cache` stage, in config.cache.path or
`<workdir>/cache` (`pixeldance.data.latent_cache`); with config.train.image_every = k, every k-th
batch is images: from the image cache (config.cache.image_path or `<workdir>/cache_images`)
when config.train.image_source names an image source, else the clips' first latent frames.
With config.data.buckets (and config.cache.bucketed): one cache per bucket and batches of one
bucket's shape each (`bucketed_batches`); images are then the one-frame buckets.

The loss is the PixelDance task's (`diffusion/task.py`) on latents normalised with the
workdir's `LatentStats`; `train_setup` is what the planner compiles too.

Axis letters (glossary: pixeldance/models/__init__.py): B batch, T latent frames, h/w latent
height/width, C channels, S text tokens, J candidate last frames.
"""
from __future__ import annotations

import jax
import numpy as np
from absl import logging

from pixeldance import build, train_lib
from pixeldance import workdir as workdir_lib
from pixeldance.data import buckets, latent_cache, pipeline
from pixeldance.diffusion.task import PixelDanceTask
from pixeldance.evaluators import common as eval_common
from pixeldance.evaluators import registry as eval_registry
from pixeldance.models import text as text_lib
from pixeldance.sample import Pipeline, load_vae, pretrained_dit


def make_loss(task: PixelDanceTask, model, stats: workdir_lib.LatentStats, null_text=None):
    """loss_fn(params, batch, rng) -> (loss, metrics) of the DiT on a batch of cached latents:
    z [B, T, h, w, C], z_last [B, J, h, w, C] normalised with `stats`, tokens int32 [B, S] or a
    frozen encoder's text_states [B, S, D] and text_mask [B, S] with its empty prompt `null_text`
    (dict(states [1, S, D], mask [1, S]), the cache's), and with keyframes anywhere z_frames
    [B, T, h, w, C] and with the 'continue' set z_shift [B, T, h, w, C] (normalised too), then
    `PixelDanceTask.loss`."""
    def loss_fn(params, batch, rng):
        batch = dict(batch, z=stats.normalise(batch["z"]), z_last=stats.normalise(batch["z_last"]))
        for name in ("z_frames", "z_shift"):
            if name in batch:
                batch[name] = stats.normalise(batch[name])
        return task.loss(model, params, batch, rng, null_text)
    return loss_fn


def check_cache_record(config, first: dict, path: str):
    """Raises latent_cache.CacheError (one line, naming the cache `path` and the field) where a
    cache record `first` lacks what config's DiT training reads: frozen text states or tokens as
    config.text.encoder says, z_frames for middle keyframes from one-frame latents, z_shift for
    the 'continue' set, shift_context for its turning windows (config.cond.continue_turns)."""
    frozen = config.text.get("encoder", "word") != "word"
    if frozen != ("text_states" in first):
        raise latent_cache.CacheError(
            f"latent cache {path} holds {'frozen text states' if 'text_states' in first else 'tokens'}, "
            f"but config.text.encoder={config.text.get('encoder', 'word')!r}: rerun the 'cache' stage")
    task = build.task(config)
    if task.needs_frame_latents and "z_frames" not in first:
        raise latent_cache.CacheError(
            f"latent cache {path} has no z_frames, which config.cond.keyframe_sets with "
            f"keyframe_latents='frames' needs: rerun the 'cache' stage (or set config.cond.keyframe_latents='clip')")
    if task.needs_shift_latents and "z_shift" not in first:
        raise latent_cache.CacheError(
            f"latent cache {path} has no z_shift, which config.cond.keyframe_sets with 'continue' "
            f"needs: rerun the 'cache' stage")
    turns = config.cond.get("continue_turns", 0.0)
    if task.needs_shift_latents and turns > 0 and "shift_context" not in first:
        raise latent_cache.CacheError(
            f"latent cache {path} has no shift_context, which config.cond.continue_turns "
            f"({turns}) needs (its windows turn where their context ends): rerun the 'cache' stage")


def train_setup(config, latent: tuple[int, int, int, int], stats: workdir_lib.LatentStats,
                text_example=None, null_text=None):
    """(model, init_fn, tx, loss_fn): what `train_dit` trains on latents (T, h, w, C), and what the
    planner (`tools/plan.py`) compiles. The parameters do not depend on T, h, w (patches and 3D
    RoPE are computed from the input), so one init serves every bucket shape. text_example: a
    text input of one example (default: config.text.max_length tokens); null_text: a frozen
    encoder's empty prompt (see `make_loss`)."""
    model = build.dit(config, latent[-1])
    init_fn = build.dit_init_fn(model, latent, config.text.max_length if text_example is None else text_example)
    tx = train_lib.stage_optimizer(config.train)
    return model, init_fn, tx, make_loss(build.task(config), model, stats, null_text)


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
            for name in ("z_frames", "z_shift"):  # the video batches' structure, one compiled step
                if name in video:
                    batch[name] = video["z"][:, :1]
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


def video_cache_source(config, workdir: str):
    """The one-shape latent cache of the 'cache' stage (`latent_cache.cache_dir`), its files
    refused outside the cache folder unless config.data.allow_outside_root, and checked against
    their checksums first unless config.cache.verify_on_read is False."""
    return latent_cache.LatentCacheSource(latent_cache.cache_dir(config, workdir),
                                          allow_outside_root=config.data.get("allow_outside_root", False),
                                          verify_checksums=config.cache.get("verify_on_read", True))


def image_batches(config, workdir: str, video_source):
    """The DiT's image batches from the image cache (`latent_cache.image_cache_dir`), or None
    when config.train.image_source is "" (first frames of the cached clips instead). Same seed
    and batch size as the video batches. The image latents must have the videos' h, w, C."""
    name = image_source_name(config)
    if not name:
        return None
    source = latent_cache.LatentCacheSource(latent_cache.image_cache_dir(config, workdir),
                                            allow_outside_root=config.data.get("allow_outside_root", False),
                                            verify_checksums=config.cache.get("verify_on_read", True))
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
    [B/P, T, h, w, C], z_last [B/P, J, h, w, C], tokens int32 [B/P, S] of one bucket."""
    path = latent_cache.cache_dir(config, workdir)
    caches = latent_cache.open_bucket_caches(path, shapes,
                                             allow_outside_root=config.data.get("allow_outside_root", False),
                                             verify_checksums=config.cache.get("verify_on_read", True))
    channels = {c.meta["fields"]["z"]["shape"][-1] for c in caches if len(c)}
    if len(channels) > 1:
        raise ValueError(f"bucketed latent cache {path}: buckets of {sorted(channels)} latent channels; "
                         f"run the 'cache' stage again")
    # The DiT cuts latents into patches: a bucket whose latent grid they do not tile would fail
    # at its first batch, mid-run; say so before training starts.
    patch = build.dit_patch(config)
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
    build.task(config)  # checks config.cond and config.diffusion before any data is read
    # Mesh and data: the latent cache written by the 'cache' stage.
    mesh, preset = train_lib.mesh_from_config(config.mesh)
    shapes = buckets.dit_buckets(config)
    if shapes:  # config.data.buckets: one cache per bucket, each batch one bucket's latent shape
        batches, source = bucketed_batches(config, workdir, shapes)
    else:
        source = video_cache_source(config, workdir)
        batches = pipeline.make_batches(source, batch_size=c.batch_size, seed=config.seed)
        if c.get("image_every", 0):
            batches = ImageVideoBatches(batches, c.image_every, image_batches(config, workdir, source))
        else:
            image_source_name(config)  # an image source without image batches is a config error
    stats = workdir_lib.LatentStats.read(workdir)

    # Model, optimizer, sharded init or restore, at the shape of the first cached example (jit
    # compiles the step once per bucket shape).
    first = source[0]
    check_cache_record(config, first, source.path)
    frozen = "text_states" in first
    null_text = text_lib.text_input(source.null_text()) if frozen else None
    example = jax.tree.map(lambda v: np.asarray(v)[None], text_lib.text_input(first))  # batch of 1
    model, init_fn, tx, loss_fn = train_setup(config, first["z"].shape, stats, example, null_text)
    rng = jax.random.key(config.seed + 1)
    evaluate = periodic_evaluation(config, workdir, model, stats, mesh)
    lora = build.dit_lora(config)
    if lora is None:  # every weight trains, from a random init or from config.dit.init_from's
        return train_lib.fit(stage="dit", workdir=workdir, mesh=mesh, preset=preset, init_fn=init_fn,
                             loss_fn=loss_fn, tx=tx, batches=batches, stage_config=c, rng=rng,
                             evaluate=evaluate, eval_every=config.evals.every,
                             initial_params=build.pretrained_dit_params(config))
    # LoRA: the converted weights stay frozen on the mesh, outside the train state; the state (and
    # every checkpoint) holds the adapters, their optimizer state and their EMA.
    base, base_sh = pretrained_dit(config, init_fn, mesh, preset, lora["base_dtype"])
    print(f"dit: LoRA rank {lora['rank']} (alpha {lora['alpha']:g}) on {lora['targets']}", flush=True)
    if evaluate is not None:
        inner = evaluate
        evaluate = lambda state, step: inner(state.replace(
            ema_params=build.merge_lora(base, state.ema_params, lora, base_sh)), step)
    return train_lib.fit(stage="dit", workdir=workdir, mesh=mesh, preset=preset,
                         init_fn=build.lora_init_fn(init_fn, lora), loss_fn=build.lora_loss(loss_fn, lora),
                         tx=tx, batches=batches, stage_config=c, rng=rng, evaluate=evaluate,
                         eval_every=config.evals.every, frozen=(base, base_sh))


def periodic_evaluation(config, workdir: str, model, stats: workdir_lib.LatentStats, mesh):
    """evaluate(state, step) for the training loop: the evaluators of config.evals.dit on a
    Pipeline of the EMA weights being trained (with the workdir's VAE), scalars logged as stage
    'dit_eval'; None when config.evals.every is 0 or no evaluator is named. (The final state is
    evaluated by the 'sample' stage, with files.)"""
    if not config.evals.every:
        return None
    evaluators = eval_registry.make(config.evals.dit, config, "pipeline")
    if not evaluators:
        return None
    text = build.text_conditioner(config, mesh=mesh)
    pipe = Pipeline(config, load_vae(workdir, mesh=mesh), model, None, text, stats, mesh)

    def evaluate(state, step: int):
        pipe.params, pipe.step = state.ema_params, step
        eval_common.run(evaluators, pipe, workdir=workdir, step=step)
    return evaluate
