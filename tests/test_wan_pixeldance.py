"""PixelDance on the Wan 2.1 DiT (issue 16, parts 4-5): config.dit.family = 'wan' starts from a
converted Wan DiT folder, widens its input for [x, c_image, c_mask] with zero weights, samples
from the converted weights before any fine-tuning, and fine-tunes from them.

A tiny random diffusers WanTransformer3DModel (16 latent channels as the runlocal VAE's, text
width 32 as the tiny CLIP text tower of tests/test_frozen_text.py) converted with
`pixeldance.convert.wan_dit`; the main job's runlocal workdir gives the VAE.
"""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pixeldance
import pytest
import torch
from diffusers import WanTransformer3DModel
from flax import linen as nn
from flax import traverse_util
from safetensors.numpy import load_file

from pixeldance import build, configs, sample
from pixeldance import main as main_lib
from pixeldance.tools import export_dit
from pixeldance import workdir as workdir_lib
from pixeldance.convert import wan_dit as convert_wan
from pixeldance.models import wan_dit, weights
from pixeldance.trainers import cache as cache_stage
from pixeldance.trainers import dit as dit_trainer
from test_frozen_text import WIDTH, _clip_folder
from test_wan_dit import _relative, _randomize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNLOCAL = os.path.join(REPO, "experiments", "shapes.py") + ":runlocal"
C = 16
HF = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16, in_channels=C, out_channels=C,
          text_dim=WIDTH, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32, eps=1e-6)


def _config(dit_dir, clip_dir, **overrides):
    return configs.override(configs.load_config(RUNLOCAL), **{
        "dit.family": "wan", "dit.init_from": dit_dir, "diffusion.objective": "flow",
        "diffusion.prediction": "velocity",
        "text.encoder": "clip", "text.encoder_path": clip_dir, "text.encoder_max_length": 24,
        "mesh.shape": (2, 4, 1, 1), "sample.shift": 3.0, **overrides})


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """dict(hf: the diffusers model, dit: its converted folder, clip: a converted tiny CLIP)."""
    root = str(tmp_path_factory.mktemp("wan_pd"))
    torch.manual_seed(0)
    hf = WanTransformer3DModel(**HF).eval()
    _randomize(hf, 1)
    hf.save_pretrained(os.path.join(root, "hf"), safe_serialization=True)
    convert_wan.convert(os.path.join(root, "hf"), os.path.join(root, "dit"))
    return dict(hf=hf, dit=os.path.join(root, "dit"), clip=_clip_folder(root, 7), root=root)


def _workdir(runlocal_workdir, root, name):
    workdir = os.path.join(root, name)
    shutil.copytree(runlocal_workdir, workdir,
                    ignore=shutil.ignore_patterns("dit", "cache", "samples", "tensorboard", "metrics.jsonl"))
    return workdir


@pytest.fixture(scope="module")
def cached(wan, runlocal_workdir):
    """A workdir (read-only: copy it with `_cached_workdir`) of the runlocal VAE whose latent cache
    the cache stage wrote for `_config(wan)`: one cache stage for the fine-tuning tests (their
    configs differ from it in train.* and mesh.*, which the cache does not depend on)."""
    workdir = _workdir(runlocal_workdir, wan["root"], "cached")
    config = _config(wan["dit"], wan["clip"])
    workdir_lib.write_config(workdir, config)
    cache_stage.cache_latents(config, workdir)
    return workdir


def _cached_workdir(cached, root, name, config):
    """A copy of the `cached` workdir with `config` written into it, ready for the DiT stage."""
    workdir = os.path.join(root, name)
    shutil.copytree(cached, workdir)
    workdir_lib.write_config(workdir, config)
    return workdir


