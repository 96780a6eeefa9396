r"""Converts a Hugging Face text encoder folder into a pixeldance text-encoder folder.

  python -m pixeldance.convert.text_encoder --kind=clip|t5|umt5 --input=DIR --output=OUT \
      [--tokenizer=DIR] [--dtype=float32|bfloat16] [--max_length=N]

DIR is a transformers folder: config.json and model.safetensors, or the shards of a sharded
checkpoint (model-0000i-of-0000n.safetensors + model.safetensors.index.json). By --kind:
  clip   a CLIPTextModel / CLIPTextModelWithProjection or a whole CLIPModel folder, whose text
         tower alone is converted (pixeldance/convert/clip.py's text-tower mode);
  t5     T5 v1.1 / mT5 (model_type 't5' or 'mt5'), e.g. google/t5-v1_1-xxl;
  umt5   umT5 (model_type 'umt5'), e.g. google/umt5-xxl or Wan2.1's text_encoder/.
For t5 and umt5 a T5EncoderModel folder or a whole T5ForConditionalGeneration / UMT5 checkpoint:
its encoder.* and shared.weight tensors are converted and the decoder and LM head left out. Only
safetensors are read, never pickle; the architecture comes from config.json, and --kind must
match its model_type.

Tokenizer files (tokenizer.json, spiece.model, tokenizer_config.json, special_tokens_map.json)
are copied from DIR, or from --tokenizer=DIR where the encoder's folder has none (Wan2.1's
diffusers folder keeps them in tokenizer/ beside text_encoder/). CLIP needs tokenizer.json;
T5 and umT5 tokenizer.json or spiece.model.

OUT (new or empty) gets the folder that pixeldance.models.text_encoder.load_text_encoder(OUT)
reads (format pixeldance/models/weights.py, config.json {"network": "text_encoder", "kind": ...}).
--dtype is the compute dtype the loader uses by default (CLIP: float32 only); the weights are
stored in float32 either way. --max_length: texts' padded length (default 77 for CLIP, 512 for T5
and umT5, as Wan 2.1).

Tensors are read one at a time and written straight to params.safetensors, so umT5-XXL (5.7B
parameters, 22.7 GB in float32) is never held whole in memory. Every tensor the encoder uses
must map onto a parameter and every parameter must have its tensor, with a fitting shape;
otherwise a one-line error names the first offender, and nothing is written.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from typing import Callable, Iterator

import jax
import numpy as np
from absl import flags

from pixeldance import cli
from pixeldance.convert import clip as convert_clip
from pixeldance.convert.common import ConversionError, first_line
from pixeldance.models import clip, t5, weights
from pixeldance.models import text_encoder as te

HF_CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MODEL_TYPES = {"clip": ("clip", "clip_text_model"), "t5": ("t5", "mt5"), "umt5": ("umt5",)}

# transformers' T5Config / MT5Config and UMT5Config defaults (what a config.json that leaves a
# field out means; MT5's are UMT5's), by transformers' names, and the T5Encoder field each becomes.
_T5_FIELDS = {  # ours: (theirs, T5 default, mT5 / umT5 default)
    "vocab_size": ("vocab_size", 32128, 250112), "width": ("d_model", 512, 512),
    "layers": ("num_layers", 6, 8), "heads": ("num_heads", 8, 6), "head_width": ("d_kv", 64, 64),
    "mlp_width": ("d_ff", 2048, 1024), "num_buckets": ("relative_attention_num_buckets", 32, 32),
    "max_distance": ("relative_attention_max_distance", 128, 128), "eps": ("layer_norm_epsilon", 1e-6, 1e-6),
}
_FEED_FORWARD_DEFAULT = {"t5": "relu", "mt5": "gated-gelu", "umt5": "gated-gelu"}


# ---------------------------------------------------------------------------------------------
# Input: config.json and the tensors, read lazily.

def read_hf_config(input_dir: str) -> dict:
    if not os.path.isdir(input_dir):
        raise ConversionError(f"input {input_dir} is not a folder (a Hugging Face text encoder folder: "
                              f"{HF_CONFIG} + {SINGLE} or its shards)")
    path = os.path.join(input_dir, HF_CONFIG)
    if not os.path.isfile(path):
        raise ConversionError(f"{input_dir} has no {HF_CONFIG} (a Hugging Face text encoder folder)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable JSON file ({first_line(e)})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return config


def check_kind(kind: str, config: dict, where: str):
    """--kind against config.json's model_type: one line naming both where they disagree."""
    found = config.get("model_type")
    if found not in MODEL_TYPES[kind]:
        fits = [k for k, types in MODEL_TYPES.items() if found in types]
        hint = f" (use --kind={fits[0]})" if fits else ""
        raise ConversionError(f"{where}: model_type {found!r} is not a {kind} model (--kind={kind} takes "
                              f"model_type {' or '.join(map(repr, MODEL_TYPES[kind]))}){hint}")


