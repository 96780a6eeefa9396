"""benchmarks/long_video.py and benchmarks/feature_speed.py: their pieces and tiny end-to-end runs
(timings are never asserted: see benchmarks/README.md)."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


long_video = _load("long_video")


def test_clip_prompts_frames_and_windows():
    assert long_video.clip_prompts("a red circle moves up", 3) == [
        "a red circle moves up", "a red circle moves down", "a red circle moves up"]
    F = 9
    video = np.arange(F + 2 * (F - 1))[:, None, None, None] * np.ones((1, 2, 2, 3), int)  # 3 clips
    for k in range(3):  # clip k starts on clip k - 1's last frame
        np.testing.assert_array_equal(long_video.clip_frames(video, k, F)[:, 0, 0, 0], np.arange(8 * k, 8 * k + F))
    # In latent space (T = 3, K = 2) each later clip adds 4 frames; clip k ends at frame F - 1 + 4k.
    assert long_video.frames_per_clip("latent", F, 3, 2) == 4 and long_video.frames_per_clip("reencode", F, 3, 2) == 8
    assert long_video.frames_per_clip("latent", 17, 5, 1) == 16 and long_video.frames_per_clip("latent", 17, 5, 2) == 12
    for k in range(3):
        np.testing.assert_array_equal(long_video.clip_frames(video, k, F, 4)[:, 0, 0, 0], np.arange(4 * k, 4 * k + F))
    # Boundaries: F frames centred on clip k's first new frame (re-encoding: frame 8k + 1 after
    # clip k - 1's last, 8k; latent K = 2: 4k + 5), F // 2 = 4 of them before it.
    for k in (1, 2):
        np.testing.assert_array_equal(long_video.boundary_frames(video, k, F, F - 1)[:, 0, 0, 0],
                                      np.arange(8 * k + 1 - 4, 8 * k + 1 - 4 + F))
        np.testing.assert_array_equal(long_video.boundary_frames(video, k, F, 4)[:, 0, 0, 0],
                                      np.arange(4 * k + 5 - 4, 4 * k + 5 - 4 + F))
    w = long_video.windows(video, 16)
    assert w.shape == (1, 16, 2, 2, 3) and w[0, -1, 0, 0, 0] == 15  # the last 9 frames make no whole window
    # Scores per clip and the comparison of the two modes.
    yes = dict(colour_correct=True, shape_correct=True, direction_correct=True, consistent=True)
    no = dict(yes, shape_correct=False, direction_correct=False)
    latent = long_video.per_clip_fractions([[yes, yes], [yes, no]])
    reencode = long_video.per_clip_fractions([[yes, no], [no, no]])
    assert latent == dict(colour=[1.0, 1.0], shape=[1.0, 0.5], direction=[1.0, 0.5], consistent=[1.0, 1.0])
    c = long_video.compare(latent, reencode)
    assert c["shape"] == dict(latent_minus_reencode=[0.5, 0.5], at_or_above=2, clips=2)
    assert c["colour"]["at_or_above"] == 2 and c["colour"]["latent_minus_reencode"] == [0.0, 0.0]
    assert long_video.compare(reencode, latent)["direction"]["at_or_above"] == 0
    # What each true shape is read as, over clips and videos ('none': nothing read).
    sq, ci = dict(yes, predicted_shapes=("square",)), dict(yes, predicted_shapes=("circle",))
    lost, unread = dict(yes, predicted_shapes=()), dict(yes, predicted_shapes=(None,))
    confusion = long_video.shape_confusion([[sq, ci, ci], [ci, ci, lost], [ci, ci, unread]],
                                           ["square", "circle", "triangle"])
    assert confusion == {"square": {"circle": 2 / 3, "square": 1 / 3}, "circle": {"circle": 1.0},
                         "triangle": {"circle": 1 / 3, "none": 2 / 3}}


def test_long_video_end_to_end(runlocal_workdir, networks_root, tmp_path):
    out = tmp_path / "long.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "long_video.py"), f"--workdir={runlocal_workdir}",
         # num_real = num_videos: one I3D batch shape; one keyframe video: the batch of a clip
         f"--networks={networks_root}", "--num_videos=2", "--num_clips=3", "--num_real=2", "--group=1",
         "--context_latents=2", "--keyframe_videos=1", "--ceiling_videos=1", "--ceiling_long_frames=33",
         f"--output={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    re, la = result["modes"]["reencode"], result["modes"]["latent"]
    assert re["frames_per_video"] == 9 + 2 * 8 and la["frames_per_video"] == 9 + 2 * 4  # T = 3, K = 2
    for m in (re, la):
        assert set(m["per_clip"]) == {"colour", "shape", "direction", "consistent"}
        assert all(len(v) == 3 and all(0.0 <= x <= 1.0 for x in v) for v in m["per_clip"].values())
        assert m["at_last_clip"] == {k: v[-1] for k, v in m["per_clip"].items()}
        assert set(m["per_boundary"]) == {"colour", "shape", "consistent"}
        assert all(len(v) == 2 for v in m["per_boundary"].values())
        assert len(m["fvd_per_window"]) == m["frames_per_video"] // 16 and all(np.isfinite(m["fvd_per_window"]))
        assert m["fvd_per_group"] == m["fvd_per_window"]  # groups of one window
        for key, clips in (("shape_read_first_clip", slice(0, 1)), ("shape_read_second_half", slice(1, 3))):
            assert all(abs(sum(read.values()) - 1.0) < 1e-9 for read in m[key].values()), m[key]
            # Read right, weighted by each true shape's videos: the per-clip shape score over those clips.
            right = np.mean([m[key][t].get(t, 0.0) for t in m["true_shapes"]])
            assert abs(right - np.mean(m["per_clip"]["shape"][clips])) < 1e-9, (key, m[key], m["per_clip"])
    assert result["latent_vs_reencode"]["shape"]["clips"] == 3
    assert set(result["vae_ceiling"]) == {"colour", "shape", "direction", "consistent"}
    assert all(0.0 <= v <= 1.0 for v in result["vae_ceiling"].values())
    long = result["vae_ceiling_long"]  # one stream of 33 frames: windows at 0, 8, 16, 24
    assert long["windows"] == 4 and long["num_frames"] == 33 and 0.0 <= long["consistent"] <= 1.0
    assert set(result["keyframe_psnr"]) == {"4"}  # T = 3: the one middle latent, pixel 4
    assert all(np.isfinite(v) for v in result["keyframe_psnr"]["4"].values())
    png = Image.open(tmp_path / "long.png")
    assert png.size == (900, 560)


def test_feature_speed_quick(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "feature_speed.py"), "--quick",
                           "--networks=inception", f"--output={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["cpu"] and len(result["results"]) == 1
    r = result["results"][0]
    assert r["network"] == "inception" and r["batch"] == 2 and r["ours_per_s"] > 0 and r["ratio"] > 0


def test_fvd_vae_ceiling_scores_the_reconstructions_against_the_evaluators_real_set(
        runlocal_workdir, networks_root, tmp_path):
    """benchmarks/fvd_vae_ceiling.py: the protocol's real items 0..N-1 reconstructed by the workdir's
    VAE, written as mp4 and scored against the real set `pixeldance.evaluate` uses; the same two
    folders through `tools.metrics` give the same numbers."""
    import shutil
    from pixeldance import sample
    from pixeldance import workdir as workdir_lib
    from pixeldance.data import video_io
    from pixeldance.evaluators import metrics as metrics_eval
    from pixeldance.evaluators import reconstruction
    from pixeldance.evaluators import synthetic as scoring
    from pixeldance.metrics import protocols
    wd = str(tmp_path / "wd")
    shutil.copytree(runlocal_workdir, wd)
    out = tmp_path / "ceiling.json"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "fvd_vae_ceiling.py"), f"--workdir={wd}",
           f"--networks={networks_root}", "--protocol=runlocal", "--metrics=fvd,fid", "--num_videos=4",
           f"--stats_dir={tmp_path / 'stats'}", f"--output={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["num_generated"] == 4 and result["num_real_videos"] == 16 and np.isfinite(result["fvd"])
    # The real statistics are cached under the evaluator's key, so `evaluate` and this share them.
    key = metrics_eval.ProtocolMetrics(workdir_lib.read_config(wd), "runlocal", root=networks_root).real_key()
    cached = sorted(os.listdir(tmp_path / "stats"))
    assert len(cached) == 2 and all(name.endswith(f"-{key}.npz") for name in cached), cached
    folder = os.path.join(wd, "eval", "runlocal")
    recon_dir = os.path.join(folder, "vae_reconstructions")
    assert sorted(os.listdir(recon_dir)) == [f"{i:06d}.mp4" for i in range(4)]
    # The files are the VAE's reconstructions of real items 0..3, in order (the same mp4 encode).
    source = metrics_eval.real_source(workdir_lib.read_config(wd), protocols.get("runlocal"))
    direct = reconstruction.reconstruct(sample.load_vae(wd), np.stack([source[i]["video"] for i in range(4)]))
    expected = []
    for i in range(4):
        path = str(tmp_path / f"direct_{i}.mp4")
        video_io.write_mp4(path, direct["recon"][i], fps=metrics_eval.fps_of(protocols.get("runlocal")))
        expected.append(video_io.read_video(path))
    for i in range(4):
        written = video_io.read_video(os.path.join(recon_dir, f"{i:06d}.mp4"))
        # (not bit-equal: another process's float rounding moves the codec's choices a little)
        assert scoring.psnr(written, expected[i]) > 30
        assert scoring.psnr(written, expected[(i + 1) % 4]) < 20
    # The same FVD from the two folders through the metrics CLI (FVD only: FID's Inception load
    # and compile would double this check, and the metrics CLI's FID is tests/test_metrics_tool.py's).
    other = tmp_path / "metrics.json"
    proc = subprocess.run([sys.executable, "-m", "pixeldance.tools.metrics", f"--real={folder}/real",
                           f"--generated={recon_dir}", "--metrics=fvd", "--protocol=runlocal",
                           f"--networks={networks_root}", f"--stats_dir={tmp_path / 'stats2'}",
                           f"--output={other}"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    independent = json.loads(other.read_text())
    np.testing.assert_allclose(result["fvd"], independent["fvd"], rtol=1e-6)
    # A second run reuses the files (nothing reconstructed) and gives the same numbers (FVD only:
    # the Inception network's load and compile are most of a run, and FID adds nothing here).
    proc = subprocess.run([a.replace("--metrics=fvd,fid", "--metrics=fvd") for a in cmd], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    again = json.loads(out.read_text())
    assert proc.returncode == 0 and again["psnr_this_run"] is None and again["fvd"] == result["fvd"]
    bad = subprocess.run(cmd[:2] + [f"--workdir={wd}", f"--networks={networks_root}", "--metrics=is"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--metrics" in bad.stderr


def test_probe_t2v_first_frame_summary():
    probe = _load("probe_t2v_first_frame")
    real = [np.full(5, 100)] * 4  # the real objects: 100 px throughout; "small" is under 50
    first_pass = [np.array([90, 90, 90, 90, 90])] * 4
    route = [np.array([100, 100, 100, 100, 100]), np.array([20, 60, 100, 100, 100]),
             np.array([100, 100, 100, 60, 30]), np.array([40, 80, 100, 100, 100])]
    s = probe.summary(route, first_pass, real, [True, False, False, False])
    assert s["consistent"] == 0.25 and s["small_threshold_px"] == 50.0
    assert s["frame0_area_median"] == dict(real=100.0, first_pass=90.0, route=70.0)
    assert s["route_frame0_area_median"] == dict(consistent=100.0, inconsistent=40.0)
    assert s["route_median_over_frame0"] == dict(consistent=1.0, inconsistent=2.5)
    assert s["route_starts_small"] == 0.5 and s["route_ends_small"] == 0.25
    assert s["inconsistent_starting_small"] == 2 / 3


def test_probe_t2v_first_frame_placement():
    """Positions along the asked direction: 0 at the edge the motion leaves, R at the edge it
    goes to, for each direction; medians per frame, starts past the centre, absent frames ignored."""
    probe = _load("probe_t2v_first_frame")
    R = 64
    c = np.array([[10.0, 50.0], [20.0, 40.0]])  # (x, y) at two frames
    np.testing.assert_allclose(probe.progress(c, "right", R), [10, 20])
    np.testing.assert_allclose(probe.progress(c, "left", R), [54, 44])
    np.testing.assert_allclose(probe.progress(c, "down", R), [50, 40])
    np.testing.assert_allclose(probe.progress(c, "up", R), [14, 24])
    p = probe.placement([np.array([10.0, 40.0]), np.array([40.0, 50.0]), np.array([np.nan, 60.0]),
                         np.array([20.0, 30.0])], R)
    assert p["median_progress"] == [20.0, 45.0]
    assert p["start_past_centre"] == 1 / 3


def test_vae_shape_ceiling_scores_reconstructions_and_reads_fills_per_true_shape(runlocal_workdir, tmp_path):
    """benchmarks/vae_shape_ceiling.py: the fills of real clips sit where the evaluator's thresholds
    put each shape; on a workdir, the ceiling is long_video's and the JSON names the VAE stage."""
    from pixeldance.data import synthetic
    from pixeldance.evaluators.synthetic import fill_thresholds
    ceiling = _load("vae_shape_ceiling")
    items = synthetic.ShapesSource("heldout", size=24, config=synthetic.WorldConfig(seed=5))
    videos = np.stack([items[i]["video"] for i in range(24)])
    fills = ceiling.fills_by_shape(videos, [items[i]["caption"] for i in range(24)])
    assert set(fills) == {"circle", "square", "triangle"}, fills
    low, high = fill_thresholds(videos.shape[2])
    assert fills["square"][0] > high and fills["triangle"][2] < low
    assert low < fills["circle"][0] <= fills["circle"][1] <= fills["circle"][2] < high
    from pixeldance.evaluators.synthetic import analyse_video
    circles = [analyse_video(items[i]["video"])["fill"] for i in range(24) if "circle" in items[i]["caption"]]
    assert fills["circle"] == [round(float(np.percentile(circles, q)), 3) for q in (0, 50, 100)]
    out = tmp_path / "ceiling.json"
    ceiling.main([f"--workdir={runlocal_workdir}", "--num_videos=8", f"--output={out}"])
    result = json.loads(out.read_text())
    assert set(result["ceiling"]) == {"colour", "shape", "direction", "consistent"}
    assert all(0.0 <= v <= 1.0 for v in result["ceiling"].values())
    assert result["num_videos"] == 8 and np.isfinite(result["psnr"]) and result["vae_steps"] >= 1
    assert set(result["fill_by_shape"]) <= {"circle", "square", "triangle"}
    # A bad workdir: one line, exit code 2.
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "vae_shape_ceiling.py"),
                           f"--workdir={tmp_path / 'missing'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "missing" in proc.stderr, proc.stderr


