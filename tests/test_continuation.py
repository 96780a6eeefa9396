"""Continuation in latent space (issue 20, item 2), sampling side: context latents in the task's
sampler, the streaming causal decode, `Pipeline.generate_clips(continuation='latent')` and the
command line's --continuation / --context_latents.

The VAE is the runlocal one ('mu', random weights: the decode's arithmetic is what is tested);
the DiT is a stand-in whose output shows what reached it. Tiny shapes: 16 x 16 frames, 9-frame
clips (T = 3 latent frames).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixeldance import build, configs
from pixeldance.data import video_io
from pixeldance.diffusion import conditioning
from pixeldance.models import vae_inference
from pixeldance.models.vae import vae_from_variant
from pixeldance.sample import Pipeline, VideoVAE
from pixeldance.workdir import LatentStats
from sample_cli import in_process_cli, record_latents

R, F, T = 16, 9, 3  # 16 x 16 frames, 9-frame clips: 3 latent frames of 2 x 2 x 16
C = 16
STEP = 0.1  # latent value a prompt word adds per latent frame (the stand-in DiT)


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.fixture(scope="module")
def vae():
    model = vae_from_variant("mu")
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 5, R, R, 3)))
    return VideoVAE(model, params)


# ---------------------------------------------------------------------------------------------
# The streaming causal decode
# ---------------------------------------------------------------------------------------------

def test_streamed_decode_equals_decode_chunked(vae, chunk=2, pieces=(2, 3, 1)):
    """A latent video pushed in pieces decodes, piece by piece, to `decode_chunked` of the whole
    (float rounding): the cache carries across pieces. The first piece gives 1 + 4(t - 1) frames,
    later ones 4t. Two latent frames a chunk: pieces end in scanned chunks and shorter tails
    (one latent frame a chunk, the Pipeline's, is tested through it below)."""
    z = _normal(0, (1, sum(pieces), 2, 2, C))
    whole = jax.jit(lambda p, z: vae_inference.decode_chunked(vae.model, p, z, chunk))(vae.params, z)
    stream = vae_inference.StreamDecoder(vae.model, vae.params, chunk)
    parts, start = [], 0
    for t in pieces:
        parts.append(np.asarray(stream.push(z[:, start:start + t])))
        start += t
    assert [p.shape[1] for p in parts] == [1 + 4 * (pieces[0] - 1)] + [4 * t for t in pieces[1:]]
    assert float(np.std(whole)) > 0.05
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, atol=1e-5)
    # The second piece's frames depend on the first piece (through the cache), not on it alone.
    fresh = vae_inference.StreamDecoder(vae.model, vae.params, chunk)
    fresh.push(jnp.zeros_like(z[:, :pieces[0]]))
    assert np.abs(np.asarray(fresh.push(z[:, pieces[0]:pieces[0] + pieces[1]])) - parts[1]).max() > 1e-3


def test_stream_decoder_uint8_and_checks(vae):
    z = _normal(1, (1, 3, 2, 2, C))
    stream = vae.stream_decoder()
    frames = np.concatenate([np.asarray(stream.push(z[:, :2])), np.asarray(stream.push(z[:, 2:]))], axis=1)
    assert frames.dtype == np.uint8
    assert np.abs(frames.astype(int) - vae.decode(z).astype(int)).max() <= 1  # one-pass decode, rounded
    with pytest.raises(ValueError, match="StreamDecoder.push: latent shape"):
        stream.push(z[..., :3])
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        vae_inference.StreamDecoder(vae.model, vae.params, chunk=0)


# ---------------------------------------------------------------------------------------------
# The task's sampler with context latents
# ---------------------------------------------------------------------------------------------

class _Seen:
    """A stand-in DiT (flow, x0-prediction) recording, per call, the full branch's x, c_image and
    c_mask; its output is c_image where the mask is 1, plus 1 + 0.1 x everywhere (so a frame that
    is not put back is not the context)."""

    def __init__(self, B):
        self.B, self.seen = B, []

    def apply(self, params, x, t, c_image, c_mask, tokens):
        jax.debug.callback(lambda *a: self.seen.append([np.asarray(v)[:self.B] for v in a]), x, c_image, c_mask)
        return c_image * c_mask + 1.0 + 0.1 * x


