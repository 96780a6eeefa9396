"""Bucketed batches (pixeldance/data/buckets.py): one shape per batch, the right bucket per item,
determinism, resumption, per-host slices, metadata read once. (The joint image-video
experiment end to end: tests/test_video_image_mix.py.)"""
import json
import os

import numpy as np
import pytest
from PIL import Image

from pixeldance.data import buckets, image_folder, mixture, video_folder, video_io

BUCKETS = "9x16x24,9x24x16,5x16x16,1x16x16,1x16x24"
SHAPES = buckets.parse_buckets(BUCKETS)
# name -> (frames, height, width, blue, expected bucket): the folders below.
VIDEOS = {"wide.mp4": (30, 48, 64, 40, 0), "tall.mp4": (14, 64, 48, 80, 1), "short.mp4": (6, 48, 48, 120, 2),
          "tiny.mp4": (3, 48, 48, 160, 3)}
IMAGES = {"wide.png": (1, 20, 40, 30, 4), "tall.png": (1, 40, 20, 90, 3), "square.png": (1, 30, 30, 150, 3)}


def _write_csv(root, rows):
    with open(os.path.join(root, "captions.csv"), "w") as f:
        f.write("path,caption\n" + "".join(r + "\n" for r in rows))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A video folder (4 good videos of several lengths and aspects, one corrupt, one missing)
    and an image folder (wide, tall, square); each file has its own blue level."""
    vroot, iroot = tmp_path_factory.mktemp("videos"), tmp_path_factory.mktemp("images")
    for name, (f, h, w, blue, _) in VIDEOS.items():
        v = np.zeros((f, h, w, 3), np.uint8)
        v[..., 0], v[..., 2] = (8 * np.arange(f))[:, None, None], blue
        video_io.write_mp4(str(vroot / name), v, fps=10)
    (vroot / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    _write_csv(vroot, ["wide.mp4,wide", "noise.mp4,broken", "tall.mp4,tall", "missing.mp4,gone",
                       "short.mp4,short", "tiny.mp4,tiny"])
    for name, (_, h, w, blue, _) in IMAGES.items():
        Image.fromarray(np.full((h, w, 3), blue, np.uint8)).save(iroot / name)
    _write_csv(iroot, [f"{n},{n[:-4]} image" for n in IMAGES])
    return str(vroot), str(iroot)


VIDEO_ENTRIES = ["wide.mp4", "noise.mp4", "tall.mp4", "missing.mp4", "short.mp4", "tiny.mp4"]
IMAGE_ENTRIES = list(IMAGES)


def _mixture(folders, size=600):
    vroot, iroot = folders
    videos = video_folder.VideoFolderSource(vroot, num_frames=9, resolution=16, size=size)
    images = image_folder.ImageFolderSource(iroot, resolution=16, size=size)
    return mixture.MixtureSource([videos, images], [0.7, 0.3], seed=0, size=size, names=["videos", "images"])


def _expected(mix, index):
    """(bucket, blue) of mixture item `index`, from the fixture's table."""
    (c,), (j,) = mix.locate([index])
    name = (VIDEO_ENTRIES, IMAGE_ENTRIES)[c][j % (6, 3)[c]]
    spec = (VIDEOS if c == 0 else IMAGES).get(name)
    return (spec[4], spec[3]) if spec else (-1, None)


def test_parse_and_assign():
    assert SHAPES == ((9, 16, 24), (9, 24, 16), (5, 16, 16), (1, 16, 16), (1, 16, 24))
    assert buckets.parse_buckets([(17, 64, 64), [1, 64, 64]]) == ((17, 64, 64), (1, 64, 64))
    for spec, match in (("9x16", "FRAMESxHEIGHTxWIDTH"), ("8x16x16", "1 \\+ 4k"), ("9x12x16", "multiples of 8"),
                        ("9x16x16,9x16x16", "twice"), ("", "no buckets"), ("ax16x16", "FRAMESxHEIGHTxWIDTH")):
        with pytest.raises(ValueError, match=match):
            buckets.parse_buckets(spec)
    # frames available, height, width -> bucket: most frames first, then the nearest aspect,
    # ties to the first listed; nothing fits -> -1.
    frames = [30, 9, 8, 14, 4, 1, 1, 1, 0, 30]
    height = [48, 48, 48, 64, 48, 40, 20, 30, 48, 0]
    width = [64, 48, 48, 48, 48, 20, 40, 30, 64, 64]
    got = buckets.assign(frames, height, width, SHAPES)
    assert got.tolist() == [0, 0, 2, 1, 3, 3, 4, 3, -1, -1]


def test_every_batch_one_shape_and_the_right_bucket(folders):
    mix = _mixture(folders)
    it = buckets.make_bucketed_batches(mix, BUCKETS, batch_size=4, seed=0, process_index=0, process_count=1)
    seen = set()
    for _ in range(24):
        batch = next(it)
        shape = batch["video"].shape[1:4]
        assert batch["video"].shape == (4,) + shape + (3,) and batch["video"].dtype == np.uint8
        bucket = SHAPES.index(tuple(shape))
        seen.add(bucket)
        for row, index in enumerate(batch["index"]):
            want_bucket, blue = _expected(mix, int(index))
            assert want_bucket == bucket, (index, want_bucket, bucket)
            assert abs(float(batch["video"][row, ..., 2].mean()) - blue) < 6  # the item's own file
    assert seen == set(range(5))
    # Videos are read at the bucket's frame count: consecutive source frames (red = 8 k).
    bb = buckets.BucketedBatches(mix, BUCKETS, batch_size=4, seed=0)
    assert (bb.assignment >= 0).mean() > 0.6 and bb.per_epoch.sum() == bb.batches_per_epoch
    wide = next(i for i in range(len(mix)) if _expected(mix, i)[0] == 0)
    clip = buckets.read_item(mix, wide, SHAPES[0])["video"]
    np.testing.assert_allclose(np.diff(clip[..., 0].mean(axis=(1, 2))), 8, atol=2)
    # The headers were read once and kept next to the captions file.
    meta = os.path.join(folders[0], "captions.csv.meta-video_folder.json")
    with open(meta) as f:
        kept = json.load(f)
    assert sorted(kept) == sorted(VIDEOS) and kept["tall.mp4"][2:] == [14, 10.0, 64, 48]
    assert os.path.exists(os.path.join(folders[1], "captions.csv.meta-image_folder.json"))


