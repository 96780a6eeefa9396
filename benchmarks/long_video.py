r"""The paper's long-video evaluation in miniature: 64 chained clips, FVD of every 16 frames and
faithfulness per clip index, on a trained synthetic-world workdir.

  python benchmarks/long_video.py --workdir=workdirs/shapes --networks=ROOT \
      --num_videos=8 --num_clips=64 --output=benchmarks/results/long_video.json

The paper chains clips autoregressively (the last frame of clip k is the first-frame instruction
of clip k + 1) and plots FVD of every 16 frames over 512 videos of 1,024 frames on UCF-101. Here:
`--num_videos` videos, each from the first frame of a held-out synthetic clip (world seed +
`--world_seed_offset`, a seed neither training (+0) nor the evaluation stage (+1000) uses), with
per-clip prompts that keep the object inside the frame: the clip's own caption for even clips
and the opposite direction for odd ones (right, left, right, ...). `Pipeline.generate_clips` makes
F + (num_clips - 1)(F - 1) frames (1,025 for 64 clips of 17).

Reported:
  per clip index k: colour kept, direction as asked, consistency (the synthetic-world evaluator
    on clip k's F frames against its prompt), fractions over the videos;
  per 16-frame window j (frames 16j .. 16j + 15): FVD of the videos' window j against
    `--num_real` real 16-frame windows (the first 16 frames of held-out real clips), with I3D
    (real weights; the networks root of README "Feature networks"); with few videos each FVD
    is rank-deficient and noisy, so FVD of groups of `--group` consecutive windows pooled is
    reported too (num_videos x group samples each);
  a PNG plot (`--output` with .png) of both against the frame index.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
WINDOW = 16


def clip_prompts(caption: str, num_clips: int) -> list[str]:
    """The item's caption for even clips, the opposite direction for odd ones."""
    from pixeldance.data import synthetic
    (colour, shape, direction), = synthetic.parse_caption(caption)
    return [synthetic.caption([(colour, shape, direction if k % 2 == 0 else OPPOSITE[direction])])
            for k in range(num_clips)]


def clip_frames(video: np.ndarray, k: int, F: int) -> np.ndarray:
    """Clip k's F frames of a chained video (clip k starts on clip k - 1's last frame)."""
    return video[k * (F - 1): k * (F - 1) + F]


def windows(video: np.ndarray, size: int = WINDOW) -> np.ndarray:
    """uint8 [F_total, R, R, 3] -> [J, size, R, R, 3], the whole windows from frame 0."""
    J = len(video) // size
    return video[:J * size].reshape((J, size) + video.shape[1:])


def fvd(logits_real: np.ndarray, logits_gen: np.ndarray) -> float:
    from pixeldance.metrics import scores
    return scores.frechet_distance(logits_real.mean(0), np.cov(logits_real, rowvar=False),
                                   logits_gen.mean(0), np.cov(logits_gen, rowvar=False))


