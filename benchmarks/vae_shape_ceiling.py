r"""What a VAE lets the synthetic-world evaluator read: held-out real clips encoded and decoded,
scored against their own captions (colour, shape, direction, consistency), with PSNR and the
bounding-box fill per true shape (issue 20: shape is read from that fill, `SHAPE_FILL_THRESHOLDS`).

  python benchmarks/vae_shape_ceiling.py --workdir=workdirs/shapes --num_videos=64 \
      --output=benchmarks/results/vae_shape_ceiling.json

Needs only a trained VAE in the workdir (vae/, vae_model.json, config.json): run it on a VAE stage
before training a DiT on it. The clips are `long_video.py`'s ceiling clips (the held-out split at
world seed + `--world_seed_offset`), scored the same way (`long_video.ceiling_scores`), so the
numbers read beside that benchmark's per-clip shape scores. A generated clip cannot keep its
shape more often than its VAE's reconstructions of real clips do.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import long_video as lv  # noqa: E402  (benchmarks/ is not a package)


def fills_by_shape(recon: np.ndarray, captions) -> dict:
    """{true shape: [min, median, max] bounding-box fill of its reconstructions} (None fills skipped)."""
    from pixeldance.data import synthetic
    from pixeldance.evaluators.synthetic import analyse_video
    fills = {}
    for video, caption in zip(recon, captions):
        (_, shape, _), = synthetic.parse_caption(caption)
        fill = analyse_video(video)["fill"]
        if fill is not None:
            fills.setdefault(shape, []).append(fill)
    return {s: [round(float(np.percentile(v, q)), 3) for q in (0, 50, 100)] for s, v in sorted(fills.items())}


def main(argv=None):
    from pixeldance import cli
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a workdir with a trained VAE")
    p.add_argument("--num_videos", type=int, default=64)
    p.add_argument("--world_seed_offset", type=int, default=3000)
    p.add_argument("--output", default=None, help=".json to write (default: print only)")
    args = p.parse_args(argv)
    if args.num_videos < 1:
        raise ValueError(f"--num_videos must be >= 1, got {args.num_videos}")

    import pixeldance
    from pixeldance import workdir as workdir_lib
    from pixeldance.data import synthetic
    from pixeldance.evaluators.synthetic import psnr

    start = time.time()
    config = workdir_lib.read_config(args.workdir)
    vae = pixeldance.load_vae(args.workdir)
    world = synthetic.world_config(config)
    world = synthetic.WorldConfig(**{**world.__dict__, "seed": world.seed + args.world_seed_offset})
    items = synthetic.ShapesSource("heldout", size=args.num_videos, config=world)
    videos = np.stack([items[i]["video"] for i in range(args.num_videos)])
    recon = lv.reconstruct(vae, videos)
    captions = [items[i]["caption"] for i in range(args.num_videos)]
    result = dict(
        workdir=os.path.abspath(args.workdir), num_videos=args.num_videos,
        vae_steps=config.vae.num_steps, vae_train_size=config.vae.get("train_size", 0),
        vae_batch_size=config.vae.batch_size,
        ceiling=lv.ceiling_scores(recon, captions),
        psnr=float(np.mean([psnr(r, v) for r, v in zip(recon, videos)])),
        fill_by_shape=fills_by_shape(recon, captions),
        seconds=round(time.time() - start, 1))
    print(json.dumps(result))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    from pixeldance import cli as _cli
    _cli.one_line_errors(main)()
