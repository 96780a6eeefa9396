"""Bucketed batches: every batch one shape, items grouped by their native duration and aspect.

    config.data.buckets = "17x64x64,17x48x80,17x80x48,1x64x64,1x48x80"   FRAMESxHEIGHTxWIDTH,...

Assignment. Each item of the source gets the bucket nearest its native shape, read from the
files' headers once when the index is built (video folders: frame count, rate and size from
the container, kept in a metadata file, see `folder.FolderSource`; image folders: the
image size; a mixture: from each component; any other source: the shape of its items):
among the buckets whose frame count the item can fill (at the source's fps / stride), those
with the most frames; among those, the nearest aspect ratio (|log(W/H) - log(w/h)|); ties go to
the bucket listed first. Images (one frame) land in one-frame buckets. Items that fit no bucket
(e.g. too short for all, or unreadable) are left out and counted in the log. The item is then
read at its bucket's shape: the clip has the bucket's frames, and is resized to cover H x W and
cropped (the source's crop setting).

Batches. Epoch e of the stream: each bucket's items in an order drawn from (seed, e, bucket),
cut into global batches of `batch_size` (a bucket's last partial batch is dropped), and all
the epoch's batches in an order drawn from (seed, e). So global batch g is a pure function of
(seed, g), the iterator position (batches drawn) is the whole data state, and host p of P reads
rows [p B / P, (p + 1) B / P) of each global batch (the slicing contract of
`pipeline.make_batches`): the global stream does not depend on the number of hosts. `transform`
gets a generator seeded by (seed, g, row), also independent of the hosts. Batch frequencies
follow the items' (a mixture's weights carry over).

One schedule, two readers. `BucketSchedule` is that order over any per-bucket id lists;
`BucketedBatches` reads raw items with it (the VAE), `CachedBucketBatches` reads the per-bucket
latent caches of the cache stage (the DiT, `dit_buckets(config)`; record i of bucket b's cache
is b's i-th item), so the DiT's batch g holds the items the raw stream's batch g would.
"""
from __future__ import annotations

from typing import Callable

import grain
import jax
import numpy as np
from absl import logging

from pixeldance.data import pipeline
from pixeldance.data.transforms import resize_crop

_TAG = 0x62756B74  # separates the bucket draws from other draws of the same seed
EPOCHS = 1_000_000  # the stream's length, in epochs (endless in practice)


def parse_buckets(spec, frame_step: int = 4, pixel_step: int = 8) -> tuple[tuple[int, int, int], ...]:
    """'17x64x64,1x64x64' (or a sequence of (frames, height, width)) -> ((17, 64, 64), (1, 64, 64)).

    Frames must be 1 + frame_step k (the causal VAE's 4x time compression) and heights and widths
    multiples of pixel_step (its 8x spatial compression); one-line ValueError otherwise.
    """
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        shapes = []
        for p in parts:
            try:
                shape = tuple(int(x) for x in p.lower().split("x"))
            except ValueError:
                shape = ()
            if len(shape) != 3:
                raise ValueError(f"bad bucket {p!r} in config.data.buckets={spec!r}: expected FRAMESxHEIGHTxWIDTH")
            shapes.append(shape)
    else:
        shapes = [tuple(int(x) for x in s) for s in spec]
        if any(len(s) != 3 for s in shapes):
            raise ValueError(f"buckets must be (frames, height, width) triples, got {spec!r}")
    if not shapes:
        raise ValueError(f"no buckets in {spec!r}")
    for f, h, w in shapes:
        if f < 1 or (f - 1) % frame_step or h < pixel_step or w < pixel_step or h % pixel_step or w % pixel_step:
            raise ValueError(f"bad bucket {f}x{h}x{w}: frames must be 1 + {frame_step}k and height/width "
                             f"positive multiples of {pixel_step}")
    if len(set(shapes)) != len(shapes):
        raise ValueError(f"a bucket is listed twice in {spec!r}")
    return tuple(shapes)


