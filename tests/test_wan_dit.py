"""The Wan 2.1 DiT (pixeldance/models/wan_dit.py) and its converter (convert/wan_dit.py) against
diffusers 0.36's WanTransformer3DModel.

A tiny random WanTransformer3DModel (every parameter drawn, norm weights and modulation tables
included, so none is a no-op; eps 1e-3 so that one not read from config.json shows) is saved
with `save_pretrained`, once whole and once sharded inside a Wan-repository-like root
(transformer/), converted (the sharded root through the command line), loaded and compared with
diffusers' forward pass on a non-square latent grid, T > 1, B = 2 with two different timesteps:
measured 2.8e-7 to 3.7e-7 relative (max |ours - theirs| / max |theirs|) in float32; bfloat16
compute and parameters 4.5e-3 from float32. diffusers' model takes
no text mask (Wan's pipeline zero-pads the states instead); a masked batch is compared with
diffusers run per example on its unpadded text. The released sizes are checked by shape only:
diffusers' 1.3B and 14B models built on the meta device against our converter's expectations.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from flax import linen as nn
from safetensors.numpy import load_file, save_file

import pixeldance
from pixeldance import sharding
from pixeldance.convert import wan_dit as convert_wan
from pixeldance.convert.common import ConversionError
from pixeldance.models import wan_dit, weights
from feature_nets import one_line_error

# Relative: max |ours - theirs| / max |theirs|. The issue asks for 1e-4; float32 gives ~3e-7.
TOL = 1e-5
HF_TINY = dict(patch_size=[1, 2, 2], num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
               text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32, eps=1e-3)
# The released checkpoints' transformer/config.json (Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers).
RELEASED = {
    "wan2.1-t2v-1.3b": dict(_class_name="WanTransformer3DModel", _diffusers_version="0.33.0.dev0",
                            added_kv_proj_dim=None, attention_head_dim=128, cross_attn_norm=True, eps=1e-6,
                            ffn_dim=8960, freq_dim=256, image_dim=None, in_channels=16, num_attention_heads=12,
                            num_layers=30, out_channels=16, patch_size=[1, 2, 2], qk_norm="rms_norm_across_heads",
                            rope_max_seq_len=1024, text_dim=4096),
}
RELEASED["wan2.1-t2v-14b"] = dict(RELEASED["wan2.1-t2v-1.3b"], num_attention_heads=40, num_layers=40, ffn_dim=13824)


def _relative(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _randomize(model: torch.nn.Module, seed: int):
    """Every parameter drawn: norm weights 1 + noise, tables ~ N(0, 1/64), biases noise,
    matrices ~ 1/sqrt(fan-in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "scale_shift_table" in name:
                p.copy_(noise / 8)
            elif p.ndim >= 2:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_(0.2 * noise)


def _diffusers(model, latents, timesteps, text) -> np.ndarray:
    """diffusers' forward on channels-last latents [B, T, h, w, C] -> [B, T, h, w, C_out]."""
    with torch.no_grad():
        out = model(torch.from_numpy(latents).permute(0, 4, 1, 2, 3), torch.from_numpy(timesteps),
                    torch.from_numpy(text)).sample
    return out.permute(0, 2, 3, 4, 1).numpy()


def _inputs(B=2, S=7, seed=0):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((B, 3, 4, 6, 4)).astype(np.float32)  # T = 3, h != w
    timesteps = np.array([999.0, 250.5, 10.0, 600.0][:B], np.float32)
    text = rng.standard_normal((B, S, 32)).astype(np.float32)
    return latents, timesteps, text


@pytest.fixture(scope="module")
def setup(tmp_path_factory, python_runner):
    root = tmp_path_factory.mktemp("wan_dit")
    torch.manual_seed(0)
    hf = WanTransformer3DModel(**HF_TINY).eval()
    _randomize(hf, 0)
    hf.save_pretrained(str(root / "hf"), safe_serialization=True)
    hf.save_pretrained(str(root / "repo" / "transformer"), safe_serialization=True, max_shard_size="20KB")
    (root / "repo" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    assert os.path.isfile(root / "repo" / "transformer" / convert_wan.INDEX)
    config = convert_wan.convert(str(root / "hf"), str(root / "ours"))
    assert config["dit"] == dict(wan_dit.config("tiny"), eps=1e-3, patch_size=[1, 2, 2])
    r = python_runner("-m", "pixeldance.convert.wan_dit", f"--input={root / 'repo'}", f"--output={root / 'ours_repo'}",
                      "--dtype=bfloat16", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Wan DiT" in r.stdout and "load_dit" in r.stdout
    return dict(root=root, hf=hf, ours=str(root / "ours"), ours_repo=str(root / "ours_repo"))


# ----------------------------------------------------------------------------------------------
# Against diffusers.

def test_parity_with_diffusers(setup):
    dit = pixeldance.load_dit(setup["ours"], verify=True)  # the public entry point
    latents, timesteps, text = _inputs()
    ours = dit.predict(latents, timesteps, text)
    assert ours.dtype == jnp.float32 and ours.shape == (2, 3, 4, 6, 4)
    error = _relative(ours, _diffusers(setup["hf"], latents, timesteps, text))
    print("wan dit relative error:", error)
    assert error < TOL
    # Both examples' timesteps count (one shared timestep gives another output).
    assert _relative(dit.predict(latents, timesteps[0], text)[1], ours[1]) > 1e-3

    # The sharded repository root (through the command line): the same arrays, its --dtype kept.
    a, b = load_file(os.path.join(setup["ours"], weights.PARAMS)), load_file(os.path.join(setup["ours_repo"],
                                                                                            weights.PARAMS))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert wan_dit.load_dit(setup["ours_repo"]).model.dtype == jnp.bfloat16


def test_text_mask_equals_diffusers_on_unpadded_text(setup):
    """A mask hides the padded text tokens: as diffusers given each example's real tokens only."""
    dit = wan_dit.load_dit(setup["ours"])
    latents, timesteps, text = _inputs(seed=1)
    lengths = (7, 3)
    mask = np.arange(7)[None] < np.array(lengths)[:, None]
    ours = np.asarray(dit.predict(latents, timesteps, text, mask))
    for b, n in enumerate(lengths):
        reference = _diffusers(setup["hf"], latents[b:b + 1], timesteps[b:b + 1], text[b:b + 1, :n])
        assert _relative(ours[b:b + 1], reference) < TOL
    assert _relative(dit.predict(latents, timesteps, text)[1], ours[1]) > 1e-3  # the mask matters


# ----------------------------------------------------------------------------------------------
# Sharding, bfloat16, remat.

def test_sharded_over_fsdp_and_tensor(setup):
    """The parameters split by their logical names over a 4 x 2 (fsdp x tensor) mesh of the 8
    CPU devices give the unsharded output."""
    mesh = sharding.make_mesh((1, 4, 1, 2))
    dit = wan_dit.load_dit(setup["ours"], mesh=mesh, preset="fsdp_tensor")
    P = jax.sharding.PartitionSpec
    blocks = dit.params["blocks"]
    assert blocks["attn1"]["to_q"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert blocks["attn2"]["to_out"]["kernel"].sharding.spec == P(None, "tensor", None, "fsdp")
    assert blocks["ffn"]["proj_in"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert blocks["attn1"]["norm_q"]["scale"].sharding.spec == P(None, "tensor", None)
    assert dit.params["patch_embedding"]["kernel"].sharding.spec == P(None, None, None, None, "fsdp")
    latents, timesteps, text = _inputs(B=4, seed=2)
    sharded = dit.predict(latents, timesteps, text)
    reference = wan_dit.load_dit(setup["ours"]).predict(latents, timesteps, text)
    assert _relative(sharded, reference) < 1e-5


def test_bfloat16_close_to_float32(setup):
    latents, timesteps, text = _inputs()
    reference = wan_dit.load_dit(setup["ours"]).predict(latents, timesteps, text)
    dit = wan_dit.load_dit(setup["ours"], dtype="bfloat16", param_dtype="bfloat16")
    out = dit.predict(latents, timesteps, text)
    error = _relative(out, reference)
    print("bfloat16 relative error against float32:", error)
    assert out.dtype == jnp.float32 and 0 < error < 2e-2  # measured 4.5e-3
    assert dit.params["blocks"]["attn1"]["to_q"]["kernel"].dtype == jnp.bfloat16


def test_remat_same_gradients(setup):
    """remat='full' (each block recomputed in the backward pass) gives remat='none''s gradients."""
    dit = wan_dit.load_dit(setup["ours"])
    latents, timesteps, text = (jnp.asarray(a) for a in _inputs())

    def grads(remat):
        model = wan_dit.model_from_config(dit.config["dit"], remat=remat)
        loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, latents, timesteps, text)))
        return jax.jit(jax.grad(loss))(dit.params)

    a, b = grads("none"), grads("full")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The released sizes, configs and logical names.

@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_configs_match_diffusers(name):
    """The released config.json gives our named config, and diffusers' model of it (meta tensors)
    has exactly the tensors and shapes the converter expects."""
    fields = convert_wan.fields_from_config(RELEASED[name], name)
    assert dict(fields, patch_size=tuple(fields["patch_size"])) == wan_dit.config(name)
    hf_config = {k: v for k, v in RELEASED[name].items() if not k.startswith("_")}
    with torch.device("meta"):
        hf = WanTransformer3DModel(**hf_config)
    theirs = {n: tuple(t.shape) for n, t in hf.state_dict().items()}
    ours = {n: shape for n, (_, _, shape) in convert_wan.expected_tensors(fields).items()}
    assert ours == theirs

    # Preset 'fsdp_tensor' on a 4 x 2 mesh leaves each device about an eighth of the parameters
    # (measured 6.67 of 53.2 GiB for the 14B; 0.03 % replicated over fsdp: biases, tables).
    boxed = wan_dit.boxed_params(wan_dit.model_from_config(wan_dit.config(name)))
    mesh = sharding.make_mesh((1, 4, 1, 2))
    shardings, abstract = sharding.tree_shardings(mesh, boxed, "fsdp_tensor"), nn.unbox(boxed)
    sharding.check_fsdp(abstract, shardings, mesh, "fsdp_tensor")
    sizes = [(np.prod(s.shard_shape(x.shape)), np.prod(x.shape)) for s, x in
             zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract))]
    assert sum(a for a, _ in sizes) < sum(b for _, b in sizes) / 7.5


