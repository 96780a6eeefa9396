r"""Compile-ahead planning: compile the DiT train step and sampler, or a frozen text encoder's
forward, for a target mesh, without it.

  python -m pixeldance.tools.plan --config=experiments/shapes.py:dit=1.5B --config.plan.num_devices=64
  python -m pixeldance.tools.plan --config=experiments/shapes.py:dit=1.5B --config.plan.topology=v5p:4x4x4
  python -m pixeldance.main --config=... --config.mode=plan --workdir=DIR     (also writes DIR/plan.json)
  JAX_PLATFORMS=cpu python -m pixeldance.tools.plan --config=experiments/wan_pixeldance.py:lora,rank=64 \
      --config.dit.wan_config=wan2.1-t2v-14b --config.plan.text_arch=umt5-xxl \
      --config.plan.height=480 --config.plan.width=832 --config.data.num_frames=81 \
      --config.plan.topology=v5p:2x2x1 --config.plan.sample=False
  JAX_PLATFORMS=cpu python -m pixeldance.tools.plan --config=experiments/wan_pixeldance.py \
      --config.plan.part=text_encoder --config.plan.text_arch=umt5-xxl --config.plan.topology=v5e:4x4

The target (`config.plan`):
  num_devices  that many forced host (CPU) devices. XLA fixes the number when its CPU backend
               starts, so planning must be the first thing in its process to touch a device
               (both command lines are); the numbers are XLA:CPU's.
  topology     a TPU topology such as 'v5p:2x2x1' or 'v5e:4x4' (x `num_slices`), compiled by the TPU
               compiler through `jax.experimental.topologies` on any machine with libtpu
               (`pip install -e '.[tpu-plan]'`); the numbers are the TPU compiler's.
  neither      this machine's own devices.
The mesh and preset come from `config.mesh` (its -1 filled from the target's device count), the
model from `config.dit` / `config.text`, the latent shape from `config.data` (frames; height and
width `config.plan.height` / `width`, default `config.data.resolution`) and the VAE's
compression (a Wan VAE's without its folder: Wan 2.1's 4x8x8, 16 channels), the batch from
`config.train` / `config.sample`.

Pretrained models are planned without their weights (only architectures are read):
  the Wan DiT  `config.dit.init_from`, a converted folder (its config.json only), or with
               init_from empty `config.dit.wan_config`, a name ('wan2.1-t2v-1.3b', 'wan2.1-t2v-14b');
  LoRA         `config.train.lora_rank` > 0 compiles the trainer's LoRA step: adapters
               (`build.lora_init_fn`) in the train state with their AdamW state and EMA, the loss
               `build.lora_loss`, and the base as a fourth, non-donated argument sharded as the
               trainer shards it (`workdir.abstract_params`, as `sample.pretrained_dit`); the base
               is reported per device as `frozen`, apart from the trained bytes;
  text states  S and D from `config.text.encoder_path` (a converted folder's config.json) or
               `config.plan.text_arch`, a name: a `models/t5.py` variant ('umt5-xxl',
               't5-v1_1-xxl', 'umt5-mu', 't5-mu') or 'clip-' + a `models/clip.py` variant; S is
               `config.text.encoder_max_length` or the kind's default (512 T5, 77 CLIP).
`config.plan.part = 'text_encoder'` plans the frozen encoder instead: `TextEncoder.embed`'s
forward (`models/text_encoder.py`, the function the cache stage runs) on a batch of
`config.cache.batch_size` prompts of S tokens, computing in `config.text.encoder_dtype` with
parameters held in it too (CLIP: float32), sharded by their logical names over the mesh under
`config.mesh.preset`. The cache stage and the Pipeline place the encoder on the devices of one
host (`sample.inference_mesh`, every chip on 'fsdp', rules 'fsdp_tensor'): plan that with the
host's chips, e.g. topology 'v5e:2x2' and mesh (1, 4, 1, 1).

Nothing is materialised: parameters, optimizer state and batches are `jax.eval_shape` results and
ShapeDtypeStructs with shardings, so a 1.5B model is planned in the memory of its shapes.
Printed per device: parameter / optimizer / EMA bytes (from the shardings), XLA's argument,
output and temporary bytes (`compiled.memory_analysis()`), the peak (arguments + temporaries +
outputs that do not reuse a donated argument) against the memory size, and model FLOPs per step
from `models.dit.dit_flops_per_sample` (3x the forward for a train step, 2x under LoRA: no
gradients of the frozen weights): XLA's own count (`cost_analysis`) sees the scanned layer loop
once, so it is printed only for reference.

Axis letters (glossary: pixeldance/models/__init__.py): B batch, T latent frames, h/w latent
height/width, C latent channels, S text tokens, J candidate last frames, L video tokens.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from flax import linen as nn
from jax._src import xla_bridge  # backends_are_initialized: the one check JAX offers for this
from jax.experimental import topologies
from ml_collections import config_flags

from pixeldance import build, cli, sharding, train_lib
from pixeldance import sample as sample_lib
from pixeldance import workdir as workdir_lib
from pixeldance.diffusion import guidance as guidance_lib
from pixeldance.models import clip as clip_lib
from pixeldance.models import dit as dit_lib
from pixeldance.models import t5 as t5_lib
from pixeldance.models import text_encoder as text_encoder_lib
from pixeldance.models import wan_vae, weights
from pixeldance.trainers import dit as dit_trainer

# Memory per chip (HBM) by `device_kind`, for `plan.memory_gib=0` on TPU targets.
TPU_MEMORY_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32,
                  "TPU7x": 192}
GIB = 2 ** 30


def use_forced_host_devices(num_devices: int):
    """Makes this process's JAX backend `num_devices` CPU devices. Call before anything touches
    a device; an error (not a silent wrong plan) if the backend already runs with another count."""
    if xla_bridge.backends_are_initialized():
        have = jax.devices()
        if have[0].platform == "cpu" and len(have) == num_devices:
            return
        raise RuntimeError(
            f"plan.num_devices={num_devices} needs a fresh process: this one already runs JAX on "
            f"{len(have)} {have[0].platform} device(s), and XLA fixes the count when it starts. "
            f"Run `python -m pixeldance.tools.plan --config=... --config.plan.num_devices={num_devices}`")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", num_devices)


def target_devices(plan_config) -> tuple[list, str]:
    """(devices to compile for, a description). See the module docstring for the three targets."""
    if plan_config.topology:
        try:
            import libtpu  # noqa: F401  (the TPU compiler; only its presence is checked here)
        except ImportError:
            raise RuntimeError(f"plan.topology={plan_config.topology!r} needs libtpu, the TPU compiler: "
                               "pip install -e '.[tpu-plan]' (or use plan.num_devices)") from None
        if not xla_bridge.backends_are_initialized():
            jax.config.update("jax_platforms", "cpu")  # the TPU is a compile target only, not a backend
        # libtpu takes a machine-wide lock meant for processes that drive TPU chips; compiling
        # drives none, so do not fail (or block others) on it.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        kwargs = {"num_slices": plan_config.num_slices} if plan_config.num_slices > 1 else {}
        topo = topologies.get_topology_desc(plan_config.topology, "tpu", **kwargs)
        slices = f" x {plan_config.num_slices} slices" if plan_config.num_slices > 1 else ""
        return list(topo.devices), f"{len(topo.devices)} x {topo.devices[0].device_kind} ({plan_config.topology}{slices})"
    if plan_config.num_devices:
        use_forced_host_devices(plan_config.num_devices)
    devices = jax.devices()
    return devices, f"{len(devices)} x {devices[0].device_kind}" + (" (forced host devices)" if plan_config.num_devices else "")


def memory_limit(plan_config, device) -> float | None:
    """Bytes per device to fit in: plan.memory_gib, else the device's own where known."""
    if plan_config.memory_gib:
        return plan_config.memory_gib * GIB
    if device.platform == "tpu":
        return TPU_MEMORY_GIB.get(device.device_kind, 0) * GIB or None
    try:
        return float(device.memory_stats()["bytes_limit"])  # GPUs
    except Exception:  # CPUs and compile-only devices report nothing
        return None