def dit_buckets(config) -> tuple[tuple[int, int, int], ...] | None:
    """The buckets of the latent cache and the DiT's batches: config.data.buckets parsed, when it is
    set and config.cache.bucketed (default True); None: the one-shape cache and batches. A bad spec
    is a one-line ValueError naming config.data.buckets. Bucketed batches hold the images already
    (one-frame buckets), so joint training by config.train.image_every / image_source is refused."""
    spec = config.data.get("buckets", "")
    if not spec or not config.cache.get("bucketed", True):
        return None
    try:
        shapes = parse_buckets(spec)
    except ValueError as e:
        raise ValueError(f"config.data.buckets={spec!r}: {e}" if "config.data.buckets" not in str(e) else str(e)) \
            from None
    every, name = config.train.get("image_every", 0), config.train.get("image_source", "")
    if every or name:
        raise ValueError(f"config.train.image_every={every} / image_source={name!r} with bucketed DiT batches "
                         f"(config.data.buckets={spec!r}): images come from the one-frame buckets; set "
                         f"image_every=0 and image_source='', or config.cache.bucketed=False")
    return shapes


def assign(frames, height, width, buckets) -> np.ndarray:
    """The bucket of each item (int [N], -1: none) from its native shape: frames (the most it can
    give), height, width (int [N] each; 0 for unreadable items). See the module docstring."""
    frames, height, width = (np.asarray(x, np.int64).reshape(-1) for x in (frames, height, width))
    b = np.asarray(buckets, np.int64).reshape(-1, 3)
    ok = (height > 0) & (width > 0)
    fits = (b[None, :, 0] <= frames[:, None]) & ok[:, None]                       # [N, K]
    most = np.where(fits, b[None, :, 0], -1).max(axis=1)                          # [N]
    aspect = np.log(np.maximum(width, 1) / np.maximum(height, 1))
    dist = np.abs(np.log(b[:, 2] / b[:, 1])[None, :] - aspect[:, None])          # [N, K]
    dist = np.where(fits & (b[None, :, 0] == most[:, None]), dist, np.inf)
    out = np.argmin(dist, axis=1)
    return np.where(most > 0, out, -1)


def item_shape(source) -> tuple[int, int, int]:
    """(frames, height, width) of a source's items: its `item_shape`, else read from item 0."""
    shape = getattr(source, "item_shape", None)
    if shape is not None:
        return tuple(int(s) for s in shape)
    return tuple(int(s) for s in np.shape(source[0]["video"])[:3])