def _task(**changes):
    config = configs.load_config("experiments/base.py:runlocal")
    return build.task(configs.override(config, **{"diffusion.objective": "flow", "cond.noise": 0.0, **changes}))


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm++2m"])
def test_context_latents_are_shown_and_held_clean(sampler):
    """Context latents are keyframes at every step (mask 1, their latents in c_image) and, with
    first_frame='replace', clean in x at every model call and in the result; other frames are
    sampled. A keyframe slot elsewhere still works."""
    task = _task(**{"cond.first_frame": "replace"})
    B, h = 2, 1
    model = _Seen(B)
    z_context = _normal(2, (B, T, h, h, C))
    context = jnp.array([[True, True, False], [True, False, False]])
    z_keys = jnp.full((B, 1, h, h, C), 5.0)
    x = jax.jit(task.keyframe_sample, static_argnums=0, static_argnames=("steps", "sampler", "branches"))(
        model, None, _normal(3, (B, T, h, h, C)), z_keys, jnp.array([[T - 1]]), jnp.ones((B, 1), bool),
        jnp.full((B, 1), conditioning.ALWAYS, jnp.int32), jnp.zeros((B, 4), jnp.int32), jax.random.key(0),
        jnp.float32(1.0), jnp.float32(1.0), None, None, z_context, context, steps=3, sampler=sampler, branches=2)
    jax.effects_barrier()
    where = np.asarray(context)
    assert len(model.seen) >= 3
    for x_in, c_image, c_mask in model.seen:
        np.testing.assert_array_equal(c_mask[:, :, 0, 0, 0], where | (np.arange(T) == T - 1))
        np.testing.assert_array_equal(c_image[where], np.asarray(z_context)[where])
        np.testing.assert_array_equal(x_in[where], np.asarray(z_context)[where])  # clean at every call
    np.testing.assert_array_equal(np.asarray(x)[where], np.asarray(z_context)[where])
    assert not np.allclose(np.asarray(x)[~where], np.asarray(z_context)[~where], atol=0.1)
    # With noise on the instructions (training's), c_image is noised; x still holds them clean.
    noisy = _task(**{"cond.first_frame": "replace", "cond.noise": 0.1})
    model = _Seen(B)
    x = jax.jit(noisy.keyframe_sample, static_argnums=0, static_argnames=("steps", "sampler", "branches"))(
        model, None, _normal(3, (B, T, h, h, C)), z_keys, jnp.array([[T - 1]]), jnp.zeros((B, 1), bool),
        jnp.ones((B, 1), jnp.int32), jnp.zeros((B, 4), jnp.int32), jax.random.key(0), jnp.float32(1.0),
        jnp.float32(1.0), None, None, z_context, context, steps=2, sampler=sampler, branches=2)
    jax.effects_barrier()
    assert not np.allclose(model.seen[0][1][where], np.asarray(z_context)[where], atol=1e-3)
    np.testing.assert_array_equal(np.asarray(x)[where], np.asarray(z_context)[where])


