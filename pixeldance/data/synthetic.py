"""The built-in synthetic "shapes" world: procedural videos with exact captions.

Each sample is a short clip of one (or two) flat-coloured shapes sliding at constant velocity
over a dark flat background, captioned `"a red circle moves left"`. Because the world is known,
a generated video can be checked against its caption exactly (see
`pixeldance/evaluators/synthetic.py`). Specified in `shared/design/SYNTHETIC_WORLD.md`.

Geometry conventions used throughout (renderer, sampler and evaluator agree on them):
- pixel (row r, column c) covers [c, c+1) x [r, r+1) and is sampled at its centre (c+0.5, r+0.5);
- x grows to the right (columns), y grows downwards (rows): 'right' = +x, 'down' = +y;
- an object of `size` s occupies the s x s box centred on its centre (circle diameter, square
  side, triangle base and height), so "fully inside" means s/2 <= centre <= R - s/2.

Pure numpy, importable without JAX or grain (the source duck-types grain's
`RandomAccessDataSource`: `__len__`, `__getitem__`, `__repr__`, picklable).
"""

import dataclasses
import itertools
import re

import numpy as np

COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "white")
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")

# Unit velocity of each direction in (x, y) image coordinates.
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
}

ALL_COMBOS: tuple[tuple[str, str, str], ...] = tuple(itertools.product(COLOURS, SHAPES, DIRECTIONS))


def _held_out_combos() -> tuple[tuple[str, str, str], ...]:
    # One held-out colour per (shape, direction) pair: colour index (4*shape + direction) mod 7.
    # For a fixed shape the four directions give four distinct colours, and for a fixed direction
    # the three shapes give three distinct colours (offsets 0, 4, 8=1 mod 7), so no (colour, shape),
    # (colour, direction) or (shape, direction) pair is held out more than once. Every such pair
    # spans >= 2 combos, so each still appears in training: held-out combos are novel
    # *combinations* of seen parts. Colours 0-4 are held out twice, 5-6 once.
    combos = []
    for s, shape in enumerate(SHAPES):
        for d, direction in enumerate(DIRECTIONS):
            combos.append((COLOURS[(4 * s + d) % len(COLOURS)], shape, direction))
    return tuple(combos)


HELD_OUT: tuple[tuple[str, str, str], ...] = _held_out_combos()  # 12 of the 84 combos
TRAIN_COMBOS: tuple[tuple[str, str, str], ...] = tuple(c for c in ALL_COMBOS if c not in HELD_OUT)
SPLITS = ("train", "heldout")
_SPLIT_COMBOS = {"train": TRAIN_COMBOS, "heldout": HELD_OUT}

_CLAUSE = re.compile(r"a (\w+) (\w+) moves (\w+)")


def caption(objects) -> str:
    """Caption for a list of (colour, shape, direction) triples.

    `[('red', 'circle', 'left')]` -> `"a red circle moves left"`; several objects are joined by
    `" and "`.
    """
    return " and ".join(f"a {c} {s} moves {d}" for c, s, d in objects)


def parse_caption(text: str) -> list[tuple[str, str, str]]:
    """Inverse of `caption`: the (colour, shape, direction) triples, in caption order.

    Raises ValueError (naming the text) for anything `caption` could not have produced.
    """
    objects = []
    for clause in text.split(" and "):
        match = _CLAUSE.fullmatch(clause)
        if (match is None or match[1] not in COLOURS or match[2] not in SHAPES
                or match[3] not in DIRECTIONS):
            raise ValueError(f"not a shapes-world caption: {text!r}")
        objects.append((match[1], match[2], match[3]))
    return objects


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """What a shapes-world clip looks like.

    num_frames: F >= 1; 17 = 1 + 4*4 gives 5 latent frames under a causal 4x temporal VAE.
    resolution: R, clips are R x R pixels.
    num_objects: 1 or 2 objects per clip (two objects always have different colours).
    seed: together with the split and the index, fixes every sample.
    """
    num_frames: int = 17
    resolution: int = 64
    num_objects: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {self.resolution}")
        if self.num_objects not in (1, 2):
            raise ValueError(f"num_objects must be 1 or 2, got {self.num_objects}")


