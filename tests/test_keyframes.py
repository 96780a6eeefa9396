"""Keyframes anywhere (issue 20, item 1): placement and mask, the pixel -> latent mapping, the
first/last special case bit for bit, per-keyframe tau at sampling, training's keyframe sets at
their configured rates, the default path unchanged, the Pipeline's slots and the cache's
one-frame latents. Stand-in models and tiny shapes only: every test runs in seconds.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixeldance import build, configs
from pixeldance.data import latent_cache
from pixeldance.diffusion import conditioning, samplers, task as task_lib
from pixeldance.models import text as text_lib
from pixeldance.sample import Pipeline
from pixeldance.trainers import cache as cache_stage

ALWAYS = conditioning.ALWAYS


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _task(**changes):
    # Rectified flow: the stand-in DiTs here output x0 on the flow path, and the old draws'
    # copy below samples flow times (the keyframe rules do not depend on the objective).
    config = configs.load_config("experiments/base.py:runlocal")
    return build.task(configs.override(config, **{"diffusion.objective": "flow", **changes}))


def _bits(x):
    return np.asarray(x).tobytes()


# ---------------------------------------------------------------------------------------------
# Pixel frames -> latent frames; placement
# ---------------------------------------------------------------------------------------------

def test_pixel_to_latent_mapping():
    """17 frames, temporal factor 4: pixel 4k sits at latent k; others go to the nearest 4k, ties
    to the group they fall in (latent k covers 4k-3..4k); -1 is the last frame."""
    got = [conditioning.latent_index(p, 17, 4) for p in range(17)]
    assert got == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4]
    for k in range(5):
        assert conditioning.latent_index(conditioning.anchor_pixel(k, 4), 17, 4) == k
    assert conditioning.latent_index(-1, 17, 4) == 4 and conditioning.latent_index(-17, 17, 4) == 0
    for bad in (17, -18):
        with pytest.raises(ValueError, match="outside the clip's 17 frames"):
            conditioning.latent_index(bad, 17, 4)
    # Never more than half a group from the asked frame.
    assert max(abs(conditioning.anchor_pixel(g, 4) - p) for p, g in enumerate(got)) == 2


def test_place_keyframes_positions_and_mask():
    B, K, T, h, C = 2, 3, 5, 2, 3
    z = _normal(0, (B, K, h, h, C)) + 3.0
    positions = jnp.array([[0, 2, 4], [3, -1, 3]])  # example 1: slot 1 unused, slots 0 and 2 share frame 3
    given = jnp.array([[True, False, True], [True, True, True]])
    taus = jnp.array([[ALWAYS, 7, 2], [5, 6, 1]], jnp.int32)
    c, m, placed = conditioning.place_keyframes(z, positions, given, T, taus)
    assert c.shape == (B, T, h, h, C) and m.shape == (B, T, h, h, 1)
    np.testing.assert_array_equal(m[:, :, 0, 0, 0], [[1, 0, 0, 0, 1], [0, 0, 0, 1, 0]])
    np.testing.assert_array_equal(c[0, 0], z[0, 0])
    np.testing.assert_array_equal(c[0, 2], 0.0)  # placed, not given: no latent
    np.testing.assert_array_equal(c[0, 4], z[0, 2])
    np.testing.assert_array_equal(c[0, 1], 0.0)
    np.testing.assert_array_equal(c[1, 3], z[1, 2])  # the later slot wins
    np.testing.assert_array_equal(np.delete(np.asarray(c[1]), 3, axis=0), 0.0)
    np.testing.assert_array_equal(placed, [[ALWAYS, 0, 7, 0, 2], [0, 0, 0, 1, 0]])


def _old_make_instructions(z_first, z_last, has_first, has_last, num_frames):
    """conditioning.make_instructions as it was before keyframes anywhere (the reference)."""
    B, h, w, C = z_first.shape
    f = has_first.astype(z_first.dtype)[:, None, None, None]
    l = has_last.astype(z_first.dtype)[:, None, None, None]
    c_image = jnp.zeros((B, num_frames, h, w, C), z_first.dtype)
    c_mask = jnp.zeros((B, num_frames, h, w, 1), z_first.dtype)
    if num_frames > 1:
        c_image = c_image.at[:, -1].set(z_last * l)
        c_mask = c_mask.at[:, -1].set(jnp.broadcast_to(l, (B, h, w, 1)))
    c_image = c_image.at[:, 0].set(z_first * f)
    c_mask = c_mask.at[:, 0].set(jnp.broadcast_to(f, (B, h, w, 1)))
    return c_image, c_mask


@pytest.mark.parametrize("T", [1, 2, 5])
def test_first_and_last_are_the_special_case_bit_for_bit(T):
    B, h, C = 4, 2, 3
    z_first, z_last = _normal(1, (B, h, h, C)), _normal(2, (B, h, h, C))  # signs of both: -0.0 kept too
    has_first, has_last = jnp.array([True, True, False, False]), jnp.array([True, False, True, False])
    new = conditioning.make_instructions(z_first, z_last, has_first, has_last, T)
    old = _old_make_instructions(z_first, z_last, has_first, has_last, T)
    for a, b in zip(new, old):
        assert a.shape == b.shape and _bits(a) == _bits(b)


# ---------------------------------------------------------------------------------------------
# Sampling: per-keyframe tau, the default path unchanged
# ---------------------------------------------------------------------------------------------

class _MaskSeen:
    """A stand-in DiT recording, per call, which latent frames of the full branch carry a keyframe."""

    def __init__(self, B):
        self.B, self.seen = B, []

    def apply(self, params, x, t, c_image, c_mask, tokens):
        jax.debug.callback(lambda m: self.seen.append(np.asarray(m)[:self.B, :, 0, 0, 0] > 0), c_mask)
        return jnp.zeros_like(x)


def _sample_jit(task):
    return jax.jit(task.keyframe_sample, static_argnums=0, static_argnames=("steps", "sampler", "branches"))


def test_per_keyframe_tau_at_sampling():
    """Each keyframe is shown for steps i < its own tau; the first frame at every step; the none
    branch of image guidance sees none."""
    task = _task(**{"cond.first_frame": "concat"})
    B, T, h, C, steps = 1, 5, 1, 2, 4
    model = _MaskSeen(B)
    z_keys = jnp.ones((B, 3, h, h, C))
    positions = jnp.array([[0, 2, 3]])
    key_tau = jnp.array([[ALWAYS, 1, 3]], jnp.int32)
    tokens = jnp.zeros((B, 4), jnp.int32)
    _sample_jit(task)(model, None, jnp.zeros((B, T, h, h, C)), z_keys, positions, jnp.ones((B, 3), bool), key_tau,
                      tokens, jax.random.key(0), jnp.float32(1.0), jnp.float32(1.0), steps=steps, sampler="euler",
                      branches=2)
    jax.effects_barrier()
    expected = [[1, 0, 1, 1, 0], [1, 0, 0, 1, 0], [1, 0, 0, 1, 0], [1, 0, 0, 0, 0]]
    np.testing.assert_array_equal(np.concatenate(model.seen).astype(int), expected)


def _old_guided_sample(task, model, params, noise, z_first, z_last, has_first, has_last, text, rng, guidance,
                       image_guidance, tau, *, steps, sampler, branches):
    """PixelDanceTask.guided_sample as it was before keyframes anywhere (the reference)."""
    from pixeldance.diffusion import guidance as guidance_lib
    T, B = noise.shape[1], noise.shape[0]
    c_full, m_full = _old_make_instructions(z_first, z_last, has_first, has_last, T)
    c_full = conditioning.noise_instructions(rng, c_full, m_full, task.noise)
    c_drop, m_drop = conditioning.drop_last(c_full, m_full)
    null = text_lib.null_text(text, None)
    tok = text_lib.concat_text([text, null, null][:branches])

    def denoise(x, t, i):
        use_last = i < tau
        c = jnp.where(use_last, c_full, c_drop)
        m = jnp.where(use_last, m_full, m_drop)
        xx = guidance_lib.stack(x, branches)
        tt = jnp.full((branches * B,), t)
        cc = jnp.concatenate([c, c, jnp.zeros_like(c)][:branches])
        mm = jnp.concatenate([m, m, jnp.zeros_like(m)][:branches])
        pred = task.denoise(model.apply(params, xx, tt, cc, mm, tok), xx, tt)
        return guidance_lib.combine(pred, branches, text_scale=guidance, image_scale=image_guidance)
    project = (lambda x: conditioning.replace_first(x, z_first, has_first)) if task.replace else None
    return samplers.solve(denoise, noise, steps=steps, sampler=sampler, path=task.path, project=project)


class _MixModel:
    """A stand-in DiT whose output mixes x, t, every instruction frame and the mask."""

    def apply(self, params, x, t, c_image, c_mask, tokens):
        w = jnp.arange(1, c_image.shape[1] + 1, dtype=x.dtype)[None, :, None, None, None]
        return 0.5 * x + 0.3 * jnp.sum(c_image * w, axis=1, keepdims=True) + c_mask * t[:, None, None, None, None]


@pytest.mark.parametrize("first_frame, tau, branches", [("replace", 2, 2), ("concat", 1, 3)])
def test_first_last_sampling_is_todays_bit_for_bit(first_frame, tau, branches):
    """guided_sample (now keyframe_sample with two slots) and the Pipeline's slots of first and last
    frames give exactly the latents the old sampler gave."""
    task = _task(**{"cond.first_frame": first_frame})
    B, T, h, C, steps = 3, 4, 2, 2, 3
    noise, z_first, z_last = _normal(3, (B, T, h, h, C)), _normal(4, (B, h, h, C)), _normal(5, (B, h, h, C))
    has_first, has_last = jnp.array([True, True, False]), jnp.array([True, False, False])
    tokens = jnp.zeros((B, 4), jnp.int32).at[:, :2].set(3)
    args = (_MixModel(), None, noise, z_first, z_last, has_first, has_last, tokens, jax.random.key(7),
            jnp.float32(2.0), jnp.float32(1.5), jnp.int32(tau))
    kw = dict(steps=steps, sampler="heun", branches=branches)
    old = jax.jit(lambda *a: _old_guided_sample(task, *a, **kw), static_argnums=0)(*args)
    new = jax.jit(task.guided_sample, static_argnums=0, static_argnames=tuple(kw))(*args, **kw)
    assert _bits(new) == _bits(old)
    # The Pipeline's route: slots from first/last frames, in its order.
    pipe = _fake_pipeline(T)
    firsts = [np.zeros((8, 8, 3), np.uint8) if f else None for f in has_first]
    lasts = [np.zeros((8, 8, 3), np.uint8) if f else None for f in has_last]
    _, positions, given, key_tau = Pipeline.keyframe_slots(pipe, firsts, lasts, None, num_frames=1 + 4 * (T - 1),
                                                           height=8, width=8, tau=tau, steps=steps)
    z_keys = jnp.stack([z_last, z_first], axis=1)
    via = _sample_jit(task)(_MixModel(), None, noise, z_keys, jnp.asarray(positions), jnp.asarray(given),
                            jnp.asarray(key_tau), tokens, jax.random.key(7), jnp.float32(2.0), jnp.float32(1.5), **kw)
    assert _bits(via) == _bits(old)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_middle_keyframe_not_replaced_first_is(sampler):
    """With first_frame='replace' the latent-0 keyframe is put back clean; a middle one only conditions."""
    task = _task(**{"cond.first_frame": "replace"})
    B, T, h, C = 1, 4, 1, 2
    z_keys = jnp.stack([jnp.full((B, h, h, C), 3.0), jnp.full((B, h, h, C), -3.0)], axis=1)
    x = _sample_jit(task)(_MixModel(), None, _normal(6, (B, T, h, h, C)), z_keys, jnp.array([[0, 2]]),
                          jnp.ones((B, 2), bool), jnp.array([[ALWAYS, 2]], jnp.int32), jnp.zeros((B, 4), jnp.int32),
                          jax.random.key(0), jnp.float32(1.0), jnp.float32(1.0), steps=3, sampler=sampler, branches=2)
    np.testing.assert_array_equal(x[:, 0], 3.0)
    assert not np.allclose(x[:, 2], -3.0, atol=0.1)


class _GroupModel:
    """A stand-in DiT (flow, x0-prediction) whose output shows what reached it: 10 for text, 100 for
    a keyframe at latent 0, 1000 for keyframes after it (half for the latents, half for the mask)."""

    def apply(self, params, x, t, c_image, c_mask, tokens):
        seen = lambda a: jnp.any(a != 0, axis=tuple(range(1, a.ndim)))
        text = jnp.any(tokens[:, 1:] != 0, axis=1)
        first = 0.5 * seen(c_mask[:, 0]) + 0.5 * seen(c_image[:, 0])
        rest = 0.5 * seen(c_mask[:, 1:]) + 0.5 * seen(c_image[:, 1:])
        out = 1.0 + 10.0 * text + 100.0 * first + 1000.0 * rest
        return jnp.broadcast_to(out[:, None, None, None, None], x.shape)


@pytest.mark.parametrize("image_scale, keyframe_scale", [(2.0, 0.5), (1.0, 3.0), (1.5, 1.5), (1.0, 1.0)])
def test_image_guidance_per_keyframe_group(image_scale, keyframe_scale):
    """The first frame's scale and the other keyframes' scale apply to their own group (a fourth
    branch only when they differ); text-only examples are untouched by either."""
    from pixeldance.diffusion import guidance
    task = _task(**{"cond.first_frame": "concat"})
    B, T, h, C, text_scale = 2, 3, 1, 2, 3.0
    branches = guidance.num_branches(image_scale, keyframe_scale)
    assert branches == (4 if image_scale != keyframe_scale else 2 if image_scale == 1.0 else 3)
    tokens = jnp.zeros((B, 4), jnp.int32).at[:, :3].set(jnp.array([1, 5, 6]))
    x = _sample_jit(task)(_GroupModel(), None, jnp.zeros((B, T, h, h, C)), jnp.ones((B, 2, h, h, C)),
                          jnp.array([0, 2]), jnp.array([[True, True], [False, False]]),
                          jnp.full((B, 2), ALWAYS, jnp.int32), tokens, jax.random.key(0), jnp.float32(text_scale),
                          jnp.float32(image_scale), None, jnp.float32(keyframe_scale), steps=1, sampler="ddim",
                          branches=branches)
    expected = [1.0 + 10.0 * text_scale + 100.0 * image_scale + 1000.0 * keyframe_scale, 1.0 + 10.0 * text_scale]
    np.testing.assert_allclose(x[:, 0, 0, 0, 0], expected, rtol=1e-6)
    three = _normal(11, (3, 5))
    four = jnp.concatenate([three, three[1:2] + 0.5])  # full, image, none, first
    np.testing.assert_allclose(guidance.combine(four, 4, text_scale=2.0, image_scale=1.5, keyframe_scale=1.5),
                               guidance.combine(three, 3, text_scale=2.0, image_scale=1.5), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The Pipeline's keyframe slots
# ---------------------------------------------------------------------------------------------

def _fake_pipeline(T):
    """What Pipeline.keyframe_slots reads of a Pipeline: the VAE's latent shape (tf 4, sf 8)."""
    vae = types.SimpleNamespace(latent_shape=lambda F, H, W: (1 + (F - 1) // 4, H // 8, W // 8, 2))
    return types.SimpleNamespace(vae=vae, _check_image=lambda *a: Pipeline._check_image(None, *a))


def test_pipeline_keyframe_slots():
    pipe, H = _fake_pipeline(5), 8
    img = lambda v: np.full((H, H, 3), v, np.uint8)
    kw = dict(num_frames=17, height=H, width=H, tau=4, steps=6)
    images, positions, given, key_tau = Pipeline.keyframe_slots(
        pipe, [img(1), None], [None, None], [{8: img(2), 14: (img(3), 6)}, {2: img(4), -1: img(5), 1: (img(6), 0)}],
        **kw)
    assert images.shape == (5, 2, H, H, 3)
    # Slots: last, first, then the keyframes in the dict's order; -1 marks an unused slot.
    np.testing.assert_array_equal(positions, [[4, 0, 2, 4, -1], [4, 0, 1, 4, 0]])
    np.testing.assert_array_equal(given, [[False, True, True, True, False], [False, False, True, True, True]])
    # Pixel 1 goes to latent 0: a first frame, always shown whatever tau it asked for.
    np.testing.assert_array_equal(key_tau, [[4, ALWAYS, 4, 6, 0], [4, ALWAYS, 4, 4, ALWAYS]])
    np.testing.assert_array_equal(images[2:, 0, 0, 0, 0], [2, 3, 0])
    np.testing.assert_array_equal(images[2:, 1, 0, 0, 0], [4, 5, 6])
    with pytest.raises(ValueError, match="same latent frame 2 \\(pixel frame 8"):
        Pipeline.keyframe_slots(pipe, [None], [None], [{7: img(1), 9: img(2)}], **kw)
    with pytest.raises(ValueError, match="last_frame fall on the same latent frame 4"):
        Pipeline.keyframe_slots(pipe, [img(0)], [img(0)], [{15: img(1)}], **kw)
    with pytest.raises(ValueError, match="outside the clip"):
        Pipeline.keyframe_slots(pipe, [None], [None], [{17: img(1)}], **kw)
    with pytest.raises(ValueError, match=r"keyframes\[0\]\[8\]: tau must be an integer in \[0, 6\]"):
        Pipeline.keyframe_slots(pipe, [None], [None], [{8: (img(1), 7)}], **kw)
    # The call's tau from the config may exceed the steps (the default main job: tau 10, 8 steps):
    # keyframes without their own tau then show at every step, as the last frame does.
    _, _, _, key_tau = Pipeline.keyframe_slots(pipe, [None], [None], [{8: img(1)}], **dict(kw, tau=10))
    np.testing.assert_array_equal(key_tau, [[10, ALWAYS, 10]])
    with pytest.raises(ValueError, match=r"keyframes\[0\]\[8\] must be uint8 \[8, 8, 3\]"):
        Pipeline.keyframe_slots(pipe, [None], [None], [{8: np.zeros((4, 4, 3), np.uint8)}], **kw)


# ---------------------------------------------------------------------------------------------
# Training: the default path unchanged, keyframe sets at their rates
# ---------------------------------------------------------------------------------------------

def _old_training_inputs(task, z, z_last, text, rng):
    """PixelDanceTask.training_inputs' image instructions, x_t and t as they were (the reference)."""
    from pixeldance.diffusion import objectives, schedules
    from pixeldance import rng as rng_lib
    B, T = z.shape[:2]
    keys = jax.random.split(rng, 7)
    has_first = jax.random.uniform(keys[0], (B,)) < task.p_first
    has_last = has_first & (jax.random.uniform(keys[1], (B,)) < task.p_last)
    pick = jax.random.randint(keys[2], (B,), 0, min(task.last_from, z_last.shape[1]))
    last = jnp.take_along_axis(z_last, pick[:, None, None, None, None], axis=1)[:, 0]
    c_image, c_mask = _old_make_instructions(z[:, 0], last, has_first, has_last, T)
    c_image = conditioning.noise_instructions(keys[3], c_image, c_mask, task.noise)
    t = schedules.sample_time(keys[5], B, kind=task.time_sampling, mean=task.logit_mean, std=task.logit_std)
    x_t = objectives.add_noise(z, rng_lib.normal(keys[6], z.shape), t, objective=task.objective)
    x_t = conditioning.replace_first(x_t, z[:, 0], has_first)
    return dict(c_image=c_image, c_mask=c_mask, t=t, x_t=x_t, has_first=has_first, has_last=has_last)


def test_default_training_draws_unchanged():
    """keyframe_sets '' (the default) draws first and last frames exactly as before, bit for bit,
    z_frames or not."""
    task = _task()
    assert task.keyframe_sets == () and not task.needs_frame_latents
    B, T, C = 64, 5, 2
    z, z_last = _normal(8, (B, T, 1, 1, C)), _normal(9, (B, 3, 1, 1, C))
    tokens = jnp.zeros((B, 4), jnp.int32)
    # Op by op (not jitted): two compiled programs may fuse x_t's arithmetic differently.
    old = _old_training_inputs(task, z, z_last, tokens, jax.random.key(3))
    for z_frames in (None, _normal(10, (B, T, 1, 1, C))):
        new = task.training_inputs(z, z_last, tokens, jax.random.key(3), z_frames=z_frames)
        for k, v in old.items():
            assert _bits(new[k]) == _bits(v), k
    np.testing.assert_array_equal(new["keyframes"][:, 0], old["has_first"])
    np.testing.assert_array_equal(new["keyframes"][:, -1], old["has_last"])
    assert not np.any(new["keyframes"][:, 1:-1])


def _draw(sets, B=4000, T=5, **changes):
    """(keyframes bool [B, T], c_image [B, T], last_pick [B], inputs) of training_inputs at noise 0,
    with z = 10 + t, z_frames = 20 + t, last-frame candidates 30 + j and z_shift = 40 + t, one channel."""
    task = _task(**{"cond.keyframe_sets": sets, "cond.noise": 0.0, **changes})
    frames = jnp.arange(T, dtype=jnp.float32)[None, :, None, None, None]
    z = jnp.broadcast_to(10.0 + frames, (B, T, 1, 1, 1))
    z_frames = jnp.broadcast_to(20.0 + frames, (B, T, 1, 1, 1))
    z_last = jnp.broadcast_to(30.0 + jnp.arange(3.0)[None, :, None, None, None], (B, 3, 1, 1, 1))
    z_shift = jnp.broadcast_to(40.0 + frames, (B, T, 1, 1, 1))
    x = jax.jit(lambda z, zl, zf, zs: task.training_inputs(z, zl, jnp.zeros((B, 4), jnp.int32), jax.random.key(1),
                                                           z_frames=zf, z_shift=zs))(z, z_last, z_frames, z_shift)
    given = np.asarray(x["keyframes"])
    np.testing.assert_array_equal(np.asarray(x["c_mask"])[:, :, 0, 0, 0], given)
    return given, np.asarray(x["c_image"])[:, :, 0, 0, 0], np.asarray(x["last_pick"]), x


def test_keyframe_sets_at_their_rates():
    given, c, pick, x = _draw("none:0.1,first:0.2,first_last:0.3,first_middle:0.4")
    B, T = given.shape
    first, last, middle = given[:, 0], given[:, -1], given[:, 1:-1].sum(1)
    sets = {"none": ~first & ~last & (middle == 0), "first": first & ~last & (middle == 0),
            "first_last": first & last & (middle == 0), "first_middle": first & ~last & (middle == 1)}
    assert sum(s.sum() for s in sets.values()) == B  # every draw is one of the sets
    tol = 0.03  # about 4 standard errors at 4000 examples
    for name, p in zip(sets, (0.1, 0.2, 0.3, 0.4)):
        assert abs(sets[name].mean() - p) < tol, name
    # Middle keyframes uniform over latents 1..T-2.
    where = np.argmax(given[sets["first_middle"], 1:-1], axis=1)
    np.testing.assert_allclose(np.bincount(where, minlength=T - 2) / len(where), 1 / (T - 2), atol=0.04)
    # Latents: the first from z, middle ones from z_frames (one-frame encodings), the last the picked candidate.
    np.testing.assert_array_equal(c[first, 0], 10.0)
    rows, cols = np.nonzero(given[:, 1:-1])
    np.testing.assert_array_equal(c[rows, cols + 1], 20.0 + cols + 1)
    np.testing.assert_array_equal(c[last, -1], 30.0 + pick[last])
    np.testing.assert_array_equal(c[~given], 0.0)
    # First-frame replacement and the loss mask follow latent 0's keyframe.
    np.testing.assert_array_equal(np.asarray(x["loss_mask"])[:, 0, 0, 0, 0], np.where(first, 0.0, 1.0))
    np.testing.assert_array_equal(np.asarray(x["x_t"])[first, 0, 0, 0, 0], 10.0)


def test_random_positions_and_per_keyframe_drop():
    given, c, _, _ = _draw("random:1", **{"cond.keyframe_rate": 0.3})
    np.testing.assert_allclose(given.mean(0), 0.3, atol=0.03)  # every latent frame, the first too
    assert abs(np.corrcoef(given[:, 1], given[:, 3])[0, 1]) < 0.06  # independently
    given, _, _, _ = _draw("first_last:1", **{"cond.keyframe_drop": 0.4})
    assert given[:, 0].all()  # the first frame is never dropped
    assert abs(given[:, -1].mean() - 0.6) < 0.03


def test_context_set_for_latent_continuation():
    """The context set gives the first n latents, n uniform in 1..context_frames, from the clip itself
    (not z_frames, not the last-frame candidates), clean in x_t and out of the loss; never dropped;
    with keyframe_drop the other sets still drop."""
    given, c, _, x = _draw("context:1", **{"cond.context_frames": 3, "cond.keyframe_drop": 0.5,
                                           "cond.keyframe_latents": "frames"})
    context = np.asarray(x["context"])
    np.testing.assert_array_equal(context, given)
    n = given.sum(1)
    assert set(np.unique(n)) == {1, 2, 3}
    np.testing.assert_allclose(np.bincount(n, minlength=4)[1:] / len(n), 1 / 3, atol=0.03)
    np.testing.assert_array_equal(given, np.arange(5)[None] < n[:, None])  # a prefix
    T = given.shape[1]
    frames = np.broadcast_to(10.0 + np.arange(T), given.shape)
    np.testing.assert_array_equal(c[given], frames[given])  # the clip's own latents
    np.testing.assert_array_equal(np.asarray(x["x_t"])[:, :, 0, 0, 0][given], frames[given])  # clean
    np.testing.assert_array_equal(np.asarray(x["loss_mask"])[:, :, 0, 0, 0], np.where(given, 0.0, 1.0))
    assert not np.any(np.asarray(x["has_last"]))
    # context_frames is capped at T - 1 (a frame is always left to generate) and checked.
    given, _, _, _ = _draw("context:1", T=3, **{"cond.context_frames": 5})
    assert given.sum(1).max() == 2 and not given[:, -1].any()
    with pytest.raises(ValueError, match="context_frames"):
        _task(**{"cond.context_frames": 0})
    # Mixed with other sets, only the context draws are marked as context.
    given, _, _, x = _draw("first_last:1,context:1")
    context = np.asarray(x["context"])
    assert 0.45 < context.any(1).mean() < 0.55
    assert not context[given[:, -1]].any()


def test_continue_set_trains_on_the_window_one_latent_later():
    """The 'continue' set: context prefixes as the 'context' set's, but from z_shift (the item read
    4 frames longer, latents 1..T), and the example trains on z_shift: the context latents, x_t's
    clean frames and the returned target all come from it; other sets keep z. Without z_shift it
    is a clear error."""
    given, c, _, x = _draw("first:1,continue:1", **{"cond.context_frames": 2})
    context, target = np.asarray(x["context"]), np.asarray(x["z"])[:, :, 0, 0, 0]
    shifted = context.any(1)
    assert 0.45 < shifted.mean() < 0.55
    n = given[shifted].sum(1)
    assert set(np.unique(n)) == {1, 2}
    np.testing.assert_array_equal(given[shifted], np.arange(5)[None] < n[:, None])
    np.testing.assert_array_equal(target[shifted], np.broadcast_to(40.0 + np.arange(5), target[shifted].shape))
    np.testing.assert_array_equal(target[~shifted], np.broadcast_to(10.0 + np.arange(5), target[~shifted].shape))
    np.testing.assert_array_equal(c[context], target[context])  # context latents from z_shift
    np.testing.assert_array_equal(c[~shifted, 0], 10.0)  # the first-frame set keeps z's latent 0
    np.testing.assert_array_equal(np.asarray(x["x_t"])[:, :, 0, 0, 0][context], target[context])  # clean
    np.testing.assert_array_equal(np.asarray(x["loss_mask"])[shifted, :, 0, 0, 0], np.where(given[shifted], 0.0, 1.0))
    # The loss regresses on z_shift for those examples: a model that outputs z_shift everywhere
    # (x0 prediction) has zero loss on a batch of 'continue' draws only.
    task = _task(**{"cond.keyframe_sets": "continue:1", "cond.noise": 0.0, "diffusion.prediction": "x0"})
    B, T = 8, 5
    z = jnp.zeros((B, T, 1, 1, 1))
    z_shift = jnp.broadcast_to(40.0 + jnp.arange(T, dtype=jnp.float32)[None, :, None, None, None], z.shape)

    class Oracle:
        def apply(self, params, x_t, t, c_image, c_mask, text):
            return z_shift

    batch = dict(z=z, z_last=z[:, :1], tokens=jnp.zeros((B, 4), jnp.int32), z_shift=z_shift)
    loss, _ = task.loss(Oracle(), {}, batch, jax.random.key(0))
    assert float(loss) < 1e-6
    loss_on_z, _ = task.loss(Oracle(), {}, dict(batch, z_shift=z), jax.random.key(0))
    assert float(loss_on_z) > 1.0
    assert task.needs_shift_latents and not _task(**{"cond.keyframe_sets": "context:1"}).needs_shift_latents
    with pytest.raises(ValueError, match="z_shift"):
        task.training_inputs(z, z[:, :1], jnp.zeros((B, 4), jnp.int32), jax.random.key(0))


def test_continue_set_takes_each_turning_window_own_context_length():
    """With the cache's shift_context (turning windows: config.cond.continue_turns), a 'continue'
    example's context is exactly its window's n latents, not a fresh draw; other sets ignore it."""
    B, T = 4000, 5
    task = _task(**{"cond.keyframe_sets": "first:1,continue:1", "cond.noise": 0.0, "cond.context_frames": 3})
    n = np.where(np.arange(B) % 3 == 0, 1, np.where(np.arange(B) % 3 == 1, 2, 3)).astype(np.int32)[:, None]
    z = jnp.broadcast_to(10.0 + jnp.arange(T, dtype=jnp.float32)[None, :, None, None, None], (B, T, 1, 1, 1))
    x = jax.jit(lambda n: task.training_inputs(z, z[:, :1], jnp.zeros((B, 4), jnp.int32), jax.random.key(1),
                                               z_shift=z + 30.0, shift_context=n))(n)
    context, given = np.asarray(x["context"]), np.asarray(x["keyframes"])
    shifted = context.any(1)
    assert 0.45 < shifted.mean() < 0.55
    np.testing.assert_array_equal(context[shifted], np.arange(T)[None] < n[shifted])
    np.testing.assert_array_equal(given[shifted], context[shifted])
    np.testing.assert_array_equal(given[~shifted], np.arange(T)[None].repeat((~shifted).sum(), 0) == 0)
    np.testing.assert_array_equal(np.asarray(x["loss_mask"])[shifted, :, 0, 0, 0], np.where(context[shifted], 0.0, 1.0))
    # Without it the lengths are drawn (uniform in 1..3), so a window's own n is what pins them.
    x = task.training_inputs(z, z[:, :1], jnp.zeros((B, 4), jnp.int32), jax.random.key(1), z_shift=z + 30.0)
    drawn = np.asarray(x["context"])
    assert (drawn[shifted].sum(1) != n[shifted, 0]).mean() > 0.5


def test_clip_latents_and_missing_frame_latents():
    """keyframe_latents='clip' takes middle keyframes from z; 'frames' without z_frames is a clear error;
    one-frame batches (images) get no keyframes; T = 2 has no middle frame."""
    given, c, _, _ = _draw("first_middle:1", **{"cond.keyframe_latents": "clip"})
    rows, cols = np.nonzero(given[:, 1:-1])
    assert len(rows) == len(given)
    np.testing.assert_array_equal(c[rows, cols + 1], 10.0 + cols + 1)
    task = _task(**{"cond.keyframe_sets": "first_middle:1"})
    z = jnp.zeros((2, 5, 1, 1, 1))
    with pytest.raises(ValueError, match="z_frames"):
        task.training_inputs(z, z, jnp.zeros((2, 4), jnp.int32), jax.random.key(0))
    one = task.training_inputs(z[:, :1], z[:, :1], jnp.zeros((2, 4), jnp.int32), jax.random.key(0))
    assert not np.any(one["keyframes"])
    two = task.training_inputs(z[:, :2], z[:, :1], jnp.zeros((2, 4), jnp.int32), jax.random.key(0))
    np.testing.assert_array_equal(two["keyframes"], [[True, False]] * 2)


def test_keyframe_sets_config_is_checked():
    assert task_lib.parse_keyframe_sets("first:1, first_last:3") == (0.0, 0.25, 0.75, 0.0, 0.0, 0.0, 0.0)
    for bad, match in (("middle:1", "is not name:weight"), ("first", "is not name:weight"),
                       ("first:x", "not a number"), ("first:-1", ">= 0"), ("none:0", "sum to 0")):
        with pytest.raises(ValueError, match=match):
            task_lib.parse_keyframe_sets(bad)
    with pytest.raises(ValueError, match="keyframe_latents"):
        _task(**{"cond.keyframe_latents": "pixels"})
    assert _task(**{"cond.keyframe_sets": "first_last:1"}).needs_frame_latents is False
    assert _task(**{"cond.keyframe_sets": "random:1", "cond.keyframe_latents": "clip"}).needs_frame_latents is False
    assert _task(**{"cond.keyframe_sets": "random:1"}).needs_frame_latents is True


# ---------------------------------------------------------------------------------------------
# The cache: one-frame latents of pixel frames 4k, optional
# ---------------------------------------------------------------------------------------------

class _PixelVAE:
    """A stand-in VAE: 'encodes' a video [B, F, H, W, 3] into [B, 1 + (F - 1) / 4, 1, 1, 1] whose
    latent k is frame 4k's first pixel value plus 100 x the clip's frame count (so frames encoded
    alone are told apart from frames encoded inside a clip)."""

    def encode(self, videos):
        F = videos.shape[1]
        picked = videos[:, ::4, 0, 0, :1].astype(np.float32)  # [B, T, 1]
        return (picked + 100.0 * F)[:, :, None, None, :]


def test_cache_frame_latents_are_frames_4k_encoded_alone():
    B, F = 2, 9
    videos = np.broadcast_to(np.arange(F, dtype=np.uint8)[None, :, None, None, None] + 10 * np.arange(B, dtype=np.uint8)
                             [:, None, None, None, None], (B, F, 2, 2, 3))
    z = cache_stage._frame_latents(_PixelVAE(), videos, 3)
    np.testing.assert_array_equal(z[:, :, 0, 0, 0], [[100, 104, 108], [110, 114, 118]])
    np.testing.assert_array_equal(cache_stage._frame_latents(_PixelVAE(), videos[:, :1], 1)[:, :, 0, 0, 0],
                                  [[100], [110]])
    # Stored only when asked (old caches and their meta.json stay as they were), read back when there.
    rec = dict(z=np.zeros((3, 1, 1, 1), np.float32), z_last=np.zeros((1, 1, 1, 1), np.float32),
               tokens=np.zeros(4, np.int32))
    assert latent_cache.record_fields(rec) == latent_cache.TOKEN_FIELDS
    rec["z_frames"] = np.asarray(z[0])
    assert latent_cache.record_fields(rec) == (*latent_cache.TOKEN_FIELDS, "z_frames")
    back = latent_cache.decode_record(latent_cache.encode_record({k: rec[k] for k in latent_cache.record_fields(rec)}))
    np.testing.assert_array_equal(back["z_frames"], z[0])
    config = configs.load_config("experiments/base.py:runlocal")
    assert not cache_stage.keyframe_frames(config)
    assert cache_stage.keyframe_frames(configs.override(config, **{"cond.keyframe_sets": "first_middle:1"}))


def test_cache_shift_windows_are_the_longer_read_one_latent_later():
    """z_shift (the 'continue' set's): the same item read 4 frames longer, latents 1..T. The
    synthetic world's longer item is the same object on the same path (same caption, start, size,
    direction), moving slower; the batch encoder stores z_shift per record, padded batches too."""
    config = configs.override(configs.load_config("experiments/base.py:runlocal"),
                              **{"cond.keyframe_sets": "first:1,continue:1"})
    assert cache_stage.shift_windows(config) and "shift_windows" in cache_stage.cache_info(config, "/nowhere", None)
    assert not cache_stage.shift_windows(configs.load_config("experiments/base.py:runlocal"))
    from pixeldance.data import sources
    short, longer = sources.make_source(config, "train", size=3), cache_stage.longer_source(config, 3, 4)
    F = config.data.num_frames
    for i in range(3):
        a, b = short[i], longer[i]
        assert b["video"].shape[0] == F + 4 and a["caption"] == b["caption"]
        np.testing.assert_array_equal(a["video"][0], b["video"][0])  # same start
        assert not np.array_equal(a["video"][F - 1], b["video"][F - 1])  # slower: not there yet
    # Latents 1..T of the longer read, from the stand-in VAE (latent k = frame 4k + 100 x frames).
    videos = np.broadcast_to(np.arange(13, dtype=np.uint8)[None, :, None, None, None], (1, 13, 2, 2, 3))
    z = cache_stage._shift_latents(_PixelVAE(), videos, 2, T=3)
    np.testing.assert_array_equal(z[:, :, 0, 0, 0], [[1304, 1308, 1312]] * 2)
    with pytest.raises(ValueError, match="z_shift"):
        cache_stage._shift_latents(_PixelVAE(), videos, 2, T=2)

    class Source:  # items i: frames i*10 + f, caption str(i); `frames` frames
        def __init__(self, frames):
            self.frames = frames

        def __len__(self):
            return 5

        def __getitem__(self, i):
            f = np.arange(self.frames, dtype=np.uint8) + 10 * i
            return dict(video=np.broadcast_to(f[:, None, None, None], (self.frames, 2, 2, 3)).copy(), caption=str(i))

    text = types.SimpleNamespace(record=lambda captions: dict(tokens=np.zeros((len(captions), 4), np.int32)))
    encode = cache_stage.batch_encoder(_PixelVAE(), text, Source(9), 2, 1, shift_source=Source(13))
    records = [r for batch in encode(0, 5) for r in batch]
    assert [r["caption"] for r in records] == ["0", "1", "2", "3", "4"]
    for i, r in enumerate(records):
        np.testing.assert_array_equal(r["z"][:, 0, 0, 0], [900 + 10 * i, 904 + 10 * i, 908 + 10 * i])
        np.testing.assert_array_equal(r["z_shift"][:, 0, 0, 0], [1304 + 10 * i, 1308 + 10 * i, 1312 + 10 * i])
    # Buckets are refused in one line (the windows need one clip shape).
    with pytest.raises(ValueError, match="buckets"):
        cache_stage.cache_latents(configs.override(config, **{"data.buckets": "9x32x32"}), "/nonexistent")


def _centroids(video, rgb):
    """float [F, 2]: the (x, y) centroid of the pixels of colour `rgb` in each frame."""
    mask = np.all(video == np.asarray(rgb, np.uint8), axis=-1)  # [F, R, R]
    assert mask.sum((1, 2)).min() > 0
    rows, cols = np.arange(video.shape[1]) + 0.5, np.arange(video.shape[2]) + 0.5
    x = (mask * cols[None, None]).sum((1, 2)) / mask.sum((1, 2))
    y = (mask * rows[None, :, None]).sum((1, 2)) / mask.sum((1, 2))
    return np.stack([x, y], 1)


def _heading(steps):
    """The direction (index into DIRECTIONS) of mean step [2] (x, y)."""
    from pixeldance.data import synthetic
    vectors = np.array([synthetic.DIRECTION_VECTORS[d] for d in synthetic.DIRECTIONS], np.float64)
    return int(np.argmax(vectors @ steps))


@pytest.mark.parametrize("num_objects", [1, 2])
def test_turn_windows_change_direction_where_the_context_ends(num_objects):
    """synthetic.TurnWindows: item i keeps item i's caption, colours, size and background; a turned
    window moves another way (prior_direction) up to frame 4n and the caption's way after it,
    fully inside the frame, at the item's own speed; an unturned one is the item read 4 frames
    longer; n in 1..max_context; the rate holds; the base items are untouched."""
    from pixeldance.data import synthetic
    world = synthetic.WorldConfig(num_frames=17, resolution=64, num_objects=num_objects)
    base = synthetic.ShapesSource("train", size=400, config=world)
    windows = synthetic.TurnWindows(base, extra_frames=4, group=4, max_context=2, rate=0.75)
    longer = synthetic.ShapesSource("train", size=400, config=synthetic.WorldConfig(21, 64, num_objects))
    turned, counts = 0, set()
    for i in range(0, 400, 5):
        item, short = windows[i], base[i]
        n = item["context_latents"]
        counts.add(n)
        assert item["caption"] == short["caption"] and item["video"].shape == (21, 64, 64, 3)
        np.testing.assert_array_equal(item["video"][0, 0, 0], short["video"][0, 0, 0])  # background
        if np.array_equal(item["prior_direction"], item["direction"]):
            np.testing.assert_array_equal(item["video"], longer[i]["video"])
            continue
        turned += 1
        for k in range(num_objects):
            rgb = synthetic.COLOUR_RGB[synthetic.COLOURS[item["colour"][k]]]
            c = _centroids(item["video"], rgb)
            assert _heading(c[4 * n] - c[0]) == item["prior_direction"][k] != item["direction"][k]
            assert _heading(c[-1] - c[4 * n]) == item["direction"][k]
            speed = np.abs(np.diff(_centroids(short["video"], rgb), axis=0)).sum(1).mean()
            np.testing.assert_allclose(np.abs(c[-1] - c[4 * n]).sum() / (20 - 4 * n), speed, rtol=0.15)
    assert counts == {1, 2}
    assert 0.6 < turned / 80 < 0.9
    np.testing.assert_array_equal(windows[5]["video"], windows[5]["video"])  # a pure function of i
    # Every window turns at rate 1, none at rate 0; both are refused outside [0, 1].
    assert all(not np.array_equal(w["prior_direction"], w["direction"])
               for w in (synthetic.TurnWindows(base, 4, 4, 2, 1.0)[i] for i in range(20)))
    assert all(np.array_equal(synthetic.TurnWindows(base, 4, 4, 2, 0.0)[i]["video"], longer[i]["video"])
               for i in range(20))
    with pytest.raises(ValueError, match="rate"):
        synthetic.TurnWindows(base, 4, 4, 2, 1.5)
    # The placement keeps every centre fully inside (s/2 <= centre <= R - s/2) for every turn,
    # including the longest legs (an object crossing the whole frame, turning back or aside).
    rng = np.random.default_rng(0)
    for direction in synthetic.DIRECTIONS:
        obj = synthetic._place(rng, "red", "square", direction, synthetic.WorldConfig(17, 64))
        obj = dict(obj, size=64 / 5, **{v: obj[v] / abs(obj[v] or 1) * (64 - 64 / 5) / 16 for v in ("vx", "vy")})
        with pytest.raises(ValueError, match="cannot turn"):  # not a turn: 20 frames of the whole travel
            synthetic.turned(rng, obj, direction, 4, 21, 64)
        for prior in set(synthetic.DIRECTIONS) - {direction}:
            for turn in (4, 8):
                for _ in range(20):
                    c = synthetic.centres(synthetic.turned(rng, obj, prior, turn, 21, 64), 21)
                    assert c.min() >= 6.4 - 1e-4 and c.max() <= 64 - 6.4 + 1e-4
                    assert _heading(c[-1] - c[turn]) == synthetic.DIRECTIONS.index(direction)
    with pytest.raises(ValueError, match="context latents"):
        synthetic.TurnWindows(base, 4, 4, 5, 0.5)


def test_cache_records_each_turning_window_context_length():
    """config.cond.continue_turns: the cache reads turning windows (synthetic world only), each
    record stores shift_context (the window's n), meta.json records the rate and the context
    length, and bad settings are one-line errors naming the field."""
    from pixeldance.data import synthetic
    config = configs.override(configs.load_config("experiments/base.py:runlocal"),
                              **{"cond.keyframe_sets": "first:1,continue:1", "cond.continue_turns": 0.5})
    source = cache_stage.longer_source(config, 6, 4)
    assert isinstance(source, synthetic.TurnWindows) and source.rate == 0.5
    assert cache_stage.cache_info(config, "/nowhere", None)["shift_turns"] == dict(rate=0.5, context_frames=2)
    assert "shift_turns" not in cache_stage.cache_info(
        configs.override(config, **{"cond.continue_turns": 0.0}), "/nowhere", None)
    for bad, match in (({"cond.continue_turns": 1.5}, r"continue_turns must be in \[0, 1\]"),
                       ({"cond.keyframe_sets": "first:1"}, "does not draw 'continue'"),
                       ({"data.name": "video_folder", "data.root": "/x"}, "needs config.data.name='shapes'")):
        with pytest.raises(ValueError, match=match):
            cache_stage.longer_source(configs.override(config, **bad), 6, 4)

    class Source:  # items i: frames i*10 + f, caption str(i), context_latents 1 + i % 2
        def __init__(self, frames, context):
            self.frames, self.context = frames, context

        def __len__(self):
            return 5

        def __getitem__(self, i):
            f = np.arange(self.frames, dtype=np.uint8) + 10 * i
            item = dict(video=np.broadcast_to(f[:, None, None, None], (self.frames, 2, 2, 3)).copy(), caption=str(i))
            return dict(item, context_latents=1 + i % 2) if self.context else item

    text = types.SimpleNamespace(record=lambda captions: dict(tokens=np.zeros((len(captions), 4), np.int32)))
    encode = cache_stage.batch_encoder(_PixelVAE(), text, Source(9, False), 2, 1, shift_source=Source(13, True))
    records = [r for batch in encode(0, 5) for r in batch]
    assert [int(r["shift_context"][0]) for r in records] == [1, 2, 1, 2, 1]
    assert all(r["shift_context"].dtype == np.int32 and r["shift_context"].shape == (1,) for r in records)
    assert latent_cache.record_fields(records[0])[-2:] == ("z_shift", "shift_context")
    back = latent_cache.decode_record(latent_cache.encode_record(
        {k: records[1][k] for k in latent_cache.record_fields(records[1])}))
    np.testing.assert_array_equal(back["shift_context"], [2])
    encode = cache_stage.batch_encoder(_PixelVAE(), text, Source(9, False), 2, 1, shift_source=Source(13, False))
    assert all("shift_context" not in r for batch in encode(0, 5) for r in batch)


def test_dit_stage_refuses_a_cache_without_what_training_reads():
    """trainers/dit.check_cache_record: z_frames, z_shift and (with continue_turns) shift_context,
    each a one-line CacheError naming the cache and the field; a record with them passes."""
    from pixeldance.trainers import dit as dit_stage
    config = configs.override(configs.load_config("experiments/base.py:runlocal"),
                              **{"cond.keyframe_sets": "first_middle:1,continue:1", "cond.continue_turns": 0.5})
    full = dict(z=0, z_last=0, tokens=0, z_frames=0, z_shift=0, shift_context=0)
    dit_stage.check_cache_record(config, full, "/c")
    for field in ("z_frames", "z_shift", "shift_context"):
        with pytest.raises(latent_cache.CacheError, match=f"latent cache /c has no {field}") as e:
            dit_stage.check_cache_record(config, {k: v for k, v in full.items() if k != field}, "/c")
        assert "\n" not in str(e.value)
    # Without turns, an old cache of straight windows is still read.
    dit_stage.check_cache_record(configs.override(config, **{"cond.continue_turns": 0.0}),
                                 {k: v for k, v in full.items() if k != "shift_context"}, "/c")
    with pytest.raises(latent_cache.CacheError, match="holds tokens"):
        dit_stage.check_cache_record(configs.override(config, **{"text.encoder": "clip"}), full, "/c")


class _Seen:
    """A stand-in DiT that records the instructions it is given (under jit too)."""

    def __init__(self):
        self.c_image = []

    def apply(self, params, x, t, c_image, c_mask, tokens):
        jax.debug.callback(lambda c: self.c_image.append(np.asarray(c)), c_image)
        return jnp.zeros_like(x)


def test_dit_loss_normalises_frame_latents_and_image_batches_cut_them():
    """The DiT trainer's loss normalises z_frames with the latent statistics (middle keyframes in
    the DiT's latent space), and image batches cut z_frames to their one frame."""
    from pixeldance import workdir as workdir_lib
    from pixeldance.trainers import dit as dit_trainer
    task = _task(**{"cond.keyframe_sets": "first_middle:1", "cond.noise": 0.0})
    stats = workdir_lib.LatentStats.from_moments([1.0], [2.0], source="test", num_videos=1)
    B, T = 8, 3
    batch = dict(z=jnp.zeros((B, T, 1, 1, 1)), z_last=jnp.zeros((B, 1, 1, 1, 1)),
                 z_frames=jnp.full((B, T, 1, 1, 1), 7.0), tokens=jnp.zeros((B, 4), jnp.int32))
    model = _Seen()
    dit_trainer.make_loss(task, model, stats)(None, batch, jax.random.key(0))
    jax.effects_barrier()
    np.testing.assert_array_equal(model.c_image[0][:, 1, 0, 0, 0], (7.0 - 1.0) / 2.0)  # the one middle frame
    image = next(dit_trainer.ImageVideoBatches(iter([dict(batch, z=batch["z"] + 1.0)]), 1))
    assert image["z"].shape == image["z_frames"].shape == (B, 1, 1, 1, 1)
    np.testing.assert_array_equal(image["z_frames"], 1.0)
