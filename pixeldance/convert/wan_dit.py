r"""Converts diffusers' Wan 2.1 DiT (WanTransformer3DModel) into a pixeldance Wan DiT folder.

  python -m pixeldance.convert.wan_dit --input=DIR --output=OUT [--dtype=float32|bfloat16]

DIR is a diffusers WanTransformer3DModel folder (config.json and diffusion_pytorch_model.safetensors,
or the shards diffusion_pytorch_model-0000i-of-0000n.safetensors with
diffusion_pytorch_model.safetensors.index.json), or the root of a Wan diffusers repository
(e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers), whose DiT is in transformer/. Only safetensors are read,
never pickle.

The architecture comes from config.json, every field of it: those of the text-to-video
checkpoints are read (diffusers' defaults where a field is left out), and a field this port does
not support (image_dim / added_kv_proj_dim / pos_embed_seq_len: the image cross-attention of the
I2V and FLF2V checkpoints) or does not know fails with one line naming it.

OUT (new or empty) gets the folder that pixeldance.models.wan_dit.load_dit(OUT) reads (format
pixeldance/models/weights.py; config.json {"network": "wan_dit", "dit": {...}, "dtype": ...}).
--dtype is the compute dtype the loader uses by default; the weights are stored in float32
either way.

Per-layer tensors (blocks.<i>.*) are stacked into the scanned blocks' leading 'layers' axis as
they are written: tensors are read one at a time (`safe_open`) and written straight to
params.safetensors, so at most one layer's tensor is in memory and the 14B model is never held
(let alone twice). Every tensor must map onto a parameter and every parameter must have its
tensor with a fitting shape, checked before anything is read or written; otherwise a one-line
error names the first offender.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from typing import Callable, Iterator

import jax
import numpy as np
from absl import flags

from pixeldance import cli
from pixeldance.convert.common import ConversionError, first_line
from pixeldance.models import wan_dit, weights

CLASS = "WanTransformer3DModel"
CONFIG = "config.json"
SINGLE = "diffusion_pytorch_model.safetensors"
INDEX = SINGLE + ".index.json"
REPO_SUBFOLDER = "transformer"  # where a Wan diffusers repository keeps its DiT

# diffusers' field -> (ours, diffusers' default where config.json leaves it out).
_FIELDS = {
    "patch_size": ("patch_size", [1, 2, 2]), "num_attention_heads": ("num_heads", 40),
    "attention_head_dim": ("head_dim", 128), "in_channels": ("in_channels", 16),
    "out_channels": ("out_channels", 16), "text_dim": ("text_dim", 4096), "freq_dim": ("freq_dim", 256),
    "ffn_dim": ("ffn_dim", 13824), "num_layers": ("num_layers", 40), "cross_attn_norm": ("cross_attn_norm", True),
    "eps": ("eps", 1e-6), "rope_max_seq_len": ("rope_max_seq_len", 1024),
}
# Fields that must hold one value: diffusers 0.36 applies RMSNorm over the whole q / k width
# whatever qk_norm says, so only the value that describes it is accepted.
_FIXED = {"qk_norm": "rms_norm_across_heads"}
# Fields of the image-conditioned checkpoints (I2V / FLF2V): must be null.
_UNSUPPORTED = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
# Tensors diffusers itself skips when loading (_keys_to_ignore_on_load_unexpected).
_IGNORED = ("norm_added_q",)

# Our parameter path (under params/, blocks/ without the layer index) -> diffusers' name.
_NAMES = {
    "patch_embedding": "patch_embedding", "time_embedder": "condition_embedder.time_embedder",
    "time_proj": "condition_embedder.time_proj", "text_embedder": "condition_embedder.text_embedder",
    "proj_in": "net.0.proj", "to_out": "to_out.0", "kernel": "weight", "scale": "weight",
}
# Dense layers whose input is more than one axis of ours ([N, K] heads; the patch).
_IN_DIMS = {"to_out": 2, "patch_embedding": 4}


# ---------------------------------------------------------------------------------------------
# Input: the folder, config.json, the tensors read lazily.

def find_folder(path: str) -> str:
    """The WanTransformer3DModel folder of PATH: PATH itself, or PATH/transformer of a repository."""
    if not os.path.isdir(path):
        raise ConversionError(f"input {path} is not a folder (a diffusers {CLASS} folder or a Wan "
                              f"diffusers repository)")
    if os.path.isfile(os.path.join(path, CONFIG)):
        return path
    sub = os.path.join(path, REPO_SUBFOLDER)
    if os.path.isfile(os.path.join(sub, CONFIG)):
        return sub
    raise ConversionError(f"{path} has no {CONFIG} nor {REPO_SUBFOLDER}/{CONFIG} (a diffusers {CLASS} "
                          f"folder or a Wan diffusers repository)")


def read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG)
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable JSON file ({first_line(e)})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return config


def fields_from_config(config: dict, where: str) -> dict:
    """`WanTransformer`'s architecture fields from a diffusers config dict (diffusers' defaults for
    fields it leaves out); ConversionError naming the first unsupported or unknown field."""
    found = config.get("_class_name", CLASS)
    if found != CLASS:
        raise ConversionError(f"{where}: _class_name {found!r} is not {CLASS}")
    for key, value in config.items():
        if key.startswith("_") or key in _FIELDS:
            continue
        if key in _FIXED:
            if value != _FIXED[key]:
                raise ConversionError(f"{where}: {key}={value!r} is not supported (diffusers' Wan normalises "
                                      f"q and k with {_FIXED[key]!r} whatever it says)")
        elif key in _UNSUPPORTED:
            if value is not None:
                raise ConversionError(f"{where}: {key}={value!r} is not supported yet (the image cross-attention "
                                      f"of the I2V / FLF2V checkpoints); only the text-to-video DiT is ported")
        else:
            raise ConversionError(f"{where}: unknown field {key!r} (not a {CLASS} field of diffusers 0.36)")
    fields = {ours: config.get(theirs, default) for theirs, (ours, default) in _FIELDS.items()}
    if fields["out_channels"] is None:  # diffusers: out_channels or in_channels
        fields["out_channels"] = fields["in_channels"]
    patch = fields["patch_size"]
    if not (isinstance(patch, (list, tuple)) and len(patch) == 3 and all(_positive(p) for p in patch)):
        raise ConversionError(f"{where}: patch_size {patch!r} is not three positive integers")
    fields["patch_size"] = [int(p) for p in patch]
    for ours in ("num_heads", "head_dim", "in_channels", "out_channels", "text_dim", "freq_dim", "ffn_dim",
                 "num_layers", "rope_max_seq_len"):
        if not _positive(fields[ours]):
            theirs = next(k for k, v in _FIELDS.items() if v[0] == ours)
            raise ConversionError(f"{where}: {theirs} {fields[ours]!r} is not a positive integer")
    if fields["head_dim"] % 2 or fields["head_dim"] < 6:
        raise ConversionError(f"{where}: attention_head_dim {fields['head_dim']} must be even and at least 6 "
                              f"(3D RoPE shares it among t, h and w in pairs)")
    if not isinstance(fields["cross_attn_norm"], bool):
        raise ConversionError(f"{where}: cross_attn_norm {fields['cross_attn_norm']!r} is not true or false")
    if isinstance(fields["eps"], bool) or not isinstance(fields["eps"], (int, float)) or not fields["eps"] > 0:
        raise ConversionError(f"{where}: eps {fields['eps']!r} is not a positive number")
    fields["eps"] = float(fields["eps"])
    return fields


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class TensorFiles:
    """The tensors of a diffusers folder's diffusion_pytorch_model.safetensors or its shards, by
    name, read one at a time (as float32 numpy). A context manager: files stay open until exit."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        index_path, single = os.path.join(folder, INDEX), os.path.join(folder, SINGLE)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
                files = {n: os.path.join(folder, weight_map[n]) for n in weight_map}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConversionError(f"{index_path}: not a safetensors index (a JSON object with a "
                                      f"weight_map; {first_line(e)})") from None
        elif os.path.isfile(single):
            files = None
        else:
            pickled = [n for n in sorted(os.listdir(folder)) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            extra = f" (only safetensors are read, not {pickled[0]})" if pickled else ""
            raise ConversionError(f"{folder} has no {SINGLE} or {INDEX}{extra}")
        self._handles, self.files = {}, {}
        for path in sorted(set(files.values()) if files is not None else {single}):
            if not os.path.isfile(path):
                raise ConversionError(f"{path}: a shard named in {INDEX} is missing")
            try:
                # framework='flax': numpy has no bfloat16, in which some releases are stored.
                self._handles[path] = safe_open(path, framework="flax")
            except Exception as e:  # safetensors raises its own error types
                raise ConversionError(f"cannot read {path} as safetensors: {first_line(e)}") from None
        for path, handle in self._handles.items():
            for name in handle.keys():
                if files is None or files.get(name) == path:
                    self.files[name] = path
        if files is not None:
            lost = sorted(set(files) - set(self.files))
            if lost:
                raise ConversionError(f"{files[lost[0]]} has no tensor {lost[0]}, which {INDEX} places there")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handles.clear()

    def names(self) -> set[str]:
        return set(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.files[name]].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return np.asarray(jax.device_get(self._handles[self.files[name]].get_tensor(name)), np.float32)


# ---------------------------------------------------------------------------------------------
# Names and layouts.

def diffusers_name(path: tuple[str, ...], layer: int | None = None) -> str:
    """Our parameter path (without 'params') -> diffusers' tensor name; blocks' paths need the
    layer, e.g. (('blocks', 'attn1', 'to_out', 'kernel'), 3) -> 'blocks.3.attn1.to_out.0.weight',
    (('blocks', 'ffn', 'proj_out', 'bias'), 0) -> 'blocks.0.ffn.net.2.bias'."""
    parts = [_NAMES.get(p, p) for p in path]
    if path[:2] == ("blocks", "ffn") and path[2] == "proj_out":
        parts[2] = "net.2"
    if path[0] == "blocks":
        parts[0] = f"blocks.{layer}"
    return ".".join(parts)


def diffusers_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape diffusers stores for our parameter of `shape` (one layer's, for blocks): Linear
    weights [out, in] of our kernels [in..., out...]; the patch Conv3d [D, C, pt, ph, pw] of our
    [pt, ph, pw, C, D]; the modulation tables with a leading 1; the rest flat."""
    if path[-1] == "kernel":
        if path[0] == "patch_embedding":
            pt, ph, pw, C, D = shape
            return (D, C, pt, ph, pw)
        n_in = _IN_DIMS.get(path[-2], 1)
        return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    if path[-1] == "scale_shift_table":
        return (1, *shape)
    return (math.prod(shape),)


def to_ours(path: tuple[str, ...], tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A diffusers tensor (already shape-checked) in our layout of `shape`."""
    if path[-1] == "kernel":
        tensor = tensor.transpose(2, 3, 4, 1, 0) if path[0] == "patch_embedding" else tensor.T
    return np.ascontiguousarray(tensor.reshape(shape), np.float32)


def expected_tensors(fields: dict) -> dict[str, tuple[tuple[str, ...], int | None, tuple[int, ...]]]:
    """{diffusers name: (our path under params, layer or None, diffusers' shape)} of every tensor
    a checkpoint of architecture `fields` must hold."""
    out = {}
    for path, leaf in wan_dit.abstract_params(fields).items():
        if path[0] == "blocks":
            for layer in range(leaf.shape[0]):
                out[diffusers_name(path, layer)] = (path, layer, diffusers_shape(path, leaf.shape[1:]))
        else:
            out[diffusers_name(path)] = (path, None, diffusers_shape(path, leaf.shape))
    return out


def _arrays(fields: dict, tensors: TensorFiles) -> list[tuple[str, tuple[int, ...], Callable[[], Iterator]]]:
    """[(our flat name, shape, chunks)] where chunks() yields the array's bytes in order (a whole
    array, or the layers of a stacked one); every name and shape checked before any read."""
    expected = expected_tensors(fields)
    available = {n for n in tensors.names() if not any(part in n for part in _IGNORED)}
    unmapped = sorted(available - set(expected))
    if unmapped:
        raise ConversionError(f"{len(unmapped)} tensor(s) of the checkpoint map to no parameter of the Wan DiT "
                              f"its config.json describes, first: {unmapped[0]}")
    missing = sorted(set(expected) - available)
    if missing:
        path, _, shape = expected[missing[0]]
        raise ConversionError(f"{len(missing)} tensor(s) missing from the checkpoint, first: {missing[0]} "
                              f"(for {'/'.join(path)}, stored as {shape})")
    for name, (path, _, shape) in sorted(expected.items()):
        if tensors.shape(name) != shape:
            raise ConversionError(f"tensor {name} has shape {tensors.shape(name)}, which does not fit parameter "
                                  f"{'/'.join(path)} (stored as {shape})")
    arrays = []
    for path, leaf in sorted(wan_dit.abstract_params(fields).items()):
        shape = tuple(leaf.shape)
        if path[0] == "blocks":
            def chunks(path=path, shape=shape):
                for layer in range(shape[0]):
                    yield to_ours(path, tensors.get(diffusers_name(path, layer)), shape[1:])
        else:
            def chunks(path=path, shape=shape):
                yield to_ours(path, tensors.get(diffusers_name(path)), shape)
        arrays.append(("params/" + "/".join(path), shape, chunks))
    return arrays


# ---------------------------------------------------------------------------------------------
# Output: params.safetensors written chunk by chunk (weights.py's layout), then config.json.

def write_params(path: str, arrays: list[tuple[str, tuple[int, ...], Callable[[], Iterator]]]) -> str:
    """Writes float32 tensors (name, shape, chunks) as a safetensors file, each tensor's bytes
    the concatenation of what chunks() yields (C order: the layers of a stacked array one after
    another), one chunk in memory at a time; returns the file's sha256.

    The layout the safetensors library writes: an 8-byte little-endian header size, the JSON
    header (tensors by name, contiguous data_offsets) padded with spaces to 8 bytes, the data."""
    header, offset = {}, 0
    for name, shape, _ in arrays:
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    with open(path + ".tmp", "wb") as f:
        for chunk in (struct.pack("<Q", len(text)), text):
            f.write(chunk)
            digest.update(chunk)
        for name, shape, chunks in arrays:
            written = 0
            for value in chunks():
                data = memoryview(np.ascontiguousarray(value, np.float32)).cast("B")
                f.write(data)
                digest.update(data)
                written += data.nbytes
            if written != 4 * math.prod(shape):
                raise AssertionError(f"{name}: wrote {written} bytes, declared {tuple(shape)}")
    os.replace(path + ".tmp", path)
    return digest.hexdigest()


def convert(input_path: str, output_dir: str, *, dtype: str = "float32") -> dict:
    """Converts the diffusers folder or repository INPUT_PATH into OUTPUT_DIR; returns the written
    config. ConversionError (one line) on bad input, before anything is written."""
    if dtype not in wan_dit.DTYPES:
        raise ConversionError(f"--dtype={dtype}: choose from {sorted(wan_dit.DTYPES)}")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ConversionError(f"output {output_dir} is not empty (the converter writes a new folder)")
    folder = find_folder(input_path)
    fields = fields_from_config(read_config(folder), os.path.join(folder, CONFIG))
    with TensorFiles(folder) as tensors:
        arrays = _arrays(fields, tensors)
        os.makedirs(output_dir, exist_ok=True)
        digest = write_params(os.path.join(output_dir, weights.PARAMS), arrays)
    config = dict(network=wan_dit.NETWORK, dit=fields, dtype=dtype, source=os.path.abspath(folder), sha256=digest)
    path = os.path.join(output_dir, weights.CONFIG)  # written last: a folder with config.json is complete
    with open(path + ".tmp", "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    return config


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    config = convert(FLAGS.input, FLAGS.output, dtype=FLAGS.dtype)
    fields = config["dit"]
    n = sum(math.prod(a.shape) for a in wan_dit.abstract_params(fields).values())
    print(f"wrote {FLAGS.output} (Wan DiT, {n / 1e9:.2f}B parameters, {fields['num_layers']} layers, width "
          f"{fields['num_heads'] * fields['head_dim']}); load it with "
          f"pixeldance.models.wan_dit.load_dit({FLAGS.output!r})")


def run():
    flags.DEFINE_string("input", None, f"diffusers {CLASS} folder, or a Wan diffusers repository root "
                        f"(its {REPO_SUBFOLDER}/).", required=True)
    flags.DEFINE_string("output", None, "New (or empty) output folder.", required=True)
    flags.DEFINE_enum("dtype", "float32", sorted(wan_dit.DTYPES), "Default compute dtype of the loaded DiT.")
    cli.run(main)


if __name__ == "__main__":
    run()
