"""Diffusion: objectives, the four samplers against an exact solution, guidance, and the
PixelDance task (`diffusion/task.py`): its guided sampler's branches and tau, its training inputs'
dropouts and last-frame pick, each objective's exact output.

The exact case: data x0 ~ N(mu, s^2). On any path x_t = alpha x0 + sigma eps the marginal is
N(alpha mu, alpha^2 s^2 + sigma^2), the ideal denoiser is linear in x_t, and the probability-flow
ODE keeps the standardised value fixed, so noise z placed at t = 1 must arrive at mu + s z.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pixeldance import build, configs, sharding
from pixeldance.diffusion import guidance, objectives, samplers, schedules
from pixeldance.models import text as text_lib
from pixeldance.trainers import dit as dit_trainer

MU, S = 0.5, 2.0  # wide data: every sampler is in its asymptotic regime from 8 steps on
Z = jnp.linspace(-2.0, 2.0, 5)
FIRST_ORDER, SECOND_ORDER = ("euler", "ddim"), ("heun", "dpm++2m")


def _normal(seed, shape):
    """Test data from numpy (jax.random.normal of rank-5 shapes compiles slowly on XLA:CPU)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _gaussian_posterior(x, t, path, mu=MU, s=S):
    """E[x0 | x_t], E[eps | x_t] for x0 ~ N(mu, s^2) on `path` (t a scalar or broadcastable to x)."""
    alpha, sigma = schedules.alpha_sigma(t, path)
    var = alpha ** 2 * s ** 2 + sigma ** 2
    x0 = mu + alpha * s ** 2 / var * (x - alpha * mu)
    eps = sigma / var * (x - alpha * mu)
    return x0, eps


def _gaussian_denoiser(path):
    def denoise(x, t, i):
        x0, eps = _gaussian_posterior(x, t, path)
        return x0, eps - x0
    return denoise


def _start(z, path, mu=MU, s=S):
    """The exact state at t = 1 for standardised value z (on the DDPM path alpha(1) > 0)."""
    alpha, sigma = schedules.alpha_sigma(jnp.float32(1.0), path)
    return alpha * mu + jnp.sqrt(alpha ** 2 * s ** 2 + sigma ** 2) * z


@functools.lru_cache(maxsize=None)
def _errors(sampler, path, steps=(8, 16, 32)):
    """Max |x(0) - exact| over Z for each number of steps (one compile each)."""
    def error(n):
        x = samplers.solve(_gaussian_denoiser(path), _start(Z, path), steps=n, sampler=sampler, path=path)
        return jnp.max(jnp.abs(x - (MU + S * Z)))
    return np.array([float(jax.jit(error, static_argnums=0)(n)) for n in steps])


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_sampler_order_on_the_flow_path(sampler):
    errors = _errors(sampler, "flow")
    orders = np.log2(errors[:-1] / errors[1:])
    if sampler in FIRST_ORDER:
        assert np.all((orders > 0.85) & (orders < 1.2)), (errors, orders)
    else:
        # DPM++(2M) on a uniform t-grid behaves like log(N) / N^2 (its lambda-steps near t = 0
        # and 1 do not shrink), so its measured order sits a little below 2.
        assert np.all(orders > (1.85 if sampler == "heun" else 1.5)), (errors, orders)
        assert errors[-1] < 0.15 * _errors("euler", "flow")[-1]


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_sampler_converges_on_the_ddpm_path(sampler):
    errors = _errors(sampler, "ddpm")
    orders = np.log2(errors[:-1] / errors[1:])
    # On the DDPM path sigma grows like sqrt(t) near t = 0, so the last step of a uniform grid
    # shrinks only like N^(-1/2) and limits every sampler to first order; the second-order
    # samplers are still several times more accurate.
    assert np.all(orders > 0.9), (errors, orders)
    if sampler in SECOND_ORDER:
        assert np.all(errors < 0.25 * _errors("euler", "ddpm")), errors


@pytest.mark.parametrize("path", schedules.PATHS)
def test_ddim_is_euler_in_flow_coordinates(path):
    x1 = _start(Z, path)
    euler = samplers.solve(_gaussian_denoiser(path), x1, steps=6, sampler="euler", path=path)
    ddim = samplers.solve(_gaussian_denoiser(path), x1, steps=6, sampler="ddim", path=path)
    np.testing.assert_allclose(euler, ddim, atol=1e-5)


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_sampler_calls_and_projection(sampler):
    """The denoiser sees the grid's times with their step index; project pins what it pins."""
    steps, path = 4, "ddpm"
    calls = []

    def denoise(x, t, i):
        jax.debug.callback(lambda t, i: calls.append((float(t), int(i))), t, i, ordered=True)
        return _gaussian_denoiser(path)(x, t, i)

    x = samplers.solve(denoise, _start(Z, path), steps=steps, sampler=sampler, path=path,
                       project=lambda x: x.at[0].set(7.0))
    jax.effects_barrier()
    grid = np.asarray(schedules.time_grid(steps, path=path))
    if sampler == "heun":  # the corrector evaluates at the next time with the same index
        expected = [(g, i) for i in range(steps) for g in grid[i:i + 2]]
    else:
        expected = [(grid[i], i) for i in range(steps)]
    np.testing.assert_allclose([c[0] for c in calls], [e[0] for e in expected], atol=1e-7)
    assert [c[1] for c in calls] == [e[1] for e in expected]
    assert float(x[0]) == 7.0
    assert np.all(np.isfinite(x))


