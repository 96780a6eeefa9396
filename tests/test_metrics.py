"""The metrics as functions of features, their statistics cache, the protocols and the clip reader
(pixeldance/metrics/{scores,stats,protocols,videos}.py). No feature network here: see
test_metrics_tool.py for the command line on real networks."""
import os

import numpy as np
import pytest
import scipy.linalg

from pixeldance.data import video_io
from pixeldance.metrics import protocols, scores, stats, videos


def _scipy_fd(mu1, cov1, mu2, cov2):
    """The reference FID code's formula: sqrtm of the product, real part."""
    covmean = scipy.linalg.sqrtm(cov1 @ cov2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


def test_frechet_distance_known_cases():
    Z = 5
    mu = np.arange(Z, dtype=float)
    eye = np.eye(Z)
    assert scores.frechet_distance(mu, eye, mu, eye) == pytest.approx(0.0, abs=1e-10)
    # Means only: |mu1 - mu2|^2.
    assert scores.frechet_distance(mu, eye, mu + 2.0, eye) == pytest.approx(4.0 * Z, rel=1e-12)
    # Diagonal covariances: sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0, 0.25, 2.0]), np.array([4.0, 1.0, 9.0, 1.0, 0.5])
    want = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert scores.frechet_distance(mu, np.diag(a), mu, np.diag(b)) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("n1,n2,Z", [(500, 400, 32), (20, 30, 64)])  # full rank; rank-deficient
def test_frechet_distance_matches_scipy(n1, n2, Z):
    rng = np.random.default_rng(n1)
    mix = rng.normal(size=(Z, Z)) / np.sqrt(Z)
    x = rng.normal(size=(n1, Z)) @ mix
    y = (rng.normal(size=(n2, Z)) * 1.5 + 0.3) @ mix.T
    args = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    ours, ref = scores.frechet_distance(*args), _scipy_fd(*args)
    assert ours == pytest.approx(ref, rel=1e-6)
    # Symmetric in its two arguments (the reference is only up to rounding).
    assert scores.frechet_distance(*args[2:], *args[:2]) == pytest.approx(ours, rel=1e-8)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mismatched"):
        scores.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def _reference_is(logits, splits):
    """Inception Score as written in the original code: softmax, per split KL to the split's marginal."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n = len(p) // splits
    out = []
    for k in range(splits):
        part = p[k * n:(k + 1) * n]
        py = part.mean(0, keepdims=True)
        out.append(np.exp((part * (np.log(part) - np.log(py))).sum(1).mean()))
    return np.mean(out), np.std(out)


def test_inception_score():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(103, 7)) * 4  # 103: the last 3 dropped with 10 splits
    mean, std = scores.inception_score(logits, splits=10)
    ref = _reference_is(logits[:100], 10)
    assert (mean, std) == pytest.approx(ref, rel=1e-10)
    # Confident and evenly spread over X classes: IS -> X; one class for everything: IS -> 1.
    X = 7
    onehot = np.eye(X)[np.arange(70) % X] * 50
    assert scores.inception_score(onehot, splits=1)[0] == pytest.approx(X, rel=1e-6)
    assert scores.inception_score(np.tile(onehot[:1], (70, 1)), splits=2)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="splits"):
        scores.inception_score(logits[:5], splits=10)


def test_clipsim():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(4, 3, 8))
    txt = rng.normal(size=(4, 8))
    want = np.mean([[img[n, f] @ txt[n] / np.linalg.norm(img[n, f]) / np.linalg.norm(txt[n])
                     for f in range(3)] for n in range(4)])
    assert scores.clipsim(img * 3.0, txt * 0.5) == pytest.approx(want, rel=1e-12)  # scale-free
    assert scores.clipsim(txt[:, None] * 2.0, txt) == pytest.approx(1.0)
    assert scores.clipsim(img[:, 0], txt) == pytest.approx(scores.clipsim(img[:, :1], txt))
    with pytest.raises(ValueError):
        scores.clipsim(img, txt[:3])


def test_accumulator_matches_numpy_in_any_batches():
    x = np.random.default_rng(2).normal(size=(37, 6)) * 10 + 100  # offset: the streaming sums must not cancel badly
    acc = stats.Accumulator()
    for part in np.split(x, [5, 6, 20]):
        acc.add(part)
    mean, cov = acc.moments()
    assert acc.count == 37
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-8)


def test_stats_npz_round_trip_and_damage(tmp_path):
    x = np.random.default_rng(3).normal(size=(10, 4))
    s = stats.FeatureStats.from_features(x, metric="fvd", protocol="p", network="abc", source="here")
    path = str(tmp_path / "s.npz")
    s.save(path)
    back = stats.FeatureStats.load(path)
    np.testing.assert_array_equal(back.cov, s.cov)
    assert (back.count, back.metric, back.protocol, back.network, back.source) == (10, "fvd", "p", "abc", "here")
    # No pickle: an object array in the file is refused, as is a truncated file or a NaN.
    np.savez(str(tmp_path / "obj.npz"), mean=np.array([{"x": 1}], dtype=object))
    for bad, why in [("obj.npz", "not a statistics"), ("missing.npz", "not found")]:
        with pytest.raises(stats.StatsError, match=why):
            stats.FeatureStats.load(str(tmp_path / bad))
    with open(path, "rb") as f:
        head = f.read(100)
    (tmp_path / "cut.npz").write_bytes(head)
    with pytest.raises(stats.StatsError, match="cut.npz"):
        stats.FeatureStats.load(str(tmp_path / "cut.npz"))
    nan = stats.FeatureStats(s.mean * np.nan, s.cov, 10, "fvd", "p", "abc")
    nan.save(str(tmp_path / "nan.npz"))
    with pytest.raises(stats.StatsError, match="damaged"):
        stats.FeatureStats.load(str(tmp_path / "nan.npz"))
    other = stats.FeatureStats(s.mean, s.cov, 10, "fvd", "p", "other-network")
    with pytest.raises(stats.StatsError, match="network differs"):
        s.check_matches(other, "here")


def test_protocols_are_complete_and_checked():
    for name in ("fvd2048_16f", "ucf101_pixeldance", "msrvtt_zeroshot", "shapes_17f", "runlocal"):
        p = protocols.get(name)
        assert p.summary and p.comparable_to and p.metrics
    assert protocols.get("fvd2048_16f").num_real == 2048 == protocols.get("fvd2048_16f").num_generated
    assert protocols.get("msrvtt_zeroshot").num_generated == 2990
    with pytest.raises(ValueError, match="unknown protocol"):
        protocols.get("fvd")
    with pytest.raises(ValueError, match="crop"):
        protocols.Protocol(name="x", summary="", comparable_to="", metrics=("fvd",), crop="pad")
    with pytest.raises(ValueError, match="metrics"):
        protocols.Protocol(name="x", summary="", comparable_to="", metrics=("lpips",))


def _ramp_video(path, F=12, H=24, W=40, fps=8):
    """Frame k has red = 16 k, so a decoded frame tells its index."""
    v = np.zeros((F, H, W, 3), np.uint8)
    v[..., 0] = (16 * np.arange(F))[:, None, None]
    v[..., 1] = 128
    if path.endswith(".gif"):
        video_io.write_gif(path, v, fps=fps)
    else:
        video_io.write_mp4(path, v, fps=fps)


def test_read_clip_start_stride_resize(tmp_path):
    folder = str(tmp_path)
    _ramp_video(os.path.join(folder, "a.mp4"))
    _ramp_video(os.path.join(folder, "b.gif"))
    (tmp_path / "notes.txt").write_text("not a video")
    assert videos.list_videos(folder) == ["a.mp4", "b.gif"]
    base = dict(name="t", summary="", comparable_to="", metrics=("fvd",), num_frames=4, resolution=16)
    for name in ("a.mp4", "b.gif"):
        for start, stride, first in [("start", 1, 0), ("center", 2, 2), ("start", 3, 0)]:
            p = protocols.Protocol(**base, clip_start=start, stride=stride, crop="center")
            clip = videos.read_clip(folder, name, p)
            assert clip.shape == (4, 16, 16, 3) and clip.dtype == np.uint8
            index = np.round(clip[:, 8, 8, 0] / 16.0).astype(int)
            np.testing.assert_array_equal(index, first + stride * np.arange(4), err_msg=f"{name} {start}")
    # 'random' starts are seeded by the protocol's seed and the name: the same on every read.
    p = protocols.Protocol(**base, clip_start="random")
    np.testing.assert_array_equal(videos.read_clip(folder, "a.mp4", p), videos.read_clip(folder, "a.mp4", p))
    # Too short for the protocol: one line naming the file.
    with pytest.raises(videos.VideoSetError, match="a.mp4: no 40-frame clip"):
        videos.read_clip(folder, "a.mp4", protocols.Protocol(**dict(base, num_frames=40)))


def test_resize_center_crop_and_squash():
    frame = np.zeros((1, 20, 40, 3), np.uint8)
    frame[:, :, :10] = 255  # a white band on the left that a centre crop removes
    crop = videos.resize_frames(frame, 10, "center")
    squash = videos.resize_frames(frame, 10, "squash")
    assert crop.shape == squash.shape == (1, 10, 10, 3)
    assert crop.max() < 64 and squash[0, :, 0].min() > 245  # (PIL antialiasing bleeds a little)


def test_list_videos_subset_and_errors(tmp_path):
    for i in range(6):
        (tmp_path / f"v{i}.mp4").write_bytes(b"x")
    subset = videos.list_videos(str(tmp_path), limit=3, seed=0)
    assert len(subset) == 3 and subset == sorted(subset)
    assert subset == videos.list_videos(str(tmp_path), limit=3, seed=0)
    assert {tuple(videos.list_videos(str(tmp_path), limit=3, seed=s)) for s in range(6)} != {tuple(subset)}
    # The cache key of a real set: another file list, size or time is another set.
    names = videos.list_videos(str(tmp_path))
    fp = videos.fingerprint(str(tmp_path), names)
    assert fp == videos.fingerprint(str(tmp_path), names)
    assert fp != videos.fingerprint(str(tmp_path), names[1:])
    (tmp_path / "v0.mp4").write_bytes(b"xy")
    assert fp != videos.fingerprint(str(tmp_path), names)
    with pytest.raises(videos.VideoSetError, match="not found"):
        videos.list_videos(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(videos.VideoSetError, match="no videos"):
        videos.list_videos(str(tmp_path / "empty"))


def test_feature_net_chunks_its_batches():
    """per_device bounds the inputs of one call (pads the last chunk to the devices); the
    outputs are those of the whole batch in one call, in order."""
    from pixeldance.metrics import networks

    seen = []

    def fn(v, x):
        seen.append(x.shape[0])  # at trace time: one entry per distinct input shape
        return {"s": x.reshape(len(x), -1).sum(-1) * v["w"], "first": x[:, 0]}

    mesh = networks.default_mesh()
    x = np.random.default_rng(0).normal(size=(300, 3, 2)).astype(np.float32)
    whole = networks.FeatureNet("t", fn, {"w": np.float32(2.0)}, "", mesh)(x)
    chunked = networks.FeatureNet("t", fn, {"w": np.float32(2.0)}, "", mesh, per_device=2)(x)
    D = mesh.size
    assert seen[0] == 300 + (-300 % D) and max(seen[1:]) == 2 * D
    for k in whole:
        np.testing.assert_allclose(chunked[k], whole[k], rtol=1e-6)
        assert chunked[k].shape[0] == 300
