"""C3D for the UCF-101 video IS: parity with a PyTorch re-statement of TGAN-v2's C3DVersion1UCF101
(its 'pre' stage, Chainer's resize, the mean clip and the network) on seeded random weights,
through a safetensors state dict and the converter's command line; preprocess against a numpy
re-statement of Chainer 6's resize_images; the converter's and the loader's errors.

The reference network is written here (TGAN-v2 is Chainer, not installed): the common PyTorch C3D
names (conv1, conv2, conv3a, ..., fc8), max pools with ceil_mode=True (Chainer's cover_all), fc6 on
the channels-first flattening. One full-size forward of 2 clips on each side (~80 GFLOP each).
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feature_nets import one_line_error
from pixeldance.convert import c3d as convert_c3d
from pixeldance.models import c3d, weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_NAMES = ("conv1", "conv2", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b", "fc6", "fc7", "fc8")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pixeldance.convert.c3d", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _clips(rng, b, f, h, w):
    """uint8 values [b, f, h, w, 3] (float32): a moving smooth pattern plus noise, its colours
    inverted in every other clip."""
    t, y, x = np.mgrid[0:f, 0:h, 0:w]
    smooth = np.stack([(x * 255 / w + 9 * t) % 256, y * 255 / h, (x + y + 5 * t) % 256], -1)
    smooth = np.where((np.arange(b) % 2 == 1)[:, None, None, None, None], 255 - smooth, smooth)
    return np.clip(np.round(smooth + rng.normal(0, 24, (b, f, h, w, 3))), 0, 255).astype(np.float32)


def _chainer_resize_images(x, out_h, out_w):
    """Chainer 6.0.0's F.resize_images on CPU, restated: x float32 [N, C, H, W] -> [N, C, out_h, out_w]."""
    _, _, h, w = x.shape
    vw, v = np.modf(np.linspace(0, h - 1, num=out_h))
    uw, u = np.modf(np.linspace(0, w - 1, num=out_w))
    v, u = v.astype(np.intp), u.astype(np.intp)
    vw, uw = vw.astype(np.float32)[:, None], uw.astype(np.float32)[None, :]
    v1, u1 = np.minimum(v + 1, h - 1), np.minimum(u + 1, w - 1)
    v, v1, u, u1 = v[:, None], v1[:, None], u[None, :], u1[None, :]
    return ((1 - vw) * (1 - uw) * x[:, :, v, u] + (1 - vw) * uw * x[:, :, v, u1]
            + vw * (1 - uw) * x[:, :, v1, u] + vw * uw * x[:, :, v1, u1])