def shard_bytes(tree, shardings) -> int:
    """Bytes per device of a pytree of abstract arrays under `shardings` (the largest shard)."""
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    return total


def model_flops(config, latent, batch: int, text_len: int | None = None) -> float:
    """Analytic forward FLOPs of the DiT for `batch` samples of latents (T, h, w, C) and
    `text_len` text tokens (default config.text.max_length); a Wan DiT's from its architecture
    (width N K, FFN width E; its text embedder, per sample, is left out like the adaLN)."""
    pt, ph, pw = build.dit_patch(config)
    T, h, w, C = latent
    if config.dit.get("family", "pixeldance") == "wan":
        f = build.wan_fields(config)
        width = f["num_heads"] * f["head_dim"]
        kw = dict(width=width, depth=f["num_layers"], mlp_ratio=f["ffn_dim"] / width)
        attention, c_in = "full", 2 * C + 1 if config.dit.get("widen", True) else C
    else:
        kw = build.dit_size(config)
        attention, c_in = config.dit.attention, 2 * C + 1
    per_sample = dit_lib.dit_flops_per_sample(
        num_tokens=(T // pt) * (h // ph) * (w // pw), text_len=text_len or config.text.max_length, width=kw["width"],
        depth=kw["depth"], mlp_ratio=kw["mlp_ratio"], patch_dim_in=pt * ph * pw * c_in,
        patch_dim_out=pt * ph * pw * C, attention=attention, num_frames=T // pt)
    return batch * per_sample


def latent_shape(config) -> tuple[int, int, int, int]:
    """(T, h, w, C) of config.data.num_frames frames of plan.height x plan.width pixels (0:
    config.data.resolution) under config.vae; a Wan VAE without its folder is Wan 2.1's."""
    R = config.data.resolution
    H, W = config.plan.get("height", 0) or R, config.plan.get("width", 0) or R
    vae = wan_vae.WanVAE() if config.vae.get("family", "causal") == "wan" else build.vae(config)
    return build.latent_shape(vae, config.data.num_frames, H, W)


def text_arch(config) -> tuple[str, dict, int]:
    """(kind, network fields, S) of the frozen text encoder: config.plan.text_arch by name, else
    config.text.encoder_path's config.json (never its weights). S: config.text.encoder_max_length,
    else the folder's, else the kind's default."""
    name = config.plan.get("text_arch", "")
    length = config.text.get("encoder_max_length", 0)
    if name:
        if name.startswith("clip-") and name[5:] in clip_lib.VARIANTS:
            kind, fields = "clip", dict(clip_lib.VARIANTS[name[5:]]["text"])
        elif name in t5_lib.VARIANTS:
            fields = dict(t5_lib.VARIANTS[name])
            kind = "umt5" if fields.pop("per_layer_bias") else "t5"
        else:
            names = sorted(t5_lib.VARIANTS) + [f"clip-{v}" for v in sorted(clip_lib.VARIANTS)]
            raise ValueError(f"unknown config.plan.text_arch {name!r}; choose from {names}")
        encoder = config.text.get("encoder", "word")
        if config.plan.get("part", "dit") == "dit" and encoder != kind:
            raise ValueError(f"config.plan.text_arch={name!r} is a {kind} encoder, but config.text.encoder={encoder!r}")
        return kind, fields, int(length or text_encoder_lib.DEFAULT_MAX_LENGTH[kind])
    path = config.text.get("encoder_path", "")
    if not path:
        raise ValueError("a frozen text encoder to plan needs config.text.encoder_path (a converted folder) or "
                         "config.plan.text_arch (a name, e.g. 'umt5-xxl')")
    folder = weights.read_config(path, text_encoder_lib.NETWORK, text_encoder_lib.ORIGIN)
    kind = folder.get("kind")
    return kind, dict(folder.get("encoder") or {}), int(
        length or folder.get("max_length") or text_encoder_lib.DEFAULT_MAX_LENGTH[kind])


def text_example(config):
    """(the DiT's text input of one example, a frozen encoder's empty prompt or None), abstract in
    effect (zeros; only shapes matter): tokens, or states bfloat16 [1, S, D] and mask bool [1, S]
    of `build.text_conditioner(config)` or, by name, of config.plan.text_arch."""
    if not config.plan.get("text_arch", ""):
        text = build.text_conditioner(config)
        example = text.example()
        return example, jax.tree.map(jnp.zeros_like, example) if text.frozen else None
    kind, fields, S = text_arch(config)
    D = fields["width"]
    example = dict(states=jnp.zeros((1, S, D), jnp.bfloat16), mask=jnp.zeros((1, S), bool))
    return example, jax.tree.map(jnp.zeros_like, example)


def _dit_name(config) -> str:
    if config.dit.get("family", "pixeldance") == "wan":
        return config.dit.get("init_from", "") or config.dit.get("wan_config", "")
    return config.dit.variant


def _compile(lowered):
    """(compiled or None, the compiler's out-of-memory message or None). The TPU compiler refuses
    a program whose temporaries exceed the chip's memory: that is a plan's answer, not a failure."""
    try:
        return lowered.compile(), None
    except Exception as e:  # jax.errors.JaxRuntimeError; its module moved across jax versions
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None, str(e).split("\n")[0]


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
               aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
               code=m.generated_code_size_in_bytes)
    out["peak"] = out["arguments"] + out["temporaries"] + out["outputs"] - out["aliased"]
    return out


def _xla_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


PARTS = ("dit", "text_encoder")


def plan(config) -> dict:
    """Compiles the train step (and, with plan.sample, the sampler) for config's target; returns
    the report (bytes per device, FLOPs, fits) as a JSON-able dict. Both are the functions a run
    uses: the DiT trainer's `train_setup` (model, init, AdamW, the PixelDance task's loss; under
    LoRA its adapters, loss and frozen base) and the Pipeline's `sampler_fn`, with identity latent
    statistics. plan.part = 'text_encoder': `plan_text_encoder` instead."""
    p = config.plan
    part = p.get("part", "dit")
    if part not in PARTS:
        raise ValueError(f"unknown config.plan.part {part!r}; choose from {PARTS}")
    devices, target = target_devices(p)
    dcn = config.mesh.get("dcn_shape")
    mesh = sharding.make_mesh(tuple(config.mesh.shape), devices, dcn_shape=None if dcn is None else tuple(dcn))
    if part == "text_encoder":
        return plan_text_encoder(config, mesh, target)
    preset = config.mesh.preset
    T, h, w, C = latent = latent_shape(config)
    J = config.cond.last_from
    stats = workdir_lib.LatentStats(np.zeros(C, np.float32), np.ones(C, np.float32))
    # The text input: tokens, or a frozen encoder's states (shapes from its folder's config.json
    # or its name) with its empty prompt.
    example, null = text_example(config)
    S = jax.tree.leaves(example)[0].shape[1]
    model, init_fn, tx, loss_fn = dit_trainer.train_setup(config, latent, stats, example, null)
    lora = build.dit_lora(config, need_weights=False)
    key = jax.eval_shape(lambda: jax.random.key(0))
    report = dict(target=target, num_devices=len(devices), mesh=dict(mesh.shape), preset=preset,
                  variant=_dit_name(config), mode="full" if lora is None else f"lora rank {lora['rank']}",
                  latent=list(latent), memory_limit=memory_limit(p, devices[0]))
    if lora is not None:
        report["frozen_dtype"] = lora["base_dtype"].name

    # Shapes and shardings outside the mesh context: optax builds its state's layout with a few
    # concrete scalars, which must not be placed on compile-only devices.
    with nn.logical_axis_rules(sharding.rules(preset)):
        if lora is None:
            abstract, state_sh = train_lib.state_shardings(init_fn, tx, mesh, preset, key)
            frozen = frozen_sh = None
        else:  # the DiT trainer's LoRA run: adapters train, the base is read-only beside them
            # as sample.pretrained_dit holds it, in config.train.lora_base_dtype
            frozen, frozen_sh = workdir_lib.abstract_params(init_fn, mesh, preset, lora["base_dtype"])
            abstract, state_sh = train_lib.state_shardings(build.lora_init_fn(init_fn, lora), tx, mesh, preset, key)
            loss_fn = build.lora_loss(loss_fn, lora)
    big, big_sh = (abstract.params, state_sh.params) if lora is None else (frozen, frozen_sh)
    sharding.check_fsdp(big, big_sh, mesh, preset)  # as train_lib.fit checks it
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    report.update(num_params=num_params,
                  num_frozen_params=sum(math.prod(x.shape) for x in jax.tree.leaves(frozen)),
                  per_device=dict(params=shard_bytes(abstract.params, state_sh.params),
                                  opt_state=shard_bytes(abstract.opt_state, state_sh.opt_state),
                                  ema=shard_bytes(abstract.ema_params, state_sh.ema_params),
                                  frozen=0 if lora is None else shard_bytes(frozen, frozen_sh)))
    rep = sharding.replicated_bytes(big, big_sh)
    report["replicated_over_fsdp"] = rep[0] / rep[1]
    s = config.sample
    sampler = sample_lib.sampler_fn(build.task(config), model, steps=s.steps, sampler=s.sampler,
                                    branches=guidance_lib.num_branches(s.get("image_guidance", 1.0)),
                                    shift=s.get("shift", 1.0), guidance_rescale=s.get("guidance_rescale", 0.0))

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(preset)):
        # Train step: exactly the trainer's (dit_loss, AdamW, EMA, donated state, the schedule's
        # lengths an argument; under LoRA the frozen base a fifth argument, not donated).
        B = config.train.batch_size
        batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
        batch = dict(z=jax.ShapeDtypeStruct((B, T, h, w, C), jnp.float32, sharding=batch_sh),
                     z_last=jax.ShapeDtypeStruct((B, J, h, w, C), jnp.float32, sharding=batch_sh),
                     **_text_fields(example, B, batch_sh))
        if build.task(config).needs_frame_latents:  # keyframes anywhere: the cache's one-frame latents too
            batch["z_frames"] = jax.ShapeDtypeStruct((B, T, h, w, C), jnp.float32, sharding=batch_sh)
        if build.task(config).needs_shift_latents:  # the 'continue' set's windows one latent later
            batch["z_shift"] = jax.ShapeDtypeStruct((B, T, h, w, C), jnp.float32, sharding=batch_sh)
        step = train_lib.compile_step(train_lib.make_scheduled_step(loss_fn, tx, config.train.ema_decay),
                                      state_sh, batch_sh, mesh, frozen_sh)
        args = (_placed(abstract, state_sh), batch, _placed(key, repl), _placed(tx.lengths, repl))
        args += () if frozen is None else (_placed(frozen, frozen_sh),)
        t0 = time.time()
        compiled, oom = _compile(step.lower(*args))
        flops = (3 if lora is None else 2) * model_flops(config, latent, B, S)
        report["train"] = dict(batch=B, compile_seconds=time.time() - t0, out_of_memory=oom,
                               memory=compiled and _memory(compiled), model_flops=flops,
                               model_flops_per_device=flops / len(devices),
                               xla_flops_per_device=compiled and _xla_flops(compiled))
        if p.sample:  # the Pipeline samples with the merged weights: the base's shapes and shardings
            params, params_sh = (abstract.ema_params, state_sh.ema_params) if lora is None else (frozen, frozen_sh)
            report["sample"] = _plan_sampler(config, sampler, params, params_sh, mesh,
                                             latent, key, len(devices), example, null)
    return _fits(report)