def test_probe_shape_keeping_ddim_step_and_end_to_end(runlocal_workdir, tmp_path):
    """benchmarks/probe_shape_keeping.py: its DDIM step is the 'ddim' sampler's at eta 0, lands on
    x0 at t = 0, and at eta 1 adds DDPM's posterior spread; on a workdir the JSON reads every
    true shape in each of the three ways."""
    import jax
    import jax.numpy as jnp
    from pixeldance.diffusion import schedules
    probe = _load("probe_shape_keeping")
    x0, eps = jnp.full((4096,), 0.3), jnp.full((4096,), -0.5)
    noise = jax.random.normal(jax.random.key(0), (4096,))
    t, t_next = jnp.float32(0.6), jnp.float32(0.4)
    a_n, s_n = schedules.alpha_sigma(t_next, "ddpm")
    np.testing.assert_allclose(probe.ddim_eta_step(x0, eps, t, t_next, noise, 0.0, "ddpm"), a_n * x0 + s_n * eps, rtol=1e-6)
    np.testing.assert_allclose(probe.ddim_eta_step(x0, eps, t, jnp.float32(0.0), noise, 1.0, "ddpm"), x0, atol=1e-6)
    a_t, s_t = schedules.alpha_sigma(t, "ddpm")
    want = float(jnp.sqrt((s_n ** 2 / s_t ** 2) * (1 - a_t ** 2 / a_n ** 2)))
    got = probe.ddim_eta_step(x0, eps, t, t_next, noise, 1.0, "ddpm")
    assert abs(float(jnp.std(got)) - want) < 0.05 * want and 0 < want < float(s_n)
    assert abs(float(jnp.mean(got)) - float(a_n * 0.3 + jnp.sqrt(s_n ** 2 - want ** 2) * -0.5)) < 0.05
    # Fills and reads of real clips: every shape read right.
    from pixeldance.data import synthetic
    items = synthetic.ShapesSource("heldout", size=12, config=synthetic.WorldConfig(seed=5))
    read = probe.read_shapes(np.stack([items[i]["video"] for i in range(12)]), [items[i]["caption"] for i in range(12)])
    assert read["shape"] == 1.0 and all(read[s]["read"] == 1.0 for s in ("circle", "square", "triangle") if s in read)
    out = tmp_path / "probe.json"
    probe.main([f"--workdir={runlocal_workdir}", "--num_videos=4", "--levels=0.1,0.5", "--steps=2",
                "--image_guidance=3", "--pipeline_modes=i2v,direct", "--split=train", "--negative=square:circle",
                f"--output={out}"])
    result = json.loads(out.read_text())
    assert result["image_guidance"] == 3.0  # the flag over the workdir's config.sample
    assert result["split"] == "train" and len(result["captions"]) == 4 and result["negative"] == {"square": "circle"}
    assert set(result["latent_distance"]) == {"circle-square", "circle-triangle", "square-triangle"}
    assert all(d > 0 for d in result["latent_distance"].values())
    assert all(tuple(synthetic.parse_caption(c)[0]) in synthetic.TRAIN_COMBOS for c in result["captions"])
    assert set(result["pipeline"]) == {"i2v", "direct"}
    assert set(result["denoise"]) == {"0.1", "0.5"} and set(result["sample"]) == {"steps2_eta0", "steps2_eta1"}
    for reading in [result["vae"], *result["denoise"].values(), *result["sample"].values(),
                    *result["pipeline"].values()]:
        assert 0.0 <= reading["shape"] <= 1.0 and 0.0 <= reading["colour"] <= 1.0
        shapes = [k for k in reading if k in ("circle", "square", "triangle")]
        assert shapes and sum(reading[k]["n"] for k in shapes) == 4
    for bad in ("--levels=1.5", "--steps=0", "--levels=x", "--image_guidance=0.5", "--pipeline_modes=t2v",
                "--split=seen", "--negative=square:oval", "--negative=square", "--negative=circle:circle"):
        proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "probe_shape_keeping.py"),
                               f"--workdir={runlocal_workdir}", bad], capture_output=True, text=True)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (bad, proc.stderr)


