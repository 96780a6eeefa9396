"""Long videos: clips chained on their boundary frames, with stand-in DiT and VAE (no training).

The stand-ins make every decoded pixel an exact function of the instructions and the prompt, so
a long video can be checked frame by frame against single clips made with plain `generate`.
"""
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pixeldance import build, configs
from pixeldance.data import video_io
from pixeldance.sample import Pipeline
from pixeldance.workdir import LatentStats
from sample_cli import in_process_cli

R, F, C = 16, 5, 3  # 16 x 16 frames, 5-frame clips (2 latent frames of 2 x 2 x 3)
STEP = 8  # pixel values a prompt's latent frame advances per word


class _BlockVAE:
    """A stand-in VAE: a latent pixel is an 8 x 8 block's mean / 255 (frames 0, 4, 8, ...: 1 + 4k
    frames -> 1 + k latents); decoding repeats each latent pixel over its block and interpolates
    linearly between latent frames. Blockwise-constant images come back unchanged from
    decode(encode(.)). Records its encode inputs and counts its decodes."""

    def __init__(self):
        self.encoded, self.decodes = [], 0

    def latent_shape(self, num_frames, height, width):
        return 1 + (num_frames - 1) // 4, height // 8, width // 8, C

    def encode(self, video):
        self.encoded.append(np.array(video))
        v = np.asarray(video)[:, ::4].astype(np.float32) / 255
        B, T, H, W, _ = v.shape
        return v.reshape(B, T, H // 8, 8, W // 8, 8, C).mean(axis=(3, 5))

    def decode(self, z):
        self.decodes += 1
        z = np.asarray(z, np.float32)
        frames = [z[:, 0]] + [z[:, t - 1] + (z[:, t] - z[:, t - 1]) * q / 4
                              for t in range(1, z.shape[1]) for q in (1, 2, 3, 4)]
        v = np.stack(frames, 1).repeat(8, axis=2).repeat(8, axis=3)
        return np.clip(np.round(v * 255), 0, 255).astype(np.uint8)


class _ChainModel:
    """A stand-in DiT (flow, x0-prediction): latent frame t is the first-frame instruction plus
    t * STEP / 255 per prompt word; a last-frame instruction replaces the last latent frame;
    plus `noise` times x_t (so with noise > 0 the result depends on the seed). Counts its traces."""

    def __init__(self, noise=0.0):
        self.noise, self.traces = noise, 0

    def apply(self, params, x, t, c_image, c_mask, tokens):
        self.traces += 1  # a Python side effect: runs when jit traces, not when it calls
        words = jnp.sum(tokens[:, 1:] != 0, axis=1).astype(x.dtype)
        per_frame = (words * STEP / 255)[:, None, None, None, None]
        ramp = jnp.arange(x.shape[1], dtype=x.dtype)[None, :, None, None, None] * per_frame
        x0 = c_image[:, :1] * c_mask[:, :1] + ramp
        x0 = x0.at[:, -1].set(jnp.where(c_mask[:, -1] > 0, c_image[:, -1], x0[:, -1]))
        return x0 + self.noise * x


def _pipeline(noise=0.0) -> Pipeline:
    config = configs.load_config("experiments/base.py:runlocal")
    config.data.resolution, config.data.num_frames = R, F
    config.cond.first_frame, config.cond.noise = "concat", 0.0
    config.diffusion.objective = "flow"  # the stand-in DiT's
    # One Euler step from t = 1 lands on the model's x0; guidance 1 is the conditional prediction.
    config.sample.update(steps=1, sampler="euler", guidance=1.0, image_guidance=1.0, tau=1)
    return Pipeline(config, _BlockVAE(), _ChainModel(noise), None, build.text_conditioner(config),
                    LatentStats(np.zeros(C, np.float32), np.ones(C, np.float32)))


def _image(value):
    """A blockwise-constant uint8 [R, R, 3] image: value + a per-block offset."""
    blocks = value + np.arange(4 * C).reshape(2, 2, C)
    return blocks.repeat(8, axis=0).repeat(8, axis=1).astype(np.uint8)


def test_clips_chain_on_their_boundary_frames():
    """Clip k is the single clip from the frame where clip k - 1 ended, with clip k's prompt and last frame."""
    pipe = _pipeline()
    first, mid_last = _image(40), _image(140)
    prompts = ["a", "a red circle", "a red"]  # 1, 3 and 2 words
    lasts = [None, mid_last, None]
    video = pipe.generate(prompts, first, lasts, num_clips=3)
    assert video.shape == (F + 2 * (F - 1), R, R, 3) and video.dtype == np.uint8
    # The boundary frames, by the stand-ins' arithmetic: each clip ends one latent step on.
    np.testing.assert_array_equal(video[0], first)
    np.testing.assert_array_equal(video[4], first + 1 * STEP)
    np.testing.assert_array_equal(video[8], mid_last)
    np.testing.assert_array_equal(video[12], mid_last + 2 * STEP)
    # No frame is repeated: a duplicated boundary would show as two equal neighbours.
    assert all(np.any(video[i] != video[i + 1]) for i in range(len(video) - 1))
    for k in range(3):
        start = first if k == 0 else video[4 * k]
        clip = pipe.generate(prompts[k], start, lasts[k])
        np.testing.assert_array_equal(video[4 * k:4 * k + F], clip, err_msg=f"clip {k}")


def test_the_carried_frame_is_re_encoded_by_the_vae():
    pipe = _pipeline()
    video = pipe.generate("a red", _image(40), num_clips=3)
    encoded = pipe.vae.encoded  # one call per clip: [first, last] as one-frame videos
    assert len(encoded) == 3
    for k in range(3):
        np.testing.assert_array_equal(encoded[k][0, 0], video[4 * k])


def test_one_last_frame_ends_the_final_clip_and_needs_no_first_frame():
    pipe = _pipeline()
    end = _image(200)
    video = pipe.generate("a", None, end, num_clips=2)
    assert video.shape[0] == F + F - 1
    np.testing.assert_array_equal(video[0], 0)  # no first frame: the stand-in starts from zero
    np.testing.assert_array_equal(video[4], np.full((R, R, 3), STEP))  # clip 0 had no last frame
    np.testing.assert_array_equal(video[-1], end)
    with pytest.raises(ValueError, match="first frame"):  # one clip: PixelDance's rule holds
        pipe.generate("a", None, end)


def test_seeds_one_clip_and_the_first_clip_equal_plain_generate():
    pipe = _pipeline(noise=0.1)
    first, last = _image(40), _image(100)
    plain = pipe.generate_batch(["a red"], [first], [last], seed=3)[0]
    np.testing.assert_array_equal(pipe.generate("a red", first, last, num_clips=1, seed=3), plain)
    long = pipe.generate("a red", first, num_clips=3, seed=3)
    np.testing.assert_array_equal(long[:F], pipe.generate("a red", first, seed=3))
    np.testing.assert_array_equal(pipe.generate("a red", first, num_clips=3, seed=3), long)  # deterministic
    assert np.any(pipe.generate("a red", first, num_clips=3, seed=4)[F:] != long[F:])
    # Clip 1 draws its own noise, not clip 0's: the same start with seed 3's key gives other frames.
    assert np.any(long[F:2 * F - 1] != pipe.generate("a red", long[F - 1], seed=3)[1:])


def _compiled(pipe) -> int:
    """How many programs the pipeline's jitted samplers hold."""
    return sum(f._cache_size() for f in pipe._jitted.values())


def test_the_sampler_compiles_once_for_any_number_of_clips():
    pipe = _pipeline()
    pipe.generate("a", _image(40))
    traces = pipe.model.traces
    assert traces > 0 and _compiled(pipe) == 1
    # Other prompts, no first frame in clip 0, a last frame in some clips: the same shapes.
    pipe.generate(["a", "a red", "a red circle", "a"], None, [None, _image(90), None, _image(10)], num_clips=4)
    assert pipe.model.traces == traces and _compiled(pipe) == 1


def test_generate_clips_samples_one_clip_per_step():
    pipe = _pipeline()
    clips = pipe.generate_clips("a red", _image(40), num_clips=3)
    assert pipe.vae.decodes == 0  # nothing sampled before iterating
    shapes = []
    for n, frames in enumerate(clips, start=1):
        assert pipe.vae.decodes == n
        shapes.append(frames.shape)
    assert shapes == [(F, R, R, 3), (F - 1, R, R, 3), (F - 1, R, R, 3)]


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_clips=0), "num_clips"),
    (dict(prompt=["a", "a red"], num_clips=3), "prompt"),
    (dict(last_frame=[None, None], num_clips=3), "last_frame"),
    (dict(last_frame=[None, np.zeros((8, 8, 3), np.uint8)], num_clips=2), "last_frame"),
    (dict(first_frame=None, last_frame=[_image(9), None], num_clips=2), "first frame"),
    (dict(num_frames=1, num_clips=2), "num_frames"),
    (dict(sampler="nope", num_clips=2), "sampler"),
])
def test_bad_arguments_fail_at_the_call(kwargs, name):
    """One-line errors naming the argument, raised before any clip is sampled."""
    pipe = _pipeline()
    args = dict(prompt="a", first_frame=_image(40)) | kwargs
    with pytest.raises(ValueError, match=name) as e:
        pipe.generate_clips(**args)  # not iterated
    assert "\n" not in str(e.value)
    assert pipe.vae.decodes == 0


