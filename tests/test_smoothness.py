"""Smoothness of motion (pixeldance/evaluators/synthetic.py, issue 19): the object's mean centroid
step across a causal VAE's latent-group boundaries over its mean step inside groups.

The world's own clips move at constant velocity and score about 1; clips whose motion bunches at
the boundaries (what a VAE that decodes each latent's frames alike does) score above 1, clips whose
motion bunches inside groups below 1, a still object has no score.
"""
import ml_collections
import numpy as np
import pytest

from pixeldance.data import synthetic as world
from pixeldance.evaluators import reconstruction
from pixeldance.evaluators import synthetic as faith

CAP = faith.SMOOTHNESS_CAP


def _centroids(steps, start=(10.0, 20.0)):
    """float [len(steps) + 1, 2]: a path along +x whose frame-to-frame steps are `steps`."""
    x = start[0] + np.concatenate([[0.0], np.cumsum(steps)])
    return np.stack([x, np.full_like(x, start[1])], axis=-1)


def _steps_with(boundary, inside, num_frames=17, g=4):
    """Step lengths [F - 1]: `boundary` on steps crossing a group boundary, `inside` elsewhere."""
    return np.where(faith.group_boundaries(num_frames, g), boundary, inside).astype(np.float64)


def _render_path(xs, y=32.0, resolution=64, shape="circle", colour="red", size=14.0):
    """uint8 [F, R, R, 3]: one object whose centre is at (xs[f], y) in frame f."""
    frames = [world.render([dict(shape=shape, colour=colour, size=size, x0=float(x), y0=y, vx=0.0, vy=0.0)],
                           (20, 30, 40), 1, resolution) for x in xs]
    return np.concatenate(frames)


def _path(steps, start=12.0):
    return start + np.concatenate([[0.0], np.cumsum(steps)])


# ---------------------------------------------------------------------------------------------
# Which steps cross a boundary
# ---------------------------------------------------------------------------------------------

def test_group_boundaries_follow_the_causal_grouping():
    # F = 17, g = 4: frame 0 alone, then frames 1-4, 5-8, 9-12, 13-16. Step f is frame f -> f + 1.
    assert np.flatnonzero(faith.group_boundaries(17, 4)).tolist() == [0, 4, 8, 12]
    assert np.flatnonzero(faith.group_boundaries(9, 2)).tolist() == [0, 2, 4, 6]
    assert np.flatnonzero(faith.group_boundaries(13, 3)).tolist() == [0, 3, 6, 9]
    assert faith.group_boundaries(17, 4).shape == (16,)
    assert faith.group_boundaries(5, 1).all()  # no compression: every step crosses
    assert faith.group_boundaries(1, 4).shape == (0,)
    with pytest.raises(ValueError, match="group_frames"):
        faith.group_boundaries(17, 0)


def test_default_group_length_is_the_default_vaes():
    from pixeldance.models import vae as vae_lib
    for variant in ("mu", "shapes"):
        assert vae_lib.vae_from_variant(variant).temporal_factor == faith.GROUP_FRAMES


# ---------------------------------------------------------------------------------------------
# The ratio on exact centroids
# ---------------------------------------------------------------------------------------------