def test_widened_network_equals_text_to_video():
    """Zero input weights for the instruction channels: WanVideo(widen=True) computes what the
    text-to-video network does, whatever c_image and c_mask hold; with those weights non-zero it
    reads them. Padded text states are zeroed (Wan's convention), so their values do not matter."""
    fields = wan_dit.config("tiny")
    t2v = wan_dit.WanVideo(wan_dit.model_from_config(fields), widen=False)
    wide = wan_dit.WanVideo(wan_dit.model_from_config(dict(fields, in_channels=2 * fields["in_channels"] + 1)))
    rng = np.random.default_rng(0)
    x, c_image = (jnp.asarray(rng.standard_normal((2, 3, 4, 4, 4)), jnp.float32) for _ in range(2))
    c_mask = jnp.asarray(rng.random((2, 3, 4, 4, 1)) < 0.5, jnp.float32)
    t = jnp.asarray([0.9, 0.2])
    text = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    params = nn.unbox(t2v.init(jax.random.key(0), x, t, c_image, c_mask, text, mask))["params"]
    widened = {"transformer": wan_dit.widen_params(params["transformer"], fields["in_channels"] + 1)}
    want = t2v.apply({"params": params}, x, t, c_image, c_mask, text, mask)
    got = wide.apply({"params": widened}, x, t, c_image, c_mask, text, mask)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    noisy = text.at[0, 3:].set(100.0)  # padded positions of example 0
    np.testing.assert_array_equal(np.asarray(wide.apply({"params": widened}, x, t, c_image, c_mask, noisy, mask)),
                                  np.asarray(want))
    kernel = widened["transformer"]["patch_embedding"]["kernel"]
    # Random (not constant: a constant across D would vanish in the blocks' LayerNorms).
    kernel = kernel.at[:, :, :, 4:].set(jnp.asarray(rng.standard_normal(kernel[:, :, :, 4:].shape), jnp.float32))
    read = {"transformer": dict(widened["transformer"], patch_embedding=dict(
        widened["transformer"]["patch_embedding"], kernel=kernel))}
    assert np.abs(np.asarray(wide.apply({"params": read}, x, t, c_image, c_mask, text, mask) - want)).max() > 1e-3


def test_pipeline_samples_from_converted_weights(wan, runlocal_workdir):
    """Before any fine-tuning the Pipeline holds the converted weights, widened (the input
    kernel's instruction channels zero), and its network is diffusers' at 1000 t with the padded
    text states zeroed; it samples text-to-video and from a first frame."""
    workdir = _workdir(runlocal_workdir, wan["root"], "pretrained")
    config = _config(wan["dit"], wan["clip"])
    workdir_lib.write_config(workdir, config)
    pipe = sample.load_pipeline(workdir)
    assert pipe.step == 0
    stored = load_file(os.path.join(wan["dit"], weights.PARAMS))
    flat = traverse_util.flatten_dict(jax.device_get(pipe.params)["params"]["dit"]["transformer"])
    kernel = np.asarray(flat[("patch_embedding", "kernel")])
    assert kernel.shape[3] == 2 * C + 1
    np.testing.assert_array_equal(kernel[:, :, :, :C], stored["params/patch_embedding/kernel"])
    assert not kernel[:, :, :, C:].any()
    np.testing.assert_array_equal(np.asarray(flat[("blocks", "attn1", "to_q", "kernel")]),
                                  stored["params/blocks/attn1/to_q/kernel"])

    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, 4, 4, C)).astype(np.float32)
    text = pipe.text(["a red circle moves left"])
    states = np.asarray(text["states"], np.float32) * np.asarray(text["mask"])[..., None]
    with jax.default_matmul_precision("highest"):
        ours = pipe.model.apply(pipe.params, x, jnp.asarray([0.3]), np.zeros_like(x), np.zeros((1, 3, 4, 4, 1)),
                                text)
    with torch.no_grad():
        theirs = wan["hf"](torch.from_numpy(x).permute(0, 4, 1, 2, 3), torch.tensor([300.0]),
                           torch.from_numpy(states)).sample.permute(0, 2, 3, 4, 1).numpy()
    assert _relative(ours, theirs) < 1e-5

    first = np.zeros((32, 32, 3), np.uint8)
    first[8:16, 8:16] = 255
    videos = np.asarray(pipe.generate_batch(["a red circle moves left", "a blue square moves up"],
                                            first_frames=[None, first], seed=0, steps=2))
    assert videos.shape == (2, config.data.num_frames, 32, 32, 3)


