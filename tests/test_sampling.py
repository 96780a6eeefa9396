"""Samplers, PixelDance conditioning and objectives (pure functions), and the sampling pipeline."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pixeldance
from pixeldance.data import synthetic
from pixeldance.diffusion import conditioning, objectives, samplers, schedules

SAMPLERS = ("euler", "heun")


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", SAMPLERS)
def test_constant_velocity_integrates_exactly(sampler):
    x_init = jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 5))
    c = jnp.linspace(-1.0, 1.0, 5)
    x = samplers.sample(lambda x, t, i: jnp.broadcast_to(c, x.shape), x_init, steps=7, sampler=sampler)
    assert x.shape == x_init.shape and x.dtype == x_init.dtype
    # From t = 1 to t = 0: x(0) = x(1) - c.
    np.testing.assert_allclose(x, x_init - c, atol=1e-5)


def test_time_grid():
    grid = schedules.time_grid(4)
    np.testing.assert_allclose(grid, [1.0, 0.75, 0.5, 0.25, 0.0])
    shifted = schedules.time_grid(4, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert np.all(np.diff(shifted) < 0) and np.all(shifted[1:-1] > grid[1:-1])  # more time near noise


def _linear_ode_errors(sampler, a=1.5, steps=(4, 8, 16, 32)):
    """|x(0) - exact| for dx/dt = a x integrated from x(1) = 1 to t = 0 (exact: exp(-a))."""
    x_init = jnp.ones((3,))
    return np.array([abs(float(samplers.sample(lambda x, t, i: a * x, x_init, steps=n, sampler=sampler)[0])
                         - np.exp(-a)) for n in steps])


def test_euler_and_heun_converge_at_their_order():
    euler, heun = _linear_ode_errors("euler"), _linear_ode_errors("heun")
    orders_euler = np.log2(euler[:-1] / euler[1:])
    orders_heun = np.log2(heun[:-1] / heun[1:])
    assert np.all((orders_euler > 0.8) & (orders_euler < 1.3)), orders_euler
    assert np.all(orders_heun > 1.8), orders_heun
    assert np.all(heun < euler)
    assert heun[-1] < 1e-3


def test_gaussian_flow_is_transported_to_the_data():
    """x0 ~ N(mu, s^2): the exact rectified-flow velocity maps noise z to mu + s z."""
    mu, s = 2.0, 0.5

    def velocity(x, t, i):
        m = (1.0 - t) * mu
        var = (1.0 - t) ** 2 * s ** 2 + t ** 2
        dvar = -2.0 * (1.0 - t) * s ** 2 + 2.0 * t
        return -mu + dvar / (2.0 * var) * (x - m)

    z = jax.random.normal(jax.random.key(1), (64,))
    for sampler, steps, tol in (("heun", 40, 2e-3), ("euler", 400, 2e-2)):
        x = samplers.sample(velocity, z, steps=steps, sampler=sampler)
        np.testing.assert_allclose(x, mu + s * z, atol=tol, err_msg=sampler)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_step_index_and_projection(sampler):
    steps = 5
    x_init = jnp.zeros((2, 3))
    # The velocity is 1 for the first two steps only (how the pipeline switches conditioning at tau).
    x = samplers.sample(lambda x, t, i: jnp.where(i < 2, 1.0, 0.0) * jnp.ones_like(x), x_init,
                        steps=steps, sampler=sampler)
    np.testing.assert_allclose(x, -2.0 / steps * np.ones((2, 3)), atol=1e-6)
    # project runs after every step (and on x_init): a pinned entry stays pinned.
    x = samplers.sample(lambda x, t, i: jnp.ones_like(x), x_init, steps=steps, sampler=sampler,
                        project=lambda x: x.at[0].set(7.0))
    np.testing.assert_allclose(x[0], 7.0)
    np.testing.assert_allclose(x[1], -1.0, atol=1e-6)


def test_sampler_is_jittable_and_rejects_unknown_names():
    f = jax.jit(lambda x: samplers.sample(lambda x, t, i: -x, x, steps=3, sampler="heun"))
    assert f(jnp.ones((2, 2))).shape == (2, 2)
    with pytest.raises(ValueError, match="rk4"):
        samplers.sample(lambda x, t, i: x, jnp.ones(2), steps=2, sampler="rk4")


# ---------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------

def _latents(B=3, H=2, W=3, C=4):
    k1, k2 = jax.random.split(jax.random.key(2))
    return jax.random.normal(k1, (B, H, W, C)) + 5.0, jax.random.normal(k2, (B, H, W, C)) - 5.0


def test_make_instructions():
    z_first, z_last = _latents()
    has_first = jnp.array([True, True, False])
    has_last = jnp.array([True, False, False])
    c, m = conditioning.make_instructions(z_first, z_last, has_first, has_last, 4)
    assert c.shape == (3, 4, 2, 3, 4) and m.shape == (3, 4, 2, 3, 1)
    # Example 0: [z_first, 0, 0, z_last]; example 1: [z_first, 0, 0, 0]; example 2: nothing.
    np.testing.assert_array_equal(c[0, 0], z_first[0])
    np.testing.assert_array_equal(c[0, -1], z_last[0])
    np.testing.assert_array_equal(c[1, 0], z_first[1])
    np.testing.assert_array_equal(c[:, 1:3], 0.0)
    np.testing.assert_array_equal(c[1:, -1], 0.0)
    np.testing.assert_array_equal(c[2], 0.0)
    expected_mask = np.array([[1, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(m, np.broadcast_to(expected_mask[:, :, None, None, None], m.shape))


def test_make_instructions_one_frame():
    z_first, z_last = _latents()
    has = jnp.array([True, True, False])
    c, m = conditioning.make_instructions(z_first, z_last, has, has, 1)
    assert c.shape == (3, 1, 2, 3, 4) and m.shape == (3, 1, 2, 3, 1)
    # With one latent frame only the first frame can be given: the last one never overwrites it.
    np.testing.assert_array_equal(c[:2, 0], z_first[:2])
    np.testing.assert_array_equal(c[2], 0.0)
    np.testing.assert_array_equal(m[:, 0, 0, 0, 0], [1.0, 1.0, 0.0])


def test_drop_last():
    z_first, z_last = _latents()
    has = jnp.array([True, True, True])
    c, m = conditioning.make_instructions(z_first, z_last, has, has, 3)
    c2, m2 = conditioning.drop_last(c, m)
    np.testing.assert_array_equal(c2[:, 0], c[:, 0])
    np.testing.assert_array_equal(m2[:, 0], m[:, 0])
    np.testing.assert_array_equal(c2[:, 1:], 0.0)
    np.testing.assert_array_equal(m2[:, 1:], 0.0)


def test_noise_instructions():
    z_first, z_last = _latents()
    c, m = conditioning.make_instructions(z_first, z_last, jnp.array([True, True, False]),
                                          jnp.array([True, False, False]), 4)
    rng = jax.random.key(3)
    np.testing.assert_array_equal(conditioning.noise_instructions(rng, c, m, 0.0), c)
    noisy = conditioning.noise_instructions(rng, c, m, 0.1)
    noise = jax.random.normal(rng, c.shape)
    np.testing.assert_allclose(noisy, c + m * 0.1 * (noise - c), rtol=1e-6)
    np.testing.assert_array_equal(noisy * (1 - m), 0.0)  # frames without an instruction stay zero
    assert not np.allclose(noisy[0, 0], c[0, 0])


def test_replace_first():
    x = jax.random.normal(jax.random.key(4), (3, 4, 2, 3, 4))
    z_first, _ = _latents()
    has_first = jnp.array([True, False, True])
    y = conditioning.replace_first(x, z_first, has_first)
    np.testing.assert_array_equal(y[0, 0], z_first[0])
    np.testing.assert_array_equal(y[2, 0], z_first[2])
    np.testing.assert_array_equal(y[1], x[1])
    np.testing.assert_array_equal(y[:, 1:], x[:, 1:])


def test_first_frame_loss_mask():
    has_first = jnp.array([True, False])
    m = conditioning.first_frame_loss_mask(has_first, 3, replace=True)
    assert m.shape == (2, 3, 1, 1, 1)
    np.testing.assert_array_equal(m[:, :, 0, 0, 0], [[0, 1, 1], [1, 1, 1]])
    np.testing.assert_array_equal(conditioning.first_frame_loss_mask(has_first, 3, replace=False), 1.0)


# ---------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------

def _flow_example(B=3):
    k = jax.random.split(jax.random.key(5), 3)
    x0 = jax.random.normal(k[0], (B, 2, 2, 2, 4))
    noise = jax.random.normal(k[1], x0.shape)
    t = jnp.array([0.1, 0.5, 0.9])[:B]
    return x0, noise, t


def test_interpolate():
    x0, noise, t = _flow_example()
    x_t = objectives.interpolate(x0, noise, t)
    np.testing.assert_allclose(x_t[1], 0.5 * x0[1] + 0.5 * noise[1], rtol=1e-6)
    np.testing.assert_allclose(objectives.interpolate(x0, noise, jnp.zeros(3)), x0)
    np.testing.assert_allclose(objectives.interpolate(x0, noise, jnp.ones(3)), noise)


def test_velocity_and_x0_are_inverses():
    x0, noise, t = _flow_example()
    x_t = objectives.interpolate(x0, noise, t)
    v = noise - x0
    np.testing.assert_allclose(objectives.to_x0(v, x_t, t, prediction="velocity"), x0, atol=1e-5)
    np.testing.assert_allclose(objectives.to_velocity(x0, x_t, t, prediction="x0"), v, atol=1e-4)
    np.testing.assert_array_equal(objectives.to_velocity(v, x_t, t, prediction="velocity"), v)
    np.testing.assert_array_equal(objectives.to_x0(x0, x_t, t, prediction="x0"), x0)
    # Round trips through the other parameterisation.
    v_from_x0 = objectives.to_velocity(x0, x_t, t, prediction="x0")
    np.testing.assert_allclose(objectives.to_x0(v_from_x0, x_t, t, prediction="velocity"), x0, atol=1e-5)
    # Below min_t the x0 -> velocity conversion divides by min_t, not t.
    tiny = jnp.full((3,), 1e-4)
    np.testing.assert_allclose(objectives.to_velocity(x0, x_t, tiny, prediction="x0", min_t=0.05),
                               (x_t - x0) / 0.05, rtol=1e-5)
    with pytest.raises(ValueError, match="eps"):
        objectives.to_velocity(x0, x_t, t, prediction="eps")
    with pytest.raises(ValueError, match="eps"):
        objectives.to_x0(x0, x_t, t, prediction="eps")


@pytest.mark.parametrize("prediction", objectives.PREDICTIONS)
def test_flow_loss_is_zero_for_the_exact_prediction(prediction):
    x0, noise, t = _flow_example()
    exact = noise - x0 if prediction == "velocity" else x0
    ones = jnp.ones((3, 2, 1, 1, 1))
    loss, per_example = objectives.flow_loss(exact, x0, noise, t, ones, prediction=prediction)
    assert per_example.shape == (3,)
    np.testing.assert_allclose(per_example, 0.0, atol=1e-8)
    assert float(loss) < 1e-8
    # A wrong prediction costs; a wrong prediction only where the mask is 0 does not.
    wrong = exact.at[:, 0].add(1.0)
    assert float(objectives.flow_loss(wrong, x0, noise, t, ones, prediction=prediction)[0]) > 0.1
    mask = ones.at[:, 0].set(0.0)
    np.testing.assert_allclose(objectives.flow_loss(wrong, x0, noise, t, mask, prediction=prediction)[1],
                               0.0, atol=1e-8)


def test_flow_loss_value():
    x0, noise, t = _flow_example()
    v_hat = noise - x0 + 0.5  # velocity off by 0.5 everywhere: squared error 0.25
    loss, per_example = objectives.flow_loss(v_hat, x0, noise, t, jnp.ones((3, 2, 1, 1, 1)),
                                             prediction="velocity")
    np.testing.assert_allclose(per_example, 0.25, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.25, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The trained pipeline of the runlocal main job
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(runlocal_workdir):
    return pixeldance.load_pipeline(runlocal_workdir)


@pytest.fixture(scope="module")
def example(pipe):
    """A held-out clip of the workdir's world: video uint8 [F, R, R, 3] and its caption."""
    return synthetic.ShapesSource("heldout", size=4, config=synthetic.world_config(pipe.config))[0]


