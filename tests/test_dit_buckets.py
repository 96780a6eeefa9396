"""Bucket-aware DiT training: the cache stage's per-bucket latent caches (config.data.buckets),
the DiT's bucketed batches (one shape per batch, a pure function of (seed, batch), exact
resumption, host slices), errors, and a DiT whose parameters do not depend on the latent shape.

The cache stage runs with the stand-in VAE of test_latent_cache (no training, no compiles); the
fixture folders are test_buckets'. End to end: tests/test_video_image_mix.py."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixeldance import build, configs
from pixeldance.data import buckets, latent_cache, sources
from pixeldance.trainers import cache as tool
from pixeldance.trainers import dit as dit_trainer
from test_buckets import folders  # noqa: F401  (a fixture: a video folder and an image folder)
from test_latent_cache import FakeVAE, fake_workdir  # noqa: F401  (fake_workdir: a fixture)

MIX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                   "video_image_mix.py") + ":runlocal"
# The fixture's wide clip (48 x 64, 30 frames) goes to 9x24x40, the tall one (64 x 48) to 9x32x32,
# short.mp4 (6 frames) to 5x16x16, tiny.mp4 (3 frames) and the images to 1x32x32.
BUCKETS = "9x32x32,9x24x40,5x16x16,1x32x32"


def _config(folders, **overrides):
    vroot, iroot = folders
    return configs.override(configs.load_config(MIX), **{
        "data.sources.videos.root": vroot, "data.sources.images.root": iroot, "data.buckets": BUCKETS,
        "data.meta_cache": "memory", "cache.num_videos": 40, "cache.batch_size": 4, "cache.num_shards": 2,
        "train.batch_size": 4, **overrides})


def _one_line_error(error, match, fn, *args, **kwargs):
    with pytest.raises(error, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# The cache stage: one cache per bucket, each record at its bucket's latent shape.
# ---------------------------------------------------------------------------------------------

def test_cache_stage_writes_one_cache_per_bucket(fake_workdir, folders, capsys):
    workdir, vaes, _ = fake_workdir
    config = _config(folders)
    path = os.path.join(workdir, "cache")
    # A one-shape cache left from a run without buckets is replaced.
    latent_cache.write_arrays(path, np.zeros((2, 3, 4, 4, 16), np.float32), np.zeros((2, 3, 4, 4, 16), np.float32),
                              np.zeros((2, 24), np.int32), ["a", "b"])
    assert tool.cache_latents(config, workdir) == path
    assert latent_cache.read_meta(path) is None and not any(f.startswith("latents-") for f in os.listdir(path))

    # The assignment the VAE's buckets make over the same items.
    source = sources.make_source(config, "train", size=40, mixed_shapes=True)
    shapes = buckets.parse_buckets(BUCKETS)
    info = buckets.native_info(source, np.arange(40))
    assignment = buckets.assign(info["frames"], info["height"], info["width"], shapes)
    index = latent_cache.read_bucket_index(path)
    counts = [int((assignment == b).sum()) for b in range(4)]
    assert [b["count"] for b in index["buckets"]] == counts and all(counts)
    assert index["left_out"] == int((assignment < 0).sum()) > 0  # the corrupt and missing videos
    assert [tuple(b["shape"]) for b in index["buckets"]] == list(shapes)

    caches = latent_cache.open_bucket_caches(path, shapes)
    for b, ((F, H, W), cache) in enumerate(zip(shapes, caches)):
        T = 1 + (F - 1) // 4
        assert cache.meta["fields"]["z"]["shape"] == [T, H // 8, W // 8, 16]
        assert cache.meta["fields"]["z_last"]["shape"] == [1 if F == 1 else 3, H // 8, W // 8, 16]
        assert cache.meta["num_frames"] == F and cache.meta["resolution"] == [H, W]
        # Record j: the bucket's j-th item, read at the bucket's shape and encoded.
        members = np.flatnonzero(assignment == b)
        for j in (0, len(cache) - 1):
            item = buckets.read_item(source, int(members[j]), (F, H, W))
            np.testing.assert_array_equal(cache[j]["z"], FakeVAE().encode(item["video"][None])[0])
        if F == 1:
            np.testing.assert_array_equal(cache[0]["z_last"], cache[0]["z"])
    # One latent space: one latent_stats.json over every bucket's latents.
    with open(os.path.join(workdir, "latent_stats.json")) as f:
        stats = json.load(f)
    assert stats["num_videos"] == sum(counts) and len(stats["mean"]) == 16 and len(vaes) == 1

    # Rerun: every bucket kept, no VAE loaded. Other buckets: rebuilt, and the DiT refuses an index
    # written for other buckets.
    capsys.readouterr()
    tool.cache_latents(config, workdir)
    assert capsys.readouterr().out.count("latent cache: keeping") == 4 and len(vaes) == 1
    _one_line_error(latent_cache.CacheError, "written for buckets 9x32x32,9x24x40,5x16x16,1x32x32, but "
                    "config.data.buckets='9x32x32,1x32x32'", latent_cache.open_bucket_caches, path,
                    buckets.parse_buckets("9x32x32,1x32x32"))


def test_bucketed_stage_errors_name_the_fields(fake_workdir, folders):
    workdir, vaes, _ = fake_workdir
    _one_line_error(ValueError, r"config.data.buckets='9x32x32,8x16x16'.*1 \+ 4k", tool.cache_latents,
                    _config(folders, **{"data.buckets": "9x32x32,8x16x16"}), workdir)
    _one_line_error(ValueError, "config.train.image_every=2 / image_source='images' with bucketed DiT batches",
                    tool.cache_latents, _config(folders, **{"train.image_every": 2, "train.image_source": "images"}),
                    workdir)
    assert vaes == []  # stopped before any encoding
    # The DiT: no bucketed cache yet.
    _one_line_error(latent_cache.CacheError, "bucketed latent cache not found",
                    dit_trainer.bucketed_batches, _config(folders), workdir, buckets.parse_buckets(BUCKETS))
    # Buckets off for the cache and the DiT: the one-shape cache, as without buckets.
    assert buckets.dit_buckets(_config(folders, **{"cache.bucketed": False})) is None


# ---------------------------------------------------------------------------------------------
# The DiT's batches.
# ---------------------------------------------------------------------------------------------

SHAPES = ((9, 32, 32), (9, 32, 48), (5, 16, 16), (1, 32, 32))
COUNTS = (9, 5, 2, 7)  # with batch 4: 2, 1, 0 and 1 batches per epoch


def _caches(tmp_path, counts=COUNTS):
    """One cache per bucket; record i of bucket b has z = 100 b + i + 1 everywhere."""
    caches = []
    for b, ((F, H, W), n) in enumerate(zip(SHAPES, counts)):
        out = latent_cache.bucket_dir(str(tmp_path / "cache"), (F, H, W))
        z = np.broadcast_to((100 * b + np.arange(1, n + 1, dtype=np.float32))[:, None, None, None, None],
                            (n, 1 + (F - 1) // 4, H // 8, W // 8, 16))
        latent_cache.write_arrays(out, z, z[:, -1:], np.zeros((n, 12), np.int32), [f"{b}.{i}" for i in range(n)])
        caches.append(latent_cache.LatentCacheSource(out))
    return caches


def _batches(caches, seed=0, **kwargs):
    return buckets.make_cached_bucket_batches(caches, SHAPES, batch_size=4, seed=seed,
                                              **{"process_index": 0, "process_count": 1, **kwargs})


def _ids(batch):
    """(bucket, record) of each row."""
    return [divmod(int(v) - 1, 100) for v in batch["z"][:, 0, 0, 0, 0]]


def test_every_batch_one_bucket_deterministic_and_resumable(tmp_path):
    caches = _caches(tmp_path)
    got = [next(it) for it in [_batches(caches)] for _ in range(12)]  # 3 epochs of 4 batches
    for batch in got:
        (b, _), *_ = ids = _ids(batch)
        F, H, W = SHAPES[b]
        assert all(bb == b for bb, _ in ids)  # one bucket per batch, its latent shape
        assert batch["z"].shape == (4, 1 + (F - 1) // 4, H // 8, W // 8, 16) and batch["tokens"].shape == (4, 12)
    # Several shapes; each epoch every full batch once (bucket 2's 2 items never fill one).
    for e in range(3):
        epoch = [_ids(b)[0][0] for b in got[4 * e: 4 * e + 4]]
        assert sorted(epoch) == [0, 0, 1, 3]
        rows = [r for b in got[4 * e: 4 * e + 4] for r in _ids(b)]
        assert len(set(rows)) == 16
    assert len({b["z"].shape for b in got}) == 3
    # A pure function of the seed: the same again; another seed, another order.
    again = _batches(caches)
    assert [_ids(next(again)) for _ in range(12)] == [_ids(b) for b in got]
    other = _batches(caches, seed=1)
    assert [_ids(next(other)) for _ in range(12)] != [_ids(b) for b in got]

    # Exact resumption through JSON (as a checkpoint stores the state).
    it = _batches(caches)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state == {"next_index": 5}
    after = [next(it) for _ in range(6)]
    resumed = _batches(caches)
    resumed.set_state(state)
    for a, b in zip(after, (next(resumed) for _ in range(6))):
        for k in ("z", "z_last", "tokens"):
            np.testing.assert_array_equal(a[k], b[k])
    assert [_ids(b) for b in after] == [_ids(b) for b in got[5:11]]

    # Host p of 2 reads rows [2p, 2p + 2) of each global batch.
    hosts = [_batches(caches, process_index=p, process_count=2) for p in range(2)]
    for g in range(6):
        parts = [next(h) for h in hosts]
        np.testing.assert_array_equal(np.concatenate([p["z"] for p in parts]), got[g]["z"])


def test_cached_schedule_is_the_raw_bucketed_schedule(folders, tmp_path):
    """Cache b holds bucket b's items in source order, so the DiT's batch g holds the items the
    VAE's bucketed stream (`BucketedBatches`) puts in its batch g: one schedule for both."""
    config = _config(folders)
    source = sources.make_source(config, "train", size=40, mixed_shapes=True)
    raw = buckets.BucketedBatches(source, BUCKETS, batch_size=4, seed=3)
    members = [np.flatnonzero(raw.assignment == b) for b in range(4)]
    cached = buckets.CachedBucketBatches([np.zeros(len(m)) for m in members], raw.buckets, batch_size=4, seed=3)
    for g in range(2 * raw.batches_per_epoch):
        b, ids = cached.schedule.global_batch(g)
        rb, items = raw.global_batch(g)
        assert b == rb and members[b][ids].tolist() == items.tolist()