def plan_text_encoder(config, mesh, target: str) -> dict:
    """Compiles a frozen text encoder's forward (`TextEncoder.embed`, what the cache stage and the
    Pipeline run) on `mesh`: config.cache.batch_size prompts of S tokens (`text_arch`), computing
    in config.text.encoder_dtype (CLIP: float32) with parameters held in that dtype too, sharded
    by their logical names under config.mesh.preset, as the cache stage's `build.EncoderText`
    places them."""
    p, preset = config.plan, config.mesh.preset
    kind, fields, S = text_arch(config)
    dtype = jnp.float32 if kind == "clip" else text_encoder_lib.DTYPES[config.text.get("encoder_dtype", "float32")]
    model = text_encoder_lib.model_from_config(kind, fields, dtype, param_dtype=dtype)
    boxed = text_encoder_lib.boxed_variables(kind, model)
    shardings = sharding.tree_shardings(mesh, boxed, preset)
    abstract = nn.unbox(boxed)
    encoder = text_encoder_lib.TextEncoder(kind, model, _placed(abstract, shardings), None, max_length=S,
                                           dtype=dtype, mesh=mesh, preset=preset)
    devices = mesh.devices.flatten()
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    rep = sharding.replicated_bytes(abstract, shardings)
    report = dict(part="text_encoder", target=target, num_devices=len(devices), mesh=dict(mesh.shape),
                  preset=preset, variant=p.get("text_arch", "") or config.text.get("encoder_path", ""), kind=kind,
                  dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name, num_params=num_params,
                  per_device=dict(params=shard_bytes(abstract, shardings)), replicated_over_fsdp=rep[0] / rep[1],
                  memory_limit=memory_limit(p, devices[0]))
    B = config.cache.batch_size
    bsh = sharding.batch_sharding(mesh)
    if B % (mesh.shape["data"] * mesh.shape["fsdp"]):  # a batch the devices do not split: every one runs it all
        bsh = sharding.replicated(mesh)
    ids = jax.ShapeDtypeStruct((B, S), jnp.int32, sharding=bsh)  # mask: int32 as the tokenizers give it
    t0 = time.time()
    compiled, oom = _compile(encoder.lower(ids, ids))
    flops = B * text_encoder_flops(kind, fields, S)
    report["forward"] = dict(batch=B, length=S, compile_seconds=time.time() - t0, out_of_memory=oom,
                             memory=compiled and _memory(compiled), model_flops=flops,
                             model_flops_per_device=flops / len(devices),
                             xla_flops_per_device=compiled and _xla_flops(compiled))
    return _fits(report)