def test_pipeline_modes(pipe, example):
    F, R = pipe.num_frames, pipe.resolution
    assert (F, R) == (9, 32)
    first, last = example["video"][0], example["video"][-1]
    videos = {
        "T2V": pipe.generate(example["caption"]),
        "I2V": pipe.generate(example["caption"], first),
        "FLF2V": pipe.generate(example["caption"], first, last),
    }
    for mode, video in videos.items():
        assert video.dtype == np.uint8 and video.shape == (F, R, R, 3), mode
    # The instructions reach the model: each mode gives a different video for the same noise.
    assert not np.array_equal(videos["T2V"], videos["I2V"])
    assert not np.array_equal(videos["I2V"], videos["FLF2V"])
    # Sampling is a pure function of the seed.
    np.testing.assert_array_equal(pipe.generate(example["caption"], first, seed=0), videos["I2V"])
    assert not np.array_equal(pipe.generate(example["caption"], first, seed=1), videos["I2V"])


def test_pipeline_follows_a_changed_shift(runlocal_workdir, example):
    """config.sample.shift changed after a first call (as tools.sweep does) samples with the new
    grid, as a pipeline made with it does: the compiled sampler is not reused."""
    first = example["video"][0]
    pipe = pixeldance.load_pipeline(runlocal_workdir)
    assert pipe.config.sample.steps >= 2  # one interval's grid is the same at any shift
    before = pipe.generate(example["caption"], first, seed=0)
    with pipe.config.unlocked():
        pipe.config.sample.shift = 3.0
    after = pipe.generate(example["caption"], first, seed=0)
    fresh = pixeldance.load_pipeline(runlocal_workdir)
    with fresh.config.unlocked():
        fresh.config.sample.shift = 3.0
    np.testing.assert_array_equal(after, fresh.generate(example["caption"], first, seed=0))
    assert not np.array_equal(after, before)