@pytest.fixture(scope="module")
def reference():
    """(state dict as numpy, mean2-like clip [3, 16, 128, 171], run(clips) -> (logits, fc7)):
    TGAN-v2's C3DVersion1UCF101 forward in torch with seeded weights (He-scaled, so activations
    stay O(1..100) through 11 layers; biases random)."""
    import torch
    import torch.nn.functional as F

    class TorchC3D(torch.nn.Module):
        def __init__(self):
            super().__init__()
            widths = (3, 64, 128, 256, 256, 512, 512, 512, 512)
            for name, cin, cout in zip(TORCH_NAMES[:8], widths[:-1], widths[1:]):
                setattr(self, name, torch.nn.Conv3d(cin, cout, 3, padding=1))
            self.fc6, self.fc7, self.fc8 = (torch.nn.Linear(8192, 4096), torch.nn.Linear(4096, 4096),
                                            torch.nn.Linear(4096, 101))

        def forward(self, x):  # [B, 3, 16, 112, 112], conv1a's input
            def pool(h, k):
                return F.max_pool3d(h, k, k, ceil_mode=True)  # Chainer's cover_all
            x = pool(F.relu(self.conv1(x)), (1, 2, 2))
            x = pool(F.relu(self.conv2(x)), 2)
            x = pool(F.relu(self.conv3b(F.relu(self.conv3a(x)))), 2)
            x = pool(F.relu(self.conv4b(F.relu(self.conv4a(x)))), 2)
            x = pool(F.relu(self.conv5b(F.relu(self.conv5a(x)))), 2)  # 7 x 7 -> 4 x 4
            x = F.relu(self.fc6(x.flatten(1)))
            fc7 = F.relu(self.fc7(x))
            return self.fc8(fc7), fc7

    torch.manual_seed(0)
    net = TorchC3D().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv3d, torch.nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
                m.bias.normal_(0.0, 0.5)
    mean = np.random.default_rng(7).uniform(60, 140, (3, 16, 128, 171)).astype(np.float32)

    def run(clips):  # float32 [B, 16, H, W, 3] uint8 values, RGB
        x = (clips.transpose(0, 4, 1, 2, 3) - 128.0) / 128.0  # TGAN-v2's dataset scaling
        pre = torch.zeros(3, 3, 1, 1, 1)
        pre[[0, 1, 2], [2, 1, 0]] = 128.0  # the reference's 'pre': RGB -> BGR, x 128
        with torch.no_grad():
            x = F.conv3d(torch.from_numpy(np.ascontiguousarray(x, np.float32)), pre).numpy()
        b, c, f, h, w = x.shape
        x = _chainer_resize_images(x.transpose(0, 2, 1, 3, 4).reshape(b * f, c, h, w), 112, 112)
        x = x.reshape(b, f, c, 112, 112).transpose(0, 2, 1, 3, 4)
        x = x + (128.0 - mean[:, :, 8:120, 8:120])  # the reference's mean Bias
        with torch.no_grad():
            logits, fc7 = net(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
        return logits.numpy(), fc7.numpy()

    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    return sd, mean, run


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory):
    """The reference's state dict as safetensors and its mean clip as mean2.npz."""
    from safetensors.numpy import save_file

    sd, mean, _ = reference
    folder = tmp_path_factory.mktemp("c3d_in")
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(folder / "c3d.safetensors"))
    np.savez(str(folder / "mean2.npz"), mean=mean)
    return str(folder / "c3d.safetensors"), str(folder / "mean2.npz")


@pytest.fixture(scope="module")
def converted(files, tmp_path_factory):
    sd_path, mean_path = files
    out = str(tmp_path_factory.mktemp("c3d") / "c3d")
    result = _cli(f"--input={sd_path}", f"--mean={mean_path}", f"--output={out}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote {out}") and "load_c3d" in lines[0], result.stdout
    return out


def test_parity_with_tgan2_c3d_on_random_weights(converted, reference):
    _, _, run = reference
    clips = _clips(np.random.default_rng(0), 2, 16, 72, 96)  # not 112 x 112: the resize is in the path
    want_logits, want_fc7 = run(clips)
    model, variables = c3d.load_c3d(converted)
    out = jax.jit(lambda v, x: model.apply(v, c3d.preprocess(x)))(variables, clips)
    for got, want in ((out["logits"], want_logits), (out["fc7"], want_fc7)):
        got = np.asarray(got)
        assert got.shape == want.shape
        err = np.abs(got - want).max() / np.abs(want).max()
        print(f"max abs {np.abs(got - want).max():.3g}, relative to max |want| {err:.3g}")
        assert err < 1e-4
    assert np.abs(want_logits).max() > 1.0 and (want_fc7 > 0).mean() > 0.2  # a live signal, not ~0
    # The two clips' logits differ well above the tolerance, so a per-clip fault cannot hide.
    assert np.abs(np.diff(want_logits, axis=0)).max() > 0.05 * np.abs(want_logits).max()