def text_encoder_flops(kind: str, fields: dict, S: int) -> float:
    """Analytic forward FLOPs of a text encoder for one prompt of S tokens (2 per MAC): per layer
    the attention projections, the MLP (three matrices when gated) and the attention itself."""
    if kind == "clip":
        D, E, inner, mats = fields["width"], fields["mlp_width"], fields["width"], 2
    else:
        D, E, inner, mats = fields["width"], fields["mlp_width"], fields["heads"] * fields["head_width"], (
            3 if fields.get("gated", True) else 2)
    per_layer = 2 * S * (4 * D * inner + mats * D * E) + 4 * S * S * inner
    return fields["layers"] * per_layer


def _fits(report: dict) -> dict:
    limit = report["memory_limit"]
    for part in ("train", "sample", "forward"):
        if part in report:
            q = report[part]
            q["fits"] = False if q["out_of_memory"] else None if not limit else q["memory"]["peak"] <= limit
    return report


def _text_fields(example, B: int, sh) -> dict:
    """The latent-cache text fields of a batch of B, abstract: tokens int32 [B, S], or
    text_states [B, S, D] and text_mask [B, S] (`build.text_conditioner(config).example()`)."""
    batched = lambda x: jax.ShapeDtypeStruct((B,) + x.shape[1:], x.dtype, sharding=sh)
    if isinstance(example, dict):
        return dict(text_states=batched(example["states"]), text_mask=batched(example["mask"]))
    return dict(tokens=batched(example))


