"""The shapes world (pixeldance/data/synthetic.py) and its faithfulness evaluator."""
import itertools
import pickle
import time

import numpy as np
import pytest

from pixeldance.data import synthetic as world
from pixeldance.evaluators import synthetic as faith

CONFIGS = [
    world.WorldConfig(),
    world.WorldConfig(num_frames=1, resolution=32),
    world.WorldConfig(num_frames=9, resolution=32),
    world.WorldConfig(num_frames=9, resolution=64, num_objects=2),
    world.WorldConfig(num_frames=17, resolution=32, num_objects=2, seed=3),
]


def _background(video):
    """The background colour of a ground-truth clip: uint8 [3]."""
    return faith.analyse_video(video)["background"][0].astype(np.uint8)


def _combos(item):
    return [(world.COLOURS[c], world.SHAPES[s], world.DIRECTIONS[d])
            for c, s, d in zip(item["colour"], item["shape"], item["direction"])]


# ---------------------------------------------------------------------------------------------
# Vocabulary, captions and splits
# ---------------------------------------------------------------------------------------------

def test_vocabulary():
    assert set(world.COLOUR_RGB) == set(world.COLOURS)
    for rgb in world.COLOUR_RGB.values():
        assert set(rgb) <= {0, 255} and 255 in rgb
    assert len(set(world.COLOUR_RGB.values())) == len(world.COLOURS)
    assert len(world.ALL_COMBOS) == 84


def test_held_out_are_novel_combinations_of_seen_parts():
    assert len(world.HELD_OUT) == 12 == len(set(world.HELD_OUT))
    assert set(world.HELD_OUT) <= set(world.ALL_COMBOS)
    assert len(world.TRAIN_COMBOS) == 72
    assert not set(world.HELD_OUT) & set(world.TRAIN_COMBOS)
    for i, j in itertools.combinations(range(3), 2):
        seen_pairs = {(c[i], c[j]) for c in world.TRAIN_COMBOS}
        for combo in world.HELD_OUT:
            assert (combo[i], combo[j]) in seen_pairs, (combo, i, j)


def test_caption_round_trip():
    one = [("red", "circle", "left")]
    two = [("red", "circle", "left"), ("blue", "square", "up")]
    assert world.caption(one) == "a red circle moves left"
    assert world.caption(two) == "a red circle moves left and a blue square moves up"
    for objects in [one, two] + [[c] for c in world.ALL_COMBOS]:
        assert world.parse_caption(world.caption(objects)) == objects


@pytest.mark.parametrize("text", [
    "a purple circle moves left", "a red hexagon moves left", "a red circle moves sideways",
    "a red circle moves left and", "red circle moves left", "", "a red circle moves left ",
])
def test_parse_caption_rejects(text):
    with pytest.raises(ValueError) as info:
        world.parse_caption(text)
    assert repr(text) in str(info.value) and "\n" not in str(info.value)


def test_unknown_split_and_config():
    with pytest.raises(ValueError, match="'val'"):
        world.ShapesSource("val")
    with pytest.raises(ValueError):
        world.WorldConfig(num_objects=3)


def test_splits_keep_held_out_combos_apart():
    train = world.ShapesSource("train", size=2000, config=world.WorldConfig(num_frames=1))
    train_combos = [c for i in range(len(train)) for c in _combos(train[i])]
    assert not set(train_combos) & set(world.HELD_OUT)
    assert set(train_combos) == set(world.TRAIN_COMBOS)  # uniform draws cover all 72
    heldout = world.ShapesSource("heldout", size=300, config=world.WorldConfig(num_frames=1))
    heldout_combos = [c for i in range(len(heldout)) for c in _combos(heldout[i])]
    assert set(heldout_combos) == set(world.HELD_OUT)
    for split, allowed in [("train", world.TRAIN_COMBOS), ("heldout", world.HELD_OUT)]:
        src = world.ShapesSource(split, config=world.WorldConfig(num_frames=1, num_objects=2))
        for i in range(300):
            combos = _combos(src[i])
            assert set(combos) <= set(allowed)
            assert combos[0][0] != combos[1][0]  # two objects never share a colour


# ---------------------------------------------------------------------------------------------
# Source: determinism, shapes, dtypes, ranges
# ---------------------------------------------------------------------------------------------