def test_too_few_items_and_bad_patches_are_one_line_errors(tmp_path, folders):
    caches = _caches(tmp_path, counts=(3, 2, 1, 3))
    _one_line_error(ValueError, r"no bucket holds a full batch of 4 items \(items per bucket: 9x32x32: 3, "
                    r"9x32x48: 2, 5x16x16: 1, 1x32x32: 3\): check config.data.buckets",
                    buckets.CachedBucketBatches, caches, SHAPES, batch_size=4, seed=0)
    # Through the trainer, naming the fields to change; and a bucket whose latent grid the DiT's
    # 2 x 2 patches do not tile (5x16x16: 2 x 2 latents tile; 24 x 40 pixels: 3 x 5 do not).
    spec = ",".join(buckets.shape_name(s) for s in SHAPES)
    latent_cache.write_bucket_index(str(tmp_path / "cache"), [
        dict(shape=list(s), dir="bucket-" + buckets.shape_name(s), count=len(c))
        for s, c in zip(SHAPES, caches)])
    config = _config(folders, **{"data.buckets": spec, "cache.path": str(tmp_path / "cache")})
    _one_line_error(ValueError, "no bucket holds a full batch of 4 items.*config.train.batch_size=4",
                    dit_trainer.bucketed_batches, config, str(tmp_path), SHAPES)
    wide = (9, 24, 40)
    z = np.zeros((4, 3, 3, 5, 16), np.float32)
    latent_cache.write_arrays(latent_cache.bucket_dir(str(tmp_path / "cache"), wide), z, z,
                              np.zeros((4, 12), np.int32), ["w"] * 4)
    latent_cache.write_bucket_index(str(tmp_path / "cache"), [dict(shape=list(wide), dir="bucket-9x24x40", count=4)])
    _one_line_error(ValueError, r"bucket 9x24x40 of config.data.buckets gives latents 3x3x5, not divisible by "
                    r"the DiT's patch \(1, 2, 2\)", dit_trainer.bucketed_batches,
                    _config(folders, **{"data.buckets": "9x24x40", "cache.path": str(tmp_path / "cache")}),
                    str(tmp_path), (wide,))


def test_dit_parameters_do_not_depend_on_the_latent_shape(folders):
    """Initialised once, the DiT takes every bucket's latents: the same parameter tree at any T, h, w."""
    config = _config(folders)
    model = build.dit(config, 16)
    S = config.text.max_length

    def params(T, h, w):
        x = jnp.zeros((1, T, h, w, 16))
        args = (x, jnp.zeros((1,)), x, jnp.zeros((1, T, h, w, 1)), jnp.zeros((1, S), jnp.int32))
        return jax.tree.map(lambda a: a.shape, jax.eval_shape(model.init, jax.random.key(0), *args))

    assert params(3, 4, 4) == params(1, 4, 6) == params(2, 6, 2)