def native_info(source, indices) -> dict:
    """dict(frames, height, width) int64 [N]: the native shape of items `indices`, from the
    source's `bucket_info` or, for sources without one, the shape of its items."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    if hasattr(source, "bucket_info"):
        try:
            return source.bucket_info(indices)
        except NotImplementedError as e:
            logging.info("buckets: %s; using its item shape", e)
    f, h, w = item_shape(source)
    full = lambda v: np.full(len(indices), v, np.int64)
    return dict(frames=full(f), height=full(h), width=full(w))


def read_item(source, index: int, shape=None) -> dict:
    """Item `index` of `source` at shape (F, H, W): the source's `read` where it has one; else its
    item cut to the first F frames, resized to cover H x W and centre-cropped."""
    if shape is None:
        return source[index]
    if hasattr(source, "read"):
        return source.read(index, shape)
    item = dict(source[index])
    video = item["video"]
    F, H, W = shape
    if video.shape[0] < F:
        raise ValueError(f"item {index} of {source!r} has {video.shape[0]} frames, fewer than its bucket's {F}")
    video = video[:F]
    if video.shape[1:3] != (H, W):
        video = resize_crop(list(video), H, W, "center")
    item["video"] = video
    return item


def host_rows(batch_size: int, process_index: int, process_count: int) -> range:
    """The rows [p B / P, (p + 1) B / P) of a global batch of B that host p of P reads (the
    slicing contract of `pipeline.make_batches`)."""
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"global batch size {batch_size} is not divisible by {process_count} hosts")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    rows = batch_size // process_count
    return range(process_index * rows, (process_index + 1) * rows)


class BucketSchedule:
    """The order of a bucketed stream, shared by raw-item sources (`BucketedBatches`) and per-bucket
    latent caches (`CachedBucketBatches`).

    members: per bucket, the ids of its items (int arrays; a bucket may be empty). Epoch e: each
    bucket's ids in an order drawn from (seed, e, bucket), cut into batches of `batch_size` (the
    last partial batch dropped), and the epoch's batches in an order drawn from (seed, e). So
    `global_batch(g)` is a pure function of (seed, g, members). `fields`: the config fields to
    name when no bucket fills a batch (one-line ValueError).
    """

    def __init__(self, members, *, batch_size: int, seed: int, names=None,
                 fields: str = "config.data.buckets"):
        self.members = [np.asarray(m, np.int64).reshape(-1) for m in members]
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.per_epoch = np.array([len(m) // batch_size for m in self.members], np.int64)
        self.batches_per_epoch = int(self.per_epoch.sum())
        names = names or [str(b) for b in range(len(self.members))]
        self.counts = ", ".join(f"{n}: {len(m)}" for n, m in zip(names, self.members))
        if self.batches_per_epoch == 0:
            raise ValueError(f"no bucket holds a full batch of {batch_size} items (items per bucket: "
                             f"{self.counts}): check {fields}")
        self._plan = (None, None, None)

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(bucket of each of the epoch's batches [nb], their ids [nb, B]) of epoch e."""
        if self._plan[0] != e:
            labels, rows = [], []
            for b, members in enumerate(self.members):
                n = int(self.per_epoch[b])
                if n == 0:
                    continue
                order = np.random.default_rng([self.seed, _TAG, e, b]).permutation(members)
                rows.append(order[: n * self.batch_size].reshape(n, self.batch_size))
                labels.append(np.full(n, b))
            perm = np.random.default_rng([self.seed, _TAG, e]).permutation(self.batches_per_epoch)
            self._plan = (e, np.concatenate(labels)[perm], np.concatenate(rows)[perm])
        return self._plan[1], self._plan[2]

    def global_batch(self, g: int) -> tuple[int, np.ndarray]:
        """(bucket, ids [B]) of global batch g."""
        e, t = divmod(int(g), self.batches_per_epoch)
        labels, rows = self._epoch(e)
        return int(labels[t]), rows[t]


