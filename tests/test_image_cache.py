"""Joint image-video DiT training from a real image folder: the image cache the cache stage writes
(config.train.image_source), its errors, and the DiT's image batch schedule and resumption.

The cache stage runs with the stand-in VAE of test_latent_cache (no training, no compiles)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from pixeldance import build
from pixeldance.data import latent_cache, pipeline
from pixeldance.trainers import cache as tool
from pixeldance.trainers import dit as dit_trainer
from test_latent_cache import FakeVAE, _stage_config, fake_workdir  # noqa: F401  (fake_workdir: a fixture)

# Captions in the shapes world's words, so the runlocal config's word tokenizer knows them.
CAPTIONS = ["a red circle", "a blue square moves left", "a green triangle"]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """Three 40 x 48 images (cropped to 32 x 32 by the source), each its own colour, and captions.csv."""
    root = tmp_path_factory.mktemp("image_cache_images")
    for k in range(3):
        img = np.zeros((40, 48, 3), np.uint8)
        img[..., k] = 60 + 60 * k
        img[:20] += 30  # not flat, so the latents differ across the 8 x 8 blocks
        Image.fromarray(img).save(root / f"{k}.png")
    with open(root / "captions.csv", "w") as f:
        f.write("path,caption\n" + "".join(f"{k}.png,{c}\n" for k, c in enumerate(CAPTIONS)))
    return str(root)


def _config(image_root, **overrides):
    """The shapes runlocal config (10 videos in 3 shards) with the DiT's images from `image_root`."""
    return _stage_config(**{"train.image_every": 2, "train.image_source": "images",
                            "data.sources": dict(images=dict(name="image_folder", root=image_root)),
                            **overrides})


# ---------------------------------------------------------------------------------------------
# The cache stage writes the image cache.
# ---------------------------------------------------------------------------------------------

def test_cache_stage_writes_the_image_cache(fake_workdir, image_root, capsys):
    workdir, vaes, _ = fake_workdir
    config = _config(image_root)
    assert tool.cache_latents(config, workdir) == os.path.join(workdir, "cache")
    path = os.path.join(workdir, "cache_images")
    meta = latent_cache.read_meta(path)
    # One record per image (cache.num_images = 0: every image once), one latent frame each.
    assert meta["count"] == 3 and meta["data"] == "image_folder" and meta["vae_step"] == 4
    assert meta["fields"]["z"]["shape"] == [1, 4, 4, 16] == meta["fields"]["z_last"]["shape"]
    assert latent_cache.read_meta(os.path.join(workdir, "cache"))["fields"]["z"]["shape"] == [3, 4, 4, 16]

    from pixeldance.data import image_folder
    images = image_folder.ImageFolderSource(image_root, resolution=32)
    got = latent_cache.LatentCacheSource(path, captions=True).read_all()
    assert list(got["captions"]) == CAPTIONS  # from the image folder's captions file, in order
    for i in range(3):
        np.testing.assert_array_equal(got["z"][i], FakeVAE().encode(images[i]["video"][None])[0])
    np.testing.assert_array_equal(got["z_last"], got["z"])  # the single frame is its own last frame
    np.testing.assert_array_equal(got["tokens"], build.tokenizer(config)(CAPTIONS))
    # Normalised with the videos' statistics (one latent space): latent_stats.json is the video cache's.
    with open(os.path.join(workdir, "latent_stats.json")) as f:
        assert json.load(f)["num_videos"] == 10
    # One VAE for both caches: 3 video shards x (videos + last frames) + 3 image shards x images
    # (cache.num_shards = 3 for both; an image's last frame is not encoded again).
    assert len(vaes) == 1 and vaes[0].calls == 9 and len(meta["shards"]) == 3

    # Rerun: both caches kept, nothing encoded. Two images asked for: the image cache alone is rebuilt.
    capsys.readouterr()
    tool.cache_latents(config, workdir)
    assert capsys.readouterr().out.count("latent cache: keeping") == 2 and len(vaes) == 1
    tool.cache_latents(_config(image_root, **{"cache.num_images": 2}), workdir)
    out = capsys.readouterr().out
    assert f"keeping {os.path.join(workdir, 'cache')} " in out and f"rebuilding {path}" in out
    assert latent_cache.read_meta(path)["count"] == 2 and vaes[-1].calls == 2


def test_cache_stage_image_errors_name_the_path_or_field(fake_workdir, image_root, tmp_path):
    workdir, vaes, _ = fake_workdir

    def fails(error, match, **overrides):
        with pytest.raises(error, match=match) as e:
            tool.cache_latents(_config(image_root, **overrides), workdir)
        assert "\n" not in str(e.value)

    missing = str(tmp_path / "no_such_folder")
    fails(FileNotFoundError, f"image_source='images': image folder not found: {missing}",
          **{"data.sources": dict(images=dict(name="image_folder", root=missing))})
    os.makedirs(tmp_path / "no_captions")
    fails(FileNotFoundError, f"captions file not found: {tmp_path / 'no_captions' / 'captions.csv'}",
          **{"data.sources": dict(images=dict(name="image_folder", root=str(tmp_path / "no_captions")))})
    fails(ValueError, r"images of 16x16 pixels but videos of 32x32.*config.data.sources.images.resolution",
          **{"data.sources": dict(images=dict(name="image_folder", root=image_root, resolution=16))})
    fails(ValueError, "image_source='images' needs config.train.image_every >= 1", **{"train.image_every": 0})
    # Each stopped before any encoding: no VAE loaded, no cache started.
    assert vaes == [] and not os.path.exists(os.path.join(workdir, "cache.partial"))


