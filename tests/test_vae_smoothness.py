"""The VAE trainer's smoothness option (issue 19): config.vae.temporal_diff_weight, the L1 between
consecutive-frame differences of the reconstruction and the input (trainers/vae.py
`temporal_difference`). At weight 0 the loss is the one before the option existed (the default
main job uses weight 10, squared).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from experiments import base
from pixeldance.evaluators import reconstruction
from pixeldance.models import vae as vae_lib
from pixeldance.trainers import vae as trainer
from test_vae_train import _numpy_params as _params  # compiles no init


def _moving_square(frames=9, size=16, batch=2):
    """float [B, F, H, W, 3] in [-1, 1]: a 4x4 square moving 1 pixel per frame to the right."""
    video = -np.ones((batch, frames, size, size, 3), np.float32)
    for f in range(frames):
        video[:, f, 6:10, f:f + 4] = 1.0
    return jnp.asarray(video)


def test_temporal_difference_zero_when_motion_is_right_positive_when_stepwise():
    video = _moving_square()
    assert float(trainer.temporal_difference(video, video)) == 0.0
    # An error constant over time (a colour offset) moves nothing: still zero.
    np.testing.assert_allclose(trainer.temporal_difference(video + 0.1, video), 0.0, atol=1e-7)
    # Stepwise motion: frames 1-4 all show frame 4, frames 5-8 frame 8 (each latent group's frames
    # alike, the jump at the boundary), which the per-frame L1 also sees but not as motion.
    held = video[:, jnp.array([0, 4, 4, 4, 4, 8, 8, 8, 8])]
    assert float(trainer.temporal_difference(held, video)) > 0.01
    # By hand: one pixel, err = (0, 1, 1) over 3 frames -> |1 - 0|, |1 - 1| -> mean 0.5.
    x = jnp.zeros((1, 3, 1, 1, 1))
    r = jnp.array([0.0, 1.0, 1.0]).reshape(1, 3, 1, 1, 1)
    np.testing.assert_allclose(trainer.temporal_difference(r, x), 0.5, rtol=1e-7)
    # Same frames, other order: the per-frame error is a permutation of the same error, the term is not.
    np.testing.assert_allclose(trainer.temporal_difference(r[:, ::-1], x), 0.5, rtol=1e-7)
    r2 = jnp.array([1.0, 0.0, 1.0]).reshape(1, 3, 1, 1, 1)
    np.testing.assert_allclose(trainer.temporal_difference(r2, x), 1.0, rtol=1e-7)
    # 'l2': the mean of the squared differences. err = (0, 2, 2): |2|, |0| -> 1.0 (l1), 4, 0 -> 2.0 (l2).
    r3 = jnp.array([0.0, 2.0, 2.0]).reshape(1, 3, 1, 1, 1)
    np.testing.assert_allclose(trainer.temporal_difference(r3, x, "l1"), 1.0, rtol=1e-7)
    np.testing.assert_allclose(trainer.temporal_difference(r3, x, "l2"), 2.0, rtol=1e-7)
    assert float(trainer.temporal_difference(held, video, "l2")) > 0.01
    assert float(trainer.temporal_difference(video, video, "l2")) == 0.0
    try:
        trainer.temporal_difference(r3, x, "l3")
    except ValueError as e:
        assert "temporal_diff_norm" in str(e)
    else:
        raise AssertionError("no ValueError for norm 'l3'")


def test_temporal_difference_of_an_image_batch_is_zero_not_nan():
    video = _moving_square(frames=1)
    value = trainer.temporal_difference(video + 0.5, video)
    assert np.isfinite(float(value)) and float(value) == 0.0


def _reference_loss(params, video, rng, model, weights):
    """The VAE loss as written before the option existed (l1 + l2 + kl), from the model's output."""
    x = reconstruction.to_unit(video)
    out = model.apply(params, x, sample_rng=rng)
    err = out["recon"] - x
    kl = 0.5 * jnp.mean(jnp.square(out["mean"]) + jnp.exp(out["logvar"]) - 1.0 - out["logvar"])
    return (weights.l1 * jnp.mean(jnp.abs(err)) + weights.l2 * jnp.mean(jnp.square(err)) + weights.kl * kl,
            out["recon"], x)


def test_loss_at_weight_zero_is_the_loss_before_and_the_term_adds_at_weight_one():
    model = vae_lib.vae_from_variant("mu")
    video = np.asarray((_moving_square(frames=5) + 1) * 127.5, np.uint8)
    params = _params(model, video.shape)
    rng = jax.random.PRNGKey(3)
    off = trainer.LossWeights()
    assert off.temporal_diff == 0.0
    on = trainer.LossWeights(temporal_diff=1.0)
    loss = lambda p, w: trainer.vae_loss(p, dict(video=video), rng, model=model, weights=w)

    def everything(p):
        """One compiled program (each separate jit, and an eager grad above all, costs a VAE
        compile): both losses, the reference and the gradient of their difference."""
        grad = jax.grad(lambda q: loss(q, on)[0] - loss(q, off)[0])(p)
        return loss(p, off), _reference_loss(p, video, rng, model, off), loss(p, on), grad

    (loss0, m0), (ref, recon, x), (loss1, m1), grad = jax.jit(everything)(params)
    np.testing.assert_array_equal(loss0, ref)
    # Weight 0 builds no term: the same metrics (hence the same metrics.jsonl columns) as before.
    assert set(m0) == {"l1", "l2", "kl", "psnr"}

    td = trainer.temporal_difference(recon, x)
    assert float(td) > 0
    np.testing.assert_allclose(m1["temporal_diff"], td, rtol=1e-5)
    np.testing.assert_allclose(loss1, ref + td, rtol=1e-5)
    # The term has a gradient (it trains the VAE, not only logs).
    assert float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grad)))) > 0