def test_samplers_on_sharded_inputs():
    """Batch split over the 8 devices: same values as on one device, sharding kept, under jit."""
    mesh = sharding.make_mesh((2, 4, 1, 1))
    x1 = _start(_normal(0, (8, 2, 3)), "flow")
    fn = jax.jit(lambda x: [samplers.solve(_gaussian_denoiser("flow"), x, steps=5, sampler=s)
                            for s in samplers.SAMPLERS])
    sharded = jax.device_put(x1, NamedSharding(mesh, P(("data", "fsdp"))))
    for name, out, ref in zip(samplers.SAMPLERS, fn(sharded), fn(x1)):
        np.testing.assert_allclose(out, ref, atol=1e-6, err_msg=name)
        assert out.sharding.is_equivalent_to(sharded.sharding, out.ndim), name
        assert len({s.device for s in out.addressable_shards}) == 8


def test_samplers_reject_unknown_names():
    with pytest.raises(ValueError, match="rk4"):
        samplers.solve(_gaussian_denoiser("flow"), Z, steps=2, sampler="rk4")
    with pytest.raises(ValueError, match="vp"):
        samplers.solve(_gaussian_denoiser("flow"), Z, steps=2, path="vp")


# ---------------------------------------------------------------------------------------------
# Schedules and objectives
# ---------------------------------------------------------------------------------------------

def test_ddpm_schedule():
    # Latent diffusion's scaled-linear schedule: alpha_bar of the last of 1000 steps is 0.0047.
    alpha, sigma = schedules.alpha_sigma(jnp.array([0.0, 0.001, 1.0]), "ddpm")
    np.testing.assert_allclose(alpha ** 2, [1.0, 1.0 - 0.00085, 0.00466], rtol=2e-3)
    np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, rtol=1e-6)
    t = schedules.sample_ddpm_time(jax.random.key(0), 4096)
    steps = np.asarray(t) * 1000
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)  # only the trained steps
    assert steps.min() >= 1 and steps.max() <= 1000 and abs(steps.mean() - 500.5) < 15
    # 50 steps snap to DDIM's trailing spacing: n + 1 = 1000, 980, ..., 20, then t = 0.
    np.testing.assert_allclose(schedules.time_grid(50, path="ddpm") * 1000, np.arange(1000, -1, -20), atol=1e-3)


def test_ddpm_logit_normal_time_sampling():
    """'logit_normal' on the DDPM path: only the trained steps, n = floor(sigmoid(m + s n) T), so
    the median step sits at sigmoid(mean) T and mean < 0 moves the draws towards low noise."""
    for mean, median in ((0.0, 500), (-1.0, 269)):
        t = schedules.sample_ddpm_time(jax.random.key(1), 8192, kind="logit_normal", mean=mean, std=1.0)
        steps = np.asarray(t) * 1000
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
        assert steps.min() >= 1 and steps.max() <= 1000
        assert abs(np.median(steps) - median) < 12, (mean, np.median(steps))
        # 68 % within one std of the mean in logit space (uniform draws would give 46 %).
        u = (np.round(steps) - 0.5) / 1000
        assert abs(np.mean(np.abs(np.log(u / (1 - u)) - mean) < 1.0) - 0.683) < 0.02
    # A wide logit-normal reaches both ends of the grid and never leaves it.
    t = schedules.sample_ddpm_time(jax.random.key(2), 8192, kind="logit_normal", std=8.0)
    assert float(t.min()) == np.float32(0.001) and float(t.max()) == 1.0
    # The default stays DDPM's uniform draw, bit for bit.
    np.testing.assert_array_equal(schedules.sample_ddpm_time(jax.random.key(0), 64),
                                  (jax.random.randint(jax.random.key(0), (64,), 0, 1000) + 1) / 1000)
    with pytest.raises(ValueError, match="unknown DDPM time sampling 'sigmoid'"):
        schedules.sample_ddpm_time(jax.random.key(0), 4, kind="sigmoid")


def test_zero_terminal_snr_schedule():
    """'ddpm_zero_snr' (Lin et al.): the first step as DDPM's, the last pure noise, alpha falling
    all the way, and t = 1 an exact clean-sample estimate from v (where eps would say nothing)."""
    t = jnp.array([0.0, 0.001, 0.5, 0.999, 1.0])
    a0, s0 = schedules.alpha_sigma(t, "ddpm")
    a1, s1 = schedules.alpha_sigma(t, "ddpm_zero_snr")
    np.testing.assert_allclose(a1[:2], a0[:2], rtol=1e-6)  # clean data and the first step unchanged
    assert float(a1[-1]) <= 1.001 * schedules.ZERO_SNR_ALPHA and float(a0[-1]) > 0.06
    np.testing.assert_allclose(a1 ** 2 + s1 ** 2, 1.0, rtol=1e-6)
    grid = jnp.linspace(0.0, 1.0, 1001)
    alpha, _ = schedules.alpha_sigma(grid, "ddpm_zero_snr")
    assert np.all(np.diff(np.asarray(alpha)) < 0) and np.all(np.isfinite(np.asarray(alpha)))
    assert float(a1[2]) < float(a0[2])  # less signal at every step in between
    # The sampler's grid snaps to the same trained steps, and its flow time reaches exactly 1.
    np.testing.assert_array_equal(schedules.time_grid(8, path="ddpm_zero_snr"), schedules.time_grid(8, path="ddpm"))
    tau, _ = schedules.flow_coordinates(jnp.ones(()), "ddpm_zero_snr")
    np.testing.assert_allclose(tau, 1.0, atol=2e-6)


def _example(objective):
    x0, noise = _normal(5, (4, 2, 2, 2, 3)), _normal(6, (4, 2, 2, 2, 3))
    t = jnp.array([0.001, 0.1, 0.5, 1.0]) if objective != "flow" else jnp.array([0.05, 0.1, 0.5, 0.9])
    return x0, noise, t