def test_long_video_open_workdir_draws_the_split_asked_for(runlocal_workdir):
    """open_workdir's items (long_video.py, probe_shape_keeping.py --split): held-out
    combinations by default, trained-on ones with split='train'."""
    from pixeldance.data import synthetic
    lv = _load("long_video")
    for split, combos in (("heldout", synthetic.HELD_OUT), ("train", synthetic.TRAIN_COMBOS)):
        kwargs = {} if split == "heldout" else dict(split=split)
        *_, items = lv.open_workdir(runlocal_workdir, None, 3000, 12, **kwargs)
        parsed = [synthetic.parse_caption(items[i]["caption"])[0] for i in range(12)]
        assert all(tuple(p) in combos for p in parsed), (split, parsed)


def test_probe_shape_keeping_swap_distances_compare_each_clip_drawn_as_each_shape():
    """swap_distances: each item redrawn as every shape, encoded and normalised; with an identity
    'VAE' the pair's number is the mean squared pixel difference of the two drawings."""
    from types import SimpleNamespace
    from pixeldance.data import synthetic
    probe = _load("probe_shape_keeping")
    pipe = SimpleNamespace(vae=SimpleNamespace(encode=lambda v: v.astype(np.float32) / 255),
                           stats=SimpleNamespace(normalise=lambda z: 2 * z))
    source = synthetic.ShapesSource("heldout", size=3, config=synthetic.WorldConfig(seed=2))
    got = probe.swap_distances(pipe, source, 3)

    def drawn(shape):
        out = []
        for i in range(3):
            _, objects, background = source.objects(i)
            out.append(synthetic.render([dict(objects[0], shape=shape)], background, 17, 64))
        return 2 * np.stack(out).astype(np.float64) / 255

    for pair in ("circle-square", "circle-triangle", "square-triangle"):
        a, b = pair.split("-")
        np.testing.assert_allclose(got[pair], np.mean((drawn(a) - drawn(b)) ** 2), rtol=1e-6)
    assert got["circle-square"] < got["square-triangle"]  # a square covers a circle's pixels


