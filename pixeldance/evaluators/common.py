"""The evaluator interface, and the one runner that logs what evaluators return.

An evaluator scores a model at a training step. It is built from the config
(`registry.make(names, config)`, names from config.evals.vae / config.evals.dit) and called on a
*subject*:

  subject 'vae'       a `sample.VideoVAE` (model + weights): reconstruction quality
  subject 'pipeline'  a `sample.Pipeline`: generated videos (faithfulness, samples)

`evaluate(subject, step=..., out_dir=...)` returns a `Result`: scalars (logged to metrics.jsonl and
TensorBoard by `run`, under the stage 'vae_eval' or 'dit_eval'), images and videos (TensorBoard;
a video as an animated GIF) and an optional full report. With `out_dir` an evaluator also writes its files there (samples, grids,
faithfulness.json); without, it only scores (what periodic evaluation during training does).
The trainers call `run` every config.evals.every steps and the stages after training call it
once; evaluators never read or write checkpoints and draw no training randomness, so evaluating
changes nothing about the run it watches.
"""
from __future__ import annotations

import abc
import dataclasses

import numpy as np

from pixeldance import train_lib
from pixeldance.data import video_io

SUBJECTS = ("vae", "pipeline")
STAGES = {"vae": "vae_eval", "pipeline": "dit_eval"}  # the metrics stage of each subject


@dataclasses.dataclass
class Result:
    """scalars: name -> float; images: TensorBoard tag (after the stage) -> uint8 [H, W, 3]; videos:
    tag -> uint8 [F, H, W, 3]; report: the evaluator's full result (JSON-able), if it has more
    than scalars."""
    scalars: dict
    images: dict = dataclasses.field(default_factory=dict)
    videos: dict = dataclasses.field(default_factory=dict)
    report: dict | None = None


class Evaluator(abc.ABC):
    """One metric family. Subclasses set `name` (as in config.evals) and `subject` (SUBJECTS)."""

    name: str = ""
    subject: str = ""

    @abc.abstractmethod
    def evaluate(self, subject, *, step: int, out_dir: str | None = None) -> Result:
        """Scores `subject` (a VideoVAE or a Pipeline) at training step `step`."""


def run(evaluators, subject, *, workdir: str, step: int, out_dir: str | None = None,
        stage: str | None = None) -> dict:
    """Runs `evaluators` (all of one subject kind) on `subject`; logs each one's scalars as one
    line of metrics.jsonl and TensorBoard scalars under the subject's stage, and its images and
    videos to TensorBoard, with one writer (one event file). A rerun at the same step replaces that step's
    lines. `stage` overrides the subject's stage (`python -m pixeldance.evaluate` logs each
    protocol under its own, 'eval_<protocol>', so one protocol's rerun replaces only its own
    lines). Returns {name: Result}."""
    if not evaluators:
        return {}
    kinds = {ev.subject for ev in evaluators}
    if len(kinds) != 1 or not kinds <= set(SUBJECTS):
        raise ValueError(f"run() takes evaluators of one subject kind, got {sorted(kinds)}")
    writer = train_lib.MetricWriter(workdir, stage or STAGES[kinds.pop()])
    results = {}
    try:
        writer.truncate_after(step - 1)
        for ev in evaluators:
            result = ev.evaluate(subject, step=step, out_dir=out_dir)
            if result.scalars:
                writer.write(step, result.scalars)
            for tag, image in result.images.items():
                writer.image(tag, np.asarray(image), step)
            for tag, video in result.videos.items():
                _, height, width, _ = np.shape(video)
                writer.gif(tag, video_io.encode_gif(video, scale=2), 2 * height, 2 * width, step)
            results[ev.name] = result
    finally:
        writer.close()
    return results


def flatten(report: dict, prefix: str = "") -> dict:
    """A nested report -> {'a/b/c': float}, leaving out None and non-numbers (for logging)."""
    out = {}
    for key, value in report.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, (bool, int, float, np.number)):
            out[name] = float(value)
    return out