@pytest.mark.parametrize("objective, prediction", [("flow", "x0"), ("flow", "velocity"), ("eps", "x0"),
                                                   ("v", "x0"), ("v_zero_snr", "x0")])
def test_exact_output_gives_zero_loss_and_the_true_denoising(objective, prediction):
    x0, noise, t = _example(objective)
    kw = dict(objective=objective, prediction=prediction)
    mask = jnp.ones((4, 2, 1, 1, 1))

    @jax.jit
    def check(x0, noise, t):
        x_t = objectives.add_noise(x0, noise, t, objective=objective)
        exact = x0 if (objective, prediction) == ("flow", "x0") else objectives.target(x0, noise, t, objective=objective)
        return (objectives.loss(exact, x0, noise, t, mask, **kw), objectives.loss(exact + 0.5, x0, noise, t, mask, **kw),
                objectives.denoise(exact, x_t, t, **kw))

    (loss, per_example), (wrong, _), (x0_hat, v_hat) = check(x0, noise, t)
    assert per_example.shape == (4,) and float(loss) < 1e-10 and float(wrong) > 0.01
    np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
    np.testing.assert_allclose(v_hat, noise - x0, atol=2e-4)


def test_objective_paths():
    x0, noise, t = _example("flow")
    np.testing.assert_array_equal(objectives.add_noise(x0, noise, t, objective="flow"),
                                  objectives.interpolate(x0, noise, t))
    assert [objectives.path(o) for o in objectives.OBJECTIVES] == ["flow", "ddpm", "ddpm", "ddpm_zero_snr"]
    # Where the paths differ, noising differs: at the last step zero-SNR is pure noise.
    one = jnp.ones((1,))
    np.testing.assert_allclose(objectives.add_noise(x0[:1], noise[:1], one, objective="v_zero_snr"),
                               noise[:1], atol=1e-5)
    assert float(jnp.abs(objectives.add_noise(x0[:1], noise[:1], one, objective="v") - noise[:1]).max()) > 0.05
    with pytest.raises(ValueError, match="x0_pred"):
        objectives.path("x0_pred")


# ---------------------------------------------------------------------------------------------
# Guidance
# ---------------------------------------------------------------------------------------------

def _branches(B=3):
    full, image, none = (_normal(seed, (B, 4)) for seed in (7, 8, 9))
    return full, image, none


def test_guidance_scale_one_is_the_conditional_prediction():
    full, image, none = _branches()
    np.testing.assert_allclose(guidance.combine(jnp.concatenate([full, image]), 2, text_scale=1.0), full,
                               atol=1e-6)
    np.testing.assert_allclose(guidance.combine(jnp.concatenate([full, image, none]), 3, text_scale=1.0,
                                                image_scale=1.0), full, atol=1e-6)


def test_guidance_separate_scales():
    full, image, none = _branches()
    three = jnp.concatenate([full, image, none])
    combine3 = lambda st, si: guidance.combine(three, 3, text_scale=st, image_scale=si)
    # Image scale 1: the none branch cancels, and the 2-branch batch gives the same.
    np.testing.assert_allclose(combine3(5.0, 1.0), guidance.combine(three[:6], 2, text_scale=5.0), atol=1e-5)
    np.testing.assert_allclose(combine3(5.0, 1.0), image + 5.0 * (full - image), atol=1e-5)
    np.testing.assert_allclose(combine3(0.0, 1.0), image, atol=1e-6)          # no text
    np.testing.assert_allclose(combine3(0.0, 0.0), none, atol=1e-6)           # nothing
    np.testing.assert_allclose(combine3(4.0, 4.0), none + 4.0 * (full - none), atol=1e-5)  # joint CFG
    np.testing.assert_allclose(combine3(1.0, 3.0), none + 3.0 * (image - none) + (full - image), atol=1e-5)
    # Pytrees (e.g. (x0_hat, v_hat)) are guided leaf by leaf.
    pair = guidance.combine((three, 2.0 * three), 3, text_scale=2.0, image_scale=1.5)
    np.testing.assert_allclose(pair[1], 2.0 * pair[0], atol=1e-5)
    assert guidance.num_branches(1.0) == 2 and guidance.num_branches(1.5) == 3
    with pytest.raises(ValueError, match="4"):
        guidance.combine(jnp.concatenate([full] * 4), 4, text_scale=1.0)


def test_guidance_rescale():
    """`guidance.rescale`: 0 leaves the guided prediction as it is, 1 gives it the conditional
    prediction's per-example spread and keeps its direction, between them a linear blend."""
    full, image, _ = _branches()
    guided = image + 6.0 * (full - image)
    np.testing.assert_array_equal(guidance.rescale(guided, full, 0.0), guided)
    one = guidance.rescale(guided, full, 1.0)
    np.testing.assert_allclose(jnp.std(one, axis=1), jnp.std(full, axis=1), rtol=1e-5)
    np.testing.assert_allclose(one / guided, jnp.broadcast_to((one / guided)[:, :1], one.shape), rtol=1e-5)
    np.testing.assert_allclose(guidance.rescale(guided, full, 0.5), 0.5 * (one + guided), rtol=1e-5)


class _PatternModel:
    """A stand-in DiT whose output varies over the latent (so each example has a spread) and
    scales with the conditions that reached it: the text and the image mask."""

    def apply(self, params, x, t, c_image, c_mask, tokens):
        text = jnp.any(tokens[:, 1:] != 0, axis=1).astype(x.dtype)
        mask = jnp.any(c_mask != 0, axis=(1, 2, 3, 4)).astype(x.dtype)
        pattern = jnp.sin(jnp.arange(x[0].size, dtype=x.dtype)).reshape(x.shape[1:])
        return 0.3 * x + (1.0 + 2.0 * text + 0.5 * mask)[:, None, None, None, None] * pattern