def test_headers_come_from_the_cache(folders, monkeypatch, tmp_path):
    video_folder.VideoFolderSource(folders[0]).bucket_info([0])  # reads and keeps the headers
    probed = []
    real = video_folder.VideoFolderSource._probe

    def spy(self, path):
        probed.append(os.path.basename(path))
        return real(self, path)

    monkeypatch.setattr(video_folder.VideoFolderSource, "_probe", spy)
    src = video_folder.VideoFolderSource(folders[0], num_frames=9, resolution=16)
    info = src.bucket_info(np.arange(6))
    assert info["frames"].tolist() == [30, 0, 14, 0, 6, 3]
    assert sorted(probed) == ["missing.mp4", "noise.mp4"]  # the good ones come from the cache
    assert src.summary()["skipped"] == {"corrupt": 1, "missing": 1}
    # The frames an entry can give depend on the source's stride / fps, not on the cache.
    strided = video_folder.VideoFolderSource(folders[0], num_frames=9, resolution=16, stride=2)
    assert strided.bucket_info([0, 2])["frames"].tolist() == [15, 7]
    at_5fps = video_folder.VideoFolderSource(folders[0], num_frames=9, resolution=16, fps=5.0)
    assert at_5fps.bucket_info([0, 2])["frames"].tolist() == [15, 7]
    # Elsewhere, or in memory only.
    probed.clear()
    video_folder.VideoFolderSource(folders[0], meta_cache=str(tmp_path)).bucket_info([0])
    assert len(probed) == 6 and len(os.listdir(tmp_path)) == 1
    video_folder.VideoFolderSource(folders[0], meta_cache="memory").bucket_info([0])
    assert len(probed) == 12 and len(os.listdir(tmp_path)) == 1


def test_deterministic_and_resumes(folders):
    mix = _mixture(folders, size=60)
    per_epoch = buckets.BucketedBatches(mix, BUCKETS, batch_size=4, seed=1).batches_per_epoch
    assert 8 < per_epoch < 16
    make = lambda seed=1: buckets.make_bucketed_batches(mix, BUCKETS, batch_size=4, seed=seed,
                                                        process_index=0, process_count=1)
    a, b = make(), make()
    first = [next(a) for _ in range(8)]
    for want in first:
        got = next(b)
        np.testing.assert_array_equal(got["index"], want["index"])
        np.testing.assert_array_equal(got["video"], want["video"])
    other = [next(make(seed=2))["index"] for _ in range(1)]
    assert not np.array_equal(other[0], first[0]["index"])
    for _ in range(per_epoch - 3 - 8):
        next(a)
    state = a.get_state()
    expected = [next(a) for _ in range(6)]  # crosses the epoch boundary
    resumed = make()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["index"], want["index"])
        np.testing.assert_array_equal(got["video"], want["video"])


def test_host_slices_assemble_the_global_batch(folders):
    mix = _mixture(folders, size=200)

    def flip(item, rng):  # a random transform: its draws must not depend on the host
        video = item["video"][:, :, ::-1] if rng.uniform() < 0.5 else item["video"]
        return dict(item, video=np.ascontiguousarray(video), coin=rng.integers(1 << 30))

    kw = dict(batch_size=4, seed=5, transform=flip)
    whole = buckets.BucketedBatches(mix, BUCKETS, **kw)
    hosts = [buckets.BucketedBatches(mix, BUCKETS, process_index=p, process_count=2, **kw) for p in range(2)]
    its = [buckets.make_bucketed_batches(mix, BUCKETS, process_index=p, process_count=2, **kw) for p in range(2)]
    for g in range(whole.batches_per_epoch + 3):
        want = whole[g]
        parts = [h[g] for h in hosts]
        streamed = [next(it) for it in its]
        for key in ("index", "video", "coin", "caption"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])
            np.testing.assert_array_equal(np.concatenate([s[key] for s in streamed]), want[key])
    with pytest.raises(ValueError, match="not divisible by 3 hosts"):
        buckets.BucketedBatches(mix, BUCKETS, batch_size=4, seed=0, process_count=3)
    with pytest.raises(ValueError, match="no bucket holds a full batch of 4096"):
        buckets.BucketedBatches(mix, BUCKETS, batch_size=4096, seed=0)


def test_sources_without_headers_use_their_item_shape():
    from pixeldance.data import synthetic
    world = synthetic.ShapesSource("train", size=20, config=synthetic.WorldConfig(num_frames=9, resolution=32))
    it = buckets.make_bucketed_batches(world, "5x16x24,9x16x16", batch_size=4, seed=0,
                                       process_index=0, process_count=1)
    batch = next(it)
    assert batch["video"].shape == (4, 9, 16, 16, 3)  # 9 frames fit; square -> 16 x 16
    np.testing.assert_array_equal(batch["video"][0], buckets.read_item(world, int(batch["index"][0]), (9, 16, 16))["video"])