def _placed(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _plan_sampler(config, fn, params, params_sh, mesh, latent, key, num_devices, example, null) -> dict:
    """Compiles the sampler `fn` (`sample.sampler_fn`) on the EMA parameters, for text inputs of
    `example`'s structure (batch 1) and a frozen encoder's empty prompt `null` (or None)."""
    s = config.sample
    T, h, w, C = latent
    B, S = s.batch_size, jax.tree.leaves(example)[0].shape[1]
    branches = fn.keywords["branches"]
    bsh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    if B % (mesh.shape["data"] * mesh.shape["fsdp"]):  # a small sampling batch: every device samples it all
        bsh = repl
    sds = lambda shape, dtype, sh=bsh: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
    args = (_placed(params, params_sh), sds((B, T, h, w, C), jnp.float32), sds((B, h, w, C), jnp.float32),
            sds((B, h, w, C), jnp.float32), sds((B,), jnp.bool_), sds((B,), jnp.bool_),
            jax.tree.map(lambda x: sds((B,) + x.shape[1:], x.dtype), example),
            _placed(key, repl), sds((), jnp.float32, repl), sds((), jnp.float32, repl), sds((), jnp.int32, repl),
            jax.tree.map(lambda x: sds(x.shape, x.dtype, repl), null))
    t0 = time.time()
    compiled, oom = _compile(jax.jit(fn, out_shardings=bsh).lower(*args))
    calls = s.steps * (2 if s.sampler == "heun" else 1)
    flops = calls * model_flops(config, latent, branches * B, S)
    return dict(batch=B, steps=s.steps, sampler=s.sampler, branches=branches,
                compile_seconds=time.time() - t0, out_of_memory=oom, memory=compiled and _memory(compiled),
                model_flops=flops, model_flops_per_device=flops / num_devices,
                xla_flops_per_device=compiled and _xla_flops(compiled))


def _gib(n) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e6:,.1f}M" if n >= 10 ** 5 else f"{n:,}"