def test_mp4_writer_streams_and_removes_a_partial_file(tmp_path):
    path = str(tmp_path / "v.mp4")
    with video_io.Mp4Writer(path) as writer:
        writer.write(np.zeros((3, R, R, 3), np.uint8))
        writer.write(np.full((2, R, R, 3), 200, np.uint8))
    assert writer.num_frames == 5 and not os.path.exists(path + ".tmp.mp4")
    video = video_io.read_video(path)
    assert video.shape == (5, R, R, 3)
    assert video[:3].max() < 20 and video[3:].min() > 180
    bad = str(tmp_path / "bad.mp4")
    with pytest.raises(RuntimeError):
        with video_io.Mp4Writer(bad) as writer:
            writer.write(np.zeros((2, R, R, 3), np.uint8))
            raise RuntimeError("sampling failed")
    assert not os.path.exists(bad) and not os.path.exists(bad + ".tmp.mp4")


def test_gif_keeps_small_objects_colours_at_every_scale(tmp_path):
    """video_io.encode_gif: each frame quantized to its own palette, enlarged by `scale` pixel for
    pixel; a small coloured object on a noisy background keeps its colour (Pillow's default
    median cut had moved such pixels by up to 191 levels)."""
    rng = np.random.default_rng(0)
    video = np.clip(rng.normal(120, 25, (6, 20, 28, 3)), 0, 255).astype(np.uint8)
    for k in range(6):  # a 3 x 3 magenta square moving right, a cyan one moving down
        video[k, 4:7, 2 + 3 * k:5 + 3 * k] = (255, 0, 255)
        video[k, 2 + 2 * k:5 + 2 * k, 20:23] = (0, 255, 255)
    for scale in (1, 3):
        path = str(tmp_path / f"v{scale}.gif")
        video_io.write_gif(path, video, scale=scale)
        with Image.open(path) as gif:
            frames = []
            for i in range(gif.n_frames):
                gif.seek(i)
                frames.append(np.asarray(gif.convert("RGB")).astype(int))
        want = video.repeat(scale, axis=1).repeat(scale, axis=2).astype(int)
        got = np.stack(frames)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 16 and np.abs(got - want).mean() < 4