def test_text_to_video_equals_diffusers_wan_pipeline(wan, runlocal_workdir):
    """Sampling end to end: our Pipeline on the converted (not widened) weights, Euler with
    Wan's shift and text guidance, against diffusers' `WanPipeline` with the same transformer,
    the same text states (ours, given as prompt_embeds), the same noise and the same time grid
    (diffusers' default grid stops at sigma 1/1000 instead of 0: the test hands it ours)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    workdir = _workdir(runlocal_workdir, wan["root"], "t2v")
    config = _config(wan["dit"], wan["clip"], **{"dit.widen": False})
    workdir_lib.write_config(workdir, config)
    pipe = sample.load_pipeline(workdir)
    steps, guidance, shift = 3, 5.0, config.sample.shift
    prompts = ["a red circle moves left", "a blue square moves up"]
    text = pipe.text(prompts)
    noise = np.random.default_rng(3).standard_normal((2, 3, 4, 4, C)).astype(np.float32)
    zeros = np.zeros((2, 4, 4, C), np.float32)
    no = np.zeros((2,), bool)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(pipe.sample_latents(noise, zeros, zeros, no, no, text, jax.random.key(0),
                                              jnp.float32(guidance), jnp.float32(1.0), jnp.int32(0),
                                              steps=steps, sampler="euler", branches=2))

    def embeds(t):
        return torch.from_numpy(np.asarray(t["states"], np.float32) * np.asarray(t["mask"])[..., None])
    null = jax.tree.map(lambda v: np.repeat(np.asarray(v), 2, axis=0), pipe.text.null)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    set_timesteps = scheduler.set_timesteps
    grid = np.linspace(1.0, 0.0, steps + 1)[:-1]  # shifted by the scheduler as by our sampler
    scheduler.set_timesteps = lambda n=None, device=None, **kw: set_timesteps(sigmas=grid, device=device)
    hf = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=wan["hf"], scheduler=scheduler)
    with torch.no_grad():
        theirs = hf(prompt_embeds=embeds(text), negative_prompt_embeds=embeds(null), latents=torch.from_numpy(
            noise).permute(0, 4, 1, 2, 3), num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
            num_frames=config.data.num_frames, output_type="latent").frames
    theirs = theirs.permute(0, 2, 3, 4, 1).numpy()
    assert _relative(ours, theirs) < 1e-4, _relative(ours, theirs)


def test_whole_wan_folder_converts_and_loads_as_a_pipeline(wan, tmp_path):
    """`convert.wan` on a tiny diffusers Wan 2.1 repository (VAE, umT5 + sentencepiece tokenizer,
    transformer, scheduler): one folder that `pixeldance.load_pipeline` opens as text-to-video
    Wan (its weights, the scheduler's shift, the VAE's own latent statistics) and generates from;
    a bad repository is one line."""
    import transformers
    from diffusers import AutoencoderKLWan
    from pixeldance.convert import wan as convert_wan_all
    from test_text_encoders import UMT5_CONFIG, _train_spiece
    from test_wan_vae import SMALL

    repo = tmp_path / "Wan2.1-T2V-tiny-Diffusers"
    shutil.copytree(os.path.join(wan["root"], "hf"), repo / "transformer")
    torch.manual_seed(0)
    AutoencoderKLWan(**SMALL).eval().save_pretrained(str(repo / "vae"), safe_serialization=True)
    transformers.UMT5EncoderModel(transformers.UMT5Config(**UMT5_CONFIG)).eval().save_pretrained(
        str(repo / "text_encoder"))
    _train_spiece(str(tmp_path / "spm"))
    transformers.T5Tokenizer.from_pretrained(str(tmp_path / "spm")).save_pretrained(str(repo / "tokenizer"))
    os.makedirs(repo / "scheduler")
    with open(repo / "scheduler" / "scheduler_config.json", "w") as f:
        f.write('{"_class_name": "UniPCMultistepScheduler", "flow_shift": 5.0}')

    out = str(tmp_path / "wan21")
    config = convert_wan_all.convert(str(repo), out)
    assert config["sample"]["shift"] == 5.0 and not config["dit"]["widen"]
    assert sorted(os.listdir(out)) == ["config.json", "latent_stats.json", "umt5", "vae", "vae_model.json", "wan_dit"]
    pipe = pixeldance.load_pipeline(out)
    assert pipe.step == 0 and pipe.config.sample.shift == 5.0
    assert workdir_lib.LatentStats.from_converter(out)
    stored = load_file(os.path.join(out, "wan_dit", weights.PARAMS))
    flat = traverse_util.flatten_dict(jax.device_get(pipe.params)["params"]["dit"]["transformer"])
    np.testing.assert_array_equal(np.asarray(flat[("patch_embedding", "kernel")]),
                                  stored["params/patch_embedding/kernel"])
    video = pipe.generate("a red circle moves left", num_frames=5, height=32, width=32, steps=2)
    assert video.shape == (5, 32, 32, 3) and video.dtype == np.uint8

    with pytest.raises(ValueError, match="is not empty"):
        convert_wan_all.convert(str(repo), out)
    shutil.rmtree(repo / "tokenizer")
    with pytest.raises(ValueError, match="no tokenizer/"):
        convert_wan_all.convert(str(repo), str(tmp_path / "again"))
    assert not os.path.exists(tmp_path / "again")


def test_finetunes_from_converted_weights(wan, cached):
    """Full fine-tuning: the DiT starts from the converted weights (after 4 AdamW steps every
    weight is still within a few learning rates of them, not at a random init), trains with
    PixelDance's conditioning on cached frozen text states, and the Pipeline then loads the
    fine-tuned step."""
    config = _config(wan["dit"], wan["clip"])
    workdir = _cached_workdir(cached, wan["root"], "finetune", config)
    state = dit_trainer.train_dit(config, workdir)
    assert int(state.step) == config.train.num_steps
    stored = load_file(os.path.join(wan["dit"], weights.PARAMS))
    flat = traverse_util.flatten_dict(jax.device_get(state.params)["params"]["dit"]["transformer"])
    lr = config.train.lr
    moved = 0.0
    for path, value in flat.items():
        base = stored["params/" + "/".join(path)]
        value = np.asarray(value)[:, :, :, :C] if path == ("patch_embedding", "kernel") else np.asarray(value)
        moved = max(moved, float(np.abs(value - base).max()))
    assert 0 < moved <= 2 * config.train.num_steps * lr, (moved, lr)
    instruction = np.asarray(flat[("patch_embedding", "kernel")])[:, :, :, C:]
    assert instruction.any() and np.abs(instruction).max() <= 2 * config.train.num_steps * lr  # learning to read them
    pipe = sample.load_pipeline(workdir)
    assert pipe.step == config.train.num_steps


def _flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(nn.unbox(tree))).items()}


def test_lora_finetune_resume_and_sample(wan, cached, runlocal_workdir):
    """LoRA: the train state and its checkpoints hold only the adapters (the converted weights
    stay frozen); a run resumed from its step-2 checkpoint ends bit-identical to the
    uninterrupted one; the Pipeline merges the EMA adapters into the base, so only targeted
    kernels differ from the converted weights and the widened instruction channels are read;
    the sample stage generates T2V, I2V and FLF2V (tau) and writes mp4s."""
    config = _config(wan["dit"], wan["clip"], **{"train.lora_rank": 2, "train.lora_alpha": 4.0,
                                                  "train.ckpt_every": 2, "train.lr": 1e-2})
    workdir = _cached_workdir(cached, wan["root"], "lora", config)
    state = dit_trainer.train_dit(config, workdir)
    assert int(state.step) == config.train.num_steps == 4
    adapters = _flat(state.params)
    assert adapters and all(k[-1] in ("lora_a", "lora_b") for k in adapters)
    targeted = {k[:-1] for k in adapters}
    assert ("params", "dit", "transformer", "patch_embedding", "kernel") in targeted
    assert ("params", "dit", "transformer", "blocks", "ffn", "proj_out", "kernel") in targeted
    assert not any("time_embedder" in k or k[-2] == "proj_out" and "blocks" not in k for k in targeted)
    assert any(v.any() for k, v in adapters.items() if k[-1] == "lora_b")  # B left zero: nothing learnt
    # The checkpoint holds no copy of the base: it restores as adapters, not as the model's weights.
    model = build.dit(config, C)
    init_fn = build.dit_init_fn(model, (3, 4, 4, C), build.text_conditioner(config).example())
    mesh = sample.inference_mesh()
    ema, _ = workdir_lib.load_ema_params(os.path.join(workdir, "dit"), build.lora_init_fn(init_fn, build.dit_lora(config)),
                                         mesh, "fsdp")
    assert set(_flat(ema)) == set(adapters)
    with pytest.raises(Exception):
        workdir_lib.load_ema_params(os.path.join(workdir, "dit"), init_fn, mesh, "fsdp")

    # Exact resume: drop the last checkpoint, train again from step 2.
    shutil.rmtree(os.path.join(workdir, "dit", "4"))
    resumed = dit_trainer.train_dit(config, workdir)
    for k, v in _flat(resumed.params).items():
        np.testing.assert_array_equal(v, adapters[k], err_msg=str(k))

    pipe = sample.load_pipeline(workdir)
    assert pipe.step == 4
    stored = load_file(os.path.join(wan["dit"], weights.PARAMS))
    merged = _flat(pipe.params["params"]["dit"]["transformer"])
    ema = _flat(resumed.ema_params)
    for path, value in merged.items():
        base = stored["params/" + "/".join(path)]
        if path == ("patch_embedding", "kernel"):
            assert np.abs(value[..., C:, :]).max() > 0  # the instruction channels are read
            value = value[..., :C, :]
        a = ema.get(("params", "dit", "transformer") + path + ("lora_a",))
        if a is None:
            np.testing.assert_array_equal(value, base, err_msg=str(path))  # untouched: bitwise the base
        else:
            b = ema[("params", "dit", "transformer") + path + ("lora_b",)]
            lead = a.ndim + b.ndim - 2 - value.ndim
            n_in = a.ndim - 1 - lead
            a2 = a.reshape(a.shape[:lead] + (-1, a.shape[-1]))
            b2 = b.reshape(b.shape[:lead + 1] + (-1,))
            delta = (4.0 / 2) * np.matmul(a2, b2).reshape(a.shape[:-1] + b.shape[lead + 1:])
            if path == ("patch_embedding", "kernel"):
                delta = delta[..., :C, :]
            assert n_in >= 1 and np.abs(delta).max() > 0
            np.testing.assert_allclose(value, base + delta, rtol=1e-5, atol=1e-6, err_msg=str(path))

    assert config.sample.tau > 0 and config.evals.dit == ("faithfulness",) or "faithfulness" in config.evals.dit
    report = main_lib.sample_stage(config, workdir)["faithfulness"].report
    assert set(report) == {"T2V", "I2V", "FLF2V"}
    videos = sorted(os.listdir(os.path.join(workdir, "samples")))
    for mode in ("T2V", "I2V", "FLF2V"):
        mp4 = [f for f in videos if f.startswith(mode + "_") and f.endswith(".mp4")]
        assert mp4 and os.path.getsize(os.path.join(workdir, "samples", mp4[0])) > 0

    # Export: the merged weights as a converted Wan DiT folder, widened, loadable, a new init_from.
    out = os.path.join(wan["root"], "lora_export")
    meta = export_dit.export(workdir, out)
    assert meta["step"] == 4 and meta["lora_merged"] and meta["dit"]["in_channels"] == 2 * C + 1
    exported = load_file(os.path.join(out, weights.PARAMS))
    assert set(exported) == {"params/" + "/".join(k) for k in merged}
    for path, value in merged.items():
        np.testing.assert_array_equal(exported["params/" + "/".join(path)], value)
    dit = pixeldance.load_dit(out)
    x = np.random.default_rng(2).standard_normal((1, 3, 4, 4, 2 * C + 1)).astype(np.float32)
    assert np.asarray(dit.predict(x, np.asarray([500.0]), np.zeros((1, 4, WIDTH), np.float32))).shape == (1, 3, 4, 4, C)
    assert build.wan_fields(_config(out, wan["clip"]))["in_channels"] == 2 * C + 1
    with pytest.raises(ValueError, match="is not empty"):
        export_dit.export(workdir, out)
    with pytest.raises(ValueError, match="export_dit writes Wan-family DiTs"):
        export_dit.export(runlocal_workdir, os.path.join(wan["root"], "never"))


def test_lora_bfloat16_base(wan, cached, monkeypatch):
    """config.train.lora_base_dtype='bfloat16': the trainer holds the frozen base in bfloat16
    (half its bytes), the adapters and their state stay float32 and learn; the Pipeline merges
    the EMA adapters into the same bfloat16 base, so sampling sees the weights training saw.
    Trained as the 14B fits a v5e-16 (benchmarks/README.md): preset fsdp_context_params on a
    data 2 x fsdp 2 x context 2 mesh, tokens split over 'context' (Ulysses attention), the base
    split over fsdp x context."""
    from pixeldance import train_lib
    config = _config(wan["dit"], wan["clip"], **{"train.lora_rank": 2, "train.lora_alpha": 4.0, "train.lr": 1e-2,
                                                  "train.num_steps": 2, "train.lora_base_dtype": "bfloat16",
                                                  "mesh.shape": (2, 2, 2, 1), "mesh.preset": "fsdp_context_params",
                                                  # EMA = the trained adapters, so the merged update is
                                                  # large enough to check against bfloat16 rounding
                                                  "train.ema_decay": 0.0})
    workdir = _cached_workdir(cached, wan["root"], "lora_bf16", config)
    bases, fit = [], train_lib.fit
    monkeypatch.setattr(train_lib, "fit", lambda **kw: bases.append(kw["frozen"][0]) or fit(**kw))
    state = dit_trainer.train_dit(config, workdir)
    assert len(bases) == 1 and {x.dtype for x in jax.tree.leaves(bases[0])} == {jnp.dtype(jnp.bfloat16)}
    ffn = bases[0]["params"]["dit"]["transformer"]["blocks"]["ffn"]["proj_in"]["kernel"]  # [layers, embed, mlp]
    assert ffn.sharding.spec[1] == ("fsdp", "context") and ffn.addressable_shards[0].data.shape[1] == ffn.shape[1] // 4
    adapters = _flat(state.params)
    assert {v.dtype for v in adapters.values()} == {np.dtype(np.float32)}
    assert any(v.any() for k, v in adapters.items() if k[-1] == "lora_b")  # learnt through a bfloat16 base

    stored = load_file(os.path.join(wan["dit"], weights.PARAMS))
    pipe = sample.load_pipeline(workdir)
    merged = _flat(pipe.params["params"]["dit"]["transformer"])
    ema = _flat(state.ema_params)
    from pixeldance.models import lora as lora_lib
    adapted = 0
    for path, value in merged.items():
        assert value.dtype == jnp.bfloat16, path
        base = stored["params/" + "/".join(path)]
        key = ("params", "dit", "transformer") + path
        delta = None
        if key + ("lora_a",) in ema:  # the EMA adapters' update, on the (widened) kernel's shape
            delta = np.asarray(lora_lib._delta(ema[key + ("lora_a",)], ema[key + ("lora_b",)], value.shape,
                                               alpha=config.train.lora_alpha))
        if path == ("patch_embedding", "kernel"):
            value = value[..., :C, :]
            delta = None if delta is None else delta[..., :C, :]
        if delta is None:
            np.testing.assert_array_equal(value, base.astype(jnp.bfloat16), err_msg=str(path))
        else:  # bfloat16(bfloat16(W) + delta): one bfloat16 rounding of bfloat16(W) + delta
            adapted += 1
            assert np.abs(delta).max() > 1e-3, path  # the adapters moved the weights
            expected = np.asarray(base.astype(jnp.bfloat16), np.float32) + delta
            np.testing.assert_allclose(value.astype(np.float32), expected, rtol=2 ** -8, atol=1e-8, err_msg=str(path))
    assert adapted > 0
    video = pipe.generate("a red circle moves left", num_frames=5, height=32, width=32, steps=2)
    assert video.shape == (5, 32, 32, 3) and video.dtype == np.uint8
    with pytest.raises(ValueError, match="lora_base_dtype must be one of"):
        build.dit_lora(_config(wan["dit"], wan["clip"], **{"train.lora_rank": 2, "train.lora_base_dtype": "fp16"}))


def test_lora_config_errors(wan):
    """One line each: a LoRA rank without converted weights to adapt, a negative rank, and a
    target that matches no kernel."""
    clip = wan["clip"]
    with pytest.raises(ValueError, match="trains adapters over pretrained weights"):
        build.dit_lora(_config("", clip, **{"dit.wan_config": "tiny", "train.lora_rank": 4}))
    with pytest.raises(ValueError, match="lora_rank must be a non-negative integer"):
        build.dit_lora(_config(wan["dit"], clip, **{"train.lora_rank": -1}))
    assert build.dit_lora(_config(wan["dit"], clip)) is None
    spec = build.dit_lora(_config(wan["dit"], clip, **{"train.lora_rank": 3, "train.lora_targets": "attn9/to_q"}))
    assert spec == dict(rank=3, targets="attn9/to_q", alpha=3.0, base_dtype=jnp.float32)
    model = build.dit(_config(wan["dit"], clip), C)
    init_fn = build.dit_init_fn(model, (3, 4, 4, C), build.text_conditioner(_config(wan["dit"], clip)).example())
    with pytest.raises(ValueError, match="LoRA target 'attn9/to_q' matches no kernel"):
        build.lora_init_fn(init_fn, spec)(jax.random.key(0))


def test_experiment_builds_on_converted_folders(wan):
    """experiments/wan_pixeldance.py with converted folders: the Wan family widened for the
    instructions, velocity prediction, shifted sampling; ':lora' adds adapters of its rank."""
    paths = {"dit.init_from": wan["dit"], "text.encoder": "clip", "text.encoder_path": wan["clip"]}
    full = configs.override(configs.load_config(os.path.join(REPO, "experiments", "wan_pixeldance.py:runlocal")),
                            **paths)
    model = build.dit(full, C)
    assert isinstance(model.dit, wan_dit.WanVideo) and model.dit.transformer.in_channels == 2 * C + 1
    assert full.diffusion.prediction == "velocity" and full.sample.shift == 3.0 and full.vae.family == "wan"
    assert build.dit_lora(full) is None
    build.task(full)
    lora = configs.override(configs.load_config(os.path.join(REPO, "experiments", "wan_pixeldance.py:lora,rank=4")),
                            **paths)
    assert build.dit_lora(lora) == dict(rank=4, targets=build.LORA_TARGETS, alpha=4.0, base_dtype=jnp.float32)
    assert lora.train.lr > full.train.lr


def test_config_errors(wan, tmp_path):
    """One line each: a Wan DiT without a frozen text encoder, with neither a folder nor a named
    config, of other latent channels, and a folder holding another network."""
    def dit_of(**overrides):
        return build.dit(_config(wan["dit"], wan["clip"], **overrides), C)

    with pytest.raises(ValueError, match="conditions on a frozen text encoder"):
        dit_of(**{"text.encoder": "word"})
    with pytest.raises(ValueError, match="needs config.dit.init_from .* or config.dit.wan_config"):
        dit_of(**{"dit.init_from": ""})
    with pytest.raises(ValueError, match="outputs 16 latent channels, the VAE's latents have 8"):
        build.dit(_config(wan["dit"], wan["clip"]), 8)
    with pytest.raises(weights.WeightsError, match="holds 'text_encoder' weights, not 'wan_dit'"):
        dit_of(**{"dit.init_from": wan["clip"]})
    with pytest.raises(ValueError, match="unknown config.dit.family 'unet'"):
        dit_of(**{"dit.family": "unet"})
    tiny = build.dit(_config("", wan["clip"], **{"dit.wan_config": "tiny"}), 4)  # the named config's 4 channels
    assert isinstance(tiny.dit, wan_dit.WanVideo) and tiny.dit.transformer.in_channels == 9
