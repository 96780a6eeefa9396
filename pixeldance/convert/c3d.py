r"""Converts TGAN-v2's UCF-101 C3D (the video Inception Score network) into a weights folder.

  python -m pixeldance.convert.c3d --input=FILE --mean=MEAN --output=DIR

Getting the weights (nothing here downloads them). TGAN-v2's README (pfnet-research/tgan2, "Pre-
trained weights") points at two files of its release v1.0 (github.com/rezoo/tgan2/releases):

  conv3d_deepnetA_ucf.npz   the Chainer model ``C3DVersion1UCF101`` (Caffe's C3D fine-tuned on
                            UCF-101, ``c3d_ucf101_finetune_whole_iter_20000``), keys ``conv1a/W``,
                            ``conv1a/b``, ..., ``fc8/b``;
  mean2.npz                 the mean clip ``mean``, [3, 16, H, W] BGR (Caffe's UCF-101 mean; the
                            reference crops it to ``[:, :, 8:120, 8:120]``).

FILE is that .npz, or a PyTorch state dict of the same network saved as safetensors, with the
names of the PyTorch C3D commonly found on GitHub (``conv1.weight``, ``conv2.bias``,
``conv3a.weight``, ..., ``fc8.bias``; ``conv1a``/``conv2a`` are read too). Only these two formats
are read, never a pickle: .npz with ``numpy.load(allow_pickle=False)``, safetensors with
safetensors. A .pth or a TorchScript file (StyleGAN-V's ``c3d_ucf101.pt``) is turned into
safetensors once, with torch, outside this library:

  python -c "import torch, safetensors.torch as st; m = torch.jit.load('c3d_ucf101.pt', map_location='cpu'); st.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, 'c3d_ucf101.safetensors')"

(for a .pth state dict: ``sd = torch.load('c3d.pth', map_location='cpu', weights_only=True)`` in
place of ``m.state_dict()``). The tensor names inside StyleGAN-V's TorchScript were not available
to check: if they differ from the names above, the converter refuses the first unknown one by name.

MEAN is mean2.npz (or any .npz/safetensors with an array ``mean``, the only one read, as in the
reference); it may be left out when FILE itself holds a tensor ``mean``. A mean of
[3, 16, 112, 112] is taken as already cropped; a larger one is cropped as the reference does. The
conv1a input of the reference is ``resize(frames, BGR) - mean``, so the mean clip is part of the
network's variables (``params/mean``, stored [16, 112, 112, 3]).

Every tensor must map onto a variable of :class:`pixeldance.models.c3d.C3D` and every variable must
be there with its shape. Chainer's and torch's layouts are the same: conv [O, C, kt, kh, kw] ->
ours [kt, kh, kw, C, O], linear [out, in] -> [in, out] (fc6's inputs stay in the reference's
channels-first order, which the model flattens in). The same weights may sit in a C3D whose pool5
pads (0, 1, 1) instead of Chainer's cover_all; nothing in a state dict tells them apart, and this
module's network is TGAN-v2's. DIR (new or empty) gets the folder of
:mod:`pixeldance.models.weights`: load it with ``pixeldance.models.c3d.load_c3d(DIR)``.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np
from absl import flags
from flax import traverse_util

from pixeldance import cli, logs
from pixeldance.convert.common import ConversionError, first_line
from pixeldance.models import c3d, weights

_RELEASE = "conv3d_deepnetA_ucf.npz and mean2.npz of the tgan2 v1.0 release (github.com/rezoo/tgan2/releases)"
_HOWTO = (f"{_RELEASE}, or the state dict of a PyTorch C3D saved as safetensors; the command is in "
          f"pixeldance/convert/c3d.py")
# Names of the two first convs in the common PyTorch C3D -> the reference's.
_ALIASES = {"conv1": "conv1a", "conv2": "conv2a"}
_LAYERS = tuple(name for name, _ in c3d.CONVS) + ("fc6", "fc7", "fc8")
_LEAVES = {"W": "kernel", "weight": "kernel", "b": "bias", "bias": "bias"}
MEAN = "mean"
MEAN_CROP = (8, 120)  # the reference's crop of the mean clip, rows and columns alike


def read_arrays(path: str, what: str) -> dict[str, np.ndarray]:
    """The arrays of the .npz or safetensors file PATH by name. One-line ConversionError naming
    PATH if it is missing, a folder, neither format, or holds anything but numeric arrays (a pickle
    is refused unread; an .npz with pickled objects too)."""
    if not os.path.exists(path):
        raise ConversionError(f"{what} {path} does not exist (give {_HOWTO})")
    if os.path.isdir(path):
        raise ConversionError(f"{what} {path} is a folder, not an .npz or .safetensors file (give {_HOWTO})")
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {first_line(e)}") from None
    arrays = {}
    if is_zip:  # .npz; torch.save's zip pickles are zips too, and fail the checks below
        try:
            with np.load(path, allow_pickle=False) as f:
                for name in f.files:
                    arrays[name] = f[name]
        except Exception as e:  # numpy raises ValueError, OSError, BadZipFile, ...
            raise ConversionError(f"cannot read {path} as an .npz of arrays ({first_line(e)}); only "
                                  f".npz (no pickled objects) and safetensors are read: give {_HOWTO}") from None
    else:
        from safetensors import safe_open
        try:
            with safe_open(path, framework="numpy") as f:
                arrays = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise ConversionError(f"cannot read {path} as safetensors ({first_line(e)}); only .npz and "
                                  f"safetensors are read, never a pickle: give {_HOWTO}") from None
    for name, value in arrays.items():
        if not isinstance(value, np.ndarray):  # numpy hands out a zip member that is no .npy as bytes
            raise ConversionError(f"cannot read {path} as an .npz of arrays (member {name} is not a .npy "
                                  f"array; a torch .pth is a zip of pickles); only .npz and safetensors are "
                                  f"read, never a pickle: give {_HOWTO}")
        if value.dtype.kind != "f":
            raise ConversionError(f"{path}: {name} is {value.dtype}, not a floating-point array (give {_HOWTO})")
    return arrays


def our_name(name: str) -> tuple[str, ...] | None:
    """A reference tensor name -> our variable path: 'conv1a/W' and 'conv1.weight' ->
    ('params', 'conv1a', 'kernel'), 'fc8.bias' -> ('params', 'fc8', 'bias'), 'mean' ->
    ('params', 'mean'); None for any other name."""
    if name == MEAN:
        return ("params", MEAN)
    for sep in ("/", "."):
        layer, _, leaf = name.rpartition(sep)
        layer = _ALIASES.get(layer, layer)
        if layer in _LAYERS and leaf in _LEAVES:
            return ("params", layer, _LEAVES[leaf])
    return None


def crop_mean(value: np.ndarray, label: str) -> np.ndarray:
    """The reference's mean clip [1?, 3, 16, H, W] (BGR) -> ours [16, 112, 112, 3]: cropped to
    ``[8:120, 8:120]`` as the reference does, or taken as is at 112 x 112."""
    shape = value.shape
    if value.ndim == 5 and shape[0] == 1:
        value = value[0]
    lo, hi = MEAN_CROP
    if value.ndim != 4 or value.shape[:2] != (3, c3d.FRAMES):
        raise ConversionError(f"{label}: mean has shape {shape}, not [3, {c3d.FRAMES}, H, W] "
                              f"(the mean clip of mean2.npz)")
    if value.shape[2:] != (c3d.SIZE, c3d.SIZE):
        if value.shape[2] < hi or value.shape[3] < hi:
            raise ConversionError(f"{label}: mean has shape {shape}; the reference crops it to "
                                  f"[:, :, {lo}:{hi}, {lo}:{hi}], so H and W must be >= {hi} (or both {c3d.SIZE})")
        value = value[:, :, lo:hi, lo:hi]
    return value.transpose(1, 2, 3, 0)  # [C, F, H, W] -> [F, H, W, C]


def _to_ours(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    """Chainer/torch layout -> ours: conv [O, C, kt, kh, kw] -> [kt, kh, kw, C, O]; linear
    [out, in] -> [in, out]; biases as they are."""
    if path[-1] == "kernel" and value.ndim == 5:
        return value.transpose(2, 3, 4, 1, 0)
    if path[-1] == "kernel" and value.ndim == 2:
        return value.T
    return value


def convert_variables(tensors: dict[str, np.ndarray], label: str) -> dict:
    """Reference tensors by name (the mean clip ``mean`` among them) -> {'params': ...} of C3D
    (numpy float32). One-line ConversionError naming ``label`` on the first unmapped tensor, a
    variable given twice or missing, or a shape that does not fit."""
    want = {k: tuple(v.shape) for k, v in
            traverse_util.flatten_dict(c3d.abstract_variables(c3d.C3D(c3d.NUM_CLASSES))).items()}
    out, renamed = {}, {}
    for name in sorted(tensors):  # each tensor's own faults first, then what is missing
        path = our_name(name)
        if path not in want:
            raise ConversionError(f"{label}: tensor {name} maps to no variable of C3D "
                                  f"(not TGAN-v2's UCF-101 C3D? give {_HOWTO})")
        if path in renamed:
            raise ConversionError(f"{label}: tensors {renamed[path]} and {name} both map to {'/'.join(path)}")
        renamed[path] = name
        value = tensors[name]
        value = crop_mean(value, label) if path == ("params", MEAN) else _to_ours(value, path)
        if value.shape != want[path]:
            raise ConversionError(f"{label}: tensor {name} has shape {tuple(tensors[name].shape)}, which does "
                                  f"not fit {'/'.join(path)} of shape {want[path]}")
        out[path] = np.ascontiguousarray(value, np.float32)
    missing = sorted(set(want) - set(renamed))
    if missing:
        first = ("params", MEAN) if ("params", MEAN) in missing else missing[0]  # the usual omission
        hint = (f"the mean clip: give --mean=mean2.npz ({_RELEASE})" if first == ("params", MEAN)
                else f"{first[1]}.{'weight' if first[2] == 'kernel' else 'bias'} or {first[1]}/{'W' if first[2] == 'kernel' else 'b'}")
        raise ConversionError(f"{label}: {len(missing)} tensor(s) of C3D missing, first: {hint}")
    return traverse_util.unflatten_dict(out)


def convert(input_path: str, output_dir: str, mean_path: str | None = None) -> dict:
    """Converts FILE ``input_path`` (and the mean clip of ``mean_path``, unless FILE holds one; see
    the module docstring) into the weights folder ``output_dir``; returns the config written.
    Raises ConversionError (one line) on bad input or a non-empty output folder."""
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ConversionError(f"output {output_dir} is not empty (the converter writes a new folder)")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConversionError(f"output {output_dir} is a file, not a folder")
    label = os.path.abspath(input_path)
    tensors = read_arrays(input_path, "input")
    source = f"{label} (sha256 {weights.sha256(input_path)})"
    if mean_path:
        mean_label = os.path.abspath(mean_path)
        means = read_arrays(mean_path, "mean")
        if MEAN in tensors:
            raise ConversionError(f"{label} holds a mean clip and --mean={mean_path} gives another; give one")
        if MEAN not in means:  # the reference reads numpy.load(mean_path)['mean'] and nothing else
            raise ConversionError(f"{mean_label}: holds {sorted(means)[:3]} but no array '{MEAN}' "
                                  f"(the mean clip of mean2.npz, {_RELEASE})")
        crop_mean(means[MEAN], mean_label)  # a misfit is named by its own file
        tensors = dict(tensors, **{MEAN: means[MEAN]})
        source += f"; mean {mean_label} (sha256 {weights.sha256(mean_path)})"
    variables = convert_variables(tensors, label)
    config = {"network": c3d.NETWORK, "num_classes": c3d.NUM_CLASSES, "source": source}
    return weights.save(output_dir, config, variables)


def main(argv):
    del argv
    logs.setup()  # the libraries' INFO lines off unless --verbosity=1
    FLAGS = flags.FLAGS
    convert(FLAGS.input, FLAGS.output, FLAGS.mean)
    print(f"wrote {FLAGS.output} (TGAN-v2's UCF-101 C3D for the video IS); load it with "
          f"pixeldance.models.c3d.load_c3d({FLAGS.output!r})")


def run():
    flags.DEFINE_string("input", None, "conv3d_deepnetA_ucf.npz of TGAN-v2, or a PyTorch C3D state dict as "
                        ".safetensors (see the module docstring).", required=True)
    flags.DEFINE_string("mean", None, "mean2.npz of TGAN-v2 (the mean clip); not needed when --input "
                        "holds a tensor 'mean'.")
    flags.DEFINE_string("output", None, "New (or empty) output folder.", required=True)
    cli.run(main)


if __name__ == "__main__":
    run()
