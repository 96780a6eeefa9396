"""Faithfulness of generated shapes-world videos to their caption and frame instructions.

The shapes world (`pixeldance/data/synthetic.py`) is known exactly, so a generated clip can be
checked without any pretrained network:
- colour: the object's pixels (far from the background) are nearest to the asked colour;
- direction: the object's centroid moves from its first to its last visible frame along the
  asked direction, by at least R/8 and by more than across it;
- consistency: the object is visible in every frame and its area stays within [0.5, 2] x its
  median area (it does not vanish, split or melt);
- shape: how much of its bounding box the object fills (median over the frames where it is
  off the border): a square fills all of it, a circle about pi/4, a triangle half
  (`shape_of_fill`);
- first/last-frame fidelity: PSNR of generated frame 0 / frame -1 against the instruction;
- smoothness: the object's mean centroid step across the VAE's latent-group boundaries over its
  mean step inside groups (1.0 for the world's constant-velocity clips; a VAE that decodes motion
  in steps at its group boundaries scores above 1). See `smoothness_from_centroids`.

Results are reported per mode (T2V, I2V, FLF2V) over seen and held-out combinations.
Image coordinates: x = column ('right' = +x), y = row ('down' = +y). Pure numpy.
"""

import math

import numpy as np

from pixeldance.data.synthetic import COLOUR_RGB, parse_caption

PSNR_CAP = 100.0  # dB; identical images would be +inf, which poisons means.
MODES = ("T2V", "I2V", "FLF2V")
GROUPS = ("seen", "heldout", "all")

# Object pixels differ from the background by >= 195 in some channel (a primary has a 255
# channel, the background is <= 60), so 80 leaves a wide margin for generated noise.
FOREGROUND_THRESHOLD = 80
AREA_BAND = (0.5, 2.0)  # allowed frame area / median area for a consistent object

# Smoothness. GROUP_FRAMES is the temporal compression of the causal VAEs this evaluator's videos
# come from: every causal variant of models/vae.py's size table halves time twice
# (temporal_factor 4) and so does the Wan 2.1 VAE. Callers that hold a VAE pass its own
# `temporal_factor` (the evaluators in samples.py and reconstruction.py do).
GROUP_FRAMES = 4
# Below this mean centroid step (pixels per frame, over every counted step) the object is taken as
# still and the ratio is None: for a still object both means are decoder jitter and their ratio
# is 0/0 noise (the main job's VAE, 48 held-out first frames repeated 17 times: mean step median
# 0.17 px, max 0.42; their ratios, unthresholded, median 1.5). The world's slowest object moves
# R/3 over F - 1 frames, 1.33 px/frame at the default 64 px and 17 frames (0.67 at 32 px).
MIN_MEAN_STEP = 0.5
# An object that holds still inside every group and moves only at boundaries has inside mean 0
# and ratio +inf; like PSNR_CAP, a cap keeps medians and JSON finite.
SMOOTHNESS_CAP = 100.0

# Shape from the fraction of its bounding box an object fills: (triangle below, square above) per
# calibrated resolution, each threshold the midpoint between two shapes' ranges on 600 real clips
# (300 training, 300 held-out; medians over frames). At 64 px: triangles 0.502-0.583, circles
# 0.707-0.837, squares 1.000 always -> (0.645, 0.918). At 32 px, where small shapes rasterise
# coarsely: triangles 0.510-0.667, circles 0.696-0.918, squares 1.000 -> (0.68, 0.96). A video
# reads with the pair of the calibrated resolution nearest its own (`fill_thresholds`). Until
# session 25 the 32 px pair read every resolution, which put a 64 px square whose corners a
# decoder softens (fill 0.93-0.96, nearer a square's 1.0 than any circle's) among the circles.
SHAPE_FILL_THRESHOLDS = {32: (0.68, 0.96), 64: (0.645, 0.918)}

_PALETTE_NAMES = tuple(COLOUR_RGB)
_PALETTE = np.array([COLOUR_RGB[c] for c in _PALETTE_NAMES], np.float64)  # [7, 3]


