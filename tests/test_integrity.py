"""Issue 17's attack suite, checkpoints: damaged, truncated, unsealed and junk checkpoint folders.

Every checkpoint carries a manifest of its files' sizes and SHA-256 (`pixeldance.checkpoint`);
restores use the newest one that verifies and name each one passed over; the trainer renames
rejected folders to `<step>.rejected`. Unit tests on a toy state, then the main job's workdir
sampled and resumed with its newest DiT checkpoint damaged.
"""
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixeldance import checkpoint as ckpt_lib
from pixeldance import train_lib
from pixeldance.checkpoint import MANIFEST, Checkpointer, abstract_like

STATE = {"w": jnp.arange(4096, dtype=jnp.float32), "b": {"c": jnp.ones((8, 8))}}


def _save(directory, *steps, use_async=True, keep=5):
    ckpt = Checkpointer(directory, keep=keep, use_async=use_async)
    for step in steps:
        ckpt.save(step, jax.tree.map(lambda x: x + step, STATE), {"next_index": step})
    ckpt.close()


def _restore(directory, *, writer=False):
    ckpt = Checkpointer(directory, use_async=False, cleanup_tmp=writer)
    try:
        state, data = ckpt.restore(abstract_like(STATE, jax.tree.map(lambda x: x.sharding, STATE)))
        return float(state["w"][0]), data, ckpt.latest_step()
    finally:
        ckpt.close()


def _largest_file(step_dir):
    files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns if n != MANIFEST]
    return max(files, key=os.path.getsize)


def _flip_middle(path, nbytes=4096):
    size = os.path.getsize(path)
    start = max(0, size // 2 - nbytes // 2)
    with open(path, "r+b") as f:
        f.seek(start)
        data = f.read(min(nbytes, size))
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))


def _skipped(caplog):
    return [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()
            or "failed verification" in r.getMessage()]


