"""Surviving faults: kill -9 and SIGTERM mid-run, restore onto other meshes, non-finite values, retention.

A toy regression model goes through the same `train_lib.fit` and data pipeline as the trainers
(sharded init, Orbax checkpoints with the iterator position, metrics.jsonl), at a compile cost
of a second: the trainers' own resume is tested end to end in test_train.py. Runs that are killed
are child processes running this file as a script (`python tests/test_fault_tolerance.py ...`).

Every toy step logs `id_sum`, the sum of the example ids in its batch, so equal logs mean
equal data order, not just equal losses.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from pixeldance import sharding, train_lib
from pixeldance.checkpoint import Checkpointer, abstract_like
from pixeldance.data import pipeline

HERE = os.path.abspath(__file__)
NUM_STEPS = 32
LOG_EVERY, CKPT_EVERY, KEEP = 2, 4, 2


# ---------------------------------------------------------------------------------------------
# The toy job
# ---------------------------------------------------------------------------------------------

class Toy(nn.Module):
    """x [B, 16] -> [B, 4]; kernels carry logical names, so 'fsdp' splits them."""

    @nn.compact
    def __call__(self, x):
        def dense(features, names, name):
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)
            return nn.Dense(features, kernel_init=init, name=name)
        return dense(4, ("mlp", "embed"), "out")(nn.gelu(dense(32, ("embed", "mlp"), "hidden")(x)))


class ToySource:
    """64 examples: id int32, x float32 [16], y = x W float32 [4]."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(64, 16)).astype(np.float32)
        self.y = (self.x @ rng.normal(size=(16, 4))).astype(np.float32)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return dict(id=np.int32(i), x=self.x[i], y=self.y[i])


def toy_loss(params, batch, rng):
    pred = Toy().apply(params, batch["x"])
    return jnp.mean(jnp.square(pred - batch["y"])), dict(id_sum=jnp.sum(batch["id"]).astype(jnp.float32))


def toy_init(rng):
    return Toy().init(rng, jnp.zeros((1, 16)))


def stage_config(num_steps: int):
    return ml_collections.ConfigDict(dict(ema_decay=0.9, num_steps=num_steps, log_every=LOG_EVERY,
                                          ckpt_every=CKPT_EVERY, keep_checkpoints=KEEP))


def train_toy(workdir: str, num_steps: int, *, sleep: float = 0.0, num_devices: int = 8,
              mesh_shape=(1, -1, 1, 1), preset: str = "fsdp"):
    """The toy job on the first `num_devices` devices, stopping after `num_steps` of a NUM_STEPS
    schedule; `sleep` seconds per example read (so a run lasts long enough to be killed)."""
    def slow(example, rng):
        time.sleep(sleep)
        return example

    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:num_devices])
    batches = pipeline.make_batches(ToySource(), batch_size=8, seed=0, transform=slow if sleep else None)
    tx = train_lib.make_optimizer(lr=1e-2, warmup_steps=2, num_steps=NUM_STEPS)
    return train_lib.fit(stage="toy", workdir=workdir, mesh=mesh, preset=preset, init_fn=toy_init,
                         loss_fn=toy_loss, tx=tx, batches=batches, stage_config=stage_config(num_steps),
                         rng=jax.random.key(0))


def _metrics(workdir):
    """The complete lines of metrics.jsonl (a child may be writing one), without the wall-clock field."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return [{"step": 0}]
    with open(path) as f:
        lines = [l for l in f if l.endswith("\n")]
    return [{k: v for k, v in json.loads(l).items() if k != "steps_per_sec"} for l in lines] or [{"step": 0}]


def _steps(workdir):
    """Finished checkpoint steps, read from the folder names (no manager: it could touch saves in flight)."""
    folder = os.path.join(workdir, "toy")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def _restore(workdir, num_devices=8, mesh_shape=(1, -1, 1, 1), preset="fsdp", step=None):
    """(state, data position) of a toy checkpoint, restored onto a mesh of `num_devices`."""
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:num_devices])
    tx = train_lib.make_optimizer(lr=1e-2, warmup_steps=2, num_steps=NUM_STEPS)
    abstract, shardings = train_lib.state_shardings(toy_init, tx, mesh, preset, jax.random.key(0))
    ckpt = Checkpointer(os.path.join(workdir, "toy"), use_async=False)
    try:
        return ckpt.restore(abstract_like(abstract, shardings), step)
    finally:
        ckpt.close()


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(jax.device_get(x)), np.asarray(jax.device_get(y)))


def _start(workdir, *, sleep):
    """This file as a script: the toy job in a child process (8 CPU devices, like the tests)."""
    return subprocess.Popen([sys.executable, HERE, workdir, str(NUM_STEPS), str(sleep)], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, condition, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the child ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the child")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(workdir, final state) of one run of NUM_STEPS without faults."""
    workdir = str(tmp_path_factory.mktemp("toy_full"))
    return workdir, train_toy(workdir, NUM_STEPS)


