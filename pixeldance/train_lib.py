"""What every trainer shares: TrainState, optimizer, sharded init, the pure train step, the loop.

The trainers (`trainers/vae.py`, `trainers/dit.py`) read top to bottom: mesh -> data ->
model + optimizer -> sharded init -> restore -> `train_loop`. Only the loss differs.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct
from jax.experimental import multihost_utils
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


def warmup_cosine(lr: float, warmup_steps, num_steps) -> Callable:
    """schedule(count) -> learning rate: linear warm-up from 0 over max(warmup_steps, 1) steps,
    then cosine decay to 0.1 lr at max(num_steps, warmup_steps + 1).

    The float32 values of `optax.warmup_cosine_decay_schedule(0, lr, W, D, end_value=0.1 lr)`
    in a compiled step at every count (tested), but warmup_steps and num_steps may be traced
    int32 scalars: the lengths are then a step's argument, not constants of its program
    (`make_scheduled_step`). count: int32 scalar.
    """
    W = jnp.maximum(warmup_steps, 1)
    D = jnp.maximum(num_steps, warmup_steps + 1)
    alpha = 0.0 if lr == 0 else 0.1 * lr / lr  # optax's end_value / peak_value, rounded as it rounds it
    decay = (D - W).astype(jnp.float32)
    # optax divides by its constant lengths, and XLA compiles x / c as x * (1 / c), and
    # (t * pi) * (1 / c) as t * (pi * (1 / c)): the same products here give the same roundings
    # (a true division is 1 ulp off at some counts, so a resumed old run would drift).
    inv_warmup = 1 / W.astype(jnp.float32)
    angle = jnp.pi * (1 / decay)

    def schedule(count):
        frac = 1 - jnp.clip(count, 0, W) * inv_warmup
        warm = (0.0 - lr) * frac + lr
        t = jnp.minimum(count - W, decay)
        cosine = 0.5 * (1 + jnp.cos(t * angle))
        return jnp.where(count < W, warm, lr * ((1 - alpha) * cosine + alpha))
    return schedule


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """AdamW with linear warm-up then cosine decay to 10% of lr (`warmup_cosine`), after
    global-norm clipping; an optax GradientTransformation (init, update) with these lengths.

    `transform(lengths)` is the same optimizer with the schedule's lengths traced: a compiled
    step that takes them as an argument (`make_scheduled_step`) is one program for every
    num_steps, so a run that only trains longer (a resumed job, a test) finds the step in the
    persistent compilation cache instead of compiling it again. The state is optax's
    (the schedule's count included), whichever lengths: old checkpoints restore.
    """
    lr: float
    warmup_steps: int
    num_steps: int
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.99

    @property
    def lengths(self) -> np.ndarray:
        """int32 [2]: (warmup_steps, num_steps), what `transform` takes."""
        return np.array([self.warmup_steps, self.num_steps], np.int32)

    def transform(self, lengths=None) -> optax.GradientTransformation:
        """The optax chain; lengths: int32 [2] (warmup_steps, num_steps), e.g. traced (default: these)."""
        warmup, num = (self.warmup_steps, self.num_steps) if lengths is None else (lengths[0], lengths[1])
        return optax.chain(optax.clip_by_global_norm(self.grad_clip),
                           optax.adamw(warmup_cosine(self.lr, warmup, num), b1=self.b1, b2=self.b2,
                                       weight_decay=self.weight_decay))

    def init(self, params):
        return self.transform().init(params)

    def update(self, updates, state, params=None):
        return self.transform().update(updates, state, params)


def make_optimizer(*, lr: float, warmup_steps: int, num_steps: int, weight_decay: float = 0.0,
                   grad_clip: float = 1.0, b1: float = 0.9, b2: float = 0.99) -> Optimizer:
    """AdamW with linear warm-up then cosine decay to 10% of lr, after global-norm clipping (`Optimizer`)."""
    return Optimizer(lr=lr, warmup_steps=warmup_steps, num_steps=num_steps, weight_decay=weight_decay,
                     grad_clip=grad_clip, b1=b1, b2=b2)


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


def state_from_params(params, tx, shardings: TrainState) -> TrainState:
    """The step-0 TrainState of given (pretrained, already placed) params: fresh optimizer
    state, EMA = params, all in `shardings`."""
    def make(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          ema_params=params)
    return jax.jit(make, out_shardings=shardings)(params)


def ema_decay_at(step, decay: float):
    """EMA decay warmed up as (1 + step) / (10 + step), capped at `decay`: short runs get a useful EMA."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_train_step(loss_fn: Callable, tx, ema_decay: float):
    """Pure step (state, batch, rng, *frozen) -> (state, metrics).

    loss_fn(params, batch, rng, *frozen) -> (loss, dict of scalar metrics); frozen: arrays the
    loss reads but nothing trains (e.g. the base weights under LoRA adapters), passed through
    unchanged. rng is folded with the step, so a resumed run draws the same randomness as an
    uninterrupted one.
    """
    def step(state: TrainState, batch, rng, *frozen):
        rng = jax.random.fold_in(rng, state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng, *frozen)
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


def make_scheduled_step(loss_fn: Callable, optimizer: Optimizer, ema_decay: float):
    """`make_train_step` with the schedule's lengths an argument:
    step(state, batch, rng, lengths, *frozen) -> (state, metrics), lengths int32 [2]
    (`Optimizer.lengths`). The program is the same for every num_steps and warmup_steps."""
    def step(state: TrainState, batch, rng, lengths, *frozen):
        return make_train_step(loss_fn, optimizer.transform(lengths), ema_decay)(state, batch, rng, *frozen)
    return step


def compile_step(step_fn, state_sh, batch_sh, mesh, frozen_sh=None):
    """jit of a `make_scheduled_step` step with explicit shardings and the state donated
    (updated in place); the lengths replicated. With `frozen_sh` (the shardings of a frozen
    tree, see `make_train_step`) the step takes that tree as a fifth argument, not donated: it
    is read again by every step."""
    repl = sharding.replicated(mesh)
    extra = () if frozen_sh is None else (frozen_sh,)
    return jax.jit(step_fn, in_shardings=(state_sh, batch_sh, repl, repl) + extra,
                   out_shardings=(state_sh, repl), donate_argnums=0)


def to_global(batch: dict, batch_sh) -> dict:
    """Host numpy batch (this process's slice) -> global jax arrays with the batch sharding."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sh, np.asarray(x)), batch)


METRICS_FILE = "metrics.jsonl"


_open_boards: set[str] = set()  # TensorBoard folders with a MetricWriter open in this process
_writer_count = itertools.count()


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch.

    tensorboardX's writer imports torch whenever it is installed (to accept torch tensors), which
    the library never passes: with the test extra installed that cost every trainer 2.4 s and put
    torch in a process that must not use it. Hidden for this one import unless already loaded.
    """
    import sys
    if "torch" in sys.modules or "tensorboardX.writer" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, as without torch installed
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Scalars to TensorBoard and to `metrics.jsonl` ({"stage", "step", name: value}) in workdir.

    TensorBoard: `<workdir>/tensorboard/<stage>/`, tags `<stage>/<name>`. One writer per folder at
    a time (a second one raises), and each writer its own event file: tensorboardX names a file by
    the second it opened it and truncates a file of that name, so two writers of one folder in one
    second (a periodic evaluation, then the final one) lost the first one's events; the file name
    also carries the process id and a count."""

    def __init__(self, workdir: str, stage: str):
        SummaryWriter = _summary_writer_class()  # imported here: only trainers need it
        self.stage = stage
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb, self._board = None, os.path.abspath(os.path.join(workdir, "tensorboard", stage))
        if jax.process_index() == 0:
            if self._board in _open_boards:
                raise RuntimeError(f"a MetricWriter of {self._board} is open already: close it first")
            self._tb = SummaryWriter(self._board, filename_suffix=f".{os.getpid()}.{next(_writer_count):06d}")
            _open_boards.add(self._board)

    def truncate_after(self, step: int):
        """On resume: drop this stage's lines past the restored step, so the log reads like one run."""
        if jax.process_index() != 0 or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        keep = [l for l in lines if _log_line_kept(l, self.stage, step)]
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

    def image(self, tag: str, image: np.ndarray, step: int):
        """uint8 [H, W, 3] to TensorBoard as `<stage>/<tag>` (same event file as the scalars)."""
        if self._tb is not None:
            self._tb.add_image(f"{self.stage}/{tag}", image, step, dataformats="HWC")

    def gif(self, tag: str, data: bytes, height: int, width: int, step: int):
        """An animated GIF (encoded: `video_io.encode_gif`) to TensorBoard as the image `<stage>/<tag>`
        (its images tab plays it). tensorboardX's add_video would need moviepy for the encoding."""
        if self._tb is not None:
            from tensorboardX.proto.summary_pb2 import Summary
            image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=data)
            self._tb._get_file_writer().add_summary(  # what add_video does with its encoded GIF
                Summary(value=[Summary.Value(tag=f"{self.stage}/{tag}", image=image)]), step)

    def close(self):
        if self._tb is not None:
            self._tb.close()
            self._tb = None
            _open_boards.discard(self._board)


