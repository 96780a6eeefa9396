"""What every trainer shares: TrainState, optimizer, sharded init, the pure train step, the loop.

The trainers (`trainers/vae.py`, `trainers/dit.py`) read top to bottom: mesh -> data ->
model + optimizer -> sharded init -> restore -> `train_loop`. Only the loss differs.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct
from tqdm import tqdm

from pixeldance import sharding
from pixeldance.checkpoint import Checkpointer, abstract_like


def strip_boxes(tree):
    """`nn.Partitioned` leaves -> their values, without sharding constraints (safe on abstract trees)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any


def make_optimizer(*, lr: float, warmup_steps: int, num_steps: int, weight_decay: float = 0.0,
                   grad_clip: float = 1.0, b1: float = 0.9, b2: float = 0.99):
    """AdamW with linear warm-up then cosine decay to 10% of lr, after global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, max(warmup_steps, 1), max(num_steps, warmup_steps + 1), end_value=0.1 * lr)
    return optax.chain(optax.clip_by_global_norm(grad_clip),
                       optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))


def stage_optimizer(stage_config):
    """`make_optimizer` from a stage's config fields (lr, warmup_steps, num_steps, weight_decay, grad_clip)."""
    c = stage_config
    return make_optimizer(lr=c.lr, warmup_steps=c.warmup_steps, num_steps=c.num_steps,
                          weight_decay=c.weight_decay, grad_clip=c.grad_clip)


def state_shardings(init_fn: Callable, tx, mesh, preset: str, rng):
    """(abstract TrainState, its shardings) without allocating anything.

    init_fn(rng) returns `nn.Partitioned`-boxed params; their logical names give the shardings.
    Optimizer state leaves shaped like parameters are sharded like them; the rest replicated.
    """
    boxed = jax.eval_shape(init_fn, rng)
    param_sh = sharding.tree_shardings(mesh, boxed, preset)
    params = strip_boxes(boxed)
    opt_state = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_state, param_sh,
                                   transform_non_params=lambda _: sharding.replicated(mesh))
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                          opt_state=opt_state, ema_params=params)
    shardings = TrainState(step=sharding.replicated(mesh), params=param_sh, opt_state=opt_sh,
                           ema_params=param_sh)
    return abstract, shardings


def init_state(init_fn: Callable, tx, shardings: TrainState, rng) -> TrainState:
    """Initialises the TrainState directly into its shardings (no host copy of full params)."""
    def make(rng):
        params = nn.unbox(init_fn(rng))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          ema_params=params)
    return jax.jit(make, out_shardings=shardings)(rng)


def ema_decay_at(step, decay: float):
    """EMA decay warmed up as (1 + step) / (10 + step), capped at `decay`: short runs get a useful EMA."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_train_step(loss_fn: Callable, tx, ema_decay: float):
    """Pure step (state, batch, rng) -> (state, metrics).

    loss_fn(params, batch, rng) -> (loss, dict of scalar metrics). rng is folded with the step,
    so a resumed run draws the same randomness as an uninterrupted one.
    """
    def step(state: TrainState, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d = ema_decay_at(state.step, ema_decay)
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
        metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads),
                       param_norm=optax.tree.norm(params), update_norm=optax.tree.norm(updates),
                       **aux)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             ema_params=ema), metrics
    return step


def compile_step(step_fn, state_sh, batch_sh, mesh):
    """jit with explicit shardings and the state donated (updated in place)."""
    return jax.jit(step_fn, in_shardings=(state_sh, batch_sh, sharding.replicated(mesh)),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)


def to_global(batch: dict, batch_sh) -> dict:
    """Host numpy batch (this process's slice) -> global jax arrays with the batch sharding."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sh, np.asarray(x)), batch)


class MetricWriter:
    """Scalars to TensorBoard and to `metrics.jsonl` ({"stage", "step", name: value}) in workdir."""

    def __init__(self, workdir: str, stage: str):
        from tensorboardX import SummaryWriter  # imported here: heavy, and only trainers need it
        self.stage = stage
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard", stage)) if jax.process_index() == 0 else None

    def truncate_after(self, step: int):
        """On resume: drop this stage's lines past the restored step, so the log reads like one run."""
        if jax.process_index() != 0 or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        keep = [l for l in lines if not (json.loads(l).get("stage") == self.stage and json.loads(l)["step"] > step)]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, step: int, scalars: dict):
        if self._tb is None:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        for k, v in scalars.items():
            self._tb.add_scalar(f"{self.stage}/{k}", v, step)
        with open(self.path, "a") as f:
            f.write(json.dumps({"stage": self.stage, "step": int(step), **scalars}) + "\n")

    def close(self):
        if self._tb is not None:
            self._tb.close()


class NonFiniteError(FloatingPointError):
    pass