def test_config_option_reaches_the_loss_weights_and_old_configs_read_it_as_off():
    c = base.get_config()
    # The default main job's weights: the squared term at weight 10 (issue 19's measurements).
    assert trainer.loss_weights(c.vae) == trainer.LossWeights(l1=1.0, l2=1.0, kl=1e-6, temporal_diff=10.0,
                                                              temporal_diff_norm="l2")
    c.vae.temporal_diff_weight = 0.5
    c.vae.temporal_diff_norm = "l2"
    assert trainer.loss_weights(c.vae).temporal_diff == 0.5
    assert trainer.loss_weights(c.vae).temporal_diff_norm == "l2"
    # A config saved before the option (no such field) reads it as off.
    old = c.vae.to_dict()
    del old["temporal_diff_weight"], old["temporal_diff_norm"]
    assert trainer.loss_weights(type(c.vae)(old)) == trainer.LossWeights(l1=1.0, l2=1.0, kl=1e-6)


def test_train_vae_stage_logs_the_term(runlocal_workdir):
    """config.vae.temporal_diff_weight reaches the trainer's loss: metrics.jsonl logs the term.
    The shared runlocal main job trains with it (weight 10, 'l2', from experiments/base.py); a
    main job of its own with --config.vae.temporal_diff_weight cost 20-30 s of the suite, and
    --config.* overrides reaching the stages are tested by test_main_job.py's reruns."""
    with open(os.path.join(runlocal_workdir, "config.json")) as f:
        assert json.load(f)["vae"]["temporal_diff_weight"] > 0
    lines = [json.loads(l) for l in open(os.path.join(runlocal_workdir, "metrics.jsonl"))]
    train = [l for l in lines if l["stage"] == "vae"]
    assert train and all(np.isfinite(l["temporal_diff"]) and l["temporal_diff"] > 0 for l in train)


# ---------------------------------------------------------------------------------------------
# The decoder's temporal upsampling init (config.vae.temporal_upsample_init).
# ---------------------------------------------------------------------------------------------

def _up_kernels(mode):
    """{level: the temporal Upsample's proj kernel as [C, frames 2, sub-pixels 4, O]} of a 'mu' VAE."""
    model = vae_lib.vae_from_variant("mu", **({} if mode is None else dict(temporal_upsample_init=mode)))
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 16, 16, 3))))
    out = {}
    for name, p in params["params"]["decoder"].items():
        if name.endswith("_up"):
            k = np.asarray(p["proj"]["kernel"])
            out[name] = k.reshape(k.shape[3], 2, 4, k.shape[-1] // 8)
    return params, out


def test_temporal_upsample_init_default_is_copy_and_independent_differs_only_in_time():
    default, k_default = _up_kernels(None)
    copy, k_copy = _up_kernels("copy")
    independent, k_ind = _up_kernels("independent")
    # The default is 'copy', parameter for parameter (the default VAE's init is unchanged).
    jax.tree.map(np.testing.assert_array_equal, default, copy)
    assert set(k_default) == {"level1_up", "level2_up"}
    for name, k in k_default.items():
        np.testing.assert_array_equal(k[:, 0], k[:, 1])  # both new frames start equal
        np.testing.assert_array_equal(k[:, :, :1].repeat(4, 2), k)  # and every sub-pixel
    # 'independent': same tree and shapes, the two frames differ, sub-pixels still copies (ICNR).
    assert jax.tree.structure(independent) == jax.tree.structure(copy)
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), independent, copy)
    for name, k in k_ind.items():
        assert np.abs(k[:, 0] - k[:, 1]).max() > 0.1, name
        np.testing.assert_array_equal(k[:, :, :1].repeat(4, 2), k)
        np.testing.assert_allclose(k.std(), k_copy[name].std(), rtol=0.35)  # same scale of draw
    # Only the temporal upsamplers' kernels change.
    flat_c, flat_i = (dict(jax.tree_util.tree_leaves_with_path(p)) for p in (copy, independent))
    changed = {jax.tree_util.keystr(k) for k in flat_c if not np.array_equal(flat_c[k], flat_i[k])}
    assert changed == {"['params']['decoder']['level1_up']['proj']['kernel']",
                       "['params']['decoder']['level2_up']['proj']['kernel']"}, changed


def test_temporal_upsample_init_rejects_unknown_values():
    model = vae_lib.vae_from_variant("mu", temporal_upsample_init="linear")
    try:
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 5, 16, 16, 3)))
    except ValueError as e:
        assert "temporal_init" in str(e)
    else:
        raise AssertionError("no ValueError for temporal_upsample_init='linear'")


def test_temporal_upsample_init_from_config_for_a_new_workdir_only(tmp_path):
    c = base.get_config("runlocal")
    assert c.vae.temporal_upsample_init == "copy"
    assert trainer.new_or_saved_vae(c, str(tmp_path)).temporal_upsample_init == "copy"
    c.vae.temporal_upsample_init = "independent"
    model = trainer.new_or_saved_vae(c, str(tmp_path))
    assert model.temporal_upsample_init == "independent" and model.channels == (8, 16, 16)
    # A workdir that already holds an architecture keeps it (resuming never changes the model).
    from pixeldance import workdir as workdir_lib
    workdir_lib.write_model_spec(str(tmp_path), vae_lib.vae_from_variant("mu"))
    assert trainer.new_or_saved_vae(c, str(tmp_path)).temporal_upsample_init == "copy"