def test_every_save_is_sealed_with_its_files_checksums(tmp_path):
    _save(str(tmp_path), 1, 2)
    for step in (1, 2):
        step_dir = str(tmp_path / str(step))
        manifest = json.load(open(os.path.join(step_dir, MANIFEST)))
        listed = set(manifest["files"])
        on_disk = {os.path.relpath(os.path.join(r, n), step_dir) for r, _, ns in os.walk(step_dir) for n in ns}
        assert listed == on_disk - {MANIFEST} and len(listed) > 5
        assert manifest["bytes"] == sum(os.path.getsize(os.path.join(step_dir, p)) for p in listed)
        assert ckpt_lib.verify(step_dir) is None
    assert not [n for n in os.listdir(tmp_path / "2") if n.endswith(".tmp")]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path, caplog, damage):
    directory = str(tmp_path)
    _save(directory, 1, 2)
    target = _largest_file(os.path.join(directory, "2"))
    if damage == "flip":
        _flip_middle(target)
    elif damage == "truncate":
        os.truncate(target, os.path.getsize(target) // 2)
    elif damage == "delete":
        os.remove(target)
    else:  # the manifest itself garbled
        with open(os.path.join(directory, "2", MANIFEST), "w") as f:
            f.write("{not json")
    with caplog.at_level(logging.WARNING):
        first, data, step = _restore(directory)
    assert (first, data, step) == (1.0, {"next_index": 1}, 1)
    reason = {"flip": "does not match its checksum", "truncate": "bytes, its manifest",
              "delete": "missing file", "manifest": "unreadable manifest"}[damage]
    lines = _skipped(caplog)
    assert len(lines) == 1 and os.path.join(directory, "2") in lines[0] and reason in lines[0], lines


def test_junk_folder_is_set_aside_by_the_trainer_and_saves_go_on(tmp_path, caplog):
    """A junk `99/` would make Orbax skip every later save (it orders by folder number)."""
    directory = str(tmp_path)
    _save(directory, 1, 2)
    os.makedirs(os.path.join(directory, "99"))
    open(os.path.join(directory, "99", "notes.txt"), "w").write("mine")
    with caplog.at_level(logging.WARNING):
        assert _restore(directory)[2] == 2  # a reader skips it, touching nothing
    assert "not a checkpoint" in _skipped(caplog)[0] and os.path.isdir(os.path.join(directory, "99"))
    writer = Checkpointer(directory, keep=5, cleanup_tmp=True)
    assert writer.latest_step() == 2
    assert writer.save(3, STATE, {"next_index": 3})
    writer.close()
    assert sorted(os.listdir(directory)) == ["1", "2", "3", "99.rejected"]
    assert open(os.path.join(directory, "99.rejected", "notes.txt")).read() == "mine"  # nothing lost
    assert _restore(directory)[2] == 3


def test_unsealed_newest_checkpoint_is_not_trusted(tmp_path, caplog):
    """A run killed after Orbax finished a save but before its manifest: the older sealed one is
    used; in a folder where no checkpoint has a manifest (written before manifests) the newest is."""
    directory = str(tmp_path)
    _save(directory, 1, 2)
    os.remove(os.path.join(directory, "2", MANIFEST))
    with caplog.at_level(logging.WARNING):
        assert _restore(directory)[2] == 1
    assert "no manifest (a run that ended before sealing it)" in _skipped(caplog)[0]
    os.remove(os.path.join(directory, "1", MANIFEST))
    assert _restore(directory)[2] == 2  # legacy folder: used, with a warning


def test_no_usable_checkpoint_is_one_line_naming_each(tmp_path):
    directory = str(tmp_path)
    _save(directory, 1, 2)
    for step in (1, 2):
        _flip_middle(_largest_file(os.path.join(directory, str(step))))
    with pytest.raises(FileNotFoundError) as err:
        _restore(directory)
    message = str(err.value)
    assert "\n" not in message and "no usable checkpoint" in message
    assert "step 2: " in message and "step 1: " in message and "checksum" in message


def test_async_saves_are_sealed_when_the_next_one_starts(tmp_path):
    directory = str(tmp_path)
    ckpt = Checkpointer(directory, keep=5)
    assert ckpt.latest_step() is None
    ckpt.save(1, STATE, {})
    ckpt.save(2, STATE, {})  # waits for save 1, then seals it
    assert os.path.isfile(os.path.join(directory, "1", MANIFEST))
    ckpt.wait()
    assert os.path.isfile(os.path.join(directory, "2", MANIFEST)) and ckpt.latest_step() == 2
    ckpt.close()


def test_training_seals_a_finished_save_before_the_next_one(tmp_path):
    """The loop seals an asynchronous save as soon as it has finished (Checkpointer.poll), so a
    kill between two saves finds the newest one trusted."""
    import time
    directory = str(tmp_path / "ckpt")
    tx = train_lib.make_optimizer(lr=1e-2, warmup_steps=1, num_steps=8)
    params = {"w": jnp.ones((4,))}
    state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                 ema_params=params)
    step_fn = jax.jit(train_lib.make_train_step(lambda p, b, r: (jnp.sum(p["w"] ** 2), {}), tx, 0.9))
    seen = []

    def slow_step(state, batch, rng):
        time.sleep(0.3)  # the async write of step 2 finishes during steps 3-4
        seen.append(os.path.isfile(os.path.join(directory, "2", MANIFEST)))
        return step_fn(state, batch, rng)

    ckpt = Checkpointer(directory)
    writer = train_lib.MetricWriter(str(tmp_path), "toy")
    train_lib.train_loop(stage="toy", state=state, step_fn=slow_step, batches=iter([{}] * 5),
                         to_device=lambda b: b, checkpointer=ckpt, writer=writer, num_steps=5,
                         log_every=5, ckpt_every=2, rng=jax.random.key(0))
    writer.close()
    ckpt.close()
    assert seen[3] and not seen[1], seen  # step 4 (before the save of step 4) saw step 2 sealed


def test_non_finite_stop_names_a_checkpoint_that_verifies(tmp_path):
    """The damaged newest checkpoint (4) is not named as the last good one: step 2 is."""
    directory = str(tmp_path / "ckpt")
    tx = train_lib.make_optimizer(lr=1e-2, warmup_steps=1, num_steps=8)
    params = {"w": jnp.ones((4,))}
    state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                 ema_params=params)
    ckpt = Checkpointer(directory, use_async=False)
    for step in (2, 4):
        ckpt.save(step, state.replace(step=jnp.asarray(step, jnp.int32)), {})
    ckpt.close()
    _flip_middle(os.path.join(directory, "4", "_CHECKPOINT_METADATA"), 8)

    def loss_fn(p, batch, rng):
        return jnp.sum(p["w"]) * batch["x"], {}

    reader = Checkpointer(directory, use_async=False)
    writer = train_lib.MetricWriter(str(tmp_path), "toy")
    with pytest.raises(train_lib.NonFiniteError) as err:
        train_lib.train_loop(stage="toy", state=state.replace(step=jnp.asarray(4, jnp.int32)),
                             step_fn=jax.jit(train_lib.make_train_step(loss_fn, tx, 0.9)),
                             batches=iter([{"x": np.float32(np.nan)}] * 4), to_device=lambda b: b,
                             checkpointer=reader, writer=writer, num_steps=8, log_every=1, ckpt_every=2,
                             rng=jax.random.key(0))
    writer.close()
    reader.close()
    assert "Last good checkpoint: step 2 in" in str(err.value), str(err.value)


