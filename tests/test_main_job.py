"""The main job (`python -m pixeldance.main --config=experiments/shapes.py:runlocal`): outputs and resume."""
import glob
import json
import math
import os
import shutil
import time

from PIL import Image

from pixeldance.data import latent_cache, video_io

MODES = ("T2V", "I2V", "FLF2V")


def _lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _checkpoint_steps(directory):
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _folder_bytes(folder):
    """{file name: contents} of a folder (the latent cache's shards and meta.json)."""
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


def test_workdir_has_checkpoints_and_config(runlocal_workdir):
    with open(os.path.join(runlocal_workdir, "config.json")) as f:
        config = json.load(f)
    assert config["vae"]["variant"] == "mu" and config["data"]["resolution"] == 32
    assert _checkpoint_steps(os.path.join(runlocal_workdir, "vae")) == [2, config["vae"]["num_steps"]]
    assert _checkpoint_steps(os.path.join(runlocal_workdir, "dit")) == [2, config["train"]["num_steps"]]
    cache = latent_cache.LatentCacheSource(os.path.join(runlocal_workdir, "cache")).read_all()
    assert cache["z"].shape == (config["cache"]["num_videos"], 3, 4, 4, 16)
    assert len(cache["captions"]) == config["cache"]["num_videos"]
    with open(os.path.join(runlocal_workdir, "latent_stats.json")) as f:
        stats = json.load(f)
    assert len(stats["mean"]) == len(stats["std"]) == 16 and min(stats["std"]) > 0


def test_metrics_and_tensorboard(runlocal_workdir):
    lines = _lines(runlocal_workdir)
    for stage in ("vae", "dit"):
        steps = [line["step"] for line in lines if line["stage"] == stage]
        assert steps == [2, 4], stage  # log_every 2 of 4 steps
    for line in lines:
        if line["stage"] in ("vae", "dit"):
            assert math.isfinite(line["loss"]) and math.isfinite(line["grad_norm"]), line
    assert {"l1", "l2", "kl", "psnr"} <= set(lines[0])
    # The VAE's held-out reconstructions after training, with the EMA parameters.
    (evaluation,) = [line for line in lines if line["stage"] == "vae_eval"]
    assert evaluation["step"] == 4 and 0 < evaluation["psnr"] < 100 and 0 < evaluation["ssim"] <= 1
    for stage in ("vae", "dit"):
        events = glob.glob(os.path.join(runlocal_workdir, "tensorboard", stage, "events.out.tfevents.*"))
        assert events and all(os.path.getsize(e) > 0 for e in events), stage


def test_samples(runlocal_workdir):
    samples = os.path.join(runlocal_workdir, "samples")
    mp4s = sorted(os.path.basename(p) for p in glob.glob(os.path.join(samples, "*.mp4")))
    assert mp4s == sorted(f"{mode}_0.mp4" for mode in MODES)  # eval.num_mp4 = 1 per mode
    for name in mp4s:
        video = video_io.read_video(os.path.join(samples, name))
        assert video.shape == (9, 32, 32, 3), name
    with Image.open(os.path.join(samples, "grid.gif")) as gif:
        assert gif.format == "GIF" and gif.n_frames == 9
    with open(os.path.join(samples, "captions.txt")) as f:
        assert "[held out]" in f.read()


def test_faithfulness_report(runlocal_workdir):
    with open(os.path.join(runlocal_workdir, "faithfulness.json")) as f:
        report = json.load(f)
    assert set(report) == set(MODES)
    for mode in MODES:
        assert set(report[mode]) == {"seen", "heldout", "all"}, mode
        scores = report[mode]["all"]
        assert scores["n"] == 4  # eval.num_per_mode
        for key in ("colour_acc", "direction_acc", "consistency_acc"):
            assert 0.0 <= scores[key] <= 1.0
    assert report["T2V"]["all"]["first_psnr"] is None
    assert report["I2V"]["all"]["first_psnr"] > 0 and report["I2V"]["all"]["last_psnr"] is None
    assert report["FLF2V"]["all"]["first_psnr"] > 0 and report["FLF2V"]["all"]["last_psnr"] > 0


def test_rerun_resumes(runlocal_workdir, main_job_runner, tmp_path):
    """A second run continues each stage from its newest checkpoint: the finished VAE and cache are
    kept, and the DiT, given 2 more steps, trains steps 5-6 only."""
    workdir = str(tmp_path / "workdir")
    shutil.copytree(runlocal_workdir, workdir)
    before = _lines(workdir)
    vae_ckpts = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(workdir, "vae", "[0-9]*"))}
    assert len(vae_ckpts) == 2
    cache = _folder_bytes(os.path.join(workdir, "cache"))

    started = time.time()
    proc = main_job_runner(workdir, "--config.train.num_steps=6")
    assert proc.returncode == 0, proc.stderr[-5000:]
    after = _lines(workdir)
    assert after[:len(before)] == before  # nothing retrained: the old lines are untouched ...
    new = after[len(before):]
    assert [(line["stage"], line["step"]) for line in new] == [("dit", 6)]  # ... and only step 6 is new
    assert math.isfinite(new[0]["loss"])
    assert {p: os.path.getmtime(p) for p in glob.glob(os.path.join(workdir, "vae", "[0-9]*"))} == vae_ckpts
    assert _checkpoint_steps(os.path.join(workdir, "dit")) == [4, 6]
    assert "latent cache: keeping" in proc.stdout
    assert _folder_bytes(os.path.join(workdir, "cache")) == cache
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["num_steps"] == 6
    assert os.path.getmtime(os.path.join(workdir, "faithfulness.json")) >= started - 1  # sampled again
