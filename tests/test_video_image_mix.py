"""experiments/video_image_mix.py:runlocal end to end: the VAE on bucketed videos and images
(a mixture), the latent cache per bucket (clips and images, each at its bucket's shape), the DiT
on batches of both bucket shapes, samples.

In a file of its own (the real entry point in a child process, compile-bound: four shapes)."""
import json
import os
import re

import numpy as np
import orbax.checkpoint as ocp

from pixeldance.data import buckets, latent_cache
from test_buckets import IMAGES, folders  # noqa: F401  (the fixture: a video folder and an image folder)


def test_joint_image_video_experiment_end_to_end(folders, tmp_path, python_runner):
    """`experiments/video_image_mix.py:runlocal`: the VAE on bucketed videos and images, one latent
    cache per bucket, the DiT on batches of both buckets' shapes, samples."""
    vroot, iroot = folders
    workdir = tmp_path / "work"
    proc = python_runner("-m", "pixeldance.main", "--config=experiments/video_image_mix.py:runlocal",
                         f"--config.data.sources.videos.root={vroot}",
                         f"--config.data.sources.images.root={iroot}", f"--workdir={workdir}", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = lambda d: sorted(int(s) for s in os.listdir(workdir / d) if s.isdigit())
    assert steps("vae") == [2, 4] and steps("dit") == [2, 4]
    assert "folder_I2V_0.mp4" in os.listdir(workdir / "samples")
    out = proc.stdout + proc.stderr
    assert "train_vae: mixture videos: video_folder" in out and "images: image_folder" in out
    with open(workdir / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    vae = [m for m in metrics if m["stage"] == "vae"]
    dit = [m for m in metrics if m["stage"] == "dit"]
    assert len(vae) == 2 and all(np.isfinite(m["loss"]) for m in vae)
    assert len(dit) == 2 and all(np.isfinite(m["loss"]) for m in dit)

    # One cache per bucket (runlocal: 9x32x32 and 1x32x32), each record at its bucket's latent
    # shape: clips of 9 frames -> 3 latent frames, images and clips too short -> 1; no image cache.
    shapes = buckets.parse_buckets("9x32x32,1x32x32")
    index = latent_cache.read_bucket_index(str(workdir / "cache"))
    assert [tuple(b["shape"]) for b in index["buckets"]] == list(shapes)
    caches = latent_cache.open_bucket_caches(str(workdir / "cache"), shapes)
    assert [c.meta["fields"]["z"]["shape"][:3] for c in caches] == [[3, 4, 4], [1, 4, 4]]
    assert all(len(c) >= 8 for c in caches) and sum(len(c) for c in caches) + index["left_out"] == 32
    images = latent_cache.LatentCacheSource(str(workdir / "cache" / "bucket-1x32x32"), captions=True)
    assert {f"{n[:-4]} image" for n in IMAGES} <= set(images.read_all()["captions"])
    assert not os.path.exists(workdir / "cache_images")

    # The DiT trained on both shapes (the first batch of each logged, one compile each) and saved
    # its position in the bucketed stream (4 batches drawn) with the checkpoint.
    logged = re.findall(r"dit: batch (\d+) of this run is the first of shape z \[8, (\d+), 4, 4, \d+\]", out)
    assert sorted(int(T) for _, T in logged) == [1, 3], out[-3000:]
    manager = ocp.CheckpointManager(str(workdir / "dit"))
    data = manager.restore(4, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    manager.close()
    assert data == {"next_index": 4}
    stream = buckets.CachedBucketBatches(caches, shapes, batch_size=8, seed=0)
    assert {stream.schedule.global_batch(g)[0] for g in range(4)} == {0, 1}