@pytest.fixture
def cli(monkeypatch, tmp_path_factory):
    """Runs sample.main in-process on a stand-in pipeline; returns (exit status, stdout, stderr).
    The workdir holds the stand-in's config.json only (main checks the flags against it first)."""
    yield from in_process_cli(monkeypatch, tmp_path_factory, _pipeline())


def test_cli_writes_long_mp4_and_gif(cli, capsys, tmp_path):
    out = tmp_path / "long.mp4"
    status, stdout, stderr = cli(capsys, "--num_clips=3", "--prompts=a| a red |a red circle", f"--output={out}")
    assert status == 0, stderr
    assert f"{out} (13 frames" in stdout
    assert video_io.read_video(str(out)).shape == (F + 2 * (F - 1), R, R, 3)
    last = tmp_path / "last.png"
    video_io.write_image(str(last), _image(120))
    gif = tmp_path / "long.gif"
    status, _, stderr = cli(capsys, "--prompt=a", "--num_clips=2", f"--last_frame={last}", f"--output={gif}")
    assert status == 0, stderr  # with several clips a last frame needs no first frame
    with Image.open(gif) as g:
        assert g.n_frames == F + F - 1


@pytest.mark.parametrize("argv, name", [
    (["--num_clips=2", "--prompts=a|b|c"], "--prompts"),
    (["--prompt=a", "--prompts=a|b", "--num_clips=2"], "--prompts"),
    (["--num_clips=0"], "--num_clips"),
])
def test_cli_errors(cli, capsys, tmp_path, argv, name):
    status, _, stderr = cli(capsys, *argv, f"--output={tmp_path / 'x.mp4'}")
    assert status == 2
    assert stderr.startswith("error:") and name in stderr and len(stderr.strip().splitlines()) == 1
    assert not os.listdir(tmp_path)
