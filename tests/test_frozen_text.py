"""A frozen pretrained text encoder end to end (issue 16, part 3): config.text.encoder = 'clip'
with a tiny converted CLIP text tower; the cache stage stores its states (bfloat16) and mask
per record and the empty prompt's once, the DiT trains from them without the encoder, and the
Pipeline embeds prompts the same way to sample.

The main job's runlocal workdir gives the VAE; the encoder is a random transformers
CLIPTextModel (width 32) through `pixeldance.convert.text_encoder`.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import transformers
from flax import traverse_util

from pixeldance import build, configs, sample
from pixeldance import workdir as workdir_lib
from pixeldance.convert import text_encoder as convert_te
from pixeldance.data import latent_cache
from pixeldance.models import text_encoder as te
from pixeldance.models import weights
from pixeldance.trainers import cache as cache_stage
from pixeldance.trainers import dit as dit_trainer
from feature_nets import write_clip_tokenizer
from test_clip import _randomize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNLOCAL = os.path.join(REPO, "experiments", "shapes.py") + ":runlocal"
WIDTH = 32


def _clip_folder(root, seed: int) -> str:
    """A converted random CLIP text tower (width 32, 77 positions) in root/clip_<seed>."""
    hf_dir, out = os.path.join(root, f"hf_{seed}"), os.path.join(root, f"clip_{seed}")
    os.makedirs(hf_dir)
    vocab = write_clip_tokenizer(os.path.join(hf_dir, "tokenizer.json"))
    config = transformers.CLIPTextConfig(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, vocab_size=vocab, max_position_embeddings=77,
                                         bos_token_id=vocab - 2, eos_token_id=2, pad_token_id=vocab - 1)
    hf = transformers.CLIPTextModel(config).eval()
    _randomize(hf, seed)
    hf.save_pretrained(hf_dir)
    convert_te.convert("clip", hf_dir, out)
    return out


def _assert_bfloat16_of(stored, states):
    """stored (bfloat16) is `states` rounded to bfloat16: within one bfloat16 step, since a batch of
    another size may move float32 results across a rounding boundary. One step is 2^-7 of the
    value's power of two, so up to 2^-7 relative (a CI run saw -0.0032501 against -0.0032349)."""
    stored, states = np.asarray(stored, np.float32), np.asarray(states, np.float32)
    np.testing.assert_allclose(stored, states, rtol=2 ** -7, atol=1e-6)
    assert np.mean(stored == np.asarray(states.astype("bfloat16"), np.float32)) > 0.98  # rounded, not cut


def _config(encoder_path, **overrides):
    return configs.override(configs.load_config(RUNLOCAL), **{
        "text.encoder": "clip", "text.encoder_path": encoder_path, "text.encoder_max_length": 24,
        "mesh.shape": (2, 4, 1, 1), **overrides})