@pytest.mark.parametrize("objective", ["flow", "v"])
def test_guidance_rescale_in_the_denoiser(objective):
    """config.sample.guidance_rescale in the sampler: the guided x0 takes the full branch's spread
    (phi = 1), the velocity moves with it so that (x0, v) still describe the same x_t (flow
    coordinates y = x0 + s v), and 0 is the unrescaled program."""
    config = configs.load_config("experiments/base.py:runlocal")
    task = _task(config, **{"diffusion.objective": objective})
    B, T, h, C, L = 2, 3, 2, 4, config.text.max_length
    c = jnp.ones((B, T, h, h, C))
    m = jnp.zeros((B, T, h, h, 1)).at[0, 0].set(1.0)
    tokens = jnp.zeros((B, L), jnp.int32).at[:, :3].set(jnp.array([1, 5, 6]))
    x = _normal(3, (B, T, h, h, C))
    t = jnp.float32(0.6)

    def run(guidance_scale, rescale, image_scale=2.0):
        denoise = task.denoiser(_PatternModel(), None, c, m, tokens, jnp.float32(guidance_scale), jnp.float32(image_scale),
                                jnp.int32(0), branches=3, guidance_rescale=rescale)
        return denoise(x, t, 0)

    x0, v = run(7.0, 0.0)
    x0_full, _ = run(1.0, 0.0, 1.0)  # text and image scales 1: the full branch
    x0_r, v_r = run(7.0, 1.0)
    s, scale = schedules.flow_coordinates(t, task.path)
    y = x / scale
    np.testing.assert_allclose(x0 + s * v, y, atol=1e-4)          # the unrescaled pair describes x_t
    np.testing.assert_allclose(x0_r + s * v_r, y, atol=1e-4)      # and so does the rescaled one
    spread = lambda a: jnp.std(a.reshape(B, -1), axis=1)
    np.testing.assert_allclose(spread(x0_r), spread(x0_full), rtol=1e-4)
    assert float(jnp.max(jnp.abs(spread(x0) - spread(x0_full)))) > 0.1  # guidance did inflate it
    half, _ = run(7.0, 0.5)
    np.testing.assert_allclose(half, 0.5 * (x0 + x0_r), atol=1e-5)


class _BranchModel:
    """A stand-in DiT (flow, x0-prediction) whose output shows which conditions reached it: the
    text (not the empty prompt), the image latents (c_image, not only its mask) and the mask."""
    TEXT, IMAGE, MASK = 10.0, 100.0, 1000.0

    def apply(self, params, x, t, c_image, c_mask, tokens):
        text = jnp.any(tokens[:, 1:] != 0, axis=1).astype(x.dtype)
        image = jnp.any(c_image != 0, axis=(1, 2, 3, 4)).astype(x.dtype)
        mask = jnp.any(c_mask != 0, axis=(1, 2, 3, 4)).astype(x.dtype)
        out = 1.0 + self.TEXT * text + self.IMAGE * image + self.MASK * mask
        return jnp.broadcast_to(out[:, None, None, None, None], x.shape)


def _task(config, **changes):
    config = configs.override(config, **changes)
    return build.task(config)


@pytest.mark.parametrize("image_guidance", [1.0, 2.0])
def test_guided_sample_branches(image_guidance):
    """One DDIM step from t = 1 returns the guided x0: each branch carries exactly its conditions
    (full: text + image latents + mask; image: image latents + mask; none: nothing)."""
    config = configs.load_config("experiments/base.py:runlocal")
    task = _task(config, **{"cond.first_frame": "concat", "diffusion.objective": "flow"})
    B, T, h, C, L, text_scale = 2, 3, 2, 4, config.text.max_length, 3.0
    z = jnp.ones((B, h, h, C))
    tokens = jnp.zeros((B, L), jnp.int32).at[:, :3].set(jnp.array([1, 5, 6]))
    x = jax.jit(task.guided_sample, static_argnums=0, static_argnames=("steps", "sampler", "branches"))(
        _BranchModel(), None, jnp.zeros((B, T, h, h, C)), z, z, jnp.array([True, False]), jnp.array([False, False]),
        tokens, jax.random.key(0), jnp.float32(text_scale), jnp.float32(image_guidance), jnp.int32(0),
        steps=1, sampler="ddim", branches=guidance.num_branches(image_guidance))
    m = _BranchModel
    # Example 0 has a first frame (image guidance applies), example 1 is text only.
    expected = [1.0 + text_scale * m.TEXT + image_guidance * (m.IMAGE + m.MASK), 1.0 + text_scale * m.TEXT]
    np.testing.assert_allclose(x[:, 0, 0, 0, 0], expected, rtol=1e-6)


class _LastFrameModel:
    """A stand-in DiT whose x0 is the mean of its instruction latents' last frame (0 without one)."""

    def apply(self, params, x, t, c_image, c_mask, tokens):
        return jnp.broadcast_to(jnp.mean(c_image[:, -1] * c_mask[:, -1], axis=(1, 2, 3))[:, None, None, None, None],
                                x.shape)