def world_config(config) -> WorldConfig:
    """The world of config.data (num_frames, resolution, num_objects, world_seed)."""
    return WorldConfig(num_frames=config.data.num_frames, resolution=config.data.resolution,
                       num_objects=config.data.num_objects, seed=config.data.world_seed)


def render(objects: list[dict], background: tuple[int, int, int], num_frames: int,
           resolution: int) -> np.ndarray:
    """Draws the clip: uint8 [F, R, R, 3], F = num_frames, R = resolution.

    objects: dicts with `shape` (in SHAPES), `colour` (in COLOURS), `size` (pixels, float) and a
        path (`centres`): `x0`, `y0` (centre at frame 0, pixels) and `vx`, `vy` (pixels per
        frame), optionally a turn; other keys are ignored. Later objects are painted over
        earlier ones.
    background: RGB in [0, 255].

    Masks are hard-edged (no antialiasing), so object pixels are exactly the primary colour.
    """
    p = np.arange(resolution, dtype=np.float32) + 0.5  # pixel centres
    px, py = p[None, None, :], p[None, :, None]  # [1, 1, R], [1, R, 1]
    video = np.empty((num_frames, resolution, resolution, 3), np.uint8)
    video[...] = np.asarray(background, np.uint8)
    for obj in objects:
        half = obj["size"] / 2
        cx, cy = centres(obj, num_frames).T[:, :, None, None]  # each [F, 1, 1]
        dx = px - cx  # [F, 1, R]
        dy = py - cy  # [F, R, 1]
        if obj["shape"] == "circle":
            mask = dx * dx + dy * dy <= half * half
        elif obj["shape"] == "square":
            mask = (np.abs(dx) <= half) & (np.abs(dy) <= half)
        elif obj["shape"] == "triangle":
            # Apex at the top centre, base along the bottom edge: width grows linearly downwards.
            mask = (dy >= -half) & (dy <= half) & (2 * np.abs(dx) <= dy + half)
        else:
            raise ValueError(f"unknown shape {obj['shape']!r}; expected one of {SHAPES}")
        video[mask] = COLOUR_RGB[obj["colour"]]
    return video


def _place(rng: np.random.Generator, colour: str, shape: str, direction: str,
           cfg: WorldConfig) -> dict:
    """One object's size, start and velocity; its whole path stays fully inside the frame."""
    r = cfg.resolution
    size = float(rng.uniform(r / 5, r / 4))
    half = size / 2
    travel = float(rng.uniform(r / 3, r - size))
    along_start = float(rng.uniform(half, r - half - travel))  # as if moving in the + direction
    across = float(rng.uniform(half, r - half))
    ux, uy = DIRECTION_VECTORS[direction]
    if ux + uy < 0:  # left/up: mirror the start, which mirrors the whole path inside the frame
        along_start = r - along_start
    speed = travel / max(cfg.num_frames - 1, 1)
    x0, y0 = (along_start, across) if ux else (across, along_start)
    return dict(shape=shape, colour=colour, direction=direction, size=size,
                x0=x0, y0=y0, vx=ux * speed, vy=uy * speed)


def centres(obj: dict, num_frames: int, dtype=np.float32) -> np.ndarray:
    """[F, 2] of `dtype`: the object's centre (x, y) in each frame (float32 as `render` draws it).

    A straight path is x0 + vx f, y0 + vy f. With a turn (keys `turn`: frame k >= 0, `pvx`, `pvy`:
    the velocity before it) the object moves at (pvx, pvy) up to frame k and at (vx, vy) from
    there, through the point x0 + vx k, y0 + vy k, so frames >= k are the straight path's."""
    f = np.arange(num_frames, dtype=dtype)
    x = obj["x0"] + obj["vx"] * f
    y = obj["y0"] + obj["vy"] * f
    k = obj.get("turn")
    if k is not None:
        before = f < k
        x = np.where(before, obj["x0"] + obj["vx"] * k + obj["pvx"] * (f - k), x)
        y = np.where(before, obj["y0"] + obj["vy"] * k + obj["pvy"] * (f - k), y)
    return np.stack([x, y], axis=1).astype(dtype)


