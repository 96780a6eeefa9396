"""The workdir: the files each stage writes and the next one reads, named and read in one place.

    config.json          the config of the newest run (`write_config`; `read_config`)
    vae/<step>/          VAE train states (Orbax; `load_ema_params` reads their EMA weights only)
    vae_model.json       the VAE's constructor arguments (`write_model_spec`; `read_model_spec`),
                         so a changed size table never breaks loading an older checkpoint
    latent_stats.json    per-channel latent mean and std the DiT normalises with (`LatentStats`)
    cache/ cache_images/ latent caches (`pixeldance.data.latent_cache`)
    dit/<step>/          DiT train states
    metrics.jsonl tensorboard/ timing.json samples/ faithfulness.json   logs and results
                         (tensorboard/<stage>/: `TENSORBOARD_TAGS`)

A folder written by a converter (`python -m pixeldance.convert.wan_vae`) has the same layout for
what it holds (config.json, vae_model.json, latent_stats.json, vae/0 with bare parameters).
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from pixeldance import sharding
from pixeldance.checkpoint import Checkpointer, abstract_like, no_usable_message, usable_step

CONFIG = "config.json"
MODEL_SPEC = "vae_model.json"
LATENT_STATS = "latent_stats.json"
TIMING = "timing.json"
VAE_DIR = "vae"
DIT_DIR = "dit"

# The main job's TensorBoard: <workdir>/tensorboard/<stage>/, one folder per stage and evaluator,
# tags `<stage>/<name>`; {stage: {"scalars": names, "images": names}} (a video is an animated GIF
# among the images). Written with the default evaluators and losses of experiments/shapes.py;
# tests/test_tensorboard.py reads a `:runlocal` run's event files for each, the README lists them.
_FAITHFULNESS = tuple(
    f"{mode}/{group}/{name}" for mode in ("T2V", "I2V", "FLF2V") for group in ("seen", "heldout", "all")
    for name in ("colour_acc", "direction_acc", "consistency_acc")
    + {"T2V": (), "I2V": ("first_psnr",), "FLF2V": ("first_psnr", "last_psnr")}[mode])
TENSORBOARD_TAGS = {
    # temporal_diff: only while config.vae.temporal_diff_weight > 0 (the default, issue 19).
    "vae": dict(scalars=("loss", "l1", "l2", "kl", "temporal_diff", "psnr", "grad_norm", "param_norm",
                         "update_norm", "steps_per_sec"), images=()),
    "vae_eval": dict(scalars=("psnr", "ssim", "psnr_min", "num_videos"),
                     images=("reconstructions", "reconstruction_videos")),
    "cache": dict(scalars=("records", "latent_mean", "latent_std", "seconds", "records_per_sec"), images=()),
    "dit": dict(scalars=("loss", "x0_mse", "grad_norm", "param_norm", "update_norm", "steps_per_sec"), images=()),
    "dit_eval": dict(scalars=_FAITHFULNESS, images=("samples",)),
    "sample": dict(scalars=("seconds", "load_seconds", "videos"), images=()),
}


def _read_json(path: str, what: str):
    """A JSON file; FileNotFoundError / ValueError with one line naming the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _write_json(path: str, obj):
    """Atomic: a kill mid-write leaves the previous file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Config and model spec.
# ---------------------------------------------------------------------------------------------

def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The workdir's config.json, locked (a misspelt field is an error, as on the command line)."""
    path = os.path.join(workdir, CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no pixeldance workdir at {workdir} (missing {path})")
    config = ml_collections.ConfigDict(_read_json(path, "workdir config"))
    config.lock()
    return config


def write_config(workdir: str, config):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG), "w") as f:
        f.write(config.to_json(indent=1))


def model_spec(model: nn.Module) -> dict:
    """A Flax module's constructor fields as JSON values (dtype left out: a run-time choice)."""
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.name not in ("parent", "name", "dtype")}


def write_model_spec(workdir: str, model: nn.Module):
    _write_json(os.path.join(workdir, MODEL_SPEC), model_spec(model))