def test_ratio_of_exact_step_profiles():
    even = _centroids(np.full(16, 1.5))
    assert faith.smoothness_from_centroids(even) == pytest.approx(1.0)
    # The VAE's profile in the issue: boundary steps twice the inside ones.
    assert faith.smoothness_from_centroids(_centroids(_steps_with(3.0, 1.5))) == pytest.approx(2.0)
    assert faith.smoothness_from_centroids(_centroids(_steps_with(1.0, 3.0))) == pytest.approx(1 / 3)
    # Only the step out of frame 0 is long: it is a boundary step (frame 0 has its own latent).
    steps = np.ones(16)
    steps[0] = 3.0
    assert faith.smoothness_from_centroids(_centroids(steps)) == pytest.approx((3 + 1 + 1 + 1) / 4)
    # ... and only the step into the last group's first frame (12 -> 13).
    steps = np.ones(16)
    steps[12] = 5.0
    assert faith.smoothness_from_centroids(_centroids(steps)) == pytest.approx((1 + 1 + 1 + 5) / 4)
    # A long step just inside a group (13 -> 14) lowers the ratio.
    steps = np.ones(16)
    steps[13] = 5.0
    assert faith.smoothness_from_centroids(_centroids(steps)) == pytest.approx(1 / ((11 + 5) / 12))
    # Euclidean steps: a diagonal path of even steps is even, and a boundary step of (3, 4)
    # is as long as an inside step of (5, 0).
    diagonal = np.stack([np.arange(17) * 1.2, np.arange(17) * 0.9], axis=-1)
    assert faith.smoothness_from_centroids(diagonal) == pytest.approx(1.0)
    across = faith.group_boundaries(17, 4)
    moves = np.where(across[:, None], [3.0, 4.0], [5.0, 0.0])
    zigzag = np.concatenate([[[10.0, 10.0]], 10.0 + np.cumsum(moves, axis=0)])
    assert faith.smoothness_from_centroids(zigzag) == pytest.approx(1.0)


def test_motion_only_at_or_only_inside_boundaries():
    assert faith.smoothness_from_centroids(_centroids(_steps_with(4.0, 0.0))) == CAP  # +inf, capped
    assert faith.smoothness_from_centroids(_centroids(_steps_with(0.0, 2.0))) == 0.0
    # A ratio above the cap is the cap.
    assert faith.smoothness_from_centroids(_centroids(_steps_with(4.0, 0.01))) == CAP
    assert faith.smoothness_from_centroids(_centroids(_steps_with(4.0, 0.1))) == pytest.approx(40.0)


def test_only_steps_with_the_object_in_both_frames_count():
    c = _centroids(_steps_with(3.0, 1.5))
    c[2] = np.nan  # steps 1 -> 2 and 2 -> 3 (both inside) drop out; the rest are unchanged
    assert faith.smoothness_from_centroids(c) == pytest.approx(2.0)
    c = _centroids(np.full(16, 2.0))
    c[5] = np.nan  # drops boundary step 4 -> 5 and inside step 5 -> 6
    assert faith.smoothness_from_centroids(c) == pytest.approx(1.0)
    steps = np.ones(16)
    steps[4] = 9.0  # the long boundary step is not counted when frame 4 is missing
    c = _centroids(steps)
    c[4] = np.nan
    assert faith.smoothness_from_centroids(c) == pytest.approx(1.0)


def test_undefined_ratios_are_none():
    still = _centroids(np.zeros(16))
    assert faith.smoothness_from_centroids(still) is None  # 0 / 0
    assert faith.smoothness_from_centroids(still, min_mean_step=0.0) is None
    jitter = still + np.random.default_rng(0).normal(0, 0.15, still.shape)
    assert faith.smoothness_from_centroids(jitter) is None  # decoder jitter around a still object
    slow = _centroids(np.full(16, 0.9 * faith.MIN_MEAN_STEP))
    assert faith.smoothness_from_centroids(slow) is None
    assert faith.smoothness_from_centroids(slow, min_mean_step=0.1) == pytest.approx(1.0)
    absent = np.full((17, 2), np.nan)
    assert faith.smoothness_from_centroids(absent) is None
    only_first_two = absent.copy()
    only_first_two[:2] = [[10, 10], [14, 10]]  # one boundary step, no inside step
    assert faith.smoothness_from_centroids(only_first_two) is None
    inside_only = absent.copy()
    inside_only[1:5] = _centroids(np.full(3, 2.0))  # frames 1-4: inside steps only
    assert faith.smoothness_from_centroids(inside_only) is None
    assert faith.smoothness_from_centroids(_centroids(np.full(4, 2.0)), group_frames=1) is None
    assert faith.smoothness_from_centroids(_centroids([])) is None  # one frame


