r"""Probe (issue 20): where latent continuation's objects change size, from the object's area in
every frame of long videos made both ways on one checkpoint.

  python benchmarks/probe_size_drift.py --workdir=W --num_videos=8 --num_clips=24 \
      --output=benchmarks/results/issue20_size_drift_where.json

The videos are `benchmarks/long_video.py`'s (held-out first frames, prompts alternating the
direction, same seeds for both modes; world seed + `--world_seed_offset`). For every clip k >= 1
of each mode: consistency (area within [0.5, 2] x the median) on long_video.py's F-frame window,
on the clip's new frames alone (4(T - K) in latent space, F - 1 re-encoding) and on its last 12
frames (the latent mode's new-frame count, so the two modes compare on equal lengths); the
median area of the new frames over the frames before them in the window (a jump at the context
boundary), the new frames' max / min area (drift inside the clip), and each clip's median area
over clip 0's (growth along the video).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import long_video as lv  # noqa: E402  (benchmarks/ is not a package)

MODES = ("reencode", "latent")


def consistent(area: np.ndarray) -> bool:
    """The evaluator's rule: visible in every frame, every area within [0.5, 2] x the median."""
    m = np.median(area)
    return bool(np.all(area > 0) and np.all((area >= 0.5 * m) & (area <= 2 * m)))


def clip_rows(area: np.ndarray, num_clips: int, F: int, step: int) -> list[dict]:
    """Per clip of one video (area float [frames]): the scores of the module docstring."""
    base = max(float(np.median(area[:F])), 1.0)
    rows = []
    for k in range(1, num_clips):
        window = lv.clip_frames(np.arange(len(area)), k, F, step)
        new, before = window[-step:], window[:-step]
        rows.append(dict(k=k, window=consistent(area[window]), new_frames=consistent(area[new]),
                         last_12=consistent(area[window[-12:]]),
                         new_over_before=float(np.median(area[new]) / max(np.median(area[before]), 1.0)),
                         new_max_over_min=float(area[new].max() / max(area[new].min(), 1.0)),
                         size_over_clip0=float(np.median(area[new]) / base)))
    return rows


def summary(rows: list[dict], num_clips: int) -> dict:
    mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    median = lambda key: float(np.median([r[key] for r in rows]))  # noqa: E731
    return dict(window_consistent=mean("window"), new_frames_consistent=mean("new_frames"),
                last_12_consistent=mean("last_12"), new_over_before_median=median("new_over_before"),
                new_over_before_outside_067_15=float(np.mean([not 0.67 <= r["new_over_before"] <= 1.5
                                                              for r in rows])),
                new_max_over_min_median=median("new_max_over_min"),
                size_over_clip0_by_clip=[1.0] + [float(np.median([r["size_over_clip0"] for r in rows if r["k"] == k]))
                                                 for k in range(1, num_clips)])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num_videos", type=int, default=8)
    parser.add_argument("--num_clips", type=int, default=24)
    parser.add_argument("--context_latents", type=int, default=None, help="K (default config.cond.context_frames)")
    parser.add_argument("--world_seed_offset", type=int, default=2000)
    parser.add_argument("--guidance", type=float, default=None, help="text guidance (default: the workdir's config.sample)")
    parser.add_argument("--image_guidance", type=float, default=None,
                        help="image guidance (default: the workdir's config.sample); 1 samples without the none branch")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    from pixeldance.data import synthetic
    from pixeldance.evaluators.synthetic import analyse_objects

    pipe, F, T, K, _, items = lv.open_workdir(args.workdir, args.context_latents, args.world_seed_offset,
                                              args.num_videos)
    result = dict(workdir=os.path.abspath(args.workdir), dit_step=pipe.step,
                  guidance=pipe.config.sample.guidance if args.guidance is None else args.guidance, num_videos=args.num_videos,
                  image_guidance=pipe.config.sample.image_guidance if args.image_guidance is None else args.image_guidance,
                  num_clips=args.num_clips, context_latents=K, latent_frames=T, modes={})
    for mode in MODES:
        step = lv.frames_per_clip(mode, F, T, K)
        extra = dict(guidance=args.guidance, image_guidance=args.image_guidance)
        if mode == "latent":
            extra.update(continuation="latent", context_latents=K)
        rows = []
        for v in range(args.num_videos):
            item = items[v]
            prompts = lv.clip_prompts(item["caption"], args.num_clips)
            video = np.concatenate(list(pipe.generate_clips(prompts, item["video"][0], num_clips=args.num_clips,
                                                            seed=v, **extra)))
            colour = synthetic.parse_caption(item["caption"])[0][0]
            area = analyse_objects(video, [colour])[0]["area"].astype(np.float64)
            rows += [dict(r, video=v) for r in clip_rows(area, args.num_clips, F, step)]
        result["modes"][mode] = dict(step=step, **summary(rows, args.num_clips), rows=rows)
        s = result["modes"][mode]
        print(mode, json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()
                                if k not in ("rows", "size_over_clip0_by_clip")}))
        print(mode, "size over clip 0:", np.round(s["size_over_clip0_by_clip"], 2).tolist(), flush=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
