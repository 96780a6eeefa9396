"""`python -m pixeldance.sample`: every bad input is refused before any work, with one line.

Each refusal is exactly one stderr line `error: ...` naming the flag as written, exit status 2,
and no file left behind (no output, no `.tmp.mp4`). Instruction images of any bit depth and
with transparency, and prompts longer than the text encoder reads, are converted or cut with
one warning line. In-process on test_long_video's stand-in pipeline (no training), plus one
subprocess run of the real entry point.
"""
import logging
import os
import struct
import types
import zlib

import numpy as np
import pytest
from PIL import Image

from pixeldance import build, sample
from pixeldance import workdir as workdir_lib
from pixeldance.data import video_io
from test_long_video import C, R, _pipeline, cli  # noqa: F401  (cli: a fixture, sample.main on the stand-in)

STANDIN_STEPS = 1  # the stand-in workdir's config.sample.steps


def _files(root) -> set:
    return {os.path.relpath(os.path.join(d, n), root) for d, dirs, names in os.walk(root) for n in dirs + names}


class _StrictVAE:
    """The stand-in VAE with the real VAE's size rule (`build.latent_shape`: 1 + 4k frames,
    multiples of 8 pixels)."""

    def __init__(self, vae):
        self.vae = vae
        self.factors = types.SimpleNamespace(temporal_factor=4, spatial_factor=8, latent_channels=C)

    def latent_shape(self, num_frames, height, width):
        return build.latent_shape(self.factors, num_frames, height, width)

    def __getattr__(self, name):
        return getattr(self.vae, name)


@pytest.fixture
def loads(cli, monkeypatch):  # noqa: F811  (after `cli`, which makes the stand-in)
    """The stand-in pipeline of `cli` with the strict VAE; `loads.count`: load_pipeline calls."""
    pipe = sample.load_pipeline("")  # `cli` has made it the stand-in's
    pipe.vae = _StrictVAE(pipe.vae)
    counter = types.SimpleNamespace(count=0, pipe=pipe)

    def load(workdir):
        counter.count += 1
        return pipe

    monkeypatch.setattr(sample, "load_pipeline", load)
    return counter


PRE_LOAD = [  # refused from the flags (and the workdir's config.json) alone: nothing is loaded
    (["--guidance=nan"], "--guidance must be a finite number >= 0, got nan"),
    (["--guidance=inf"], "--guidance must be a finite number >= 0, got inf"),
    (["--guidance=-1"], "--guidance must be a finite number >= 0, got -1.0"),
    (["--image_guidance=nan"], "--image_guidance must be a finite number >= 0, got nan"),
    (["--image_guidance=-inf"], "--image_guidance must be a finite number >= 0, got -inf"),
    (["--image_guidance=-0.5"], "--image_guidance must be a finite number >= 0, got -0.5"),
    (["--steps=0"], "--steps must be an integer >= 1, got 0"),
    (["--steps=-3"], "--steps must be an integer >= 1, got -3"),
    (["--tau=-5"], f"--tau must be an integer in [0, {STANDIN_STEPS}] (0 to the workdir's config.sample.steps), "
                   f"got -5"),
    (["--tau=2"], f"--tau must be an integer in [0, {STANDIN_STEPS}] (0 to the workdir's config.sample.steps), "
                  f"got 2"),
    (["--steps=4", "--tau=5"], "--tau must be an integer in [0, 4] (0 to --steps), got 5"),
    (["--num_clips=0"], "--num_clips must be an integer >= 1, got 0"),
    (["--num_clips=-2"], "--num_clips must be an integer >= 1, got -2"),
    (["--height=0"], "--height must be an integer >= 1, got 0"),
    (["--width=-16"], "--width must be an integer >= 1, got -16"),
    (["--num_frames=0"], "--num_frames must be an integer >= 1, got 0"),
    (["--sampler=nope"], "--sampler must be one of euler, heun, dpm++2m, ddim, got 'nope'"),
]
ON_LOAD = [  # need the model's factors: refused after loading, before anything is sampled or written
    (["--height=24"], "--height does not fit the model: 24x16 pixels give 3x2 latents, which the DiT's 2x2 "
                      "patches do not tile: use multiples of 16"),
    (["--num_frames=6"], "--num_frames does not fit the model: 6 frames of 16x16 pixels do not compress by the "
                         "VAE's 4x8x8: frames must be 1 + 4k and height, width multiples of 8"),
    (["--width=12", "--height=20"], "--height and --width do not fit the model: 5 frames of 20x12 pixels do not "
                                    "compress by the VAE's 4x8x8: frames must be 1 + 4k and height, width "
                                    "multiples of 8"),
    (["--num_clips=2", "--num_frames=1"], "--num_clips > 1 needs --num_frames >= 5 (clips share a frame), got 1"),
]


