"""Trainers end to end on a sharded 2 x 4 mesh, resumption, the non-finite guard and the EMA."""
import functools
import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pixeldance import build, configs, sharding, train_lib
from pixeldance import workdir as workdir_lib
from pixeldance.checkpoint import Checkpointer
from pixeldance.data import latent_cache, synthetic
from pixeldance.trainers import dit as dit_trainer
from pixeldance.trainers import vae as vae_trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNLOCAL = os.path.join(REPO, "experiments", "shapes.py") + ":runlocal"
MESH = {"mesh.shape": (2, 4, 1, 1), "mesh.preset": "fsdp"}
NUM_STEPS = 4
# The global batch is split over data x fsdp = 8 devices.
VAE_OVERRIDES = {**MESH, "vae.batch_size": 8, "vae.num_steps": NUM_STEPS, "vae.log_every": 1, "vae.ckpt_every": 2}
DIT_OVERRIDES = {**MESH, "train.batch_size": 8, "train.num_steps": NUM_STEPS, "train.log_every": 1,
                 "train.ckpt_every": 2}


def _config(overrides):
    return configs.override(configs.load_config(RUNLOCAL), **overrides)


def _metrics(workdir, stage):
    """This stage's lines of metrics.jsonl, without the wall-clock field."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return [{k: v for k, v in line.items() if k != "steps_per_sec"} for line in lines if line["stage"] == stage]


def _fsdp_fraction(params) -> float:
    """Fraction of parameter elements in arrays split over the 'fsdp' mesh axis."""
    total = sharded = 0
    for x in jax.tree.leaves(params):
        total += x.size
        if any(a == "fsdp" or (isinstance(a, tuple) and "fsdp" in a) for a in x.sharding.spec):
            sharded += x.size
    return sharded / total


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(jax.device_get(x)), np.asarray(jax.device_get(y)))


def _write_latent_cache(config, workdir):
    """A small random latent cache in the format of `trainers/cache.py` (no VAE needed).

    z [8, 3, 4, 4, 16] for 9-frame 32 x 32 clips; z_last the last 3 frames as images.
    """
    rng = np.random.default_rng(0)
    n, K = 8, config.cond.last_from
    captions = [synthetic.caption([synthetic.TRAIN_COMBOS[7 * i]]) for i in range(n)]
    z = rng.normal(1.0, 2.0, (n, 3, 4, 4, 16)).astype(np.float32)
    z_last = rng.normal(1.0, 2.0, (n, K, 4, 4, 16)).astype(np.float32)
    latent_cache.write_arrays(os.path.join(workdir, "cache"), z, z_last,
                              build.tokenizer(config)(captions), captions, num_shards=2)
    workdir_lib.LatentStats(np.full(16, 1.0, np.float32), np.full(16, 2.0, np.float32), num_videos=n).write(workdir)


def _vae_init_fn(config):
    return build.vae_init_fn(build.vae(config), 1, 32, 32)


def _dit_init_fn(config):
    return build.dit_init_fn(build.dit(config, 16), (3, 4, 4, 16), config.text.max_length)


class Stage:
    """What differs between the two trainers, for tests that run both."""

    def __init__(self, name, train_fn, overrides, init_fn, needs_cache):
        self.name, self.train_fn, self.overrides = name, train_fn, overrides
        self.init_fn, self.needs_cache = init_fn, needs_cache

    def config(self):
        return _config(self.overrides)

    def new_workdir(self, tmp_path_factory, label):
        workdir = str(tmp_path_factory.mktemp(f"{self.name}_{label}"))
        if self.needs_cache:
            _write_latent_cache(self.config(), workdir)
        return workdir


STAGES = {
    "vae": Stage("vae", vae_trainer.train_vae, VAE_OVERRIDES, _vae_init_fn, False),
    "dit": Stage("dit", dit_trainer.train_dit, DIT_OVERRIDES, _dit_init_fn, True),
}


@pytest.fixture(scope="module", params=sorted(STAGES))
def full_run(request, tmp_path_factory):
    """One uninterrupted run of NUM_STEPS steps: (stage, workdir, final TrainState)."""
    stage = STAGES[request.param]
    workdir = stage.new_workdir(tmp_path_factory, "full")
    state = stage.train_fn(stage.config(), workdir)
    return stage, workdir, state


# ---------------------------------------------------------------------------------------------
# (a) Training steps on a data x fsdp = 2 x 4 mesh
# ---------------------------------------------------------------------------------------------

def test_trains_sharded_over_fsdp(full_run):
    stage, workdir, state = full_run
    assert int(state.step) == NUM_STEPS
    lines = _metrics(workdir, stage.name)
    assert [line["step"] for line in lines] == list(range(1, NUM_STEPS + 1))
    for line in lines:
        for key in ("loss", "grad_norm", "param_norm", "update_norm"):
            assert math.isfinite(line[key]), (line["step"], key)
    assert lines[-1]["update_norm"] > 0  # the parameters moved
    for leaf in jax.tree.leaves(state.params):
        assert leaf.sharding.mesh.shape == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
    # Parameters (and their EMA) are split over 'fsdp', not replicated.
    if stage.name == "vae":
        kernel, ema = (p["params"]["decoder"]["conv_in"]["kernel"] for p in (state.params, state.ema_params))
    else:
        kernel, ema = (p["params"]["dit"]["blocks"]["mlp_in"]["kernel"] for p in (state.params, state.ema_params))
    assert "fsdp" in kernel.sharding.spec and ema.sharding.spec == kernel.sharding.spec
    dim = list(kernel.sharding.spec).index("fsdp")
    assert kernel.addressable_shards[0].data.shape[dim] == kernel.shape[dim] // 4
    assert _fsdp_fraction(state.params) > 0.5
    assert _fsdp_fraction(state.ema_params) > 0.5
    # Checkpoints every 2 steps, keep 2.
    assert Checkpointer(os.path.join(workdir, stage.name), use_async=False).all_steps() == [2, 4]


def test_runlocal_vae_trains_on_the_default_mesh(tmp_path):
    """The smoke config exactly as documented, on this 8-device host (mesh (1, -1, 1, 1), fsdp)."""
    config = _config({"vae.num_steps": 1})
    state = vae_trainer.train_vae(config, str(tmp_path))
    assert int(state.step) == 1


# ---------------------------------------------------------------------------------------------
# (b) Resumption: preempted after step 3 (last checkpoint: step 2) and restarted
# ---------------------------------------------------------------------------------------------

class Preempted(Exception):
    pass


def test_resumed_run_equals_uninterrupted_run(full_run, tmp_path_factory, monkeypatch):
    stage, full_workdir, full_state = full_run
    config = stage.config()
    workdir = stage.new_workdir(tmp_path_factory, "resumed")
    write, save = train_lib.MetricWriter.write, Checkpointer.save

    def write_then_preempt(self, step, scalars):
        write(self, step, scalars)
        if step == 3:
            raise Preempted()

    def save_and_wait(self, *args, **kwargs):
        out = save(self, *args, **kwargs)
        self.wait()  # the checkpoint is on disk before the "preemption"
        return out

    with monkeypatch.context() as m:
        m.setattr(train_lib.MetricWriter, "write", write_then_preempt)
        m.setattr(Checkpointer, "save", save_and_wait)
        with pytest.raises(Preempted):
            stage.train_fn(config, workdir)
    assert [line["step"] for line in _metrics(workdir, stage.name)] == [1, 2, 3]
    assert Checkpointer(os.path.join(workdir, stage.name), use_async=False).all_steps() == [2]

    # Restart: restores step 2 (model, optimizer, EMA, data position), drops the log past it, runs 3-4.
    written = []

    def record(self, step, scalars):
        if self.stage == stage.name:  # not the VAE's after-training evaluation ('vae_eval')
            written.append(step)
        write(self, step, scalars)

    with monkeypatch.context() as m:
        m.setattr(train_lib.MetricWriter, "write", record)
        state = stage.train_fn(config, workdir)
    assert written == [3, 4]
    assert _metrics(workdir, stage.name) == _metrics(full_workdir, stage.name)
    _assert_trees_equal(state, full_state)
    # The checkpoints restore (EMA weights only, onto one device) to the same EMA parameters.
    one = sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1])
    ema, step = workdir_lib.load_ema_params(os.path.join(workdir, stage.name), stage.init_fn(config), one)
    ema_full, _ = workdir_lib.load_ema_params(os.path.join(full_workdir, stage.name), stage.init_fn(config), one)
    assert step == NUM_STEPS
    _assert_trees_equal(ema, ema_full)
    _assert_trees_equal(ema, full_state.ema_params)


# ---------------------------------------------------------------------------------------------
# (c) Non-finite values stop training before anything bad is saved
# ---------------------------------------------------------------------------------------------

def _toy_state(tx):
    params = {"w": jnp.ones((4,))}
    return train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                ema_params=params)


@pytest.mark.parametrize("log_every, nan_step", [
    (1, 3),   # caught when step 3 is logged
    (4, 3),   # caught when step 4 logs the mean of steps 1-4
    (3, 4),   # caught before the checkpoint of step 4, which is not a logging step
])
def test_non_finite_loss_stops_training(tmp_path, log_every, nan_step):
    tx = train_lib.make_optimizer(lr=0.1, warmup_steps=1, num_steps=6)

    def loss_fn(params, batch, rng):
        return jnp.sum(jnp.square(params["w"] - 0.5)) * batch["scale"], {}

    def batches():
        for step in itertools.count(1):
            yield {"scale": np.float32(np.nan if step == nan_step else 1.0)}

    ckpt_dir = str(tmp_path / "ckpt")
    ckpt = Checkpointer(ckpt_dir, use_async=False)
    writer = train_lib.MetricWriter(str(tmp_path), "toy")
    with pytest.raises(train_lib.NonFiniteError) as err:
        train_lib.train_loop(stage="toy", state=_toy_state(tx), step_fn=jax.jit(train_lib.make_train_step(loss_fn, tx, 0.9)),
                             batches=batches(), to_device=lambda b: b, checkpointer=ckpt, writer=writer,
                             num_steps=6, log_every=log_every, ckpt_every=2, rng=jax.random.key(0))
    message = str(err.value)
    assert "last good checkpoint: step 2" in message.lower() and ckpt_dir in message, message
    assert "toy" in message and "loss" in message
    assert ckpt.all_steps() == [2]  # nothing saved after the bad step
    assert all(line["step"] < nan_step for line in _metrics(str(tmp_path), "toy"))
    ckpt.close()
    writer.close()


# ---------------------------------------------------------------------------------------------
# (d) EMA warm-up
# ---------------------------------------------------------------------------------------------

def test_ema_decay_warmup():
    decay = lambda step, cap=0.999: float(train_lib.ema_decay_at(jnp.int32(step), cap))
    assert decay(0) == pytest.approx(0.1)          # (1 + 0) / (10 + 0)
    assert decay(1) == pytest.approx(2 / 11)
    assert decay(90) == pytest.approx(0.91)
    assert decay(10 ** 6) == pytest.approx(0.999)  # capped at the configured decay
    assert decay(0, cap=0.05) == pytest.approx(0.05)
    steps = np.arange(0, 5000, 7)
    values = np.asarray(train_lib.ema_decay_at(jnp.asarray(steps), 0.999))
    assert np.all(np.diff(values) >= 0) and values.max() <= 0.999


def test_train_step_updates_ema_with_warmup():
    tx = optax.sgd(0.1)
    loss_fn = lambda params, batch, rng: (0.5 * jnp.sum(jnp.square(params["w"])), {"extra": jnp.float32(1.0)})
    w0 = np.array([1.0, -2.0], np.float32)
    params = {"w": jnp.asarray(w0)}
    state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                 ema_params=params)
    step_fn = jax.jit(train_lib.make_train_step(loss_fn, tx, 0.999))
    ema = w0
    for k in range(3):
        state, metrics = step_fn(state, {}, jax.random.key(0))
        w = w0 * 0.9 ** (k + 1)  # gradient w, sgd step 0.1
        d = min(0.999, (1 + k) / (10 + k))
        ema = d * ema + (1 - d) * w
        np.testing.assert_allclose(state.params["w"], w, rtol=1e-6)
        np.testing.assert_allclose(state.ema_params["w"], ema, rtol=1e-6)
    assert int(state.step) == 3
    assert set(metrics) == {"loss", "grad_norm", "param_norm", "update_norm", "extra"}
    np.testing.assert_allclose(metrics["grad_norm"], np.linalg.norm(w0 * 0.9 ** 2), rtol=1e-6)


def test_joint_image_video_training(tmp_path):
    """With train.image_every = 2, batches 2 and 4 are one-frame image batches: both shapes train."""
    config = _config({**DIT_OVERRIDES, "train.image_every": 2})
    workdir = str(tmp_path)
    _write_latent_cache(config, workdir)
    state = dit_trainer.train_dit(config, workdir)
    lines = _metrics(workdir, "dit")
    assert [line["step"] for line in lines] == list(range(1, NUM_STEPS + 1))
    assert all(math.isfinite(line["loss"]) for line in lines)
    assert int(state.step) == NUM_STEPS


# ---------------------------------------------------------------------------------------------
# (e) The learning-rate schedule: optax's numbers, its lengths a step argument
# ---------------------------------------------------------------------------------------------

def _optax_adamw(lr, warmup_steps, num_steps, weight_decay=0.0):
    """`make_optimizer` as it was: optax's own schedule, its lengths constants of the program."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 1), max(num_steps, warmup_steps + 1),
                                                  end_value=0.1 * lr)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=weight_decay))