def test_pipeline_samples_the_weights_config_sample_names(runlocal_workdir, tmp_path):
    """config.sample.weights = 'train' loads the DiT's trained weights of the last checkpoint
    instead of their EMA (a short run's EMA still holds early weights): the checkpoint's own
    'params', which differ from the EMA the default loads."""
    import shutil
    from pixeldance import workdir as workdir_lib
    workdir = str(tmp_path / "w")
    shutil.copytree(runlocal_workdir, workdir)
    ema = pixeldance.load_pipeline(workdir)
    config = workdir_lib.read_config(workdir)
    config.sample.weights = "train"
    workdir_lib.write_config(workdir, config)
    trained = pixeldance.load_pipeline(workdir)
    from pixeldance.checkpoint import Checkpointer
    ckpt = Checkpointer(os.path.join(workdir, "dit"), use_async=False)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), trained.params)
    want = ckpt.restore_part({"params": abstract})["params"]
    ckpt.close()
    assert trained.step == ema.step > 0
    pairs = list(zip(jax.tree.leaves(trained.params), jax.tree.leaves(ema.params), jax.tree.leaves(want)))
    for got, averaged, stored in pairs:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(stored))
    assert any(not np.array_equal(np.asarray(got), np.asarray(averaged)) for got, averaged, _ in pairs)