@pytest.mark.parametrize("sampler", ["euler", "dpm++2m"])
def test_tau_zero_equals_sampling_without_the_last_frame(sampler):
    """tau = 0 never shows the last frame; tau = steps shows it at every step."""
    config = configs.load_config("experiments/base.py:runlocal")
    task = _task(config, **{"cond.first_frame": "concat", "cond.noise": 0.0, "diffusion.objective": "flow"})
    B, T, h, C, L = 1, 3, 2, 4, config.text.max_length
    sample = jax.jit(task.guided_sample, static_argnums=0, static_argnames=("steps", "sampler", "branches"))
    noise, tokens = _normal(0, (B, T, h, h, C)), jnp.zeros((B, L), jnp.int32)
    z_first, z_last = jnp.zeros((B, h, h, C)), jnp.full((B, h, h, C), 2.0)
    yes, no = jnp.ones((B,), bool), jnp.zeros((B,), bool)

    def run(has_last, tau):
        return sample(_LastFrameModel(), None, noise, z_first, z_last, yes, has_last, tokens, jax.random.key(0),
                      jnp.float32(1.0), jnp.float32(1.0), jnp.int32(tau), steps=8, sampler=sampler, branches=2)

    without = run(no, 0)
    np.testing.assert_array_equal(run(yes, 0), without)
    np.testing.assert_allclose(run(yes, 8), 2.0, atol=1e-5)  # x0 = the last frame's value throughout
    np.testing.assert_allclose(without, 0.0, atol=1e-6)  # the model's x0 without a last frame


class _LastFrameSeen:
    """A stand-in DiT that records, per model call, whether its instructions carry a last frame."""

    def __init__(self):
        self.seen = []

    def apply(self, params, x, t, c_image, c_mask, tokens):
        jax.debug.callback(lambda m: self.seen.append(bool(np.asarray(m).max() > 0)), c_mask[:, -1])
        return jnp.zeros_like(x)


@pytest.mark.parametrize("sampler, tau", [("euler", 3), ("heun", 2), ("euler", 0)])
def test_tau_is_the_number_of_steps_that_see_the_last_frame(sampler, tau):
    """Steps 0 .. tau - 1 see the last frame, the rest do not (Heun: both calls of a step)."""
    config = configs.load_config("experiments/base.py:runlocal")
    task = _task(config, **{"cond.first_frame": "concat"})
    B, T, h, C, L, steps = 1, 3, 2, 4, config.text.max_length, 6
    model = _LastFrameSeen()
    z, yes = jnp.ones((B, h, h, C)), jnp.ones((B,), bool)
    jax.jit(task.guided_sample, static_argnums=0, static_argnames=("steps", "sampler", "branches"))(
        model, None, jnp.zeros((B, T, h, h, C)), z, z, yes, yes, jnp.zeros((B, L), jnp.int32), jax.random.key(0),
        jnp.float32(1.0), jnp.float32(1.0), jnp.int32(tau), steps=steps, sampler=sampler, branches=2)
    jax.effects_barrier()
    calls = 2 if sampler == "heun" else 1
    assert model.seen == [True] * (tau * calls) + [False] * ((steps - tau) * calls)


@pytest.mark.parametrize("first_frame", ["replace", "concat"])
def test_guided_sample_replaces_the_first_latent(first_frame):
    """With first_frame='replace' the sampled first latent frame is the clean instruction where one
    is given (and the sampler's own where not); 'concat' leaves it to the model."""
    config = configs.load_config("experiments/base.py:runlocal")
    task = _task(config, **{"cond.first_frame": first_frame})
    B, T, h, C, L = 2, 3, 2, 4, config.text.max_length
    z_first = _normal(5, (B, h, h, C))
    has_first = jnp.array([True, False])
    x = jax.jit(task.guided_sample, static_argnums=0, static_argnames=("steps", "sampler", "branches"))(
        _BranchModel(), None, _normal(6, (B, T, h, h, C)), z_first, z_first, has_first, jnp.zeros((B,), bool),
        jnp.zeros((B, L), jnp.int32), jax.random.key(0), jnp.float32(2.0), jnp.float32(1.0), jnp.int32(0),
        steps=4, sampler="euler", branches=2)
    replaced = np.allclose(x[0, 0], z_first[0], atol=1e-6)
    assert replaced == (first_frame == "replace")
    assert not np.allclose(x[1, 0], z_first[1], atol=1e-2)  # no instruction: nothing put in


class _GaussianModel:
    """The exact network for x0 ~ N(mu, s^2) under each objective."""

    def __init__(self, objective, prediction):
        self.objective, self.prediction = objective, prediction

    def apply(self, params, x, t, c_image, c_mask, tokens):
        tb = t[:, None, None, None, None]
        x0, eps = _gaussian_posterior(x, tb, objectives.path(self.objective))
        if self.objective == "flow":
            return x0 if self.prediction == "x0" else eps - x0
        if self.objective == "eps":
            return eps
        alpha, sigma = schedules.alpha_sigma(tb, objectives.path(self.objective))
        return alpha * eps - sigma * x0


@pytest.mark.parametrize("objective, prediction, sampler", [
    ("flow", "x0", "heun"), ("eps", "x0", "dpm++2m"), ("v", "x0", "heun"), ("v_zero_snr", "x0", "heun")])
def test_guided_sample_each_objective(objective, prediction, sampler):
    """The guided sampler with the exact network transports noise to the data (3 branches)."""
    config = configs.load_config("experiments/base.py:runlocal")
    # (min_t 1e-6: the exact x0 network needs no clipping)
    task = _task(config, **{"diffusion.objective": objective, "diffusion.prediction": prediction,
                            "diffusion.min_t_for_x0": 1e-6})
    B, T, h, C, L = 2, 2, 1, 2, config.text.max_length
    z = _normal(1, (B, T, h, h, C))
    zeros, no = jnp.zeros((B, h, h, C)), jnp.zeros((B,), bool)
    x = jax.jit(task.guided_sample, static_argnums=0, static_argnames=("steps", "sampler", "branches"))(
        _GaussianModel(objective, prediction), None, _start(z, objectives.path(objective)), zeros, zeros, no, no,
        jnp.zeros((B, L), jnp.int32), jax.random.key(0), jnp.float32(4.0), jnp.float32(2.0),
        jnp.int32(0), steps=32, sampler=sampler, branches=3)
    np.testing.assert_allclose(x, MU + S * z, atol=0.05)


