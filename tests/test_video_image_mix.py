"""experiments/video_image_mix.py:runlocal end to end: the VAE on bucketed videos and images
(a mixture), the latent cache on the videos and the image cache on the images, the DiT with
image batches from the image cache, samples.

In a file of its own (the real entry point in a child process, compile-bound: four shapes)."""
import json
import os

import numpy as np
import orbax.checkpoint as ocp

from pixeldance.data import latent_cache
from test_buckets import IMAGES, folders  # noqa: F401  (the fixture: a video folder and an image folder)


def test_joint_image_video_experiment_end_to_end(folders, tmp_path, python_runner):
    """`experiments/video_image_mix.py:runlocal`: the VAE on bucketed videos and images, the caches
    of the videos and of the images, the DiT with image batches from the image cache, samples."""
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

    # The image folder's images (all 3, one latent frame each, the clips' latent grid) in the image
    # cache, with the folder's captions.
    images = latent_cache.LatentCacheSource(str(workdir / "cache_images"), captions=True)
    videos = latent_cache.LatentCacheSource(str(workdir / "cache"))
    assert len(images) == len(IMAGES) and images.meta["data"] == "image_folder"
    assert images.meta["fields"]["z"]["shape"] == [1] + videos.meta["fields"]["z"]["shape"][1:]
    assert sorted(images.read_all()["captions"]) == sorted(f"{n[:-4]} image" for n in IMAGES)
    # The DiT drew its image batches (2 and 4 of 4, train.image_every = 2) from the image cache's
    # own iterator and only its video batches (1 and 3) from the clips': both positions are in
    # the checkpoint's data state.
    assert "are images from the image cache" in out
    manager = ocp.CheckpointManager(str(workdir / "dit"))
    data = manager.restore(4, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    manager.close()
    assert data == dict(inner={"next_index": 2}, drawn=4, images={"next_index": 2})
