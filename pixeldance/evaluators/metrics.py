"""'metrics': FVD / FID / IS / CLIPSIM of a pipeline's videos under a pinned protocol.

The evaluator generates the protocol's videos with the Pipeline and scores them with
`pixeldance.metrics.suite` against real clips of the workdir's own dataset (its held-out split),
taken as the protocol says (`pixeldance/metrics/protocols.py`):

  real       `num_real` held-out clips of config.data, re-cut to the protocol's frames, rate
             and resolution; their FVD / FID statistics are cached in the stats folder under a
             key of (protocol, dataset settings, network), so the real side is computed once
  generated  `num_generated` videos in the protocol's mode ('t2v': the real clips' captions;
             'i2v' / 'flf2v': also their first / last frames), cycling through the real clips,
             sampled with the protocol's sampler, steps and guidance (0 / "": the workdir's
             config.sample), in shards of config.sample.batch_size with seed (protocol seed +
             shard index)

With an out_dir (`python -m pixeldance.evaluate`: DIR/eval/<protocol>/), the generated videos are
written there as they come (`generated/000000.mp4`, ..., `captions.jsonl`); a rerun skips the
shards already written, so an interrupted evaluation resumes — but only videos made the same
way: `generated/generation.json` records what made them (the DiT step, a fingerprint of the DiT
and VAE weights, the sampling settings, the protocol's generation fields and the shard size), and
videos under another record (a newer checkpoint, other sampler settings) are removed and made
again rather than scored as this pipeline's. Without one (periodic evaluation
during training), they go to a temporary folder that is removed afterwards.

Settings: config.evals.protocol, config.evals.networks (root of the converted feature networks;
"" = $PIXELDANCE_NETWORKS or ~/.cache/pixeldance/networks), config.evals.stats_dir ("" =
$PIXELDANCE_STATS or ~/.cache/pixeldance/stats).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from pixeldance.data import sources, synthetic, video_io
from pixeldance.evaluators.common import Evaluator, Result
from pixeldance.evaluators.samples import eval_world
from pixeldance.metrics import networks, protocols, suite

GENERATED = "generated"
GENERATION_KEY = "generation.json"  # in GENERATED: what made its videos (`ProtocolMetrics.generation_key`)
CAPTIONS = "captions.jsonl"
RESULT = "metrics.json"
# The protocol fields the real set depends on (not the metrics, nor the generated count).
REAL_FIELDS = ("name", "num_frames", "fps", "stride", "clip_start", "resolution", "crop", "num_real", "seed")
# protocol.dataset -> config.data.name it applies to ("" applies to any).
DATASETS = {"synthetic": "shapes", "ucf101": "ucf101", "msrvtt": "msrvtt"}


def real_config(config, protocol: protocols.Protocol):
    """config with config.data cut to the protocol's clips (frames, rate, stride, resolution)."""
    if protocol.dataset and DATASETS.get(protocol.dataset) != config.data.get("name", "shapes"):
        raise ValueError(f"protocol {protocol.name} is for the {protocol.dataset} dataset, this "
                         f"workdir trains on config.data.name={config.data.get('name', 'shapes')!r}")
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.data.num_frames = protocol.num_frames
        cfg.data.resolution = protocol.resolution
        cfg.data.fps = protocol.fps
        cfg.data.stride = protocol.stride
        if "crop" in cfg.data and protocol.crop == "center":
            cfg.data.crop = "center"
    if cfg.data.get("name", "shapes") == "shapes":
        # The synthetic world could draw clips of any size, but the model knows only its own.
        world = synthetic.world_config(config)
        if (world.num_frames, world.resolution) != (protocol.num_frames, protocol.resolution):
            raise ValueError(f"protocol {protocol.name} needs {protocol.num_frames}-frame clips at "
                             f"{protocol.resolution}px; this synthetic world makes "
                             f"{world.num_frames} at {world.resolution}px")
    return cfg


@jax.jit
def _moments(leaves):
    """float32 [n, 2]: each leaf's sum and sum of squares, reduced where the leaf lives."""
    return jnp.stack([jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))])
                      for x in leaves])