def test_preprocess_matches_chainers_resize():
    clips = _clips(np.random.default_rng(3), 1, 3, 50, 70)
    got = np.asarray(jax.jit(c3d.preprocess)(clips))
    x = clips[..., ::-1].transpose(0, 1, 4, 2, 3).reshape(3, 3, 50, 70)  # BGR, [B * F, C, H, W]
    want = _chainer_resize_images(x, 112, 112).reshape(1, 3, 3, 112, 112).transpose(0, 1, 3, 4, 2)
    assert got.shape == (1, 3, 112, 112, 3)
    assert np.abs(got - want).max() < 1e-3  # values in [0, 255]: a few float32 roundings
    # Chainer's resize is torch's bilinear with align_corners=True (positions in float64 vs float32).
    import torch
    import torch.nn.functional as F
    aligned = F.interpolate(torch.from_numpy(x.copy()), size=(112, 112), mode="bilinear", align_corners=True)
    assert np.abs(aligned.numpy() - _chainer_resize_images(x, 112, 112)).max() < 1e-2
    # At 112 x 112 only the channels are swapped.
    same = _clips(np.random.default_rng(4), 1, 2, 112, 112)
    assert np.array_equal(np.asarray(c3d.preprocess(same)), same[..., ::-1])


def test_input_contract_and_highest_precision():
    model = c3d.C3D()
    variables = c3d.abstract_variables(model)
    out = jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((3, 16, 112, 112, 3), jnp.float32))
    assert {k: v.shape for k, v in out.items()} == {"logits": (3, 101), "fc7": (3, 4096)}
    assert variables["params"]["mean"].shape == (16, 112, 112, 3)
    assert variables["params"]["fc6"]["kernel"].shape == (8192, 4096)  # pool5 is 4 x 4 (cover_all)
    for bad in ((1, 17, 112, 112, 3), (1, 16, 128, 128, 3), (16, 112, 112, 3)):
        with pytest.raises(ValueError, match="C3D takes clips"):
            jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct(bad, jnp.float32))
    with pytest.raises(ValueError, match="preprocess takes videos"):
        c3d.preprocess(jnp.zeros((2, 16, 64, 64)))

    # Every conv and matmul at HIGHEST (TPU would otherwise run them in bf16): 8 convs, 3 dense,
    # 2 resize contractions.
    def forward(v, x):
        return model.apply(v, c3d.preprocess(x))
    jaxpr = jax.make_jaxpr(forward)(variables, jax.ShapeDtypeStruct((1, 16, 64, 80, 3), jnp.float32))
    prims = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("conv_general_dilated", "dot_general")]
    assert len(prims) == 13
    for eqn in prims:
        precision = eqn.params["precision"]
        precision = precision if isinstance(precision, tuple) else (precision, precision)
        assert precision == (jax.lax.Precision.HIGHEST,) * 2, eqn


