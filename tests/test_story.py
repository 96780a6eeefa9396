"""Stories (pixeldance/story.py): storyboard files, keyframe positions, per-clip prompts, the CLI
and flat memory, on the long-video tests' stand-in pipeline (no training)."""
import dataclasses
import json
import tracemalloc

import numpy as np
import pytest
import yaml

from pixeldance import story
from pixeldance.data import video_io
from test_long_video import F, R, _image, _pipeline, cli  # noqa: F401  (cli: a fixture, sample.main on the stand-in)

BOARD = {
    "first_frame": "first.png",
    "seed": 3,
    "steps": 1,
    "segments": [
        {"prompt": "a", "clips": 2, "keyframes": {"-1": "mid.png"}},
        {"prompt": "a red", "clips": 1, "keyframes": {"3": {"path": "end.png", "tau": 1}}},
    ],
}


@pytest.fixture
def folder(tmp_path):
    """tmp_path with first.png, mid.png, end.png (16 x 16, the stand-in's size), big.png (32 x 32)."""
    for name, value in (("first", 40), ("mid", 140), ("end", 200)):
        video_io.write_image(str(tmp_path / f"{name}.png"), _image(value))
    video_io.write_image(str(tmp_path / "big.png"), np.full((32, 32, 3), 90, np.uint8))
    return tmp_path


def _write(folder, board, name="s.json") -> str:
    path = folder / name
    if name.endswith(".json"):
        path.write_text(json.dumps(board))
    else:
        path.write_text(yaml.safe_dump(board) if isinstance(board, dict) else board)
    return str(path)


def _fields(board: story.Storyboard) -> dict:
    """The storyboard as plain values (arrays as lists), path left out: comparable with ==."""
    d = dataclasses.asdict(board)
    del d["path"]
    return json.loads(json.dumps(d, default=lambda a: a.tolist()))


def test_json_and_yaml_give_the_same_storyboard(folder):
    from_json = story.load_storyboard(_write(folder, BOARD))
    as_yaml = """
first_frame: first.png
seed: 3
steps: 1
segments:
  - prompt: a
    clips: 2
    keyframes: {-1: mid.png}
  - prompt: a red
    clips: 1
    keyframes:
      3: {path: end.png, tau: 1}
"""
    from_yaml = story.load_storyboard(_write(folder, as_yaml, "s.yaml"))
    assert _fields(from_json) == _fields(from_yaml)
    assert from_yaml.num_clips == 3 and from_yaml.seed == 3 and from_yaml.settings == (("steps", 1),)
    np.testing.assert_array_equal(from_yaml.first_frame, _image(40))  # read relative to the file's folder
    kf = from_yaml.segments[1].keyframes[0]
    assert (kf.frame, kf.path, kf.tau) == (3, "end.png", 1)
    np.testing.assert_array_equal(kf.image, _image(200))
    assert from_yaml.segments[0].keyframes[0].frame == -1


