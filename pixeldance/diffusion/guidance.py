"""Classifier-free guidance with separate text and image scales (pure functions).

Predictions of up to four conditioning branches are combined (InstructPix2Pix's form):

  guided = none + s_image (image - none) + s_text (full - image)

  full   text and image instructions
  image  image instructions only (the empty prompt)
  none   neither (the empty prompt, c_image and its mask zeroed)

With s_image = 1 the `none` branch cancels, guided = image + s_text (full - image), and two
branches suffice: `num_branches` says how many the scales need, so callers batch only those.

Keyframe groups. With keyframes beyond the first frame, the first frame and the other keyframes
can have scales of their own, s_image and s_keys, with a fourth branch

  first  the first frame's instruction only (the empty prompt)
  guided = none + s_image (first - none) + s_keys (image - first) + s_text (full - image)

which is the three-branch form when s_keys = s_image (the `first` terms cancel).
Predictions are any pytree of arrays, e.g. (x0_hat, v_hat) of `objectives.denoise`: every
objective's conversion to them is affine in the network output, so guiding them is guiding the
output.

Axis letters (glossary: pixeldance/models/__init__.py): B batch; branch-stacked arrays are
[n * B, ...] in the order full, image, none.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

BRANCHES = ("full", "image", "none", "first")


def num_branches(image_scale: float, keyframe_scale: float | None = None) -> int:
    """2 when the image scale is 1 (the none branch cancels), else 3; 4 when a keyframe scale is
    given and differs from the image scale. A host-side (static) choice."""
    if keyframe_scale is not None and float(keyframe_scale) != float(image_scale):
        return 4
    return 2 if float(image_scale) == 1.0 else 3


def stack(x, n: int):
    """x [B, ...] -> [n * B, ...]: the same input for each of the first n branches."""
    return jnp.concatenate([x] * n)


def combine(preds, n: int, *, text_scale, image_scale=1.0, keyframe_scale=None):
    """Branch-stacked predictions (pytree of [n * B, ...]) -> guided predictions [B, ...].

    n = 2: branches (full, image); image_scale is then 1 whatever is passed.
    n = 3: branches (full, image, none).
    n = 4: branches (full, image, none, first), keyframe_scale the other keyframes' scale.
    text_scale, image_scale, keyframe_scale: floats or float32 scalars (traced is fine). Scales
    1, 1 give `full`.
    """
    if n not in (2, 3, 4):
        raise ValueError(f"guidance combines 2, 3 or 4 branches, got {n}")
    if n == 4 and keyframe_scale is None:
        raise ValueError("guidance with 4 branches needs keyframe_scale")

    def one(p):
        branches = jnp.split(p, n)
        full, image = branches[0], branches[1]
        guided = image + text_scale * (full - image)
        if n == 3:
            none = branches[2]
            guided = guided + (image_scale - 1.0) * (image - none)
        if n == 4:
            none, first = branches[2], branches[3]
            guided = guided + (keyframe_scale - 1.0) * (image - first) + (image_scale - 1.0) * (first - none)
        return guided

    return jax.tree.map(one, preds)


def rescale(guided, full, phi: float):
    """Guidance rescale (Lin et al. 2024, "Common diffusion noise schedules and sample steps are
    flawed", section 3.4): guided [B, ...] brought to the per-example standard deviation of the
    conditional prediction full [B, ...] by the fraction phi in [0, 1] (0: guided unchanged).
    Strong guidance inflates the guided prediction's spread (over-saturated colours); the rescale
    keeps its direction and undoes the inflation. Standard deviations over every axis but the first.
    """
    axes = tuple(range(1, guided.ndim))
    ratio = jnp.std(full, axis=axes, keepdims=True) / jnp.maximum(jnp.std(guided, axis=axes, keepdims=True), 1e-12)
    return phi * (guided * ratio) + (1.0 - phi) * guided

