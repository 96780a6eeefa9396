"""The latent cache: record format, shards, the grain source, atomic and resumable writes, the
keep logic of the cache stage (with a stand-in VAE), corrupt caches, and the CLI."""
import json
import os
import pickle
import shutil
import threading

import numpy as np
import pytest

from pixeldance import build, configs
from pixeldance.data import latent_cache, pipeline
from pixeldance.trainers import cache as tool
from test_workdir import _fake_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNLOCAL = os.path.join(REPO, "experiments", "shapes.py") + ":runlocal"


def _arrays(n=10, K=3, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(1.0, 2.0, (n, 3, 4, 4, 16)).astype(np.float32)
    z_last = rng.normal(size=(n, K, 4, 4, 16)).astype(np.float32)
    tokens = rng.integers(0, 20, (n, 12)).astype(np.int32)
    return z, z_last, tokens, [f"caption {i} é" for i in range(n)]


def _records(z, z_last, tokens, captions):
    def encode_range(start, end):
        yield [dict(z=z[i], z_last=z_last[i], tokens=tokens[i], caption=captions[i]) for i in range(start, end)]
    return encode_range


def test_record_round_trip_and_bad_records():
    arrays = dict(z=np.arange(24, dtype=np.float32).reshape(2, 3, 4), tokens=np.array([1, 2, 3], np.int32),
                  empty=np.zeros((0, 5), np.float32))
    data = latent_cache.encode_record(arrays, "a ünicode caption")
    out = latent_cache.decode_record(data)
    assert out["caption"] == "a ünicode caption"
    for k, a in arrays.items():
        assert out[k].dtype == a.dtype and out[k].shape == a.shape
        np.testing.assert_array_equal(out[k], a)
    assert b"pickle" not in data and len(data) < 24 * 4 + 3 * 4 + 200  # raw bytes + a small header
    for bad in (data[:2], data[:40], data[:-1], b"\xff\xff\x00\x00" + data[4:]):
        with pytest.raises(ValueError):
            latent_cache.decode_record(bad)
    with pytest.raises(TypeError):
        latent_cache.encode_record(dict(x=np.array([object()])))


def test_shards_source_and_statistics(tmp_path):
    z, z_last, tokens, captions = _arrays(n=10)
    out = str(tmp_path / "cache")
    meta = latent_cache.write_arrays(out, z, z_last, tokens, captions, num_shards=3, info=dict(vae_step=7))
    shards = sorted(f for f in os.listdir(out) if f.endswith(".array_record"))
    assert shards == [f"latents-{s:05d}-of-00003.array_record" for s in range(3)]
    assert sorted(os.listdir(out)) == sorted(shards + ["meta.json"])  # no temporaries or sidecars left
    assert not os.path.exists(out + ".partial")
    assert [s["num_records"] for s in meta["shards"]] == [3, 3, 4] and meta["count"] == 10
    assert meta["vae_step"] == 7 and meta["fields"]["z"] == dict(dtype="<f4", shape=[3, 4, 4, 16])
    assert meta["fields"]["tokens"] == dict(dtype="<i4", shape=[12])
    assert latent_cache.read_meta(out) == meta and latent_cache.is_complete(out)

    source = latent_cache.LatentCacheSource(out)
    assert len(source) == 10 and repr(source) == "LatentCacheSource(n=10, z=(3, 4, 4, 16))"
    for i in (0, 3, 9):  # across shard boundaries
        ex = source[i]
        assert set(ex) == {"z", "z_last", "tokens"}
        np.testing.assert_array_equal(ex["z"], z[i])
        np.testing.assert_array_equal(ex["z_last"], z_last[i])
        np.testing.assert_array_equal(ex["tokens"], tokens[i])
    assert latent_cache.LatentCacheSource(out, captions=True)[4]["caption"] == captions[4]
    everything = source.read_all()
    np.testing.assert_array_equal(everything["z"], z)
    assert list(everything["captions"]) == captions
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(source))[5]["z"], z[5])  # for grain workers

    # The merged per-shard moments are the statistics of all of z.
    moments = latent_cache.Moments.from_json(meta["latent_moments"])
    np.testing.assert_allclose(moments.mean, z.astype(np.float64).mean((0, 1, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(moments.std, z.astype(np.float64).std((0, 1, 2, 3)), rtol=1e-10)

    # grain batches, as the DiT reads them.
    batch = next(pipeline.make_batches(source, batch_size=4, seed=0, process_index=0, process_count=1))
    assert batch["z"].shape == (4, 3, 4, 4, 16) and batch["tokens"].dtype == np.int32
    assert latent_cache.num_shards_for(2048, 0, 1024) == 2 and latent_cache.num_shards_for(8, 0, 1024) == 1
    assert latent_cache.num_shards_for(5, 16) == 5 and latent_cache.num_shards_for(10, 3) == 3


def test_frozen_text_states_cache(tmp_path):
    """A cache of a pretrained encoder's states: bfloat16 states and bool masks round-trip exactly,
    the empty prompt's states are stored once beside the shards and checked, grain batches them."""
    import ml_dtypes
    z, z_last, _, captions = _arrays(n=6)
    rng = np.random.default_rng(1)
    states = rng.normal(size=(6, 7, 5)).astype(ml_dtypes.bfloat16)
    mask = np.arange(7)[None] < rng.integers(1, 8, (6, 1))
    null = dict(text_states=rng.normal(size=(1, 7, 5)).astype(ml_dtypes.bfloat16), text_mask=np.arange(7)[None] < 1)
    out = str(tmp_path / "cache")
    text = dict(text_states=states, text_mask=mask)
    meta = latent_cache.write_arrays(out, z, z_last, text, captions, num_shards=2, null_text=null)
    assert meta["fields"]["text_states"] == dict(dtype="bfloat16", shape=[7, 5])
    assert meta["fields"]["text_mask"] == dict(dtype="|b1", shape=[7]) and "tokens" not in meta["fields"]
    assert latent_cache.is_complete(out)
    source = latent_cache.LatentCacheSource(out)
    assert source.fields == latent_cache.STATE_FIELDS
    ex = source[4]
    assert ex["text_states"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(ex["text_states"].view(np.uint16), states[4].view(np.uint16))
    np.testing.assert_array_equal(ex["text_mask"], mask[4])
    got = source.null_text()
    np.testing.assert_array_equal(got["text_states"].view(np.uint16), null["text_states"].view(np.uint16))
    np.testing.assert_array_equal(got["text_mask"], null["text_mask"])
    batch = next(pipeline.make_batches(source, batch_size=4, seed=0, process_index=0, process_count=1))
    assert batch["text_states"].shape == (4, 7, 5) and batch["text_mask"].dtype == bool
    # Token caches have no empty-prompt states; a damaged file is named, and the cache is incomplete.
    z2, zl2, tokens, caps = _arrays(n=3)
    latent_cache.write_arrays(str(tmp_path / "tok"), z2, zl2, tokens, caps)
    with pytest.raises(latent_cache.CacheError, match="holds no frozen text states"):
        latent_cache.LatentCacheSource(str(tmp_path / "tok")).null_text()
    with open(os.path.join(out, latent_cache.NULL_TEXT), "ab") as f:
        f.write(b"x")
    with pytest.raises(latent_cache.CacheError, match="null_text.record"):
        source.null_text()
    assert not latent_cache.is_complete(out)
    with pytest.raises(ValueError, match="empty prompt"):
        latent_cache.write_arrays(str(tmp_path / "nonull"), z, z_last, text, captions)

def test_build_resumes_after_an_interruption(tmp_path):
    z, z_last, tokens, captions = _arrays(n=12)
    out = str(tmp_path / "cache")
    full = _records(z, z_last, tokens, captions)
    encoded = []

    def failing(start, end):
        if start >= 6:
            raise KeyboardInterrupt  # killed while encoding the third shard
        encoded.append((start, end))
        yield from full(start, end)

    with pytest.raises(KeyboardInterrupt):
        latent_cache.build(out, count=12, num_shards=4, encode_range=failing, info=dict(vae_step=1))
    assert not os.path.exists(out) and encoded == [(0, 3), (3, 6)]  # nothing published

    encoded.clear()

    def counting(start, end):
        encoded.append((start, end))
        yield from full(start, end)

    latent_cache.build(out, count=12, num_shards=4, encode_range=counting, info=dict(vae_step=1))
    assert encoded == [(6, 9), (9, 12)]  # only the unfinished shards
    np.testing.assert_array_equal(latent_cache.LatentCacheSource(out).read_all()["z"], z)

    # A partial build of another plan (here another VAE step) is discarded, not mixed in.
    with pytest.raises(KeyboardInterrupt):
        latent_cache.build(out, count=12, num_shards=4, encode_range=failing, info=dict(vae_step=1))
    encoded.clear()
    latent_cache.build(out, count=12, num_shards=4, encode_range=counting, info=dict(vae_step=2))
    assert encoded == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert latent_cache.read_meta(out)["vae_step"] == 2 and not os.path.exists(out + ".partial")


def test_build_with_two_processes_splits_the_shards(tmp_path):
    """Two processes (threads here, with a barrier) write disjoint shards; process 0 publishes."""
    z, z_last, tokens, captions = _arrays(n=10)
    out = str(tmp_path / "cache")
    full = _records(z, z_last, tokens, captions)
    encoded, metas, errors = {0: [], 1: []}, {}, []
    barrier = threading.Barrier(2, timeout=60)

    def run(p):
        def encode_range(start, end):
            encoded[p].append((start, end))
            yield from full(start, end)
        try:
            metas[p] = latent_cache.build(out, count=10, num_shards=5, encode_range=encode_range,
                                          process_index=p, process_count=2, sync=lambda _: barrier.wait(),
                                          log=lambda _: None)
        except Exception as e:  # reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert encoded == {0: [(0, 2), (4, 6), (8, 10)], 1: [(2, 4), (6, 8)]}
    assert metas[0] == metas[1] and metas[0]["count"] == 10
    np.testing.assert_array_equal(latent_cache.LatentCacheSource(out).read_all()["z"], z)


def test_missing_and_corrupt_caches_name_the_path(tmp_path):
    z, z_last, tokens, captions = _arrays(n=6)
    out = str(tmp_path / "cache")
    latent_cache.write_arrays(out, z, z_last, tokens, captions, num_shards=2)
    shard = os.path.join(out, "latents-00001-of-00002.array_record")
    with open(shard, "rb") as f:
        good = f.read()

    with pytest.raises(FileNotFoundError, match="latent cache not found: .*nowhere"):
        latent_cache.LatentCacheSource(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "old")
    np.savez(tmp_path / "old" / "latents.npz", z=z)
    with pytest.raises(latent_cache.CacheError, match="old.*meta.json"):
        latent_cache.LatentCacheSource(str(tmp_path / "old"))

    def corrupt(data, match, when="open"):
        with open(shard, "wb") as f:
            f.write(data)
        with pytest.raises(latent_cache.CacheError, match=match) as e:
            source = latent_cache.LatentCacheSource(out)
            assert when == "read"
            for i in range(len(source)):
                source[i]
        assert "\n" not in str(e.value) and shard in str(e.value)

    corrupt(good[:-100], "corrupt: .* bytes")  # truncated
    corrupt(b"\x00" * len(good), "unreadable")  # not an ArrayRecord file at all
    at = good.find(z[4].tobytes())  # records are stored uncompressed: flip bytes inside record 4
    assert at > 0
    corrupt(good[:at] + b"\xff" * 64 + good[at + 64:], "record 4 unreadable", when="read")
    os.remove(shard)
    with pytest.raises(latent_cache.CacheError, match="shard missing: " + shard):
        latent_cache.LatentCacheSource(out)


# ---------------------------------------------------------------------------------------------
# The cache stage (`cache_latents`) with a stand-in VAE: keep / rebuild / resume / statistics.
# ---------------------------------------------------------------------------------------------

class FakeVAE:
    """encode: uint8 [B, 1 + 4k, H, W, 3] -> float32 [B, 1 + k, H/8, W/8, 16], a fixed function of
    the pixels (8x8 block means, per channel offsets); counts calls; optionally fails."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def encode(self, video):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        v = np.asarray(video, np.float32) / 255.0
        B, F, H, W, _ = v.shape
        frames = v[:, ::4] if F > 1 else v  # 1 + k frames
        blocks = frames.reshape(B, len(frames[0]), H // 8, 8, W // 8, 8, 3).mean((3, 5))  # [B, T, h, w, 3]
        return np.concatenate([blocks * (c + 1) for c in range(6)], -1)[..., :16].astype(np.float32)


def _stage_config(**overrides):
    return configs.override(configs.load_config(RUNLOCAL), **{
        "cache.num_videos": 10, "cache.batch_size": 4, "cache.num_shards": 3, **overrides})


@pytest.fixture
def fake_workdir(tmp_path, monkeypatch):
    workdir = tmp_path / "work"
    _fake_checkpoint(str(workdir / "vae" / "4"))  # a sealed folder: only its step is read
    vaes = []

    def load_vae(path):
        assert path == str(workdir)
        vaes.append(FakeVAE(fail_after=load_vae.fail_after))
        return vaes[-1]
    load_vae.fail_after = None
    monkeypatch.setattr("pixeldance.trainers.cache.load_vae", load_vae)
    return str(workdir), vaes, load_vae


def _mtimes(folder):
    return {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)}


def test_cache_stage_keeps_rebuilds_and_resumes(fake_workdir, capsys):
    workdir, vaes, load_vae = fake_workdir
    config = _stage_config()
    path = tool.cache_latents(config, workdir)
    assert path == os.path.join(workdir, "cache")
    meta = latent_cache.read_meta(path)
    assert meta["count"] == 10 and len(meta["shards"]) == 3 and meta["vae_step"] == 4
    assert meta["tokenizer"] == dict(kind="words", max_length=12) and meta["data"] == "shapes"
    assert meta["source"].startswith("ShapesSource(") and meta["last_from"] == 3
    # 3 shards of 3, 3, 4 videos, one batch of 4 each (padded), encoded as videos + last frames.
    assert vaes[0].calls == 6

    # The records: item i of the training source, its last 3 frames latest first, its tokens.
    from pixeldance.data import sources
    item = sources.make_source(config, "train", size=10)[7]
    rec = latent_cache.LatentCacheSource(path, captions=True)[7]
    video = item["video"][None]
    np.testing.assert_array_equal(rec["z"], FakeVAE().encode(video)[0])
    np.testing.assert_array_equal(rec["z_last"][0], FakeVAE().encode(video[:, -1:])[0, 0])
    np.testing.assert_array_equal(rec["z_last"][2], FakeVAE().encode(video[:, -3:-2])[0, 0])
    assert rec["caption"] == item["caption"]
    np.testing.assert_array_equal(rec["tokens"], build.tokenizer(config)([item["caption"]])[0])

    # latent_stats.json over the cache (no VAE-stage statistics here), as before.
    z = latent_cache.LatentCacheSource(path).read_all()["z"].astype(np.float64)
    with open(os.path.join(workdir, "latent_stats.json")) as f:
        stats = json.load(f)
    assert stats["source"] == "cache" and stats["num_videos"] == 10
    np.testing.assert_allclose(stats["mean"], z.mean((0, 1, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], np.maximum(z.std((0, 1, 2, 3)), 1e-3), rtol=1e-6)

    # Same size and VAE step: kept, nothing encoded or rewritten.
    before = _mtimes(path)
    capsys.readouterr()
    tool.cache_latents(config, workdir)
    assert "latent cache: keeping" in capsys.readouterr().out
    assert len(vaes) == 1 and _mtimes(path) == before

    # The VAE stage's statistics for the newest VAE step are kept; a newer VAE rebuilds the cache.
    _fake_checkpoint(os.path.join(workdir, "vae", "6"))
    vae_stats = dict(mean=[0.5] * 16, std=[2.0] * 16, source="train_vae", vae_step=6)
    with open(os.path.join(workdir, "latent_stats.json"), "w") as f:
        json.dump(vae_stats, f)
    tool.cache_latents(config, workdir)
    assert len(vaes) == 2 and vaes[1].calls == 6 and latent_cache.read_meta(path)["vae_step"] == 6
    with open(os.path.join(workdir, "latent_stats.json")) as f:
        assert json.load(f) == vae_stats

    # Another size: rebuilt, interrupted in the second shard, then resumed from it.
    config = _stage_config(**{"cache.num_videos": 12})
    load_vae.fail_after = 3  # shard 0 (one batch: 2 calls) done, shard 1 killed in its batch
    with pytest.raises(KeyboardInterrupt):
        tool.cache_latents(config, workdir)
    assert latent_cache.read_meta(path)["count"] == 10  # the old cache is untouched meanwhile
    load_vae.fail_after = None
    capsys.readouterr()
    tool.cache_latents(config, workdir)
    assert "resuming, 1 of this process's 3 shards are done" in capsys.readouterr().out
    assert vaes[-1].calls == 4  # shards 1 and 2 only
    assert latent_cache.read_meta(path)["count"] == 12 and len(latent_cache.LatentCacheSource(path)) == 12

    # A complete cache with latent_stats.json missing: kept, the statistics written from meta.json.
    os.remove(os.path.join(workdir, "latent_stats.json"))
    n_vaes = len(vaes)
    tool.cache_latents(config, workdir)
    assert len(vaes) == n_vaes
    with open(os.path.join(workdir, "latent_stats.json")) as f:
        assert json.load(f)["source"] == "cache"


def test_cli_writes_the_main_jobs_cache(runlocal_workdir, tmp_path, python_runner):
    """The cache stage alone (`--config.mode=cache`) on the main job's workdir, to another folder
    (config.cache.path): the same records as the main job's cache stage."""
    workdir, out = str(tmp_path / "work"), str(tmp_path / "cache2")
    shutil.copytree(runlocal_workdir, workdir, ignore=shutil.ignore_patterns("dit", "samples", "tensorboard"))
    with open(os.path.join(workdir, "latent_stats.json")) as f:
        stats = f.read()
    proc = python_runner("-m", "pixeldance.main", f"--config={RUNLOCAL}", f"--workdir={workdir}",
                         "--config.mode=cache", f"--config.cache.path={out}", "--config.cache.num_shards=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in 2 shards" in proc.stdout
    with open(os.path.join(workdir, "latent_stats.json")) as f:
        assert f.read() == stats  # the VAE stage's statistics, for the newest VAE step: kept
    ours = latent_cache.LatentCacheSource(out).read_all()
    main = latent_cache.LatentCacheSource(os.path.join(runlocal_workdir, "cache")).read_all()
    for k in ("z", "z_last", "tokens", "captions"):
        np.testing.assert_allclose(ours[k], main[k], atol=1e-5) if k.startswith("z") else \
            np.testing.assert_array_equal(ours[k], main[k])