def _overlap(a: dict, b: dict, num_frames: int) -> bool:
    """Whether the bounding boxes of two objects come within a pixel of each other in any frame."""
    gap = (a["size"] + b["size"]) / 2 + 1
    d = np.abs(centres(a, num_frames, np.float64) - centres(b, num_frames, np.float64))  # [F, 2]
    return bool(np.any((d[:, 0] < gap) & (d[:, 1] < gap)))


def sample_objects(rng: np.random.Generator, combos, cfg: WorldConfig):
    """Places one object per (colour, shape, direction) in `combos`, and picks a background.

    Returns (objects, background): object dicts as `render` takes them (plus `direction`) and an
    RGB background with each channel uniform in [0, 60].

    size ~ U[R/5, R/4]; total travel ~ U[R/3, R - size] (the most that keeps the object inside);
    speed = travel / max(F - 1, 1) pixels per frame (with F = 1 the single frame is a placement
    along a notional one-frame move); the start is uniform among positions that keep the whole
    path fully inside, and the perpendicular coordinate is uniform among fully-inside positions.
    Several objects are re-placed until their boxes stay apart in every frame: an occluded object
    would shrink and shift, which a faithful video could not be scored as consistent.
    """
    background = tuple(int(v) for v in rng.integers(0, 61, size=3))
    for _ in range(1000):  # about 1 in 5 two-object draws overlap, so this ends in a few tries
        objects = [_place(rng, *combo, cfg) for combo in combos]
        if not any(_overlap(a, b, cfg.num_frames)
                   for i, a in enumerate(objects) for b in objects[i + 1:]):
            return objects, background
    raise RuntimeError(f"could not place {combos} without overlap in {cfg}")


class ShapesSource:
    """Random-access source of shapes-world clips (duck-types grain's RandomAccessDataSource).

    Sample i is drawn from `np.random.default_rng([config.seed, split_index, i])`, so it is the
    same whatever the access order, process or worker. 'train' draws combos uniformly from the 72
    TRAIN_COMBOS, 'heldout' from the 12 HELD_OUT; with two objects each draws its combo from the
    split's set, with different colours.

    Each item is a dict:
        video: uint8 [F, R, R, 3];
        caption: str;
        colour, shape, direction: int32 [num_objects], indices into COLOURS, SHAPES, DIRECTIONS;
        index: int, the sample index i.
    """

    def __init__(self, split: str = "train", size: int = 100_000,
                 config: WorldConfig = WorldConfig()):
        if split not in SPLITS:
            raise ValueError(f"unknown shapes split {split!r}; expected one of {SPLITS}")
        self.split = split
        self.size = size
        self.config = config
        self._combos = _SPLIT_COMBOS[split]

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        # grain's checkpointing compares reprs, so this must pin down every sample.
        return f"ShapesSource(split={self.split!r}, size={self.size}, config={self.config!r})"

    def objects(self, index: int):
        """(combos, objects, background) of item `index`: its (colour, shape, direction) triples,
        the object dicts `render` draws and the background RGB."""
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self!r}")
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, SPLITS.index(self.split), index])
        combos = [self._combos[rng.integers(len(self._combos))]]
        if cfg.num_objects == 2:
            others = [c for c in self._combos if c[0] != combos[0][0]]
            combos.append(others[rng.integers(len(others))])
        objects, background = sample_objects(rng, combos, cfg)
        return combos, objects, background

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        cfg = self.config
        combos, objects, background = self.objects(index)
        return _item(render(objects, background, cfg.num_frames, cfg.resolution), combos, index)


def _item(video: np.ndarray, combos, index: int) -> dict:
    """A source item (`ShapesSource`'s fields) of a rendered video and its combos."""
    return {
        "video": video,
        "caption": caption(combos),
        "colour": np.array([COLOURS.index(c) for c, _, _ in combos], np.int32),
        "shape": np.array([SHAPES.index(s) for _, s, _ in combos], np.int32),
        "direction": np.array([DIRECTIONS.index(d) for _, _, d in combos], np.int32),
        "index": index,
    }


