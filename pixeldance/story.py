r"""Stories: a long video from a storyboard file, segment by segment, streamed clip by clip.

A storyboard is a JSON (.json) or YAML (.yaml / .yml) file:

    first_frame: start.png          # optional; relative paths are read from the storyboard's folder
    seed: 0                         # optional, default 0
    continuation: reencode          # optional: reencode | latent (`Pipeline.generate_clips`)
    context_latents: 2              # optional, latent continuation only: K latents carried over
                                    #   (default the workdir's config.cond.context_frames)
    steps: 8                        # optional sampling settings, default the workdir's config.sample:
    guidance: 3.0                   #   steps, guidance, image_guidance, tau, sampler,
    num_frames: 17                  #   num_frames (F, per clip), height, width (default the
                                    #   training clip's)
    resize: false                   # true: images of another size are resized to the videos'
    segments:
      - prompt: a red circle moves right
        clips: 2                    # the segment's length, in clips (int >= 1)
        keyframes:                  # optional: {frame of the segment: image, or {path, tau}}
          16: mid.png               #   frame 16 of this segment's frames
          -1: {path: end.png, tau: 5}   # -1: the segment's last frame (where the next one starts)
      - prompt: a red circle moves left
        clips: 3

Every segment is `clips` clips of F frames, chained (`Pipeline.generate_clips`, one call for the
whole story with one prompt and one keyframe dict per clip), so the video is the segments' frames
one after the other. With F = 1 + tf (T - 1) (tf: the VAE's temporal factor, 4; T latent frames):

  continuation reencode (the default): the story's first clip yields F frames, every later clip
    F - 1 (its frame 0 is the previous clip's last frame, re-encoded). A segment of n clips has
    n (F - 1) frames, plus 1 if it is the first segment.
  continuation latent, K context latents: the first clip yields F frames, every later clip
    tf (T - K) (its first K latents are the previous clip's last K). A segment of n clips has
    n tf (T - K) frames, plus 1 + tf (K - 1) if it is the first segment.

Keyframes sit at frames of the segment: 0 is its first frame, negative ones count from its end.
Frame i of a segment is the frame q of the clip c that yields it, which is that clip's pixel frame
p = q + o (o = 0 for the story's first clip; for later clips o = 1 with reencode, 1 + tf (K - 1)
with latent continuation: the frames before are the carried ones). The clip takes the keyframe at
p as `generate_clips` does: at latent frame `conditioning.latent_index(p)` (p on a multiple of tf
exactly, others the nearest one, so the keyframe shows up to tf / 2 frames away). A position is
refused when that latent frame is not one the clip samples: latent 0 of a later clip (reencode:
the carried frame; so a later clip's first new frame takes no keyframe, its second does) or its
first K latents (latent: the context), latent 0 of the first clip when the storyboard has a
first_frame, and two keyframes on one latent frame of a clip. A keyframe at a segment's last frame
is the last frame of its last clip, which the next segment starts from.

    board = story.load_storyboard("story.yaml")      # everything checked, every image read once
    for frames in pipe.generate_story(board):        # uint8 [n, H, W, 3] per clip
        ...
    python -m pixeldance.sample --workdir=W --storyboard=story.yaml --output=story.mp4

Axis letters (pixeldance/models/__init__.py): F frames, H/W pixel height/width, T latent frames.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterator

import numpy as np

from pixeldance import cli
from pixeldance.data import video_io
from pixeldance.diffusion import conditioning, samplers

CONTINUATIONS = ("reencode", "latent")
_INT_SETTINGS = ("steps", "num_frames", "height", "width")
_FLOAT_SETTINGS = ("guidance", "image_guidance")
SETTINGS = (*_INT_SETTINGS, *_FLOAT_SETTINGS, "tau", "sampler")
_TOP = ("first_frame", "seed", "continuation", "context_latents", "resize", *SETTINGS, "segments")
OVERRIDES = ("seed", "continuation", "context_latents", "resize", *SETTINGS)


@dataclasses.dataclass(frozen=True, eq=False)
class Keyframe:
    """A keyframe image at `frame` of its segment (negative: from its end); tau None: the story's."""
    frame: int
    image: np.ndarray  # uint8 [H, W, 3], read-only
    path: str
    tau: int | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Segment:
    prompt: str
    clips: int
    keyframes: tuple[Keyframe, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class Storyboard:
    """A checked storyboard (`load_storyboard`); None settings: the pipeline's defaults."""
    path: str
    segments: tuple[Segment, ...]
    first_frame: np.ndarray | None = None  # uint8 [H, W, 3], read-only
    first_frame_path: str | None = None
    seed: int = 0
    continuation: str | None = None
    context_latents: int | None = None
    resize: bool = False
    settings: tuple[tuple[str, object], ...] = ()  # (name, value) of the sampling settings given

    @property
    def num_clips(self) -> int:
        return sum(s.clips for s in self.segments)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fail(path: str, message: str):
    raise ValueError(f"storyboard {path}: {message}")


def _read_file(path: str) -> dict:
    """The file's top-level mapping; a missing, unreadable or garbled file in one line."""
    if not path.endswith((".json", ".yaml", ".yml")):
        _fail(path, "must be a .json, .yaml or .yml file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        _fail(path, "no such file")
    except (OSError, UnicodeDecodeError) as e:
        _fail(path, f"cannot be read ({getattr(e, 'strerror', None) or e})")
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            _fail(path, f"not valid JSON: {e}")
    else:
        import yaml  # PyYAML, a dependency of ml_collections
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            _fail(path, f"not valid YAML: {' '.join(str(e).split())}")
    if not isinstance(data, dict):
        _fail(path, f"must hold a mapping of fields (first_frame, segments, ...), got {type(data).__name__}")
    return data


def _unknown(path: str, where: str, data: dict, known: tuple[str, ...]):
    extra = [k for k in data if k not in known]
    if extra:
        _fail(path, f"{where}unknown field {extra[0]!r} (known: {', '.join(known)})")


def _check_settings(prefix: str, *, seed=None, continuation=None, context_latents=None, resize=None,
                    sampling: dict | None = None):
    """Types and ranges of a story's settings (None: not given), one-line ValueErrors naming
    `prefix` + the setting: seed an int, continuation one of CONTINUATIONS, context_latents an
    int >= 1, resize a bool, sampling {name: value} as `samplers.check_settings` and tau an int >= 0."""
    if seed is not None and not _is_int(seed):
        raise ValueError(f"{prefix}seed must be an int, got {seed!r}")
    if continuation is not None and continuation not in CONTINUATIONS:
        raise ValueError(f"{prefix}continuation must be one of {', '.join(CONTINUATIONS)}, got {continuation!r}")
    if context_latents is not None and not (_is_int(context_latents) and context_latents >= 1):
        raise ValueError(f"{prefix}context_latents must be an int >= 1, got {context_latents!r}")
    if resize is not None and not isinstance(resize, bool):
        raise ValueError(f"{prefix}resize must be true or false, got {resize!r}")
    sampling = sampling or {}
    for name in _INT_SETTINGS:  # bools and 8.0 are numbers to check_settings, not a file's ints
        if name in sampling and not _is_int(sampling[name]):
            raise ValueError(f"{prefix}{name} must be an integer >= 1, got {sampling[name]!r}")
    for name in _FLOAT_SETTINGS:
        if name in sampling and (isinstance(sampling[name], bool) or not isinstance(sampling[name], (int, float))):
            raise ValueError(f"{prefix}{name} must be a finite number >= 0, got {sampling[name]!r}")
    if "tau" in sampling and not (_is_int(sampling["tau"]) and sampling["tau"] >= 0):
        raise ValueError(f"{prefix}tau must be an int >= 0, got {sampling['tau']!r}")
    samplers.check_settings(prefix, **{k: v for k, v in sampling.items() if k != "tau"})


def load_storyboard(path: str) -> Storyboard:
    """The storyboard file at `path` (module docstring), checked: unknown or mistyped fields, a
    missing segment field, clips < 1, keyframe frames that are not ints, a tau < 0, images that
    cannot be read: each a one-line ValueError `storyboard PATH: FIELD ...`. Every image is read
    once (`video_io.read_image`), paths relative to the storyboard's folder. Positions against the
    clips and image sizes against the videos are checked by `generate_story`, which knows them."""
    data = _read_file(path)
    _unknown(path, "", data, _TOP)
    sampling = {k: data[k] for k in SETTINGS if data.get(k) is not None}
    _check_settings(f"storyboard {path}: ", seed=data.get("seed"), continuation=data.get("continuation"),
                    context_latents=data.get("context_latents"), resize=data.get("resize"), sampling=sampling)
    if data.get("context_latents") is not None and data.get("continuation") != "latent":
        _fail(path, "context_latents needs continuation: latent")
    folder, images = os.path.dirname(os.path.abspath(path)), {}

    def image(field: str, value) -> tuple[np.ndarray, str]:
        if not isinstance(value, str) or not value:
            _fail(path, f"{field} must be an image path, got {value!r}")
        file = os.path.join(folder, os.path.expanduser(value))
        if file not in images:  # a file used twice is read once
            try:
                images[file] = video_io.read_image(file, name=f"storyboard {path}: {field}")
            except (OSError, ValueError) as e:
                _fail(path, f"{field}: {cli.first_line(e)}")
            images[file].flags.writeable = False
        return images[file], value

    first, first_path = None, None
    if data.get("first_frame") is not None:
        first, first_path = image("first_frame", data["first_frame"])
    raw = data.get("segments")
    if not isinstance(raw, list) or not raw:
        _fail(path, f"segments must be a non-empty list of segments (prompt, clips, keyframes), got {raw!r}")
    segments = []
    for s, seg in enumerate(raw):
        where = f"segments[{s}]"
        if not isinstance(seg, dict):
            _fail(path, f"{where} must be a mapping with prompt, clips and optional keyframes, got {seg!r}")
        _unknown(path, f"{where}: ", seg, ("prompt", "clips", "keyframes"))
        if not isinstance(seg.get("prompt"), str):
            _fail(path, f"{where}.prompt must be a string, got {seg.get('prompt')!r}")
        if not (_is_int(seg.get("clips")) and seg["clips"] >= 1):
            _fail(path, f"{where}.clips must be an int >= 1, got {seg.get('clips')!r}")
        keys = seg.get("keyframes") or {}
        if not isinstance(keys, dict):
            _fail(path, f"{where}.keyframes must be a mapping {{frame: image path or {{path, tau}}}}, got {keys!r}")
        keyframes, seen = [], {}
        for frame, value in keys.items():
            field = f"{where}.keyframes[{frame}]"
            if isinstance(frame, str) and re.fullmatch(r"-?\d+", frame.strip()):  # JSON keys are strings
                frame = int(frame)
            if not _is_int(frame):
                _fail(path, f"{field}: the frame must be an int (negative: from the segment's end), got {frame!r}")
            if frame in seen:
                _fail(path, f"{field}: frame {frame} is given twice")
            seen[frame] = True
            tau = None
            if isinstance(value, dict):
                _unknown(path, f"{field}: ", value, ("path", "tau"))
                tau = value.get("tau")
                if tau is not None and not (_is_int(tau) and tau >= 0):
                    _fail(path, f"{field}.tau must be an int >= 0, got {tau!r}")
                img, file = image(f"{field}.path", value.get("path"))
            else:
                img, file = image(field, value)
            keyframes.append(Keyframe(frame, img, file, tau))
        segments.append(Segment(seg["prompt"], seg["clips"], tuple(keyframes)))
    return Storyboard(path, tuple(segments), first, first_path, data.get("seed", 0) or 0, data.get("continuation"),
                      data.get("context_latents"), bool(data.get("resize", False)), tuple(sorted(sampling.items())))


def clip_frames(clip: int, *, num_frames: int, latent_frames: int, continuation: str = "reencode",
                context_latents: int = 1) -> tuple[int, int]:
    """(o, n): clip `clip` of a story yields its pixel frames o .. o + n - 1 (module docstring):
    (0, F) for clip 0; (1, F - 1) for later ones with reencode; (1 + tf (K - 1), tf (T - K)) with
    latent continuation (K = context_latents, T = latent_frames, tf = (F - 1) / (T - 1))."""
    F, T = num_frames, latent_frames
    if clip == 0:
        return 0, F
    if continuation == "reencode":
        return 1, F - 1
    tf = (F - 1) // (T - 1)
    return 1 + tf * (context_latents - 1), tf * (T - context_latents)


def plan(board: Storyboard, *, num_frames: int, latent_frames: int, steps: int, continuation: str = "reencode",
         context_latents: int = 1) -> tuple[list[str], list[dict | None]]:
    """The story as `generate_clips` takes it: (one prompt per clip, one keyframe dict per clip,
    None or {pixel frame of the clip: image or (image, tau)}). Keyframe positions are mapped and
    refused as the module docstring says, keyframe taus checked against `steps`: one-line
    ValueErrors naming the storyboard's field."""
    F, T, K = num_frames, latent_frames, context_latents
    tf = (F - 1) // (T - 1) if T > 1 else 1
    if continuation == "latent" and K >= T:
        _fail(board.path, f"context_latents must be below the clips' {T} latent frames, got {K}")
    prompts, keyframes, clip = [], [], 0
    for s, seg in enumerate(board.segments):
        spans = [clip_frames(clip + j, num_frames=F, latent_frames=T, continuation=continuation,
                             context_latents=K) for j in range(seg.clips)]
        length = sum(n for _, n in spans)
        prompts += [seg.prompt] * seg.clips
        mine = [{} for _ in range(seg.clips)]
        taken = {}
        for kf in seg.keyframes:
            field = f"segments[{s}].keyframes[{kf.frame}]"
            i = kf.frame + length if kf.frame < 0 else kf.frame
            if not 0 <= i < length:
                _fail(board.path, f"{field}: the segment has {length} frames (0 to {length - 1}, or {-length} to -1)")
            j, q = 0, i
            while q >= spans[j][1]:
                q, j = q - spans[j][1], j + 1
            p = q + spans[j][0]
            latent = conditioning.latent_index(p, F, tf)
            if clip + j == 0:
                lowest, why = (1, "the storyboard's first_frame") if board.first_frame is not None else (0, "")
            elif continuation == "reencode":
                lowest, why = 1, "the previous clip's last frame"
            else:
                lowest, why = K, f"context carried from the previous clip (its latent frames 0 to {K - 1})"
            if latent < lowest:
                first_ok = next(x for x in range(F) if conditioning.latent_index(x, F, tf) >= lowest)
                _fail(board.path, f"{field}: frame {i} of the segment is pixel {p} of clip {clip + j}, nearest latent "
                                  f"frame {latent}, which is {why}: keyframes of that clip sit at its pixels >= "
                                  f"{first_ok}, frames >= {i - p + first_ok} of the segment")
            if (j, latent) in taken:
                _fail(board.path, f"{field} and keyframes[{taken[j, latent]}] both fall on latent frame {latent} "
                                  f"of clip {clip + j} (keyframes sit at pixel frames 0, {tf}, {2 * tf}, ... of a "
                                  f"clip)")
            taken[j, latent] = kf.frame
            if kf.tau is not None and kf.tau > steps:
                _fail(board.path, f"{field}.tau must be an int in [0, {steps}] (0 to the sampling steps), got {kf.tau}")
            mine[j][p] = kf.image if kf.tau is None else (kf.image, kf.tau)
        keyframes += [m or None for m in mine]
        clip += seg.clips
    return prompts, keyframes


def _sized(board: Storyboard, image: np.ndarray, field: str, H: int, W: int, resize: bool) -> np.ndarray:
    if image.shape[:2] == (H, W):
        return image
    if not resize:
        _fail(board.path, f"{field} is {image.shape[1]}x{image.shape[0]}, the videos are {W}x{H} (width x "
                          f"height; set resize: true to resize the images)")
    from PIL import Image  # as video_io.read_image resizes
    return np.asarray(Image.fromarray(image).resize((W, H), Image.BILINEAR), np.uint8)


def _resized(board: Storyboard, H: int, W: int, resize: bool) -> Storyboard:
    """The storyboard with every image H x W (resized when `resize`, else refused in one line)."""
    first = None if board.first_frame is None else _sized(board, board.first_frame, "first_frame", H, W, resize)
    segments = tuple(dataclasses.replace(seg, keyframes=tuple(
        dataclasses.replace(kf, image=_sized(board, kf.image, f"segments[{s}].keyframes[{kf.frame}]", H, W, resize))
        for kf in seg.keyframes)) for s, seg in enumerate(board.segments))
    return dataclasses.replace(board, first_frame=first, segments=segments)


def generate_story(pipe, storyboard: Storyboard | str, **overrides) -> Iterator[np.ndarray]:
    """A storyboard (a `Storyboard`, or a file path for `load_storyboard`) -> its video as uint8
    frame chunks [n, H, W, 3], one per clip (`pipe.generate_clips`: one call, one prompt and one
    keyframe dict per clip; `clip_frames` says how many frames each is).

    overrides: seed, continuation, context_latents, resize and the sampling settings (steps,
    guidance, image_guidance, tau, sampler, num_frames, height, width), replacing the
    storyboard's; None: the storyboard's. continuation / context_latents are passed to
    generate_clips only when set. Everything is checked at the call, before any clip is sampled
    (one-line ValueErrors naming the storyboard's field or the override). Only the current clip
    is held: memory does not grow with the number of segments."""
    board = storyboard if isinstance(storyboard, Storyboard) else load_storyboard(storyboard)
    bad = [k for k in overrides if k not in OVERRIDES]
    if bad:
        raise TypeError(f"generate_story() got an unexpected keyword argument {bad[0]!r} (settings: "
                        f"{', '.join(OVERRIDES)})")
    given = {k: v for k, v in overrides.items() if v is not None}
    _check_settings("", **{k: given.get(k) for k in ("seed", "continuation", "context_latents", "resize")},
                    sampling={k: v for k, v in given.items() if k in SETTINGS})
    s = dict(board.settings) | {k: v for k, v in given.items() if k in SETTINGS}
    settings = pipe._settings(s.get("num_frames"), s.get("steps"), s.get("guidance"), s.get("tau"), s.get("sampler"),
                              s.get("image_guidance"), s.get("height"), s.get("width"), num_clips=board.num_clips,
                              prefix=f"storyboard {board.path}: ")
    choice = {k: given.get(k, getattr(board, k)) for k in ("seed", "continuation", "context_latents", "resize")}
    if choice["continuation"] != "latent" and "context_latents" not in given:
        choice["context_latents"] = None  # the file's K goes with the file's latent continuation
    if choice["context_latents"] is not None and choice["continuation"] != "latent":
        raise ValueError(f"context_latents needs continuation 'latent', got {choice['continuation']!r}")
    F, H, W = settings["num_frames"], settings["height"], settings["width"]
    board = _resized(board, H, W, choice["resize"])
    K = choice["context_latents"] or _default_context_latents(pipe)
    prompts, keyframes = plan(board, num_frames=F, latent_frames=pipe.vae.latent_shape(F, H, W)[0],
                              steps=settings["steps"], continuation=choice["continuation"] or "reencode",
                              context_latents=K)
    passed = {k: choice[k] for k in ("continuation", "context_latents") if choice[k] is not None}
    return pipe.generate_clips(prompts, board.first_frame, None, num_clips=board.num_clips, seed=choice["seed"],
                               keyframes=keyframes, **settings, **passed)


def _default_context_latents(pipe) -> int:
    """generate_clips' K when latent continuation is asked without context_latents."""
    return pipe.config.cond.get("context_frames", 2)
