"""Tests of the causal video VAE model (pixeldance/models/vae.py), on the tiny 'mu' variant."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from pixeldance import sharding
from pixeldance.models import causal_conv, vae_inference
from pixeldance.models import vae as vae_lib
from pixeldance.models.vae import CausalVAE, VAE_VARIANTS, vae_from_variant

SIZE = 16  # pixels; latents are 2 x 2


# Test data comes from numpy: XLA:CPU takes seconds to compile a jax.random draw of rank >= 4.

def _normal(shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).normal(size=shape), jnp.float32)


def _perturb(x, index, seed=3):
    """x with unit noise added to frame `index` (axis 1)."""
    return x.at[:, index].add(_normal(x[:, index].shape, seed))


def _video(frames, size=SIZE, batch=1, seed=0):
    """A smooth random video in [-1, 1]: [batch, frames, size, size, 3]."""
    rng = np.random.RandomState(seed)
    coarse = rng.uniform(-1, 1, (batch, frames, size // 4, size // 4, 3))
    return jnp.asarray(np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3), jnp.float32)


@pytest.fixture(scope="module")
def model():
    return vae_from_variant("mu")


@pytest.fixture(scope="module")
def params(model):
    # Everything is jitted: op-by-op execution of a conv net is many times slower than compiling.
    return jax.jit(model.init)(jax.random.PRNGKey(0), _video(5))


@pytest.fixture(scope="module")
def encode(model):
    return jax.jit(lambda p, v: model.apply(p, v, method=CausalVAE.encode))


@pytest.fixture(scope="module")
def decode(model):
    return jax.jit(lambda p, z: model.apply(p, z, method=CausalVAE.decode))


@pytest.fixture(scope="module")
def call(model):
    return jax.jit(lambda p, v, rng=None: model.apply(p, v, sample_rng=rng))


@pytest.fixture(scope="module")
def call_both(model):
    """(__call__ without, __call__ with sample_rng) in one compile."""
    return jax.jit(lambda p, v, rng: (model.apply(p, v), model.apply(p, v, sample_rng=rng)))


# ---------------------------------------------------------------------------------------------
# Shapes and input checks.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("frames", [1, 5, 9])
def test_shapes(params, encode, decode, call, frames):
    video = _video(frames, batch=2)
    t = 1 + (frames - 1) // 4
    mean, logvar = encode(params, video)
    assert mean.shape == logvar.shape == (2, t, SIZE // 8, SIZE // 8, 16)
    assert mean.dtype == logvar.dtype == jnp.float32
    recon = decode(params, mean)
    assert recon.shape == video.shape and recon.dtype == jnp.float32

    # __call__ runs in test_sampling; here only its shapes (no compile).
    out = jax.eval_shape(call, params, video)
    assert {k: v.shape for k, v in out.items()} == dict(
        recon=video.shape, mean=mean.shape, logvar=mean.shape, z=mean.shape)


def test_non_square_and_larger_inputs(params, call):
    out = jax.eval_shape(call, params, _video(5, size=32)[:, :, :, :16])
    assert out["z"].shape == (1, 2, 4, 2, 16) and out["recon"].shape == (1, 5, 32, 16, 3)


def test_call_and_sampling(params, encode, decode, call_both):
    video = _video(5)
    plain, out = call_both(params, video, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(plain["z"], plain["mean"])  # no sample_rng: z is the mean
    mean, _ = encode(params, video)
    np.testing.assert_allclose(plain["mean"], mean, atol=1e-5)
    np.testing.assert_allclose(plain["recon"], decode(params, mean), atol=1e-5)
    # With sample_rng: z = mean + exp(logvar / 2) * unit noise.
    np.testing.assert_array_equal(out["mean"], plain["mean"])
    assert not np.allclose(out["z"], out["mean"])
    std = np.exp(0.5 * np.asarray(out["logvar"]))
    noise = (np.asarray(out["z"]) - np.asarray(out["mean"])) / std
    assert np.all(np.isfinite(noise)) and 0.3 < noise.std() < 3.0
    assert np.all(np.asarray(out["logvar"]) >= vae_lib.LOGVAR_MIN)
    assert np.all(np.asarray(out["logvar"]) <= vae_lib.LOGVAR_MAX)


@pytest.mark.parametrize("shape, what", [
    ((1, 4, 16, 16, 3), "F=4"),
    ((1, 6, 16, 16, 3), "F=6"),
    ((1, 5, 12, 16, 3), "H=12"),
    ((1, 5, 16, 20, 3), "W=20"),
    ((1, 5, 16, 16, 4), "[B, F, H, W, 3]"),
    ((5, 16, 16, 3), "[B, F, H, W, 3]"),
])
def test_bad_video_shape_raises(model, params, shape, what):
    with pytest.raises(ValueError, match="video shape") as err:
        model.apply(params, jnp.zeros(shape), method=CausalVAE.encode)
    message = str(err.value)
    assert str(shape) in message and what in message and "\n" not in message


def test_bad_latent_shape_raises(model, params):
    with pytest.raises(ValueError, match=r"latent shape \(1, 2, 2, 2, 8\)"):
        model.apply(params, jnp.zeros((1, 2, 2, 2, 8)), method=CausalVAE.decode)


def test_unknown_variant_names_valid_ones():
    with pytest.raises(ValueError) as err:
        vae_from_variant("nope")
    for name in ("mu", "shapes", "S", "B"):
        assert repr(name) in str(err.value)


def test_variants_compress_4x8x8_to_16_channels():
    assert set(VAE_VARIANTS) == {"mu", "shapes", "shapes_wide", "S", "B"}
    video = jax.ShapeDtypeStruct((1, 5, 16, 16, 3), jnp.float32)
    sizes = {}
    for name in VAE_VARIANTS:
        m = vae_from_variant(name)
        assert (m.temporal_factor, m.spatial_factor, m.latent_channels) == (4, 8, 16), name
        abstract = jax.eval_shape(m.init, jax.random.PRNGKey(0), video)  # traces, no compile
        sizes[name] = sum(x.size for x in jax.tree.leaves(nn.unbox(abstract)))
    assert sizes["mu"] < sizes["shapes"] < sizes["S"] < sizes["B"], sizes
    assert vae_from_variant("mu", latent_channels=4).latent_channels == 4


def test_bad_constructor_fields_raise():
    with pytest.raises(ValueError, match="temporal_downsample"):
        vae_from_variant("mu", temporal_downsample=(True,)).init(jax.random.PRNGKey(0), _video(5))


# ---------------------------------------------------------------------------------------------
# Rearrangements.
# ---------------------------------------------------------------------------------------------

def test_rearrangements_invert():
    x = _normal((2, 7, 4, 6, 3))
    np.testing.assert_array_equal(causal_conv.depth_to_space(causal_conv.space_to_depth(x, 2), 2), x)
    paired = causal_conv.pair_frames(x)
    assert paired.shape == (2, 4, 4, 6, 6)
    np.testing.assert_array_equal(causal_conv.unpair_frames(paired), x)


def test_conv_matches_a_reference_3d_conv():
    """The sum-of-2D-convs causal conv equals lax's 3D conv on the replicate- or zero-padded input."""
    x, k = _normal((2, 5, 6, 6, 4)), _normal((3, 3, 3, 4, 5), seed=1)
    padded = jnp.concatenate([x[:, :1], x[:, :1], x], axis=1)
    ref = jax.lax.conv_general_dilated(padded, k, (1, 1, 1), ((0, 0), (1, 1), (1, 1)),
                                       dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    np.testing.assert_allclose(causal_conv.causal_conv(x, k), ref, atol=1e-4, rtol=1e-4)
    zero_padded = jnp.concatenate([jnp.zeros_like(x[:, :2]), x], axis=1)
    ref = jax.lax.conv_general_dilated(zero_padded, k, (1, 1, 1), ((0, 0), (1, 1), (1, 1)),
                                       dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    np.testing.assert_allclose(causal_conv.causal_conv(x, k, pad="zeros"), ref, atol=1e-4, rtol=1e-4)
    # Clips shorter than the kernel: every output reads padding on some tap.
    for pad, front in (("first", x[:, :1]), ("zeros", jnp.zeros_like(x[:, :1]))):
        short = x[:, :1]
        ref = jax.lax.conv_general_dilated(jnp.concatenate([front, front, short], axis=1), k, (1, 1, 1),
                                           ((0, 0), (1, 1), (1, 1)), dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        np.testing.assert_allclose(causal_conv.causal_conv(short, k, pad=pad), ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Causality.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", [vae_lib.FrameGroupNorm(8), vae_lib.ChannelRMSNorm()],
                         ids=["group", "rms"])
def test_norms_use_no_statistics_over_time(norm):
    x = _normal((2, 4, 4, 4, 16))
    variables = norm.init(jax.random.PRNGKey(1), x)
    y = norm.apply(variables, x)
    y2 = norm.apply(variables, _perturb(x, 2))
    np.testing.assert_array_equal(y2[:, [0, 1, 3]], y[:, [0, 1, 3]])
    assert not np.allclose(y2[:, 2], y[:, 2])


def test_encoder_first_latent_sees_only_first_frame(params, encode):
    video = _video(9)
    mean, logvar = encode(params, video)
    later = video.at[:, 1:].set(_video(8, seed=1))
    mean2, logvar2 = encode(params, later)
    np.testing.assert_allclose(mean2[:, 0], mean[:, 0], atol=1e-6)
    np.testing.assert_allclose(logvar2[:, 0], logvar[:, 0], atol=1e-6)
    assert not np.allclose(mean2[:, 1:], mean[:, 1:], atol=1e-3)


@pytest.mark.parametrize("frame", range(9))
def test_encoder_is_causal(params, encode, frame):
    """Latent j depends on pixel frames 0..4j only: perturbing frame f changes latents >= ceil(f/4)."""
    video = _video(9)
    mean, _ = encode(params, video)
    mean2, _ = encode(params, _perturb(video, frame))
    first = math.ceil(frame / 4)
    np.testing.assert_allclose(mean2[:, :first], mean[:, :first], atol=1e-6)
    assert not np.allclose(mean2[:, first], mean[:, first], atol=1e-4)


def test_encoder_frame_5_example(params, encode):
    video = _video(9)
    mean, _ = encode(params, video)
    mean2, _ = encode(params, _perturb(video, 5))
    np.testing.assert_allclose(mean2[:, :2], mean[:, :2], atol=1e-6)
    assert not np.allclose(mean2[:, 2], mean[:, 2], atol=1e-4)


@pytest.mark.parametrize("latent", range(3))
def test_decoder_is_causal(params, encode, decode, latent):
    """Pixel frame 0 depends on latent 0 only; frame f >= 1 on latents 0..ceil(f/4).

    So perturbing latent j >= 1 leaves frames 0 .. 4(j-1) (the frames of latents < j) unchanged
    and changes the frames of its own group, 4j-3 .. 4j.
    """
    z, _ = encode(params, _video(9))  # T = 3
    recon = decode(params, z)
    recon2 = decode(params, _perturb(z, latent))
    first = 0 if latent == 0 else 1 + 4 * (latent - 1)
    np.testing.assert_allclose(recon2[:, :first], recon[:, :first], atol=1e-6)
    for f in range(first, first + (1 if latent == 0 else 4)):
        assert not np.allclose(recon2[:, f], recon[:, f], atol=1e-4), f


def test_image_latent_matches_first_frame_of_video(params, encode, decode):
    """An image is a one-frame video: its latent is the first latent of any video starting with it."""
    video = _video(9)
    z_video, _ = encode(params, video)
    z_image, _ = encode(params, video[:, :1])
    np.testing.assert_allclose(z_image[:, 0], z_video[:, 0], atol=1e-6)
    # Different frame counts may pick different conv algorithms: equal up to float rounding.
    np.testing.assert_allclose(decode(params, z_image)[:, 0], decode(params, z_video)[:, 0], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Sharding annotations.
# ---------------------------------------------------------------------------------------------

def test_every_param_is_partitioned_with_known_logical_names(model):
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), _video(5))
    leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    known = set(sharding.PRESETS["fsdp"])
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), leaf
        assert len(leaf.names) == leaf.value.ndim
        assert set(leaf.names) - {None} <= known, leaf.names
        assert leaf.names in {(None, None, None, "conv_in", "conv_out"), ("conv_out",), ("norm",)}

    specs = nn.get_partition_spec(abstract)
    assert all(isinstance(s, jax.sharding.PartitionSpec) for s in jax.tree.leaves(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    mesh = sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1])
    shardings = sharding.tree_shardings(mesh, abstract, "fsdp")
    flat = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    assert len(flat) == len(leaves)
    assert all(isinstance(s, jax.sharding.NamedSharding) for s in flat)


# ---------------------------------------------------------------------------------------------
# Training signal.
# ---------------------------------------------------------------------------------------------

def test_gradients_are_finite_and_adam_overfits_one_video(model, params):
    """Finite gradients of L1 + KL on a sampled latent; 20 Adam steps (lr 1e-3) reduce the L1."""
    video = _video(5)
    params = nn.unbox(params)
    opt = optax.adam(1e-3)

    def loss_fn(p, rng):
        out = model.apply(p, video, sample_rng=rng)
        l1 = jnp.mean(jnp.abs(out["recon"] - video))
        kl = 0.5 * jnp.mean(jnp.square(out["mean"]) + jnp.exp(out["logvar"]) - 1 - out["logvar"])
        return l1 + 1e-6 * kl, l1

    @jax.jit
    def step(p, opt_state, rng):
        (_, l1), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, rng)
        updates, opt_state = opt.update(grads, opt_state, p)
        norms = jnp.stack([jnp.linalg.norm(g) for g in jax.tree.leaves(grads)])
        return optax.apply_updates(p, updates), opt_state, l1, norms

    opt_state = opt.init(params)
    losses = []
    for i in range(20):
        params, opt_state, l1, norms = step(params, opt_state, jax.random.PRNGKey(i))
        assert np.all(np.isfinite(norms)) and float(norms.sum()) > 0, i
        losses.append(float(l1))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.85 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# Chunked and tiled passes.