class TensorFiles:
    """The tensors of a folder's model.safetensors or of its shards, by name, read one at a time
    (as float32 numpy). A context manager: the files stay open until it exits."""

    def __init__(self, input_dir: str):
        from safetensors import safe_open

        index_path, single = os.path.join(input_dir, INDEX), os.path.join(input_dir, SINGLE)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
                files = {n: os.path.join(input_dir, weight_map[n]) for n in weight_map}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConversionError(f"{index_path}: not a safetensors index (a JSON object with a "
                                      f"weight_map; {first_line(e)})") from None
        elif os.path.isfile(single):
            files = None
        else:
            pickled = [n for n in sorted(os.listdir(input_dir))
                       if n.endswith((".bin", ".h5", ".msgpack", ".pt", ".pth", ".ckpt"))]
            extra = f" (only safetensors are read, not {pickled[0]})" if pickled else ""
            raise ConversionError(f"{input_dir} has no {SINGLE} or {INDEX}{extra}")
        self._handles, self.files = {}, {}
        for path in sorted(set(files.values()) if files is not None else {single}):
            if not os.path.isfile(path):
                raise ConversionError(f"{path}: a shard named in {INDEX} is missing")
            try:
                # framework='flax': numpy has no bfloat16, in which Wan's umT5 and others are stored.
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
# T5 / umT5: architecture and names.

def t5_fields(kind: str, config: dict, where: str) -> dict:
    """T5Encoder fields (less dtype and per_layer_bias, which the kind sets) from a T5Config /
    MT5Config / UMT5Config dict, transformers' defaults (by its model_type) for fields it leaves out."""
    model_type = config.get("model_type", kind)
    column = 1 if model_type == "t5" else 2
    fields = {ours: config.get(spec[0], spec[column]) for ours, spec in _T5_FIELDS.items()}
    proj = config.get("feed_forward_proj", _FEED_FORWARD_DEFAULT.get(model_type, "relu"))
    if not isinstance(proj, str) or len(proj.split("-")) > 2 or (proj.count("-") and not proj.startswith("gated-")):
        raise ConversionError(f"{where}: feed_forward_proj {proj!r} is not 'ACT' or 'gated-ACT'")
    # As transformers: 'gated-gelu' means gelu_new; a dense_act_fn in the file wins.
    derived = "gelu_new" if proj == "gated-gelu" else proj.split("-")[-1]
    fields["act"] = config.get("dense_act_fn", derived)
    fields["gated"] = bool(config.get("is_gated_act", proj.startswith("gated-")))
    if fields["act"] not in t5.ACTIVATIONS:
        raise ConversionError(f"{where}: activation {fields['act']!r} is not supported; "
                              f"choose from {sorted(t5.ACTIVATIONS)}")
    for key in ("vocab_size", "width", "layers", "heads", "head_width", "mlp_width", "num_buckets", "max_distance"):
        if not isinstance(fields[key], int) or isinstance(fields[key], bool) or fields[key] < 1:
            raise ConversionError(f"{where}: {_T5_FIELDS[key][0]} {fields[key]!r} is not a positive integer")
    if fields["num_buckets"] < 4 or fields["max_distance"] <= fields["num_buckets"] // 4:
        raise ConversionError(f"{where}: relative_attention_num_buckets {fields['num_buckets']} / max_distance "
                              f"{fields['max_distance']}: need at least 4 buckets and a distance past the exact ones")
    return fields