def test_logical_axis_names():
    boxed = wan_dit.boxed_params(wan_dit.model_from_config(wan_dit.config("tiny")))
    spec = nn.get_partition_spec(boxed)
    P = jax.sharding.PartitionSpec
    assert spec["blocks"]["attn1"]["to_q"]["kernel"] == P("layers", "embed", "heads", "kv")
    assert spec["blocks"]["attn1"]["to_out"]["kernel"] == P("layers", "heads", "kv", "embed")
    assert spec["blocks"]["ffn"]["proj_out"]["kernel"] == P("layers", "mlp", "embed")
    assert spec["blocks"]["scale_shift_table"] == P("layers", None, "norm")
    assert spec["time_proj"]["kernel"] == P("embed", None, "mlp")
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.Partitioned) for x in leaves)


def test_rope_tables_match_diffusers():
    """Our per-pair angles repeated twice are diffusers' interleaved tables, on a 3 x 4 x 5 grid."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
    cos, sin = wan_dit.rope_tables((3, 4, 5), 16, 32)
    their_cos, their_sin = WanRotaryPosEmbed(16, (1, 2, 2), 32)(torch.zeros(1, 4, 3, 8, 10))
    np.testing.assert_array_equal(np.repeat(cos, 2, axis=-1), their_cos[0, :, 0].numpy())
    np.testing.assert_array_equal(np.repeat(sin, 2, axis=-1), their_sin[0, :, 0].numpy())
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        wan_dit.rope_tables((3, 40, 5), 16, 32)


# ----------------------------------------------------------------------------------------------
# Bad input.

def _folder(root, name, config=None, tensors=None):
    """A diffusers-like folder: config.json (HF_TINY's, with `config` merged; None values drop a
    key where `config` says '__drop__') and the given tensors."""
    folder = root / name
    folder.mkdir()
    merged = {k: v for k, v in dict(dict(HF_TINY, _class_name="WanTransformer3DModel"), **(config or {})).items()
              if v != "__drop__"}
    (folder / "config.json").write_text(json.dumps(merged))
    if tensors is not None:
        save_file(tensors, str(folder / convert_wan.SINGLE))
    return str(folder)


def test_converter_errors(setup, tmp_path, python_runner):
    root = setup["root"]
    good = load_file(str(root / "hf" / convert_wan.SINGLE))

    def fails(folder, *needles):
        with pytest.raises(ConversionError) as e:
            convert_wan.convert(folder, str(tmp_path / "out"))
        assert len(str(e.value).splitlines()) == 1
        for needle in needles:
            assert needle in str(e.value), str(e.value)
        assert not (tmp_path / "out").exists()

    fails(str(tmp_path / "nowhere"), "nowhere", "not a folder")
    fails(str(tmp_path), "config.json")
    fails(_folder(tmp_path, "i2v", dict(image_dim=1280, added_kv_proj_dim=5120), good), "image_dim", "not supported")
    fails(_folder(tmp_path, "flf", dict(pos_embed_seq_len=514), good), "pos_embed_seq_len", "not supported")
    fails(_folder(tmp_path, "unknown", dict(window_size=[-1, -1]), good), "unknown field 'window_size'")
    fails(_folder(tmp_path, "qk", dict(qk_norm="rms_norm"), good), "qk_norm")
    fails(_folder(tmp_path, "cls", dict(_class_name="AutoencoderKLWan"), good), "AutoencoderKLWan")
    fails(_folder(tmp_path, "patch", dict(patch_size=[1, 2]), good), "patch_size")
    fails(_folder(tmp_path, "empty"), "diffusion_pytorch_model.safetensors")
    missing = {k: v for k, v in good.items() if k != "blocks.1.attn2.norm_k.weight"}
    fails(_folder(tmp_path, "missing", None, missing), "missing", "blocks.1.attn2.norm_k.weight")
    fails(_folder(tmp_path, "extra", None, dict(good, **{"blocks.2.ffn.net.0.proj.bias": good["proj_out.bias"]})),
          "map to no parameter", "blocks.2.ffn.net.0.proj.bias")
    # diffusers' default num_layers (40) when config.json leaves it out: the file's 2 layers miss.
    fails(_folder(tmp_path, "default", dict(num_layers="__drop__"), good), "missing", "blocks.")
    bad = dict(good, **{"blocks.0.attn1.to_q.weight": good["blocks.0.attn1.to_q.weight"][:, :32].copy()})
    fails(_folder(tmp_path, "shape", None, bad), "blocks.0.attn1.to_q.weight", "(64, 32)")
    no_norm = {k: v for k, v in good.items() if ".norm2." not in k}
    convert_wan.convert(_folder(tmp_path, "no_norm", dict(cross_attn_norm=False), no_norm), str(tmp_path / "ok"))
    with pytest.raises(ConversionError, match="not empty"):
        convert_wan.convert(str(root / "hf"), str(tmp_path / "ok"))

    # The command line: one line, exit code 2.
    r = python_runner("-m", "pixeldance.convert.wan_dit", f"--input={tmp_path / 'i2v'}",
                      f"--output={tmp_path / 'cli'}", timeout=300)
    one_line_error(r, "image_dim", "not supported")


def test_loader_errors(setup, tmp_path):
    with pytest.raises(weights.WeightsError, match="pixeldance.convert.wan_dit") as e:
        wan_dit.load_dit(str(tmp_path / "none"))
    assert str(tmp_path / "none") in str(e.value) and len(str(e.value).splitlines()) == 1
    folder = tmp_path / "no_params"
    folder.mkdir()
    (folder / "config.json").write_text(open(os.path.join(setup["ours"], "config.json")).read())
    with pytest.raises(weights.WeightsError, match="no params.safetensors.*pixeldance.convert.wan_dit"):
        wan_dit.load_dit(str(folder))
    dit = wan_dit.load_dit(setup["ours"])
    latents, timesteps, text = _inputs()
    with pytest.raises(ValueError, match="text_states"):
        dit.predict(latents, timesteps, text[:, :, :16])
    with pytest.raises(ValueError, match="channels"):
        dit.predict(latents[..., :3], timesteps, text)
