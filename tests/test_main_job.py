"""The main job (`python -m pixeldance.main --config=experiments/shapes.py:runlocal`): outputs and resume."""
import glob
import json
import math
import os
import shutil
import time

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import pixeldance
from pixeldance import workdir as workdir_lib
from pixeldance.data import latent_cache, video_io
from pixeldance.evaluators import samples
from pixeldance.evaluators import synthetic as scoring

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
    for stage in ("vae", "dit", "vae_eval", "dit_eval"):
        events = glob.glob(os.path.join(runlocal_workdir, "tensorboard", stage, "events.out.tfevents.*"))
        assert events and all(os.path.getsize(e) > 0 for e in events), stage
    # The evaluators' scalars and images share one writer: one event file per evaluation stage.
    assert len(glob.glob(os.path.join(runlocal_workdir, "tensorboard", "vae_eval", "events.*"))) == 1
    # The sample stage's faithfulness scores, logged at the DiT's step.
    (dit_eval,) = [line for line in lines if line["stage"] == "dit_eval"]
    with open(os.path.join(runlocal_workdir, "faithfulness.json")) as f:
        report = json.load(f)
    assert dit_eval["step"] == 4 and dit_eval["I2V/all/colour_acc"] == report["I2V"]["all"]["colour_acc"]


def test_samples(runlocal_workdir):
    samples = os.path.join(runlocal_workdir, "samples")
    mp4s = sorted(os.path.basename(p) for p in glob.glob(os.path.join(samples, "*.mp4")))
    assert mp4s == sorted(f"{mode}_0.mp4" for mode in MODES)  # evals.num_mp4 = 1 per mode
    for name in mp4s:
        video = video_io.read_video(os.path.join(samples, name))
        assert video.shape == (9, 32, 32, 3), name
    with Image.open(os.path.join(samples, "grid.gif")) as gif:
        assert gif.format == "GIF" and gif.n_frames == 9
    with open(os.path.join(samples, "captions.txt")) as f:
        assert "[held out]" in f.read()


def test_faithfulness_report(runlocal_workdir):
    """The report is what the trained pipeline's samples score (reproduced here from the
    workdir), and its first-frame PSNR is the VAE's: with first_frame='replace' the first latent
    frame of an I2V / FLF2V sample is the instruction's own latent, so generated frame 0 is the
    VAE reconstruction of the first frame, however little the DiT has learnt."""
    with open(os.path.join(runlocal_workdir, "faithfulness.json")) as f:
        report = json.load(f)
    assert set(report) == set(MODES)
    for mode in MODES:
        assert set(report[mode]) == {"seen", "heldout", "all"}, mode
        assert [report[mode][g]["n"] for g in ("seen", "heldout", "all")] == [2, 2, 4]  # evals.num_per_mode
    assert report["T2V"]["all"]["first_psnr"] is None and report["I2V"]["all"]["last_psnr"] is None
    config = workdir_lib.read_config(runlocal_workdir)
    pipe = pixeldance.load_pipeline(runlocal_workdir)
    assert samples.Faithfulness(config).report(pipe) == report
    firsts = np.stack([item["video"][:1] for item, _ in samples.Faithfulness(config).items()])
    recon = pipe.vae.decode(pipe.vae.encode(firsts))[:, 0]
    vae_psnr = np.mean([scoring.psnr(r, f[0]) for r, f in zip(recon, firsts)])
    for mode in ("I2V", "FLF2V"):
        assert abs(report[mode]["all"]["first_psnr"] - vae_psnr) < 0.2, (mode, vae_psnr)


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
    # ... and only step 6 is new, with its evaluation and the sample stage's line
    assert [(line["stage"], line["step"]) for line in new] == [("dit", 6), ("dit_eval", 6), ("sample", 6)]
    assert math.isfinite(new[0]["loss"])
    assert {p: os.path.getmtime(p) for p in glob.glob(os.path.join(workdir, "vae", "[0-9]*"))} == vae_ckpts
    assert _checkpoint_steps(os.path.join(workdir, "dit")) == [4, 6]
    assert "latent cache: keeping" in proc.stdout
    assert _folder_bytes(os.path.join(workdir, "cache")) == cache
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["num_steps"] == 6
    assert os.path.getmtime(os.path.join(workdir, "faithfulness.json")) >= started - 1  # sampled again


def test_evaluators_run_during_training(runlocal_workdir, main_job_runner, tmp_path):
    """config.evals.every: the trainers run the stage's evaluators on the EMA weights being trained
    (scores only, no files), at every multiple before the last step; the end of the VAE stage
    evaluates again with files."""
    workdir = str(tmp_path / "workdir")
    shutil.copytree(runlocal_workdir, workdir)
    os.remove(os.path.join(workdir, "vae_recon.png"))
    # The DiT first: on the runlocal VAE's latent statistics (constants of its train step and
    # sampler) both programs are the runlocal job's, found in the compilation cache; after the
    # VAE's 3 more steps they would be compiled again.
    proc = main_job_runner(workdir, "--config.mode=train_dit", "--config.train.num_steps=7", "--config.evals.every=5")
    assert proc.returncode == 0, proc.stderr[-5000:]
    proc = main_job_runner(workdir, "--config.mode=train_vae", "--config.vae.num_steps=7", "--config.evals.every=5")
    assert proc.returncode == 0, proc.stderr[-5000:]
    lines = _lines(workdir)
    assert [line["step"] for line in lines if line["stage"] == "vae_eval"] == [4, 5, 7]
    # ... and in TensorBoard, where two writers of one folder within one second (5 and 7 may be)
    # once lost the first one's events.
    events = EventAccumulator(os.path.join(workdir, "tensorboard", "vae_eval"))
    events.Reload()
    assert [e.step for e in events.Scalars("vae_eval/psnr")] == [4, 5, 7]
    assert [line["step"] for line in lines if line["stage"] == "dit_eval"] == [4, 5]  # 4: the sample stage's
    (at5,) = [line for line in lines if line["stage"] == "dit_eval" and line["step"] == 5]
    assert {"T2V/heldout/colour_acc", "I2V/all/first_psnr", "FLF2V/all/last_psnr"} <= set(at5)
    assert os.path.exists(os.path.join(workdir, "vae_recon.png"))  # written by the final evaluation
