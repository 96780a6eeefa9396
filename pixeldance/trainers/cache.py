r"""The cache stage: encodes training videos once with the frozen VAE into a latent cache the
DiT trains from.

    python -m pixeldance.main --config=experiments/shapes.py --workdir=DIR --config.mode=cache \
        [--config.cache.path=DIR/cache]

(the main job's `cache` stage). Writes ArrayRecord shards
`<output>/latents-XXXXX-of-YYYYY.array_record` (`config.cache.num_shards`, or 0 for
ceil(num_videos / config.cache.records_per_shard)) and `<output>/meta.json`; `output` is
`config.cache.path` or `<workdir>/cache`. Record i is training item i of
`config.data` (`sources.make_source(config, 'train')`): z float32 [T, h, w, C] (the video's
latents), z_last float32 [J, h, w, C] (the last J = config.cond.last_from frames, each encoded
as an image, latest first), with keyframes anywhere (`keyframe_frames`) z_frames float32
[T, h, w, C] (pixel frames 0, 4, ..., 4(T - 1), each encoded as an image: middle keyframes'
latents, as sampling encodes a keyframe image), with the keyframe set 'continue'
(`shift_windows`) z_shift float32 [T, h, w, C] (latents 1..T of the same item read tf more
frames, tf the VAE's temporal factor: a window that starts at a 4-frame group latent, as a
continued clip's context does; with config.cond.continue_turns also shift_context int32 [1], the
context length its window was drawn for, where a turning window changes direction), the text
fields and the caption: tokens int32 [S] (config.text's
tokenizer, the encoder trained with the DiT), or with a frozen pretrained encoder
(config.text.encoder = clip / t5 / umt5) its last hidden states text_states bfloat16 [S, D] and
text_mask bool [S], computed here once, with the empty prompt's stored once beside the shards
for guidance. Format and layout in `pixeldance/data/latent_cache.py`. meta.json records the
shapes and dtypes, the count, the VAE step the latents came from, the tokenizer or encoder and
the source.

Images. When `config.train.image_source` names an image source (e.g. "images", an entry of
`config.data.sources` with name='image_folder'), the stage also writes the image cache the DiT's
image batches come from, in `config.cache.image_path` or `<workdir>/cache_images`, in the same
format and by the same resumable build: record i is image i (`config.cache.num_images` of them,
0: every image of the folder once), z float32 [1, h, w, C], z_last the same latent [1, h, w, C],
tokens and the caption from the folder's captions file. The images must have the videos' size
(the same latent h, w); a missing folder or captions file stops the stage before any encoding,
with one line naming the path.

Buckets. With `config.data.buckets` (and `config.cache.bucketed`, the default), items
0..num_videos-1 of the training source (a mixture with all its components) are assigned to
buckets as the VAE's batches are (`buckets.assign`) and each bucket's items are encoded at its
shape into a cache of its own, `<output>/bucket-FxHxW/` (one-frame buckets too: images, z_last =
z), plus `<output>/buckets.json` listing the buckets and their counts (`_cache_buckets`). Each
bucket's cache is kept, rebuilt or resumed on its own, as above; the image cache is not written
(config.train.image_every / image_source are refused: the images are in the one-frame buckets).

Videos are encoded `config.cache.batch_size` at a time (the last batch of a shard is padded, so
the VAE compiles once), read by `config.data.num_workers` grain worker processes when > 0.
Multi-host: each process encodes and writes its own shards (s % processes == process index).

Resuming. A complete cache of the requested size from the same VAE step (and the same
tokenizer, source, last-frame count and clip shape) is kept. An interrupted run keeps the
shards it finished (in `<output>.partial/`) and writes only the rest; the cache appears in
`<output>` by a rename once every shard is written.

Latent statistics. The DiT normalises latents with the per-channel mean and std in
`<workdir>/latent_stats.json` (`workdir.LatentStats`). The VAE stage writes them with its
checkpoint (source 'train_vae', computed on `config.vae.stats_videos` training clips, tagged with
the VAE step); this stage keeps them while that step is the newest VAE checkpoint
(`LatentStats.from_vae_stage`); a converted VAE's own statistics (`pixeldance.convert.wan_vae`:
diffusers' latents_mean / latents_std, which a pretrained DiT expects) are always kept; and
otherwise (no file, an older VAE, or statistics of another
origin) computes them over the cache it writes (source 'cache': mean and std over every latent
of z per channel, std at least 1e-3).

Axis letters (glossary: pixeldance/models/__init__.py): B batch, F frames, H/W pixel height/width,
T latent frames, h/w latent height/width, C channels, S text tokens, J candidate last frames.
"""
from __future__ import annotations