def test_objects_are_pooled():
    a = _centroids(_steps_with(3.0, 1.5))
    b = _centroids(np.full(16, 1.5), start=(40.0, 50.0))
    # boundary mean (4 * 3 + 4 * 1.5) / 8, inside mean 1.5
    assert faith.smoothness_from_centroids([a, b]) == pytest.approx(2.25 / 1.5)
    assert faith.smoothness_from_centroids((a,)) == faith.smoothness_from_centroids(a)


# ---------------------------------------------------------------------------------------------
# Rendered clips
# ---------------------------------------------------------------------------------------------

def _world_scores(split, n, **cfg):
    src = world.ShapesSource(split, size=n, config=world.WorldConfig(**cfg))
    items = [src[i] for i in range(n)]
    return faith.smoothness_scores([it["video"] for it in items], [it["caption"] for it in items])


def test_world_clips_score_about_one():
    """Measured on these 48 held-out / 48 training clips (64 px, 17 frames): median 1.000 / 1.002,
    p90 1.08 / 1.07, every clip scored. Single clips spread (0.69-1.32) because a hard-edged
    object's centroid moves in whole-pixel steps and a clip has only 4 boundary steps; medians
    do not."""
    for split in ("heldout", "train"):
        scores = _world_scores(split, 48)
        assert all(s is not None for s in scores), split
        summary = faith.smoothness_summary(scores)
        assert summary["smoothness_n"] == 48
        assert 0.97 <= summary["smoothness_median"] <= 1.03, (split, summary)
        assert summary["smoothness_p90"] <= 1.15, (split, summary)
        assert 0.6 <= min(scores) and max(scores) <= 1.4, split
    # Two objects, and another resolution and length.
    assert 0.97 <= faith.smoothness_summary(_world_scores("heldout", 24, num_objects=2))["smoothness_median"] <= 1.03
    assert 0.95 <= faith.smoothness_summary(_world_scores("heldout", 24, resolution=32))["smoothness_median"] <= 1.05
    assert 0.95 <= faith.smoothness_summary(_world_scores("heldout", 24, num_frames=33))["smoothness_median"] <= 1.05


def test_rendered_stepped_clips():
    # Held still inside each group, jumping at boundaries: far above 1 (the cap: inside steps are 0).
    stepped = _render_path(_path(_steps_with(8.0, 0.0)[:8]), resolution=64)  # 9 frames, 2 groups
    assert faith.smoothness(stepped) == CAP
    # Boundary steps twice the inside ones (the reconstructions: 2.06x).
    vae_like = _render_path(_path(_steps_with(3.0, 1.5)))
    assert faith.smoothness(vae_like) == pytest.approx(2.0, abs=0.15)
    # Motion only inside groups: 0.
    inside = _render_path(_path(_steps_with(0.0, 2.0)))
    assert faith.smoothness(inside) == 0.0
    # Even motion, rendered: about 1.
    even = _render_path(_path(np.full(16, 2.0)))
    assert faith.smoothness(even) == pytest.approx(1.0, abs=0.1)


def test_two_objects_are_scored_apart():
    """Two circles moving apart with the same stepped profile: their joint centroid stands still
    (no score), each object's moves 2x as far across boundaries; the caption's colours separate
    them."""
    xs = _path(_steps_with(1.5, 0.75), start=32.0)
    frames = []
    for x in xs:
        objects = [dict(shape="circle", colour="red", size=10.0, x0=float(x), y0=16.0, vx=0.0, vy=0.0),
                   dict(shape="circle", colour="green", size=10.0, x0=float(64 - x), y0=48.0, vx=0.0, vy=0.0)]
        frames.append(world.render(objects, (20, 30, 40), 1, 64))
    clip = np.concatenate(frames)
    caption = "a red circle moves right and a green circle moves left"
    assert faith.smoothness(clip) is None
    assert faith.smoothness(clip, colours=["red", "green"]) == pytest.approx(2.0, abs=0.2)
    (score,) = faith.smoothness_scores(clip[None], [caption])
    assert score == faith.smoothness(clip, colours=["red", "green"])
    assert faith.score_video(clip, caption)["smoothness"] == score
    assert faith.smoothness_scores(clip[None]) == [None]  # without captions: all foreground as one
    with pytest.raises(ValueError, match="captions"):
        faith.smoothness_scores(clip[None], [caption, caption])