# ---------------------------------------------------------------------------------------------
# The DiT's batches: every k-th from the image cache, the rest from the video cache; resumable.
# ---------------------------------------------------------------------------------------------

def _caches(tmp_path, n=10, m=5):
    """A video cache whose record i has z = i + 1 everywhere, and an image cache whose record j
    has z = -(j + 1), so every batch row says where it came from."""
    z = np.broadcast_to(np.arange(1, n + 1, dtype=np.float32)[:, None, None, None, None], (n, 3, 4, 4, 16))
    zi = -np.broadcast_to(np.arange(1, m + 1, dtype=np.float32)[:, None, None, None, None], (m, 1, 4, 4, 16))
    tok = lambda k: np.zeros((k, 12), np.int32)
    latent_cache.write_arrays(str(tmp_path / "cache"), z, z[:, -1:], tok(n), [f"v{i}" for i in range(n)])
    latent_cache.write_arrays(str(tmp_path / "cache_images"), zi, zi, tok(m), [f"i{j}" for j in range(m)])
    return (latent_cache.LatentCacheSource(str(tmp_path / "cache")),
            latent_cache.LatentCacheSource(str(tmp_path / "cache_images")))


def _batches(source, seed=0):
    return pipeline.make_batches(source, batch_size=4, seed=seed, process_index=0, process_count=1)


def _ids(batch):
    """The record id of each row (+ video, - image)."""
    return batch["z"][:, 0, 0, 0, 0].astype(int).tolist()


def test_image_batches_come_from_the_image_cache_and_resume_exactly(tmp_path):
    videos, images = _caches(tmp_path)
    it = dit_trainer.ImageVideoBatches(_batches(videos), 3, _batches(images))
    got = [next(it) for _ in range(7)]
    assert [b["z"].shape for b in got] == [(4, 3, 4, 4, 16)] * 2 + [(4, 1, 4, 4, 16)] + \
        [(4, 3, 4, 4, 16)] * 2 + [(4, 1, 4, 4, 16)] + [(4, 3, 4, 4, 16)]
    assert all(b["z_last"].shape[1:] == b["z"].shape[1:] for b in got[2::3])
    # Batches 3 and 6 are the image stream's first two; the others the video stream's first five,
    # unconsumed by the image steps (as each stream alone would give them).
    plain_videos, plain_images = _batches(videos), _batches(images)
    assert [_ids(b) for b in got[2::3]] == [_ids(next(plain_images)) for _ in range(2)]
    video_batches = [b for k, b in enumerate(got) if (k + 1) % 3]
    assert [_ids(b) for b in video_batches] == [_ids(next(plain_videos)) for _ in range(5)]
    assert all(i < 0 for b in got[2::3] for i in _ids(b)) and all(i > 0 for b in video_batches for i in _ids(b))

    # Through JSON, as a checkpoint stores it: a new iterator continues exactly, both streams.
    state = json.loads(json.dumps(it.get_state()))
    assert state == dict(inner={"next_index": 5}, drawn=7, images={"next_index": 2})
    after = [next(it) for _ in range(6)]
    resumed = dit_trainer.ImageVideoBatches(_batches(videos), 3, _batches(images))
    resumed.set_state(state)
    again = [next(resumed) for _ in range(6)]
    assert [_ids(b) for b in again] == [_ids(b) for b in after]
    for a, b in zip(after, again):
        for k in ("z", "z_last", "tokens"):
            np.testing.assert_array_equal(a[k], b[k])


def test_dit_refuses_an_image_cache_of_another_size(tmp_path, image_root):
    videos, _ = _caches(tmp_path)
    config = _config(image_root, **{"cache.image_path": str(tmp_path / "small_images")})
    zi = np.zeros((2, 1, 2, 2, 16), np.float32)  # 16 x 16 images against 32 x 32 clips
    latent_cache.write_arrays(str(tmp_path / "small_images"), zi, zi, np.zeros((2, 12), np.int32), ["a", "b"])
    with pytest.raises(ValueError, match=r"latents \[1, 2, 2, 16\], expected \[1, 4, 4, 16\].*"
                                         r"config.data.sources.images.resolution"):
        dit_trainer.image_batches(config, str(tmp_path), videos)
    assert dit_trainer.image_batches(_config(image_root, **{"train.image_source": ""}), str(tmp_path), videos) is None