import json
import os
import time
import zlib

import grain
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from pixeldance import build, sharding, train_lib
from pixeldance import workdir as workdir_lib
from pixeldance.data import buckets, latent_cache, mixture, sources, synthetic
from pixeldance.sample import inference_mesh, load_vae
from pixeldance.trainers.dit import image_source_name


COLOUR_CHECK_CLIPS = 16  # a VAE keeping colour 0.5 passes 0.75 by chance 4 % of the time (8 clips: 14 %)


def check_vae_colours(config, workdir: str, vae) -> dict | None:
    """Refuses a VAE trained here whose reconstructions lose the synthetic world's colours, before
    any DiT trains on its latents: with config.data.name 'shapes', a VAE of this workdir's VAE
    stage (not converted weights) and config.vae.min_colour_acc > 0, COLOUR_CHECK_CLIPS held-out
    clips are encoded and decoded and `reconstruction.colour_report` must find their colours in
    at least that fraction (seeds 1 and 2 of the default VAE stage kept 0.45-0.52 and the DiTs
    trained on them got colours wrong in every mode; seed 0 keeps 1.00). A one-line ValueError
    says what to do. vae() -> the VAE. Returns the report, or None when no check applies."""
    minimum = config.vae.get("min_colour_acc", 0.0)
    if config.data.get("name") != "shapes" or not minimum > 0 or not workdir_lib.vae_step(workdir):
        return None
    from pixeldance.evaluators import reconstruction
    source = sources.make_source(config, "heldout", size=COLOUR_CHECK_CLIPS)
    items = [source[i] for i in range(COLOUR_CHECK_CLIPS)]
    videos = np.stack([it["video"] for it in items])
    report = reconstruction.colour_report(videos, reconstruction.reconstruct(vae(), videos)["recon"],
                                          [it["caption"] for it in items])
    if report["colour_acc"] < minimum:
        raise ValueError(
            f"the VAE in {os.path.join(workdir, 'vae')} (step {workdir_lib.vae_step(workdir)}) keeps the objects' colours "
            f"in {report['colour_acc']:.2f} of {COLOUR_CHECK_CLIPS} held-out clips, under config.vae.min_colour_acc="
            f"{minimum}: a DiT trained on its latents would get colours wrong; train the VAE stage again (another "
            f"--config.seed, or a new workdir) or pass --config.vae.min_colour_acc=0 to use it anyway")
    print(f"latent cache: the VAE keeps colours in {report['colour_acc']:.2f} of {COLOUR_CHECK_CLIPS} held-out clips "
          f"(config.vae.min_colour_acc {minimum})")
    return report


def cache_info(config, workdir: str, source) -> dict:
    """What a cache's records depend on besides the count; stored in meta.json and compared
    before a cache is kept."""
    t = config.text
    if t.get("encoder", "word") == "word":
        text = dict(tokenizer=dict(kind=t.get("tokenizer", "words"), max_length=t.max_length))
        if text["tokenizer"]["kind"] == "hashed":
            text["tokenizer"]["vocab_size"] = t.get("vocab_size", 4096)
    else:  # a frozen encoder: its kind, its weights' hash and the padded length
        text = dict(text_encoder=build.text_conditioner(config).identity())
    return dict(vae_step=workdir_lib.vae_step(workdir), vae_family=config.vae.get("family", "causal"),
                **text, data=config.data.name, source=repr(source),
                num_frames=config.data.num_frames, resolution=config.data.resolution,
                last_from=config.cond.last_from,
                **({"keyframe_frames": True} if keyframe_frames(config) else {}),
                **({"shift_windows": True} if shift_windows(config) else {}),
                **({"shift_turns": dict(rate=shift_turns(config), context_frames=config.cond.context_frames)}
                   if shift_turns(config) > 0 else {}))


