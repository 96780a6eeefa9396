"""The main job's last stage: sample held-out and seen captions in three modes and score them.

Modes: T2V (text only), I2V (first frame + text), FLF2V (first + last frame + text). For I2V and
FLF2V the instructions are the first/last frames of real synthetic-world videos of the caption.
Writes `<workdir>/samples/{mode}_{k}.mp4`, `samples/grid.gif` (one row per mode, ground truth
first) and `faithfulness.json`; returns the report. On other data (a video folder) it writes
samples for a few of the data's captions instead (`write_samples`).
"""
from __future__ import annotations

import json
import os

import numpy as np

from pixeldance.data import sources, synthetic, video_io
from pixeldance.evaluators.synthetic import SyntheticFaithfulness, format_report

MODES = ("T2V", "I2V", "FLF2V")


def evaluate(config, workdir: str, pipeline=None) -> dict:
    from pixeldance.sample import load_pipeline
    if config.data.get("name", "shapes") != "shapes":
        # The faithfulness evaluator scores the synthetic world only; other data get samples
        # for a few of their own captions (text only, and first frame + text).
        write_samples(config, workdir, pipeline=pipeline)
        return {}
    pipe = pipeline or load_pipeline(workdir)
    e = config.eval
    n_held = int(round(e.num_per_mode * e.heldout_fraction))
    world = synthetic.world_config(config)
    # Evaluation videos come from a seed the training cache never used.
    eval_world = synthetic.WorldConfig(**{**world.__dict__, "seed": world.seed + 1000})
    items = ([(synthetic.ShapesSource("heldout", size=n_held, config=eval_world)[i], True) for i in range(n_held)]
             + [(synthetic.ShapesSource("train", size=e.num_per_mode, config=eval_world)[i], False)
                for i in range(e.num_per_mode - n_held)])
    out_dir = os.path.join(workdir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    evaluator = SyntheticFaithfulness()
    grid_rows = []
    bs = config.sample.batch_size
    for mode in MODES:
        videos = []
        for start in range(0, len(items), bs):
            chunk = items[start:start + bs]
            prompts = [it["caption"] for it, _ in chunk]
            firsts = [it["video"][0] for it, _ in chunk] if mode != "T2V" else None
            lasts = [it["video"][-1] for it, _ in chunk] if mode == "FLF2V" else None
            videos.append(pipe.generate_batch(prompts, firsts, lasts, seed=start))
        videos = np.concatenate(videos)
        for (it, held), video in zip(items, videos):
            evaluator.update(video, it["caption"], mode=mode, heldout=held,
                             first_frame=it["video"][0] if mode != "T2V" else None,
                             last_frame=it["video"][-1] if mode == "FLF2V" else None)
        for k in range(min(e.num_mp4, len(videos))):
            video_io.write_mp4(os.path.join(out_dir, f"{mode}_{k}.mp4"), videos[k])
        grid_rows.append(videos[:8])
    truth = np.stack([it["video"] for it, _ in items[:8]])
    grid = video_io.video_grid(np.concatenate([truth] + grid_rows), columns=len(truth))
    video_io.write_gif(os.path.join(out_dir, "grid.gif"), grid, scale=2)
    with open(os.path.join(out_dir, "captions.txt"), "w") as f:
        f.write("\n".join(it["caption"] + ("  [held out]" if held else "") for it, held in items[:8]) + "\n")
    report = evaluator.result()
    with open(os.path.join(workdir, "faithfulness.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(format_report(report))
    return report


def write_samples(config, workdir: str, num: int | None = None, pipeline=None) -> list[str]:
    """Samples for the captions of the first `num` folder clips (default config.eval.num_mp4):
    `samples/folder_T2V_{k}.mp4` (text only) and `samples/folder_I2V_{k}.mp4` (the clip's first
    frame + text), and `samples/folder_captions.txt`. Returns the mp4 paths. (The folder's
    stand-in for the shapes world's faithfulness stage, which only makes sense there.)"""
    from pixeldance.sample import load_pipeline
    pipe = pipeline or load_pipeline(workdir)
    num = config.eval.num_mp4 if num is None else num
    source = sources.make_source(config, "heldout", size=num)
    items = [source[i] for i in range(num)]
    prompts = [it["caption"] for it in items]
    out_dir = os.path.join(workdir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for mode, firsts in (("T2V", None), ("I2V", [it["video"][0] for it in items])):
        videos = pipe.generate_batch(prompts, firsts, None, seed=0)
        for k, video in enumerate(videos):
            paths.append(os.path.join(out_dir, f"folder_{mode}_{k}.mp4"))
            video_io.write_mp4(paths[-1], video)
    with open(os.path.join(out_dir, "folder_captions.txt"), "w") as f:
        f.write("\n".join(prompts) + "\n")
    sources.log_summary(source, "samples")
    return paths
