"""Mesh axes, logical-to-mesh rules and sharding helpers.

Model code names only *logical* axes; this module is the one place that maps them onto the
four mesh axes ``('data', 'fsdp', 'context', 'tensor')``. Also here: meshes over several TPU
slices or hosts (ICI x DCN, `make_mesh`), joining a multi-process run (`initialize_distributed`)
and the check that refuses an fsdp run whose parameters are mostly replicated (`check_fsdp`).

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

import os
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
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
    # As fsdp_context, with the parameters (and optimizer state) split over 'fsdp' x 'context',
    # i.e. over every chip: the memory of fsdp over the whole mesh with the activations of
    # context parallelism. Activations' 'embed' stays unsplit: flax gives each mesh axis to the
    # first rule that asks for it, and 'batch' and 'length' come first.
    "fsdp_context_params": dict(_BASE, embed=("fsdp", "context"), conv_out=("fsdp", "context"),
                                length="context"),
}


def rules(preset: str) -> tuple[tuple[str, object], ...]:
    """The logical axis rules of a preset, as flax's `logical_axis_rules` wants them."""
    if preset not in PRESETS:
        raise ValueError(f"unknown sharding preset {preset!r}; choose from {sorted(PRESETS)}")
    return tuple(PRESETS[preset].items())


def initialize_distributed(environ: Mapping[str, str] = os.environ) -> bool:
    """Joins a multi-process run when this process was launched as one of several; returns
    whether it did. Must run before anything touches a device (`train_lib.mesh_from_config`
    calls it first).

    Launch, one process per host (TPU VM) or per GPU host:
      JAX_COORDINATOR_ADDRESS=host0:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i   explicit, anywhere
      PIXELDANCE_DISTRIBUTED=1   JAX's cluster detection (Cloud TPU slices, SLURM, Open MPI, k8s)
    and automatically under `srun` / `mpirun` with more than one task. PIXELDANCE_DISTRIBUTED=0
    turns all of this off. On CPUs the processes talk over gloo (JAX's default there).
    """
    if jax.distributed.is_initialized():
        return True
    mode = environ.get("PIXELDANCE_DISTRIBUTED", "")
    if mode == "0":
        return False
    address = environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        count, index = environ.get("JAX_NUM_PROCESSES"), environ.get("JAX_PROCESS_ID")
        jax.distributed.initialize(address, num_processes=None if count is None else int(count),
                                   process_id=None if index is None else int(index))
        return True
    cluster = any(int(environ.get(k, "1") or "1") > 1 for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
    if mode == "1" or cluster:
        jax.distributed.initialize()
        return True
    return False


def make_mesh(shape: Sequence[int], devices=None, *, dcn_shape: Sequence[int] | None = None
              ) -> jax.sharding.Mesh:
    """A mesh over ('data','fsdp','context','tensor'); one entry of `shape` may be -1 (auto-fill).

    Multi-slice (ICI within a slice, DCN between slices): `shape` is the mesh of one slice and
    `dcn_shape` how the slices are laid out, so mesh axis i has `shape[i] * dcn_shape[i]` devices,
    the slice index outermost (its collectives cross DCN once per step, the inner ones stay on
    ICI). A slice is a TPU slice (`device.slice_index`, where devices span several); elsewhere a
    process (one host of GPUs); the forced host devices of one CPU process stand in for slices in
    id order (tests, planning). With `dcn_shape=None`, devices on several TPU slices get data
    parallelism across slices (`dcn_shape=(num_slices, 1, 1, 1)`), everything else one flat
    mesh. `dcn_shape` may hold one -1 (the number of slices).

    Axes are `AxisType.Auto` so that logical sharding constraints inside jit apply.
    """
    devices = jax.devices() if devices is None else list(devices)
    grid = device_grid(shape, devices, dcn_shape=dcn_shape)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def device_grid(shape: Sequence[int], devices: Sequence, *, dcn_shape: Sequence[int] | None = None
                ) -> np.ndarray:
    """The devices of `make_mesh` as an array [data, fsdp, context, tensor] (see there)."""
    groups, kind = _granules(devices)
    if dcn_shape is None:
        dcn_shape = (len(groups), 1, 1, 1) if kind == "slice" else (1, 1, 1, 1)
    if all(int(d) == 1 for d in dcn_shape):  # one flat mesh, laid out by JAX for the physical topology
        ici = _fill(shape, len(devices), "mesh shape")
        return jax.make_mesh(tuple(ici), MESH_AXES, devices=devices).devices
    if kind == "flat":  # one CPU process: its forced devices stand in for slices, in id order
        dcn = _fill(dcn_shape, None, "dcn_shape")
        n = int(np.prod(dcn))
        if len(devices) % n:
            raise ValueError(f"dcn_shape {tuple(dcn)} needs {n} slices; {len(devices)} devices do not split evenly")
        ordered = sorted(devices, key=lambda d: d.id)
        size = len(ordered) // n
        groups = [ordered[i * size:(i + 1) * size] for i in range(n)]
    else:
        dcn = _fill(dcn_shape, len(groups), "dcn_shape", unit=f"{kind}s")
    sizes = {len(g) for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"{kind}s of unequal sizes {sorted(sizes)}: no ICI x DCN mesh")
    ici = _fill(shape, sizes.pop(), f"mesh shape (per {kind})")
    if kind == "flat":
        blocks = [mesh_utils.create_device_mesh(ici, g, allow_split_physical_axes=True) for g in groups]
        return _tile(blocks, dcn)
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=kind == "process",
                                                allow_split_physical_axes=True)