def read_model_spec(workdir: str) -> dict | None:
    """The VAE constructor arguments saved in `workdir` (lists as tuples), or None if none."""
    path = os.path.join(workdir, MODEL_SPEC)
    if not os.path.exists(path):
        return None
    spec = _read_json(path, "VAE architecture")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}


# ---------------------------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------------------------

def latest_step(directory: str) -> int | None:
    """The newest checkpoint step in `directory` that verifies against its manifest (each newer
    one skipped is logged; see `pixeldance.checkpoint`), None if there is none."""
    return usable_step(directory)


def vae_step(workdir: str) -> int | None:
    """The newest VAE checkpoint step of a workdir (None: none, e.g. converted weights)."""
    return latest_step(os.path.join(workdir, VAE_DIR))


def stage_outputs(config, workdir: str, stage: str) -> list[str]:
    """The paths the main job's `stage` (pixeldance.main.STAGES) writes, for its start and end log
    lines: checkpoints and files, then its TensorBoard folders (`tensorboard/<name>/`, the names
    of train_lib.TENSORBOARD_TAGS)."""
    cache = config.cache.get("path", "") or os.path.join(workdir, "cache")  # as latent_cache.cache_dir
    files = {"train_vae": [VAE_DIR, MODEL_SPEC, LATENT_STATS], "cache": [cache, LATENT_STATS],
             "train_dit": [DIT_DIR], "sample": ["samples", "faithfulness.json"]}[stage]
    boards = {"train_vae": ["vae", "vae_eval"], "cache": ["cache"], "train_dit": ["dit", "dit_eval"],
              "sample": ["sample", "dit_eval"]}[stage]
    return [os.path.join(workdir, f) for f in files] + [os.path.join(workdir, "tensorboard", b) for b in boards]


def abstract_params(init_fn, mesh, preset: str, dtype=None):
    """(abstract parameters, their shardings on `mesh` under `preset`'s rules), nothing allocated.
    init_fn(rng) -> `nn.Partitioned`-boxed parameters (a model's `init`). dtype: every floating
    parameter as this dtype instead of the model's (a frozen LoRA base held in bfloat16)."""
    with nn.logical_axis_rules(sharding.rules(preset)):
        boxed = jax.eval_shape(init_fn, jax.random.key(0))
    shardings = sharding.tree_shardings(mesh, boxed, preset)
    params = jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, boxed,
                          is_leaf=lambda x: isinstance(x, nn.Partitioned))
    if dtype is not None:
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype)
                              if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    return params, shardings


# Which weights of a train state sampling uses: its EMA, or the trained weights themselves.
WEIGHTS = {"ema": "ema_params", "train": "params"}


