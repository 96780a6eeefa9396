"""Mesh axes, logical-to-mesh rules and sharding helpers.

Model code names only *logical* axes; this module is the one place that maps them onto the
four mesh axes ``('data', 'fsdp', 'context', 'tensor')``.

Logical axis glossary (used by every model file):
  batch     examples in a batch                      -> ('data', 'fsdp')
  length    video tokens of the DiT                  -> 'context'
  text      text tokens                              -> None
  embed     model width (parameters: fsdp-sharded)   -> 'fsdp'
  mlp       MLP hidden width                         -> 'tensor'
  heads     attention heads                          -> 'tensor'
  kv        per-head width                           -> None
  vocab     vocabulary                               -> None
  conv_in   conv kernel input channels               -> None
  conv_out  conv kernel output channels              -> 'fsdp'
  time / height / width / channels  VAE activations  -> None
  norm      scales and biases of norms               -> None
  layers    the stacked-layer axis of scanned blocks -> None
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")

# One table of rules per preset. Every logical name appears in every preset, so a missing
# name is a bug caught by `check_rules`, not a silent replication.
_BASE = {
    "batch": ("data", "fsdp"),
    "length": None,
    "text": None,
    "embed": None,
    "mlp": None,
    "heads": None,
    "kv": None,
    "vocab": None,
    "conv_in": None,
    "conv_out": None,
    "time": None,
    "height": None,
    "width": None,
    "channels": None,
    "norm": None,
    "layers": None,
}

PRESETS = {
    # Pure data parallelism: parameters replicated, batch split over every axis that has devices.
    "data": dict(_BASE, batch=("data", "fsdp")),
    # ZeRO-3 style: parameters and optimizer state split over 'fsdp' along their width.
    "fsdp": dict(_BASE, embed="fsdp", conv_out="fsdp"),
    # FSDP plus Megatron-style tensor parallelism of MLP and attention heads.
    "fsdp_tensor": dict(_BASE, embed="fsdp", conv_out="fsdp", mlp="tensor", heads="tensor"),
    # FSDP plus the video-token sequence split over 'context'.
    "fsdp_context": dict(_BASE, embed="fsdp", conv_out="fsdp", length="context"),
}


def rules(preset: str) -> tuple[tuple[str, object], ...]:
    """The logical axis rules of a preset, as flax's `logical_axis_rules` wants them."""
    if preset not in PRESETS:
        raise ValueError(f"unknown sharding preset {preset!r}; choose from {sorted(PRESETS)}")
    return tuple(PRESETS[preset].items())


def make_mesh(shape: Sequence[int], devices=None) -> jax.sharding.Mesh:
    """A mesh over ('data','fsdp','context','tensor'); one entry of `shape` may be -1 (auto-fill).

    Axes are `AxisType.Auto` so that logical sharding constraints inside jit apply.
    """
    devices = jax.devices() if devices is None else devices
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices, have {len(devices)}")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_sharding(mesh, logical_axes: Sequence[str | None], preset: str) -> NamedSharding:
    """NamedSharding for an array whose dimensions carry `logical_axes`."""
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules(preset))
    return NamedSharding(mesh, spec)


def tree_shardings(mesh, abstract_tree, preset: str):
    """Shardings for a pytree of (possibly `nn.Partitioned`-boxed) abstract arrays.

    A dimension that its mesh axes do not divide (e.g. a 12-channel output conv over 8 fsdp
    devices) is replicated instead of failing: small odd-sized leaves cost little memory.
    """
    specs = nn.get_partition_spec(abstract_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules(preset))
    values = jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, abstract_tree,
                          is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return jax.tree.map(lambda s, x: _divisible(s, x.shape), shardings, values)


def _divisible(named: NamedSharding, shape) -> NamedSharding:
    spec = list(named.spec) + [None] * (len(shape) - len(named.spec))
    for i, axes in enumerate(spec):
        if axes is None:
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        if shape[i] % int(np.prod([named.mesh.shape[a] for a in names])):
            spec[i] = None
    return NamedSharding(named.mesh, P(*spec))


def batch_sharding(mesh) -> NamedSharding:
    """Batch split over ('data','fsdp'), everything else replicated."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def constrain(x, logical_axes: Sequence[str | None]):
    """`with_sharding_constraint` by logical names (a no-op outside a rules context)."""
    return nn.with_logical_constraint(x, tuple(logical_axes))
