"""C3D fine-tuned on UCF-101, the network of the video Inception Score (Flax Linen, inference only).

The UCF-101 video IS of the text-to-video literature (PixelDance's Table 2, after TGAN-v2 and
StyleGAN-V) is the softmax of this network's 101 logits on 16-frame clips. What follows was read in
the references, and the choices they leave open are marked as ours.

Reference: TGAN-v2, pfnet-research/tgan2 (Chainer 6.0.0, commit f892bc4),
``tgan2/models/c3d/c3d_ucf101.py`` (``C3DVersion1UCF101``) and
``tgan2/evaluations/inception_score.py``. StyleGAN-V (universome/stylegan-v,
``src/metrics/video_inception_score.py``) loads a TorchScript file ``c3d_ucf101.pt`` that it calls a
"perfectly reproduced torchscript version" of that Chainer model; its contents are not in the
repository, so TGAN-v2's Python is the reference here. MAGVIT's Flax port (videogvt,
``C3D ... as implemented in pfnet-research/tgan2``) agrees on the architecture below.

Architecture (Caffe's C3D "v1", channels first in the reference; NDHWC here):
  conv1a 64 -> pool1 (1,2,2) -> conv2a 128 -> pool2 (2,2,2) -> conv3a 256, conv3b 256 -> pool3
  (2,2,2) -> conv4a 512, conv4b 512 -> pool4 (2,2,2) -> conv5a 512, conv5b 512 -> pool5 (2,2,2)
  -> fc6 8192->4096 -> fc7 4096->4096 -> fc8 4096->101.
  Every conv is 3x3x3, stride 1, padding 1, with a bias, followed by a ReLU; fc6 and fc7 by a ReLU;
  no BatchNorm (the TGAN-v2 UCF-101 class has none, unlike its ``C3DVersion1``). Dropout after
  pool5, fc6 and fc7 is the identity at inference. Max pools have stride = window and Chainer's
  ``cover_all=True``: a last, partial window is kept (padded with -inf), which matters only at
  pool5, where 7x7 becomes 4x4 (Caffe's ceil mode; torch's ``ceil_mode=True``). The PyTorch C3D
  commonly found on GitHub pads pool5 by (0, 1, 1) instead, which also gives 4x4 but other windows.
  fc6 reads pool5's [512, 1, 4, 4] flattened channels first (C, F, H, W), as Chainer's Linear does.

Input preprocessing (the reference's ``pre`` stage, run by its ``__call__`` before conv1a):
  1. clips are [-1, 1] RGB: real UCF-101 clips as ``(u - 128) / 128`` of uint8 u
     (``tgan2/datasets/h5video.py``), generated ones clipped to [-1, 1];
  2. a fixed 1x1x1 conv swaps RGB to BGR and multiplies by 128;
  3. each frame is resized to 112x112 with Chainer 6's ``F.resize_images``: bilinear with aligned
     corners (sample rows at ``linspace(0, H - 1, 112)``), the whole frame squashed, no crop;
  4. ``128 - mean`` is added, where ``mean`` is ``mean2.npz['mean']`` of the TGAN-v2 release
     ([3, 16, H, W] BGR, Caffe's UCF-101 mean clip) cropped to ``[:, :, 8:120, 8:120]``, a
     top-left offset of 8 on both axes.
  For uint8 input, 1-2 give exactly ``u_BGR - 128``, so conv1a sees ``resize(u_BGR) - 128 + 128 -
  mean`` = ``resize(u_BGR) - mean`` (the resize is linear). :func:`preprocess` does the
  parameter-free part (uint8 values, RGB -> BGR, the resize); the network subtracts the mean
  clip, a weights-file array (``params/mean``, [16, 112, 112, 3] BGR, written by the converter),
  as its first op, where the reference also keeps it (a ``Bias`` link of the chain, not in the
  weights' .npz).
  Ours, left open by the references: uint8 input is mapped as the reference maps real clips
  (``(u - 128) / 128``; StyleGAN-V quantizes generated frames by ``x * 127.5 + 128``); non-square
  frames are squashed, as the reference would; clips have exactly 16 frames (the mean clip's).

Output, and which one IS takes: ``{"logits": float32 [B, 101], "fc7": float32 [B, 4096]}``.
  logits  fc8, the reference's ``__call__`` output; IS is computed on ``softmax(logits)``
          (TGAN-v2's ``inception_score``: ``F.softmax(classifier(x))``, eps 1e-20 in the logs;
          StyleGAN-V: 2048 videos, 10 splits after a seeded shuffle);
  fc7     ReLU(fc7), the reference's ``get_feature`` (its C3D FID features).

Every conv, dense and resize contraction runs at ``jax.lax.Precision.HIGHEST`` (float32 on TPU,
where the default is bf16), so scores match across backends.

Weights: TGAN-v2's release v1.0 holds ``conv3d_deepnetA_ucf.npz`` (the Chainer model, converted
from the Caffe C3D ``c3d_ucf101_finetune_whole_iter_20000``) and ``mean2.npz``;
``python -m pixeldance.convert.c3d`` reads them (or a PyTorch state dict saved as safetensors) and
writes a folder of :mod:`pixeldance.models.weights`, which :func:`load_c3d` reads. Nothing is
downloaded.

Axes (see pixeldance/models/__init__.py): B batch, F frames (inside the network, the frames of
the level a layer runs at), H, W height and width, C channels.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pixeldance.models import weights

NETWORK = "c3d"
ORIGIN = ("TGAN-v2's UCF-101 C3D: convert conv3d_deepnetA_ucf.npz and mean2.npz of the tgan2 v1.0 "
          "release (or its PyTorch state dict as safetensors) with python -m pixeldance.convert.c3d")
FRAMES = 16
SIZE = 112
FEATURES = 4096
NUM_CLASSES = 101

_HIGHEST = jax.lax.Precision.HIGHEST

# The 3x3x3 convs in order, and the max-pool window after those a pool follows.
CONVS = (("conv1a", 64), ("conv2a", 128), ("conv3a", 256), ("conv3b", 256),
         ("conv4a", 512), ("conv4b", 512), ("conv5a", 512), ("conv5b", 512))
POOLS = {"conv1a": (1, 2, 2), "conv2a": (2, 2, 2), "conv3b": (2, 2, 2), "conv4b": (2, 2, 2),
         "conv5b": (2, 2, 2)}


def _max_pool_cover_all(x, window: tuple[int, int, int]):
    """Chainer's max_pooling_nd(ksize=window, stride=window, cover_all=True): a partial window at
    the end of an axis is kept, its missing taps -inf. x: [B, F, H, W, C] -> [B, ceil(F / k), ...]."""
    pads = []
    for n, k in zip(x.shape[1:4], window):
        out = -(-n // k)  # Chainer's get_conv_outsize with cover_all, pad 0 and stride k
        pads.append((0, out * k - n))
    return nn.max_pool(x, window, strides=window, padding=pads)


class C3D(nn.Module):
    """TGAN-v2's UCF-101 C3D (see the module docstring).

    clips: float32 [B, 16, 112, 112, 3], :func:`preprocess`'s output (BGR, uint8 range, before the
    mean clip, which the network subtracts) -> {"logits": [B, num_classes], "fc7": [B, 4096]}.
    """
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, clips):
        if clips.ndim != 5 or tuple(clips.shape[1:]) != (FRAMES, SIZE, SIZE, 3):
            raise ValueError(f"C3D takes clips [B, {FRAMES}, {SIZE}, {SIZE}, 3] (pixeldance.models.c3d."
                             f"preprocess's output), got {tuple(clips.shape)}")
        # The reference's mean Bias: Caffe's UCF-101 mean clip, BGR, cropped to 112 x 112.
        mean = self.param("mean", nn.initializers.zeros, (FRAMES, SIZE, SIZE, 3), jnp.float32)
        x = clips.astype(jnp.float32) - mean
        for name, width in CONVS:
            x = nn.Conv(width, (3, 3, 3), padding=((1, 1),) * 3, precision=_HIGHEST, name=name)(x)
            x = nn.relu(x)
            if name in POOLS:
                x = _max_pool_cover_all(x, POOLS[name])
        # x: [B, 1, 4, 4, 512]; fc6's weights index the reference's channels-first flattening.
        x = jnp.transpose(x, (0, 4, 1, 2, 3)).reshape(x.shape[0], -1)      # [B, C * F * H * W]
        x = nn.relu(nn.Dense(FEATURES, precision=_HIGHEST, name="fc6")(x))
        fc7 = nn.relu(nn.Dense(FEATURES, precision=_HIGHEST, name="fc7")(x))
        logits = nn.Dense(self.num_classes, precision=_HIGHEST, name="fc8")(fc7)
        return {"logits": logits, "fc7": fc7}


def _aligned_bilinear(n_in: int, n_out: int) -> np.ndarray:
    """float32 [n_out, n_in]: Chainer 6's resize_images along one axis (bilinear, aligned corners:
    output i samples input position ``linspace(0, n_in - 1, n_out)[i]``, the upper tap clamped)."""
    pos = np.linspace(0.0, n_in - 1, num=n_out)  # float64, as Chainer computes it
    frac, base = np.modf(pos)
    base = base.astype(np.int64)
    frac = frac.astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, base), 1.0 - frac)
    np.add.at(m, (rows, np.minimum(base + 1, n_in - 1)), frac)
    return m


def _resize_axis(x, axis: int, size: int):
    if x.shape[axis] == size:
        return x  # aligned corners at equal sizes sample every pixel exactly
    m = jnp.asarray(_aligned_bilinear(x.shape[axis], size))                 # [size, n]
    y = jnp.tensordot(x, m, axes=((axis,), (1,)), precision=_HIGHEST)      # the new axis last
    return jnp.moveaxis(y, -1, axis)


def preprocess(videos):
    """The reference's input stage up to its mean clip (see the module docstring).

    videos: float32 [B, F, H, W, 3] holding uint8 values in [0, 255], RGB, any H and W ->
    float32 [B, F, 112, 112, 3], BGR, each frame squashed to 112 x 112 with Chainer's
    aligned-corner bilinear resize. C3D takes F = 16.
    """
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"preprocess takes videos [B, F, H, W, 3] of uint8 values, got {tuple(videos.shape)}")
    x = videos.astype(jnp.float32)[..., ::-1]  # the Caffe model was trained on BGR
    x = _resize_axis(x, 2, SIZE)
    return _resize_axis(x, 3, SIZE)


def abstract_variables(model: C3D) -> dict:
    """{'params': ...} of ``model`` as jax.ShapeDtypeStruct, compiling nothing."""
    clips = jax.ShapeDtypeStruct((1, FRAMES, SIZE, SIZE, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), clips)


def load_c3d(directory: str) -> tuple[C3D, dict]:
    """(C3D, variables) of a folder written by ``python -m pixeldance.convert.c3d``.

    variables: {'params': ...} of numpy float32 (the mean clip included), checked against the
    network's shapes. Raises weights.WeightsError (one line naming the folder) on a missing folder,
    another network's folder, or missing, unexpected or mis-shaped arrays.
    """
    config, variables = weights.load(directory, network=NETWORK, origin=ORIGIN)
    num_classes = config.get("num_classes", NUM_CLASSES)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise weights.WeightsError(f"{directory}: config.json has num_classes={num_classes!r}, "
                                   f"not a positive int")
    model = C3D(num_classes=num_classes)
    weights.check_like(abstract_variables(model), variables, directory)
    return model, variables