def keyframe_frames(config) -> bool:
    """Whether records also store z_frames: when the DiT's keyframe sets draw middle keyframes from
    one-frame latents (`PixelDanceTask.needs_frame_latents`). Recorded in meta.json only then,
    so a cache of an experiment without keyframes is kept as it was."""
    return build.task(config).needs_frame_latents


def shift_windows(config) -> bool:
    """Whether records also store z_shift: when the DiT's keyframe sets include 'continue'
    (`PixelDanceTask.needs_shift_latents`). Recorded in meta.json only then."""
    return build.task(config).needs_shift_latents


def shift_turns(config) -> float:
    """config.cond.continue_turns: the fraction of z_shift windows that change direction where
    their context ends (`synthetic.TurnWindows`; 0: none, the window is the item read longer).
    Raises ValueError, naming the field, outside [0, 1] or without the 'continue' set."""
    rate = float(config.cond.get("continue_turns", 0.0))
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"config.cond.continue_turns must be in [0, 1], got {rate}")
    if rate > 0 and not shift_windows(config):
        raise ValueError(f"config.cond.continue_turns={rate} turns the 'continue' set's windows, but "
                         f"config.cond.keyframe_sets={config.cond.get('keyframe_sets', '')!r} does not draw 'continue'")
    return rate


def longer_source(config, size: int, extra_frames: int):
    """The training source of config.data read `extra_frames` more frames per item (z_shift's).
    The synthetic world draws the same objects, sizes, starts and paths' lengths for the same
    index (its draws do not depend on the clip length; the speed is the path over the frames),
    so the longer clip shows the item's caption over a longer, slightly slower move.

    With config.cond.continue_turns > 0 (the synthetic world only), `synthetic.TurnWindows`: that
    fraction of the windows moves another way up to the end of its context (n latents of
    `extra_frames` frames, n in 1..config.cond.context_frames, drawn per item and stored in the
    record as shift_context), then as its caption says."""
    rate = shift_turns(config)
    if rate > 0:
        if config.data.name != "shapes":
            raise ValueError(f"config.cond.continue_turns={rate} draws turning windows of the synthetic world: "
                             f"it needs config.data.name='shapes', not {config.data.name!r} (0: off)")
        return synthetic.TurnWindows(sources.make_source(config, "train", size=size), extra_frames,
                                     group=extra_frames, max_context=config.cond.context_frames, rate=rate)
    longer = ml_collections.ConfigDict(config.to_dict())
    longer.data.num_frames = config.data.num_frames + extra_frames
    return sources.make_source(longer, "train", size=size)


def _same(a, b) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def _video_and_caption(item: dict) -> dict:
    # context_latents: a turning window's (synthetic.TurnWindows), which its record keeps.
    return dict(video=item["video"], caption=item["caption"],
                **({"context_latents": item["context_latents"]} if "context_latents" in item else {}))


def _video_batches(source, start: int, end: int, batch_size: int, num_workers: int):
    """(videos uint8 [B, F, H, W, 3], captions: B str, context int64 [B] or None: the items'
    context_latents where they have it) for items start..end-1, in order; B = batch_size except
    maybe the last batch."""
    # A few batches read ahead by threads (grain's default would hold up to 500 batches of videos).
    ds = (grain.MapDataset.source(source)[start:end].map(_video_and_caption).batch(batch_size)
          .to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)))
    if num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    for batch in ds:
        yield batch["video"], [str(c) for c in batch["caption"]], batch.get("context_latents")