# ---------------------------------------------------------------------------------------------
# The main job's workdir: sampling and resuming with the newest DiT checkpoint damaged.
# ---------------------------------------------------------------------------------------------

def test_main_job_samples_and_resumes_past_a_damaged_checkpoint(runlocal_workdir, python_runner,
                                                                main_job_runner, tmp_path):
    workdir = str(tmp_path / "workdir")
    shutil.copytree(runlocal_workdir, workdir)
    dit = os.path.join(workdir, "dit")
    steps = sorted(int(d) for d in os.listdir(dit) if d.isdigit())
    newest, older = steps[-1], steps[-2]
    _flip_middle(_largest_file(os.path.join(dit, str(newest))))

    out = str(tmp_path / "video.mp4")
    proc = python_runner("-m", "pixeldance.sample", f"--workdir={workdir}", "--prompt=a red circle",
                         "--steps=2", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = [line for line in proc.stderr.splitlines() if "skipping checkpoint" in line]
    assert skipped and f"{os.path.join(dit, str(newest))}:" in skipped[0] and "checksum" in skipped[0]
    assert os.path.exists(out)

    os.makedirs(os.path.join(dit, "99"))  # and a junk folder above everything
    proc = main_job_runner(workdir, "--config.mode=train_dit")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "renamed to" in proc.stderr and "99.rejected" in proc.stderr
    names = sorted(os.listdir(dit))
    assert f"{newest}.rejected" in names and "99.rejected" in names, names
    assert sorted(int(d) for d in names if d.isdigit()) == [older, newest]  # retrained from `older`
    assert ckpt_lib.verify(os.path.join(dit, str(newest))) is None
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        dit_steps = [json.loads(line)["step"] for line in f if '"stage": "dit"' in line]
    assert dit_steps[-2:] == [older, newest] and dit_steps.count(newest) == 1  # its old line replaced


# ---------------------------------------------------------------------------------------------
# Failed writes and the main job's one-line errors.
# ---------------------------------------------------------------------------------------------

def test_disk_full_is_one_error_naming_the_space(tmp_path, monkeypatch):
    ckpt = Checkpointer(str(tmp_path), use_async=False)

    def full(*args, **kwargs):
        os.makedirs(tmp_path / "3.orbax-checkpoint-tmp-123" / "state")  # what Orbax leaves behind
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt._manager, "save", full)
    with pytest.raises(ckpt_lib.CheckpointWriteError) as err:
        ckpt.save(3, STATE, {})
    message = str(err.value)
    assert message.startswith(f"checkpoint step 3 could not be written to {tmp_path}: disk full (")
    assert "GB free, the checkpoint needs about 0.02 MB" in message and "\n" not in message
    assert os.listdir(tmp_path) == []
    # A writer thread still running when the error surfaced makes its temporary folder late:
    # close() (after Orbax's threads end) removes it too. Seen in CI before close() did.
    close = ckpt._manager.close
    monkeypatch.setattr(ckpt._manager, "close",
                        lambda: os.makedirs(tmp_path / "3.orbax-checkpoint-tmp-456" / "state") or close())
    ckpt.close()  # after a failure: releases Orbax, raises nothing more
    assert os.listdir(tmp_path) == []


# A 200 kB file-size limit (SIGXFSZ ignored: writes past it fail with EFBIG), so the DiT
# checkpoint's data files cannot be written: a write error injected without mounting a disk. Set
# in a fresh interpreter that then execs the job (no fork of this multithreaded process).
LIMITED = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); "
           "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


def test_failed_checkpoint_write_stops_training_with_the_cause_last(runlocal_workdir, python_runner, tmp_path):
    from conftest import RUNLOCAL
    workdir = str(tmp_path / "workdir")
    shutil.copytree(runlocal_workdir, workdir)
    dit = os.path.join(workdir, "dit")
    before = sorted(os.listdir(dit))
    proc = python_runner("-c", LIMITED, "-m", "pixeldance.main", f"--config={RUNLOCAL}", f"--workdir={workdir}",
                         "--config.mode=train_dit", "--config.train.num_steps=8")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.rstrip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint step 6 could not be written to {dit}: ") and "File too large" in last, last
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]  # the writer threads' are held back (checkpoint.py)
    assert sorted(os.listdir(dit)) == before  # no temporary folder left, nothing else touched
    assert all(ckpt_lib.verify(os.path.join(dit, d)) is None for d in before)