@pytest.mark.parametrize("lr", [3e-4, 2e-4, 1e-2, 0.1, 7e-5])
def test_schedule_with_traced_lengths_is_optax_bit_for_bit(lr):
    """The defaults (50 / 1500, 200 / 1600), runlocal's (1 / 4 and longer runs of it) and odd
    lengths (no warm-up, num_steps at or below it): every count to past the end, one compiled
    function for all lengths, the float32 learning rate of optax's compiled schedule. Scalar
    counts in a loop, as a step computes it (vectorised, XLA rounds some divisions otherwise)."""
    ours = jax.jit(lambda counts, lengths: jax.lax.map(train_lib.warmup_cosine(lr, lengths[0], lengths[1]), counts))
    counts = jnp.arange(1603, dtype=jnp.int32)
    for warmup, num_steps in [(50, 1500), (200, 1600), (1, 4), (1, 6), (1, 7), (1, 8), (3, 10), (7, 13), (0, 3),
                              (5, 5), (5, 3)]:
        want = jax.jit(functools.partial(jax.lax.map, optax.warmup_cosine_decay_schedule(
            0.0, lr, max(warmup, 1), max(num_steps, warmup + 1), end_value=0.1 * lr)))(counts)
        got = ours(counts, jnp.array([warmup, num_steps], jnp.int32))
        np.testing.assert_array_equal(got, want, err_msg=f"warmup {warmup}, num_steps {num_steps}")
    assert ours._cache_size() == 1