def _assert_items_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_source_is_deterministic_and_order_free():
    cfg = world.WorldConfig(num_frames=9, resolution=32)
    indices = [0, 1, 2, 7, 1234, 99_999]
    a = world.ShapesSource(config=cfg)
    forward = [a[i] for i in indices]
    b = world.ShapesSource(config=cfg)
    backward = [b[i] for i in reversed(indices)][::-1]
    for x, y in zip(forward, backward):
        _assert_items_equal(x, y)
    c = pickle.loads(pickle.dumps(a))  # grain workers get pickled copies
    _assert_items_equal(c[7], forward[3])
    assert repr(a) == repr(b) and "ShapesSource" in repr(a)
    # Different indices, splits and seeds give different videos.
    videos = [x["video"].tobytes() for x in forward]
    assert len(set(videos)) == len(videos)
    heldout = world.ShapesSource("heldout", config=cfg)
    assert a[0]["video"].tobytes() != heldout[0]["video"].tobytes()
    other_seed = world.ShapesSource(config=world.WorldConfig(num_frames=9, resolution=32, seed=1))
    assert a[0]["video"].tobytes() != other_seed[0]["video"].tobytes()


def test_source_bounds():
    src = world.ShapesSource(size=10)
    assert len(src) == 10
    with pytest.raises(IndexError):
        src[10]
    with pytest.raises(IndexError):
        src[-1]


@pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
def test_item_format(cfg):
    src = world.ShapesSource(config=cfg)
    f, r, k = cfg.num_frames, cfg.resolution, cfg.num_objects
    for i in range(20):
        item = src[i]
        video = item["video"]
        assert video.dtype == np.uint8 and video.shape == (f, r, r, 3)
        assert item["index"] == i and isinstance(item["index"], int)
        for key, vocab in [("colour", world.COLOURS), ("shape", world.SHAPES),
                           ("direction", world.DIRECTIONS)]:
            assert item[key].dtype == np.int32 and item[key].shape == (k,)
            assert np.all((item[key] >= 0) & (item[key] < len(vocab)))
        assert item["caption"] == world.caption(_combos(item))
        # Every pixel is the dark background or exactly one of the clip's primaries.
        codes = np.unique(video.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1]))
        colours = {(int(c) >> 16, int(c) >> 8 & 255, int(c) & 255) for c in codes}
        primaries = {world.COLOUR_RGB[c] for c, _, _ in _combos(item)}
        backgrounds = colours - primaries
        assert len(backgrounds) == 1, backgrounds
        assert max(next(iter(backgrounds))) <= 60
        assert colours - backgrounds == primaries  # every object is visible


@pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
def test_objects_stay_inside_and_travel_far(cfg):
    r, f = cfg.resolution, cfg.num_frames
    frames = np.arange(f)
    for seed in range(200):
        rng = np.random.default_rng(seed)
        combos = [world.ALL_COMBOS[rng.integers(84)], world.ALL_COMBOS[rng.integers(84)]]
        objects, background = world.sample_objects(rng, combos[:cfg.num_objects], cfg)
        assert all(0 <= v <= 60 for v in background)
        for obj, (colour, shape, direction) in zip(objects, combos):
            assert (obj["colour"], obj["shape"], obj["direction"]) == (colour, shape, direction)
            assert r / 5 <= obj["size"] <= r / 4
            half = obj["size"] / 2
            x = obj["x0"] + obj["vx"] * frames
            y = obj["y0"] + obj["vy"] * frames
            assert np.all((x >= half) & (x <= r - half) & (y >= half) & (y <= r - half))
            ux, uy = world.DIRECTION_VECTORS[direction]
            travel = (obj["vx"] * ux + obj["vy"] * uy) * max(f - 1, 1)
            assert r / 3 <= travel <= r - obj["size"] + 1e-9
            assert obj["vx"] * uy == 0 and obj["vy"] * ux == 0  # no sideways drift
        if len(objects) == 2:
            assert not world._overlap(objects[0], objects[1], f)


def test_travel_seen_by_analysis():
    # The same property measured on the pixels: the centroid moves >= R/3 (less 1 px of
    # rasterisation) and the object is never clipped (its area does not drop at the edges).
    src = world.ShapesSource(config=world.WorldConfig(num_frames=9, resolution=32))
    for i in range(100):
        item = src[i]
        a = faith.analyse_video(item["video"])
        dx, dy = a["displacement"]
        assert max(abs(dx), abs(dy)) >= 32 / 3 - 1
        assert a["area"].min() >= 0.7 * a["area"].max()