def log_stage(workdir: str, stage: str, step: int, scalars: dict):
    """One step of a stage that is not a training loop (the cache and sample stages): `scalars` to
    metrics.jsonl and TensorBoard at `step`, replacing that step's line of an earlier run."""
    writer = MetricWriter(workdir, stage)
    try:
        writer.truncate_after(step - 1)
        writer.write(step, scalars)
    finally:
        writer.close()


def logged(workdir: str, stage: str, step: int) -> bool:
    """Whether metrics.jsonl already holds a line of `stage` at `step`."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("stage") == stage and entry.get("step") == step:
                return True
    return False


def _log_line_kept(line: str, stage: str, step: int) -> bool:
    """False for this stage's lines past `step`, and for a line torn by a kill mid-write."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return False
    if not line.endswith("\n"):
        return False
    return not (entry.get("stage") == stage and entry["step"] > step)


class NonFiniteError(FloatingPointError):
    pass


# Exit status after a preemption checkpoint: 128 + SIGTERM, as if the signal had ended the
# process, so a scheduler that restarts failed jobs restarts this one (status 0 would read as done).
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class Preempted(SystemExit):
    """Raised once the preemption checkpoint is complete; ends the program with PREEMPTED_EXIT_CODE."""

    def __init__(self, message: str, code: int = PREEMPTED_EXIT_CODE):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PreemptionWatcher:
    """Turns SIGTERM, and SIGINT (Ctrl-C), into a step at which to save and stop.

    One process: a handler that only sets a flag (the loop checks it between steps, so a
    signal never lands inside a step or a save); a second Ctrl-C interrupts at once, as
    Python's default does, for someone who does not want to wait for the save. Several processes: JAX's preemption sync
    manager (started by `jax.distributed.initialize`) catches the signal and agrees on one
    step for every host, since a checkpoint save is collective.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self._flag = threading.Event()
        self._previous: dict = {}
        self.signum = signal.SIGTERM  # the signal that asked to stop (multi-process: SIGTERM)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self._flag.is_set() and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.signum = signum
        self._flag.set()

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # JAX's preemption service turned off: SIGTERM ends the run as usual
                return False
        return self._flag.is_set()


def _check_finite(host_metrics: list[dict], *, stage: str, step: int, last_good, directory: str):
    """Raises NonFiniteError if any step's loss or gradient norm is NaN or infinite."""
    for m in host_metrics:
        bad = [k for k in ("loss", "grad_norm") if k in m and not math.isfinite(float(m[k]))]
        if bad:
            raise NonFiniteError(
                f"{stage}: non-finite {', '.join(bad)} by step {step}; stopped without saving. "
                + (f"Last good checkpoint: step {last_good} in {directory}" if last_good is not None
                   else f"No checkpoint in {directory} yet"))


