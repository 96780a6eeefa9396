"""experiments/video_image_mix.py:runlocal end to end: the VAE on bucketed videos and images
(a mixture), the latent cache on the videos, the DiT with image batches, samples.

In a file of its own (the real entry point in a child process, compile-bound: four shapes)."""
import json
import os

import numpy as np

from test_buckets import folders  # noqa: F401  (the fixture: a video folder and an image folder)


def test_joint_image_video_experiment_end_to_end(folders, tmp_path, python_runner):
    """`experiments/video_image_mix.py:runlocal`: the VAE on bucketed videos and images, the cache
    on the videos, the DiT with image batches, samples."""
    vroot, iroot = folders
    workdir = tmp_path / "work"
    proc = python_runner("-m", "pixeldance.main", "--config=experiments/video_image_mix.py:runlocal",
                         f"--config.data.sources.videos.root={vroot}",
                         f"--config.data.sources.images.root={iroot}", f"--workdir={workdir}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = lambda d: sorted(int(s) for s in os.listdir(workdir / d) if s.isdigit())
    assert steps("vae") == [2, 4] and steps("dit") == [2, 4]
    assert "folder_I2V_0.mp4" in os.listdir(workdir / "samples")
    out = proc.stdout + proc.stderr
    assert "train_vae: mixture videos: video_folder" in out and "images: image_folder" in out
    with open(workdir / "metrics.jsonl") as f:
        vae = [json.loads(line) for line in f if '"stage": "vae"' in line]
    assert len(vae) == 2 and all(np.isfinite(m["loss"]) for m in vae)