# ---------------------------------------------------------------------------------------------
# The task's loss: condition dropouts, the last-frame pick, time sampling, each objective's exact output
# ---------------------------------------------------------------------------------------------

class _Recorder:
    """A stand-in DiT that records its inputs (also under jit); `output(x_t, t)` (default zeros) is its output."""

    def __init__(self, output=None):
        self.output, self.calls = output, []

    def apply(self, params, x_t, t, c_image, c_mask, tokens):
        record = lambda t, c, m, tok: self.calls.append(dict(t=np.asarray(t), c_image=np.asarray(c),
                                                             c_mask=np.asarray(m),
                                                             tokens=jax.tree.map(np.asarray, tok)))
        jax.debug.callback(record, t, c_image, c_mask, tokens)
        return jnp.zeros_like(x_t) if self.output is None else self.output(x_t, t)


def _task_loss(models, task, batch):
    """PixelDanceTask.loss of each stand-in model on the same batch and rng, in one compiled function."""
    fn = jax.jit(lambda batch: [task.loss(model, None, batch, jax.random.key(4)) for model in models])
    out = fn(batch)
    jax.effects_barrier()
    return out


def _loss_setup(objective="flow", prediction="x0", B=4096, C=2, **changes):
    config = configs.load_config("experiments/base.py:runlocal")
    task = _task(config, **{"diffusion.objective": objective, "diffusion.prediction": prediction, **changes})
    batch = dict(z=_normal(3, (B, 3, 1, 1, C)), z_last=_normal(4, (B, 3, 1, 1, C)),
                 tokens=jnp.zeros((B, config.text.max_length), jnp.int32).at[:, :3].set(jnp.array([1, 5, 6])))
    return task, batch


def test_task_loss_dropout_rates():
    task, batch = _loss_setup(**{"cond.p_first": 0.6, "cond.p_last": 0.5, "cond.p_drop_text": 0.2})
    model = _Recorder()
    _task_loss([model], task, batch)
    (call,) = model.calls
    has_first = call["c_mask"][:, 0].reshape(len(call["c_mask"]), -1).max(1) == 1
    has_last = call["c_mask"][:, -1].reshape(len(call["c_mask"]), -1).max(1) == 1
    dropped = np.all(call["tokens"] == np.asarray(text_lib.null_tokens(1, call["tokens"].shape[1])), axis=1)
    tol = 0.03  # about 4 standard errors at 4096 examples
    assert abs(has_first.mean() - 0.6) < tol
    assert abs(has_last[has_first].mean() - 0.5) < tol and not np.any(has_last & ~has_first)
    assert abs(dropped.mean() - 0.2) < tol
    assert abs(dropped[has_first].mean() - 0.2) < tol  # text dropout does not depend on the image
    # Training times: logit-normal for the flow (68 % within one std of the mean in logit space).
    logit = np.log(call["t"] / (1.0 - call["t"]))
    assert abs(np.mean(np.abs(logit) < 1.0) - 0.683) < tol


def test_task_ddpm_time_sampling():
    """config.diffusion.ddpm_time_sampling reaches the training times of the DDPM objectives (with
    the shared logit_mean / logit_std); the flow objective ignores it; unknown names are refused."""
    tol = 0.03
    for objective in ("v", "v_zero_snr", "eps"):
        task, batch = _loss_setup(objective=objective, **{"diffusion.ddpm_time_sampling": "logit_normal",
                                                           "diffusion.logit_mean": -1.0})
        model = _Recorder()
        _task_loss([model], task, batch)
        t = np.asarray(model.calls[0]["t"])
        assert abs(np.median(t) - 0.269) < tol, (objective, np.median(t))
        task, batch = _loss_setup(objective=objective, **{"diffusion.logit_mean": -1.0})
        model = _Recorder()
        _task_loss([model], task, batch)  # the default: uniform, whatever the logit-normal says
        assert abs(np.median(np.asarray(model.calls[0]["t"])) - 0.5) < tol
    task, batch = _loss_setup(**{"diffusion.ddpm_time_sampling": "logit_normal", "diffusion.logit_mean": 1.0})
    model = _Recorder()
    _task_loss([model], task, batch)
    assert abs(np.median(np.asarray(model.calls[0]["t"])) - 0.731) < tol  # flow: its own time_sampling
    with pytest.raises(ValueError, match="ddpm_time_sampling must be one of"):
        _loss_setup(objective="v", **{"diffusion.ddpm_time_sampling": "cosine"})


def test_frozen_text_states_dropped_to_the_stored_null():
    """A pretrained encoder's cached states (dict(states, mask)) go through the task like tokens:
    dropped examples get exactly the stored empty-prompt states and mask, at p_drop_text."""
    task, batch = _loss_setup(B=2048, **{"cond.p_drop_text": 0.3})
    B, S, D = 2048, 5, 3
    states = _normal(7, (B, S, D)).astype(jnp.bfloat16)
    mask = jnp.broadcast_to(jnp.arange(S) < 4, (B, S))
    null = dict(states=jnp.full((1, S, D), 0.5, jnp.bfloat16), mask=(jnp.arange(S) < 1)[None])
    del batch["tokens"]
    batch.update(text_states=states, text_mask=mask)  # the latent cache's field names
    model = _Recorder()
    jax.jit(lambda b, n: task.loss(model, None, b, jax.random.key(4), null_text=n))(batch, null)
    jax.effects_barrier()
    got = model.calls[0]["tokens"]
    dropped = np.all(got["mask"] == np.asarray(null["mask"]), axis=1)
    assert abs(dropped.mean() - 0.3) < 0.04
    np.testing.assert_array_equal(got["states"][dropped], np.broadcast_to(np.asarray(null["states"]), (dropped.sum(), S, D)))
    np.testing.assert_array_equal(got["states"][~dropped], np.asarray(states)[~dropped])
    assert got["states"].dtype == np.asarray(states).dtype
    with pytest.raises(ValueError, match="empty-prompt states"):
        task.training_inputs(batch["z"], batch["z_last"], dict(states=states, mask=mask), jax.random.key(0))