_PARTS = {"attn_norm": "layer.0.layer_norm", "mlp_norm": "layer.1.layer_norm", "attn": "layer.0.SelfAttention",
          "mlp": "layer.1.DenseReluDense", "relative_bias": "relative_attention_bias", "kernel": "weight",
          "scale": "weight"}
EMBEDDING = "shared.weight"


def t5_hf_name(path: tuple[str, ...]) -> str:
    """Our parameter path (without 'params') -> transformers' tensor name, e.g. ('layers_3',
    'attn', 'q', 'kernel') -> 'encoder.block.3.layer.0.SelfAttention.q.weight'."""
    if path == ("token_embedding",):
        return EMBEDDING
    if path == ("final_norm", "scale"):
        return "encoder.final_layer_norm.weight"
    parts = ["encoder"]
    for p in path:
        m = re.fullmatch(r"layers_(\d+)", p)
        parts.append(f"block.{m.group(1)}" if m else _PARTS.get(p, p))
    name = ".".join(parts)
    return name + ".weight" if path[-1] == "relative_bias" else name


def t5_hf_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape transformers stores for our parameter of `shape`: Linear weights [out, in] of
    our kernels [D, N, K] (q/k/v), [N, K, D] (o), [in, out] (the MLP); others as they are."""
    if path[-1] != "kernel":
        return shape
    if path[-2] in "qkv":
        return (shape[1] * shape[2], shape[0])
    if path[-2] == "o":
        return (shape[2], shape[0] * shape[1])
    return (shape[1], shape[0])


def t5_to_ours(path: tuple[str, ...], tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A transformers tensor (already shape-checked) in our layout: Linear weights transposed to
    [in, out], then split into heads where ours has them."""
    if path[-1] == "kernel":
        tensor = tensor.T
    return np.ascontiguousarray(tensor.reshape(shape), np.float32)


def _t5_ignored(name: str) -> bool:
    """Tensors of a whole checkpoint an encoder does not use: the decoder and the LM head; the
    encoder's own copy of the tied embedding is taken only where shared.weight is absent."""
    return name.startswith("decoder.") or name == "lm_head.weight"


# ---------------------------------------------------------------------------------------------
# Output: params.safetensors written tensor by tensor (weights.py's layout), then config.json.

def _write_params(path: str, arrays: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]) -> str:
    """Writes float32 tensors (name, shape, producer) as a safetensors file, calling each producer
    only when its bytes are written (one tensor in memory at a time); returns the file's sha256.

    The layout the safetensors library writes: an 8-byte little-endian header size, the JSON
    header (tensors by name, contiguous data_offsets) padded with spaces to 8 bytes, the data."""
    header, offset = {}, 0
    for name, shape, _ in arrays:
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    with open(path + ".tmp", "wb") as f:
        for chunk in (struct.pack("<Q", len(text)), text):
            f.write(chunk)
            digest.update(chunk)
        for name, shape, produce in arrays:
            value = np.ascontiguousarray(produce(), np.float32)
            if value.shape != tuple(shape):
                raise AssertionError(f"{name}: produced {value.shape}, declared {tuple(shape)}")
            data = memoryview(value).cast("B")
            f.write(data)
            digest.update(data)
    os.replace(path + ".tmp", path)
    return digest.hexdigest()


