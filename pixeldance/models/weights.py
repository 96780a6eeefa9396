"""Converted weights of the feature and encoder networks on disk: one folder per network.

  DIR/config.json         {"network": "i3d" | "inception" | "c3d" | "clip", ...architecture fields,
                           "source": where the weights came from, "sha256": of params.safetensors}
  DIR/params.safetensors  the Flax variables, flattened with '/' (``params/Conv_0/kernel``,
                          ``batch_stats/...``), float32

The converters (``pixeldance/convert/``) write these folders with :func:`save`; the networks'
loaders read them with :func:`load`. Only safetensors are read (never pickle). The sha256 is the
network's fingerprint: real-set feature statistics record it, so statistics computed with other
weights are never mixed with these (``pixeldance/metrics``).

Every failure is a :class:`WeightsError` whose message is one line naming the path.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from pixeldance import checksums

CONFIG = "config.json"
PARAMS = "params.safetensors"


class WeightsError(ValueError):
    """A missing, malformed or mismatched weights folder; the message is one line."""


def sha256(path: str) -> str:
    """SHA-256 hex of a file (`checksums.file_digest`, shared with checkpoints and caches)."""
    return checksums.file_digest(path)[1]


_VERIFIED: set = set()  # (path, size, mtime_ns) of files that matched: each is hashed once per process


def check_sha256(params_path: str, config: dict):
    """WeightsError unless `params_path` hashes to config['sha256'] (written by the converter).
    Every loader runs it by default (one read of the file, ~1 s/GB: benchmarks/README.md), so a
    damaged or replaced weights file is never used; a folder without a recorded hash (written by
    hand) is refused only if it claims one."""
    expected = config.get("sha256")
    if expected is None:
        return
    st = os.stat(params_path)
    key = (os.path.abspath(params_path), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return
    if sha256(params_path) != expected:
        raise WeightsError(f"{params_path}: sha256 differs from {CONFIG}'s (a damaged or replaced file; "
                           f"convert the weights again)")
    _VERIFIED.add(key)


def save(directory: str, config: dict, variables: dict) -> dict:
    """Writes ``variables`` (a nested dict of arrays) and ``config`` to DIRECTORY; returns the config.

    Both files are written to temporary names and renamed, the config last, so a folder with a
    config.json is complete.
    """
    from safetensors.numpy import save_file  # only converters write

    os.makedirs(directory, exist_ok=True)
    # reshape: ascontiguousarray makes 0-d arrays 1-d, and scalars must round-trip
    flat = {"/".join(k): np.ascontiguousarray(np.asarray(v, np.float32)).reshape(np.shape(v))
            for k, v in traverse_util.flatten_dict(jax.device_get(variables)).items()}
    params = os.path.join(directory, PARAMS)
    save_file(flat, params + ".tmp")
    os.replace(params + ".tmp", params)
    config = dict(config, sha256=sha256(params))
    path = os.path.join(directory, CONFIG)
    with open(path + ".tmp", "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    return config


def read_config(directory: str, network: str, origin: str) -> dict:
    """DIRECTORY's config.json, checked to be a ``network`` folder. ``origin`` says, in the error,
    where such weights come from (which converter to run on what)."""
    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise WeightsError(f"{directory}: no {CONFIG} of converted {network} weights ({origin})")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable JSON file ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict) or config.get("network") != network:
        found = config.get("network") if isinstance(config, dict) else None
        raise WeightsError(f"{path}: holds {found!r} weights, not {network!r} ({origin})")
    return config


def load(directory: str, network: str, origin: str, *, verify: bool = True) -> tuple[dict, dict]:
    """(config, variables) of a folder written by :func:`save`; variables as nested numpy float32.

    ``verify`` re-hashes params.safetensors against the config's sha256 first (`check_sha256`).
    """
    from safetensors import safe_open

    config = read_config(directory, network, origin)
    params = os.path.join(directory, PARAMS)
    if not os.path.isfile(params):
        raise WeightsError(f"{directory}: no {PARAMS} ({origin})")
    if verify:
        check_sha256(params, config)
    try:
        with safe_open(params, framework="numpy") as f:
            flat = {tuple(k.split("/")): f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise WeightsError(f"cannot read {params} as safetensors: {str(e).splitlines()[0]}") from None
    return config, traverse_util.unflatten_dict(flat)


def check_like(expected: Any, variables: dict, where: str) -> dict:
    """Checks that ``variables`` has exactly the leaves and shapes of ``expected`` (e.g.
    ``jax.eval_shape(model.init, ...)``); returns ``variables``. One-line error on the first
    missing, unexpected or mis-shaped array."""
    want = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(expected).items()}
    got = {"/".join(k): tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(variables).items()}
    for name in sorted(want):
        if name not in got:
            raise WeightsError(f"{where}: missing array {name} {want[name]}")
        if got[name] != want[name]:
            raise WeightsError(f"{where}: {name} has shape {got[name]}, the network needs {want[name]}")
    extra = sorted(set(got) - set(want))
    if extra:
        raise WeightsError(f"{where}: unexpected array {extra[0]} {got[extra[0]]} "
                           f"({len(extra)} unexpected in all)")
    return variables
