"""Context parallelism (Ulysses all-to-all and ring attention) for self-attention over a sequence
split on the 'context' mesh axis: equal to single-device attention (forward and gradients), the
head-count check, and the DiT taking the context-parallel path under preset 'fsdp_context'.

Tiny shapes, 8 forced CPU devices (conftest.py).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from pixeldance import sharding
from pixeldance.models import attention as attn_lib
from pixeldance.models import context_parallel as cp
from pixeldance.models import dit as dit_lib

import test_dit_model as dit_tests  # the DiT tests' inputs and parameter helpers


def _qkv(heads, batch=2, length=16, width=8, seed=0):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.normal(size=(batch, length, heads, width)), jnp.float32) for _ in range(4)]


def _reference(q, k, v, g, mask=None):
    """Single-device XLA attention: output and gradients of sum(out * g) w.r.t. q, k, v."""
    f = lambda q, k, v: attn_lib.dot_product_attention(q, k, v, key_mask=mask, implementation="xla")
    out = jax.jit(f)(q, k, v)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * g), argnums=(0, 1, 2)))(q, k, v)
    return out, grads


def _context_parallel(mesh_shape, flavour, q, k, v, g, mask=None, implementation=None):
    """The same, with the sequence split over 'context' (preset fsdp_context), and the lowered text."""
    mesh = sharding.make_mesh(mesh_shape)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules("fsdp_context")):
        assert cp.use_context_parallel(q.shape[1])
        f = lambda q, k, v: attn_lib.dot_product_attention(q, k, v, key_mask=mask, implementation=implementation,
                                                           context_parallel=flavour)
        seq = sharding.logical_sharding(mesh, ("batch", "length", "heads", "kv"), "fsdp_context")
        q, k, v, g = (jax.device_put(a, seq) for a in (q, k, v, g))
        out = jax.jit(f)(q, k, v)
        loss = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * g), argnums=(0, 1, 2)))
        grads = loss(q, k, v)
        text = loss.lower(q, k, v).as_text()
    return out, grads, text


def _assert_close(got, want, atol=2e-5):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=atol)


# ----------------------------------------------------------------------------------------------
# Kernels vs single-device attention, forward and gradients

@pytest.mark.parametrize("flavour,mesh_shape,heads,impl", [
    ("ulysses", (1, 2, 4, 1), 4, None),
    ("ulysses", (1, 1, 8, 1), 8, "chunked"),
    ("ulysses", (2, 1, 4, 1), 4, "xla"),
    ("ring", (1, 2, 4, 1), 3, None),
    ("ring", (1, 1, 8, 1), 3, None),
    ("ring", (2, 1, 4, 1), 1, None),
])
def test_matches_single_device(flavour, mesh_shape, heads, impl):
    q, k, v, g = _qkv(heads)
    want_out, want_grads = _reference(q, k, v, g)
    out, grads, text = _context_parallel(mesh_shape, flavour, q, k, v, g, implementation=impl)
    _assert_close(out, want_out)
    _assert_close(grads, want_grads)
    # The flavour's own collective is in the program (forward and backward).
    op = "all_to_all" if flavour == "ulysses" else "collective_permute"
    assert text.count(op) >= 2, flavour


@pytest.mark.parametrize("flavour", cp.FLAVOURS)
def test_key_mask(flavour):
    """Padded keys (split over 'context' like the keys), including a shard with every key padded."""
    q, k, v, g = _qkv(4)
    mask = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 16)) < 0.6).at[:, :4].set(False).at[:, 5].set(True)
    want = _reference(q, k, v, g, mask)
    out, grads, _ = _context_parallel((1, 2, 4, 1), flavour, q, k, v, g, mask)
    _assert_close((out, grads), want)


def test_ulysses_needs_divisible_heads():
    q, k, v, g = _qkv(6)
    with pytest.raises(ValueError, match=r"6 heads.*not divisible by 4.*ring"):
        _context_parallel((1, 2, 4, 1), "ulysses", q, k, v, g)
    with pytest.raises(ValueError, match="unknown context parallelism"):
        attn_lib.dot_product_attention(q, k, v, context_parallel="stripes")


def test_not_used_without_a_context_split():
    """Preset 'fsdp' (length not mapped) or a 1-device 'context' axis: the ordinary path."""
    for shape, preset in [((1, 2, 4, 1), "fsdp"), ((2, 4, 1, 1), "fsdp_context")]:
        with jax.set_mesh(sharding.make_mesh(shape)), nn.logical_axis_rules(sharding.rules(preset)):
            assert not cp.use_context_parallel(16)
    assert not cp.use_context_parallel(16)  # no mesh at all


# ----------------------------------------------------------------------------------------------
# The DiT on a (1, 2, 4, 1) mesh with preset fsdp_context

@pytest.mark.parametrize("flavour,heads", [("ulysses", 4), ("ring", 2)])
def test_dit_forward_equals_single_device(flavour, heads):
    """The `mu` DiT (width 32, depth 2; heads 2, or 4 so that Ulysses divides them over 4 devices):
    8 x 4 x 4 latents -> 8 tokens, 2 per 'context' device."""
    model = dit_lib.VideoDiT(latent_channels=16, **dict(dit_lib.DIT_VARIANTS["mu"], num_heads=heads),
                             context_parallel=flavour)
    inputs = dit_tests._inputs(batch=2)
    params = dit_tests._params(model, inputs)
    expected = jax.jit(model.apply)(params, *inputs)
    mesh, preset = sharding.make_mesh((1, 2, 4, 1)), "fsdp_context"
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(preset)):
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
        param_sh = sharding.tree_shardings(mesh, boxed, preset)
        batch_sh = sharding.batch_sharding(mesh)
        apply = jax.jit(model.apply, in_shardings=(param_sh, *[batch_sh] * 6))
        placed = (jax.device_put(params, param_sh), *[jax.device_put(a, batch_sh) for a in inputs])
        out = apply(*placed)
        text = apply.lower(*placed).as_text()
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=2e-5, atol=2e-5)
    assert float(jnp.std(expected)) > 0.1
    # The context-parallel path was taken: its collective is in the lowered program (the
    # ordinary path gathers keys by resharding, which lowers to no explicit collective).
    op = "all_to_all" if flavour == "ulysses" else "collective_permute"
    assert op in text, flavour


def test_dit_ulysses_rejects_mu_heads():
    """The `mu` DiT has 2 heads: Ulysses over 4 'context' devices refuses them, naming both."""
    model = dit_lib.VideoDiT(latent_channels=16, **dit_lib.DIT_VARIANTS["mu"])
    inputs = dit_tests._inputs(batch=2)
    with jax.set_mesh(sharding.make_mesh((1, 2, 4, 1))), nn.logical_axis_rules(sharding.rules("fsdp_context")):
        with pytest.raises(ValueError, match=r"2 heads are not divisible by 4"):
            jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
    with pytest.raises(ValueError, match="context_parallel"):
        dit_lib.VideoDiT(latent_channels=16, context_parallel="stripes", **dit_lib.DIT_VARIANTS["mu"]).init(
            jax.random.key(0), *inputs)