def test_denoiser_branches_with_frozen_text():
    """Guidance branches batch [text, null, null] for frozen states as for tokens."""
    task, _ = _loss_setup()
    B, S, D = 2, 4, 3
    text = dict(states=_normal(1, (B, S, D)), mask=jnp.ones((B, S), bool))
    null = dict(states=jnp.zeros((1, S, D)), mask=jnp.zeros((1, S), bool).at[:, 0].set(True))
    c = jnp.zeros((B, 3, 1, 1, 2))
    m = jnp.zeros((B, 3, 1, 1, 1))
    model = _Recorder()
    denoise = task.denoiser(model, None, c, m, text, 2.0, 1.5, 10, branches=3, null_text=null)
    denoise(jnp.zeros((B, 3, 1, 1, 2)), 0.5, 0)
    jax.effects_barrier()
    got = model.calls[0]["tokens"]
    assert got["states"].shape == (3 * B, S, D)
    np.testing.assert_array_equal(got["states"][:B], np.asarray(text["states"]))
    np.testing.assert_array_equal(got["states"][B:], 0.0)
    np.testing.assert_array_equal(got["mask"][B:, 0], True)
    np.testing.assert_array_equal(got["mask"][B:, 1:], False)

@pytest.mark.parametrize("last_from", [1, 2, 3])
def test_last_frame_picked_among_the_last_frames(last_from):
    """The last-frame instruction is one of the first min(last_from, J) cached candidates (latest
    first), each equally often: never a later candidate, never always the latest one."""
    B, J = 3000, 3
    task, batch = _loss_setup(B=B, **{"cond.p_first": 1.0, "cond.p_last": 1.0, "cond.noise": 0.0,
                                      "cond.last_from": last_from})
    candidates = jnp.broadcast_to(jnp.arange(1.0, J + 1)[None, :, None, None, None], (B, J, 1, 1, 2))
    model = _Recorder()
    _task_loss([model], task, dict(batch, z_last=candidates))
    picked = model.calls[0]["c_image"][:, -1, 0, 0, 0]  # candidate k holds the value k + 1
    counts = np.array([np.sum(picked == k + 1) for k in range(J)])
    assert counts.sum() == B and counts[last_from:].sum() == 0
    np.testing.assert_allclose(counts[:last_from] / B, 1.0 / last_from, atol=0.04)


@pytest.mark.parametrize("objective, prediction", [("flow", "x0"), ("eps", "x0"), ("v", "x0"), ("v_zero_snr", "x0")])
def test_task_loss_is_zero_for_the_exact_output(objective, prediction):
    task, batch = _loss_setup(objective, prediction, B=256)
    path = objectives.path(objective)
    z = batch["z"]

    def exact(x_t, t):  # the network that knows x0 (the first frame, if replaced, is masked out)
        tb = t[:, None, None, None, None]
        alpha, sigma = schedules.alpha_sigma(tb, path)
        eps = (x_t - alpha * z) / sigma
        if objective == "flow":
            return z if prediction == "x0" else eps - z
        return eps if objective == "eps" else alpha * eps - sigma * z

    model = _Recorder(exact)
    (loss, aux), (wrong, _) = _task_loss([model, _Recorder()], task, batch)
    assert float(loss) < 1e-6 and float(aux["x0_mse"]) < 1e-6
    if path in schedules.DDPM_PATHS:  # uniform over the 1000 trained steps
        steps = model.calls[0]["t"] * 1000
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
        assert steps.min() >= 1 and steps.max() <= 1000
    assert float(wrong) > 0.1  # the zero output is not exact


@pytest.mark.parametrize("weight", [1.0, 4.0])
def test_first_latent_weight(weight):
    """cond.first_latent_weight weighs latent 0 where it is generated (no first frame), and only
    there: the mask is the weight there, 0 where the first frame replaced it, 1 elsewhere; an
    output wrong by 1 on latent 0 alone costs each example weight / (weight + T - 1) or nothing."""
    B, T = 512, 3
    task, batch = _loss_setup("v", B=B, **{"cond.p_first": 0.5, "cond.first_latent_weight": weight})
    x = task.training_inputs(batch["z"], batch["z_last"], batch["tokens"], jax.random.key(4))
    mask, has_first = np.asarray(x["loss_mask"])[:, :, 0, 0, 0], np.asarray(x["has_first"])
    assert 0.4 < has_first.mean() < 0.6
    np.testing.assert_array_equal(mask[:, 0], np.where(has_first, 0.0, weight))
    np.testing.assert_array_equal(mask[:, 1:], 1.0)

    def off_on_latent_0(x_t, t):  # the exact v target plus 1 on latent 0
        tb = t[:, None, None, None, None]
        alpha, sigma = schedules.alpha_sigma(tb, "ddpm")
        eps = (x_t - alpha * batch["z"]) / sigma
        return (alpha * eps - sigma * batch["z"]).at[:, 0].add(1.0)

    ((loss, _),) = _task_loss([_Recorder(off_on_latent_0)], task, batch)
    expected = np.mean(np.where(has_first, 0.0, weight / (weight + T - 1)))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-3)
    with pytest.raises(ValueError, match="first_latent_weight"):
        _loss_setup("v", **{"cond.first_latent_weight": 0.0})


