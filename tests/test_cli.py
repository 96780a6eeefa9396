"""`python -m pixeldance.sample` against the runlocal workdir: outputs and one-line errors."""
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from pixeldance.data import synthetic, video_io

PROMPT = "a red circle moves left"


def sample(python_runner, workdir, *flags):
    return python_runner("-m", "pixeldance.sample", f"--workdir={workdir}", f"--prompt={PROMPT}", *flags)


def assert_one_line_error(proc, *names):
    """Non-zero exit; the message is one line `error: ...` naming the input (no traceback)."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert proc.stderr.rstrip().splitlines()[-1] == errors[0]
    for name in names:
        assert name in errors[0], errors[0]


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Instruction images: first.png / last.png of a held-out clip (32 x 32), big.png (48 x 48)."""
    d = tmp_path_factory.mktemp("frames")
    video = synthetic.ShapesSource("heldout", size=1,
                                   config=synthetic.WorldConfig(num_frames=9, resolution=32))[0]["video"]
    video_io.write_image(str(d / "first.png"), video[0])
    video_io.write_image(str(d / "last.png"), video[-1])
    Image.fromarray(video[0]).resize((48, 48)).save(str(d / "big.png"))
    (d / "x.png").write_bytes(b"\x00garbage, not a png\xff" * 8)
    return d


def test_writes_mp4(python_runner, runlocal_workdir, frames, tmp_path):
    out = tmp_path / "out" / "video.mp4"
    proc = sample(python_runner, runlocal_workdir, f"--first_frame={frames / 'first.png'}", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(out) in proc.stdout
    video = video_io.read_video(str(out))
    assert video.shape == (9, 32, 32, 3) and video.dtype == np.uint8
    assert not os.path.exists(str(out) + ".tmp.mp4")


def test_writes_gif_with_resize_and_last_frame(python_runner, runlocal_workdir, frames, tmp_path):
    out = tmp_path / "video.gif"
    proc = sample(python_runner, runlocal_workdir, f"--first_frame={frames / 'big.png'}",
                  f"--last_frame={frames / 'last.png'}", "--resize", "--num_frames=5", "--steps=2",
                  "--seed=3", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Image.open(out) as gif:
        assert gif.format == "GIF" and gif.n_frames == 5
        assert gif.size == (4 * 32, 4 * 32)  # upscaled 4x for viewing


@pytest.mark.parametrize("case", ["no_workdir", "no_checkpoint"])
def test_missing_workdir_or_checkpoint(python_runner, runlocal_workdir, tmp_path, case):
    workdir = tmp_path / "wd"
    if case == "no_checkpoint":
        workdir.mkdir()
        shutil.copy(os.path.join(runlocal_workdir, "config.json"), workdir / "config.json")
    proc = sample(python_runner, workdir, f"--output={tmp_path / 'o.mp4'}")
    assert_one_line_error(proc, str(workdir))
    assert not (tmp_path / "o.mp4").exists()


def test_unreadable_image(python_runner, runlocal_workdir, frames, tmp_path):
    proc = sample(python_runner, runlocal_workdir, f"--first_frame={frames / 'x.png'}", f"--output={tmp_path / 'o.mp4'}")
    assert_one_line_error(proc, str(frames / "x.png"))


def test_missing_image(python_runner, runlocal_workdir, tmp_path):
    proc = sample(python_runner, runlocal_workdir, f"--first_frame={tmp_path / 'nope.png'}",
                  f"--output={tmp_path / 'o.mp4'}")
    assert_one_line_error(proc, str(tmp_path / "nope.png"))


def test_wrong_size_image_without_resize(python_runner, runlocal_workdir, frames, tmp_path):
    proc = sample(python_runner, runlocal_workdir, f"--first_frame={frames / 'first.png'}",
                  f"--last_frame={frames / 'big.png'}", f"--output={tmp_path / 'o.mp4'}")
    assert_one_line_error(proc, str(frames / "big.png"), "48x48", "--resize")
    assert not (tmp_path / "o.mp4").exists()


def test_last_frame_needs_first_frame(python_runner, runlocal_workdir, frames, tmp_path):
    proc = sample(python_runner, runlocal_workdir, f"--last_frame={frames / 'last.png'}",
                  f"--output={tmp_path / 'o.mp4'}")
    assert_one_line_error(proc, "--last_frame", "--first_frame")


def test_bad_output_extension(python_runner, runlocal_workdir, tmp_path):
    proc = sample(python_runner, runlocal_workdir, f"--output={tmp_path / 'o.avi'}")
    assert_one_line_error(proc, str(tmp_path / "o.avi"), ".mp4")
    assert not (tmp_path / "o.avi").exists()


def test_non_square_videos(python_runner, runlocal_workdir, frames, tmp_path):
    """--height / --width: a 16 x 48 video from a model trained on 32 x 32 clips, the instruction
    image resized to it."""
    out = tmp_path / "wide.mp4"
    proc = sample(python_runner, runlocal_workdir, "--height=16", "--width=48", f"--first_frame={frames / 'big.png'}",
                  "--resize", "--steps=2", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "48x16" in proc.stdout
    assert video_io.read_video(str(out)).shape == (9, 16, 48, 3)


@pytest.mark.parametrize("flags, names", [(("--height=20",), ("20x32", "multiples of 8")),
                                          (("--height=8", "--width=24"), ("8x24", "multiples of 16")),
                                          (("--width=0",), ("--width",))])
def test_sizes_the_models_cannot_make(python_runner, runlocal_workdir, tmp_path, flags, names):
    proc = sample(python_runner, runlocal_workdir, *flags, f"--output={tmp_path / 'o.mp4'}")
    assert_one_line_error(proc, *names)
    assert not (tmp_path / "o.mp4").exists()
