"""config.sample.text_to_video (issue 19): 'first_frame', the paper's text-to-video route, samples
an example without a first frame twice: the text-only pass's frame 0, decoded and encoded again,
becomes the first-frame instruction of a second, image-to-video pass ('first_latent': its latent
frame 0 as it is). 'direct' is one pass.

The VAE is the runlocal one ('mu', random weights); the DiT is a stand-in (flow, x0 prediction,
one Euler step lands on its output) whose output shows what reached it. 16 x 16 frames, 9-frame
clips: 3 latent frames of 2 x 2 x 16.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixeldance import build, configs
from pixeldance.models.vae import vae_from_variant
from pixeldance.sample import Pipeline, VideoVAE
from pixeldance.workdir import LatentStats
from sample_cli import in_process_cli, record_latents

R, F, T, C = 16, 9, 3, 16
STEP = 0.1    # latent value a prompt word adds per latent frame
SHOWN = 10.0  # added to every latent frame the stand-in makes while a first frame is shown
GAIN = 1e-3   # of x in the stand-in's output: a pass's initial noise shows in what it makes


class _FirstFrameModel:
    """Where c_mask is 1 its output is c_image + 1; elsewhere (1 + t) * STEP per prompt word at
    latent frame t, plus SHOWN when latent 0 is shown (c_mask[:, 0] = 1), plus GAIN * x (the
    pass's noise at t = 1). Records each call's
    (c_image, c_mask) of the full branch."""

    def __init__(self):
        self.seen = []

    def apply(self, params, x, t, c_image, c_mask, tokens):
        jax.debug.callback(lambda c, m: self.seen.append((np.asarray(c), np.asarray(m)[:, :, 0, 0, 0])),
                           c_image, c_mask)
        words = jnp.sum(tokens[:, 1:] != 0, axis=1).astype(x.dtype)
        ramp = (1.0 + jnp.arange(x.shape[1], dtype=x.dtype))[None, :, None, None, None] * words[:, None, None, None,
                                                                                                 None] * STEP
        return jnp.where(c_mask > 0, c_image + 1.0, ramp + SHOWN * c_mask[:, :1] + GAIN * x)


@pytest.fixture(scope="module")
def vae():
    model = vae_from_variant("mu")
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 5, R, R, 3)))
    return VideoVAE(model, params)


def _pipeline(vae, **sample) -> Pipeline:
    config = configs.load_config("experiments/base.py:runlocal")
    config.data.resolution, config.data.num_frames = R, F
    config.cond.update(first_frame="replace", noise=0.0, context_frames=1)
    config.diffusion.objective = "flow"  # the stand-in's
    # One Euler step from t = 1 lands on the model's x0 (then replacement); guidance 1: conditional.
    config.sample.update(steps=1, sampler="euler", guidance=1.0, image_guidance=1.0, tau=1, **sample)
    pipe = Pipeline(config, vae, _FirstFrameModel(), None, build.text_conditioner(config),
                    LatentStats(np.zeros(C, np.float32), np.ones(C, np.float32)))
    return record_latents(pipe)  # every clip's sampled latents, in pipe.latents


def _image(value):
    return np.full((R, R, 3), value, np.uint8)


def _ramp(words):
    return (1 + np.arange(T)) * words * STEP


def _sampled(vae, route, prompts, firsts, seed=3) -> Pipeline:
    """A stand-in pipeline with route `route` after one generate_batch: model.seen holds that call's
    passes, latents[-1] its latents."""
    pipe = _pipeline(vae, text_to_video=route)
    pipe.model.seen.clear()
    pipe.generate_batch(prompts, firsts, seed=seed)
    jax.effects_barrier()
    return pipe


def test_first_latent_route(vae):
    """A batch of a text-only example and one with its own first frame: the text-only one is
    sampled again with the first pass's latent 0 as its first frame (shown at latent 0, held
    there), the other keeps its one pass; 'direct' samples each once."""
    pipe = _pipeline(vae, text_to_video="first_latent")
    prompts, firsts = ["a red", "a red circle"], [None, _image(90)]
    pipe.model.seen.clear()
    pipe.generate_batch(prompts, firsts, seed=3)
    jax.effects_barrier()
    z = pipe.latents[-1]
    assert len(pipe.model.seen) == 2  # two passes of the batch
    (c1, m1), (c2, m2) = pipe.model.seen
    np.testing.assert_array_equal(m1[:2], [[0, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(m2[:2], [[1, 0, 0], [1, 0, 0]])
    first_pass = _ramp(2)  # the text-only example's first pass: no frame shown
    np.testing.assert_allclose(c2[0, 0], pipe.latents[-1][0, 0])
    np.testing.assert_allclose(c2[0, 0, 0, 0], np.full(C, first_pass[0]), atol=5 * GAIN)
    # The result is the second pass (its frames made while a first frame is shown), latent 0 the
    # first pass's, held.
    np.testing.assert_allclose(z[0, :, 0, 0, 0], [first_pass[0], *(_ramp(2)[1:] + SHOWN)], atol=5 * GAIN)
    # The example with its own first frame: what 'direct' gives it in the same batch.
    direct = _pipeline(vae, text_to_video="direct")
    direct.model.seen.clear()
    direct.generate_batch(prompts, firsts, seed=3)
    jax.effects_barrier()
    assert len(direct.model.seen) == 1
    np.testing.assert_array_equal(z[1], direct.latents[-1][1])
    np.testing.assert_allclose(direct.latents[-1][0, :, 0, 0, 0], _ramp(2), atol=5 * GAIN)
    # The second pass draws its own noise: not the first pass's again.
    assert np.abs(z[0, 1:] - SHOWN - direct.latents[-1][0, 1:]).max() > GAIN / 10
    # The call's argument over the config's.
    direct.generate_batch(prompts, firsts, seed=3, text_to_video="first_latent")
    np.testing.assert_array_equal(direct.latents[-1], z)


def test_first_frame_route_reencodes_the_first_frame(vae):
    """'first_frame': the same two passes, the second shown the first pass's latent 0 decoded to
    a frame and encoded again (the VAE's own round trip, not the latent itself); the example with
    its own first frame is untouched."""
    prompts, firsts = ["a red", "a red circle"], [None, _image(90)]
    latent = _pipeline(vae, text_to_video="first_latent")
    latent.generate_batch(prompts, firsts, seed=3)
    jax.effects_barrier()
    z0 = latent.model.seen[1][0][0, 0]  # the first pass's latent 0 (identity latent statistics)
    pipe = _sampled(vae, "first_frame", prompts, firsts)
    assert len(pipe.model.seen) == 2
    (_, m1), (c2, m2) = pipe.model.seen
    np.testing.assert_array_equal(m1[:2], [[0, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(m2[:2], [[1, 0, 0], [1, 0, 0]])
    round_trip = vae.encode(vae.decode(z0[None, None]))[0, 0]
    np.testing.assert_allclose(c2[0, 0], round_trip, atol=1e-5)
    assert np.abs(round_trip - z0).max() > 0.1  # the round trip is not the identity here
    np.testing.assert_allclose(pipe.latents[-1][0, 0], round_trip, atol=1e-5)  # held at latent 0
    np.testing.assert_array_equal(pipe.latents[-1][1], latent.latents[-1][1])
    np.testing.assert_array_equal(c2[1], latent.model.seen[1][0][1])


def test_image_route_is_a_one_frame_pass_then_one_video_pass(vae):
    """'image': a one-frame text-only pass (no instruction shown to any row), its frame decoded
    and encoded again as the text-only example's first frame of the one video pass; the example
    with its own first frame gets exactly what 'direct' gives it."""
    prompts, firsts = ["a red", "a red circle"], [None, _image(90)]
    pipe = _sampled(vae, "image", prompts, firsts)
    assert len(pipe.model.seen) == 2
    (c1, m1), (c2, m2) = pipe.model.seen
    assert c1.shape[1] == 1  # one latent frame
    np.testing.assert_array_equal(m1[:2], [[0], [0]])
    np.testing.assert_array_equal(m2[:2], [[1, 0, 0], [1, 0, 0]])
    # The one-frame pass makes STEP per word (+ GAIN * its noise): its VAE round trip is shown.
    round_trip = vae.encode(vae.decode(jnp.full((1, 1, 2, 2, C), 2 * STEP)))[0, 0]
    assert np.abs(round_trip - 2 * STEP).max() > 0.1  # the round trip is not the identity here
    np.testing.assert_allclose(c2[0, 0], round_trip, atol=0.05)
    np.testing.assert_allclose(pipe.latents[-1][0, 0], c2[0, 0])  # held at latent 0
    direct = _sampled(vae, "direct", prompts, firsts)
    np.testing.assert_array_equal(c2[1], direct.model.seen[0][0][1])
    np.testing.assert_array_equal(pipe.latents[-1][1], direct.latents[-1][1])


def test_first_frames_given_is_one_pass(vae):
    pipe = _pipeline(vae, text_to_video="first_frame")
    pipe.model.seen.clear()
    video = pipe.generate_batch(["a", "a red"], [_image(20), _image(200)], seed=1)
    jax.effects_barrier()
    assert len(pipe.model.seen) == 1
    direct = _pipeline(vae, text_to_video="direct")
    np.testing.assert_array_equal(video, direct.generate_batch(["a", "a red"], [_image(20), _image(200)], seed=1))


def test_latent_continuation_passes_once_after_clip_0(vae):
    """Clip 0 of a long video from text alone takes the route; later clips have their context at
    latent 0 and are sampled once."""
    pipe = _pipeline(vae, text_to_video="first_frame")
    pipe.model.seen.clear()
    list(pipe.generate_clips("a red", None, num_clips=3, continuation="latent", context_latents=1))
    jax.effects_barrier()
    assert len(pipe.model.seen) == 4
    np.testing.assert_array_equal(np.concatenate([m[:1] for _, m in pipe.model.seen]), [[0, 0, 0]] + [[1, 0, 0]] * 3)


def test_old_workdir_config_is_direct(vae):
    pipe = _pipeline(vae, text_to_video="first_frame")
    with pipe.config.unlocked():
        del pipe.config.sample["text_to_video"]  # a config.json written before the setting
    assert pipe._settings(None, None, None, None, None, None)["text_to_video"] == "direct"


@pytest.mark.parametrize("where", ["call", "config"])
def test_bad_route_is_one_line(vae, where):
    pipe = _pipeline(vae, **({"text_to_video": "twice"} if where == "config" else {}))
    kwargs = {"text_to_video": "twice"} if where == "call" else {}
    with pytest.raises(ValueError, match="text_to_video must be one of direct, first_frame, first_latent, image, got 'twice'") as e:
        pipe.generate_batch(["a"], **kwargs)
    assert "\n" not in str(e.value)
    assert ("config.sample.text_to_video" in str(e.value)) == (where == "config")


@pytest.fixture
def cli(monkeypatch, tmp_path_factory, vae):
    """Runs sample.main in-process on the stand-in pipeline; returns (exit status, stdout, stderr)."""
    yield from in_process_cli(monkeypatch, tmp_path_factory, _pipeline(vae))


def test_cli_text_to_video(cli, capsys, tmp_path):
    status, _, stderr = cli(capsys, "--prompt=a red", "--text_to_video=first_frame", f"--output={tmp_path / 'a.mp4'}")
    assert status == 0, stderr
    status, _, stderr = cli(capsys, "--prompt=a red", "--text_to_video=twice", f"--output={tmp_path / 'b.mp4'}")
    assert status == 2 and len(stderr.strip().splitlines()) == 1
    assert "--text_to_video must be one of direct, first_frame, first_latent, image, got 'twice'" in stderr
    assert os.listdir(tmp_path) == ["a.mp4"]
