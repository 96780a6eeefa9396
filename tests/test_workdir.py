"""The workdir module (latent statistics, model spec, config, EMA-only sharded loading) and the
build module (the one config reader: VAE, latent shapes, the task)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding

from pixeldance import build, configs, sharding, train_lib
from pixeldance import workdir as workdir_lib
from pixeldance.checkpoint import Checkpointer
from pixeldance.workdir import LatentStats

C = 16


def _stats(**kw):
    return LatentStats.from_moments(np.arange(C) * 0.5, np.linspace(0.0, 2.0, C), source="cache", num_videos=7, **kw)


def test_latent_stats_round_trip_and_normalise(tmp_path):
    stats = _stats()
    assert stats.std.min() == np.float32(LatentStats.STD_MIN)  # a dead channel is floored, not divided by 0
    stats.write(str(tmp_path))
    back = LatentStats.read(str(tmp_path))
    np.testing.assert_array_equal(back.mean, stats.mean)
    np.testing.assert_array_equal(back.std, stats.std)
    assert (back.source, back.num_videos, back.vae_step, back.channels) == ("cache", 7, None, C)
    z = np.random.default_rng(0).normal(size=(2, 3, 4, 4, C)).astype(np.float32)
    np.testing.assert_allclose(back.denormalise(back.normalise(z)), z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(back.normalise(z)[..., 3], (z[..., 3] - 1.5) / back.std[3], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(back.normalise(jnp.asarray(z))), back.normalise(z), rtol=1e-6)


@pytest.mark.parametrize("content, words", [
    ("{not json", ["unreadable"]),
    ('{"mean": [0, 1]}', ["'mean' and 'std'"]),
    ('{"mean": [0, 1], "std": [1]}', ["equal-length"]),
    ('{"mean": [0, 1], "std": [1, 0]}', ["positive"]),
    ('{"mean": [0, NaN], "std": [1, 1]}', ["finite"]),
])
def test_latent_stats_bad_files_name_the_file(tmp_path, content, words):
    path = tmp_path / workdir_lib.LATENT_STATS
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        LatentStats.read(str(tmp_path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    for word in words:
        assert word in str(e.value)


def test_latent_stats_missing_says_which_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the 'cache' stage"):
        LatentStats.read(str(tmp_path))


def _fake_checkpoint(step_dir):
    """A sealed folder that verifies (the workdir only reads its step number here)."""
    from pixeldance.checkpoint import write_manifest
    os.makedirs(step_dir)
    open(os.path.join(step_dir, "_CHECKPOINT_METADATA"), "w").write("{}")
    write_manifest(step_dir)


def test_stats_from_the_vae_stage_are_fresh_only_for_the_newest_vae(tmp_path):
    workdir = str(tmp_path)
    _fake_checkpoint(os.path.join(workdir, "vae", "4"))
    assert not LatentStats.from_vae_stage(workdir)  # no file yet
    _stats(vae_step=4).write(workdir)
    assert not LatentStats.from_vae_stage(workdir)  # the cache stage's, whatever the step
    LatentStats.from_moments(np.zeros(C), np.ones(C), source="train_vae", num_videos=8, vae_step=4).write(workdir)
    assert LatentStats.from_vae_stage(workdir) and LatentStats.from_vae_stage(workdir, 4)
    assert not LatentStats.from_vae_stage(workdir, 2)
    _fake_checkpoint(os.path.join(workdir, "vae", "6"))  # a newer VAE: the statistics are stale
    assert not LatentStats.from_vae_stage(workdir)


def test_cache_stage_keeps_a_converted_vaes_statistics(tmp_path):
    """A converted VAE's latents_mean / latents_std (what a pretrained DiT was trained with)
    survive the cache stage; statistics of other origins are recomputed from the cache."""
    from pixeldance.trainers import cache as cache_stage

    workdir = str(tmp_path)
    moments = lambda: type("M", (), dict(mean=np.full(C, 5.0), std=np.full(C, 2.0)))()
    converted = LatentStats(np.arange(C, dtype=np.float32), np.ones(C, np.float32),
                            source=LatentStats.CONVERTED + "/models/Wan2.1/vae")
    converted.write(workdir)
    assert LatentStats.from_converter(workdir) and not LatentStats.from_vae_stage(workdir)
    cache_stage._keep_or_write_stats(workdir, moments, 8, kept=False, what="cache")
    np.testing.assert_array_equal(LatentStats.read(workdir).mean, converted.mean)
    _stats().write(workdir)  # the cache stage's own: rewritten from the new cache
    assert not LatentStats.from_converter(workdir)
    cache_stage._keep_or_write_stats(workdir, moments, 8, kept=False, what="cache")
    assert LatentStats.read(workdir).source == "cache" and LatentStats.read(workdir).mean[0] == 5.0


def test_config_and_model_spec(tmp_path):
    config = configs.load_config("experiments/base.py:runlocal")
    workdir_lib.write_config(str(tmp_path), config)
    back = workdir_lib.read_config(str(tmp_path))
    assert back.to_dict() == json.loads(config.to_json())
    with pytest.raises(AttributeError):
        back.train.num_stepz = 3  # locked: a misspelt field is an error
    model = build.vae(config)
    workdir_lib.write_model_spec(str(tmp_path), model)
    assert build.vae(config, workdir_lib.read_model_spec(str(tmp_path))) == model
    assert workdir_lib.read_model_spec(str(tmp_path / "none")) is None


def _saved_dit_state(directory, config, tx):
    """A DiT TrainState with optimizer `tx`, saved at step 3; returns it."""
    init_fn = build.dit_init_fn(build.dit(config, C), (3, 4, 4, C), config.text.max_length)
    mesh = sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1])
    _, shardings = train_lib.state_shardings(init_fn, tx, mesh, "fsdp", jax.random.key(0))
    state = train_lib.init_state(init_fn, tx, shardings, jax.random.key(0))
    state = state.replace(step=jnp.int32(3), ema_params=jax.tree.map(lambda x: x + 1.0, state.params))
    ckpt = Checkpointer(directory, use_async=False)
    ckpt.save(3, state, force=True)
    ckpt.close()
    return init_fn, state


def test_load_ema_params_reads_the_ema_only_sharded(tmp_path):
    """The EMA weights come back onto an 8-device mesh, split over 'fsdp', from a checkpoint whose
    optimizer state is not AdamW's: nothing but the EMA subtree is read (the loader that rebuilt
    AdamW from the config to restore the whole state could not load this one)."""
    config = configs.load_config("experiments/base.py:runlocal")
    directory = str(tmp_path / "dit")
    init_fn, state = _saved_dit_state(directory, config, optax.sgd(0.1, momentum=0.9))
    mesh = sharding.make_mesh((1, -1, 1, 1))
    ema, step = workdir_lib.load_ema_params(directory, init_fn, mesh)
    assert step == 3
    for got, want in zip(jax.tree.leaves(ema), jax.tree.leaves(state.ema_params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    shardings = [x.sharding for x in jax.tree.leaves(ema)]
    assert all(isinstance(s, NamedSharding) and s.mesh.shape["fsdp"] == 8 for s in shardings)
    assert any("fsdp" in str(s.spec) for s in shardings)  # weights are split, not replicated
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        workdir_lib.load_ema_params(str(tmp_path / "nothing"), init_fn, mesh)


def test_load_ema_params_reads_the_trained_weights_when_asked(tmp_path):
    """weights='train' (config.sample.weights) returns the checkpoint's trained parameters, which
    differ from its EMA by 1 here; an unknown choice is one line naming the choices."""
    config = configs.load_config("experiments/base.py:runlocal")
    directory = str(tmp_path / "dit")
    init_fn, state = _saved_dit_state(directory, config, optax.sgd(0.1))
    mesh = sharding.make_mesh((1, -1, 1, 1))
    params, step = workdir_lib.load_ema_params(directory, init_fn, mesh, weights="train")
    assert step == 3
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="^weights must be one of ema, train, got 'last'$"):
        workdir_lib.load_ema_params(directory, init_fn, mesh, weights="last")


def test_latent_shape_from_the_vae_factors():
    config = configs.load_config("experiments/base.py:runlocal")
    vae = build.vae(config)
    assert build.latent_shape(vae, 9, 32, 48) == (3, 4, 6, vae.latent_channels)
    assert build.data_latent_shape(config) == (3, 4, 4, vae.latent_channels)
    for bad in ((8, 32, 32), (9, 30, 32), (9, 32, 4)):
        with pytest.raises(ValueError, match="do not compress"):
            build.latent_shape(vae, *bad)


def test_task_from_config_checks_its_fields():
    config = configs.load_config("experiments/base.py:runlocal")
    task = build.task(config)
    assert (task.objective, task.first_frame, task.last_from, task.replace) == ("v_zero_snr", "replace", 3, True)
    with pytest.raises(ValueError, match="first_frame"):
        build.task(configs.override(config, **{"cond.first_frame": "both"}))
    with pytest.raises(ValueError, match="objective"):
        build.task(configs.override(config, **{"diffusion.objective": "edm"}))