def weights_fingerprint(*trees) -> str | None:
    """A short hash of parameter trees (None entries skipped; None if all are): per leaf its path,
    shape, sum and sum of squares (6 significant digits), so a retrained or other checkpoint
    differs. The sums are reduced on the devices holding the (possibly sharded, multi-host)
    leaves; only [n, 2] numbers come back."""
    named = [(jax.tree_util.keystr(path), leaf) for tree in trees if tree is not None
             for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
    if not named:
        return None
    moments = _moments([leaf for _, leaf in named])
    moments = np.asarray(moments.addressable_data(0))  # replicated: every process holds it
    rows = [[name, list(np.shape(leaf)), f"{m[0]:.6e}", f"{m[1]:.6e}"] for (name, leaf), m in zip(named, moments)]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def video_name(i: int) -> str:
    """The file name of the i-th video of a folder this evaluator writes (real or generated)."""
    return f"{i:06d}.mp4"


def real_source(config, protocol: protocols.Protocol):
    """The held-out items (dicts with 'video' uint8 [F, R, R, 3] and 'caption') the real set is
    cut from; the synthetic world's come from the evaluation seed, as the faithfulness
    evaluator's do."""
    cfg = real_config(config, protocol)
    if cfg.data.get("name", "shapes") == "shapes":
        return synthetic.ShapesSource("heldout", size=protocol.num_real, config=eval_world(cfg))
    return sources.make_source(cfg, "heldout", size=protocol.num_real)


def fps_of(protocol: protocols.Protocol) -> int:
    """The frame rate the clips are written at: the protocol's, so reading them back under the
    same protocol takes every frame."""
    return int(round(protocol.fps)) if protocol.fps > 0 else 8


class ProtocolMetrics(Evaluator):
    """See the module docstring."""

    name = "metrics"
    subject = "pipeline"

    def __init__(self, config, protocol: str | None = None, *, root: str | None = None,
                 stats_dir: str | None = None, num_generated: int | None = None,
                 metrics: tuple[str, ...] | None = None, mode: str | None = None):
        e = config.evals
        self.config = config
        self.protocol = protocols.get(protocol or e.get("protocol", "shapes_17f"))
        if num_generated is not None:
            self.protocol = dataclasses.replace(self.protocol, num_generated=num_generated,
                                                is_splits=min(self.protocol.is_splits, num_generated))
        if mode:  # other instructions, the same real set (the result records the mode)
            self.protocol = dataclasses.replace(self.protocol, mode=mode)
        if metrics:  # a subset (or other metrics) under the protocol's clips and counts
            bad = [m for m in metrics if m not in protocols.METRICS]
            if bad:
                raise ValueError(f"unknown metric {bad[0]}; known: {', '.join(protocols.METRICS)}")
            self.protocol = dataclasses.replace(self.protocol, metrics=tuple(metrics))
        self.root = root or e.get("networks", "") or networks.default_root()
        self.stats_dir = stats_dir or e.get("stats_dir", "") or suite.default_stats_dir()
        real_config(config, self.protocol)  # a mismatched protocol fails at construction

    def real_key(self) -> str:
        """What identifies the real set: the protocol and the dataset settings it is cut from."""
        p = self.protocol
        clips = {k: getattr(p, k) for k in REAL_FIELDS}
        text = json.dumps([clips, self.config.data.to_dict(), "heldout"], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def write_real(self, folder: str, source) -> str:
        os.makedirs(folder, exist_ok=True)
        for i in range(min(len(source), self.protocol.num_real)):
            path = os.path.join(folder, video_name(i))
            if not os.path.exists(path):
                video_io.write_mp4(path, source[i]["video"], fps=fps_of(self.protocol))
        return folder

    def _plan(self, source) -> list[tuple[str, np.ndarray | None, np.ndarray | None]]:
        """(caption, first frame, last frame) per generated video, cycling through the real items."""
        p, n = self.protocol, min(len(source), self.protocol.num_real)
        out = []
        for i in range(p.num_generated):
            item = source[i % n]
            first = item["video"][0] if p.mode in ("i2v", "flf2v") else None
            last = item["video"][-1] if p.mode == "flf2v" else None
            out.append((item["caption"], first, last))
        return out

    def generation_key(self, pipe, step: int | None) -> dict:
        """What makes this evaluation's videos what they are, apart from how many: the DiT step,
        a fingerprint of the DiT and VAE weights (`weights_fingerprint`), the pipeline's sampling
        settings (config.sample), the protocol's generation fields, the real items' key and the
        shard size (a shard's seed is protocol seed + shard index)."""
        p = self.protocol
        config = getattr(pipe, "config", None)
        vae = getattr(pipe, "vae", None)
        return dict(step=step, weights=weights_fingerprint(getattr(pipe, "params", None),
                                                           getattr(vae, "params", None)),
                    sample=None if config is None else config.sample.to_dict(),
                    protocol={k: getattr(p, k) for k in ("name", "mode", "seed", "num_frames", "resolution",
                                                         "sampler", "steps", "guidance", "image_guidance")},
                    real_key=self.real_key(), batch_size=int(self.config.sample.batch_size))

    def _clear_other_generation(self, gen_dir: str, key: dict):
        """Removes videos `gen_dir` holds from another generation_key (or from before keys were
        recorded), then records `key`: a resumed evaluation never scores another model's videos."""
        path = os.path.join(gen_dir, GENERATION_KEY)
        old = None
        if os.path.exists(path):
            with open(path) as f:
                try:
                    old = json.load(f)
                except json.JSONDecodeError:
                    old = None  # a torn write: unknown, so not ours
        if old != json.loads(json.dumps(key)):
            stale = sorted(n for n in os.listdir(gen_dir) if n.endswith(".mp4"))
            if stale:
                logging.warning("%s: %d videos were generated by another checkpoint or other settings "
                                "(%s); removing them and generating again", gen_dir, len(stale), path)
            for n in stale:
                os.remove(os.path.join(gen_dir, n))
            with open(path + ".tmp", "w") as f:
                json.dump(key, f, indent=1)
            os.replace(path + ".tmp", path)

    def generate(self, pipe, folder: str, source, *, step: int | None = None) -> str:
        """Writes the generated videos and captions.jsonl into `folder`, skipping shards already
        written by the same generation (`generation_key`; step: the DiT step); returns the
        captions file."""
        p = self.protocol
        gen_dir = os.path.join(folder, GENERATED)
        os.makedirs(gen_dir, exist_ok=True)
        self._clear_other_generation(gen_dir, self.generation_key(pipe, step))
        plan = self._plan(source)
        captions = os.path.join(folder, CAPTIONS)
        with open(captions + ".tmp", "w") as f:
            for i, (caption, _, _) in enumerate(plan):
                f.write(json.dumps({"path": video_name(i), "caption": caption}) + "\n")
        os.replace(captions + ".tmp", captions)
        bs = int(self.config.sample.batch_size)
        settings = dict(num_frames=p.num_frames, height=p.resolution, width=p.resolution,
                        steps=p.steps or None, guidance=p.guidance or None,
                        sampler=p.sampler or None, image_guidance=p.image_guidance or None)
        for shard, start in enumerate(range(0, len(plan), bs)):
            paths = [os.path.join(gen_dir, video_name(i)) for i in range(start, min(start + bs, len(plan)))]
            if all(os.path.exists(x) for x in paths):
                continue  # written by an earlier, interrupted run: same seed, same videos
            chunk = plan[start:start + len(paths)]
            firsts = [c[1] for c in chunk] if p.mode != "t2v" else None
            lasts = [c[2] for c in chunk] if p.mode == "flf2v" else None
            videos = pipe.generate_batch([c[0] for c in chunk], firsts, lasts, seed=p.seed + shard, **settings)
            for path, video in zip(paths, videos):
                video_io.write_mp4(path, video, fps=fps_of(p))
        return captions

    def evaluate(self, pipe, *, step: int, out_dir: str | None = None) -> Result:
        p = self.protocol
        folder = out_dir or tempfile.mkdtemp(prefix=f"pixeldance_{p.name}_")
        try:
            source = real_source(self.config, p)
            extractor = suite.Extractor(p, p.metrics, self.root, pipe.mesh)
            ref = {}
            if any(m in suite.FRECHET for m in p.metrics):
                ref = suite.real_stats(extractor, lambda: self.write_real(os.path.join(folder, "real"), source),
                                       stats_dir=self.stats_dir, batch_size=8, fingerprint=self.real_key())
            captions = self.generate(pipe, folder, source, step=step)
            # Exactly the videos of this plan: a folder kept from an earlier run with a larger
            # --num_generated holds more, and a random subset of those is not what was asked.
            names = [video_name(i) for i in range(p.num_generated)]
            report = suite.score_generated(extractor, os.path.join(folder, GENERATED), ref,
                                           captions=captions, batch_size=8, names=names)
            asked = protocols.get(p.name).num_generated
            if p.num_generated < asked:  # --num_generated: the number is not the protocol's
                report["warnings"].append(f"{p.num_generated} generated videos, the protocol asks for {asked}")
            report.update(step=step, mode=p.mode, real_key=self.real_key())
            if out_dir:
                with open(os.path.join(out_dir, RESULT), "w") as f:
                    json.dump(report, f, indent=2)
        finally:
            if out_dir is None:
                shutil.rmtree(folder, ignore_errors=True)
        scalars = {f"{p.name}/{k}": float(report[k]) for k in protocols.METRICS + ("is_std",) if k in report}
        return Result(scalars, report=report)