def load_ema_params(directory: str, init_fn, mesh, preset: str = "fsdp", *, step: int | None = None,
                    weights: str = "ema"):
    """(EMA parameters, step) of the newest (or given) train-state checkpoint in `directory`;
    weights='train': its trained (not averaged) parameters instead (`WEIGHTS`).

    Only those weights are read, each straight into its shards on `mesh` (logical rules of
    `preset`): no optimizer is rebuilt and no other part of the state is touched, so loading
    costs the weights' memory, split over the mesh. init_fn: as in `abstract_params`.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    field = WEIGHTS[weights]
    ckpt = _open(directory)
    try:
        step = ckpt.latest_step() if step is None else step
        params, shardings = abstract_params(init_fn, mesh, preset)
        part = ckpt.restore_part({field: abstract_like(params, shardings)}, step)
    finally:
        ckpt.close()
    return part[field], int(step)


def load_params(directory: str, init_fn, mesh, preset: str = "fsdp"):
    """The parameters of a converter's checkpoint (bare parameters, no train state), sharded as
    in `load_ema_params`."""
    ckpt = _open(directory)
    try:
        params, shardings = abstract_params(init_fn, mesh, preset)
        params, _ = ckpt.restore(abstract_like(params, shardings))
    finally:
        ckpt.close()
    return params


def _open(directory: str) -> Checkpointer:
    if usable_step(directory) is None:
        raise FileNotFoundError(no_usable_message(directory))
    return Checkpointer(directory, use_async=False)


# ---------------------------------------------------------------------------------------------
# Latent statistics.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LatentStats:
    """Per-channel mean and std of VAE latents; the DiT works on (z - mean) / std.

    mean, std: float32 [C] (std >= 1e-3). source: 'train_vae' (the VAE stage, on
    config.vae.stats_videos training clips, with `vae_step`), 'cache' (the cache stage, over
    every latent it wrote) or a converter's note. num_videos: how many clips they came from.
    """

    mean: np.ndarray
    std: np.ndarray
    source: str = ""
    vae_step: int | None = None
    num_videos: int | None = None

    STD_MIN = 1e-3

    @classmethod
    def from_moments(cls, mean, std, *, source: str, num_videos: int, vae_step: int | None = None):
        """From per-channel moments (any float arrays [C]); std floored at STD_MIN."""
        return cls(np.asarray(mean, np.float32), np.maximum(np.asarray(std, np.float32), cls.STD_MIN),
                   source=source, vae_step=vae_step, num_videos=num_videos)

    @classmethod
    def read(cls, workdir: str) -> "LatentStats":
        """latent_stats.json of `workdir`; one-line errors naming the file."""
        path = os.path.join(workdir, LATENT_STATS)
        if not os.path.exists(path):
            raise FileNotFoundError(f"latent statistics not found: {path} (run the 'cache' stage first)")
        d = _read_json(path, "latent statistics")
        try:
            mean, std = np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"latent statistics {path}: needs lists 'mean' and 'std' ({e})") from None
        if mean.ndim != 1 or mean.shape != std.shape or not len(mean):
            raise ValueError(f"latent statistics {path}: 'mean' and 'std' must be equal-length lists, "
                             f"got shapes {mean.shape} and {std.shape}")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
            # A zero std would blow latents up (and decode to black frames) without any error.
            raise ValueError(f"latent statistics {path}: 'std' must be positive and every value finite")
        return cls(mean, std, source=d.get("source", ""), vae_step=d.get("vae_step"),
                   num_videos=d.get("num_videos"))

    def write(self, workdir: str):
        d = dict(mean=self.mean.tolist(), std=self.std.tolist(), source=self.source)
        d.update({k: v for k, v in (("vae_step", self.vae_step), ("num_videos", self.num_videos)) if v is not None})
        _write_json(os.path.join(workdir, LATENT_STATS), d)

    @staticmethod
    def from_vae_stage(workdir: str, step: int | None = None) -> bool:
        """Whether latent_stats.json was written by the VAE stage at VAE step `step` (default: the
        newest VAE checkpoint): then the cache stage keeps it and the VAE stage need not rewrite it."""
        step = vae_step(workdir) if step is None else step
        if step is None or not os.path.exists(os.path.join(workdir, LATENT_STATS)):
            return False
        d = _read_json(os.path.join(workdir, LATENT_STATS), "latent statistics")
        return d.get("source") == "train_vae" and d.get("vae_step") == step

    CONVERTED = "latents_mean/latents_std of "  # source prefix of a converter's (convert/wan_vae.py)

    @staticmethod
    def from_converter(workdir: str) -> bool:
        """Whether latent_stats.json holds a converted VAE's own normalisation (diffusers'
        latents_mean / latents_std, source CONVERTED + the input path): what a pretrained DiT on
        that VAE was trained with, so the cache stage keeps them."""
        path = os.path.join(workdir, LATENT_STATS)
        if not os.path.exists(path):
            return False
        return str(_read_json(path, "latent statistics").get("source", "")).startswith(LatentStats.CONVERTED)

    @property
    def channels(self) -> int:
        return len(self.mean)

    def normalise(self, z):
        """Latents [..., C] (numpy or jax) -> (z - mean) / std."""
        return (z - self.mean) / self.std

    def denormalise(self, z):
        return z * self.std + self.mean
