"""The Wan 2.1 VAE port (pixeldance/models/wan_vae.py) against diffusers, and its converter.

diffusers builds a small `AutoencoderKLWan` with random weights on the CPU (torch seeded; norm
scales and biases randomised too, so a mis-mapped one shows) and saves it as safetensors;
`pixeldance.convert.wan_vae` converts it; `pixeldance.load_vae` loads the result, and encode
(posterior mean and log-variance) and decode agree with diffusers' chunked passes within 1e-4.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.numpy import load_file, save_file

import pixeldance
from pixeldance import workdir as workdir_lib
from pixeldance.convert import wan_vae as convert
from pixeldance.models import causal_conv, vae_inference, wan_vae, winograd

# Small, but every kind of layer of the real one: 3 spatial and 2 temporal downsamplings (4x8x8),
# width changes (conv shortcuts), the mid-block attention, 16 latent channels.
SMALL = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
             temperal_downsample=[False, True, True])
TOL = 1e-4


def _video_u8(batch=2, frames=9, size=32, seed=0):
    """A smooth random video, uint8 [batch, frames, size, size, 3]."""
    coarse = np.random.RandomState(seed).randint(0, 256, (batch, frames, size // 4, size // 4, 3))
    return np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3).astype(np.uint8)


def _to_torch(x):
    """[B, T, H, W, C] numpy -> torch [B, C, T, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 4, 1, 2, 3)


def _from_torch(x):
    return x.permute(0, 2, 3, 4, 1).numpy()


@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory):
    """(folder written by save_pretrained, the torch model)."""
    torch.manual_seed(0)
    model = AutoencoderKLWan(**SMALL).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    folder = str(tmp_path_factory.mktemp("diffusers") / "vae")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


@pytest.fixture(scope="module")
def reference(diffusers_vae):
    """diffusers' outputs on one video: dict(video uint8, mean, logvar, decoded), channels last."""
    _, model = diffusers_vae
    video = _video_u8()
    with torch.no_grad():
        posterior = model.encode(_to_torch(video.astype(np.float32) / 127.5 - 1.0)).latent_dist
        decoded = model.decode(posterior.mean).sample
    return dict(video=video, mean=_from_torch(posterior.mean), logvar=_from_torch(posterior.logvar),
                decoded=_from_torch(decoded))


@pytest.fixture(scope="module")
def converted(diffusers_vae, tmp_path_factory):
    folder, _ = diffusers_vae
    out = str(tmp_path_factory.mktemp("converted") / "wan")
    convert.convert(folder, out)
    return out