def test_object_map():
    """object_map: 1 on a frame's object, its background's distance over the object's elsewhere
    (a 2 x 2 object of 64 positions pulls the frame mean 4/64 of the way: 4/60 = 1/15)."""
    from pixeldance.diffusion.task import object_map
    code = jnp.array([1.0, -2.0, 0.5, 3.0])
    z = jnp.zeros((2, 3, 8, 8, 4)).at[:, 0, 2:4, 5:7].set(code).at[:, 1, 4:6, 0:2].set(5 * code)
    z = z.at[:, 2, 6:8, 6:8].set(-code).at[1].add(7.0)  # a background latent that is not 0 changes nothing
    m = np.asarray(object_map(z))
    assert m.shape == (2, 3, 8, 8, 1)
    for t, (r, c) in enumerate([(2, 5), (4, 0), (6, 6)]):  # per frame: its own object and scale
        obj = np.zeros((8, 8), bool)
        obj[r:r + 2, c:c + 2] = True
        np.testing.assert_allclose(m[:, t, obj, 0], 1.0, rtol=1e-5)
        np.testing.assert_allclose(m[:, t, ~obj, 0], 1 / 15, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(object_map(jnp.ones((1, 2, 4, 4, 3)))), 0.0)  # a plain frame: no object


@pytest.mark.parametrize("weight", [0.0, 6.0])
def test_object_weight(weight):
    """cond.object_weight weighs each latent position 1 + w * object_map, on top of the first-frame
    mask (0 where the first frame is given stays 0): an output wrong by 1 on the object's
    positions alone costs each example the object's share of the weights."""
    from pixeldance.diffusion.task import object_map
    B, T, h, C = 256, 3, 4, 2
    task, _ = _loss_setup("v", B=B, C=C, **{"cond.p_first": 0.5, "cond.object_weight": weight})
    z = 0.1 * _normal(3, (B, T, h, h, C))
    z = z.at[:, :, 1, 2].add(3.0)  # one object position per frame
    batch = dict(z=z, z_last=_normal(4, (B, 3, h, h, C)),
                 tokens=jnp.zeros((B, 12), jnp.int32).at[:, :3].set(jnp.array([1, 5, 6])))
    x = task.training_inputs(batch["z"], batch["z_last"], batch["tokens"], jax.random.key(4))
    mask, has_first = np.asarray(x["loss_mask"]), np.asarray(x["has_first"])
    expect = 1.0 + weight * np.asarray(object_map(z))
    expect[:, 0] *= ~has_first[:, None, None, None]
    np.testing.assert_allclose(np.broadcast_to(mask, expect.shape), expect, rtol=1e-6)

    def off_on_object(x_t, t):  # the exact v target plus 1 on the object's positions
        tb = t[:, None, None, None, None]
        alpha, sigma = schedules.alpha_sigma(tb, "ddpm")
        eps = (x_t - alpha * batch["z"]) / sigma
        return (alpha * eps - sigma * batch["z"]).at[:, :, 1, 2].add(1.0)

    ((loss, _),) = _task_loss([_Recorder(off_on_object)], task, batch)
    w = np.broadcast_to(expect, (B, T, h, h, C))
    expected = np.mean(w[:, :, 1, 2].reshape(B, -1).sum(1) / w.reshape(B, -1).sum(1))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-3)
    if weight:
        assert expected > 3 / (h * h)  # the object counts for more than its area (1 / 16)
    with pytest.raises(ValueError, match="object_weight"):
        _loss_setup("v", **{"cond.object_weight": -1.0})


# ---------------------------------------------------------------------------------------------
# Joint image-video training
# ---------------------------------------------------------------------------------------------

class _CountingBatches:
    """A resumable stand-in for the cache pipeline: batch i has z filled with i."""

    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return dict(z=np.full((2, 3, 1, 1, 4), self.i, np.float32), z_last=np.zeros((2, 3, 1, 1, 4), np.float32),
                    tokens=np.ones((2, 5), np.int32))

    def get_state(self):
        return dict(i=self.i)

    def set_state(self, state):
        self.i = state["i"]


def test_image_batches_every_k_and_resumable():
    it = dit_trainer.ImageVideoBatches(_CountingBatches(), 3)
    got = [next(it) for _ in range(7)]
    assert [b["z"].shape[1] for b in got] == [3, 3, 1, 3, 3, 1, 3]
    np.testing.assert_array_equal(got[2]["z"][:, 0], 3.0)  # the first latent frame of batch 3
    assert got[2]["z_last"].shape == (2, 1, 1, 1, 4) and got[2]["tokens"].shape == (2, 5)
    # Restored from its state, the stream continues exactly.
    state = it.get_state()
    after = [next(it)["z"] for _ in range(3)]
    resumed = dit_trainer.ImageVideoBatches(_CountingBatches(), 3)
    resumed.set_state(state)
    for a, b in zip(after, [next(resumed)["z"] for _ in range(3)]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="image_every"):
        dit_trainer.ImageVideoBatches(_CountingBatches(), -1)


def test_image_batches_get_no_instructions():
    task, batch = _loss_setup(B=64, **{"cond.p_first": 1.0, "cond.p_last": 1.0})
    image_batch = dict(batch, z=batch["z"][:, :1], z_last=batch["z"][:, :1])
    video_model, image_model = _Recorder(), _Recorder()
    fn = lambda model, b: task.loss(model, None, b, jax.random.key(4))
    jax.jit(lambda: [fn(video_model, batch), fn(image_model, image_batch)])()
    jax.effects_barrier()
    assert image_model.calls[0]["c_mask"].shape[1] == 1 and image_model.calls[0]["c_mask"].max() == 0
    assert video_model.calls[0]["c_mask"].max() == 1  # the same config gives videos instructions