def test_no_context_is_the_keyframe_sampler():
    """All-False context (clip 0 of a latent continuation) samples what keyframe_sample without
    context samples."""
    task = _task(**{"cond.first_frame": "replace", "cond.noise": 0.1})
    B, h = 1, 2
    args = (_Seen(B), None, _normal(4, (B, T, h, h, C)), _normal(5, (B, 2, h, h, C)), jnp.array([[T - 1, 0]]),
            jnp.ones((B, 2), bool), jnp.array([[1, conditioning.ALWAYS]], jnp.int32), jnp.zeros((B, 4), jnp.int32),
            jax.random.key(3), jnp.float32(2.0), jnp.float32(1.5))
    run = jax.jit(task.keyframe_sample, static_argnums=0, static_argnames=("steps", "sampler", "branches"))
    plain = run(*args, steps=2, sampler="heun", branches=3)
    none = run(*args, None, None, _normal(6, (B, T, h, h, C)), jnp.zeros((B, T), bool), steps=2, sampler="heun",
               branches=3)
    np.testing.assert_allclose(none, plain, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Pipeline.generate_clips(continuation='latent')
# ---------------------------------------------------------------------------------------------

class _ChainModel:
    """A stand-in DiT (flow, x0-prediction): where c_mask is 1 its output is c_image (+ 1, so a
    context latent that is not put back shows); elsewhere (1 + t) * STEP per prompt word at latent
    frame t. Counts its traces; records the full branch's c_mask and c_image per call."""

    def __init__(self):
        self.traces, self.seen = 0, []

    def apply(self, params, x, t, c_image, c_mask, tokens):
        self.traces += 1  # a Python side effect: runs when jit traces, not when it calls
        jax.debug.callback(lambda c, m: self.seen.append((np.asarray(c)[:1], np.asarray(m)[:1, :, 0, 0, 0])),
                           c_image, c_mask)
        words = jnp.sum(tokens[:, 1:] != 0, axis=1).astype(x.dtype)
        ramp = (1.0 + jnp.arange(x.shape[1], dtype=x.dtype))[None, :, None, None, None] * (words * STEP)[:, None,
                                                                                                         None, None,
                                                                                                         None]
        return jnp.where(c_mask > 0, c_image + 1.0, ramp)


def _pipeline(vae) -> Pipeline:
    config = configs.load_config("experiments/base.py:runlocal")
    config.data.resolution, config.data.num_frames = R, F
    config.cond.update(first_frame="replace", noise=0.0, context_frames=2)
    config.diffusion.objective = "flow"  # the stand-in DiT's
    # One Euler step from t = 1 lands on the model's x0 (then replacement); guidance 1: conditional.
    config.sample.update(steps=1, sampler="euler", guidance=1.0, image_guidance=1.0, tau=1)
    pipe = Pipeline(config, vae, _ChainModel(), None, build.text_conditioner(config),
                    LatentStats(np.zeros(C, np.float32), np.ones(C, np.float32)))
    return record_latents(pipe)  # every clip's sampled latents, in pipe.latents


@pytest.fixture(scope="module")
def pipe(vae):
    return _pipeline(vae)


def _image(value):
    return np.full((R, R, 3), value, np.uint8)


PROMPTS = ["a", "a red circle", "a red", "a red circle moves"]  # 1, 3, 2, 4 words


@pytest.mark.parametrize("K", [1, 2])
def test_latent_continuation(pipe, K):
    """Clip k + 1's latents 0..K-1 are clip k's last K, exactly (put back clean after the step);
    the denoiser sees them in c_image with mask 1 at 0..K-1 (clip 0: only its first frame); each
    clip follows its own prompt; F + (n - 1) 4(T - K) frames, which are the whole latent video
    decoded at once."""
    pipe.latents.clear()
    pipe.model.seen.clear()
    clips = list(pipe.generate_clips(PROMPTS, _image(100), num_clips=4, continuation="latent", context_latents=K))
    jax.effects_barrier()
    assert [c.shape for c in clips] == [(F, R, R, 3)] + [(4 * (T - K), R, R, 3)] * 3
    assert all(c.dtype == np.uint8 for c in clips)
    z = pipe.latents
    assert len(z) == 4 and len(pipe.model.seen) == 4  # one call per clip (one step, 2 branches batched)
    for k in range(1, 4):
        np.testing.assert_array_equal(z[k][:, :K], z[k - 1][:, T - K:])
        c_image, c_mask = pipe.model.seen[k]
        np.testing.assert_array_equal(c_mask[0], np.arange(T) < K)
        np.testing.assert_array_equal(c_image[:, :K], z[k - 1][:, T - K:])
        words = len(PROMPTS[k].split())
        np.testing.assert_allclose(z[k][0, K:, 0, 0, 0], (1 + np.arange(K, T)) * words * STEP, rtol=1e-6)
    np.testing.assert_array_equal(pipe.model.seen[0][1][0], np.arange(T) == 0)  # clip 0: its first frame
    # The streamed video is the concatenated latent video decoded at once (up to rounding).
    video = np.concatenate(clips)
    whole = np.concatenate([z[0]] + [zk[:, K:] for zk in z[1:]], axis=1)
    assert video.shape[0] == F + 3 * 4 * (T - K) == 1 + 4 * (whole.shape[1] - 1)
    assert np.abs(video.astype(int) - pipe.vae.decode(whole)[0].astype(int)).max() <= 1


def test_latent_continuation_compiles_once_and_keeps_reencode(pipe):
    """One compiled sampler for every clip of a latent continuation, any num_clips; clip 0 is the
    re-encode path's clip 0; continuation='reencode' is the default, bit for bit."""
    pipe.generate("a red", _image(60), num_clips=2, continuation="latent", context_latents=1)
    key = ("context", 1, "euler", 2) + tuple(pipe._static_settings().values())
    traces, compiled = pipe.model.traces, pipe._jitted[key]._cache_size()
    assert compiled == 1
    latent = pipe.generate(["a", "a red", "a red circle"], None, [None, _image(90), None], num_clips=3,
                           continuation="latent", context_latents=1, seed=2)
    assert pipe.model.traces == traces and pipe._jitted[key]._cache_size() == 1
    default = pipe.generate(["a", "a red", "a red circle"], None, [None, _image(90), None], num_clips=3, seed=2)
    reencode = pipe.generate(["a", "a red", "a red circle"], None, [None, _image(90), None], num_clips=3, seed=2,
                             continuation="reencode", context_latents=2)
    np.testing.assert_array_equal(reencode, default)
    assert default.shape[0] == F + 2 * (F - 1) and latent.shape[0] == F + 2 * 4 * (T - 1)
    assert np.abs(latent[:F].astype(int) - default[:F].astype(int)).max() <= 1  # clip 0: the same clip
    assert pipe._static_settings() == dict(shift=float(pipe.config.sample.shift), guidance_rescale=0.0)


def test_per_clip_last_frames_and_keyframes(pipe):
    """Later clips take their own last frame (no first frame needed) and keyframes after the context."""
    pipe.latents.clear()
    video = pipe.generate(["a", "a", "a"], _image(40), [None, _image(200), None], num_clips=3,
                          continuation="latent", context_latents=1, keyframes=[None, None, {8: _image(20)}])
    assert video.shape[0] == F + 2 * 4 * (T - 1)
    z_last = pipe.stats.normalise(pipe.vae.encode(_image(200)[None, None]))[0, 0]
    np.testing.assert_allclose(pipe.latents[1][0, T - 1], z_last + 1.0, rtol=1e-5, atol=1e-5)
    z_key = pipe.stats.normalise(pipe.vae.encode(_image(20)[None, None]))[0, 0]
    np.testing.assert_allclose(pipe.latents[2][0, 2], z_key + 1.0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(continuation="latents"), "continuation must be one of reencode, latent, got 'latents'"),
    (dict(continuation="latent", context_latents=0), r"context_latents must be an integer in \[1, 2\]"),
    (dict(continuation="latent", context_latents=3), r"context_latents must be an integer in \[1, 2\]"),
    (dict(continuation="latent", context_latents=1.5), "context_latents"),
    (dict(continuation="latent", context_latents=True), "context_latents"),
    (dict(continuation="latent", num_frames=1, num_clips=1), "needs clips of >= 2 latent frames"),
    (dict(continuation="latent", context_latents=2, keyframes=[None, {4: _image(1)}]),
     r"keyframes\[1\]: the keyframe at pixel frame 4 falls on latent frame 1, one of the 2 context"),
    (dict(continuation="latent", context_latents=1, keyframes=[None, {0: _image(1)}]), r"keyframes\[1\].*latent"),
])
def test_bad_continuation_fails_at_the_call(pipe, kwargs, match):
    args = dict(prompt="a", first_frame=_image(40), num_clips=2) | kwargs
    with pytest.raises(ValueError, match=match) as e:
        pipe.generate_clips(**args)  # not iterated
    assert "\n" not in str(e.value)