def batch_encoder(vae, text, source, batch_size: int, last_from: int, num_workers: int = 0,
                  frames: bool = False, shift_source=None):
    """encode_range(start, end) for `latent_cache.build`: for source items start..end-1, in
    batches of `batch_size`, lists of records dict(z float32 [T, h, w, C], z_last float32
    [J, h, w, C], the text fields, caption str); for one-frame items (images) z_last = z
    [1, h, w, C]. frames: records also hold z_frames float32 [T, h, w, C], pixel frames
    0, tf, ..., tf (T - 1) (tf = (F - 1) / (T - 1), the VAE's temporal factor) each encoded as an
    image (images: z_frames = z). shift_source: the same items read F + tf frames
    (`longer_source`); records then also hold z_shift float32 [T, h, w, C], latents 1..T of its
    videos, and where its items have context_latents (turning windows) shift_context int32 [1],
    the number of clean context latents the window was drawn for. vae.encode: uint8
    [B, F, H, W, 3] -> float32 [B, T, h, w, C]; text:
    `build.text_conditioner`, whose record(B captions) gives the text fields (tokens int32
    [B, S], or a frozen encoder's text_states [B, S, D] and text_mask [B, S])."""
    J = last_from

    def encode_range(start: int, end: int):
        longer = (_video_batches(shift_source, start, end, batch_size, num_workers)
                  if shift_source is not None else None)
        for videos, captions, _ in _video_batches(source, start, end, batch_size, num_workers):
            B = len(videos)
            if B < batch_size:  # pad with the last video: one compiled shape for every batch
                videos = np.concatenate([videos, np.repeat(videos[-1:], batch_size - B, axis=0)])
            z = vae.encode(videos)[:B]  # [B, T, h, w, C]
            if videos.shape[1] == 1:  # images: the frame is its own last frame, already encoded
                z_last = z
            else:  # the last J frames as images, as PixelDance's last-frame instruction
                lasts = videos[:, ::-1][:, :J]  # [batch_size, J, H, W, 3], latest first
                z_last = vae.encode(np.ascontiguousarray(lasts).reshape(-1, 1, *lasts.shape[2:]))[:, 0]
                z_last = z_last.reshape(batch_size, J, *z_last.shape[1:])[:B]
            extra = {}
            if frames:
                extra["z_frames"] = _frame_latents(vae, videos, z.shape[1])[:B]
            if longer is not None:
                long_videos, _, context = next(longer)
                extra["z_shift"] = _shift_latents(vae, long_videos, batch_size, z.shape[1])[:B]
                if context is not None:
                    extra["shift_context"] = np.asarray(context, np.int32).reshape(-1, 1)[:B]
            fields = text.record(captions)
            yield [dict(z=z[i], z_last=z_last[i], caption=captions[i], **{k: v[i] for k, v in extra.items()},
                        **{k: v[i] for k, v in fields.items()})
                   for i in range(B)]
    return encode_range


def _shift_latents(vae, videos, batch_size: int, T: int):
    """float32 [batch_size, T, h, w, C]: latents 1..T of videos uint8 [B, F + tf, H, W, 3] (padded
    to batch_size with the last, as the clips are, so the VAE compiles once more only)."""
    if len(videos) < batch_size:
        videos = np.concatenate([videos, np.repeat(videos[-1:], batch_size - len(videos), axis=0)])
    z = vae.encode(videos)
    if z.shape[1] != T + 1:
        raise ValueError(f"z_shift: {videos.shape[1]} frames encode to {z.shape[1]} latents, not T + 1 = {T + 1}")
    return z[:, 1:]


