"""What the colabs (colabs/*.ipynb) call beyond the library's API: the runtime's devices, an
experiment file by path, the training stages run in-process, and videos shown inline.

Notebooks hold no logic; a helper a notebook needs lives here, tested with the notebooks
(tests/test_colab.py executes every notebook on a tiny configuration).
"""
from __future__ import annotations

import base64
import html
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from pixeldance import configs, main, xla_flags
from pixeldance import workdir as workdir_lib
from pixeldance.data import video_io
from pixeldance.models import vae_inference

TRAIN_STAGES = ("train_vae", "cache", "train_dit")
_STAGE_DIRS = {"train_vae": workdir_lib.VAE_DIR, "train_dit": workdir_lib.DIT_DIR}


def describe_devices() -> str:
    """One line: the JAX backend this runtime picked and its devices (CPU, GPU or TPU)."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return f"JAX {jax.__version__} on {jax.default_backend()}: {len(devices)} x {', '.join(kinds)}"


def repo_root() -> str:
    """The folder holding the package (the clone, for an editable or Colab install)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_experiment(spec: str, **overrides):
    """`experiments/x.py[:arg]` as a locked config, with dotted-key overrides (None values are
    left out, so a notebook's `STEPS = None` means the experiment's own). A relative path is
    looked up in the working directory, then in the repository the package was installed from."""
    path, sep, arg = spec.partition(":")
    if not os.path.isabs(path) and not os.path.exists(path):
        in_repo = os.path.join(repo_root(), path)
        if os.path.exists(in_repo):
            path = in_repo
    config = configs.load_config(path + sep + arg)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return configs.override(config, **overrides) if overrides else config


def train(config, workdir: str, stages=TRAIN_STAGES) -> dict:
    """Runs the training stages of `pixeldance.main` in this process (each resumes from what the
    workdir holds, as on the command line), with their progress bars; returns seconds per stage."""
    if config.get("xla_fast_compile"):
        xla_flags.enable_fast_compile()  # no effect once a backend runs: the same functions either way
    workdir_lib.write_config(workdir, config)
    seconds = {}
    for stage in stages:
        t0 = time.time()
        main.run_stage(stage, config, workdir)
        seconds[stage] = round(time.time() - t0, 1)
    print("seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    return seconds


def ensure_trained(spec: str, workdir: str, stages=TRAIN_STAGES) -> dict:
    """Trains experiment `spec` in `workdir` (see `train`) unless the workdir already holds a
    checkpoint of each training stage asked for; returns seconds per stage ({} when trained)."""
    steps = {s: workdir_lib.latest_step(os.path.join(workdir, d)) for s, d in _STAGE_DIRS.items() if s in stages}
    if steps and all(step is not None for step in steps.values()):
        print(f"{workdir} is trained: " + ", ".join(f"{s} step {n}" for s, n in steps.items()))
        return {}
    return train(load_experiment(spec), workdir, stages)


def decode_chunked(vae, latents, chunk: int = 1) -> np.ndarray:
    """A `sample.VideoVAE`'s decode, `chunk` latent frames at a time under a causal cache
    (`vae_inference.decode_chunked`: memory flat in the length). latents float32 [B, T, h, w, C]
    -> uint8 [B, 1 + 4(T-1), 8h, 8w, 3]."""
    video = vae_inference.decode_chunked(vae.model, vae.params, jnp.asarray(latents, jnp.float32), chunk)
    return np.asarray(jnp.clip(jnp.round((video + 1.0) * 127.5), 0, 255)).astype(np.uint8)


def latent_channels(latents, columns: int = 4) -> np.ndarray:
    """One clip's latents float [T, h, w, C] as a grey video of its C channels side by side,
    uint8 [T, rows * (h + 1), columns * (w + 1), 3]; each channel spans its own mean +- 3 std."""
    z = np.asarray(latents, np.float32)
    mean, std = z.mean(axis=(0, 1, 2)), z.std(axis=(0, 1, 2)) + 1e-6
    grey = np.clip(np.round((z - mean) / (6 * std) * 255 + 127.5), 0, 255).astype(np.uint8)
    tiles = np.repeat(np.moveaxis(grey, -1, 0)[..., None], 3, axis=-1)  # [C, T, h, w, 3]
    return video_io.video_grid(tiles, columns, pad=1)


def video_html(video, *, title: str = "", fps: int = 8, height: int = 128) -> str:
    """An HTML <figure> playing video uint8 [F, H, W, 3] in a loop (H.264 mp4 inline, base64),
    pixels repeated so that it shows about `height` pixels high."""
    video = np.asarray(video, np.uint8)
    scale = max(1, height // video.shape[1])
    video = video.repeat(scale, axis=1).repeat(scale, axis=2)
    _, H, W, _ = video.shape  # H.264 in yuv420p wants even sizes: pad with a white edge
    video = np.pad(video, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), constant_values=255)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "video.mp4")
        video_io.write_mp4(path, video, fps=fps)
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
    caption = f"<figcaption>{html.escape(title)}</figcaption>" if title else ""
    return (f'<figure style="display:inline-block;margin:4px;text-align:center">'
            f'<video autoplay loop muted playsinline controls width="{video.shape[2]}">'
            f'<source src="data:video/mp4;base64,{data}" type="video/mp4"></video>{caption}</figure>')


def show_videos(videos, *, fps: int = 8, height: int = 128):
    """Shows videos inline in a row: a dict {title: uint8 [F, H, W, 3]} or one video."""
    from IPython.display import HTML, display  # only in a notebook
    if not isinstance(videos, dict):
        videos = {"": videos}
    display(HTML("".join(video_html(v, title=k, fps=fps, height=height) for k, v in videos.items())))