BAD = [  # (what to change in BOARD: a function of a copy, the error's text after 'storyboard PATH: ')
    (lambda b: b["segments"][1].update(clips=0), "segments[1].clips must be an int >= 1, got 0"),
    (lambda b: b["segments"][0].update(clips="2"), "segments[0].clips must be an int >= 1, got '2'"),
    (lambda b: b["segments"][0].update(clips=True), "segments[0].clips must be an int >= 1, got True"),
    (lambda b: b["segments"][0].pop("prompt"), "segments[0].prompt must be a string, got None"),
    (lambda b: b["segments"][0].update(promt="x"), "segments[0]: unknown field 'promt'"),
    (lambda b: b.update(stpes=3), "unknown field 'stpes'"),
    (lambda b: b.pop("segments"), "segments must be a non-empty list"),
    (lambda b: b.update(segments=[]), "segments must be a non-empty list"),
    (lambda b: b["segments"].__setitem__(0, "a"), "segments[0] must be a mapping"),
    (lambda b: b["segments"][0].update(keyframes=["mid.png"]), "segments[0].keyframes must be a mapping"),
    (lambda b: b["segments"][0].update(keyframes={"x": "mid.png"}),
     "segments[0].keyframes[x]: the frame must be an int"),
    (lambda b: b["segments"][1]["keyframes"]["3"].update(tau=-1), "segments[1].keyframes[3].tau must be an int >= 0"),
    (lambda b: b["segments"][1]["keyframes"]["3"].update(tua=1), "segments[1].keyframes[3]: unknown field 'tua'"),
    (lambda b: b["segments"][1]["keyframes"]["3"].pop("path"), "segments[1].keyframes[3].path must be an image path"),
    (lambda b: b["segments"][0].update(keyframes={"4": "nope.png"}), "segments[0].keyframes[4]: image not found"),
    (lambda b: b["segments"][0].update(keyframes={"4": "junk.png"}), "segments[0].keyframes[4]: cannot read image"),
    (lambda b: b.update(first_frame=7), "first_frame must be an image path, got 7"),
    (lambda b: b.update(seed="x"), "seed must be an int"),
    (lambda b: b.update(continuation="pixel"), "continuation must be one of reencode, latent"),
    (lambda b: b.update(continuation="latent", context_latents=0), "context_latents must be an int >= 1"),
    (lambda b: b.update(context_latents=1), "context_latents needs continuation: latent"),
    (lambda b: b.update(resize="yes"), "resize must be true or false"),
    (lambda b: b.update(steps=0), "steps must be an integer >= 1, got 0"),
    (lambda b: b.update(num_frames=8.5), "num_frames must be an integer >= 1, got 8.5"),
    (lambda b: b.update(guidance=-1), "guidance must be a finite number >= 0"),
    (lambda b: b.update(image_guidance="2"), "image_guidance must be a finite number >= 0"),
    (lambda b: b.update(tau=-1), "tau must be an int >= 0"),
    (lambda b: b.update(sampler="rk4"), "sampler must be one of"),
]


@pytest.mark.parametrize("change, message", BAD, ids=[m.split(" ")[0] for _, m in BAD])
def test_bad_storyboards_are_one_line_errors_naming_the_field(folder, change, message):
    (folder / "junk.png").write_bytes(b"\x00 not a png \xff" * 8)
    board = json.loads(json.dumps(BOARD))
    change(board)
    path = _write(folder, board)
    with pytest.raises(ValueError) as e:
        story.load_storyboard(path)
    assert str(e.value).startswith(f"storyboard {path}: {message}"), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name, text, message", [
    ("s.yaml", "segments: [prompt: a\n  - : :", "not valid YAML"),
    ("s.json", "{segments: []}", "not valid JSON"),
    ("s.yaml", "- prompt: a\n  clips: 1\n", "must hold a mapping of fields"),
    ("s.txt", "segments: []", "must be a .json, .yaml or .yml file"),
])
def test_bad_files_are_one_line_errors(folder, name, text, message):
    path = folder / name
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        story.load_storyboard(str(path))
    assert str(e.value).startswith(f"storyboard {path}: {message}") and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="no such file"):
        story.load_storyboard(str(folder / "missing.yaml"))


def _board(*segments, first=True) -> story.Storyboard:
    """A Storyboard of (clips, {frame: tau or None}) segments, every image a blank."""
    blank = np.zeros((R, R, 3), np.uint8)
    return story.Storyboard("s.yaml", tuple(
        story.Segment(f"p{s}", clips, tuple(story.Keyframe(f, blank, "k.png", tau) for f, tau in keys.items()))
        for s, (clips, keys) in enumerate(segments)), first_frame=blank if first else None)


def _positions(board, **kwargs):
    """{clip: sorted pixel frames with a keyframe} of `story.plan` on 17-frame clips (5 latents)."""
    prompts, keyframes = story.plan(board, num_frames=17, latent_frames=5, steps=8, **kwargs)
    assert len(prompts) == len(keyframes) == board.num_clips
    return {c: sorted(k) for c, k in enumerate(keyframes) if k}