def test_still_object_gives_none():
    still = _render_path(np.full(17, 30.0))
    assert faith.smoothness(still) is None
    assert faith.score_video(still, "a red circle moves left")["smoothness"] is None
    blank = np.full((17, 64, 64, 3), 30, np.uint8)
    assert faith.smoothness(blank) is None  # nothing visible


def test_group_length_parameter():
    """Motion on every other step (g = 2's boundaries): with g = 2 all of it is at boundaries; with
    g = 4 the boundary steps all move and a third of the inside ones do, 3x."""
    steps = _steps_with(3.0, 0.0, g=2)
    clip = _render_path(_path(steps, start=8.0))
    assert faith.smoothness(clip, group_frames=2) == CAP
    assert faith.smoothness(clip, group_frames=4) == pytest.approx(3.0, abs=0.2)
    assert faith.smoothness(clip) == faith.smoothness(clip, group_frames=4)  # the default
    # g = 3 on 13 frames: boundary steps 2x inside.
    clip3 = _render_path(_path(_steps_with(3.0, 1.5, num_frames=13, g=3)))
    assert faith.smoothness(clip3, group_frames=3) == pytest.approx(2.0, abs=0.15)
    assert faith.smoothness(clip3, group_frames=4) < 1.5
    # ... through score_video and the plug-in.
    assert faith.score_video(clip, "a red circle moves right", group_frames=2)["smoothness"] == CAP
    for g, want in ((2, CAP), (4, 3.0)):
        plugin = faith.SyntheticFaithfulness(group_frames=g)
        record = plugin.update(clip, "a red circle moves right", mode="T2V", heldout=True)
        assert record["smoothness"] == pytest.approx(want, abs=0.2)
        assert plugin.result()["T2V"]["all"]["smoothness_median"] == pytest.approx(want, abs=0.2)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def test_summary_median_p90_and_count():
    values = [1.0, None, 2.0, 3.0, 4.0, None]
    s = faith.smoothness_summary(values)
    assert s == dict(smoothness_median=2.5, smoothness_p90=pytest.approx(3.7), smoothness_n=4)
    assert faith.smoothness_summary([None, None]) == dict(smoothness_median=None, smoothness_p90=None,
                                                          smoothness_n=0)
    assert faith.smoothness_summary([]) == dict(smoothness_median=None, smoothness_p90=None, smoothness_n=0)


def test_faithfulness_report_and_table_carry_smoothness():
    plugin = faith.SyntheticFaithfulness()
    even = _render_path(_path(np.full(16, 2.0)))
    vae_like = _render_path(_path(_steps_with(3.0, 1.5)))
    still = _render_path(np.full(17, 30.0))
    for video, held in ((even, True), (vae_like, True), (still, False), (vae_like, False)):
        plugin.update(video, "a red circle moves right", mode="I2V", heldout=held, first_frame=video[0])
    report = plugin.result()["I2V"]
    assert report["heldout"]["smoothness_n"] == 2 and report["seen"]["smoothness_n"] == 1
    assert report["all"]["smoothness_n"] == 3
    assert report["heldout"]["smoothness_median"] == pytest.approx(1.5, abs=0.1)
    assert report["all"]["smoothness_median"] == pytest.approx(2.0, abs=0.15)
    # The keys the report had before smoothness are unchanged.
    assert {"n", "colour_acc", "direction_acc", "consistency_acc", "first_psnr", "last_psnr"} <= set(report["all"])
    table = faith.format_report(plugin.result())
    lines = table.splitlines()
    assert "smooth_med" in lines[0] and "smooth_p90" in lines[0]
    assert len({len(line) for line in lines}) == 1  # fixed width
    assert f"{report['all']['smoothness_median']:.2f}" in lines[-1]