def test_render_shapes_and_speed():
    r = 64
    base = dict(colour="white", size=16.0, x0=32.0, y0=32.0, vx=0.0, vy=0.0)
    areas = {}
    for shape in world.SHAPES:
        video = world.render([dict(base, shape=shape)], (10, 20, 30), 1, r)
        mask = np.all(video[0] == 255, axis=-1)
        areas[shape] = mask.sum()
        rows = np.flatnonzero(mask.any(axis=1))
        width = mask.sum(axis=1)
        columns = np.flatnonzero(mask.any(axis=0))
        assert columns.size == 16 and columns[0] == 24  # spans [x0 - size/2, x0 + size/2)
        if shape == "triangle":  # apex up: the point rasterises to <= 2 px, the base is full
            assert rows.size in (15, 16) and rows[-1] == 39
            assert width[rows[0]] <= 2 and width[rows[-1]] == 16
            assert np.all(np.diff(width[rows]) >= 0)
        else:
            assert np.array_equal(rows, columns)
    assert areas["triangle"] < areas["circle"] < areas["square"] == 256
    # Moves by velocity: one frame at vx = 4 shifts the square 4 px right.
    video = world.render([dict(base, shape="square", vx=4.0)], (0, 0, 0), 2, r)
    np.testing.assert_array_equal(video[1][:, 4:], video[0][:, :-4])
    objects, background = world.sample_objects(
        np.random.default_rng(0), [("red", "triangle", "left")], world.WorldConfig())
    times = []
    for _ in range(30):
        t = time.perf_counter()
        world.render(objects, background, 17, 64)
        times.append(time.perf_counter() - t)
    assert np.median(times) < 5e-3


def test_importable_without_jax():
    import subprocess
    import sys
    code = ("import sys; sys.modules['jax'] = None; sys.modules['grain'] = None; "
            "import pixeldance.data.synthetic, pixeldance.evaluators.synthetic")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# Evaluator
# ---------------------------------------------------------------------------------------------

def test_psnr():
    a = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    assert faith.psnr(a, a) == faith.PSNR_CAP == 100.0
    assert faith.psnr(a, a + 1) == pytest.approx(20 * np.log10(255), abs=1e-6)  # mse = 1
    with pytest.raises(ValueError):
        faith.psnr(a, a[0])


@pytest.mark.parametrize("cfg", [
    world.WorldConfig(),
    world.WorldConfig(num_frames=9, resolution=32),
    world.WorldConfig(num_frames=9, num_objects=2),
], ids=repr)
@pytest.mark.parametrize("split", world.SPLITS)
def test_ground_truth_scores_perfectly(cfg, split):
    src = world.ShapesSource(split, config=cfg)
    n = 200 if cfg.num_objects == 1 else 100
    for i in range(n):
        item = src[i]
        video, text = item["video"], item["caption"]
        score = faith.score_video(video, text, first_frame=video[0], last_frame=video[-1])
        assert score["colour_correct"] and score["direction_correct"] and score["consistent"], (
            i, text, score)
        assert score["first_psnr"] == score["last_psnr"] == faith.PSNR_CAP
        assert score["predicted_colours"] == tuple(c for c, _, _ in _combos(item))
        assert score["shape_correct"] and score["predicted_shapes"] == tuple(s for _, s, _ in _combos(item)), (
            i, text, score["predicted_shapes"])
        # Played backwards, every clip moves the wrong way, yet stays consistent and coloured.
        backwards = faith.score_video(video[::-1], text)
        assert not backwards["direction_correct"], (i, text)
        assert backwards["colour_correct"] and backwards["consistent"]