def test_probe_shape_keeping_negative_captions_swap_only_the_named_shapes():
    probe = _load("probe_shape_keeping")
    caps = ["a red square moves left", "a blue circle moves up", "a white triangle moves down"]
    assert probe.negative_captions(caps, {"square": "circle"}) == ["a red circle moves left", None, None]
    assert probe.negative_captions(caps, {"circle": "square", "triangle": "circle"}) == [
        None, "a blue square moves up", "a white circle moves down"]


def test_probe_shape_keeping_pipeline_videos_pass_first_frames_only_for_i2v():
    """The 'pipeline' reading: 'i2v' gives each caption its own first frame; the text-only modes
    give none and name their text-to-video route; batches keep the captions' order."""
    probe = _load("probe_shape_keeping")
    calls = []

    class FakePipe:
        def generate_batch(self, prompts, firsts, lasts, *, seed, guidance, image_guidance, text_to_video):
            calls.append((list(prompts), firsts, text_to_video, seed, guidance, image_guidance))
            return np.stack([np.full((2, 4, 4, 3), int(p), np.uint8) for p in prompts])

    caps = [str(i) for i in range(5)]
    firsts = np.arange(5)[:, None, None, None] * np.ones((5, 4, 4, 3), np.uint8)
    out = probe.pipeline_videos(FakePipe(), "i2v", caps, firsts, 8.0, 1.5, batch=2)
    assert [int(v[0, 0, 0, 0]) for v in out] == [0, 1, 2, 3, 4]
    assert [c[0] for c in calls] == [["0", "1"], ["2", "3"], ["4"]] and all(c[2] is None for c in calls)
    assert all(int(f[0, 0, 0]) == int(p) for c in calls for p, f in zip(c[0], c[1]))
    assert calls[0][4:] == (8.0, 1.5)
    calls.clear()
    probe.pipeline_videos(FakePipe(), "first_frame", caps, firsts, 4.0, 1.0, batch=8)
    assert calls[0][1] == [None] * 5 and calls[0][2] == "first_frame"
