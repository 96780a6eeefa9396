r"""Converts a Hugging Face CLIP folder into a pixeldance CLIP weights folder.

  python -m pixeldance.convert.clip --input=DIR --output=OUT [--towers=text]

DIR is a transformers folder: config.json + model.safetensors (+ tokenizer.json), e.g. a download
of openai/clip-vit-base-patch16 or openai/clip-vit-base-patch32 (`CLIPModel`), or a text encoder
alone (`CLIPTextModel`, `CLIPTextModelWithProjection`, with --towers=text). The architecture comes
from its config.json (fields it leaves out take transformers' defaults, which are ViT-B/32's);
only safetensors are read, never pickle. OUT (new or empty) gets the folder of
`pixeldance/models/weights.py` ({"network": "clip", "text": ..., "vision": ...}) and a copy of the
tokenizer.json; `pixeldance.models.clip.load_clip(OUT)` reads it.

--towers=both (default) converts the image and text towers (CLIPSIM), --towers=text only the text
tower (what a text encoder needs); the vision tensors of a CLIPModel folder are then left out.

Every tensor of the file must map onto a parameter and every parameter must be in the file, with
the right shape (the position_ids buffers some files carry are ignored); otherwise a one-line
error names the first offender.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import jax
import numpy as np
from absl import flags
from flax import traverse_util

from pixeldance import cli
from pixeldance.convert.common import ConversionError
from pixeldance.models import clip, weights

WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
TOWERS = ("both", "text")

# transformers' CLIPTextConfig / CLIPVisionConfig defaults (what a config.json that leaves a
# field out means), by transformers' names, and our tower field each becomes.
_TEXT_FIELDS = {  # ours: (theirs, default)
    "width": ("hidden_size", 512), "layers": ("num_hidden_layers", 12),
    "heads": ("num_attention_heads", 8), "mlp_width": ("intermediate_size", 2048),
    "vocab_size": ("vocab_size", 49408), "max_positions": ("max_position_embeddings", 77),
    "eps": ("layer_norm_eps", 1e-5), "act": ("hidden_act", "quick_gelu"),
    "eos_token_id": ("eos_token_id", 49407),
}
_VISION_FIELDS = {
    "width": ("hidden_size", 768), "layers": ("num_hidden_layers", 12),
    "heads": ("num_attention_heads", 12), "mlp_width": ("intermediate_size", 3072),
    "patch_size": ("patch_size", 32), "image_size": ("image_size", 224),
    "eps": ("layer_norm_eps", 1e-5), "act": ("hidden_act", "quick_gelu"),
}
_PROJECTION_DEFAULT = 512

# Our parameter names that differ from transformers' (besides layers_3 -> encoder.layers.3).
_TOWER_PREFIX = {"text": "text_model.", "vision": "vision_model."}
_PROJECTIONS = {"text": "text_projection.weight", "vision": "visual_projection.weight"}
_EMBEDDINGS = {"token_embedding": "embeddings.token_embedding.weight",
               "position_embedding": "embeddings.position_embedding.weight",
               "patch_embedding": "embeddings.patch_embedding.weight",
               "class_embedding": "embeddings.class_embedding"}
_RENAMES = {"kernel": "weight", "scale": "weight", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
            "pre_layernorm": "pre_layrnorm"}  # sic: transformers' name


# ---------------------------------------------------------------------------------------------
# Architecture.

def _sub_config(config: dict, key: str) -> dict:
    """text_config / vision_config of a CLIPModel config; a *_config_dict (older configs) wins,
    as in transformers."""
    out = dict(config.get(key) or {})
    out.update(config.get(f"{key}_dict") or {})
    return out


def _fields(sub: dict, table: dict, where: str) -> dict:
    out = {ours: sub.get(theirs, default) for ours, (theirs, default) in table.items()}
    for key in ("patch_size", "image_size"):
        if key in out and isinstance(out[key], (list, tuple)):
            if len(set(out[key])) != 1:
                raise ConversionError(f"{where}: non-square {key} {out[key]} is not supported")
            out[key] = out[key][0]
    if out["act"] not in clip.ACTIVATIONS:
        raise ConversionError(f"{where}: hidden_act {out['act']!r} is not supported "
                              f"(known: {sorted(clip.ACTIVATIONS)})")
    if out["width"] % out["heads"]:
        raise ConversionError(f"{where}: hidden_size {out['width']} is not a multiple of "
                              f"num_attention_heads {out['heads']}")
    if "eos_token_id" in out and not isinstance(out["eos_token_id"], int):
        raise ConversionError(f"{where}: eos_token_id {out['eos_token_id']!r} is not one integer")
    return out


def towers_from_config(config: dict, towers: str, has_projection: bool, where: str) -> dict:
    """{'text': fields | None, 'vision': fields | None} of a transformers CLIP config.

    has_projection: whether the file holds text_projection.weight (decides for a text-only
    config without 'architectures').
    """
    if towers not in TOWERS:
        raise ConversionError(f"--towers={towers!r}; choose from {TOWERS}")
    kind = config.get("model_type")
    if kind == "clip":
        projection = config.get("projection_dim") or _PROJECTION_DEFAULT
        text = dict(_fields(_sub_config(config, "text_config"), _TEXT_FIELDS, where), projection_dim=projection)
        vision = None
        if towers == "both":
            sub = _sub_config(config, "vision_config")
            if sub.get("num_channels", 3) != 3:
                raise ConversionError(f"{where}: vision num_channels {sub['num_channels']} is not 3")
            vision = dict(_fields(sub, _VISION_FIELDS, where), projection_dim=projection)
        return {"text": text, "vision": vision}
    if kind == "clip_text_model":
        if towers != "text":
            raise ConversionError(f"{where}: a CLIP text model (no vision tower); convert it with --towers=text")
        architectures = config.get("architectures") or []
        with_projection = ("CLIPTextModelWithProjection" in architectures if architectures else has_projection)
        projection = (config.get("projection_dim") or _PROJECTION_DEFAULT) if with_projection else None
        return {"text": dict(_fields(config, _TEXT_FIELDS, where), projection_dim=projection), "vision": None}
    raise ConversionError(f"{where}: model_type {kind!r} is not a transformers CLIP model "
                          f"('clip' or 'clip_text_model')")


# ---------------------------------------------------------------------------------------------
# Tensors.

def read_input(input_dir: str) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors as float32 numpy arrays by transformers name, config.json) of a CLIP folder."""
    from safetensors import safe_open

    if not os.path.isdir(input_dir):
        raise ConversionError(f"input {input_dir} is not a folder (a Hugging Face CLIP folder: "
                              f"{HF_CONFIG} + {WEIGHTS})")
    config_path = os.path.join(input_dir, HF_CONFIG)
    if not os.path.isfile(config_path):
        raise ConversionError(f"{input_dir} has no {HF_CONFIG} (a Hugging Face CLIP folder)")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{config_path}: not a readable JSON file ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{config_path}: not a JSON object")
    path = os.path.join(input_dir, WEIGHTS)
    if not os.path.isfile(path):
        pickled = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
                   if os.path.exists(os.path.join(input_dir, n))]
        extra = f" (only safetensors are read, not {pickled[0]})" if pickled else ""
        raise ConversionError(f"{input_dir} has no {WEIGHTS}{extra}")
    tensors = {}
    try:
        # framework='flax' because numpy has no bfloat16, in which some copies are stored.
        with safe_open(path, framework="flax") as f:
            for name in f.keys():
                tensors[name] = np.asarray(jax.device_get(f.get_tensor(name)), np.float32)
    except Exception as e:  # safetensors raises its own error types
        raise ConversionError(f"cannot read {path} as safetensors: {str(e).splitlines()[0]}") from None
    return tensors, config