def train_loop(*, stage: str, state: TrainState, step_fn: Callable, batches: Iterator,
               to_device: Callable, checkpointer: Checkpointer, writer: MetricWriter,
               num_steps: int, log_every: int, ckpt_every: int, rng,
               data_state_fn: Callable[[], dict] = dict, pending: list[dict] | None = None,
               evaluate: Callable[[TrainState, int], Any] | None = None, eval_every: int = 0) -> TrainState:
    """Runs `step_fn` until `num_steps`, logging, checkpointing, stopping on non-finite values.

    `batches` yields host batches; `data_state_fn()` returns the iterator position to store with
    each checkpoint. The final state is always checkpointed. `pending`: metrics of the steps
    since the last log line, as restored from a checkpoint (see `Checkpointer.save`), so that a
    resumed run writes the same log lines as an uninterrupted one. SIGTERM saves a checkpoint
    after the current step and raises `Preempted`. evaluate(state, step) runs every `eval_every`
    steps before the last (the stage evaluates its final state itself), after that step's
    checkpoint; it must not change the state (it sees it before the next step donates it).
    """
    start = int(jax.device_get(state.step))
    pending, t0, last_good = list(pending or []), time.time(), checkpointer.latest_step()
    check = lambda host, step: _check_finite(host, stage=stage, step=step, last_good=last_good,
                                             directory=checkpointer.directory)
    bar = tqdm(total=num_steps, initial=start, desc=stage, unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    with PreemptionWatcher() as preemption:
        for step in range(start + 1, num_steps + 1):
            state, metrics = step_fn(state, to_device(next(batches)), rng)
            pending.append(metrics)
            if step % log_every == 0 or step == num_steps:
                host = jax.device_get(pending)
                check(host, step)
                mean = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
                mean["steps_per_sec"] = len(host) / max(time.time() - t0, 1e-9)
                writer.write(step, mean)
                bar.set_postfix(loss=f"{mean['loss']:.4f}")
                pending, t0 = [], time.time()
            preempted = preemption.reached(step)
            if step % ckpt_every == 0 or step == num_steps or preempted:
                # Nothing non-finite is ever saved: the steps since the last log line are checked first.
                host = jax.device_get(pending)
                check(host, step)
                checkpointer.save(step, state, data_state_fn(), metrics=host, force=preempted)
                last_good = step
            checkpointer.poll()  # seals a finished asynchronous save (see Checkpointer.poll)
            bar.update(1)
            if evaluate is not None and eval_every and step % eval_every == 0 and step < num_steps and not preempted:
                evaluate(state, step)
            if preempted and step < num_steps:
                checkpointer.wait()
                bar.close()
                code = 128 + preemption.signum  # 143 (SIGTERM) or 130 (SIGINT), as if the signal had ended it
                message = (f"{stage}: {'preempted' if preemption.signum == signal.SIGTERM else 'interrupted'} "
                           f"({preemption.name}) after step {step}; checkpoint {step} saved in "
                           f"{checkpointer.directory}; exiting with status {code}")
                if jax.process_index() == 0:
                    print(message, file=sys.stderr, flush=True)
                raise Preempted(message, code)
    bar.close()
    checkpointer.wait()
    return state


def mesh_from_config(mesh_config):
    """config.mesh (shape with -1 auto-fill, optional dcn_shape, preset) -> (mesh, preset).

    Joins a multi-process run first when launched as one (`sharding.initialize_distributed`):
    every stage builds its mesh before it touches a device.
    """
    sharding.initialize_distributed()
    dcn_shape = mesh_config.get("dcn_shape")
    mesh = sharding.make_mesh(tuple(mesh_config.shape), dcn_shape=None if dcn_shape is None else tuple(dcn_shape))
    sharding.rules(mesh_config.preset)  # validates the name
    return mesh, mesh_config.preset


def _with_args(step_fn, args, state, batch, rng):
    return step_fn(state, batch, rng, *args)


def restore_or_init(checkpointer: Checkpointer, init_fn: Callable, tx, abstract, shardings, rng,
                    initial_params: Callable | None = None):
    """(state, data_state): the newest checkpoint if there is one, else a fresh sharded init, or
    with `initial_params` (abstract params, their shardings) -> placed params, e.g. pretrained
    weights, a state starting from those."""
    if checkpointer.latest_step() is not None:
        return checkpointer.restore(abstract_like(abstract, shardings))
    if initial_params is not None:
        return state_from_params(initial_params(abstract.params, shardings.params), tx, shardings), {}
    return init_state(init_fn, tx, shardings, rng), {}


def fit(*, stage: str, workdir: str, mesh, preset: str, init_fn: Callable, loss_fn: Callable, tx,
        batches, stage_config, rng, evaluate: Callable | None = None, eval_every: int = 0,
        initial_params: Callable | None = None, frozen: tuple | None = None) -> TrainState:
    """The part every trainer shares: sharded init (from `initial_params` where given, see
    `restore_or_init`) or restore, then `train_loop`, then close.

    tx: an `Optimizer` (`make_optimizer`); its step is compiled with the schedule's lengths as
    an argument (`make_scheduled_step`). Checkpoints go to `<workdir>/<stage>/`; stage_config
    supplies ema_decay, num_steps, log_every, ckpt_every and keep_checkpoints. Refuses an fsdp run whose parameters would
    mostly be replicated (`sharding.check_fsdp`). evaluate, eval_every: see `train_loop`.
    frozen: (placed tree, its shardings) that loss_fn reads as its fourth argument and nothing
    trains or checkpoints (LoRA's base weights; the state then holds only what trains, and the
    fsdp check applies to the frozen tree, the big one).
    """
    c = stage_config
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(preset)):
        abstract, state_sh = state_shardings(init_fn, tx, mesh, preset, rng)
        if frozen is None:
            sharding.check_fsdp(abstract.params, state_sh.params, mesh, preset)
        else:
            sharding.check_fsdp(frozen[0], frozen[1], mesh, preset)
        ckpt = Checkpointer(os.path.join(workdir, stage), keep=c.keep_checkpoints, cleanup_tmp=True)
        writer = None
        try:
            state, data_state = restore_or_init(ckpt, init_fn, tx, abstract, state_sh, rng, initial_params)
            pending = ckpt.restore_metrics() if ckpt.latest_step() is not None else []
            batches.set_state(data_state)
            writer = MetricWriter(workdir, stage)
            writer.truncate_after(int(jax.device_get(state.step)))
            batch_sh = sharding.batch_sharding(mesh)
            step_fn = compile_step(make_scheduled_step(loss_fn, tx, c.ema_decay), state_sh, batch_sh, mesh,
                                   None if frozen is None else frozen[1])
            lengths = jax.device_put(tx.lengths, sharding.replicated(mesh))
            step_fn = functools.partial(_with_args, step_fn, (lengths,) + (() if frozen is None else (frozen[0],)))
            state = train_loop(
                stage=stage, state=state, step_fn=step_fn, batches=batches,
                to_device=lambda b: to_global(b, batch_sh), checkpointer=ckpt, writer=writer,
                num_steps=c.num_steps, log_every=c.log_every, ckpt_every=c.ckpt_every,
                rng=jax.random.fold_in(rng, 1), data_state_fn=batches.get_state, pending=pending,
                evaluate=evaluate, eval_every=eval_every)
        finally:  # also on preemption and errors: waits for a save in flight, flushes the log
            if writer is not None:
                writer.close()
            ckpt.close()
    return state
