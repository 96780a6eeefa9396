"""The feature network of the VAE's perceptual loss: an LPIPS-style distance whose VGG-layout
weights are read from a local safetensors file (never downloaded, never pickle).

Axis letters (glossary: pixeldance/models/__init__.py): B batch (of frames: every leading axis
flattened into one), H/W height/width, C channels, O a conv's output channels.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax
from safetensors.numpy import load_file

# LPIPS' input normalisation for [-1, 1] images (per RGB channel).
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class PerceptualNet:
    """An LPIPS-style distance on a VGG-layout feature network whose weights come from a file.

    The safetensors file holds a torchvision-style ``features`` stack: ``features.{i}.weight``
    [O, C, 3, 3] and ``features.{i}.bias`` at the conv indices of the sequence, each conv
    followed by a ReLU, and a 2x2 max-pool wherever the next conv index is 3 further on (as in
    torchvision's VGG16, whose converted weights load as they are). Features are taken at the
    ReLU before each pool and after the last conv (relu1_2 .. relu5_3 for VGG16). Optional
    ``lin{k}.weight`` ([C_k] or [1, C_k, 1, 1], LPIPS' learned channel weights) weight the
    squared differences of tap k; without them every channel counts equally.

    distance(a, b): frames float [..., H, W, 3] in [-1, 1] -> float32 [...], per frame:
    ``sum_k mean_hw sum_c w_kc (f_k(a) / |f_k(a)| - f_k(b) / |f_k(b)|)^2``; 0 for equal inputs.
    """

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise FileNotFoundError(f"perceptual network weights not found: {path}")
        tensors = load_file(path)
        index = sorted(int(k.split(".")[1]) for k in tensors
                       if k.startswith("features.") and k.endswith(".weight"))
        if not index:
            raise ValueError(f"{path}: no features.<i>.weight tensors (a VGG-layout feature stack)")
        self.convs, self.taps = [], []
        for n, i in enumerate(index):
            weight = np.asarray(tensors[f"features.{i}.weight"], np.float32)  # [O, C, 3, 3]
            bias = np.asarray(tensors.get(f"features.{i}.bias", np.zeros(weight.shape[0])), np.float32)
            pool = n + 1 < len(index) and index[n + 1] - i == 3
            self.convs.append((jnp.asarray(weight.transpose(2, 3, 1, 0)), jnp.asarray(bias), pool))
            if pool or n + 1 == len(index):
                self.taps.append(n)
        self.lins = []
        for k, n in enumerate(self.taps):
            c = self.convs[n][0].shape[-1]
            lin = tensors.get(f"lin{k}.weight")
            self.lins.append(jnp.ones((c,), jnp.float32) if lin is None
                             else jnp.asarray(np.asarray(lin, np.float32).reshape(c)))

    def features(self, x: jax.Array) -> list[jax.Array]:
        """x float [B, H, W, 3] in [-1, 1] -> the tapped feature maps [B, H_k, W_k, C_k]."""
        x = (x.astype(jnp.float32) - jnp.asarray(_LPIPS_SHIFT)) / jnp.asarray(_LPIPS_SCALE)
        out = []
        for n, (kernel, bias, pool) in enumerate(self.convs):
            x = lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=lax.Precision.HIGHEST)
            x = nn.relu(x + bias)
            if n in self.taps:
                out.append(x)
            if pool:
                x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return out

    def distance(self, a: jax.Array, b: jax.Array) -> jax.Array:
        lead = a.shape[:-3]
        fa = self.features(a.reshape((-1,) + a.shape[-3:]))
        fb = self.features(b.reshape((-1,) + b.shape[-3:]))
        total = 0.0
        for x, y, lin in zip(fa, fb, self.lins):
            x = x * lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-10)
            y = y * lax.rsqrt(jnp.sum(jnp.square(y), axis=-1, keepdims=True) + 1e-10)
            total = total + jnp.mean(jnp.sum(jnp.square(x - y) * lin, axis=-1), axis=(1, 2))
        return total.reshape(lead)