# ---------------------------------------------------------------------------------------------
# kill -9, then SIGTERM, then to the end: the same log, data order and state as no faults
# ---------------------------------------------------------------------------------------------

def test_killed_and_preempted_run_equals_uninterrupted_run(uninterrupted, tmp_path):
    full_dir, full_state = uninterrupted
    workdir = str(tmp_path)

    # 1. kill -9 once a few checkpoints are complete: no chance to clean up or save.
    proc = _start(workdir, sleep=0.02)
    _wait_for(proc, lambda: _steps(workdir) and _steps(workdir)[-1] >= 8)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = _metrics(workdir)[-1]["step"]
    resume_from = _steps(workdir)[-1]
    assert 8 <= resume_from < NUM_STEPS and killed_at < NUM_STEPS

    # 2. Restart it, then SIGTERM (a preemption notice) mid-run: it saves after the current step
    # and exits with status 143, between logging steps or not.
    proc = _start(workdir, sleep=0.02)
    # Past its first new checkpoint, the child has restored and rewritten the log.
    _wait_for(proc, lambda: _steps(workdir)[-1] >= resume_from + CKPT_EVERY
              and _metrics(workdir)[-1]["step"] >= resume_from + 5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == train_lib.PREEMPTED_EXIT_CODE == 143, stderr[-3000:]
    assert "preempted (SIGTERM) after step" in stderr and "Traceback" not in stderr, stderr[-3000:]
    preempted_at = _steps(workdir)[-1]
    assert preempted_at >= resume_from + 5 and f"after step {preempted_at};" in stderr
    assert len(_steps(workdir)) <= KEEP

    # 3. Restart to the end (here, in this process).
    state = train_toy(workdir, NUM_STEPS)
    assert _metrics(workdir) == _metrics(full_dir)  # losses, norms and id_sum: same data, same order
    assert [m["step"] for m in _metrics(workdir)] == list(range(LOG_EVERY, NUM_STEPS + 1, LOG_EVERY))
    _assert_trees_equal(state, full_state)
    restored, data = _restore(workdir)
    _assert_trees_equal(restored, full_state)
    assert data == _restore(full_dir)[1] == {"next_index": NUM_STEPS}
    assert _steps(workdir) == _steps(full_dir) == [NUM_STEPS - CKPT_EVERY, NUM_STEPS]  # newest KEEP


def test_ctrl_c_saves_like_sigterm(tmp_path):
    """SIGINT (Ctrl-C) saves after the current step and exits 130, as SIGTERM does with 143."""
    from pixeldance import checkpoint as ckpt_lib
    workdir = str(tmp_path)
    proc = _start(workdir, sleep=0.02)
    _wait_for(proc, lambda: _metrics(workdir)[-1]["step"] >= CKPT_EVERY + 2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted (SIGINT) after step" in stderr and "Traceback" not in stderr, stderr[-3000:]
    stopped_at = _steps(workdir)[-1]
    assert f"after step {stopped_at};" in stderr and stopped_at > CKPT_EVERY
    assert ckpt_lib.verify(os.path.join(workdir, "toy", str(stopped_at))) is None


def test_torn_log_line_is_dropped_on_resume(tmp_path):
    """A kill mid-write leaves half a line at the end of metrics.jsonl; the restart drops it."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"stage": "toy", "step": 2, "loss": 1.0}\n{"stage": "other", "step": 9}\n{"stage": "toy", "st')
    writer = train_lib.MetricWriter(str(tmp_path), "toy")
    writer.truncate_after(2)
    writer.close()
    assert path.read_text() == '{"stage": "toy", "step": 2, "loss": 1.0}\n{"stage": "other", "step": 9}\n'


# ---------------------------------------------------------------------------------------------
# Restore onto another mesh: 8 -> 4 -> 2 devices, and another preset
# ---------------------------------------------------------------------------------------------

def test_checkpoint_restores_onto_smaller_meshes(uninterrupted, tmp_path):
    full_dir, full_state = uninterrupted
    workdir = str(tmp_path)
    runs = [  # (devices, mesh, preset, train up to step)
        (8, (1, -1, 1, 1), "fsdp", 8),
        (4, (1, 2, 1, 2), "fsdp_tensor", 16),
        (2, (2, 1, 1, 1), "data", NUM_STEPS),
    ]
    previous = None
    for devices, mesh_shape, preset, steps in runs:
        if previous is not None:  # the last checkpoint, read onto this mesh, is the state as saved
            restored, data = _restore(workdir, devices, mesh_shape, preset)
            _assert_trees_equal(restored, previous)
            assert data == {"next_index": int(previous.step)}
            for leaf in jax.tree.leaves(restored):
                assert leaf.sharding.mesh.devices.size == devices
        previous = train_toy(workdir, steps, num_devices=devices, mesh_shape=mesh_shape, preset=preset)
        kernel = previous.params["params"]["hidden"]["kernel"]  # [16, 32] ('embed', 'mlp')
        assert kernel.sharding.mesh.devices.size == devices
        assert tuple(kernel.sharding.spec) == {"fsdp": ("fsdp", None), "fsdp_tensor": ("fsdp", "tensor"),
                                               "data": (None, None)}[preset]
    # Training went on from each restored step on the new mesh: same data order, and the same
    # numbers up to the reduction order of another device count.
    got, want = _metrics(workdir), _metrics(full_dir)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    assert [m["id_sum"] for m in got] == [m["id_sum"] for m in want]
    np.testing.assert_allclose([m["loss"] for m in got], [m["loss"] for m in want], rtol=1e-4)
    for x, y in zip(jax.tree.leaves(previous), jax.tree.leaves(full_state)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Non-finite gradients with a finite loss, at a checkpoint step that is not a logging step
# ---------------------------------------------------------------------------------------------

@jax.custom_vjp
def _poison_grad(x, bad):
    """Identity forward; the gradient is NaN where `bad` (so the loss stays finite)."""
    return x


_poison_grad.defvjp(lambda x, bad: (x, bad),
                    lambda bad, g: (jnp.where(bad > 0, jnp.nan, g), jnp.zeros_like(bad)))


def test_non_finite_gradients_stop_before_the_checkpoint(tmp_path):
    tx = train_lib.make_optimizer(lr=0.1, warmup_steps=1, num_steps=8)

    def loss_fn(params, batch, rng):
        return jnp.sum(jnp.square(_poison_grad(params["w"], batch["bad"]) - 0.5)), {}

    def batches():
        for step in range(1, 9):
            yield {"bad": np.float32(step == 3)}

    params = {"w": jnp.ones((4,))}
    state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                 ema_params=params)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), use_async=False)
    writer = train_lib.MetricWriter(str(tmp_path), "toy")
    with pytest.raises(train_lib.NonFiniteError) as err:
        # Logs every 5 steps, saves every 2: step 4 saves without logging, and must check first.
        train_lib.train_loop(stage="toy", state=state, step_fn=jax.jit(train_lib.make_train_step(loss_fn, tx, 0.9)),
                             batches=batches(), to_device=lambda b: b, checkpointer=ckpt, writer=writer,
                             num_steps=8, log_every=5, ckpt_every=2, rng=jax.random.key(0))
    message = str(err.value)
    assert "non-finite grad_norm by step 4" in message and "loss" not in message.split("by step")[0], message
    assert "Last good checkpoint: step 2" in message and ckpt.directory in message, message
    assert ckpt.all_steps() == [2]
    restored, _ = ckpt.restore(abstract_like(state, jax.tree.map(lambda x: x.sharding, state)))
    assert np.all(np.isfinite(np.asarray(restored.params["w"])))
    ckpt.close()
    writer.close()


# ---------------------------------------------------------------------------------------------
# Retention
# ---------------------------------------------------------------------------------------------

def test_retention_keeps_newest_n(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=3)
    state = {"w": jnp.arange(4.0)}
    for step in range(1, 8):
        ckpt.save(step, jax.tree.map(lambda x: x + step, state), {"next_index": step})
    ckpt.wait()
    assert ckpt.all_steps() == [5, 6, 7]
    assert sorted(os.listdir(tmp_path)) == ["5", "6", "7"]  # older ones deleted, no leftovers
    restored, data = ckpt.restore(abstract_like(state, jax.tree.map(lambda x: x.sharding, state)))
    np.testing.assert_array_equal(restored["w"], np.arange(4.0) + 7)
    assert data == {"next_index": 7}
    ckpt.close()


def test_one_process_saves_replicated_arrays_without_compiling(tmp_path):
    """Replicated on the 8 devices, each array is written from one device: Orbax's replica-parallel
    default would jit a slice per array and device at every save (88 compiles per runlocal DiT
    save). Restores equal."""
    mesh = sharding.make_mesh((-1, 1, 1, 1))
    # Leading axes divisible by the 8 replicas: what Orbax's default would split.
    state = jax.device_put({"w": jnp.arange(64.0).reshape(16, 4), "b": jnp.ones(64)}, sharding.replicated(mesh))
    jax.block_until_ready(state)
    compiles = []
    listener = lambda event, *args, **kw: compiles.append(event) if "backend_compile" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        ckpt = Checkpointer(str(tmp_path))
        ckpt.save(1, state, {"next_index": 1})
        ckpt.wait()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [], compiles
    restored, _ = ckpt.restore(abstract_like(state, jax.tree.map(lambda x: x.sharding, state)))
    np.testing.assert_array_equal(restored["w"], np.arange(64.0).reshape(16, 4))
    ckpt.close()


if __name__ == "__main__":  # the child process of the kill / preemption test
    _workdir, _steps_arg, _sleep = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    train_toy(_workdir, _steps_arg, sleep=_sleep)