@pytest.fixture(scope="module")
def frozen_run(runlocal_workdir, tmp_path_factory):
    """(config, workdir, encoder folder, DiT TrainState): the cache and train_dit stages with a
    frozen CLIP on a copy of the main job's workdir (its VAE)."""
    root = str(tmp_path_factory.mktemp("frozen"))
    encoder_dir = _clip_folder(root, 3)
    workdir = os.path.join(root, "work")
    shutil.copytree(runlocal_workdir, workdir,
                    ignore=shutil.ignore_patterns("dit", "cache", "samples", "tensorboard", "metrics.jsonl"))
    config = _config(encoder_dir)
    workdir_lib.write_config(workdir, config)
    loaded, load = [], te.load_text_encoder

    def recording_load(*args, **kwargs):  # what the cache stage loads, and where
        loaded.append(load(*args, **kwargs))
        return loaded[-1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(te, "load_text_encoder", recording_load)
        cache_stage.cache_latents(config, workdir)
    state = dit_trainer.train_dit(config, workdir)
    return config, workdir, encoder_dir, state, loaded


def _spread_over(variables, num_devices: int):
    """Every parameter lives on all num_devices devices, and the big ones are split (each device
    holds a part), not copied whole onto one."""
    leaves = jax.tree.leaves(variables)
    assert all(len(x.sharding.device_set) == num_devices for x in leaves)
    split = [x for x in leaves if x.addressable_shards[0].data.size < x.size]
    assert split and max(x.size for x in split) == max(x.size for x in leaves)


def test_cache_stage_shards_the_encoder_over_its_devices(frozen_run):
    """The cache stage loads the encoder once, its weights split over this process's 8 devices
    (as the VAE's are), not whole on one: umT5-XXL's 22.7 GB would not fit a 16 GiB chip."""
    *_, loaded = frozen_run
    assert len(loaded) == 1
    assert loaded[0].mesh is not None and loaded[0].mesh.devices.size == 8
    _spread_over(loaded[0].variables, 8)


def test_cache_holds_the_encoders_states(frozen_run):
    """Records: text_states = the encoder's last hidden states of the caption rounded to
    bfloat16 [S, D], text_mask its mask; the empty prompt's stored once; the encoder's identity
    (kind, weights' hash, length) in meta.json, no tokens."""
    config, workdir, encoder_dir, *_ = frozen_run
    source = latent_cache.LatentCacheSource(os.path.join(workdir, "cache"), captions=True)
    meta = source.meta
    assert meta["fields"]["text_states"] == dict(dtype="bfloat16", shape=[24, WIDTH])
    assert meta["fields"]["text_mask"] == dict(dtype="|b1", shape=[24])
    assert "tokens" not in meta["fields"] and "tokenizer" not in meta
    with open(os.path.join(encoder_dir, weights.CONFIG)) as f:
        sha = json.load(f)["sha256"]
    assert meta["text_encoder"] == dict(kind="clip", sha256=sha, max_length=24)
    encoder = te.load_text_encoder(encoder_dir, max_length=24)
    for i in (0, len(source) - 1):
        rec = source[i]
        states, mask = encoder([rec["caption"]])
        assert rec["text_states"].dtype == np.dtype("bfloat16")
        _assert_bfloat16_of(rec["text_states"], states[0])
        np.testing.assert_array_equal(rec["text_mask"], mask[0].astype(bool))
        assert 2 < rec["text_mask"].sum() < 24  # start, words, end; padded
    null = source.null_text()
    states, mask = encoder([""])
    _assert_bfloat16_of(null["text_states"], states)
    np.testing.assert_array_equal(null["text_mask"], mask.astype(bool))
    assert null["text_mask"].sum() == 2  # <|startoftext|> <|endoftext|>


def test_dit_trains_from_cached_states_without_the_encoder(frozen_run, monkeypatch):
    """The DiT has no text-encoder parameters (FrozenText) and projects D = 32 wide states; training ran its steps with finite losses. A second train_dit (resume,
    nothing left) never loads the encoder."""
    config, workdir, _, state, _ = frozen_run
    flat = traverse_util.flatten_dict(jax.device_get(state.params)["params"])
    assert not any(k[0] == "text_encoder" for k in flat)
    proj = [v for k, v in flat.items() if "text_proj" in k and k[-1] == "kernel"]
    assert len(proj) == 1 and proj[0].shape[0] == WIDTH  # the encoder's D, projected to the DiT's
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if json.loads(line)["stage"] == "dit"]
    assert losses and np.all(np.isfinite(losses))

    def no_encoder(*args, **kwargs):
        raise AssertionError("the DiT trainer loaded the text encoder")
    monkeypatch.setattr(te, "load_text_encoder", no_encoder)
    dit_trainer.train_dit(config, workdir)  # restores the last step; nothing to train


def test_pipeline_samples_with_the_encoder(frozen_run):
    """The Pipeline embeds prompts as the cache did (bfloat16 states) and guides
    against the encoder's empty prompt; it generates videos of the workdir's shape."""
    config, workdir, *_ = frozen_run
    pipe = sample.load_pipeline(workdir)
    assert isinstance(pipe.text, build.EncoderText)
    assert pipe.text.mesh is pipe.mesh
    source = latent_cache.LatentCacheSource(os.path.join(workdir, "cache"), captions=True)
    rec = source[1]
    text = pipe.text([rec["caption"]])
    assert text["states"].dtype == np.dtype("bfloat16")
    _assert_bfloat16_of(rec["text_states"], text["states"][0])
    np.testing.assert_array_equal(np.asarray(text["mask"][0]), rec["text_mask"])
    _assert_bfloat16_of(source.null_text()["text_states"], pipe.text.null["states"])
    _spread_over(pipe.text.encoder.variables, pipe.mesh.devices.size)
    videos = pipe.generate_batch([rec["caption"], "a blue square moves up"], seed=0)
    videos = np.asarray(videos)
    assert videos.shape == (2, config.data.num_frames, 32, 32, 3)
    assert np.isfinite(videos.astype(np.float32)).all()


