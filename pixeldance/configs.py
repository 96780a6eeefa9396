"""Config helpers: structural arguments of experiment files, loading, and validation.

An experiment is a Python file with `get_config(arg: str | None) -> ConfigDict`. The `arg` is
the part after the colon in `--config=experiments/x.py:variant=B/2,runlocal`; `parse_arg`
turns it into a ConfigDict of typed values with defaults.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses `"k1=v1,flag,k2=v2"` against `defaults` (which also fix each value's type).

    A bare name is a boolean flag set to True. Unknown names are errors that name the key.
    """
    out = ml_collections.ConfigDict(dict(defaults))
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key!r} must be true/false, got {value!r}")
            out[key] = value.lower() in ("true", "1")
        elif isinstance(default, int):
            out[key] = int(value)
        elif isinstance(default, float):
            out[key] = float(value)
        else:
            out[key] = value
    return out


def import_sibling(file: str, name: str):
    """Imports experiment `name`.py from the folder of `file` (experiment files build on each other)."""
    path = os.path.join(os.path.dirname(os.path.abspath(file)), name + ".py")
    spec = importlib.util.spec_from_file_location("_pixeldance_experiment_" + name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(path_and_arg: str) -> ml_collections.ConfigDict:
    """Loads `experiments/x.py[:arg]` outside absl (tests, notebooks). The result is locked."""
    path, _, arg = path_and_arg.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(
        "_pixeldance_config_" + os.path.basename(path)[:-3].replace("-", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    config.lock()
    return config


def override(config: ml_collections.ConfigDict, **flat) -> ml_collections.ConfigDict:
    """Returns a copy of `config` with dotted-key overrides, e.g. `override(c, **{'dit.lr': 1e-4})`.

    A misspelt key raises an error naming it, exactly like `--config.a.b=value`.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    config.lock()
    for key, value in flat.items():
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node:
                raise KeyError(f"config has no field {key!r} (at {part!r})")
            node = node[part]
        if parts[-1] not in node:
            raise KeyError(f"config has no field {key!r}")
        node[parts[-1]] = value
    return config