def test_no_score_without_a_caption_match():
    src = world.ShapesSource(config=world.WorldConfig(num_frames=9))
    for i in range(50):
        item = src[i]
        video, ((colour, shape, direction),) = item["video"], _combos(item)
        # Recolour the object to every other primary: colour wrong, motion still right.
        object_pixels = np.all(video == world.COLOUR_RGB[colour], axis=-1)
        for other in world.COLOURS:
            if other == colour:
                continue
            recoloured = video.copy()
            recoloured[object_pixels] = world.COLOUR_RGB[other]
            score = faith.score_video(recoloured, item["caption"])
            assert not score["colour_correct"] and score["direction_correct"]
        # Asked for any other shape: wrong, the rest right.
        for other in world.SHAPES:
            if other != shape:
                score = faith.score_video(video, world.caption([(colour, other, direction)]))
                assert not score["shape_correct"] and score["colour_correct"] and score["direction_correct"]
        # Asked for any other direction: wrong.
        for other in world.DIRECTIONS:
            if other != direction:
                text = world.caption([(colour, shape, other)])
                assert not faith.score_video(video, text)["direction_correct"]
        # A frozen object does not move: direction wrong, but consistent.
        frozen = faith.score_video(np.repeat(video[:1], 9, axis=0), item["caption"])
        assert not frozen["direction_correct"] and frozen["consistent"]
        # The object vanishes halfway: inconsistent.
        vanishing = video.copy()
        vanishing[5:] = _background(video)
        assert not faith.score_video(vanishing, item["caption"])["consistent"]


def test_blank_video():
    blank = np.zeros((17, 64, 64, 3), np.uint8) + np.array([30, 10, 50], np.uint8)
    score = faith.score_video(blank, "a red circle moves left", first_frame=blank[0])
    assert not score["consistent"] and not score["direction_correct"]
    assert not score["colour_correct"]
    assert score["first_psnr"] == 100.0 and score["last_psnr"] is None
    assert faith.analyse_video(blank)["direction"] is None


def test_two_objects_scored_separately():
    cfg = world.WorldConfig(num_frames=9, num_objects=2)
    item = world.ShapesSource(config=cfg)[3]
    (c0, s0, d0), (c1, s1, d1) = _combos(item)
    video = item["video"]
    assert faith.score_video(video, item["caption"])["direction_correct"]
    # Swapping which object is asked to move where is caught whenever their directions differ.
    swapped = world.caption([(c0, s0, d1), (c1, s1, d0)])
    assert faith.score_video(video, swapped)["direction_correct"] == (d0 == d1)
    # Removing the second object: the first alone is still right, the pair is not consistent.
    one_gone = video.copy()
    one_gone[np.all(video == world.COLOUR_RGB[c1], axis=-1)] = _background(video)
    score = faith.score_video(one_gone, item["caption"])
    assert not score["consistent"] and not score["colour_correct"]
    assert faith.score_video(one_gone, world.caption([(c0, s0, d0)]))["consistent"]


def test_video_format_is_checked():
    with pytest.raises(ValueError):
        faith.analyse_video(np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="purple"):
        faith.score_video(np.zeros((4, 8, 8, 3), np.uint8), "a purple circle moves left")


# ---------------------------------------------------------------------------------------------
# Report and plug-in
# ---------------------------------------------------------------------------------------------

def _record(mode, heldout, colour, direction, consistent, first=None, last=None):
    return dict(mode=mode, heldout=heldout, colour_correct=colour, direction_correct=direction,
                consistent=consistent, first_psnr=first, last_psnr=last)


def test_faithfulness_report():
    records = [
        _record("T2V", False, True, True, True),
        _record("T2V", False, True, False, True),
        _record("T2V", True, False, False, True),
        _record("FLF2V", True, True, True, False, first=30.0, last=20.0),
        _record("FLF2V", True, True, False, True, first=40.0, last=None),
    ]
    report = faith.faithfulness_report(records)
    assert list(report) == ["T2V", "FLF2V"]
    assert list(report["T2V"]) == ["seen", "heldout", "all"]
    assert list(report["FLF2V"]) == ["heldout", "all"]  # no seen FLF2V records
    no_smoothness = dict(smoothness_median=None, smoothness_p90=None, smoothness_n=0)  # no record has one
    assert report["T2V"]["seen"] == dict(n=2, colour_acc=1.0, direction_acc=0.5,
                                         consistency_acc=1.0, first_psnr=None, last_psnr=None,
                                         **no_smoothness)
    assert report["T2V"]["all"]["n"] == 3
    assert report["T2V"]["all"]["colour_acc"] == pytest.approx(2 / 3)
    assert report["T2V"]["heldout"]["direction_acc"] == 0.0
    assert report["FLF2V"]["all"] == dict(n=2, colour_acc=1.0, direction_acc=0.5,
                                          consistency_acc=0.5, first_psnr=35.0, last_psnr=20.0,
                                          **no_smoothness)
    table = faith.format_report(report)
    lines = table.splitlines()
    assert len(lines) == 2 + 5 and len({len(line) for line in lines}) == 1  # fixed width
    assert "FLF2V" in lines[-1] and "35.00" in lines[-1] and "20.00" in lines[-1]
    assert "0.667" in lines[4]
    with pytest.raises(ValueError, match="V2V"):
        faith.faithfulness_report([_record("V2V", False, True, True, True)])