def _compiled(fn, *args):
    """`fn` compiled for `args` with LLVM optimisation off: the same program and numerics, 2-3x
    less compile time, which is nearly all of these tests' time."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


def test_encode_and_decode_match_diffusers(converted, reference):
    vae = pixeldance.load_vae(converted)
    model, params = vae.model, vae.params
    assert isinstance(model, wan_vae.WanVAE) and model.z_dim == 16
    video = jnp.asarray(reference["video"], jnp.float32) / 127.5 - 1.0  # as VideoVAE.encode does

    def encode_decode(p, v, z):
        return model.apply(p, v, method=model.encode), model.apply(p, z, method=model.decode)

    z = jnp.asarray(reference["mean"])
    (mean, logvar), decoded = _compiled(encode_decode, params, video, z)(params, video, z)
    assert mean.shape == logvar.shape == (2, 3, 4, 4, 16) and mean.dtype == jnp.float32
    assert decoded.shape == (2, 9, 32, 32, 3)
    assert np.abs(np.asarray(mean) - reference["mean"]).max() < TOL
    assert np.abs(np.asarray(logvar) - reference["logvar"]).max() < TOL
    assert np.abs(np.asarray(decoded) - reference["decoded"]).max() < TOL
    # Not a vacuous match: the decoded video is neither flat nor clipped.
    assert reference["decoded"].std() > 0.05 and np.abs(reference["decoded"]).max() < 1.0


def _all_winograd(monkeypatch):
    """Every 3x3 causal conv on even frames takes the Winograd path, whatever its size."""
    monkeypatch.setattr(wan_vae, "CPU_WINOGRAD_MIN_CHANNELS", 0)
    monkeypatch.setattr(wan_vae, "CPU_WINOGRAD_MIN_SIZE", 0)


def test_winograd_path_matches_diffusers(converted, reference, monkeypatch):
    """The F(2x2, 3x3) convs (used for wide layers on the CPU) keep the parity with diffusers.
    The decoder only: the encoder's convs are the same module (`causal_conv`, chosen per call),
    its Winograd wiring is checked by test_chunked_equals_whole[True], and compiling the whole
    model's Winograd encoder as well doubled this test's time (68 s in the suite)."""
    _all_winograd(monkeypatch)
    vae = pixeldance.load_vae(converted)
    model, params = vae.model, vae.params
    z = jnp.asarray(reference["mean"])
    lowered = jax.jit(lambda p, z: model.apply(p, z, method=model.decode)).lower(params, z)
    assert lowered.as_text().count("dot_general") > 100  # 16 matmuls per tap: the path is taken
    decoded = lowered.compile({"xla_backend_optimization_level": 0})(params, z)
    assert np.abs(np.asarray(decoded) - reference["decoded"]).max() < TOL


def test_winograd_conv_equals_direct():
    rng = np.random.RandomState(3)
    x = jnp.asarray(rng.normal(size=(2, 4, 6, 8, 5)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 3, 5, 7)), jnp.float32)
    past = jnp.asarray(rng.normal(size=(2, 2, 6, 8, 5)), jnp.float32)
    direct = causal_conv.causal_conv(x, k, pad="zeros")
    np.testing.assert_allclose(winograd.causal_conv(x, k), direct, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(winograd.causal_conv(x[:, :1], k), direct[:, :1], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(winograd.causal_conv(x, k, past=past), causal_conv.causal_conv(x, k, past=past),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="even H, W"):
        winograd.causal_conv(x[:, :, :5], k)


def test_converted_folder(converted, diffusers_vae):
    _, model = diffusers_vae
    with open(os.path.join(converted, "config.json")) as f:
        assert json.load(f)["vae"]["family"] == "wan"
    stats = workdir_lib.LatentStats.read(converted)  # what a DiT normalises with
    mean, std = stats.mean, stats.std
    np.testing.assert_allclose(mean, model.config.latents_mean, rtol=1e-6)
    np.testing.assert_allclose(std, model.config.latents_std, rtol=1e-6)


def test_cli_converts_a_file(python_runner, diffusers_vae, converted, tmp_path):
    folder, _ = diffusers_vae
    out = str(tmp_path / "cli")
    proc = python_runner("-m", "pixeldance.convert.wan_vae",
                         f"--input={os.path.join(folder, convert.WEIGHTS)}", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out in proc.stdout
    model = convert.model_from_diffusers_config(json.load(open(os.path.join(folder, "config.json"))))
    jax.tree.map(np.testing.assert_array_equal, convert.load_params(out, model),
                 convert.load_params(converted, model))


def _copy_with(folder, dest, edit):
    """A copy of the diffusers folder `folder` at `dest` with its tensors edited by `edit(dict)`."""
    os.makedirs(dest)
    shutil.copy(os.path.join(folder, "config.json"), dest)
    tensors = load_file(os.path.join(folder, convert.WEIGHTS))
    edit(tensors)
    save_file(tensors, os.path.join(dest, convert.WEIGHTS))
    return dest


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.pop("decoder.mid_block.attentions.0.proj.weight"),
     ["missing", "decoder.mid_block.attentions.0.proj.weight"]),
    (lambda t: t.update({"encoder.extra.weight": np.zeros(3, np.float32)}), ["map to no parameter", "encoder.extra.weight"]),
    (lambda t: t.update({"quant_conv.bias": np.zeros(5, np.float32)}), ["quant_conv.bias", "(5,)"]),
], ids=["missing", "unmapped", "shape"])
def test_bad_tensors_raise(diffusers_vae, tmp_path, edit, words):
    bad = _copy_with(diffusers_vae[0], str(tmp_path / "bad"), edit)
    with pytest.raises(convert.ConversionError) as err:
        convert.convert(bad, str(tmp_path / "out"))
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert not os.path.exists(os.path.join(tmp_path, "out", "config.json"))


def test_bad_inputs_raise(diffusers_vae, converted, tmp_path):
    folder, _ = diffusers_vae
    with pytest.raises(convert.ConversionError, match="does not exist"):
        convert.convert(str(tmp_path / "nope"), str(tmp_path / "a"))
    with pytest.raises(convert.ConversionError, match="not empty"):
        convert.convert(folder, converted)
    pickled = tmp_path / "vae.pth"
    pickled.write_bytes(b"\x80\x04not really")
    with pytest.raises(convert.ConversionError, match="not a .safetensors"):
        convert.convert(str(pickled), str(tmp_path / "b"))
    with pytest.raises(convert.ConversionError, match="is_residual"):
        convert.model_from_diffusers_config(dict(is_residual=True))


@pytest.mark.parametrize("wino", [False, True])
def test_chunked_equals_whole(wino, monkeypatch):
    """diffusers' chunks (frame 0 alone, then one latent frame's worth at a time, the causal cache
    carried through a lax.scan) give the one-pass result, with direct or Winograd convs. A 2-level
    model keeps the compiles short."""
    if wino:
        _all_winograd(monkeypatch)
    model = wan_vae.WanVAE(base_dim=4, z_dim=4, dim_mult=(1, 2), num_res_blocks=1, temporal_downsample=(True,))
    rng = np.random.RandomState(1)
    # Parameters from numpy: jitting `model.init` costs far more compile time than these tests.
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), jnp.float32),
                          convert.abstract_params(model))
    video = jnp.asarray(_video_u8(batch=1, frames=7, size=8), jnp.float32) / 127.5 - 1.0

    def both(p, v):
        whole = model.apply(p, v, method=model.encode)
        chunked = vae_inference.encode_chunked(model, p, v)
        z = whole[0]
        return whole, chunked, model.apply(p, z, method=model.decode), vae_inference.decode_chunked(model, p, z)

    whole, chunked, decoded, decoded_chunked = _compiled(both, params, video)(params, video)
    for a, b in zip(whole, chunked):
        assert a.shape == b.shape == (1, 4, 4, 4, 4)
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert decoded.shape == decoded_chunked.shape == (1, 7, 8, 8, 3)
    assert np.asarray(decoded).std() > 0.05
    np.testing.assert_allclose(decoded, decoded_chunked, atol=1e-5)


def test_bad_shapes_raise():
    model = wan_vae.WanVAE(**workdir_lib.model_spec(convert.model_from_diffusers_config(SMALL)))
    params = convert.abstract_params(model)
    with pytest.raises(ValueError, match=r"F=6 frames"):
        jax.eval_shape(lambda p: model.apply(p, jnp.zeros((1, 6, 32, 32, 3)), method=model.encode), params)
    with pytest.raises(ValueError, match=r"latent shape \(1, 2, 4, 4, 8\)"):
        jax.eval_shape(lambda p: model.apply(p, jnp.zeros((1, 2, 4, 4, 8)), method=model.decode), params)
