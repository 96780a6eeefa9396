"""Scaling out: meshes over slices, the replication check, golden parameter shardings per preset,
two processes training like one, and the compile-ahead planner.

The golden file `tests/golden/dit_mu_shardings.json` holds the mesh axes of every parameter of
the `mu` DiT (text encoder included) under each preset. After an intended change to a model's
logical names or to the rules, regenerate it and review the diff:

    PIXELDANCE_UPDATE_GOLDEN=1 python -m pytest tests/test_scale.py -k golden

The two-process test runs this file as a script (`python tests/test_scale.py WORKDIR`), twice,
with a coordinator on 127.0.0.1.
"""
import dataclasses
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # test_train's helpers, also when this file runs as a script

from pixeldance import build, configs, sharding, train_lib  # noqa: E402
from pixeldance import workdir as workdir_lib  # noqa: E402
from pixeldance.tools import plan  # noqa: E402
from pixeldance.trainers import dit as dit_trainer  # noqa: E402
import test_train  # noqa: E402

GOLDEN = os.path.join(HERE, "golden", "dit_mu_shardings.json")
# One mesh per preset, each with the axes the preset uses larger than 1.
GOLDEN_MESHES = {"data": (8, 1, 1, 1), "fsdp": (2, 4, 1, 1), "fsdp_tensor": (2, 2, 1, 2),
                 "fsdp_context": (2, 2, 2, 1), "fsdp_context_params": (2, 2, 2, 1)}


# ---------------------------------------------------------------------------------------------
# Meshes: -1 auto-fill, and ICI x DCN over slices
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What mesh construction reads of a device, for layouts over slices this host does not have."""
    id: int
    slice_index: int
    process_index: int = 0
    platform: str = "cpu"
    device_kind: str = "cpu"


def test_make_mesh_auto_fill_and_errors():
    assert dict(sharding.make_mesh((2, -1, 1, 1)).shape) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
    for shape, message in [((3, -1, 1, 1), "does not divide"), ((-1, -1, 1, 1), "at most one -1"),
                           ((2, 2, 1, 1), "needs 4 devices"), ((1, -1, 1), "must have 4 entries")]:
        with pytest.raises(ValueError, match=message):
            sharding.make_mesh(shape)


def test_hybrid_mesh_puts_each_slice_in_a_block():
    devices = [FakeDevice(id=i, slice_index=i // 4) for i in range(16)]  # 4 slices of 4
    grid = sharding.device_grid((1, 2, 1, 2), devices, dcn_shape=(2, 2, 1, 1))
    assert grid.shape == (2, 4, 1, 2)
    for (d, f, c, t), dev in np.ndenumerate(grid):
        assert dev.slice_index == 2 * d + f // 2  # DCN index outermost on each axis, ICI inside
    # Unspecified, several slices go data parallel; -1 counts slices.
    assert sharding.device_grid((1, -1, 1, 1), devices).shape == (4, 4, 1, 1)
    assert sharding.device_grid((1, 4, 1, 1), devices, dcn_shape=(1, -1, 1, 1)).shape == (1, 16, 1, 1)
    with pytest.raises(ValueError, match=r"dcn_shape \(2, 1, 1, 1\) needs 2 slices, have 4"):
        sharding.device_grid((1, -1, 1, 1), devices, dcn_shape=(2, 1, 1, 1))


def test_hybrid_mesh_on_forced_host_devices():
    """One CPU process: its 8 devices stand in for 2 slices of 4, in id order."""
    mesh = sharding.make_mesh((1, 2, 1, 2), dcn_shape=(1, 2, 1, 1))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "context": 1, "tensor": 2}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)[0, :, 0, :]
    assert sorted(ids[:2].ravel()) == [0, 1, 2, 3] and sorted(ids[2:].ravel()) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="-1 counts slices"):
        sharding.make_mesh((1, -1, 1, 1), dcn_shape=(-1, 1, 1, 1))


# ---------------------------------------------------------------------------------------------
# The replication check
# ---------------------------------------------------------------------------------------------

def _abstract(**shapes):
    return {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}


def test_check_fsdp_refuses_mostly_replicated_parameters():
    mesh = sharding.make_mesh((1, 8, 1, 1))
    fsdp = sharding.NamedSharding(mesh, sharding.P("fsdp"))
    repl = sharding.replicated(mesh)
    params = _abstract(big_odd=(1000, 12), small=(64, 8), bias=(12,))
    shardings = dict(big_odd=repl, small=fsdp, bias=repl)  # e.g. a width of 12 on 8 devices
    with pytest.raises(ValueError) as err:
        sharding.check_fsdp(params, shardings, mesh, "fsdp")
    message = str(err.value)
    assert "\n" not in message and "replicates 96% of the parameter bytes" in message, message
    assert "8-way 'fsdp' axis" in message and message.index("big_odd [1000, 12]") < message.index("bias [12]")
    # Fine: mostly sharded, a lower bar met, no fsdp in the preset, or a 1-device fsdp axis.
    sharding.check_fsdp(params, dict(shardings, big_odd=fsdp), mesh, "fsdp")
    sharding.check_fsdp(params, shardings, mesh, "fsdp", max_replicated=0.97)
    sharding.check_fsdp(params, shardings, mesh, "data")
    sharding.check_fsdp(params, shardings, sharding.make_mesh((8, 1, 1, 1)), "fsdp")


def test_fit_refuses_a_mostly_replicated_fsdp_run(tmp_path):
    """The trainers' shared entry point checks before it allocates anything."""
    from flax import linen as nn
    mesh = sharding.make_mesh((1, 8, 1, 1))
    init_fn = lambda rng: {"params": {"w": nn.Partitioned(jnp.zeros((100, 12)), ("mlp", "embed"))}}
    with pytest.raises(ValueError, match=r"replicates 100% .* largest: params/w \[100, 12\]"):
        train_lib.fit(stage="odd", workdir=str(tmp_path), mesh=mesh, preset="fsdp", init_fn=init_fn,
                      loss_fn=None, tx=train_lib.make_optimizer(lr=1.0, warmup_steps=1, num_steps=2),
                      batches=None, stage_config=None, rng=jax.random.key(0))
    assert not os.path.exists(tmp_path / "odd")


