"""Classifier-free guidance with separate text and image scales (pure functions).

Predictions of up to three conditioning branches are combined (InstructPix2Pix's form):

  guided = none + s_image (image - none) + s_text (full - image)

  full   text and image instructions
  image  image instructions only (the empty prompt)
  none   neither (the empty prompt, c_image and its mask zeroed)

With s_image = 1 the `none` branch cancels, guided = image + s_text (full - image), and two
branches suffice: `num_branches` says how many a pair of scales needs, so callers batch only those.
Predictions are any pytree of arrays, e.g. (x0_hat, v_hat) of `objectives.denoise`: every
objective's conversion to them is affine in the network output, so guiding them is guiding the
output.

Axis letters (glossary: pixeldance/models/__init__.py): B batch; branch-stacked arrays are
[n * B, ...] in the order full, image, none.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

BRANCHES = ("full", "image", "none")


def num_branches(image_scale: float) -> int:
    """2 when the image scale is 1 (the none branch cancels), else 3. A host-side (static) choice."""
    return 2 if float(image_scale) == 1.0 else 3


def stack(x, n: int):
    """x [B, ...] -> [n * B, ...]: the same input for each of the first n branches."""
    return jnp.concatenate([x] * n)


def combine(preds, n: int, *, text_scale, image_scale=1.0):
    """Branch-stacked predictions (pytree of [n * B, ...]) -> guided predictions [B, ...].

    n = 2: branches (full, image); image_scale is then 1 whatever is passed.
    n = 3: branches (full, image, none).
    text_scale, image_scale: floats or float32 scalars (traced is fine). Scales 1, 1 give `full`.
    """
    if n not in (2, 3):
        raise ValueError(f"guidance combines 2 or 3 branches, got {n}")

    def one(p):
        branches = jnp.split(p, n)
        full, image = branches[0], branches[1]
        guided = image + text_scale * (full - image)
        if n == 3:
            none = branches[2]
            guided = guided + (image_scale - 1.0) * (image - none)
        return guided

    return jax.tree.map(one, preds)