def turned(rng: np.random.Generator, obj: dict, prior: str, turn: int, num_frames: int,
           resolution: int) -> dict:
    """`obj` moving `prior` up to frame `turn` and its own direction from there, at its own speed
    and size, placed uniformly among the positions that keep the whole F-frame path fully inside.

    Every frame's centre is the turn point P plus an offset fixed by the two velocities, so each
    coordinate of P has an interval of inside positions (empty only if the path is longer than
    the frame, which the callers' lengths rule out: both legs are at most the item's own travel)."""
    speed = float(np.hypot(obj["vx"], obj["vy"]))
    ux, uy = DIRECTION_VECTORS[prior]
    turning = dict(obj, turn=turn, pvx=ux * speed, pvy=uy * speed)
    off = centres(dict(turning, x0=-obj["vx"] * turn, y0=-obj["vy"] * turn), num_frames, np.float64)
    half = obj["size"] / 2
    lo = half - off.min(axis=0)
    hi = resolution - half - off.max(axis=0)
    if np.any(lo > hi + 1e-9):
        raise ValueError(f"a {obj['size']:.1f} px object at {speed:.2f} px/frame cannot turn at frame {turn} "
                         f"of {num_frames} inside {resolution} px")
    px, py = rng.uniform(lo, np.maximum(lo, hi))
    return dict(turning, x0=px - obj["vx"] * turn, y0=py - obj["vy"] * turn)


class TurnWindows:
    """Longer windows of a ShapesSource's items that may change direction where a context ends.

    Item i is item i of `base` (F frames, its caption, object, size and speed) read over
    F + `extra_frames` frames, for training a continued clip (the DiT's 'continue' keyframe set:
    the window's first n latents are clean context, n in 1..`max_context`, one latent =
    `group` frames). With probability `rate` every object moves another way (uniform among the
    three other directions) up to frame n * group, the end of the context's frames, and then as
    its caption says: the clip k + 1 of a story, whose context latents move as clip k's prompt said
    and whose own prompt says something else. Otherwise the window is the base item read longer
    (`ShapesSource` at F + extra_frames frames: the same path, 16 % slower at F = 17). The draws
    (n, whether and where from it turns, the placement) come from their own generator
    [seed, split, i, 1], so the base items are unchanged.

    Each item is the base item's dict (`video` uint8 [F + extra_frames, R, R, 3]) plus
    context_latents: int, n; prior_direction: int32 [num_objects], indices into DIRECTIONS of
    the motion before frame n * group (the caption's own where the window does not turn).
    """

    def __init__(self, base: ShapesSource, extra_frames: int, group: int, max_context: int,
                 rate: float):
        cfg = base.config
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"turn rate must be in [0, 1], got {rate}")
        if not 1 <= max_context * group < cfg.num_frames:
            raise ValueError(f"{max_context} context latents of {group} frames do not fit before the end "
                             f"of a {cfg.num_frames}-frame clip")
        self.base = base
        self.longer = ShapesSource(base.split, size=base.size,
                                   config=dataclasses.replace(cfg, num_frames=cfg.num_frames + extra_frames))
        self.extra_frames, self.group, self.max_context, self.rate = extra_frames, group, max_context, rate

    def __len__(self) -> int:
        return len(self.base)

    def __repr__(self) -> str:
        return (f"TurnWindows({self.base!r}, extra_frames={self.extra_frames}, group={self.group}, "
                f"max_context={self.max_context}, rate={self.rate})")

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        cfg = self.base.config
        rng = np.random.default_rng([cfg.seed, SPLITS.index(self.base.split), index, 1])
        n = int(rng.integers(1, self.max_context + 1))
        if rng.random() >= self.rate:
            item = self.longer[index]
            return dict(item, context_latents=n, prior_direction=item["direction"].copy())
        combos, objects, background = self.base.objects(index)  # only a turning window re-places them
        num_frames = cfg.num_frames + self.extra_frames
        priors = [DIRECTIONS[(DIRECTIONS.index(d) + 1 + int(rng.integers(3))) % 4] for _, _, d in combos]
        for _ in range(1000):
            moved = [turned(rng, obj, prior, n * self.group, num_frames, cfg.resolution)
                     for obj, prior in zip(objects, priors)]
            if not any(_overlap(a, b, num_frames) for i, a in enumerate(moved) for b in moved[i + 1:]):
                break
        else:
            raise RuntimeError(f"could not place the turning objects of item {index} of {self!r} apart")
        return dict(_item(render(moved, background, num_frames, cfg.resolution), combos, index), context_latents=n,
                    prior_direction=np.array([DIRECTIONS.index(p) for p in priors], np.int32))