def hf_name(path: tuple[str, ...]) -> str:
    """Our parameter path -> transformers' tensor name, e.g. ('vision', 'layers_3', 'self_attn',
    'q_proj', 'kernel') -> 'vision_model.encoder.layers.3.self_attn.q_proj.weight'."""
    if path == ("logit_scale",):
        return "logit_scale"
    tower, rest = path[0], path[1:]
    if rest == ("projection", "kernel"):
        return _PROJECTIONS[tower]
    if len(rest) == 1 and rest[0] in _EMBEDDINGS:
        return _TOWER_PREFIX[tower] + _EMBEDDINGS[rest[0]]
    parts = []
    for p in rest:
        m = re.fullmatch(r"layers_(\d+)", p)
        parts.append(f"encoder.layers.{m.group(1)}" if m else _RENAMES.get(p, p))
    return _TOWER_PREFIX[tower] + ".".join(parts)


def to_ours(name: str, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A transformers tensor in our layout for a parameter of `shape`: Linear weights [out, in]
    -> kernels [in, out] reshaped to the heads ([D, N, K] for q/k/v, [N, K, D] for out_proj);
    the patch conv [D, 3, p, p] -> [p, p, 3, D]; everything else reshaped as it is."""
    if name.endswith("patch_embedding.weight") and tensor.ndim == 4:
        return tensor.transpose(2, 3, 1, 0)
    if name.endswith(".weight") and tensor.ndim == 2 and "embedding" not in name:
        tensor = tensor.T
    # Only the heads split (or a scalar's shape) changes the rank; a same-rank misfit stays as
    # it is, for the caller's shape check.
    if tensor.ndim != len(shape) and tensor.size == int(np.prod(shape)):
        return tensor.reshape(shape)
    return tensor


def _ignored(name: str, towers: str) -> bool:
    """Tensors deliberately not converted: the position_ids buffers (arange(n), rebuilt by the
    model), and with --towers=text the vision tower, its projection and the logit scale."""
    if name.endswith("position_ids"):
        return True
    return towers == "text" and (name.startswith("vision_model.") or name in ("visual_projection.weight",
                                                                              "logit_scale"))


def convert_params(tensors: dict[str, np.ndarray], model: clip.CLIP, towers: str) -> dict:
    """transformers tensors -> {'params': ...} of `model` (numpy float32); one-line ConversionError
    naming the first tensor that maps to no parameter, parameter with no tensor, or misfit shape."""
    flat = traverse_util.flatten_dict(clip.abstract_variables(model)["params"])
    names = {hf_name(path): path for path in flat}
    used = {n: t for n, t in tensors.items() if not _ignored(n, towers)}
    unmapped = sorted(set(used) - set(names))
    if unmapped:
        raise ConversionError(f"{len(unmapped)} tensor(s) of the file map to no parameter of the CLIP its "
                              f"config.json describes, first: {unmapped[0]}")
    missing = sorted(set(names) - set(used))
    if missing:
        raise ConversionError(f"{len(missing)} tensor(s) missing from the file, first: {missing[0]} "
                              f"(for {'/'.join(names[missing[0]])} {tuple(flat[names[missing[0]]].shape)})")
    out = {}
    for name, path in names.items():
        want = tuple(flat[path].shape)
        value = to_ours(name, used[name], want)
        if value.shape != want:
            raise ConversionError(f"tensor {name} has shape {tuple(used[name].shape)}, which does not fit "
                                  f"parameter {'/'.join(path)} of shape {want}")
        out[path] = np.ascontiguousarray(value, np.float32)
    return {"params": traverse_util.unflatten_dict(out)}


# ---------------------------------------------------------------------------------------------
# The folder.

def convert(input_dir: str, output_dir: str, towers: str = "both") -> dict:
    """Converts the Hugging Face CLIP folder INPUT_DIR into OUTPUT_DIR; returns the written config."""
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ConversionError(f"output {output_dir} is not empty (the converter writes a new folder)")
    tensors, hf_config = read_input(input_dir)
    # transformers 5 saves a CLIPTextModel's tensors without the 'text_model.' prefix that hub
    # folders (and every other CLIP class) have.
    if hf_config.get("model_type") == "clip_text_model" and not any(n.startswith("text_model.") for n in tensors):
        tensors = {n if n == _PROJECTIONS["text"] else "text_model." + n: t for n, t in tensors.items()}
    spec = towers_from_config(hf_config, towers, _PROJECTIONS["text"] in tensors,
                              os.path.join(input_dir, HF_CONFIG))
    model = clip.model_from_config(spec, os.path.join(input_dir, HF_CONFIG))
    variables = convert_params(tensors, model, towers)
    del tensors

    tokenizer_path = os.path.join(input_dir, clip.TOKENIZER)
    pad_token = clip.pad_token_of(input_dir)
    if os.path.isfile(tokenizer_path):
        clip.ClipTokenizer(tokenizer_path, pad_token)  # a malformed file fails here, not at use
        os.makedirs(output_dir, exist_ok=True)
        shutil.copyfile(tokenizer_path, os.path.join(output_dir, clip.TOKENIZER))
    config = dict(network=clip.NETWORK, text=spec["text"], vision=spec["vision"], pad_token=pad_token,
                  source=os.path.abspath(input_dir))
    return weights.save(output_dir, config, variables)  # config.json last: a complete folder


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    config = convert(FLAGS.input, FLAGS.output, FLAGS.towers)
    model = clip.model_from_config(config)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(clip.abstract_variables(model)))
    has = [t for t in ("text", "vision") if config[t]]
    tokenizer = os.path.isfile(os.path.join(FLAGS.output, clip.TOKENIZER))
    print(f"wrote {FLAGS.output} (CLIP {' + '.join(has)} tower{'s' if len(has) > 1 else ''}, "
          f"{n / 1e6:.1f}M parameters, {'with' if tokenizer else 'no'} tokenizer.json); load it with "
          f"pixeldance.models.clip.load_clip({FLAGS.output!r})")


def run():
    flags.DEFINE_string("input", None, "Hugging Face CLIP folder (config.json + model.safetensors).", required=True)
    flags.DEFINE_string("output", None, "New (or empty) output folder.", required=True)
    flags.DEFINE_enum("towers", "both", TOWERS, "Convert both towers, or only the text tower.")
    cli.run(main)


if __name__ == "__main__":
    run()