def train_loop(*, stage: str, state: TrainState, step_fn: Callable, batches: Iterator,
               to_device: Callable, checkpointer: Checkpointer, writer: MetricWriter,
               num_steps: int, log_every: int, ckpt_every: int, rng,
               data_state_fn: Callable[[], dict] = dict) -> TrainState:
    """Runs `step_fn` until `num_steps`, logging, checkpointing, stopping on non-finite values.

    `batches` yields host batches; `data_state_fn()` returns the iterator position to store with
    each checkpoint. The final state is always checkpointed.
    """
    start = int(jax.device_get(state.step))
    pending, t0, last_good = [], time.time(), checkpointer.latest_step()
    bar = tqdm(total=num_steps, initial=start, desc=stage, unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    for step in range(start + 1, num_steps + 1):
        state, metrics = step_fn(state, to_device(next(batches)), rng)
        pending.append(metrics)
        if step % log_every == 0 or step == num_steps:
            host = jax.device_get(pending)
            for m in host:
                bad = [k for k in ("loss", "grad_norm") if not math.isfinite(float(m[k]))]
                if bad:
                    raise NonFiniteError(
                        f"{stage}: non-finite {', '.join(bad)} by step {step}; stopped without saving. "
                        f"Last good checkpoint: step {last_good} in {checkpointer.directory}")
            mean = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
            mean["steps_per_sec"] = len(host) / max(time.time() - t0, 1e-9)
            writer.write(step, mean)
            bar.set_postfix(loss=f"{mean['loss']:.4f}")
            pending, t0 = [], time.time()
        if step % ckpt_every == 0 or step == num_steps:
            # Non-finite values are checked above before any save (ckpt_every is a multiple of log_every
            # or the check ran this step), so a saved checkpoint is always a good one.
            if pending:
                host = jax.device_get(pending)
                if not all(math.isfinite(float(m["loss"])) for m in host):
                    raise NonFiniteError(f"{stage}: non-finite loss by step {step}; last good checkpoint: "
                                         f"step {last_good} in {checkpointer.directory}")
            checkpointer.save(step, state, data_state_fn())
            last_good = step
        bar.update(1)
    bar.close()
    checkpointer.wait()
    return state


def mesh_from_config(mesh_config):
    """config.mesh (shape with -1 auto-fill, preset) -> (mesh, preset)."""
    mesh = sharding.make_mesh(tuple(mesh_config.shape))
    sharding.rules(mesh_config.preset)  # validates the name
    return mesh, mesh_config.preset


def restore_or_init(checkpointer: Checkpointer, init_fn: Callable, tx, abstract, shardings, rng):
    """(state, data_state): the newest checkpoint if there is one, else a fresh sharded init."""
    if checkpointer.latest_step() is not None:
        return checkpointer.restore(abstract_like(abstract, shardings))
    return init_state(init_fn, tx, shardings, rng), {}


def load_ema_params(directory: str, init_fn: Callable, stage_config, *, step: int | None = None):
    """EMA parameters of the newest (or given) checkpoint in `directory`, on the default device.

    stage_config: the optimizer fields the checkpoint was trained with (config.vae / config.train),
    which fix the structure of the stored optimizer state.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint in {directory}")
    ckpt = Checkpointer(directory, use_async=False)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    tx = stage_optimizer(stage_config)
    params = strip_boxes(jax.eval_shape(init_fn, jax.random.key(0)))
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                          opt_state=jax.eval_shape(tx.init, params), ema_params=params)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state, _ = ckpt.restore(abstract_like(abstract, jax.tree.map(lambda _: device, abstract)), step)
    ckpt.close()
    return state.ema_params, int(state.step)


def fit(*, stage: str, workdir: str, mesh, preset: str, init_fn: Callable, loss_fn: Callable, tx,
        batches, stage_config, rng) -> TrainState:
    """The part every trainer shares: sharded init or restore, then `train_loop`, then close.

    Checkpoints go to `<workdir>/<stage>/`; stage_config supplies ema_decay, num_steps,
    log_every, ckpt_every and keep_checkpoints.
    """
    c = stage_config
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(preset)):
        abstract, state_sh = state_shardings(init_fn, tx, mesh, preset, rng)
        ckpt = Checkpointer(os.path.join(workdir, stage), keep=c.keep_checkpoints)
        state, data_state = restore_or_init(ckpt, init_fn, tx, abstract, state_sh, rng)
        batches.set_state(data_state)
        writer = MetricWriter(workdir, stage)
        writer.truncate_after(int(jax.device_get(state.step)))
        batch_sh = sharding.batch_sharding(mesh)
        step_fn = compile_step(make_train_step(loss_fn, tx, c.ema_decay), state_sh, batch_sh, mesh)
        state = train_loop(
            stage=stage, state=state, step_fn=step_fn, batches=batches,
            to_device=lambda b: to_global(b, batch_sh), checkpointer=ckpt, writer=writer,
            num_steps=c.num_steps, log_every=c.log_every, ckpt_every=c.ckpt_every,
            rng=jax.random.fold_in(rng, 1), data_state_fn=batches.get_state)
    writer.close()
    ckpt.close()
    return state