class BucketedBatches:
    """Random access over this host's batches of a bucketed stream (a grain source of batches).

    source: a random-access source (items dict(video, caption, ...)); buckets: (F, H, W)
    triples (`parse_buckets`). Element g: this host's rows of global batch g, a dict of arrays
    (video uint8 [B/P, F, H, W, 3] of the batch's bucket, caption str [B/P], ...), after
    `transform(item, rng) -> item` per item. See the module docstring for the order.
    """

    def __init__(self, source, buckets, *, batch_size: int, seed: int,
                 transform: Callable[[dict, np.random.Generator], dict] | None = None,
                 process_index: int = 0, process_count: int = 1):
        self._rows = host_rows(batch_size, process_index, process_count)
        self.source, self.buckets = source, parse_buckets(buckets)
        self.batch_size, self.seed, self.transform = batch_size, int(seed), transform
        info = native_info(source, np.arange(len(source)))
        self.assignment = assign(info["frames"], info["height"], info["width"], self.buckets)
        left_out = int((self.assignment < 0).sum())
        members = [np.flatnonzero(self.assignment == b) for b in range(len(self.buckets))]
        self.schedule = BucketSchedule(members, batch_size=batch_size, seed=seed,
                                       names=[shape_name(s) for s in self.buckets],
                                       fields=f"config.data.buckets ({left_out} items fit no bucket)")
        self.per_epoch, self.batches_per_epoch = self.schedule.per_epoch, self.schedule.batches_per_epoch
        logging.info("buckets: items per bucket %s; %d fit no bucket; %d batches per epoch",
                     self.schedule.counts, left_out, self.batches_per_epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch * EPOCHS

    def __repr__(self) -> str:
        return (f"BucketedBatches(source={self.source!r}, buckets={self.buckets}, "
                f"batch_size={self.batch_size}, seed={self.seed})")

    def global_batch(self, g: int) -> tuple[int, np.ndarray]:
        """(bucket, source indices [B]) of global batch g."""
        return self.schedule.global_batch(g)

    def __getitem__(self, g: int) -> dict:
        g = int(g)
        bucket, items = self.global_batch(g)
        shape = self.buckets[bucket]
        out = []
        for row in self._rows:
            item = read_item(self.source, int(items[row]), shape)
            if self.transform is not None:
                item = self.transform(item, np.random.default_rng([self.seed, _TAG, g, row]))
            out.append(item)
        return {key: np.stack([it[key] for it in out]) for key in out[0]}


class CachedBucketBatches:
    """Random access over this host's DiT batches from per-bucket latent caches (a grain source of
    batches), in the order of `BucketSchedule` (the same as `BucketedBatches` over the items the
    caches hold, in the caches' order).

    caches: one random-access source per bucket (`latent_cache.LatentCacheSource`; record i of
    cache b is the bucket's i-th item), shapes: their buckets (F, H, W), for logs and errors.
    Element g: this host's rows of global batch g, all from one cache: z float32
    [B/P, T, h, w, C], z_last float32 [B/P, K, h, w, C], tokens int32 [B/P, S], with the
    bucket's T, h, w (and K = 1 for one-frame buckets).
    """

    def __init__(self, caches, shapes, *, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, fields: str = "config.data.buckets"):
        if len(caches) != len(shapes):
            raise ValueError(f"{len(caches)} caches for {len(shapes)} buckets")
        self._rows = host_rows(batch_size, process_index, process_count)
        self.caches, self.shapes = list(caches), [tuple(s) for s in shapes]
        self.batch_size, self.seed = batch_size, int(seed)
        self.schedule = BucketSchedule([np.arange(len(c)) for c in self.caches], batch_size=batch_size,
                                       seed=seed, names=[shape_name(s) for s in self.shapes], fields=fields)
        self.batches_per_epoch = self.schedule.batches_per_epoch

    def __len__(self) -> int:
        return self.batches_per_epoch * EPOCHS

    def __repr__(self) -> str:  # grain compares reprs on restore: the caches' reprs hold no path
        return f"CachedBucketBatches(caches={self.caches!r}, batch_size={self.batch_size}, seed={self.seed})"

    def __getitem__(self, g: int) -> dict:
        bucket, ids = self.schedule.global_batch(int(g))
        cache = self.caches[bucket]
        out = [cache[int(ids[row])] for row in self._rows]
        return {key: np.stack([it[key] for it in out]) for key in out[0]}


def shape_name(shape) -> str:
    """(17, 48, 80) -> '17x48x80' (as in config.data.buckets)."""
    return "x".join(str(int(s)) for s in shape)


def make_bucketed_batches(source, buckets, *, batch_size: int, seed: int,
                          transform: Callable[[dict, np.random.Generator], dict] | None = None,
                          num_workers: int = 0, process_index: int | None = None,
                          process_count: int | None = None):
    """Batches of this host's share of `batch_size` (the global batch), each of one bucket's
    shape, endlessly: a resumable `pipeline.BatchIterator` (get_state / set_state: the position).
    buckets: a spec string or triples (`parse_buckets`). process_index / process_count: this
    host and the number of hosts (default: JAX's). num_workers: grain worker processes."""
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    batches = BucketedBatches(source, buckets, batch_size=batch_size, seed=seed, transform=transform,
                              process_index=p, process_count=n)
    return pipeline.BatchIterator(grain.MapDataset.source(batches), num_workers=num_workers)


def make_cached_bucket_batches(caches, shapes, *, batch_size: int, seed: int, num_workers: int = 0,
                               process_index: int | None = None, process_count: int | None = None,
                               fields: str = "config.data.buckets"):
    """`CachedBucketBatches` endlessly, as a resumable `pipeline.BatchIterator` (get_state /
    set_state: the position, saved with the DiT's checkpoint). Arguments as there and in
    `make_bucketed_batches`."""
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    batches = CachedBucketBatches(caches, shapes, batch_size=batch_size, seed=seed, process_index=p,
                                  process_count=n, fields=fields)
    return pipeline.BatchIterator(grain.MapDataset.source(batches), num_workers=num_workers)