def test_keyframe_positions_map_to_clips_and_pixels():
    # reencode: clip 0 yields its 17 frames, later clips pixels 1..16: segment 0 is frames 0..32.
    board = _board((2, {16: None, 20: None, -1: None}), (2, {1: None, -1: 2}))
    assert _positions(board) == {0: [16], 1: [4, 16], 2: [2], 3: [16]}
    # latent, K = 2: later clips yield pixels 5..16 (their latents 2..4): segment 0 is 17 + 12 frames.
    board = _board((2, {19: None, -1: None}), (1, {3: None}))
    assert _positions(board, continuation="latent", context_latents=2) == {1: [7, 16], 2: [8]}
    assert _positions(_board((1, {0: None}), first=False)) == {0: [0]}  # no first_frame: a keyframe may be one
    _, keyframes = story.plan(_board((1, {8: 3, 12: None})), num_frames=17, latent_frames=5, steps=8)
    assert isinstance(keyframes[0][8], tuple) and keyframes[0][8][1] == 3 and isinstance(keyframes[0][12], np.ndarray)


@pytest.mark.parametrize("segments, kwargs, message", [
    ([(2, {0: None})], {}, "segments[0].keyframes[0]: frame 0 of the segment is pixel 0 of clip 0, nearest latent "
                           "frame 0, which is the storyboard's first_frame"),
    ([(1, {}), (1, {0: None})], {}, "segments[1].keyframes[0]: frame 0 of the segment is pixel 1 of clip 1, nearest "
                                    "latent frame 0, which is the previous clip's last frame: keyframes of that clip "
                                    "sit at its pixels >= 2, frames >= 1 of the segment"),
    ([(1, {}), (1, {0: None})], dict(continuation="latent", context_latents=2),
     "segments[1].keyframes[0]: frame 0 of the segment is pixel 5 of clip 1, nearest latent frame 1, which is context "
     "carried from the previous clip (its latent frames 0 to 1): keyframes of that clip sit at its pixels >= 6, "
     "frames >= 1 of the segment"),
    ([(2, {33: None})], {}, "segments[0].keyframes[33]: the segment has 33 frames (0 to 32, or -33 to -1)"),
    ([(1, {}), (2, {-33: None})], {}, "segments[1].keyframes[-33]: the segment has 32 frames"),
    ([(1, {7: None, 8: None})], {}, "segments[0].keyframes[8] and keyframes[7] both fall on latent frame 2 of clip 0"),
    ([(1, {8: 9})], {}, "segments[0].keyframes[8].tau must be an int in [0, 8]"),
    ([(1, {})], dict(continuation="latent", context_latents=5), "context_latents must be below the clips' 5"),
])
def test_positions_a_clip_cannot_take_are_refused(segments, kwargs, message):
    with pytest.raises(ValueError) as e:
        _positions(_board(*segments), **kwargs)
    assert str(e.value).startswith(f"storyboard s.yaml: {message}"), str(e.value)
    assert "\n" not in str(e.value)


def test_generate_story_chains_the_segments_and_places_the_keyframes(folder):
    """The real chain on the stand-in: keyframes at the last pixel of a clip come out exactly."""
    pipe = _pipeline()
    path = _write(folder, BOARD)
    chunks = list(pipe.generate_story(path))
    assert [len(c) for c in chunks] == [F, F - 1, F - 1]  # 5-frame clips: 2 in segment 0, 1 in segment 1
    video = np.concatenate(chunks)
    np.testing.assert_array_equal(video[0], _image(40))  # first_frame
    np.testing.assert_array_equal(video[8], _image(140))  # segment 0's frame -1: clip 1's last
    np.testing.assert_array_equal(video[12], _image(200))  # segment 1's frame 3: clip 2's pixel 4
    # The same clips as generate with per-clip prompts and keyframes, and the storyboard's seed.
    same = pipe.generate(["a", "a", "a red"], _image(40), num_clips=3, seed=3, steps=1,
                         keyframes=[None, {4: _image(140)}, {4: (_image(200), 1)}])
    np.testing.assert_array_equal(video, same)