# ---------------------------------------------------------------------------------------------
# Golden parameter shardings of the mu DiT under each preset
# ---------------------------------------------------------------------------------------------

def _dit_param_shardings() -> dict:
    config = test_train._config({"dit.variant": "mu"})
    init_fn = test_train._dit_init_fn(config)
    boxed = jax.eval_shape(init_fn, jax.random.key(0))
    params = train_lib.strip_boxes(boxed)
    paths = [jax.tree_util.keystr(p, simple=True, separator="/")
             for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    out = {}
    for preset, shape in GOLDEN_MESHES.items():
        mesh = sharding.make_mesh(shape)
        specs = jax.tree.leaves(sharding.tree_shardings(mesh, boxed, preset))
        out[preset] = dict(mesh=list(shape), params={
            path: dict(shape=list(x.shape), spec=[list(a) if isinstance(a, tuple) else a for a in s.spec])
            for path, x, s in zip(paths, jax.tree.leaves(params), specs)})
        sharding.check_fsdp(params, sharding.tree_shardings(mesh, boxed, preset), mesh, preset)
    return out


def test_golden_parameter_shardings():
    got = _dit_param_shardings()
    if os.environ.get("PIXELDANCE_UPDATE_GOLDEN") == "1":
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump(got, f, indent=1, sort_keys=True)
            f.write("\n")
    with open(GOLDEN) as f:
        want = json.load(f)
    for preset in GOLDEN_MESHES:  # per preset and per parameter, so a failure names what moved
        assert got[preset]["mesh"] == want[preset]["mesh"]
        assert sorted(got[preset]["params"]) == sorted(want[preset]["params"]), preset
        moved = {k: (want[preset]["params"][k], v) for k, v in got[preset]["params"].items()
                 if v != want[preset]["params"][k]}
        assert not moved, f"{preset}: (golden, now) {moved}; if intended: PIXELDANCE_UPDATE_GOLDEN=1"
    # What the presets mean, on a few parameters.
    qkv = "params/dit/blocks/qkv/kernel"
    assert got["data"]["params"][qkv]["spec"] == [None] * len(got["data"]["params"][qkv]["shape"])
    assert "fsdp" in got["fsdp"]["params"][qkv]["spec"]
    assert {"fsdp", "tensor"} <= set(got["fsdp_tensor"]["params"][qkv]["spec"])
    assert got["fsdp_context"]["params"] == got["fsdp"]["params"]  # 'context' splits activations only
    # ... unless the parameters are split over it too: fsdp over every chip of fsdp x context.
    assert ["fsdp", "context"] in got["fsdp_context_params"]["params"][qkv]["spec"]


# ---------------------------------------------------------------------------------------------
# Two processes (4 CPU devices each, a localhost coordinator) train like one process of 8
# ---------------------------------------------------------------------------------------------

# test_train's DiT run exactly (2 x 4 mesh, batch 8, 4 steps): the single-process reference then
# compiles the same program as test_train's, which the session's compilation cache compiles once.
DIT = test_train.DIT_OVERRIDES
NUM_STEPS = DIT["train.num_steps"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env(port: int, process_id: int) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=4"]), JAX_PLATFORMS="cpu",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process_id))
    return env


def test_two_processes_train_like_one(tmp_path):
    multi, single = str(tmp_path / "two_processes"), str(tmp_path / "one_process")
    config = test_train._config(DIT)
    assert tuple(config.mesh.shape) == (2, 4, 1, 1)
    for workdir in (multi, single):
        test_train._write_latent_cache(config, workdir)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, multi], env=_worker_env(port, i), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    # Meanwhile, here: one process, 8 devices, the same (2, 4) mesh and global batches.
    state = dit_trainer.train_dit(config, single)
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    # Each host fed its 4 rows of each global batch of 8; the coordinator assembled them.
    assert "process 0 of 2, 4 local devices" in outs[0][0] and "process 1 of 2" in outs[1][0]
    got, want = test_train._metrics(multi, "dit"), test_train._metrics(single, "dit")
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, NUM_STEPS + 1))
    for key in ("loss", "grad_norm", "x0_mse", "param_norm"):
        np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want], rtol=2e-5, err_msg=key)
    # The checkpoint the two processes wrote together restores here, onto 8 devices (EMA only, sharded).
    ema, step = workdir_lib.load_ema_params(os.path.join(multi, "dit"), test_train._dit_init_fn(config),
                                            sharding.make_mesh((1, -1, 1, 1)))
    assert step == NUM_STEPS
    # atol 1e-6: in the zero-initialised output layers the first gradients are summation-order
    # noise, which Adam scales up to updates of about the learning rate (their values stay ~1e-7).
    for x, y in zip(jax.tree.leaves(ema), jax.tree.leaves(state.ema_params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def _worker(workdir: str):
    """One of the two processes: joins through JAX_COORDINATOR_ADDRESS (in `mesh_from_config`);
    its 4 devices are one slice of a (2 slices over DCN) x (4 over ICI) = (2, 4) mesh."""
    config = test_train._config(DIT)
    with config.unlocked():
        config.mesh.dcn_shape = (2, 1, 1, 1)
        config.mesh.shape = (1, -1, 1, 1)
    dit_trainer.train_dit(config, workdir)
    print(f"process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} local devices")


# ---------------------------------------------------------------------------------------------
# The planner
# ---------------------------------------------------------------------------------------------

def _plan_config(**overrides):
    config = configs.load_config(test_train.RUNLOCAL)
    return configs.override(config, **{"dit.variant": "mu", "mesh.shape": (2, -1, 1, 1), **overrides})


def test_plan_on_forced_host_devices():
    """8 forced CPU devices (this process's): bytes per device, FLOPs, fits. (The sampler is
    compiled in the TPU test below.)"""
    report = plan.plan(_plan_config(**{"plan.num_devices": 8, "plan.memory_gib": 1.0, "plan.sample": False}))
    assert report["num_devices"] == 8 and report["mesh"] == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
    d = report["per_device"]
    # fsdp over 4: about a quarter of the float32 parameters per device; AdamW keeps two copies.
    assert 0.25 <= d["params"] / (4 * report["num_params"]) < 0.3
    assert d["opt_state"] == pytest.approx(2 * d["params"], rel=0.01) and d["ema"] == d["params"]
    m = report["train"]["memory"]
    assert m["arguments"] > 0 and m["temporaries"] > 0 and m["peak"] < 2 ** 30
    assert m["aliased"] > 0  # the donated state is updated in place
    assert report["train"]["fits"] is True and "sample" not in report
    # 3x the forward of 8 samples of 3 x 2 x 2 tokens (analytic: XLA sees the scanned layers once).
    from pixeldance.models.dit import dit_flops_per_sample
    forward = dit_flops_per_sample(num_tokens=3 * 2 * 2, text_len=12, width=32, depth=2, mlp_ratio=2,
                                   patch_dim_in=4 * 33, patch_dim_out=4 * 16)
    assert report["train"]["model_flops"] == pytest.approx(3 * 8 * forward)
    text = plan.format_report(report)
    assert "train step (global batch 8)" in text and "fits in 1.00 GiB" in text
    with pytest.raises(RuntimeError, match="needs a fresh process"):
        plan.plan(_plan_config(**{"plan.num_devices": 64}))


WAN_RUNLOCAL = os.path.join(os.path.dirname(HERE), "experiments", "wan_pixeldance.py") + ":runlocal"


def _wan_plan_config(tmp_path, **overrides):
    """experiments/wan_pixeldance.py:runlocal on a tiny Wan DiT given by a converted folder's
    config.json alone (no weights: the planner must not read them) and a tiny umT5 by name."""
    from pixeldance.models import wan_dit
    folder = tmp_path / "wan_dit"
    folder.mkdir(exist_ok=True)
    fields = dict(wan_dit.config("tiny"), in_channels=16, out_channels=16)  # the Wan VAE's 16 channels
    (folder / "config.json").write_text(json.dumps(dict(network=wan_dit.NETWORK, dit=fields, dtype="float32")))
    return configs.override(configs.load_config(WAN_RUNLOCAL), **{
        "dit.init_from": str(folder), "plan.text_arch": "umt5-mu", "plan.num_devices": 8,
        "plan.memory_gib": 1.0, "plan.sample": False, **overrides})


def test_plan_wan_fine_tunes_full_and_lora_without_weights(tmp_path):
    """The trainer's two Wan fine-tunes, planned from architectures only: full (every weight in
    the train state) and LoRA (adapters, their AdamW state and EMA in the state; the base a
    frozen, non-donated fourth argument, sharded like the full fine-tune's parameters)."""
    full = plan.plan(_wan_plan_config(tmp_path))
    lora = plan.plan(_wan_plan_config(tmp_path, **{"train.lora_rank": 2}))
    assert full["mode"] == "full" and lora["mode"] == "lora rank 2"
    assert full["latent"] == lora["latent"] == [3, 4, 4, 16]  # 9 frames of 32 x 32, the Wan VAE's 4x8x8
    f, l = full["per_device"], lora["per_device"]
    assert full["num_frozen_params"] == 0 and f["frozen"] == 0
    # The frozen base is the full model, held as the full fine-tune holds its parameters.
    assert lora["num_frozen_params"] == full["num_params"] and l["frozen"] == f["params"]
    # What trains is the adapters only: a small fraction of the full fine-tune's bytes.
    assert lora["num_params"] < full["num_params"] / 10
    assert l["params"] + l["opt_state"] + l["ema"] < (f["params"] + f["opt_state"] + f["ema"]) / 4
    assert l["opt_state"] == pytest.approx(2 * l["params"], rel=0.01) and l["ema"] == l["params"]
    fm, lm = full["train"]["memory"], lora["train"]["memory"]
    # The base is an argument of the LoRA step, and not donated: only the state is updated in place.
    assert lm["arguments"] >= l["frozen"] + l["params"] + l["opt_state"] + l["ema"]
    assert lm["aliased"] < l["frozen"] and lm["aliased"] < fm["aliased"] / 4
    assert lora["train"]["model_flops"] == pytest.approx(2 / 3 * full["train"]["model_flops"])
    assert full["train"]["fits"] is True and lora["train"]["fits"] is True
    text = plan.format_report(lora)
    assert "lora rank 2" in text and "frozen float32 base" in text
    # A bfloat16 base (config.train.lora_base_dtype) halves the frozen bytes, nothing else.
    half = plan.plan(_wan_plan_config(tmp_path, **{"train.lora_rank": 2, "train.lora_base_dtype": "bfloat16"}))
    h = half["per_device"]
    assert h["frozen"] == l["frozen"] // 2 and (h["params"], h["opt_state"]) == (l["params"], l["opt_state"])
    assert half["train"]["memory"]["arguments"] < lm["arguments"] - l["frozen"] // 3
    assert half["frozen_dtype"] == "bfloat16" and "frozen bfloat16 base" in plan.format_report(half)
    # A named architecture plans LoRA without any folder; the trainer still needs the weights.
    named = configs.override(configs.load_config(WAN_RUNLOCAL), **{"dit.wan_config": "wan2.1-t2v-1.3b",
                                                                   "train.lora_rank": 64})
    assert build.dit_lora(named, need_weights=False)["rank"] == 64
    with pytest.raises(ValueError, match="trains adapters over pretrained weights"):
        build.dit_lora(named)
    assert plan.latent_shape(configs.override(named, **{"plan.height": 480, "plan.width": 832,
                                                        "data.num_frames": 81})) == (21, 60, 104, 16)


@pytest.mark.parametrize("arch,dtype", [("t5-mu", "bfloat16"), ("umt5-mu", "float32"), ("clip-mu", "float32")])
def test_plan_text_encoder_by_name(arch, dtype):
    """config.plan.part='text_encoder': the frozen encoder's forward (TextEncoder.embed) on the
    cache stage's batch of prompts, its parameters sharded over fsdp x tensor by logical names."""
    from pixeldance.models import text_encoder as text_encoder_lib
    config = configs.override(configs.load_config(test_train.RUNLOCAL), **{
        "plan.part": "text_encoder", "plan.text_arch": arch, "plan.num_devices": 8, "plan.memory_gib": 1.0,
        "mesh.shape": (1, 4, 1, 2), "mesh.preset": "fsdp_tensor", "text.encoder_dtype": dtype})
    report = plan.plan(config)
    kind, fields, S = plan.text_arch(config)
    assert report["kind"] == kind == arch.split("-")[0] and S == (77 if kind == "clip" else 512)
    assert report["dtype"] == dtype and "train" not in report
    total = sum(math.prod(x.shape) for x in text_encoder_lib.abstract_params(kind, fields).values())
    assert report["num_params"] == total
    # Sharded over 8 devices: well under the whole on each (small tables stay replicated); held
    # in the compute dtype, as the cache stage holds them (bfloat16: half the bytes).
    assert report["per_device"]["params"] < (2 if dtype == "bfloat16" else 4) * total / 2
    assert report["per_device"]["params"] > (2 if dtype == "bfloat16" else 4) * total / 8
    q = report["forward"]
    assert q["batch"] == config.cache.batch_size and q["length"] == S and q["fits"] is True
    assert q["memory"]["arguments"] >= report["per_device"]["params"]
    assert q["model_flops"] == pytest.approx(q["batch"] * plan.text_encoder_flops(kind, fields, S))
    assert f"forward (global batch {q['batch']} of {S} tokens)" in plan.format_report(report)


def test_plan_mode_compiles_for_a_tpu_topology(tmp_path, python_runner):
    """`--config.mode=plan` for a v5p 2x2x1 slice (4 chips), with libtpu; without it, a clear error."""
    args = ["-m", "pixeldance.main", f"--config={test_train.RUNLOCAL}", "--config.mode=plan",
            f"--workdir={tmp_path}", "--config.dit.variant=mu", "--config.mesh.shape=(1,-1,1,1)",
            "--config.plan.topology=v5p:2x2x1"]
    proc = python_runner(*args)
    if importlib.util.find_spec("libtpu") is None:
        assert proc.returncode != 0 and "pip install -e '.[tpu-plan]'" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(tmp_path / "plan.json") as f:
        report = json.load(f)
    assert report["target"] == "4 x TPU v5 (v5p:2x2x1)" and report["mesh"]["fsdp"] == 4
    assert report["memory_limit"] == 95 * 2 ** 30
    for part in ("train", "sample"):
        assert report[part]["fits"] is True and report[part]["memory"]["temporaries"] > 0
    assert report["sample"]["branches"] == 3 and report["sample"]["model_flops"] > 0  # image_guidance 1.5
    assert "fits in 95.00 GiB" in proc.stdout and "sampler (global batch 4" in proc.stdout


if __name__ == "__main__":  # one process of the two-process test
    _worker(sys.argv[1])