def _write_config(directory: str, config: dict):
    """config.json as weights.save writes it (temporary name, then renamed: a folder with a
    config.json is complete)."""
    path = os.path.join(directory, weights.CONFIG)
    with open(path + ".tmp", "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# Tokenizer files.

def _special_token(directory: str, key: str, default: str) -> str:
    """A special token that special_tokens_map.json, then tokenizer_config.json, names, else `default`."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                value = json.load(f).get(key)
        except (OSError, ValueError, AttributeError) as e:
            raise ConversionError(f"{path}: not a readable JSON object ({first_line(e)})") from None
        if isinstance(value, dict):  # {"content": "</s>", ...}
            value = value.get("content")
        if isinstance(value, str):
            return value
    return default


def tokenizer_files(kind: str, directory: str) -> tuple[list[str], dict, object]:
    """(paths of the tokenizer files to copy, the folder config's 'tokenizer' entry, the
    tokenizer built from them: a malformed file fails here, not at use)."""
    present = [os.path.join(directory, n) for n in te.TOKENIZER_FILES if os.path.isfile(os.path.join(directory, n))]
    names = {os.path.basename(p) for p in present}
    needed = (te.TOKENIZER_JSON,) if kind == "clip" else (te.TOKENIZER_JSON, te.SENTENCEPIECE)
    if not names & set(needed):
        raise ConversionError(f"{directory} has no {' or '.join(needed)} (the {kind} tokenizer); pass "
                              f"--tokenizer=DIR where they are (Wan2.1's diffusers folder keeps them in "
                              f"tokenizer/ beside text_encoder/)")
    if kind == "clip":
        entry = {"pad_token": clip.pad_token_of(directory)}
    else:
        entry = {"pad_token": _special_token(directory, "pad_token", te.T5_PAD),
                 "eos_token": _special_token(directory, "eos_token", te.T5_EOS)}
    return present, entry, te.make_tokenizer(kind, directory, entry)


# ---------------------------------------------------------------------------------------------
# The conversion.

def _t5_arrays(kind: str, fields: dict, tensors: TensorFiles):
    """[(our flat name, shape, producer)] of a T5 / umT5 encoder; every check before any read."""
    abstract = te.abstract_params(kind, fields)
    names = {}
    for path, leaf in abstract.items():
        names[t5_hf_name(path[1:])] = (path, tuple(leaf.shape))
    available = tensors.names()
    if EMBEDDING not in available and "encoder.embed_tokens.weight" in available:
        names["encoder.embed_tokens.weight"] = names.pop(EMBEDDING)  # an untied export
    used = {n for n in available if not _t5_ignored(n) and not (n == "encoder.embed_tokens.weight" and
                                                                    EMBEDDING in available)}
    unmapped = sorted(used - set(names))
    if unmapped:
        raise ConversionError(f"{len(unmapped)} tensor(s) of the checkpoint map to no parameter of the "
                              f"{kind} encoder its config.json describes, first: {unmapped[0]}")
    missing = sorted(set(names) - used)
    if missing:
        path, shape = names[missing[0]]
        raise ConversionError(f"{len(missing)} tensor(s) missing from the checkpoint, first: {missing[0]} "
                              f"(for {'/'.join(path[1:])} {shape})")
    arrays = []
    for name, (path, shape) in sorted(names.items(), key=lambda item: item[1][0]):
        want = t5_hf_shape(path[1:], shape)
        if tensors.shape(name) != want:
            raise ConversionError(f"tensor {name} has shape {tensors.shape(name)}, which does not fit parameter "
                                  f"{'/'.join(path[1:])} of shape {shape} (stored as {want})")
        arrays.append(("/".join(path), shape,
                       lambda name=name, path=path, shape=shape: t5_to_ours(path[1:], tensors.get(name), shape)))
    return arrays


def _clip_arrays(config: dict, tensors: TensorFiles, where: str) -> tuple[dict, list]:
    """(text-tower fields, [(our flat name, shape, producer)]) of a CLIP folder, through
    pixeldance/convert/clip.py's text-tower mode (a CLIP text tower is small: read whole)."""
    loaded = {n: tensors.get(n) for n in sorted(tensors.names())}
    # transformers 5 saves a CLIPTextModel's tensors without the 'text_model.' prefix (as convert.clip).
    projection = "text_projection.weight"
    if config.get("model_type") == "clip_text_model" and not any(n.startswith("text_model.") for n in loaded):
        loaded = {n if n == projection else "text_model." + n: t for n, t in loaded.items()}
    spec = convert_clip.towers_from_config(config, "text", projection in loaded, where)
    model = clip.model_from_config(spec, where)
    variables = convert_clip.convert_params(loaded, model, "text")
    flat = {"/".join(k): v for k, v in _flatten(variables)}
    return spec["text"], [(k, tuple(v.shape), lambda v=v: v) for k, v in sorted(flat.items())]


def _flatten(tree, prefix=()) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def convert(kind: str, input_dir: str, output_dir: str, *, tokenizer_dir: str | None = None,
            dtype: str = "float32", max_length: int | None = None) -> dict:
    """Converts the Hugging Face folder INPUT_DIR (an encoder of `kind`) into OUTPUT_DIR; returns
    the written config. ConversionError (one line) on bad input, before anything is written."""
    if kind not in MODEL_TYPES:
        raise ConversionError(f"--kind={kind}: choose from {sorted(MODEL_TYPES)}")
    if dtype not in te.DTYPES:
        raise ConversionError(f"--dtype={dtype}: choose from {sorted(te.DTYPES)}")
    if kind == "clip" and dtype != "float32":
        raise ConversionError("--dtype: the CLIP text tower computes in float32 only")
    if max_length is not None and max_length < 2:
        raise ConversionError(f"--max_length={max_length}: at least 2 (a token and the end token)")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ConversionError(f"output {output_dir} is not empty (the converter writes a new folder)")
    hf_config = read_hf_config(input_dir)
    where = os.path.join(input_dir, HF_CONFIG)
    check_kind(kind, hf_config, where)
    copies, tokenizer, built = tokenizer_files(kind, input_dir if tokenizer_dir is None else tokenizer_dir)
    with TensorFiles(input_dir) as tensors:
        if kind == "clip":
            fields, arrays = _clip_arrays(hf_config, tensors, where)
            if max_length is not None and max_length > fields["max_positions"]:
                raise ConversionError(f"--max_length={max_length}: the CLIP text tower has "
                                      f"{fields['max_positions']} positions")
        else:
            fields = t5_fields(kind, hf_config, where)
            te.check_vocabulary(built, te.model_from_config(kind, fields), input_dir)
            arrays = _t5_arrays(kind, fields, tensors)
        os.makedirs(output_dir, exist_ok=True)
        for path in copies:
            shutil.copyfile(path, os.path.join(output_dir, os.path.basename(path)))
        digest = _write_params(os.path.join(output_dir, weights.PARAMS), arrays)
    config = dict(network=te.NETWORK, kind=kind, encoder=fields, dtype=dtype, tokenizer=tokenizer,
                  max_length=max_length or te.DEFAULT_MAX_LENGTH[kind], source=os.path.abspath(input_dir),
                  sha256=digest)
    _write_config(output_dir, config)
    return config


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    config = convert(FLAGS.kind, FLAGS.input, FLAGS.output, tokenizer_dir=FLAGS.tokenizer,
                     dtype=FLAGS.dtype, max_length=FLAGS.max_length)
    n = sum(int(np.prod(s.shape)) for s in te.abstract_params(config["kind"], config["encoder"]).values())
    print(f"wrote {FLAGS.output} ({config['kind']} text encoder, {n / 1e6:.1f}M parameters, width "
          f"{config['encoder']['width']}, texts of {config['max_length']} tokens); load it with "
          f"pixeldance.models.text_encoder.load_text_encoder({FLAGS.output!r})")


def run():
    flags.DEFINE_enum("kind", None, sorted(MODEL_TYPES), "Which encoder the folder holds.", required=True)
    flags.DEFINE_string("input", None, "Hugging Face folder (config.json + model.safetensors or shards).",
                        required=True)
    flags.DEFINE_string("output", None, "New (or empty) output folder.", required=True)
    flags.DEFINE_string("tokenizer", None, "Folder of the tokenizer files, where --input has none.")
    flags.DEFINE_enum("dtype", "float32", sorted(te.DTYPES), "Default compute dtype of the loaded encoder.")
    flags.DEFINE_integer("max_length", None, "Texts' padded length (default: 77 CLIP, 512 T5 / umT5).")
    cli.run(main)


if __name__ == "__main__":
    run()