@pytest.mark.parametrize("flag, line", [
    ("--config.train.num_stepz=1", "error: --config.train.num_stepz: 'num_stepz' Did you mean \"num_steps\""),
    ("--config.trian.num_steps=3", "error: --config.trian.num_steps: 'trian' Did you mean \"train\""),
    ("--config.train.num_steps=abc", "error: flag --config.train.num_steps=abc: invalid literal for int()"),
    ("--config=experiments/nope.py", "error: --config=experiments/nope.py: no such config file experiments/nope.py"),
    ("--config=experiments/shapes.py:runlocl", "error: flag --config=experiments/shapes.py:runlocl: Error whilst "
     "parsing config file: ValueError: unknown config argument 'runlocl'"),
    # Settings only the last stages read, refused before the VAE stage (the workdir is not made):
    ("--config.sample.shift=0", "error: config.sample.shift must be a finite number > 0, got 0.0"),
    ("--config.sample.text_to_video=imgae", "error: config.sample.text_to_video must be one of direct, "
     "first_frame, first_latent, image, got 'imgae'"),
    ("--config.cond.first_latent_weight=0", "error: config.cond.first_latent_weight must be > 0, got 0.0"),
    ("--config.cond.object_weight=-1", "error: config.cond.object_weight must be >= 0, got -1.0"),
    ("--config.dit.scan_unroll=0", "error: config.dit.scan_unroll must be an integer >= 1 (layers per loop "
     "iteration), got 0"),
    ("--config.dit.depth=-1", "error: config.dit.depth must be an integer >= 0 (0: the variant's), got -1"),
    ("--config.dit.attention_impl=flash", "error: unknown config.dit.attention_impl 'flash'; choose from "
     "('xla', 'dense', 'chunked', 'cudnn', 'splash') or '' (per backend)"),
])
def test_main_config_errors_are_one_line(python_runner, tmp_path, flag, line):
    from conftest import RUNLOCAL
    workdir = tmp_path / "wd"
    config = [] if flag.startswith("--config=") else [f"--config={RUNLOCAL}"]
    proc = python_runner("-m", "pixeldance.main", *config, f"--workdir={workdir}", flag)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(line), proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and not workdir.exists()


def test_main_names_a_garbled_workdir_file(runlocal_workdir, main_job_runner, tmp_path):
    workdir = str(tmp_path / "workdir")
    shutil.copytree(runlocal_workdir, workdir, ignore=shutil.ignore_patterns("dit"))
    path = os.path.join(workdir, "latent_stats.json")
    with open(path, "w") as f:
        f.write('{"mean": [0.0, 1')
    proc = main_job_runner(workdir, "--config.mode=train_dit")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.rstrip().splitlines()[-1]
    assert last.startswith(f"error: latent statistics {path} is unreadable (JSONDecodeError"), last
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# Latent caches: per-shard checksums, checked when the cache stage decides to keep a cache.
# ---------------------------------------------------------------------------------------------

def test_damaged_cache_shard_is_found_and_only_it_is_rewritten(tmp_path):
    from pixeldance.data import latent_cache
    from test_latent_cache import _arrays, _records
    z, z_last, tokens, captions = _arrays(n=12)
    full = _records(z, z_last, tokens, captions)
    out, info = str(tmp_path / "cache"), dict(vae_step=1)
    meta = latent_cache.build(out, count=12, num_shards=4, encode_range=full, info=info)
    assert all(len(s["sha256"]) == 64 for s in meta["shards"])
    original = {s["file"]: open(os.path.join(out, s["file"]), "rb").read() for s in meta["shards"]}
    assert latent_cache.verify(out, meta) == []

    damaged = meta["shards"][2]["file"]
    _flip_middle(os.path.join(out, damaged), 64)  # same size: only the checksum can tell
    assert latent_cache.verify(out, meta) == [(damaged, "does not match its checksum")]
    assert latent_cache.salvage(out, meta, info, [damaged]) == 3
    encoded = []

    def counting(start, end):
        encoded.append((start, end))
        yield from full(start, end)

    rebuilt = latent_cache.build(out, count=12, num_shards=4, encode_range=counting, info=info)
    assert encoded == [(6, 9)]  # the damaged shard's records only
    assert rebuilt == meta and latent_cache.verify(out, rebuilt) == []
    assert {f: open(os.path.join(out, f), "rb").read() for f in original} == original
    assert not os.path.exists(out + ".partial")

    os.truncate(os.path.join(out, damaged), 10)
    assert latent_cache.verify(out, meta) == [(damaged, f"10 bytes, meta.json says {meta['shards'][2]['bytes']}")]