class _Spy:
    """Stands in for pipe.generate_clips: records its arguments, yields the frames it would."""

    def __init__(self, pipe, monkeypatch):
        self.calls, self.pipe = [], pipe
        monkeypatch.setattr(pipe, "generate_clips", self)

    def __call__(self, prompt, first_frame, last_frame, *, num_clips, num_frames, height, width, seed, keyframes,
                 **kwargs):
        self.calls.append(dict(prompt=prompt, first_frame=first_frame, last_frame=last_frame, num_clips=num_clips,
                               seed=seed, keyframes=keyframes, num_frames=num_frames, **kwargs))
        T = self.pipe.vae.latent_shape(num_frames, height, width)[0]
        K = kwargs.get("context_latents") or 1
        for k in range(num_clips):
            n = story.clip_frames(k, num_frames=num_frames, latent_frames=T,
                                  continuation=kwargs.get("continuation", "reencode"), context_latents=K)[1]
            yield np.full((n, height, width, 3), k, np.uint8)  # a fresh array each clip


def test_generate_story_passes_per_clip_prompts_and_keyframes(folder, monkeypatch):
    pipe = _pipeline()
    spy = _Spy(pipe, monkeypatch)
    board = story.load_storyboard(_write(folder, BOARD))
    assert [len(c) for c in story.generate_story(pipe, board)] == [F, F - 1, F - 1]
    call = spy.calls[-1]
    assert call["prompt"] == ["a", "a", "a red"] and call["num_clips"] == 3 and call["seed"] == 3
    assert call["steps"] == 1 and call["last_frame"] is None
    np.testing.assert_array_equal(call["first_frame"], _image(40))
    kf = call["keyframes"]
    assert kf[0] is None and list(kf[1]) == [4] and list(kf[2]) == [4] and kf[2][4][1] == 1
    assert "continuation" not in call and "context_latents" not in call  # passed only when set
    # Overrides replace the storyboard's settings (None: the storyboard's); latent continuation is passed on.
    list(story.generate_story(pipe, board, seed=5, steps=None, guidance=2.0, continuation="latent",
                              context_latents=1))
    call = spy.calls[-1]
    assert (call["seed"], call["steps"], call["guidance"]) == (5, 1, 2.0)
    assert (call["continuation"], call["context_latents"]) == ("latent", 1)
    with pytest.raises(TypeError, match="prompt"):
        story.generate_story(pipe, board, prompt="b")
    with pytest.raises(ValueError, match="steps"):
        story.generate_story(pipe, board, steps=0)


def test_latent_continuation_counts_frames_per_segment(folder, monkeypatch):
    """Latent continuation from the file: 17-frame clips, K = 2: 17 then 12 frames a clip."""
    pipe = _pipeline()
    spy = _Spy(pipe, monkeypatch)
    board = dict(BOARD, num_frames=17, continuation="latent", context_latents=2, segments=[
        {"prompt": "a", "clips": 2, "keyframes": {"19": "mid.png"}}, {"prompt": "b", "clips": 2}])
    chunks = list(pipe.generate_story(_write(folder, board)))
    assert [len(c) for c in chunks] == [17, 12, 12, 12]
    call = spy.calls[-1]
    assert (call["continuation"], call["context_latents"]) == ("latent", 2) and list(call["keyframes"][1]) == [7]
    # Overriding the continuation drops the file's context_latents, which go with its latent continuation.
    chunks = list(pipe.generate_story(_write(folder, board), continuation="reencode"))
    assert [len(c) for c in chunks] == [17, 16, 16, 16]
    assert spy.calls[-1]["continuation"] == "reencode" and "context_latents" not in spy.calls[-1]