def test_converter_reads_tgan2_npz_and_refuses_misfits(reference, converted, tmp_path):
    sd, mean, _ = reference
    _, variables = c3d.load_c3d(converted)
    params = variables["params"]
    np.testing.assert_array_equal(params["conv1a"]["kernel"], sd["conv1.weight"].transpose(2, 3, 4, 1, 0))
    np.testing.assert_array_equal(params["fc6"]["kernel"], sd["fc6.weight"].T)
    np.testing.assert_array_equal(params["mean"], mean[:, :, 8:120, 8:120].transpose(1, 2, 3, 0))
    assert len(jax.tree.leaves(variables)) == len(sd) + 1 == 23

    # TGAN-v2's conv3d_deepnetA_ucf.npz: Chainer names (conv1a/W, ...), the same layouts; here with
    # the mean clip inside the same file, which --mean may then be left out for.
    chainer = {("conv1a" if k.startswith("conv1.") else "conv2a" if k.startswith("conv2.") else k.split(".")[0])
               + "/" + {"weight": "W", "bias": "b"}[k.split(".")[1]]: v for k, v in sd.items()}
    npz = str(tmp_path / "conv3d_deepnetA_ucf.npz")
    np.savez(npz, mean=mean[:, :, 8:120, 8:120], **chainer)  # an already cropped mean is taken as is
    config = convert_c3d.convert(npz, str(tmp_path / "from_npz"))
    assert npz in config["source"] and config["num_classes"] == 101
    _, from_npz = c3d.load_c3d(str(tmp_path / "from_npz"))
    for a, b in zip(jax.tree.leaves(from_npz), jax.tree.leaves(variables)):
        assert np.array_equal(a, b)

    full = dict(sd, mean=mean)
    cases = [
        ({k: v for k, v in full.items() if k != "conv4b.bias"}, "missing, first: conv4b.bias"),
        ({k: v for k, v in full.items() if k != "mean"}, "--mean=mean2.npz"),
        (dict(full, **{"fc9.weight": np.zeros((3, 3), np.float32)}), "tensor fc9.weight maps to no variable"),
        (dict(full, **{"conv1a.bias": sd["conv1.bias"]}), "conv1.bias and conv1a.bias both map"),
        (dict(full, **{"fc6.weight": sd["fc6.weight"].T.copy()}), "fc6.weight has shape (8192, 4096)"),
        (dict(full, mean=mean[:, :, :100]), "H and W must be >= 120"),
        (dict(full, mean=mean[:2]), "mean has shape (2, 16, 128, 171)"),
    ]
    for tensors, needle in cases:
        with pytest.raises(convert_c3d.ConversionError) as e:
            convert_c3d.convert_variables(tensors, "in.safetensors")
        assert needle in str(e.value) and "in.safetensors" in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_cli_errors_are_one_line_with_exit_2(files, tmp_path):
    import torch
    from safetensors.numpy import save_file

    sd_path, mean_path = files
    missing = str(tmp_path / "nowhere.safetensors")
    one_line_error(_cli(f"--input={missing}", f"--mean={mean_path}", f"--output={tmp_path / 'a'}"),
                    missing, "does not exist", "tgan2")

    wrong = str(tmp_path / "wrong.safetensors")  # one tensor, mis-shaped: named before anything is missing
    save_file({"conv3a.weight": np.zeros((256, 128, 3, 3, 1), np.float32)}, wrong)
    one_line_error(_cli(f"--input={wrong}", f"--mean={mean_path}", f"--output={tmp_path / 'b'}"),
                    wrong, "conv3a.weight has shape (256, 128, 3, 3, 1)")

    one_line_error(_cli(f"--input={sd_path}", f"--output={tmp_path / 'c'}"), sd_path, "--mean=mean2.npz")

    no_mean = str(tmp_path / "std.npz")
    np.savez(no_mean, std=np.ones((3, 16, 128, 171), np.float32))
    one_line_error(_cli(f"--input={wrong}", f"--mean={no_mean}", f"--output={tmp_path / 'c'}"),
                    no_mean, "no array 'mean'")

    pth = str(tmp_path / "c3d.pth")  # a torch pickle (a zip since torch 1.6) is refused unread
    torch.save({"fc8.bias": torch.zeros(101)}, pth)
    one_line_error(_cli(f"--input={pth}", f"--mean={mean_path}", f"--output={tmp_path / 'd'}"),
                    pth, "never a pickle")
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_load_c3d_errors(converted, tmp_path):
    config, variables = weights.load(converted, c3d.NETWORK, c3d.ORIGIN)
    assert config["num_classes"] == 101 and "mean2.npz" in config["source"]
    assert config["sha256"] == weights.sha256(os.path.join(converted, weights.PARAMS))

    with pytest.raises(weights.WeightsError, match="convert.c3d") as e:
        c3d.load_c3d(str(tmp_path / "nothing"))
    assert "\n" not in str(e.value)

    weights.save(str(tmp_path / "other"), {"network": "i3d"}, {"params": {"x": np.zeros(1)}})
    with pytest.raises(weights.WeightsError, match="holds 'i3d' weights, not 'c3d'"):
        c3d.load_c3d(str(tmp_path / "other"))

    del variables["params"]["mean"]
    weights.save(str(tmp_path / "short"), {"network": "c3d"}, variables)
    with pytest.raises(weights.WeightsError, match="missing array params/mean") as e:
        c3d.load_c3d(str(tmp_path / "short"))
    assert str(tmp_path / "short") in str(e.value) and "\n" not in str(e.value)
