r"""Probe (issue 19): why text-to-video samples change their object's size, from the object's
area in every frame of text-only samples made both ways on one checkpoint.

  python benchmarks/probe_t2v_first_frame.py --workdir=W --num_videos=64 \
      --output=benchmarks/results/issue19_t2v_first_frame_areas.json

Held-out captions of the workdir's world (`config.data`, split 'heldout'), batches of 16 with
seed = the batch's first index, sampled 'direct' (one text-only pass: exactly the route's first
pass, same seeds) and with the workdir's text-to-video route (`--route`, default 'first_frame').
Reports the evaluator's consistency of each, the object's frame-0 area (pixels) in the real
clips, the first pass and the route, the route's frame-0 area and median-over-frame-0 area for
consistent and inconsistent samples, and how many start or end with the object smaller than
half the real clips' median size (partly outside the frame, or faint). And where objects are
along their asked direction (`placement`): each frame's median position from the edge the
motion leaves (0) to the edge it goes to (R), and the share of clips starting past the centre;
the world's own clips start on the side they leave and cross the frame.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np


def analyse(videos, captions) -> list[dict]:
    """The evaluator's analysis (area int [F], consistent, ...) of the caption's object in each
    uint8 [F, R, R, 3] video."""
    from pixeldance.data import synthetic as world
    from pixeldance.evaluators import synthetic as scoring
    return [scoring.analyse_objects(v, [world.parse_caption(c)[0][0]])[0] for v, c in zip(videos, captions)]


def progress(centroid, direction: str, resolution: int) -> np.ndarray:
    """The object's position along its asked direction, float [F] in [0, resolution] (NaN where
    absent): 0 is the frame's edge the motion leaves, resolution the edge it goes to.
    centroid: float [F, 2] (x, y) pixels."""
    x, y = np.asarray(centroid, float).T
    return {"right": x, "left": resolution - x, "down": y, "up": resolution - y}[direction]


def placement(progresses: list[np.ndarray], resolution: int) -> dict:
    """Where objects start and go along their asked direction: the median over videos of each
    frame's `progress` (list of F), and the share of videos starting past the frame's centre
    (with less than half the frame left to move into; the world's clips move R/3 or more)."""
    p = np.stack(progresses)
    with np.errstate(invalid="ignore"):
        past = np.where(np.isnan(p[:, 0]), np.nan, p[:, 0] > resolution / 2)
    return dict(median_progress=[round(float(v), 2) for v in np.nanmedian(p, axis=0)],
                start_past_centre=float(np.nanmean(past)))


def summary(route: list[np.ndarray], first_pass: list[np.ndarray], real: list[np.ndarray], consistent) -> dict:
    """The module docstring's numbers; every argument one entry per video."""
    consistent = np.asarray(consistent, bool)
    a0 = np.array([a[0] for a in route], float)
    ratio = np.array([np.median(a) / max(a[0], 1) for a in route])
    small = 0.5 * float(np.median([np.median(a) for a in real]))
    part = lambda mask, values: float(np.median(values[mask])) if mask.any() else None  # noqa: E731
    return dict(
        consistent=float(consistent.mean()),
        frame0_area_median=dict(real=float(np.median([a[0] for a in real])),
                                first_pass=float(np.median([a[0] for a in first_pass])),
                                route=float(np.median(a0))),
        route_frame0_area_median=dict(consistent=part(consistent, a0), inconsistent=part(~consistent, a0)),
        route_median_over_frame0=dict(consistent=part(consistent, ratio), inconsistent=part(~consistent, ratio)),
        small_threshold_px=small,
        route_starts_small=float(np.mean(a0 < small)),
        route_ends_small=float(np.mean([a[-1] < small for a in route])),
        inconsistent_starting_small=float(np.mean(a0[~consistent] < small)) if (~consistent).any() else None)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num_videos", type=int, default=64)
    parser.add_argument("--route", default="first_frame", help="the text-to-video route to probe")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    from pixeldance.data import sources
    from pixeldance.data import synthetic as world
    from pixeldance.sample import load_pipeline

    pipe = load_pipeline(args.workdir)
    source = sources.make_source(pipe.config, "heldout", size=args.num_videos)
    items = [source[i] for i in range(args.num_videos)]
    captions = [it["caption"] for it in items]
    made = {}
    for route in ("direct", args.route):
        made[route] = np.concatenate([pipe.generate_batch(captions[i:i + 16], seed=i, text_to_video=route)
                                      for i in range(0, len(captions), 16)])
    real_objects = analyse([it["video"] for it in items], captions)
    real = [o["area"] for o in real_objects]
    first_pass, route = analyse(made["direct"], captions), analyse(made[args.route], captions)
    R = pipe.config.data.resolution
    asked = [world.parse_caption(c)[0][2] for c in captions]
    along = lambda objects: placement([progress(o["centroid"], d, R) for o, d in zip(objects, asked)], R)  # noqa: E731
    result = dict(workdir=os.path.abspath(args.workdir), dit_step=pipe.step, route=args.route,
                  guidance=pipe.config.sample.guidance, num_videos=args.num_videos,
                  direct_consistent=float(np.mean([o["consistent"] for o in first_pass])),
                  **summary([o["area"] for o in route], [o["area"] for o in first_pass], real,
                            [o["consistent"] for o in route]),
                  placement=dict(real=along(real_objects), direct=along(first_pass), route=along(route)),
                  areas=dict(real=[a.tolist() for a in real], direct=[o["area"].tolist() for o in first_pass],
                             route=[o["area"].tolist() for o in route]))
    print(json.dumps({k: v for k, v in result.items() if k != "areas"}, indent=1))
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