def format_report(r: dict) -> str:
    """The report as the lines the CLIs print."""
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    d = r["per_device"]
    replicated = f"{r['replicated_over_fsdp']:.0%} of parameter bytes replicated over fsdp"
    if r.get("part") == "text_encoder":
        lines = [f"plan: text encoder {r['variant']} ({r['kind']}, {_count(r['num_params'])} params, "
                 f"computing in {r['dtype']}) on {r['target']}, mesh {mesh}, preset {r['preset']}",
                 f"  per device: {r.get('param_dtype', 'float32')} params {_gib(d['params'])} ({replicated})"]
    else:
        T, h, w, C = r["latent"]
        lora = r.get("mode", "full") != "full"
        frozen = (f"frozen {r.get('frozen_dtype', 'float32')} base {_gib(d['frozen'])} "
                  f"({_count(r['num_frozen_params'])} params); trained: " if lora else "")
        lines = [f"plan: DiT {r['variant']} ({_count(r['num_params'])} trained params, "
                 f"{r.get('mode', 'full')}) on {r['target']}, mesh {mesh}, preset {r['preset']}, "
                 f"latents {T}x{h}x{w}x{C}",
                 f"  per device: {frozen}params {_gib(d['params'])}, optimizer state {_gib(d['opt_state'])}, "
                 f"EMA {_gib(d['ema'])} ({replicated})"]
    limit = r["memory_limit"]
    for part, title in (("train", "train step"), ("sample", "sampler"), ("forward", "forward")):
        if part not in r:
            continue
        q, m = r[part], r[part]["memory"]
        extra = f", {q['sampler']} {q['steps']} steps x {q['branches']} branches" if part == "sample" else ""
        extra = f" of {q['length']} tokens" if part == "forward" else extra
        lines.append(f"  {title} (global batch {q['batch']}{extra}), compiled in {q['compile_seconds']:.0f} s:")
        if q["out_of_memory"]:
            lines.append(f"    DOES NOT FIT: the compiler says {q['out_of_memory']}")
        else:
            fits = ("fits: unknown (no memory size: set plan.memory_gib)" if q["fits"] is None else
                    f"{'fits' if q['fits'] else 'DOES NOT FIT'} in {_gib(limit)}")
            lines += [f"    XLA per device: arguments {_gib(m['arguments'])}, outputs {_gib(m['outputs'])} "
                      f"({_gib(m['aliased'])} reusing donated arguments), temporaries {_gib(m['temporaries'])}",
                      f"    peak {_gib(m['peak'])} per device: {fits}"]
        xla = "" if not q["xla_flops_per_device"] else f"; XLA counts {q['xla_flops_per_device']:.3g} (loop body once)"
        per = {"train": "per step", "forward": "per batch"}.get(part) or f"per sampling run ({q['steps']} steps)"
        lines.append(f"    model FLOPs {q['model_flops']:.3g} {per}, {q['model_flops_per_device']:.3g} per device{xla}")
    return "\n".join(lines)


def run(config, workdir: str | None = None) -> dict:
    """Plans, prints the report, writes it as JSON to plan.output and/or <workdir>/plan.json."""
    report = plan(config)
    print(format_report(report))
    paths = [config.plan.output] if config.plan.output else []
    paths += [os.path.join(workdir, "plan.json")] if workdir else []
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    return report


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required")
    run(config)


if __name__ == "__main__":
    # Flags only when run as a program: `pixeldance.main` imports this module and has its own.
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    cli.run(main, errors=(RuntimeError,))  # RuntimeError: a mesh the target cannot make
