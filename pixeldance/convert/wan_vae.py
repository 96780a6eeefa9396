r"""Converts the open Wan 2.1 video VAE from diffusers' safetensors into a pixeldance checkpoint.

  python -m pixeldance.convert.wan_vae --input=PATH --output=DIR

PATH is a diffusers folder (config.json + diffusion_pytorch_model.safetensors, e.g. the `vae/`
folder of a Wan 2.1 diffusers release) or a .safetensors file (architecture from a config.json
beside it, else Wan 2.1's). Only safetensors are read, never pickle. DIR (new or empty) gets:

  config.json        {"vae": {"family": "wan", ...}}: `pixeldance.load_vae(DIR)` dispatches on it
  vae_model.json     the `WanVAE` fields
  vae/0/             Orbax checkpoint of the parameters ({'params': ...}, float32)
  latent_stats.json  diffusers' per-channel latents_mean / latents_std, the normalisation the DiT
                     trains with (`workdir.LatentStats`)

The file names are the workdir's (`pixeldance/workdir.py`), so the folder loads like a workdir.

Every tensor of the file must map onto a parameter of the model and every parameter must be in
the file, with the right shape; otherwise a one-line error names the first offender.
"""
from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
from absl import flags
from flax import traverse_util
from safetensors import safe_open

from pixeldance import build, cli, logs, sharding, train_lib
from pixeldance import workdir as workdir_lib
from pixeldance.checkpoint import Checkpointer
from pixeldance.convert.common import ConversionError, first_line
from pixeldance.models import wan_vae

WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CONFIG = "config.json"  # the architecture, beside the weights in a diffusers folder
STEP = 0

# Where a name of ours differs from diffusers' (besides `name_3` -> `name.3`).
_RENAMES = {"kernel": "weight", "scale": "gamma", "spatial_conv": "resample.1"}


# ---------------------------------------------------------------------------------------------
# Reading diffusers' files.
# ---------------------------------------------------------------------------------------------