def test_cache_rebuilt_for_other_weights_and_checked_by_the_trainer(frozen_run, tmp_path):
    """Another encoder (other weights, same shapes) changes the cache's identity, so the cache
    stage does not keep the old states; a word-token config on this cache is a one-line error."""
    config, workdir, encoder_dir, *_ = frozen_run
    other = _clip_folder(str(tmp_path), 4)
    source = object()
    a = cache_stage.cache_info(config, workdir, source)
    b = cache_stage.cache_info(_config(other), workdir, source)
    assert a["text_encoder"]["sha256"] != b["text_encoder"]["sha256"]
    assert {k: v for k, v in a.items() if k != "text_encoder"} == {k: v for k, v in b.items() if k != "text_encoder"}
    word = configs.override(config, **{"text.encoder": "word"})
    with pytest.raises(latent_cache.CacheError, match="holds frozen text states.*rerun the 'cache' stage") as e:
        dit_trainer.train_dit(word, workdir)
    assert "\n" not in str(e.value)


def test_config_errors(tmp_path):
    """A missing or empty encoder_path and a folder of another kind: one line naming it."""
    with pytest.raises(ValueError, match="needs config.text.encoder_path"):
        build.text_conditioner(_config(""))
    missing = str(tmp_path / "nowhere")
    with pytest.raises(weights.WeightsError, match=f"{missing}: no config.json.*convert.text_encoder"):
        build.text_conditioner(_config(missing))
    folder = _clip_folder(str(tmp_path), 5)
    with pytest.raises(ValueError, match="a 'clip' text encoder, but config.text.encoder='t5'"):
        build.text_conditioner(_config(folder, **{"text.encoder": "t5"}))
    with pytest.raises(ValueError, match="unknown config.text.encoder 'bert'"):
        build.text_conditioner(_config(folder, **{"text.encoder": "bert"}))
    text = build.text_conditioner(_config(folder))
    assert text.example()["states"].shape == (1, 24, WIDTH) and text._encoder is None  # shapes from config.json


def test_main_job_checks_the_encoder_first(tmp_path, python_runner):
    """experiments/msrvtt.py conditions on CLIP: without --config.text.encoder_path, or with a
    folder that holds no converted encoder, the main job stops before its VAE stage with one line
    naming the field or path (exit 2) and writes nothing."""
    config = os.path.join(REPO, "experiments", "msrvtt.py")
    workdir = str(tmp_path / "work")
    for flag, named in (("--config.seed=0", "needs config.text.encoder_path"),
                        (f"--config.text.encoder_path={tmp_path}", f"{tmp_path}: no config.json")):
        proc = python_runner("-m", "pixeldance.main", f"--config={config}", f"--workdir={workdir}",
                             f"--config.data.root={tmp_path}", flag)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0], lines
        assert not os.path.exists(workdir)


def test_planner_compiles_with_frozen_states(tmp_path):
    """The compile-ahead planner takes the text shapes from the encoder's folder: the train step
    on cached states [B, 24, 32] and the sampler with the empty prompt compile; no text-encoder
    parameters are counted; FLOPs count 24 text tokens."""
    from pixeldance.models.dit import dit_flops_per_sample
    from pixeldance.tools import plan

    folder = _clip_folder(str(tmp_path), 6)
    word = plan.plan(configs.override(configs.load_config(RUNLOCAL), **{
        "dit.variant": "mu", "mesh.shape": (2, -1, 1, 1), "plan.num_devices": 8, "plan.sample": False}))
    report = plan.plan(_config(folder, **{"dit.variant": "mu", "mesh.shape": (2, -1, 1, 1),
                                          "plan.num_devices": 8, "plan.sample": True}))
    for part in ("train", "sample"):  # compiled: no out-of-memory message, a memory analysis
        assert report[part]["out_of_memory"] is None and report[part]["memory"]["arguments"] > 0
    # The word encoder's parameters are gone (runlocal's is 32 wide, as this CLIP: the text
    # projection keeps its size).
    text_params = sum(np.prod(x.shape) for x in jax.tree.leaves(
        build.dit(configs.load_config(RUNLOCAL), 16).init(jax.random.key(0), *[
            np.zeros(s, d) for s, d in (((1, 3, 2, 2, 16), np.float32), ((1,), np.float32),
                                        ((1, 3, 2, 2, 16), np.float32), ((1, 3, 2, 2, 1), np.float32),
                                        ((1, 12), np.int32))])["params"]["text_encoder"]))
    assert text_params > 0 and report["num_params"] == word["num_params"] - text_params
    forward = dit_flops_per_sample(num_tokens=3 * 2 * 2, text_len=24, width=32, depth=2, mlp_ratio=2,
                                   patch_dim_in=4 * 33, patch_dim_out=4 * 16)
    assert report["train"]["model_flops"] == pytest.approx(3 * 8 * forward)