def test_images_of_another_size_are_refused_or_resized(folder):
    pipe = _pipeline()
    board = dict(BOARD, segments=[{"prompt": "a", "clips": 1, "keyframes": {"4": "big.png"}}])
    path = _write(folder, board)
    with pytest.raises(ValueError) as e:
        pipe.generate_story(path)
    assert str(e.value) == (f"storyboard {path}: segments[0].keyframes[4] is 32x32, the videos are 16x16 (width x "
                            f"height; set resize: true to resize the images)")
    video = np.concatenate(list(pipe.generate_story(path, resize=True)))
    np.testing.assert_array_equal(video[4], np.full((R, R, 3), 90))  # the keyframe, resized, at the clip's end


def _peak(pipe, board) -> int:
    """tracemalloc's peak over iterating generate_story (the spy yields a fresh clip each step)."""
    tracemalloc.start()
    try:
        for frames in story.generate_story(pipe, board, height=128, width=128):
            del frames
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_segments(monkeypatch):
    pipe = _pipeline()
    _Spy(pipe, monkeypatch)
    clip = F * 128 * 128 * 3  # bytes of one clip
    peaks = [_peak(pipe, _board(*[(2, {})] * n, first=False)) for n in (2, 8)]
    assert peaks[1] < peaks[0] + clip / 2, peaks  # 12 more clips, not even half a clip more memory
    assert peaks[1] < 3 * clip, peaks


def test_cli_writes_a_story_clip_by_clip(cli, capsys, folder, monkeypatch):  # noqa: F811
    writes = []

    class Recording(video_io.Mp4Writer):
        def write(self, frames):
            writes.append(len(frames))
            super().write(frames)

    monkeypatch.setattr(video_io, "Mp4Writer", Recording)
    out = folder / "out" / "story.mp4"
    status, stdout, stderr = cli(capsys, f"--storyboard={_write(folder, BOARD, 's.yaml')}", f"--output={out}")
    assert status == 0, stderr
    assert f"{out} (13 frames, 16x16)" in stdout
    assert writes == [F, F - 1, F - 1]  # one clip per write: the video is never held whole
    video = video_io.read_video(str(out))
    assert video.shape == (13, R, R, 3)
    # Flags override the file's settings: 9-frame clips.
    status, stdout, stderr = cli(capsys, f"--storyboard={_write(folder, BOARD, 's.yaml')}", "--num_frames=9",
                                 f"--output={out}")
    assert status == 0 and "(25 frames" in stdout, stderr


@pytest.mark.parametrize("argv, board, message", [
    (["--prompt=a"], BOARD, "--storyboard sets the prompts, the first frame and the clips: drop --prompt"),
    (["--first_frame=first.png", "--num_clips=2"], BOARD, "drop --num_clips and --first_frame"),
    ([], dict(BOARD, segments=[{"prompt": "a", "clips": 0}]), "segments[0].clips must be an int >= 1, got 0"),
    ([], dict(BOARD, segments=[{"prompt": "a", "clips": 1, "keyframes": {"5": "end.png"}}]),
     "segments[0].keyframes[5]: the segment has 5 frames"),
    (["--steps=2"], dict(BOARD, segments=[{"prompt": "a", "clips": 1, "keyframes": {"4": {"path": "end.png",
                                                                                          "tau": 3}}}]),
     "segments[0].keyframes[4].tau must be an int in [0, 2]"),
])
def test_cli_refuses_bad_storyboards(cli, capsys, folder, argv, board, message):  # noqa: F811
    path = _write(folder, board, "s.yaml")
    out = folder / "out"
    status, stdout, stderr = cli(capsys, f"--storyboard={path}", *argv, f"--output={out / 'x.mp4'}")
    assert status == 2
    assert stderr.startswith("error: ") and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()