def test_dit_names_a_damaged_shard_before_training(tmp_path):
    """mode=train_dit on a cache whose shard was damaged after the cache stage: the DiT's reader
    checks the checksums first and stops with one line naming the shard, not at its first bad
    record mid-run (config.cache.verify_on_read=False: the reader's chunk hashes only)."""
    from pixeldance import configs
    from pixeldance.data import latent_cache
    from pixeldance.trainers import dit as dit_stage
    from test_latent_cache import _arrays, _records
    z, z_last, tokens, captions = _arrays(n=8)
    out = str(tmp_path / "cache")
    meta = latent_cache.build(out, count=8, num_shards=2, encode_range=_records(z, z_last, tokens, captions),
                              info=dict(vae_step=1))
    shard = os.path.join(out, meta["shards"][1]["file"])
    with open(shard, "r+b") as f:  # inside the first chunk's records: found only when one is read
        f.seek(200)
        data = f.read(16)
        f.seek(200)
        f.write(bytes(b ^ 0xFF for b in data))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = configs.load_config(os.path.join(repo, "experiments", "base.py") + ":runlocal")
    config.cache.path = out
    with pytest.raises(latent_cache.CacheError) as e:
        dit_stage.video_cache_source(config, str(tmp_path))
    assert str(e.value) == (f"latent cache damaged: {shard}: does not match its checksum (run the 'cache' "
                            f"stage: it rewrites only the damaged shards)")
    config.cache.verify_on_read = False
    source = dit_stage.video_cache_source(config, str(tmp_path))
    assert len(source) == 8
    with pytest.raises(latent_cache.CacheError, match="record 4 unreadable"):
        source[4]


def test_cache_stage_rewrites_a_garbled_shard_and_names_it(runlocal_workdir, main_job_runner, tmp_path):
    """Before: the cache stage kept a garbled shard ('keeping cache') and the DiT stopped on every rerun."""
    from pixeldance.data import latent_cache
    workdir = str(tmp_path / "workdir")
    shutil.copytree(runlocal_workdir, workdir, ignore=shutil.ignore_patterns("dit"))
    cache = os.path.join(workdir, "cache")
    meta = latent_cache.read_meta(cache)
    shard = os.path.join(cache, meta["shards"][0]["file"])
    original = open(shard, "rb").read()
    _flip_middle(shard, 256)
    proc = main_job_runner(workdir, "--config.mode=cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"latent cache: {shard}: does not match its checksum" in proc.stdout, proc.stdout[-2000:]
    assert "latent cache: rewriting 1 damaged file(s)" in proc.stdout
    assert latent_cache.verify(cache, latent_cache.read_meta(cache)) == []
    assert open(shard, "rb").read() == original  # encoded again, bit for bit


def test_damaged_converted_weights_are_refused_by_default(tmp_path):
    from pixeldance.models import weights
    directory = str(tmp_path / "net")
    weights.save(directory, {"network": "toy"}, {"params": {"w": np.arange(4096, dtype=np.float32)}})
    weights.load(directory, "toy", "made here")  # verifies
    _flip_middle(os.path.join(directory, weights.PARAMS), 16)  # same size, still valid safetensors
    with pytest.raises(weights.WeightsError) as err:
        weights.load(directory, "toy", "made here")
    assert str(err.value).startswith(f"{os.path.join(directory, weights.PARAMS)}: sha256 differs")
    assert "\n" not in str(err.value)
    weights.load(directory, "toy", "made here", verify=False)  # an explicit opt-out still reads it


@pytest.mark.parametrize("name, content, says", [
    ("latent_stats.json", None, "'std' must be positive and every value finite"),  # std 0: black videos before
    ("vae_model.json", '{"channels": [32, 6', "is unreadable (JSONDecodeError"),
])
def test_sampling_refuses_a_damaged_workdir_file_naming_it(runlocal_workdir, python_runner, tmp_path, name,
                                                           content, says):
    workdir = str(tmp_path / "workdir")
    shutil.copytree(runlocal_workdir, workdir, ignore=shutil.ignore_patterns("cache*", "samples"))
    path = os.path.join(workdir, name)
    if content is None:
        stats = json.load(open(path))
        stats["std"] = [0.0] * len(stats["std"])
        content = json.dumps(stats)
    with open(path, "w") as f:
        f.write(content)
    out = str(tmp_path / "video.mp4")
    proc = python_runner("-m", "pixeldance.sample", f"--workdir={workdir}", "--prompt=a red circle", f"--output={out}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.rstrip().splitlines()[-1]
    assert last.startswith("error: ") and path in last and says in last, last
    assert not os.path.exists(out) and not os.path.exists(out + ".tmp.mp4")