# ---------------------------------------------------------------------------------------------

def _numpy_params(model, shape, seed=0):
    """Parameters without compiling `init` (which costs these tests more than the passes):
    fan-in scaled normal kernels, small random biases, unit norm scales."""
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape)))
    rng = np.random.RandomState(seed)

    def fill(path, x):
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(rng.normal(0, 1 / math.sqrt(math.prod(x.shape[:-1])), x.shape), jnp.float32)
        if name == "scale":
            return jnp.ones(x.shape, jnp.float32)
        return jnp.asarray(rng.normal(0, 0.1, x.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def test_chunked_equals_whole(model, params):
    """Chunk by chunk with the causal cache gives the one-pass encode and decode within 1e-5
    (float rounding). 13 frames = 4 latents: with 2 latent frames per chunk, frame 0 alone,
    one scanned chunk of 2, then a shorter tail of 1 (every path of the chunked passes)."""
    video = _video(13)

    def run(p, v):
        whole = model.apply(p, v, method=CausalVAE.encode)
        z = whole[0]
        return (whole, vae_inference.encode_chunked(model, p, v, chunk=2),
                model.apply(p, z, method=CausalVAE.decode), vae_inference.decode_chunked(model, p, z, chunk=2))

    whole, chunked, decoded, decoded_chunked = jax.jit(run)(params, video)
    for a, b in zip(whole, chunked):
        assert a.shape == b.shape == (1, 4, 2, 2, 16)
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert decoded.shape == decoded_chunked.shape == (1, 13, 16, 16, 3)
    assert float(np.std(decoded)) > 0.05
    np.testing.assert_allclose(decoded_chunked, decoded, atol=1e-5)


def test_chunks_split_a_video_causally():
    """The chunk layout: frame 0 alone, then 4 * chunk frames; a shorter tail at the end."""
    x = jnp.arange(2 * 13, dtype=jnp.float32).reshape(2, 13, 1, 1, 1)
    body, tail = vae_inference._split_chunks(x, 1, 8)
    assert body.shape == (1, 2, 8, 1, 1, 1) and tail.shape == (2, 4, 1, 1, 1)
    np.testing.assert_array_equal(vae_inference._join_chunks(x[:, :1], body, tail), x)
    body, tail = vae_inference._split_chunks(x, 1, 4)
    assert body.shape == (3, 2, 4, 1, 1, 1) and tail is None


# Tile geometry of the tiling test, along W (in latent pixels): tiles [0, 12) and [8, 20), which
# blend over [8, 12). The mu decoder's receptive field reaches ~4.75 latent pixels, so latent
# columns < 7 and >= 13 see nothing of the other tile's border: there tiling is exact.
TILE, OVERLAP, WIDTH = 12, 4, 20
# In the blended columns a random-init network (no training smooths its boundary effects) is
# off by up to about its output std; bound the mean and the max error there relative to that std.
SEAM_MEAN_TOL, SEAM_MAX_TOL = 0.25, 1.5


def test_tiled_is_exact_away_from_seams_and_close_at_them():
    model = vae_from_variant("mu", norm_groups=0)  # per-position norm: no statistics over a tile
    s = model.spatial_factor
    video = _video(5, size=WIDTH * s)[:, :, :4 * s]  # [1, 5, 32, 160, 3]
    params = _numpy_params(model, video.shape)
    z = _normal((1, 2, 4, WIDTH, 16))

    def run(p, v, z):  # tiles decoded chunk by chunk: tiling and chunking together
        return (model.apply(p, z, method=CausalVAE.decode),
                vae_inference.decode_tiled(model, p, z, tile=TILE, overlap=OVERLAP, chunk=1),
                model.apply(p, v, method=CausalVAE.encode)[0],
                vae_inference.encode_tiled(model, p, v, tile=TILE * s, overlap=OVERLAP * s)[0])

    whole, tiled, mean, mean_tiled = jax.jit(run)(params, video, z)
    assert tiled.shape == whole.shape == (1, 5, 32, 160, 3) and mean_tiled.shape == mean.shape
    assert float(np.std(whole)) > 0.1
    for out, ref, scale in ((tiled, whole, s), (mean_tiled, mean, 1)):
        diff = np.abs(np.asarray(out) - np.asarray(ref))
        err = diff.max(axis=(0, 1, 2, 4))  # per column
        away = np.r_[0:7 * scale, 13 * scale:WIDTH * scale]
        seam = diff[:, :, :, 8 * scale:12 * scale]
        std = float(np.std(ref))
        print(f"tiling error / std: away {err[away].max() / std:.2e}, seam mean "
              f"{seam.mean() / std:.3f}, seam max {seam.max() / std:.3f}")
        assert err[away].max() < 1e-5, err[away].max()
        assert 0 < seam.mean() < SEAM_MEAN_TOL * std and seam.max() < SEAM_MAX_TOL * std


def test_discriminator_params_are_partitioned_and_shapes():
    model = vae_from_variant("mu", disc_channels=(8, 16))
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), _video(5))
    disc = abstract["params"]["discriminator"]
    leaves = jax.tree.leaves(disc, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(l, nn.Partitioned) for l in leaves)
    assert {l.names for l in leaves} <= {(None, None, None, "conv_in", "conv_out"), ("conv_out",)}
    logits = jax.eval_shape(lambda p, v: model.apply(p, v, method=CausalVAE.discriminate),
                            abstract, _video(9))
    assert logits.shape == (1, 9, 8, 8, 1)
    with pytest.raises(ValueError, match="no discriminator"):
        jax.eval_shape(lambda p, v: vae_from_variant("mu").apply(p, v, method=CausalVAE.discriminate),
                       abstract, _video(9))