@pytest.mark.parametrize("argv, message", PRE_LOAD + ON_LOAD, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
@pytest.mark.parametrize("ext", [".mp4", ".gif"])
def test_bad_setting_is_one_line_before_any_work(cli, loads, capsys, tmp_path, argv, message, ext):
    out = tmp_path / "out" / f"video{ext}"  # its folder is missing: nothing may create it either
    status, stdout, stderr = cli(capsys, "--prompt=a", *argv, f"--output={out}")
    assert (status, stdout, stderr) == (2, "", f"error: {message}\n")
    assert loads.count == (0 if (argv, message) in PRE_LOAD else 1)
    assert loads.pipe.vae.decodes == 0
    assert _files(tmp_path) == set()


def test_output_naming_a_folder(cli, loads, capsys, tmp_path):
    folder = tmp_path / "dir.mp4"
    folder.mkdir()
    status, stdout, stderr = cli(capsys, "--prompt=a", f"--output={folder}")
    assert (status, stdout, stderr) == (2, "", f"error: --output {folder} is a folder: give a .mp4 or .gif file path\n")
    assert loads.count == 0 and _files(tmp_path) == {"dir.mp4"}  # no dir.mp4.tmp.mp4


def test_writers_leave_no_partial_file_when_the_path_is_a_folder(tmp_path):
    """Past the checks (a folder made in between), the writers still clean up after themselves."""
    for name in ("v.mp4", "v.gif"):
        (tmp_path / name).mkdir()
    with pytest.raises(OSError):
        with video_io.Mp4Writer(str(tmp_path / "v.mp4")) as writer:
            writer.write(np.zeros((2, R, R, 3), np.uint8))
    with pytest.raises(OSError):
        video_io.write_gif(str(tmp_path / "v.gif"), np.zeros((2, R, R, 3), np.uint8))
    assert _files(tmp_path) == {"v.mp4", "v.gif"}


def test_output_under_a_file(cli, loads, capsys, tmp_path):
    """A file where --output's folder would be is refused; missing folders are made (mkdir -p),
    once the checks have passed."""
    (tmp_path / "notes").write_text("a file, not a folder")
    out = tmp_path / "notes" / "sub" / "v.mp4"
    status, stdout, stderr = cli(capsys, "--prompt=a", f"--output={out}")
    assert (status, stdout, stderr) == (2, "", f"error: --output {out}: {tmp_path / 'notes'} is a file, not a folder\n")
    assert loads.count == 0 and _files(tmp_path) == {"notes"}
    out = tmp_path / "a" / "b" / "v.mp4"
    status, stdout, stderr = cli(capsys, "--prompt=a", f"--output={out}")
    assert status == 0, stderr
    assert _files(tmp_path) == {"notes", "a", "a/b", "a/b/v.mp4"}


def test_the_real_entry_point_prints_one_line(python_runner, tmp_path):
    """`python -m pixeldance.sample` (absl's app.run) on a workdir with only config.json: the flags
    are refused before anything is loaded, so stderr is exactly the one line."""
    workdir = tmp_path / "wd"
    workdir_lib.write_config(str(workdir), _pipeline().config)
    out = tmp_path / "o.mp4"
    proc = python_runner("-m", "pixeldance.sample", f"--workdir={workdir}", "--prompt=a", "--guidance=nan",
                         f"--output={out}", timeout=120)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "error: --guidance must be a finite number >= 0, got nan\n"
    assert _files(tmp_path) == {"wd", "wd/config.json"}


# -- instruction images ------------------------------------------------------------------------


def _png16(path, array):
    """A 16-bit PNG (grey, grey + alpha, RGB or RGBA by the last axis), written by hand: Pillow
    writes 16 bits for single-channel images only."""
    a = np.asarray(array, np.uint16)
    height, width = a.shape[:2]
    colour_type = 0 if a.ndim == 2 else {2: 4, 3: 2, 4: 6}[a.shape[2]]
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in a)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