def plot(path: str, per_clip: dict, fvd_windows: list, F: int, width: int = 900, height: int = 520):
    """Two panels drawn with Pillow: faithfulness per clip (top), FVD per window (bottom)."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    left, right = 60, width - 20
    total = max(len(per_clip["colour"]) * (F - 1) + 1, len(fvd_windows) * WINDOW)

    def x_of(frame):
        return left + (right - left) * frame / total

    panels = [(20, height // 2 - 30, 0.0, 1.0, "faithfulness per clip"),
              (height // 2 + 10, height - 40, 0.0, max(fvd_windows + [1.0]) * 1.05, "FVD per 16 frames")]
    for top, bottom, lo, hi, title in panels:
        d.rectangle([left, top, right, bottom], outline="black")
        d.text((left + 5, top + 3), title, fill="black")
        d.text((5, top), f"{hi:.3g}", fill="black")
        d.text((5, bottom - 10), f"{lo:.3g}", fill="black")
    colours = {"colour": (220, 40, 40), "direction": (40, 120, 220), "consistent": (40, 160, 60)}
    top, bottom = panels[0][:2]
    for i, (name, values) in enumerate(per_clip.items()):
        pts = [(x_of(k * (F - 1) + F / 2), bottom - (bottom - top) * v) for k, v in enumerate(values)]
        d.line(pts, fill=colours[name], width=2)
        d.text((right - 120, top + 5 + 12 * i), name, fill=colours[name])
    top, bottom, lo, hi, _ = panels[1]
    pts = [(x_of(j * WINDOW + WINDOW / 2), bottom - (bottom - top) * (v - lo) / (hi - lo))
           for j, v in enumerate(fvd_windows)]
    d.line(pts, fill=(120, 40, 160), width=2)
    d.text((left, height - 20), f"frame 0 .. {total}", fill="black")
    im.save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--networks", default=None, help="root of the converted feature networks")
    parser.add_argument("--num_videos", type=int, default=8)
    parser.add_argument("--num_clips", type=int, default=64)
    parser.add_argument("--num_real", type=int, default=256)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--world_seed_offset", type=int, default=3000)
    parser.add_argument("--output", required=True, help=".json (a .png of the same name is written too)")
    args = parser.parse_args()

    import pixeldance
    from pixeldance.data import synthetic
    from pixeldance.evaluators.synthetic import score_video
    from pixeldance.metrics import networks

    start = time.time()
    pipe = pixeldance.load_pipeline(args.workdir)
    F = pipe.num_frames
    world = synthetic.world_config(pipe.config)
    world = synthetic.WorldConfig(**{**world.__dict__, "seed": world.seed + args.world_seed_offset})
    items = synthetic.ShapesSource("heldout", size=max(args.num_videos, args.num_real), config=world)
    i3d = networks.load("i3d", args.networks or networks.default_root(), pipe.mesh)

    real = np.stack([items[i]["video"][:WINDOW] for i in range(args.num_real)])
    real_logits = np.concatenate([i3d(real[i:i + 16])["logits"] for i in range(0, len(real), 16)])

    per_clip = {"colour": [], "direction": [], "consistent": []}
    scores_k = [[] for _ in range(args.num_clips)]
    gen_windows = []
    for v in range(args.num_videos):
        item = items[v]
        prompts = clip_prompts(item["caption"], args.num_clips)
        video = np.concatenate(list(pipe.generate_clips(prompts, item["video"][0], num_clips=args.num_clips,
                                                        seed=v)))
        for k in range(args.num_clips):
            scores_k[k].append(score_video(clip_frames(video, k, F), prompts[k]))
        gen_windows.append(windows(video))
        print(f"video {v + 1}/{args.num_videos}: {len(video)} frames ({time.time() - start:.0f} s)", flush=True)
    for k in range(args.num_clips):
        for name, key in (("colour", "colour_correct"), ("direction", "direction_correct"),
                          ("consistent", "consistent")):
            per_clip[name].append(float(np.mean([s[key] for s in scores_k[k]])))
    gen_windows = np.stack(gen_windows)  # [num_videos, J, 16, R, R, 3]
    J = gen_windows.shape[1]
    gen_logits = np.stack([i3d(gen_windows[:, j])["logits"] for j in range(J)])  # [J, num_videos, 400]
    fvd_windows = [fvd(real_logits, gen_logits[j]) for j in range(J)]
    fvd_groups = [fvd(real_logits, gen_logits[j:j + args.group].reshape(-1, gen_logits.shape[-1]))
                  for j in range(0, J - args.group + 1, args.group)]
    result = dict(
        workdir=os.path.abspath(args.workdir), dit_step=pipe.step, num_videos=args.num_videos,
        num_clips=args.num_clips, frames_per_video=int(F + (args.num_clips - 1) * (F - 1)),
        num_real_windows=args.num_real, per_clip=per_clip, fvd_per_window=fvd_windows,
        fvd_per_group=fvd_groups, group=args.group, i3d_sha256=i3d.sha256,
        seconds=round(time.time() - start, 1))
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    png = os.path.splitext(args.output)[0] + ".png"
    plot(png, per_clip, fvd_windows, F)
    print(json.dumps({k: result[k] for k in ("frames_per_video", "fvd_per_group", "seconds")}))
    print(f"wrote {args.output} and {png}")


if __name__ == "__main__":
    main()