def _frame_latents(vae, videos, T: int):
    """float32 [B, T, h, w, C]: pixel frames 0, tf, ..., tf (T - 1) of videos uint8 [B, F, H, W, 3]
    (tf = (F - 1) / (T - 1)), each encoded as an image; one-frame videos: their latent."""
    F = videos.shape[1]
    if T == 1:
        return vae.encode(videos[:, :1])
    anchors = videos[:, ::(F - 1) // (T - 1)][:, :T]  # [B, T, H, W, 3]
    z = vae.encode(np.ascontiguousarray(anchors).reshape(-1, 1, *anchors.shape[2:]))[:, 0]
    return z.reshape(videos.shape[0], T, *z.shape[1:])


def _write_stats(workdir: str, moments, n: int):
    """latent_stats.json (source 'cache') from per-channel `latent_cache.Moments` of n items' latents."""
    workdir_lib.LatentStats.from_moments(moments.mean, moments.std, source="cache", num_videos=n).write(workdir)


def _keep_or_write_stats(workdir: str, moments_fn, n: int, kept: bool, what: str):
    """The cache stage's latent statistics: with a kept cache, written only if missing; with a new
    one, the VAE stage's are kept while they belong to the newest VAE checkpoint, a converted
    VAE's (`LatentStats.from_converter`) always, else written from the cache's moments (moments_fn() -> `latent_cache.Moments`)."""
    stats_path = os.path.join(workdir, workdir_lib.LATENT_STATS)
    if kept:
        if not os.path.exists(stats_path):
            _write_stats(workdir, moments_fn(), n)
            print(f"latent cache: wrote {stats_path} from the kept {what}")
    elif workdir_lib.LatentStats.from_vae_stage(workdir):
        print(f"latent cache: keeping the VAE stage's {workdir_lib.LATENT_STATS}")
    elif workdir_lib.LatentStats.from_converter(workdir):
        # A converted VAE's own normalisation: a pretrained DiT (e.g. Wan 2.1) expects exactly it.
        print(f"latent cache: keeping the converted VAE's {workdir_lib.LATENT_STATS}")
    else:
        _write_stats(workdir, moments_fn(), n)


def image_source(config, video_source):
    """(config for the images, their source) of config.train.image_source, or None when it is "".

    The source is config.data with config.data.sources[name] laid over it (as a mixture
    component), config.cache.num_images items (0: every image once). Its items must be images
    (one frame) of the videos' height and width: the DiT's image and video batches share one
    latent grid. Errors (a missing folder or captions file, another size) are one line naming
    the path or the config field."""
    name = image_source_name(config)
    if not name:
        return None
    cfg = mixture.component_config(config, name)
    try:
        source = sources.make_source(cfg, "train", size=config.cache.get("num_images", 0) or None)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"config.train.image_source={name!r}: {e}") from None
    F, H, W = buckets.item_shape(source)
    _, Hv, Wv = buckets.item_shape(video_source)
    if F != 1:
        raise ValueError(f"config.train.image_source={name!r} gives items of {F} frames, not images "
                         f"(config.data.sources.{name}.name should be 'image_folder')")
    if (H, W) != (Hv, Wv):
        raise ValueError(f"config.train.image_source={name!r}: images of {H}x{W} pixels but videos of "
                         f"{Hv}x{Wv}; the DiT batches need one size: set config.data.sources.{name}.resolution "
                         f"to the videos' (config.data.resolution={config.data.resolution})")
    return cfg, source


def cache_latents(config, workdir: str) -> str:
    """Writes (or keeps) the latent cache of `config` for the VAE in `workdir`; returns its folder
    (config.cache.path, default <workdir>/cache). J = config.cond.last_from last frames
    are encoded as images. When config.train.image_source
    names an image source, also writes (or keeps) the image cache (`image_cache_dir`: records
    z float32 [1, h, w, C], z_last = z, tokens, caption) in the same way."""
    sharding.initialize_distributed()  # a no-op unless launched as one of several processes
    pid = jax.process_index()
    path = latent_cache.cache_dir(config, workdir)
    n = config.cache.num_videos
    J = config.cond.last_from
    shapes = buckets.dit_buckets(config)  # also refuses image batches with buckets
    if shapes and shift_windows(config):
        raise ValueError("config.cond.keyframe_sets: 'continue' needs one clip shape (its windows are read "
                         "4 frames longer), not config.data.buckets")
    if shapes:
        return _cache_buckets(config, workdir, path, shapes, J)
    source = sources.make_source(config, "train", size=n)
    # Before any encoding, so a missing image folder stops the stage at once, not after the videos.
    images = image_source(config, source)
    # The DiT's, for videos and images alike; a frozen encoder's weights sharded over this
    # process's devices, as the VAE's are (umT5-XXL does not fit one 16 GiB chip).
    text = build.text_conditioner(config, mesh=inference_mesh())
    vaes = []

    def vae():  # loaded once, and only if a cache is (re)built or its colours are checked
        if not vaes:
            vaes.append(load_vae(workdir))
        return vaes[0]

    check_vae_colours(config, workdir, vae)
    info = cache_info(config, workdir, source)
    info["last_from"] = J
    t0 = time.time()
    meta, kept = _write_cache(config, path, source, n, info, vae, text, noun="videos", stage="cache")
    moments = lambda: latent_cache.Moments.from_json(meta["latent_moments"])
    if pid == 0:
        _keep_or_write_stats(workdir, moments, n, kept, "cache")
    if not kept:
        log_cache(workdir, info["vae_step"], n, moments(), time.time() - t0)
    if images is not None:
        # Images normalise with the videos' statistics (one VAE latent space): none written here.
        image_config, image_src = images
        info = dict(cache_info(image_config, workdir, image_src), num_frames=1, last_from=1)
        _write_cache(config, latent_cache.image_cache_dir(config, workdir), image_src, len(image_src), info,
                     vae, text, noun="images", stage="cache images")
    return path