def _granules(devices) -> tuple[list[list], str]:
    """Devices grouped by what DCN connects: TPU slices where there are several ('slice'), else
    processes ('process'), or 'flat' for the devices of one CPU process."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    key, kind = ("slice_index", "slice") if len(slices) > 1 and None not in slices else ("process_index", "process")
    groups: dict[int, list] = {}
    for d in devices:
        groups.setdefault(getattr(d, key), []).append(d)
    if len(groups) == 1 and kind == "process" and devices[0].platform == "cpu":
        kind = "flat"
    return [groups[k] for k in sorted(groups)], kind


def _fill(shape: Sequence[int], total: int | None, what: str, unit: str = "devices") -> list[int]:
    """`shape` with its one -1 replaced so that the product is `total` `unit` (None: no -1 allowed)."""
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"{what} {tuple(shape)} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"{what} {tuple(shape)}: at most one -1")
    if total is None and -1 in shape:
        raise ValueError(f"{what} {tuple(shape)}: -1 counts slices, and one CPU process has none; give sizes")
    if total is None:
        return shape
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if total % known:
            raise ValueError(f"{what} {tuple(shape)} does not divide {total} {unit}")
        shape[shape.index(-1)] = total // known
    if int(np.prod(shape)) != total:
        raise ValueError(f"{what} {tuple(shape)} needs {int(np.prod(shape))} {unit}, have {total}")
    return shape


def _tile(blocks: list[np.ndarray], dcn: Sequence[int]) -> np.ndarray:
    """Per-slice device arrays (each the ICI shape) tiled as `dcn`, the slice index outermost."""
    ici = blocks[0].shape
    out = np.empty([i * d for i, d in zip(ici, dcn)], dtype=object)
    for k, index in enumerate(np.ndindex(*dcn)):
        out[tuple(slice(j * i, (j + 1) * i) for j, i in zip(index, ici))] = blocks[k]
    return out


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


# An fsdp run whose parameters are mostly replicated over 'fsdp' pays for the axis (smaller
# per-device batches, all-gathers) without the memory saving it exists for: usually widths that
# the axis does not divide (`_divisible` replicates them) or a preset that names no parameter axis.
MAX_REPLICATED_FRACTION = 0.5


def replicated_bytes(abstract_params, shardings, axis: str = "fsdp") -> tuple[int, int, list]:
    """(bytes replicated over mesh `axis`, total bytes, [(path, shape, bytes)] replicated, largest first).

    abstract_params: pytree of arrays or ShapeDtypeStructs; shardings: matching NamedShardings.
    """
    leaves = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    total, replicated = 0, []
    for (path, x), s in zip(leaves, jax.tree.leaves(shardings)):
        size = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        total += size
        if axis not in _spec_axes(s.spec):
            replicated.append((jax.tree_util.keystr(path, simple=True, separator="/"), tuple(x.shape), size))
    replicated.sort(key=lambda r: -r[2])
    return sum(r[2] for r in replicated), total, replicated


def check_fsdp(abstract_params, shardings, mesh, preset: str, *,
               max_replicated: float = MAX_REPLICATED_FRACTION):
    """Refuses (ValueError, one line) an fsdp run with more than `max_replicated` of the parameter
    bytes replicated over a 'fsdp' axis of more than one device. Other presets and meshes pass."""
    uses_fsdp = any(a == "fsdp" or (isinstance(a, tuple) and "fsdp" in a)
                    for name, a in PRESETS[preset].items() if name != "batch")
    n = mesh.shape["fsdp"]
    if not uses_fsdp or n == 1:
        return
    rep, total, leaves = replicated_bytes(abstract_params, shardings)
    if total and rep / total > max_replicated:
        worst = ", ".join(f"{path} {list(shape)} {size / 2**20:.2f} MiB" for path, shape, size in leaves[:3])
        raise ValueError(
            f"preset {preset!r} replicates {rep / total:.0%} of the parameter bytes ({rep / 2**20:.1f} of "
            f"{total / 2**20:.1f} MiB, limit {max_replicated:.0%}) over the {n}-way 'fsdp' axis; largest: "
            f"{worst}. Make widths divisible by {n}, shrink the 'fsdp' axis, or use preset 'data'")


def _spec_axes(spec) -> set[str]:
    return {a for entry in spec if entry is not None for a in (entry if isinstance(entry, tuple) else (entry,))}


def batch_sharding(mesh) -> NamedSharding:
    """Batch split over ('data','fsdp'), everything else replicated."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def constrain(x, logical_axes: Sequence[str | None]):
    """`with_sharding_constraint` by logical names (a no-op outside a rules context)."""
    return nn.with_logical_constraint(x, tuple(logical_axes))