def test_context_latents_default_from_config(vae):
    pipe = _pipeline(vae)
    assert pipe.context_latents("latent", None, F, R, R) == 2
    pipe.config.cond.context_frames = 5
    with pytest.raises(ValueError, match=r"\[1, 2\].*got 5 \(from the workdir's config.cond.context_frames\)"):
        pipe.generate_clips("a", _image(40), num_clips=2, continuation="latent")


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def cli(monkeypatch, tmp_path_factory, vae):
    """Runs sample.main in-process on the stand-in pipeline; returns (exit status, stdout, stderr)."""
    yield from in_process_cli(monkeypatch, tmp_path_factory, _pipeline(vae))


def test_cli_latent_continuation(cli, capsys, tmp_path):
    out = tmp_path / "long.mp4"
    status, stdout, stderr = cli(capsys, "--prompts=a|a red|a", "--num_clips=3", "--continuation=latent",
                                 "--context_latents=2", f"--output={out}")
    assert status == 0, stderr
    n = F + 2 * 4 * (T - 2)  # (re-encoding: F + 2(F - 1); K = 1 would give as many)
    assert f"({n} frames" in stdout
    assert video_io.read_video(str(out)).shape == (n, R, R, 3)


@pytest.mark.parametrize("argv, message", [
    (["--continuation=latents"], "--continuation must be one of reencode, latent"),
    (["--context_latents=1"], "--context_latents needs --continuation=latent"),
    (["--continuation=latent", "--context_latents=0"], "--context_latents must be an integer >= 1"),
    (["--continuation=latent", "--context_latents=3"], r"--context_latents must be an integer in [1, 2]"),
])
def test_cli_continuation_errors(cli, capsys, tmp_path, argv, message):
    status, _, stderr = cli(capsys, "--prompt=a", "--num_clips=2", *argv, f"--output={tmp_path / 'x.mp4'}")
    assert status == 2
    assert stderr.startswith("error:") and message in stderr and len(stderr.strip().splitlines()) == 1
    assert not os.listdir(tmp_path)