def test_pipeline_num_frames(pipe, example):
    video = pipe.generate(example["caption"], example["video"][0], num_frames=5)
    assert video.dtype == np.uint8 and video.shape == (5, 32, 32, 3)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        pipe.generate(example["caption"], num_frames=4)


def test_pipeline_rejects_bad_instructions(pipe, example):
    caption = example["caption"]
    with pytest.raises(ValueError, match=r"\(16, 16, 3\)"):
        pipe.generate(caption, np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="last_frame"):
        pipe.generate(caption, example["video"][0], np.zeros((32, 32, 4), np.uint8))
    with pytest.raises(ValueError, match="float32"):
        pipe.generate(caption, example["video"][0].astype(np.float32))
    with pytest.raises(ValueError, match="first frame"):
        pipe.generate(caption, None, example["video"][-1])


def test_load_vae(runlocal_workdir, example):
    vae = pixeldance.load_vae(runlocal_workdir)
    video = example["video"][None]  # [1, 9, 32, 32, 3]
    z = vae.encode(video)
    assert z.dtype == np.float32 and z.shape == (1, 3, 4, 4, 16)
    assert np.all(np.isfinite(z))
    out = vae.decode(z)
    assert out.dtype == np.uint8 and out.shape == video.shape
    # Images are one-frame videos in the same latent space.
    z_img = vae.encode(video[:, :1])
    assert z_img.shape == (1, 1, 4, 4, 16)
    np.testing.assert_allclose(z_img[:, 0], z[:, 0], atol=1e-4)  # causal: frame 0 is encoded on its own
    assert vae.decode(z_img).shape == (1, 1, 32, 32, 3)
    with pytest.raises(ValueError, match="uint8"):
        vae.encode(video.astype(np.float32))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(z[0])