class BucketItems:
    """Items `indices` (int [N]) of `source`, each read at one bucket's `shape` (F, H, W): a grain
    random-access source for `batch_encoder`; element j = `buckets.read_item(source, indices[j],
    shape)`, video uint8 [F, H, W, 3] and caption. The repr (stored in the cache's meta.json and
    compared before a cache is kept) names the source, the shape and a digest of the indices, so a
    changed assignment rebuilds the bucket's cache."""

    def __init__(self, source, indices, shape):
        self.source, self.indices = source, np.asarray(indices, np.int64)
        self.shape = tuple(int(s) for s in shape)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        return buckets.read_item(self.source, int(self.indices[int(j)]), self.shape)

    def __repr__(self) -> str:
        digest = zlib.crc32(self.indices.tobytes())
        return (f"BucketItems({self.source!r}, shape={buckets.shape_name(self.shape)}, "
                f"n={len(self)}, indices={digest:08x})")


def _cache_buckets(config, workdir: str, path: str, shapes, J: int) -> str:
    """The bucketed cache stage (config.data.buckets): items 0..num_videos-1 of the training
    source (a mixture keeps all its components: videos and images), each assigned to a bucket
    (`buckets.assign`; items that fit none are left out) and encoded at its bucket's shape into
    `<path>/bucket-FxHxW/` (`latent_cache.bucket_dir`, each a cache of its own, kept or resumed as
    the one-shape cache is), then `<path>/buckets.json` (the buckets and their counts) and the
    latent statistics over every bucket's latents (one latent space). One-frame buckets (images,
    and clips too short for every video bucket) are cached too: z [1, h, w, C], z_last = z. Returns
    `path`."""
    pid = jax.process_index()
    n = config.cache.num_videos
    source = sources.make_source(config, "train", size=n, mixed_shapes=True)
    info = buckets.native_info(source, np.arange(n))
    assignment = buckets.assign(info["frames"], info["height"], info["width"], shapes)
    counts = [int((assignment == b).sum()) for b in range(len(shapes))]
    left_out = int((assignment < 0).sum())
    print(f"latent cache: buckets {', '.join(f'{buckets.shape_name(s)}: {c}' for s, c in zip(shapes, counts))} "
          f"items; {left_out} of {n} fit no bucket (config.data.buckets={config.data.buckets!r})")
    batch = config.train.batch_size
    for shape, count in zip(shapes, counts):
        if 0 < count < batch:  # the DiT drops a bucket's partial batch: these items are never seen
            print(f"latent cache: bucket {buckets.shape_name(shape)} holds {count} items, fewer than "
                  f"config.train.batch_size={batch}: the DiT never draws them")
    if pid == 0:
        latent_cache.drop_single_cache(path)  # a one-shape cache here is replaced by the buckets
    text = build.text_conditioner(config, mesh=inference_mesh())
    vaes = []

    def vae():  # loaded once, and only if a bucket's cache is (re)built
        if not vaes:
            vaes.append(load_vae(workdir))
        return vaes[0]

    entries, moments, all_kept, t0 = [], latent_cache.Moments(), True, time.time()
    for b, shape in enumerate(shapes):
        out = latent_cache.bucket_dir(path, shape)
        entries.append(dict(shape=list(shape), dir=os.path.basename(out), count=counts[b]))
        if not counts[b]:
            continue
        items = BucketItems(source, np.flatnonzero(assignment == b), shape)
        F, H, W = shape
        J_b = 1 if F == 1 else min(J, F)  # an image is its own last frame
        b_info = dict(cache_info(config, workdir, items), num_frames=F, resolution=[H, W], last_from=J_b)
        meta, kept = _write_cache(config, out, items, len(items), b_info, vae, text, noun="items",
                                  stage=f"cache {buckets.shape_name(shape)}", summary=False)
        moments.merge(latent_cache.Moments.from_json(meta["latent_moments"]))
        all_kept &= kept
    sources.log_summary(source, "cache")
    if pid == 0:
        latent_cache.write_bucket_index(path, entries, num_items=n, left_out=left_out)
        _keep_or_write_stats(workdir, lambda: moments, sum(counts), all_kept, "caches")
    if not all_kept:
        log_cache(workdir, b_info["vae_step"], sum(counts), moments, time.time() - t0)
    return path


