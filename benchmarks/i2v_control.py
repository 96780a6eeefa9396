r"""Does first-frame + text (I2V) motion come from the text? A check on a trained shapes workdir.

  python benchmarks/i2v_control.py --workdir=workdirs/shapes --num=256 --world_seed_offset=2000 \
      --output=benchmarks/results/i2v_control.json

In the shapes world an object's start is correlated with its direction (one that starts near the
left edge can only move right by R/3), so a model could score well on I2V direction from the
first frame alone. This samples `--num` held-out I2V videos (first frames of held-out clips
from world seed + `--world_seed_offset`, which the evaluation stage (+1000) and training (+0)
never use) twice with the workdir's sampling settings:
  true     the clip's own caption;
  counter  the same first frame with a caption asking for another direction that has room in
           the frame (the object's centre at least R/8 + R/8 (its largest half size) + 2 px from that edge).
and reports, per variant, how often the evaluator's direction verdict equals the asked
direction ('ok'), is unclear ('none') or differs ('wrong'), and the mean displacement in pixels
along the asked direction. High 'counter' accuracy means the text controls the motion.
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def asked_direction_has_room(first_frame: np.ndarray, direction: str, resolution: int) -> bool:
    """Whether the object in a uint8 [R, R, 3] frame can move >= R/8 towards `direction`."""
    from pixeldance.evaluators.synthetic import analyse_video
    cx, cy = analyse_video(first_frame[None])["centroid"][0]
    room = {"left": cx, "right": resolution - cx, "up": cy, "down": resolution - cy}[direction]
    half_size = resolution / 8  # objects are R/5 to R/4 wide: at most R/8 from centre to edge
    return room - half_size > resolution / 8 + 2


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num", type=int, default=256)
    parser.add_argument("--world_seed_offset", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--output", default="")
    args = parser.parse_args()

    from pixeldance.data import synthetic
    from pixeldance.evaluators.synthetic import analyse_video
    from pixeldance.sample import load_pipeline
    from pixeldance.workdir import read_config

    world = synthetic.world_config(read_config(args.workdir))
    eval_world = synthetic.WorldConfig(**{**world.__dict__, "seed": world.seed + args.world_seed_offset})
    source = synthetic.ShapesSource("heldout", size=args.num, config=eval_world)
    items = [source[i] for i in range(args.num)]
    pipe = load_pipeline(args.workdir)
    R = world.resolution
    report = dict(workdir=args.workdir, num=args.num, world_seed_offset=args.world_seed_offset)
    for variant in ("true", "counter"):
        rng = np.random.default_rng(0)
        prompts, wanted = [], []
        for it in items:
            colour, shape, direction = synthetic.parse_caption(it["caption"])[0]
            if variant == "counter":
                others = [d for d in synthetic.DIRECTIONS
                          if d != direction and asked_direction_has_room(it["video"][0], d, R)]
                direction = others[rng.integers(len(others))] if others else direction
            prompts.append(f"a {colour} {shape} moves {direction}")
            wanted.append(direction)
        firsts = [it["video"][0] for it in items]
        videos = np.concatenate([pipe.generate_batch(prompts[s:s + args.batch], firsts[s:s + args.batch], None, seed=s)
                                 for s in range(0, args.num, args.batch)])
        counts, along = dict(ok=0, none=0, wrong=0), []
        for video, direction in zip(videos, wanted):
            a = analyse_video(video)
            got = a["direction"]
            counts["ok" if got == direction else "none" if got is None else "wrong"] += 1
            if a["displacement"] is not None:
                ux, uy = synthetic.DIRECTION_VECTORS[direction]
                along.append(a["displacement"][0] * ux + a["displacement"][1] * uy)
        report[variant] = dict(counts, accuracy=counts["ok"] / args.num, mean_disp_along=float(np.mean(along)))
        print(variant, report[variant], flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