GRADIENT8 = np.arange(R * R).reshape(R, R) * 255 // (R * R - 1)  # 0..255 over the 16 x 16 pixels


def test_16_bit_png_reads_as_its_8_bit_version(tmp_path):
    """A 16-bit gradient, grey (Pillow's mode I;16) and RGB (48-bit), reads back as the 8-bit
    gradient within one level (scaled by 255/65535, not clipped to white)."""
    g16 = GRADIENT8 * 257  # the same gradient on 0..65535
    grey, rgb = str(tmp_path / "grey16.png"), str(tmp_path / "rgb48.png")
    Image.fromarray(g16.astype(np.uint16)).save(grey)
    with Image.open(grey) as im:
        assert im.mode.startswith("I")
    _png16(rgb, np.stack([g16, g16[::-1], g16.T], -1))
    for path, expected in ((grey, GRADIENT8[..., None].repeat(3, -1)),
                           (rgb, np.stack([GRADIENT8, GRADIENT8[::-1], GRADIENT8.T], -1))):
        image = video_io.read_image(path)
        assert image.dtype == np.uint8 and image.shape == (R, R, 3)
        assert np.abs(image.astype(int) - expected).max() <= 1, path
        assert np.mean(image == 255) < 0.05, path  # not squashed to white


def test_16_bit_first_frame_reaches_the_vae_as_8_bit(cli, capsys, tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray((GRADIENT8 * 257).astype(np.uint16)).save(str(path))
    pipe = sample.load_pipeline("")
    status, _, stderr = cli(capsys, "--prompt=a", f"--first_frame={path}", f"--output={tmp_path / 'v.mp4'}")
    assert status == 0, stderr
    first = pipe.vae.encoded[0][0, 0]
    assert np.abs(first.astype(int) - GRADIENT8[..., None]).max() <= 1


def _half_transparent(tmp_path, mode) -> tuple[str, np.ndarray]:
    """An image whose left half is transparent (alpha 0) and right half opaque; the RGB it
    should read as."""
    colour = np.zeros((R, R, 3), np.uint8)
    colour[..., 0], colour[..., 1], colour[..., 2] = 200, 120, 40
    alpha = np.full((R, R), 255, np.uint8)
    alpha[:, : R // 2] = 0
    path = str(tmp_path / f"{mode}.png")
    if mode == "RGBA":
        Image.fromarray(np.dstack([colour, alpha]), "RGBA").save(path)
        expected = colour.copy()
    elif mode == "LA":
        Image.fromarray(np.dstack([colour[..., 1], alpha]), "LA").save(path)
        expected = colour[..., 1:2].repeat(3, -1)
    else:  # a palette with a transparent entry
        index = (alpha == 255).astype(np.uint8)
        im = Image.fromarray(index, "P")
        im.putpalette([0, 0, 255] + [200, 120, 40] + [0, 0, 0] * 254)
        im.save(path, transparency=0)
        expected = colour.copy()
    expected[:, : R // 2] = 0
    with Image.open(path) as im:
        assert im.mode == mode
    return path, expected


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_black_with_a_warning(tmp_path, caplog, mode):
    path, expected = _half_transparent(tmp_path, mode)
    with caplog.at_level(logging.WARNING):
        image = video_io.read_image(path, name="--first_frame")
    np.testing.assert_array_equal(image, expected)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"--first_frame {path} has transparency (mode {mode}): composited on black (50.0 % of its "
                        f"pixels are not fully opaque)"]
    if mode == "RGBA":  # fully opaque: nothing is lost, nothing to say
        caplog.clear()
        opaque = str(tmp_path / "opaque.png")
        Image.fromarray(np.full((R, R, 4), 255, np.uint8), "RGBA").save(opaque)
        with caplog.at_level(logging.WARNING):
            assert video_io.read_image(opaque).min() == 255
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_transparent_first_frame_on_the_command_line(cli, capsys, caplog, tmp_path):
    path, expected = _half_transparent(tmp_path, "RGBA")
    pipe = sample.load_pipeline("")
    with caplog.at_level(logging.WARNING):
        status, _, stderr = cli(capsys, "--prompt=a", f"--first_frame={path}", f"--output={tmp_path / 'v.mp4'}")
    assert status == 0, stderr
    np.testing.assert_array_equal(pipe.vae.encoded[0][0, 0], expected)
    assert [r.getMessage() for r in caplog.records if "transparency" in r.getMessage()] == [
        f"--first_frame {path} has transparency (mode RGBA): composited on black (50.0 % of its pixels are not "
        f"fully opaque)"]


# -- prompts -----------------------------------------------------------------------------------


def test_over_long_prompt_is_cut_with_one_warning(cli, capsys, caplog, tmp_path):
    pipe = sample.load_pipeline("")
    limit = pipe.text.max_length  # 12 tokens: BOS and 11 words
    long_prompt = "a red circle moves left and a blue square moves up and a green triangle moves down"
    assert limit == 12 and len(long_prompt.split()) == 17  # BOS + 17 words: 6 tokens past the limit
    with caplog.at_level(logging.WARNING):
        status, _, stderr = cli(capsys, "--num_clips=2", f"--prompt={long_prompt}", f"--output={tmp_path / 'v.mp4'}")
    assert status == 0, stderr
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["prompt 'a red circle moves left and a blue square moves up and a ...' has 18 tokens, more "
                        "than the text encoder's 12: truncated, the last 6 dropped"]  # once, though two clips use it
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fits = " ".join(["red"] * (limit - 1))
        assert pipe.warn_long_prompts([fits]) == [0]
    assert not caplog.records


def test_tokenizers_count_past_max_length():
    from pixeldance.models import text
    for tok in (text.ByteTokenizer(4), text.HashedTokenizer(64, 4)):
        assert tok.num_tokens(["ab", "a b c d e f"]) == ([3, 12] if isinstance(tok, text.ByteTokenizer) else [2, 7])
        assert tok(["a b c d e f"]).shape == (1, 4)


def test_clip_tokenizer_counts_past_max_length(tmp_path):
    """A frozen encoder's tokenizer (the `tokenizers` path T5's tokenizer.json shares) counts what
    `tokenize` cuts, and `tokenize` still cuts and pads afterwards."""
    from feature_nets import write_clip_tokenizer
    from pixeldance.models import clip
    path = str(tmp_path / "tokenizer.json")
    write_clip_tokenizer(path)
    tok = clip.ClipTokenizer(path)
    texts = ["a red circle", "a red circle moves left " * 4]
    counts = tok.num_tokens(texts)
    _, mask = tok.tokenize(texts, 64)
    assert counts[0] == mask[0].sum() and counts[1] == mask[1].sum() > 9  # start and end tokens counted
    ids, mask = tok.tokenize(texts, 9)
    assert ids.shape == (2, 9) and mask[1].all() and mask[0].sum() == counts[0]


@pytest.mark.parametrize("field, value, message", [
    ("shift", 0.0, "shift must be a finite number > 0, got 0.0"),
    ("shift", -2.0, "shift must be a finite number > 0, got -2.0"),
    ("shift", float("inf"), "shift must be a finite number > 0, got inf"),
    ("text_to_video", "first", "text_to_video must be one of direct, first_frame, first_latent, image, got 'first'"),
    ("tau", -1, "tau must be an integer >= 0, got -1"),
    ("tau", 2.5, "tau must be an integer >= 0, got 2.5"),
    ("batch_size", 0, "batch_size must be an integer >= 1, got 0"),
    ("steps", 0, "steps must be an integer >= 1, got 0"),
    ("guidance", float("nan"), "guidance must be a finite number >= 0, got nan"),
    ("sampler", "eular", "sampler must be one of"),
    ("guidance_rescale", 1.5, "guidance_rescale must be a number in [0, 1], got 1.5"),
    ("weights", "last", "weights must be one of ema, train, got 'last'"),
])
def test_sample_config_is_checked_field_by_field(field, value, message):
    """`sample.check_sample_config`, what pixeldance.main runs on config.sample before its first
    stage: the shipped defaults pass, and each bad field is one line naming it."""
    from pixeldance import configs
    settings = dict(configs.load_config("experiments/shapes.py").sample)
    sample.check_sample_config(settings)  # the defaults (tau 10 above 8 steps is allowed)
    sample.check_sample_config({"shift": 0.5, "tau": 0})  # a sweep's partial setting
    with pytest.raises(ValueError, match="^config.sample." + message.replace("(", r"\(").replace("[", r"\[")):
        sample.check_sample_config({**settings, field: value})
    sample.check_sample_config({**settings, "guidance_rescale": 0.7})