def read_input(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors as float32 numpy arrays by diffusers name, diffusers config or {}) of PATH."""
    if os.path.isdir(path):
        weights = os.path.join(path, WEIGHTS)
        if not os.path.exists(weights):
            raise ConversionError(f"{path} has no {WEIGHTS} (a diffusers folder of AutoencoderKLWan)")
    elif os.path.exists(path):
        weights = path
    else:
        raise ConversionError(f"input {path} does not exist")
    if not weights.endswith(".safetensors"):
        raise ConversionError(f"input {weights} is not a .safetensors file (pickled checkpoints are "
                              f"not read; use the diffusers release)")
    config = {}
    config_path = os.path.join(os.path.dirname(weights), DIFFUSERS_CONFIG)
    if os.path.exists(config_path):
        try:
            with open(config_path) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:  # truncated, garbled, not UTF-8
            raise ConversionError(f"{config_path}: not a readable JSON file ({first_line(e)})") from None
        if not isinstance(config, dict):
            raise ConversionError(f"{config_path}: not a JSON object")
    tensors = {}
    try:
        # framework='flax' because numpy has no bfloat16, in which some copies are stored.
        with safe_open(weights, framework="flax") as f:
            for name in f.keys():
                tensors[name] = np.asarray(jax.device_get(f.get_tensor(name)), np.float32)
    except Exception as e:  # safetensors raises its own error types
        raise ConversionError(f"cannot read {weights} as safetensors: {str(e).splitlines()[0]}") from None
    return tensors, config


def model_from_diffusers_config(config: dict) -> wan_vae.WanVAE:
    """The `WanVAE` of a diffusers `AutoencoderKLWan` config ({} means Wan 2.1's defaults)."""
    if config.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise ConversionError(f"config is for {config['_class_name']}, not AutoencoderKLWan")
    unsupported = dict(is_residual=(False,), patch_size=(None, 1), attn_scales=([],),
                       in_channels=(3,), out_channels=(3,))
    for key, allowed in unsupported.items():
        if key in config and config[key] not in allowed:
            raise ConversionError(f"config {key}={config[key]!r} is not supported (the Wan 2.1 VAE has "
                                  f"{key}={allowed[0]!r}; the Wan 2.2 VAE is not ported)")
    spec = dict(wan_vae.WAN21)
    for ours, theirs in (("base_dim", "base_dim"), ("decoder_base_dim", "decoder_base_dim"),
                         ("z_dim", "z_dim"), ("dim_mult", "dim_mult"),
                         ("num_res_blocks", "num_res_blocks"),
                         ("temporal_downsample", "temperal_downsample")):
        if theirs in config:
            spec[ours] = tuple(config[theirs]) if isinstance(config[theirs], list) else config[theirs]
    return wan_vae.WanVAE(**spec)


def diffusers_name(path: tuple[str, ...]) -> str:
    """Our parameter path -> diffusers tensor name, e.g. ('decoder', 'up_blocks_0',
    'upsamplers_0', 'spatial_conv', 'kernel') -> 'decoder.up_blocks.0.upsamplers.0.resample.1.weight'."""
    return ".".join(re.sub(r"_(\d+)$", r".\1", _RENAMES.get(p, p)) for p in path)


def to_ours(tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A diffusers tensor in our layout for a parameter of `shape`.

    Conv kernels [C_out, C_in, K, kh, kw] -> [K, kh, kw, C_in, C_out] (3D) and [C_out, C_in, kh, kw]
    -> [kh, kw, C_in, C_out] (2D); the attention's 1x1 convs [C_out, C_in, 1, 1] -> [C_in, C_out];
    norm scales [C, 1, 1(, 1)] -> [C]. Biases as they are.
    """
    if len(shape) == 5 and tensor.ndim == 5:
        return tensor.transpose(2, 3, 4, 1, 0)
    if len(shape) == 4 and tensor.ndim == 4:
        return tensor.transpose(2, 3, 1, 0)
    if len(shape) == 2 and tensor.ndim == 4:
        return tensor.reshape(tensor.shape[:2]).T
    return tensor.reshape(-1) if len(shape) == 1 else tensor


def abstract_params(model: wan_vae.WanVAE) -> dict:
    """{'params': tree of jax.ShapeDtypeStruct} of `model`, without compiling anything."""
    video = jax.ShapeDtypeStruct((1, 1, model.spatial_factor, model.spatial_factor, 3), np.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), video)
    return {"params": train_lib.strip_boxes(variables["params"])}


def convert_params(tensors: dict[str, np.ndarray], model: wan_vae.WanVAE) -> dict:
    """diffusers tensors -> {'params': ...} of `model` (numpy float32).

    Raises ConversionError naming the first tensor that maps to no parameter, the first parameter
    with no tensor, or the first shape that does not fit.
    """
    flat = traverse_util.flatten_dict(abstract_params(model)["params"])
    names = {diffusers_name(path): path for path in flat}
    unmapped = sorted(set(tensors) - set(names))
    if unmapped:
        raise ConversionError(f"{len(unmapped)} tensor(s) of the file map to no parameter of the Wan 2.1 "
                              f"VAE (config mismatch or not diffusers' AutoencoderKLWan?), first: {unmapped[0]}")
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise ConversionError(f"{len(missing)} tensor(s) missing from the file, first: {missing[0]}")
    out = {}
    for name, path in names.items():
        want = tuple(flat[path].shape)
        value = to_ours(tensors[name], want)
        if value.shape != want:
            raise ConversionError(f"tensor {name} has shape {tuple(tensors[name].shape)}, which does not "
                                  f"fit parameter {'/'.join(path)} of shape {want}")
        out[path] = np.ascontiguousarray(value, np.float32)
    return {"params": traverse_util.unflatten_dict(out)}


# ---------------------------------------------------------------------------------------------
# The checkpoint directory.
# ---------------------------------------------------------------------------------------------

def save_params(directory: str, params: dict):
    """Writes {'params': ...} as the Orbax checkpoint `directory`/vae/0."""
    ckpt = Checkpointer(os.path.join(directory, workdir_lib.VAE_DIR), keep=1, use_async=False)
    ckpt.save(STEP, jax.tree.map(np.asarray, params), force=True)
    ckpt.close()


def load_params(directory: str, model: wan_vae.WanVAE, mesh=None) -> dict:
    """{'params': ...} of a converted folder, on `mesh` (default: this process's first device)."""
    mesh = sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1]) if mesh is None else mesh
    init_fn = build.vae_init_fn(model, 1, model.spatial_factor, model.spatial_factor)
    return workdir_lib.load_params(os.path.join(directory, workdir_lib.VAE_DIR), init_fn, mesh)


def convert(input_path: str, output_dir: str) -> wan_vae.WanVAE:
    """Converts PATH (see the module docstring) into `output_dir`; returns the model."""
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ConversionError(f"output {output_dir} is not empty (the converter writes a new folder)")
    tensors, config = read_input(input_path)
    model = model_from_diffusers_config(config)
    params = convert_params(tensors, model)
    del tensors
    stats = {"mean": list(config.get("latents_mean") or []), "std": list(config.get("latents_std") or [])}
    for key, values in stats.items():
        if values and len(values) != model.z_dim:
            raise ConversionError(f"config latents_{key} has {len(values)} entries, z_dim is {model.z_dim}")

    os.makedirs(output_dir, exist_ok=True)
    save_params(output_dir, params)
    workdir_lib.write_model_spec(output_dir, model)
    if stats["mean"] and stats["std"]:
        workdir_lib.LatentStats(np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32),
                                source=workdir_lib.LatentStats.CONVERTED + os.path.abspath(input_path)).write(output_dir)
    # Written last: a folder with config.json is a complete conversion.
    with open(os.path.join(output_dir, workdir_lib.CONFIG), "w") as f:
        json.dump({"vae": {"family": "wan", "source": os.path.abspath(input_path)}}, f, indent=1)
    return model


def main(argv):
    del argv
    logs.setup()  # the libraries' INFO lines off unless --verbosity=1
    FLAGS = flags.FLAGS
    model = convert(FLAGS.input, FLAGS.output)
    n = sum(x.size for x in jax.tree.leaves(abstract_params(model)))
    print(f"wrote {FLAGS.output} (Wan VAE, {n / 1e6:.1f}M parameters, z_dim {model.z_dim}); "
          f"load it with pixeldance.load_vae({FLAGS.output!r})")


def run():
    flags.DEFINE_string("input", None, "diffusers AutoencoderKLWan folder or .safetensors file.", required=True)
    flags.DEFINE_string("output", None, "New (or empty) output folder.", required=True)
    cli.run(main)


if __name__ == "__main__":
    run()