def log_cache(workdir: str, vae_step: int | None, records: int, moments: latent_cache.Moments,
              seconds: float):
    """The cache stage's line of metrics.jsonl and TensorBoard (`tensorboard/cache/`), at the VAE
    step its latents come from (0 for converted weights): records, the mean over channels of the
    latents' per-channel mean and std (what latent_stats.json normalises with), seconds, records
    per second. Written when a cache is built, not when one is kept."""
    train_lib.log_stage(workdir, "cache", vae_step or 0, dict(
        records=records, latent_mean=float(np.mean(moments.mean)), latent_std=float(np.mean(moments.std)),
        seconds=seconds, records_per_sec=records / max(seconds, 1e-9)))


def _write_cache(config, path: str, source, n: int, info: dict, vae, text, *, noun: str, stage: str,
                 summary: bool = True):
    """Writes (or keeps) the cache of items 0..n-1 of `source` in `path` with `latent_cache.build`;
    returns (meta, kept). Kept: a complete cache of n items with the same `info` (VAE step,
    tokenizer or text encoder, source, shapes). vae() -> the VAE; text: `build.text_conditioner`;
    J = info['last_from'] last frames per record; config.cache gives the batch size and shards."""
    pid, nproc = jax.process_index(), jax.process_count()
    meta = latent_cache.read_meta(path)
    same_plan = meta is not None and meta["count"] == n and _same({k: meta.get(k) for k in info}, info)
    outside = config.data.get("allow_outside_root", False)  # files meta.json names outside `path`
    bad = latent_cache.verify(path, meta, outside) if same_plan else []
    if same_plan and not bad:
        print(f"latent cache: keeping {path} ({n} {noun}, VAE step {info['vae_step']})")
        return meta, True
    if bad:
        # Damaged shards are named and rewritten; the ones that verify are kept (`salvage`).
        for name, reason in bad:
            print(f"latent cache: {os.path.join(path, name)}: {reason}")
        kept = latent_cache.salvage(path, meta, info, [name for name, _ in bad], outside) if pid == 0 else 0
        print(f"latent cache: rewriting {len(bad)} damaged file(s) of {path}"
              + (f", keeping its {kept} other shard(s)" if kept else " (the whole cache)"))
    elif meta is not None:
        print(f"latent cache: rebuilding {path} (made for {meta.get('count')} {noun}, "
              f"VAE step {meta.get('vae_step')}; now {n}, VAE step {info['vae_step']})")
    elif os.path.exists(os.path.join(path, "latents.npz")):
        print(f"latent cache: replacing the old single-file cache in {path}")

    num_shards = latent_cache.num_shards_for(n, config.cache.get("num_shards", 0),
                                             config.cache.get("records_per_shard", 1024))
    bs = config.cache.batch_size
    mine = [r for s, r in enumerate(latent_cache.shard_ranges(n, num_shards)) if s % nproc == pid]
    bar = tqdm(total=sum(-(-(end - start) // bs) for start, end in mine), desc=stage, unit="batch",
               disable=pid != 0)
    shift_source = None
    if info.get("shift_windows", False):
        tf = build.vae(config).temporal_factor
        shift_source = longer_source(config, n, tf)
    encode = batch_encoder(vae(), text, source, bs, info["last_from"], config.data.get("num_workers", 0),
                           frames=info.get("keyframe_frames", False), shift_source=shift_source)

    def encode_range(start, end):
        for records in encode(start, end):
            bar.update(1)
            yield records

    sync = multihost_utils.sync_global_devices if nproc > 1 else (lambda name: None)
    meta = latent_cache.build(path, count=n, num_shards=num_shards, encode_range=encode_range, info=info,
                              null_text=text.null_record() if text.frozen else None,
                              process_index=pid, process_count=nproc, sync=sync)
    bar.close()
    f = meta["fields"]
    print(f"latent cache: wrote {path}: {n} records in {num_shards} shards, "
          f"z {tuple(f['z']['shape'])}, z_last {tuple(f['z_last']['shape'])}"
          + "".join(f", {k} {tuple(f[k]['shape'])}" for k in latent_cache.OPTIONAL_FIELDS if k in f))
    if summary:
        sources.log_summary(source, stage)
    return meta, False
