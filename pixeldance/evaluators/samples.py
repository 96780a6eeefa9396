"""Evaluators of generated videos (subject: a `sample.Pipeline`).

'faithfulness'  the synthetic world's: sample held-out and seen captions in three modes and
                score them exactly (`synthetic.py`). Modes: T2V (text only), I2V (first frame +
                text), FLF2V (first + last frame + text); the instructions are the first / last
                frames of real synthetic-world videos of the caption, from a world seed the
                training cache never used. Smoothness (centroid step across the VAE's
                latent-group boundaries over the step inside groups) uses the pipeline VAE's
                temporal_factor; it is in the report (faithfulness.json, the table) but not
                among the logged scalars (workdir.TENSORBOARD_TAGS fixes the main job's tags).
                With an out_dir: `samples/{mode}_{k}.mp4`,
                `samples/grid.gif` (one row per mode, ground truth first), `samples/captions.txt`
                and `faithfulness.json`; the table is printed.
'samples'       any other data: samples for the captions of the first config.evals.num_mp4
                held-out clips, text only and first frame + text (`samples/folder_*.mp4`); no
                score (the paper's metrics plug in here as evaluators of their own).
Both return their samples as one grid video, TensorBoard's `dit_eval/samples` (a row per mode;
'faithfulness' puts the ground truth first, as grid.gif), at every evaluation.

Settings: config.evals (num_per_mode, heldout_fraction, num_mp4) and config.sample.batch_size.
"""
from __future__ import annotations

import json
import os

import numpy as np

from pixeldance.data import sources, synthetic, video_io
from pixeldance.evaluators import synthetic as scoring
from pixeldance.evaluators.common import Evaluator, Result, flatten

MODES = scoring.MODES
REPORT = "faithfulness.json"


def eval_world(config) -> synthetic.WorldConfig:
    """The synthetic world of config.data with a seed the training cache never used."""
    world = synthetic.world_config(config)
    return synthetic.WorldConfig(**{**world.__dict__, "seed": world.seed + 1000})


class Faithfulness(Evaluator):
    """Faithfulness of generated shapes-world videos per mode and split (see the module docstring)."""

    name = "faithfulness"
    subject = "pipeline"

    def __init__(self, config, num_per_mode: int | None = None):
        if config.data.get("name", "shapes") != "shapes":
            raise ValueError(f"the 'faithfulness' evaluator scores the synthetic world only, not "
                             f"config.data.name={config.data.name!r}: set config.evals.dit=('samples',)")
        e = config.evals
        self.config = config
        self.num_per_mode = e.num_per_mode if num_per_mode is None else num_per_mode
        self.heldout_fraction, self.num_mp4 = e.heldout_fraction, e.num_mp4

    def items(self) -> list[tuple[dict, bool]]:
        """(synthetic-world item, held out) pairs: held-out combinations first, then seen ones."""
        n = self.num_per_mode
        n_held = int(round(n * self.heldout_fraction))
        world = eval_world(self.config)
        return ([(synthetic.ShapesSource("heldout", size=n_held, config=world)[i], True) for i in range(n_held)]
                + [(synthetic.ShapesSource("train", size=n, config=world)[i], False) for i in range(n - n_held)])

    def report(self, pipe, out_dir: str | None = None) -> dict:
        """The faithfulness report (`synthetic.faithfulness_report`) of the pipeline's samples;
        with out_dir, also the files of the module docstring there."""
        return self._sample_and_score(pipe, out_dir)[0]

    def _sample_and_score(self, pipe, out_dir: str | None) -> tuple[dict, np.ndarray]:
        """(`report`, the grid video uint8 [F, H', W', 3] of samples/grid.gif: ground truth, then a
        row per mode, up to 8 columns)."""
        items = self.items()
        evaluator = scoring.SyntheticFaithfulness(group_frames=pipe.vae.model.temporal_factor)
        grid_rows = []
        bs = self.config.sample.batch_size
        sample_dir = os.path.join(out_dir, "samples") if out_dir else None
        if sample_dir:
            os.makedirs(sample_dir, exist_ok=True)
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
            if sample_dir:
                for k in range(min(self.num_mp4, len(videos))):
                    video_io.write_mp4(os.path.join(sample_dir, f"{mode}_{k}.mp4"), videos[k])
            grid_rows.append(videos[:8])
        report = evaluator.result()
        truth = np.stack([it["video"] for it, _ in items[:8]])
        grid = video_io.video_grid(np.concatenate([truth] + grid_rows), columns=len(truth))
        if out_dir:
            video_io.write_gif(os.path.join(sample_dir, "grid.gif"), grid, scale=2)
            with open(os.path.join(sample_dir, "captions.txt"), "w") as f:
                f.write("\n".join(it["caption"] + ("  [held out]" if held else "") for it, held in items[:8]) + "\n")
            with open(os.path.join(out_dir, REPORT), "w") as f:
                json.dump(report, f, indent=1)
            print(scoring.format_report(report))
        return report, grid

    def evaluate(self, pipe, *, step: int, out_dir: str | None = None) -> Result:
        report, grid = self._sample_and_score(pipe, out_dir)
        # Smoothness stays in the report only: its tags are not (yet) among TENSORBOARD_TAGS.
        scalars = {k: v for k, v in flatten(report).items()
                   if not k.endswith("/n") and "/smoothness_" not in k}
        return Result(scalars, videos=dict(samples=grid), report=report)


class FolderSamples(Evaluator):
    """Samples for the captions of the first `num` held-out clips of config.data (default
    config.evals.num_mp4): with an out_dir, `samples/folder_T2V_{k}.mp4` (text only),
    `samples/folder_I2V_{k}.mp4` (the clip's first frame + text) and `samples/folder_captions.txt`.
    (The stand-in for the shapes world's faithfulness on data whose captions cannot be checked.)"""

    name = "samples"
    subject = "pipeline"

    def __init__(self, config, num: int | None = None):
        self.config = config
        self.num = config.evals.num_mp4 if num is None else num

    def evaluate(self, pipe, *, step: int, out_dir: str | None = None) -> Result:
        source = sources.make_source(self.config, "heldout", size=self.num)
        items = [source[i] for i in range(self.num)]
        prompts = [it["caption"] for it in items]
        paths, rows = [], []
        for mode, firsts in (("T2V", None), ("I2V", [it["video"][0] for it in items])):
            videos = pipe.generate_batch(prompts, firsts, None, seed=0)
            rows.append(videos[:8])
            if out_dir:
                os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
                for k, video in enumerate(videos):
                    paths.append(os.path.join(out_dir, "samples", f"folder_{mode}_{k}.mp4"))
                    video_io.write_mp4(paths[-1], video)
        if out_dir:
            with open(os.path.join(out_dir, "samples", "folder_captions.txt"), "w") as f:
                f.write("\n".join(prompts) + "\n")
        sources.log_summary(source, "samples")
        grid = video_io.video_grid(np.concatenate(rows), columns=len(rows[0]))  # a row per mode
        return Result({}, videos=dict(samples=grid), report=dict(paths=paths))