def psnr(a, b) -> float:
    """PSNR in dB between two uint8 images or videos of the same shape (peak 255), capped at 100."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {a.shape} and {b.shape}")
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    if mse == 0:
        return PSNR_CAP
    return float(min(PSNR_CAP, 10 * math.log10(255.0**2 / mse)))


def _check_video(video) -> np.ndarray:
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [F, R, R, 3] video, got {video.dtype} {video.shape}")
    return video


def _background_and_foreground(video: np.ndarray):
    """Per-frame background colour float [F, 3] and foreground mask bool [F, R, R]."""
    # The median of the border is robust: an object inside the frame covers well under half of it.
    border = np.concatenate(
        [video[:, 0], video[:, -1], video[:, 1:-1, 0], video[:, 1:-1, -1]], axis=1)  # [F, P, 3]
    background = np.median(border, axis=1)  # [F, 3]
    video, background = video.astype(np.float32), background.astype(np.float32)
    # Channel by channel: a max-reduction over a trailing axis of 3 is several times slower.
    diff = [np.abs(video[..., c] - background[:, c, None, None]) for c in range(3)]
    return background, np.maximum(np.maximum(diff[0], diff[1]), diff[2]) > FOREGROUND_THRESHOLD


def nearest_colour(rgb) -> str:
    """Name of the COLOUR_RGB entry nearest (Euclidean) to an RGB triple in [0, 255]."""
    d = np.sum((_PALETTE - np.asarray(rgb, np.float64)) ** 2, axis=-1)
    return _PALETTE_NAMES[int(np.argmin(d))]


def fill_thresholds(resolution: int) -> tuple[float, float]:
    """(triangle below, square above): `SHAPE_FILL_THRESHOLDS` of the calibrated resolution
    nearest `resolution` pixels (by ratio; ties go to the coarser)."""
    return SHAPE_FILL_THRESHOLDS[min(sorted(SHAPE_FILL_THRESHOLDS),
                                     key=lambda r: abs(math.log(resolution / r)))]


def shape_of_fill(fill, resolution: int = 64) -> str | None:
    """'triangle' | 'circle' | 'square' from a bounding-box fill fraction in (0, 1] of an object in
    a `resolution`-pixel frame (`fill_thresholds`), None for None."""
    if fill is None:
        return None
    low, high = fill_thresholds(resolution)
    return "triangle" if fill < low else ("square" if fill > high else "circle")


def _fill(mask: np.ndarray):
    """Median over frames of area / bounding-box area of a bool [F, R, R] mask, over the frames
    where the object is off the border if there are any (a shape cut off by the frame fills its
    box differently; the world's objects may touch the border but stay whole), else over every
    frame where it is visible; None where it never is."""
    R = mask.shape[1]
    rows, cols = mask.any(axis=2), mask.any(axis=1)  # [F, R] each
    inside, touching = [], []
    for f in np.flatnonzero(rows.any(axis=1)):
        ys, xs = np.flatnonzero(rows[f]), np.flatnonzero(cols[f])
        fill = mask[f].sum() / ((ys[-1] - ys[0] + 1) * (xs[-1] - xs[0] + 1))
        border = ys[0] == 0 or xs[0] == 0 or ys[-1] == R - 1 or xs[-1] == R - 1
        (touching if border else inside).append(fill)
    fills = inside or touching
    return float(np.median(fills)) if fills else None


def _direction(displacement, resolution: int):
    """The direction of a centroid displacement (dx, dy) in pixels, or None if unclear."""
    dx, dy = displacement
    if abs(dx) > abs(dy):
        along, name = dx, ("right" if dx > 0 else "left")
    elif abs(dy) > abs(dx):
        along, name = dy, ("down" if dy > 0 else "up")
    else:
        return None
    return name if abs(along) >= resolution / 8 else None


def _analyse_mask(video: np.ndarray, background: np.ndarray, mask: np.ndarray) -> dict:
    num_frames, resolution = video.shape[0], video.shape[1]
    area = mask.sum(axis=(1, 2))  # [F]
    ys, xs = np.arange(resolution) + 0.5, np.arange(resolution) + 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (mask.sum(axis=1) * xs).sum(axis=1) / area  # NaN where the object is absent
        cy = (mask.sum(axis=2) * ys).sum(axis=1) / area
    centroid = np.stack([cx, cy], axis=-1)  # [F, 2]
    visible = np.flatnonzero(area > 0)
    mean_colour = video[mask].mean(axis=0) if visible.size else None
    displacement = None
    if visible.size >= 2:
        displacement = tuple(float(v) for v in centroid[visible[-1]] - centroid[visible[0]])
    fill = _fill(mask)
    return {
        "background": background,
        "mask": mask,
        "fill": fill,
        "shape": shape_of_fill(fill, resolution),
        "area": area,
        "centroid": centroid,
        "mean_colour": mean_colour,
        "colour": None if mean_colour is None else nearest_colour(mean_colour),
        "displacement": displacement,
        "direction": None if displacement is None else _direction(displacement, resolution),
        "consistent": _consistent(area, num_frames),
    }


def _consistent(area: np.ndarray, num_frames: int) -> bool:
    if num_frames == 0 or np.any(area == 0):
        return False
    ratio = area / np.median(area)
    return bool(np.all((ratio >= AREA_BAND[0]) & (ratio <= AREA_BAND[1])))


def group_boundaries(num_frames: int, group_frames: int = GROUP_FRAMES) -> np.ndarray:
    """Which frame-to-frame steps of a causal VAE's video cross a latent-group boundary.

    A causal VAE with temporal compression g = group_frames decodes F = 1 + g·k pixel frames
    from 1 + k latent frames: pixel frame 0 from latent 0 alone, frames 1..g from latent 1,
    g+1..2g from latent 2, and so on. Step f (frame f -> f + 1, f in [0, F-2]) crosses a boundary
    when its two frames come from different latents, i.e. when (f + 1) ≡ 1 (mod g): steps 0 -> 1,
    g -> g+1, 2g -> 2g+1, ... The step out of frame 0 counts as a boundary step: frame 0 has a
    latent of its own, and it is where a first-frame instruction meets generated motion.
    (For F not of the form 1 + g·k the last group is short; the rule is unchanged.)

    Returns bool [F - 1]; g = 1 makes every step a boundary (no step inside a group).
    """
    if group_frames < 1:
        raise ValueError(f"group_frames must be >= 1, got {group_frames}")
    later = np.arange(1, max(num_frames, 1))  # the later frame of each step
    return (later - 1) % group_frames == 0


def centroid_steps(centroid) -> np.ndarray:
    """Euclidean distance in pixels between consecutive frames' centroids.

    centroid: float [F, 2] (x, y), NaN where the object is absent (as `analyse_video` gives).
    Returns float [F - 1] >= 0, NaN where the object is absent from either frame of the step.
    """
    centroid = np.asarray(centroid, np.float64)
    return np.sqrt(np.sum(np.diff(centroid, axis=0) ** 2, axis=-1))


def smoothness_from_centroids(centroids, group_frames: int = GROUP_FRAMES,
                              min_mean_step: float = MIN_MEAN_STEP) -> float | None:
    """Mean centroid step across latent-group boundaries over the mean step inside groups.

    centroids: float [F, 2] of one object, or a list of them (one per object, same F); NaN where
      an object is absent. Several objects' steps are pooled into the two means (objects of one
      clip share the decoder's boundaries, so pooling weighs each counted step alike).
    group_frames: the VAE's temporal compression g (`group_boundaries` says which steps cross).
    min_mean_step: pixels per frame; below it (mean over every counted step) the object is still.

    Only steps whose two frames both show the object count. Returns a float in [0, SMOOTHNESS_CAP]:
    1.0 for even motion (the world's constant-velocity clips), > 1 when motion bunches at the
    boundaries (a VAE that decodes each latent's frames nearly alike and jumps between latents),
    < 1 when it bunches inside groups. None when undefined: no counted step across a boundary or
    none inside a group (object not visible enough, F too short, or g = 1), or the object barely
    moves (mean counted step < min_mean_step: both means would be jitter).
    """
    if not isinstance(centroids, (list, tuple)):
        centroids = [centroids]
    steps = np.concatenate([centroid_steps(c) for c in centroids])  # [K (F - 1)]
    across = np.concatenate([group_boundaries(len(c), group_frames) for c in centroids])
    counted = ~np.isnan(steps)
    boundary, inside = steps[counted & across], steps[counted & ~across]
    if boundary.size == 0 or inside.size == 0:
        return None
    if steps[counted].mean() < min_mean_step:
        return None
    # Means, not medians: with 4 boundary steps in a 17-frame clip a median would ignore a single
    # jump. (The median is taken over videos, in `smoothness_summary`.)
    b, i = float(boundary.mean()), float(inside.mean())
    if b == i == 0:  # reachable only with min_mean_step <= 0: 0 / 0
        return None
    if i * SMOOTHNESS_CAP <= b:  # also i == 0 with b > 0, which is +inf
        return SMOOTHNESS_CAP
    return b / i


def smoothness(video, group_frames: int = GROUP_FRAMES, min_mean_step: float = MIN_MEAN_STEP,
               colours=None) -> float | None:
    """`smoothness_from_centroids` of a uint8 [F, R, R, 3] video's object (all foreground as one,
    as `analyse_video`), or of one object per name in `colours` pooled (as `analyse_objects`)."""
    found = [analyse_video(video)] if colours is None else analyse_objects(video, colours)
    return smoothness_from_centroids([o["centroid"] for o in found], group_frames, min_mean_step)


def smoothness_scores(videos, captions=None, group_frames: int = GROUP_FRAMES,
                      min_mean_step: float = MIN_MEAN_STEP) -> list:
    """`smoothness` of each uint8 [F, R, R, 3] video in `videos` ([N, F, R, R, 3] or a list);
    with `captions` (one per video), one object per caption colour, pooled. A list of N floats
    or None."""
    if captions is None:
        captions = [None] * len(videos)
    if len(captions) != len(videos):
        raise ValueError(f"smoothness_scores: {len(videos)} videos but {len(captions)} captions")
    return [smoothness(v, group_frames, min_mean_step,
                       None if c is None else [colour for colour, _, _ in parse_caption(c)])
            for v, c in zip(videos, captions)]


def smoothness_summary(values) -> dict:
    """Median and 90th percentile (numpy's linear interpolation) of per-video smoothness values,
    None ignored: dict(smoothness_median, smoothness_p90: float or None when no video has a score,
    smoothness_n: int, the number of videos with a score)."""
    scored = np.array([v for v in values if v is not None], np.float64)
    if scored.size == 0:
        return dict(smoothness_median=None, smoothness_p90=None, smoothness_n=0)
    return dict(smoothness_median=float(np.median(scored)),
                smoothness_p90=float(np.percentile(scored, 90)), smoothness_n=int(scored.size))


def analyse_video(video) -> dict:
    """Finds the (single) object of a uint8 [F, R, R, 3] video, treating all foreground as one.

    Returns a dict with
      background: float [F, 3], per-frame median of the border pixels;
      mask: bool [F, R, R], pixels whose max-abs channel difference from the background > 80;
      area: int [F] pixels; centroid: float [F, 2] (x, y) pixels, NaN where the object is absent;
      mean_colour: float [3] over all object pixels of all frames, or None if there are none;
      colour: nearest COLOUR_RGB name to mean_colour, or None;
      displacement: (dx, dy) of the centroid from the first to the last visible frame, or None;
      direction: the direction of displacement if it is >= R/8 along its dominant axis and
        strictly more than across it, else None;
      consistent: visible in every frame with every area within [0.5, 2] x the median area;
      fill: median over the frames where the object is off the border (if any, else where it is
        visible) of its area over its bounding box's, or None; shape: `shape_of_fill(fill)` or None.
    """
    video = _check_video(video)
    background, foreground = _background_and_foreground(video)
    return _analyse_mask(video, background, foreground)


def analyse_objects(video, colours) -> list[dict]:
    """Like `analyse_video`, one dict per asked colour name in `colours`.

    Each foreground pixel goes to the asked colour it is nearest to, which separates objects of
    different colours (the shapes world never repeats a colour in a clip). With one colour this
    is exactly `analyse_video`. A wrongly coloured object still lands on some asked colour, and
    its mean colour then names the colour it really has.
    """
    video = _check_video(video)
    background, foreground = _background_and_foreground(video)
    if len(colours) == 1:
        return [_analyse_mask(video, background, foreground)]
    targets = np.array([COLOUR_RGB[c] for c in colours], np.float32)  # [K, 3]
    pixels = video[foreground].astype(np.float32)  # [N, 3], only the foreground needs a label
    label = np.full(foreground.shape, -1)
    label[foreground] = np.argmin(np.sum((pixels[:, None] - targets) ** 2, axis=-1), axis=-1)
    return [_analyse_mask(video, background, foreground & (label == k))
            for k in range(len(colours))]


def score_video(video, caption: str, first_frame=None, last_frame=None, *,
                group_frames: int = GROUP_FRAMES) -> dict:
    """Scores a generated uint8 [F, R, R, 3] video against the caption it was asked for.

    first_frame, last_frame: optional uint8 [R, R, 3] frame instructions.
    group_frames: the temporal compression of the VAE that decoded the video (for smoothness).
    Returns colour_correct, direction_correct, consistent, shape_correct (bools; with two
    objects each must hold for every object), first_psnr, last_psnr (dB, capped at 100, None when the instruction is
    not given), predicted_colours, predicted_directions, predicted_shapes (tuples, one per
    object, None where undecided), and smoothness (`smoothness_from_centroids` of the objects pooled: float in
    [0, SMOOTHNESS_CAP], 1 = even motion, or None).
    """
    video = _check_video(video)
    asked = parse_caption(caption)
    found = analyse_objects(video, [c for c, _, _ in asked])
    return {
        "colour_correct": all(o["colour"] == c for o, (c, _, _) in zip(found, asked)),
        "direction_correct": all(o["direction"] == d for o, (_, _, d) in zip(found, asked)),
        "consistent": all(o["consistent"] for o in found),
        "shape_correct": all(o["shape"] == sh for o, (_, sh, _) in zip(found, asked)),
        "first_psnr": None if first_frame is None else psnr(video[0], first_frame),
        "last_psnr": None if last_frame is None else psnr(video[-1], last_frame),
        "predicted_colours": tuple(o["colour"] for o in found),
        "predicted_directions": tuple(o["direction"] for o in found),
        "predicted_shapes": tuple(o["shape"] for o in found),
        "smoothness": smoothness_from_centroids([o["centroid"] for o in found], group_frames),
    }


def _mean_or_none(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def faithfulness_report(records: list[dict]) -> dict:
    """Aggregates scored videos into `report[mode][group]`.

    records: dicts `{'mode': 'T2V' | 'I2V' | 'FLF2V', 'heldout': bool, **score_video(...)}`.
    Returns, for each mode present and group in ('seen', 'heldout', 'all') with n > 0:
    n, colour_acc, direction_acc, consistency_acc (in [0, 1]), first_psnr, last_psnr (mean dB
    over the records that have one, else None), and smoothness_median, smoothness_p90 (over the
    records whose `smoothness` is not None, else None) with smoothness_n, their number
    (`smoothness_summary`; records without a `smoothness` key count as None).
    """
    for r in records:
        if r["mode"] not in MODES:
            raise ValueError(f"unknown mode {r['mode']!r}; expected one of {MODES}")
    report = {}
    for mode in MODES:
        groups = {}
        for group in GROUPS:
            rs = [r for r in records if r["mode"] == mode
                  and (group == "all" or bool(r["heldout"]) == (group == "heldout"))]
            if not rs:
                continue
            groups[group] = {
                "n": len(rs),
                "colour_acc": float(np.mean([r["colour_correct"] for r in rs])),
                "direction_acc": float(np.mean([r["direction_correct"] for r in rs])),
                "consistency_acc": float(np.mean([r["consistent"] for r in rs])),
                "first_psnr": _mean_or_none([r.get("first_psnr") for r in rs]),
                "last_psnr": _mean_or_none([r.get("last_psnr") for r in rs]),
                **smoothness_summary([r.get("smoothness") for r in rs]),
            }
        if groups:
            report[mode] = groups
    return report


def format_report(report: dict) -> str:
    """A fixed-width table of `faithfulness_report` output, one row per mode and group."""
    header = (f"{'mode':<6} {'group':<8} {'n':>6} {'colour':>7} {'direction':>9} "
              f"{'consistent':>10} {'first_psnr':>10} {'last_psnr':>9} {'smooth_med':>10} "
              f"{'smooth_p90':>10}")
    rows = [header, "-" * len(header)]

    def db(v, width):
        return f"{'-':>{width}}" if v is None else f"{v:>{width}.2f}"

    for mode, groups in report.items():
        for group, s in groups.items():
            rows.append(f"{mode:<6} {group:<8} {s['n']:>6} {s['colour_acc']:>7.3f} "
                        f"{s['direction_acc']:>9.3f} {s['consistency_acc']:>10.3f} "
                        f"{db(s['first_psnr'], 10)} {db(s['last_psnr'], 9)} "
                        f"{db(s.get('smoothness_median'), 10)} {db(s.get('smoothness_p90'), 10)}")
    return "\n".join(rows)


class SyntheticFaithfulness:
    """Evaluator plug-in: feed generated videos one at a time, then read the report.

    update(video uint8 [F, R, R, 3], caption, mode=..., heldout=..., first_frame=None,
    last_frame=None) scores one video; result() is `faithfulness_report` of everything since the
    last reset(). group_frames: the temporal compression of the VAE that decoded the videos.
    """

    name = "synthetic_faithfulness"

    def __init__(self, group_frames: int = GROUP_FRAMES):
        self.group_frames = group_frames
        self.records: list[dict] = []

    def update(self, video, caption: str, *, mode: str, heldout: bool,
               first_frame=None, last_frame=None) -> dict:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        record = {"mode": mode, "heldout": bool(heldout),
                  **score_video(video, caption, first_frame, last_frame,
                                group_frames=self.group_frames)}
        self.records.append(record)
        return record

    def result(self) -> dict:
        return faithfulness_report(self.records)

    def reset(self):
        self.records = []