def test_only_the_current_clip_is_held(pipe, monkeypatch):
    """Memory stays flat in num_clips: while clip k is consumed, no earlier clip's latents or frames
    are alive (only clip k's, the K carried latents on the host and the decoder's fixed-size cache)."""
    import collections
    import gc
    import weakref
    latents, frames_seen = [], []
    sample_batch = Pipeline._sample_batch.__get__(pipe)

    def recording(*args, **kwargs):
        z = sample_batch(*args, **kwargs)
        latents.append(weakref.ref(z))
        return z
    monkeypatch.setattr(pipe, "_sample_batch", recording)
    monkeypatch.setattr(pipe.model, "seen", collections.deque(maxlen=1))  # the stand-in's own record
    for k, frames in enumerate(pipe.generate_clips("a red", _image(40), num_clips=5, continuation="latent",
                                                   context_latents=1)):
        frames_seen.append(weakref.ref(frames))
        del frames
        gc.collect()
        assert len(latents) == k + 1
        assert [r() is None for r in latents[:-1]] == [True] * k, f"clip {k}: earlier latents held"
        assert [r() is None for r in frames_seen[:-1]] == [True] * k, f"clip {k}: earlier frames held"


def test_guidance_rescale_reaches_the_compiled_samplers(pipe):
    """config.sample.guidance_rescale, read at every call like shift: a change compiles its own
    sampler (in the cache key) and changes a guided video; back at 0 the first video again."""
    args = (["a", "a red circle"], _image(60))
    before = pipe.generate(*args, num_clips=2, continuation="latent", context_latents=1, seed=1, guidance=5.0)
    try:
        with pipe.config.unlocked():
            pipe.config.sample.guidance_rescale = 1.0
        rescaled = pipe.generate(*args, num_clips=2, continuation="latent", context_latents=1, seed=1, guidance=5.0)
        assert ("context", 1, "euler", 2, float(pipe.config.sample.shift), 1.0) in pipe._jitted
    finally:
        with pipe.config.unlocked():
            pipe.config.sample.guidance_rescale = 0.0
    assert np.abs(rescaled.astype(int) - before.astype(int)).max() > 0
    np.testing.assert_array_equal(pipe.generate(*args, num_clips=2, continuation="latent", context_latents=1, seed=1, guidance=5.0),
                                  before)