def test_plugin():
    src = world.ShapesSource("heldout", config=world.WorldConfig(num_frames=9, resolution=32))
    evaluator = faith.SyntheticFaithfulness()
    for i in range(4):
        item = src[i]
        video = item["video"]
        evaluator.update(video, item["caption"], mode="T2V", heldout=True)
        evaluator.update(video, item["caption"], mode="I2V", heldout=True, first_frame=video[0])
        evaluator.update(video[::-1], item["caption"], mode="FLF2V", heldout=False,
                         first_frame=video[0], last_frame=video[-1])
    report = evaluator.result()
    assert report["T2V"]["heldout"]["direction_acc"] == 1.0
    assert report["I2V"]["all"]["first_psnr"] == 100.0
    assert report["FLF2V"]["seen"]["direction_acc"] == 0.0
    assert report["FLF2V"]["seen"]["first_psnr"] < 100.0
    evaluator.reset()
    assert evaluator.result() == {}


def test_shape_from_frames_off_the_border():
    """A triangle whose tip is cut off by the frame edge fills its box like a circle; the shape
    is read from the frames where it is whole, and from the cut ones only when there are none."""
    R, size = 64, 20
    rows = np.arange(size)
    triangle = np.abs(np.arange(size)[None] - size / 2 + 0.5) < (rows[:, None] + 1) / 2  # tip up
    video = np.zeros((9, R, R, 3), np.uint8)
    for f in range(9):
        y = 20 if f < 3 else -12  # frames 3..8: the top 12 rows above the frame
        part = triangle[max(0, -y):]
        video[f, max(0, y):max(0, y) + len(part), 20:20 + size][part] = world.COLOUR_RGB["red"]
    cut = faith.analyse_video(video[3:])
    assert cut["shape"] == "circle"  # the trapezoid alone is misread, which is why cut frames wait
    assert faith.analyse_video(video)["shape"] == "triangle"
    assert faith.shape_of_fill(None) is None and faith.analyse_video(video[:0 + 1] * 0)["shape"] is None


def test_shape_fill_thresholds_are_the_midpoints_of_real_clips():
    """Each resolution's thresholds sit halfway between two shapes' fill ranges on 600 real clips
    (the calibration SHAPE_FILL_THRESHOLDS records), so every real clip reads its own shape; a
    video reads with the nearest calibrated resolution's pair."""
    for R in (32, 64):
        fills = {}
        for split in ("train", "heldout"):
            src = world.ShapesSource(split, size=300, config=world.WorldConfig(resolution=R))
            for i in range(300):
                item = src[i]
                (_, shape, _), = world.parse_caption(item["caption"])
                analysis = faith.analyse_video(item["video"])
                assert analysis["shape"] == shape, (R, split, i, analysis["fill"])
                fills.setdefault(shape, []).append(analysis["fill"])
        low, high = faith.SHAPE_FILL_THRESHOLDS[R]
        assert abs(low - (max(fills["triangle"]) + min(fills["circle"])) / 2) < 0.005, (R, low)
        assert abs(high - (max(fills["circle"]) + min(fills["square"])) / 2) < 0.005, (R, high)
    assert faith.fill_thresholds(64) == faith.fill_thresholds(128) == faith.SHAPE_FILL_THRESHOLDS[64]
    assert faith.fill_thresholds(32) == faith.fill_thresholds(16) == faith.fill_thresholds(45) \
        == faith.SHAPE_FILL_THRESHOLDS[32]
    assert faith.fill_thresholds(46) == faith.SHAPE_FILL_THRESHOLDS[64]
    # A square with softened corners (fill 0.93): a square at 64 px, where no real circle fills
    # more than 0.84; a circle at 32 px, where real circles reach 0.92.
    assert faith.shape_of_fill(0.93, 64) == "square" and faith.shape_of_fill(0.93, 32) == "circle"
    assert faith.shape_of_fill(0.66, 64) == "circle" and faith.shape_of_fill(0.66, 32) == "triangle"
