"""LoRA: low-rank adapters on chosen kernels of a Flax parameter pytree, as pure functions.

  lora = init(rng, boxed_params, rank=16, targets=("attn1/to_.*", "ffn/proj_in"))  # boxed
  merged = merge(params, lora, alpha=16.0)     # the base's structure and dtypes: sample, export
  lora_loss = make_loss(loss_fn, alpha=16.0)   # loss_fn(params, batch, rng) -> (lora, base, batch, rng)
  side = attach(params, lora, alpha=16.0)      # what make_loss trains through (below)

For each targeted kernel W [*lead, *in, *out] the adapter is a pair
  lora_a  float32 [*lead, *in, R]   uniform, variance 1 / prod(in) (a fan-in Dense init)
  lora_b  float32 [*lead, R, *out]  zeros, so the merged model is the base exactly at init
and the merged kernel is W + (alpha / R) * (A @ B) with the `in` axes and the `out` axes each
flattened for the product and the result reshaped to W's shape. R is the rank (axis letters:
pixeldance/models/__init__.py, R added here for it); `lead` are the stacked axes of scanned
blocks: every layer gets its own pair of factors.

Which axes are `lead`, `in` and `out` is read from the kernel's logical axis names (the
`nn.Partitioned` boxes every parameter is created in; `split_kernel_axes`):
  lead  the leading 'layers' axes (nn.scan's stacked axis, see sharding.py)
  in    the first group of the remaining axes, a group being
          'heads' followed by 'kv'  (one attention head and its width: the input of an output
                                     projection, e.g. to_out [heads, kv, embed])
          a run of unnamed axes     (a patch or channel shape, e.g. patch_embedding
                                     [None, None, None, None, embed])
          any other single axis     ('embed', 'mlp', ...)
  out   the rest, at least one axis.
This is the `in_dims` of every `layers.Dense` in dit.py and wan_dit.py (tests/test_lora.py
checks each one); a kernel the rule cannot split is a ValueError naming it.

The adapters are boxed with logical names derived from the kernel's: A keeps the names of the
lead and input axes, B those of the lead and output axes, and the rank axis is unnamed
(replicated: R is small), so `sharding.tree_shardings` places them by the base's rules:
  make = lambda rng: init(rng, boxed_params, rank=16, targets=...)
  shardings = sharding.tree_shardings(mesh, jax.eval_shape(make, rng), preset)
  lora = jax.jit(lambda rng: nn.unbox(make(rng)), out_shardings=shardings)(rng)

Targets are regular expressions searched (`re.search`) in the '/'-joined path of every leaf
named 'kernel' (e.g. 'blocks/attn1/to_q/kernel'): 'attn1/to_q', 'attn2/to_.*', 'ffn/proj_in',
'^proj_out' (anchored: the output projection, not the FFN's). A string holds several, separated
by commas. A target that matches no kernel is a ValueError naming it.

Training never merges. `make_loss` runs the model on `attach`'s tree: each targeted kernel's
module gets its factors beside the kernel (`lora_a` A, `lora_b` (alpha / R) B), and
`layers.Dense` adds the side path (x A)(alpha / R B) to x W, in the compute dtype. So a step
costs 2 R (in + out) extra FLOPs per token and kernel, and no whole-size tensor per kernel: no
merged copy, and no dense gradient of the kernel (the backward pass goes to A and B through
the R-wide product, inside nn.scan's layer loop). Measured by the TPU compiler for the 14B Wan
DiT on a v5e-16 (benchmarks/README.md): merging every step needed 31 GiB of temporaries per
chip. Every kernel a target can match must belong to a `layers.Dense` (tests/test_lora.py
checks, with every kernel of both DiTs targeted, that the side path equals the merged model).
The base is never differentiated; a bfloat16 base (config.train.lora_base_dtype) is read as it
is. The optimizer holds state only for the adapters. Sampling and export merge once
(`merge`): into bfloat16 kernels that rounds the update once to bfloat16.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

LORA_A, LORA_B = "lora_a", "lora_b"
KERNEL = "kernel"
LAYERS = "layers"


def split_kernel_axes(names: Sequence[str | None], where: str = "kernel") -> tuple[int, int, int]:
    """(lead, in, out): how many of a kernel's axes, in that order, are stacked layers, inputs and
    outputs, from their logical `names` (the rule in the module docstring). ValueError (one line
    naming `where`) if no output axis is left."""
    names = tuple(names)
    lead = 0
    while lead < len(names) and names[lead] == LAYERS:
        lead += 1
    rest = names[lead:]
    if len(rest) >= 2 and rest[:2] == ("heads", "kv"):
        n_in = 2
    elif rest and rest[0] is None:
        n_in = next((i for i, n in enumerate(rest) if n is not None), len(rest))
    else:
        n_in = min(1, len(rest))
    if n_in == 0 or n_in == len(rest):
        raise ValueError(f"cannot tell the input from the output axes of {where} from its logical names {names}; "
                         f"LoRA needs names like ('embed', 'mlp') or ('heads', 'kv', 'embed')")
    return lead, n_in, len(rest) - n_in


def _targets(targets: str | Sequence[str]) -> list[str]:
    targets = targets.split(",") if isinstance(targets, str) else list(targets)
    targets = [t.strip() for t in targets if t.strip()]
    if not targets:
        raise ValueError("LoRA needs at least one target (a regex over kernel paths like 'attn1/to_q')")
    for t in targets:
        try:
            re.compile(t)
        except re.error as e:
            raise ValueError(f"LoRA target {t!r} is not a regular expression: {e}") from None
    return targets


def _path(keys) -> str:
    return "/".join(str(k) for k in keys)


def matched_kernels(params, targets: str | Sequence[str]) -> dict[tuple, nn.Partitioned]:
    """{path tuple: boxed kernel} of the kernels of `params` that `targets` match (sorted by path).

    params: the model's boxed parameters (`nn.Partitioned` leaves, arrays or ShapeDtypeStructs),
    e.g. `jax.eval_shape(model.init, ...)['params']`. ValueError (one line) for a target that
    matches no kernel, or a matched kernel without logical names.
    """
    targets = _targets(targets)
    flat = traverse_util.flatten_dict(params)  # a box is not a dict: it stays one leaf
    kernels = {k: v for k, v in flat.items() if k[-1] == KERNEL}
    out = {}
    for t in targets:
        hits = [k for k in kernels if re.search(t, _path(k))]
        if not hits:
            examples = ", ".join(sorted(_path(k[:-1]) for k in kernels)[:8])
            raise ValueError(f"LoRA target {t!r} matches no kernel; kernels are e.g. {examples}")
        out.update((k, kernels[k]) for k in hits)
    for k, v in out.items():
        if not isinstance(v, nn.Partitioned):
            raise ValueError(f"kernel {_path(k)} has no logical axis names (pass the boxed params, before "
                             f"nn.unbox): LoRA reads its input and output axes from them")
    return dict(sorted(out.items()))


def init(rng, params, *, rank: int, targets: str | Sequence[str]) -> dict:
    """Adapters for the kernels of `params` that `targets` match, boxed in `nn.Partitioned`.

    rng: a PRNG key. params: the boxed base parameters; only their shapes and logical names are
    read, so abstract ones (`jax.eval_shape` of the model's init) do. rank: R >= 1.
    Returns {kernel path...: {'lora_a': [*lead, *in, R], 'lora_b': [*lead, R, *out]}} float32,
    nested like `params` (e.g. lora['blocks']['attn1']['to_q']['kernel']['lora_a']); B is zero.
    Jittable with `params` closed over (nothing of them but shapes enters the program).
    """
    if int(rank) != rank or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    out = {}
    for i, (path, box) in enumerate(matched_kernels(params, targets).items()):
        names, shape = tuple(box.names), tuple(box.value.shape)
        lead, n_in, _ = split_kernel_axes(names, _path(path))
        split = lead + n_in
        fan_in = math.prod(shape[lead:split])
        bound = math.sqrt(3.0 / fan_in)  # uniform(-b, b) has variance b^2 / 3 = 1 / fan_in
        a = jax.random.uniform(jax.random.fold_in(rng, i), shape[:split] + (rank,), jnp.float32, -bound, bound)
        b = jnp.zeros(shape[:lead] + (rank,) + shape[split:], jnp.float32)
        # `replace` keeps the box's kind and metadata (nn.LogicallyPartitioned: names are logical).
        out[path] = {LORA_A: box.replace(value=a, names=names[:split] + (None,)),
                     LORA_B: box.replace(value=b, names=names[:lead] + (None,) + names[split:])}
    return traverse_util.unflatten_dict(out)


def _adapters(lora) -> dict[tuple, dict]:
    """{kernel path: {'lora_a': A, 'lora_b': B}} of unboxed LoRA params."""
    flat = traverse_util.flatten_dict(nn.unbox(lora))
    out: dict[tuple, dict] = {}
    for k, v in flat.items():
        if k[-1] not in (LORA_A, LORA_B):
            raise ValueError(f"LoRA params hold {_path(k)}; want only {LORA_A!r} and {LORA_B!r} leaves")
        out.setdefault(k[:-1], {})[k[-1]] = v
    for k, ab in out.items():
        if len(ab) != 2:
            raise ValueError(f"LoRA adapter {_path(k)} lacks {LORA_A if LORA_A not in ab else LORA_B!r}")
    return out


def _delta_shapes(a, b, shape) -> tuple[int, int]:
    """(lead, n_in) of factors a [*lead, *in, R], b [*lead, R, *out] of a kernel of `shape`;
    ValueError if they do not make one."""
    shape = tuple(shape)
    lead = a.ndim + b.ndim - 2 - len(shape)
    n_in = a.ndim - 1 - lead
    if lead < 0 or b.shape[lead] != a.shape[-1] or a.shape[:lead] + a.shape[lead:-1] + b.shape[lead + 1:] != shape:
        raise ValueError(f"LoRA factors {a.shape} @ {b.shape} do not make a kernel of shape {shape}")
    return lead, n_in


def _delta(a, b, shape, *, alpha: float):
    """(alpha / R) A @ B as a kernel of `shape` [*lead, *in, *out], float32.

    a: [*lead, *in, R]; b: [*lead, R, *out]. The number of lead axes follows from the ranks:
    a.ndim - 1 + b.ndim - 1 = len(shape) + lead.
    """
    shape = tuple(shape)
    rank = a.shape[-1]
    lead, n_in = _delta_shapes(a, b, shape)
    lead_shape = shape[:lead]
    a2 = a.astype(jnp.float32).reshape(*lead_shape, math.prod(shape[lead:lead + n_in]), rank)
    b2 = b.astype(jnp.float32).reshape(*lead_shape, rank, math.prod(shape[lead + n_in:]))
    # HIGHEST: a float32 base gets a float32 update (TPUs otherwise multiply in bfloat16 passes);
    # the product is R-thin, so the cost is that of reading the factors.
    d = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)   # [*lead, in, out]
    return (alpha / rank) * d.reshape(shape)


def merge(params, lora, *, alpha: float):
    """The base `params` with each adapter's update added to its kernel: W + (alpha / R) A @ B.

    params: the base parameters (plain arrays; boxed ones are unboxed). lora: `init`'s output
    or trained adapters (boxed or not). Returns a tree of params' structure, each kernel in its
    own dtype (the sum is formed in float32 and rounded once); leaves without an adapter are
    the input arrays themselves. What sampling and export use; jittable, shardings follow the
    inputs'. ValueError if an adapter has no kernel in `params` or does not fit it.
    """
    params = nn.unbox(params)
    adapters = _adapters(lora)
    keys = lambda path: tuple(getattr(p, "key", getattr(p, "name", p)) for p in path)
    paths = {keys(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = [_path(k) for k in adapters if k not in paths]
    if missing:
        raise ValueError(f"LoRA adapters for {', '.join(missing)} have no kernel in the base params")

    def add(path, w):
        ab = adapters.get(keys(path))
        if ab is None:
            return w
        return (w.astype(jnp.float32) + _delta(ab[LORA_A], ab[LORA_B], w.shape, alpha=alpha)).astype(w.dtype)
    return jax.tree_util.tree_map_with_path(add, params)


def attach(params, lora, *, alpha: float):
    """The base `params` with each adapter beside its kernel, as `layers.Dense` reads it: for a
    kernel at .../module/kernel, .../module/lora_a = A [*lead, *in, R] and .../module/lora_b =
    (alpha / R) B [*lead, R, *out] (the scale folded into B here, so the module needs no alpha).
    params: plain arrays (boxed ones are unboxed); lora: `init`'s output or trained adapters.
    Differentiable in both; jittable. ValueError if an adapter has no kernel in `params` or its
    module already holds a parameter of those names."""
    flat = traverse_util.flatten_dict(nn.unbox(params))
    out = dict(flat)
    for path, ab in _adapters(lora).items():
        if path not in flat:
            raise ValueError(f"LoRA adapters for {_path(path)} have no kernel in the base params")
        a, b = ab[LORA_A], ab[LORA_B]
        _delta_shapes(a, b, flat[path].shape)
        module = path[:-1]
        if module + (LORA_A,) in flat or module + (LORA_B,) in flat:
            raise ValueError(f"{_path(module)} already holds a {LORA_A!r} or {LORA_B!r} parameter")
        out[module + (LORA_A,)] = a
        out[module + (LORA_B,)] = (alpha / a.shape[-1]) * b
    return traverse_util.unflatten_dict(out)


def num_params(lora) -> int:
    """Number of trainable LoRA parameters (both factors of every adapter)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(lora)))


def make_loss(loss_fn: Callable, *, alpha: float) -> Callable:
    """loss_fn(params, batch, rng) -> lora_loss(lora, base, batch, rng) = loss_fn(attach(base,
    lora)): the model of the merged weights, computed by the side path (module docstring).

    The base is an argument, not a closure constant (jit would embed its weights in the program),
    and is frozen: its gradient is stopped, so `jax.grad(lora_loss)` (argument 0) gives the
    adapters' gradient and even a gradient taken over the base is zero. Whatever loss_fn returns
    (a scalar, or (loss, aux) for `has_aux`) is returned unchanged. loss_fn must apply a model
    whose targeted kernels belong to `layers.Dense` modules.
    """
    def lora_loss(lora, base, batch, rng):
        return loss_fn(attach(jax.lax.stop_gradient(base), lora, alpha=alpha), batch, rng)
    return lora_loss