def test_reconstruction_evaluator_scores_smoothness():
    """A stand-in VAE with 2x temporal compression that decodes each latent group as its first
    frame (motion only at the boundaries): scored with the VAE's own temporal_factor as the group
    length, the reconstructions score the cap (with the default 4 they would score about 3), the
    clips about 1."""
    import jax.numpy as jnp

    class SteppedVAE:
        class model:
            temporal_factor = 2

        def encode(self, videos):
            return jnp.asarray(videos, jnp.float32) / 127.5 - 1.0

        def decode_float(self, z):
            g = self.model.temporal_factor
            frames = np.arange(z.shape[1])
            held = np.where(frames == 0, 0, (frames - 1) // g * g + 1)  # first frame of each group
            return z[:, held]

    config = ml_collections.ConfigDict(dict(
        data=dict(name="shapes", num_frames=17, resolution=32, num_objects=1, world_seed=0),
        vae=dict(eval_videos=8)))
    result = reconstruction.Reconstruction(config).evaluate(SteppedVAE(), step=0)
    report = result.report
    assert report["group_frames"] == 2
    assert report["smoothness_n"] == 8 and report["smoothness_median"] == CAP
    assert report["real"]["smoothness_n"] == 8
    assert 0.9 <= report["real"]["smoothness_median"] <= 1.1
    assert report["colour_acc_real"] == 1.0 and report["colour_acc"] >= 0.75  # held frames keep colours
    assert set(result.scalars) == {"psnr", "ssim", "psnr_min", "num_videos"}  # the logged tags
    report = reconstruction.smoothness_report(SteppedVAE(), np.zeros((0, 17, 32, 32, 3), np.uint8),
                                              np.zeros((0, 17, 32, 32, 3), np.uint8), [])
    assert report["smoothness_n"] == 0 and report["smoothness_median"] is None


def test_reconstruction_colour_report_catches_a_hue_shift():
    """colour_report: reconstructions equal to the clips keep every colour with no background
    error; a VAE that swaps red and green keeps almost none (the shapes world's palette moves to
    other names) and its background error is the channels' difference; the evaluator reports it."""
    from pixeldance.data import synthetic as world

    source = world.ShapesSource("heldout", size=12, config=world.WorldConfig(num_frames=9, resolution=32))
    items = [source[i] for i in range(12)]
    videos = np.stack([it["video"] for it in items])
    captions = [it["caption"] for it in items]
    same = reconstruction.colour_report(videos, videos.copy(), captions)
    assert same == dict(colour_acc=1.0, colour_acc_real=1.0, background_error=0.0)
    swapped = videos[..., [1, 0, 2]]
    report = reconstruction.colour_report(videos, swapped, captions)
    assert report["colour_acc"] <= 0.5 and report["colour_acc_real"] == 1.0
    background = np.median(videos[:, :, 0, :, :].astype(float), axis=2)  # [N, F, 3] top rows
    want = np.abs(background[..., 0] - background[..., 1]).mean()
    assert report["background_error"] == pytest.approx(want, abs=2.0) and report["background_error"] > 3
    assert reconstruction.colour_report(videos[:0], videos[:0], [])["colour_acc"] is None


def test_cache_stage_refuses_a_vae_that_loses_colours(monkeypatch):
    """check_vae_colours: an identity VAE passes (report returned), a red-green swapping one is
    refused in one line naming the workdir's VAE and the way out; no check for converted weights
    (no VAE step), min_colour_acc 0, other data, or configs saved before the field."""
    import jax.numpy as jnp
    from pixeldance import configs
    from pixeldance import workdir as workdir_lib
    from pixeldance.trainers import cache as cache_stage

    class VAE:
        def __init__(self, swap):
            self.swap = swap

        def encode(self, videos):
            return jnp.asarray(videos, jnp.float32) / 127.5 - 1.0

        def decode_float(self, z):
            return z[..., [1, 0, 2]] if self.swap else z

    config = configs.override(configs.load_config("experiments/shapes.py:runlocal"), **{"vae.min_colour_acc": 0.75})
    assert configs.load_config("experiments/shapes.py").vae.min_colour_acc == 0.75
    monkeypatch.setattr(workdir_lib, "vae_step", lambda workdir: 1500)
    report = cache_stage.check_vae_colours(config, "/wd", lambda: VAE(False))
    assert report["colour_acc"] == 1.0
    with pytest.raises(ValueError, match=r"^the VAE in /wd/vae \(step 1500\) keeps the objects' colours in 0\.\d\d of 16 "
                                         r"held-out clips, under config.vae.min_colour_acc=0.75.*min_colour_acc=0 to use it anyway$"):
        cache_stage.check_vae_colours(config, "/wd", lambda: VAE(True))
    for off in (configs.override(config, **{"vae.min_colour_acc": 0.0}),
                configs.override(config, **{"data.name": "video_folder"})):
        assert cache_stage.check_vae_colours(off, "/wd", lambda: VAE(True)) is None
    import ml_collections
    old = ml_collections.ConfigDict(config.to_dict())
    del old.vae["min_colour_acc"]
    assert cache_stage.check_vae_colours(old, "/wd", lambda: VAE(True)) is None
    monkeypatch.setattr(workdir_lib, "vae_step", lambda workdir: None)  # converted weights
    assert cache_stage.check_vae_colours(configs.override(config, **{"vae.min_colour_acc": 0.75}), "/wd",
                                         lambda: VAE(True)) is None


def test_faithfulness_evaluator_uses_the_pipelines_vae():
    """The 'faithfulness' evaluator scores smoothness with the pipeline VAE's temporal_factor and
    keeps it in the report, out of the logged scalars (TensorBoard's tags are fixed)."""
    from pixeldance.evaluators import samples

    clip = _render_path(_path(_steps_with(3.0, 0.0, g=2), start=8.0))  # moves at g = 2's boundaries

    class Pipe:
        class vae:
            class model:
                temporal_factor = 2

        def generate_batch(self, prompts, firsts, lasts, seed=0):
            return np.stack([clip] * len(prompts))

    config = ml_collections.ConfigDict(dict(
        data=dict(name="shapes", num_frames=17, resolution=64, num_objects=1, world_seed=0),
        evals=dict(num_per_mode=2, heldout_fraction=0.5, num_mp4=0), sample=dict(batch_size=2)))
    result = samples.Faithfulness(config).evaluate(Pipe(), step=0)
    for mode in faith.MODES:
        assert result.report[mode]["all"]["smoothness_median"] == CAP, mode  # with g = 4: 3.0
        assert result.report[mode]["all"]["smoothness_n"] == 2
    assert "T2V/all/colour_acc" in result.scalars
    assert not [k for k in result.scalars if "smoothness" in k]


def _benchmark():
    """benchmarks/smoothness.py as a module (benchmarks/ is not a package)."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "smoothness.py")
    spec = importlib.util.spec_from_file_location("smoothness_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_scores_a_sample_folder(tmp_path):
    """benchmarks/smoothness.py's pieces: a folder of `<mode>_<k>.mp4` with captions.txt is read
    per mode and scored (mp4 compression leaves the world's clips about 1 and a stepped clip high);
    a missing workdir is one line."""
    import os
    import subprocess
    import sys

    from pixeldance.data import video_io

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench = _benchmark()
    src = world.ShapesSource("heldout", size=4, config=world.WorldConfig())
    items = [src[i] for i in range(4)]
    stepped = _render_path(_path(_steps_with(3.0, 1.5)))
    for k, it in enumerate(items):
        video_io.write_mp4(str(tmp_path / f"I2V_{k}.mp4"), it["video"])
        video_io.write_mp4(str(tmp_path / f"T2V_{k}.mp4"), stepped)
    (tmp_path / "captions.txt").write_text("\n".join(it["caption"] + "  [held out]" for it in items) + "\n")
    sets = bench._sample_sets(str(tmp_path))
    assert sorted(sets) == ["I2V", "T2V"]
    videos, captions, names = sets["I2V"]
    assert names == [f"I2V_{k}.mp4" for k in range(4)] and captions == [it["caption"] for it in items]
    real = bench.score_set(videos, captions, 4, faith.MIN_MEAN_STEP)
    assert real["smoothness_n"] == 4 and 0.8 <= real["smoothness_median"] <= 1.2
    high = bench.score_set(sets["T2V"][0], None, 4, faith.MIN_MEAN_STEP)
    assert high["smoothness_median"] == pytest.approx(2.0, abs=0.2)
    assert high["consecutive_psnr"]["across"] < high["consecutive_psnr"]["inside"]
    proc = subprocess.run([sys.executable, os.path.join(repo, "benchmarks", "smoothness.py"),
                           f"--workdir={tmp_path / 'none'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: no pixeldance workdir")


class _PixelVAE:
    """A stand-in VAE whose latents are the frames themselves (float, /255): encode and decode
    invert each other exactly, so the noise the benchmark adds is all that changes."""

    def encode(self, videos):
        return np.asarray(videos, np.float32) / 255.0

    def decode(self, z):
        return np.clip(np.round(np.asarray(z) * 255.0), 0, 255).astype(np.uint8)


def test_benchmark_noisy_reconstructions():
    """--latent_noise: sigma 0 gives the clips back; 'shared' adds one draw on every frame,
    'iid' a draw per frame; sigmas are in the latents' own standard deviations."""
    bench = _benchmark()
    src = world.ShapesSource("heldout", size=3, config=world.WorldConfig())
    items = [src[i] for i in range(3)]
    videos, captions = np.stack([it["video"] for it in items]), [it["caption"] for it in items]
    std = np.full(3, 4.0 / 255, np.float32)  # noise of sigma 1 is 4 grey levels
    out = bench.noisy_reconstructions(_PixelVAE(), videos, captions, std, [0.0, 1.0], 4, faith.MIN_MEAN_STEP, 2)
    assert sorted(out) == [f"noisy_reconstructions/{k}_{s}" for k in ("iid", "shared") for s in ("0", "1")]
    clean = out["noisy_reconstructions/iid_0"]
    assert clean["psnr"] == 100.0 and clean["per_video"] == bench.score_set(videos, captions, 4,
                                                                               faith.MIN_MEAN_STEP)["per_video"]
    for kind in ("iid", "shared"):
        r = out[f"noisy_reconstructions/{kind}_1"]
        assert 30 < r["psnr"] < 45 and r["sigma"] == 1.0 and r["kind"] == kind
    # On still clips: one draw on every frame keeps the frames equal; a draw per frame does not.
    still = np.repeat(videos[:, :1], videos.shape[1], axis=1)
    out = bench.noisy_reconstructions(_PixelVAE(), still, captions, std, [1.0], 4, faith.MIN_MEAN_STEP, 2)
    shared, iid = (out[f"noisy_reconstructions/{k}_1"]["consecutive_psnr"] for k in ("shared", "iid"))
    assert shared == dict(across=100.0, inside=100.0) and 30 < iid["inside"] < 45 and 30 < iid["across"] < 45