def test_scheduled_step_trains_as_optax_did_with_its_state():
    """make_optimizer's state is optax's (old checkpoints restore); a `make_scheduled_step` step
    and a step of the Optimizer itself train exactly as optax's AdamW did; the lengths are an
    argument, so runs of other lengths compile the same program."""
    opt = train_lib.make_optimizer(lr=0.1, warmup_steps=2, num_steps=6, weight_decay=0.01)
    ref = _optax_adamw(0.1, 2, 6, weight_decay=0.01)
    params = {"w": jnp.array([3.0, -2.0, 0.5]), "b": jnp.array(1.5)}
    want_state = ref.init(params)
    assert jax.tree.structure(opt.init(params)) == jax.tree.structure(want_state)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), opt.init(params)) == jax.tree.map(
        lambda x: (x.shape, x.dtype), want_state)

    def loss_fn(p, batch, rng):  # gradients above the clipping norm at first
        return jnp.sum(jnp.square(p["w"] * batch["x"] - p["b"])), {}

    def state():
        return train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=ref.init(params),
                                    ema_params=params)

    steps = {"optax": jax.jit(train_lib.make_train_step(loss_fn, ref, 0.9)),
             "optimizer": jax.jit(train_lib.make_train_step(loss_fn, opt, 0.9)),
             "scheduled": jax.jit(lambda s, b, r: train_lib.make_scheduled_step(loss_fn, opt, 0.9)(s, b, r, opt.lengths))}
    states = {name: state() for name in steps}
    for k in range(8):  # past num_steps: the schedule's floor too
        batch = {"x": jnp.array([1.0, 2.0, -1.0]) * (k + 1)}
        for name, step in steps.items():
            states[name], _ = step(states[name], batch, jax.random.key(0))
        for name in ("optimizer", "scheduled"):
            jax.tree.map(np.testing.assert_array_equal, states[name], states["optax"])

    scheduled = jax.jit(train_lib.make_scheduled_step(loss_fn, opt, 0.9))
    other = jax.jit(train_lib.make_scheduled_step(loss_fn, train_lib.make_optimizer(
        lr=0.1, warmup_steps=5, num_steps=1000, weight_decay=0.01), 0.9))
    args = (state(), {"x": jnp.ones(3)}, jax.random.key(0), opt.lengths)
    assert scheduled.lower(*args).as_text() == other.lower(*args).as_text()