def test_conv_frames_per_frame_equals_batched():
    """The CPU's frame-by-frame conv (lax.map over T) equals one conv over all frames, with gradients."""
    x, k = _normal((2, 3, 6, 6, 4)), _normal((3, 3, 4, 5), seed=1)
    for strides, padding in (((1, 1), "SAME"), ((2, 2), ((0, 1), (0, 1)))):
        f = lambda x, k, per_frame: jnp.sum(jnp.sin(causal_conv.conv_frames(x, k, strides, padding, per_frame)))
        np.testing.assert_allclose(causal_conv.conv_frames(x, k, strides, padding, True),
                                   causal_conv.conv_frames(x, k, strides, padding, False), atol=1e-5, rtol=1e-5)
        g_map = jax.grad(f, (0, 1))(x, k, True)
        g_one = jax.grad(f, (0, 1))(x, k, False)
        for a, b in zip(g_map, g_one):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pad", ["first", "zeros"])
def test_causal_conv_per_frame_equals_per_tap(pad):
    """The CPU's frame-by-frame causal conv (one lax.map step per output frame) equals the
    per-tap one, with and without a chunk's past frames, and in its gradients."""
    x, k = _normal((2, 5, 6, 6, 4)), _normal((3, 3, 3, 4, 5), seed=1)
    past = _normal((2, 2, 6, 6, 4), seed=2)
    for kwargs in (dict(pad=pad), dict(past=past)):
        for xs in (x, x[:, :1], x[:, :2]):
            np.testing.assert_allclose(causal_conv.causal_conv(xs, k, per_frame=True, **kwargs),
                                       causal_conv.causal_conv(xs, k, per_frame=False, **kwargs), atol=1e-5, rtol=1e-5)
    f = lambda x, k, per_frame: jnp.sum(jnp.sin(causal_conv.causal_conv(x, k, pad=pad, per_frame=per_frame)))
    for a, b in zip(jax.grad(f, (0, 1))(x, k, True), jax.grad(f, (0, 1))(x, k, False)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
