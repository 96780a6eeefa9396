"""LoRA adapters (pixeldance/models/lora.py) on a tiny WanTransformer and a tiny VideoDiT: the
input/output split agrees with every Dense's in_dims, the merged model is the base exactly at
init and base + (alpha / R) A B (an einsum written out per kernel) after, only the adapters get
gradients and a few Adam steps fit a regression, the adapters shard like their kernels under
'fsdp_tensor' and merge under jit on that mesh, and the one-line errors.

Tiny shapes throughout (8 forced CPU devices, see conftest.py).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import traverse_util

from pixeldance import sharding
from pixeldance.models import dit as dit_lib
from pixeldance.models import lora as lora_lib
from pixeldance.models import wan_dit
from pixeldance.models.layers import Dense

RANK, ALPHA = 4, 2.0  # alpha != rank, so a dropped alpha / R scale shows
PRESET, MESH_SHAPE = "fsdp_tensor", (1, 4, 1, 2)

# Per model: targets, and for some matched kernels the update written out as an einsum over
# (A, B), the letters of the models' glossary (l the stacked layers, r the rank, c the 3 or 2
# of a fused qkv / kv projection, a b c i a patch's (pt, ph, pw, C_in)).
CASES = {
    "wan": dict(
        targets=("attn1/to_q", "attn1/to_out", "attn2/to_.*", "ffn/proj_in", "patch_embedding"),
        matched={"blocks/attn1/to_q", "blocks/attn1/to_out", "blocks/attn2/to_q", "blocks/attn2/to_k",
                 "blocks/attn2/to_v", "blocks/attn2/to_out", "blocks/ffn/proj_in", "patch_embedding"},
        einsums={"blocks/attn1/to_q": "ldr,lrnk->ldnk", "blocks/attn1/to_out": "lnkr,lrd->lnkd",
                 "blocks/attn2/to_v": "ldr,lrnk->ldnk", "blocks/ffn/proj_in": "ldr,lre->lde",
                 "patch_embedding": "abcir,rd->abcid"}),
    "dit": dict(
        targets="qkv, self_out, cross_kv, mlp_in, patch_embed",
        matched={"blocks/qkv", "blocks/self_out", "blocks/cross_kv", "blocks/mlp_in", "patch_embed"},
        einsums={"blocks/qkv": "ldr,lrcnk->ldcnk", "blocks/self_out": "lnkr,lrd->lnkd",
                 "blocks/cross_kv": "ldr,lrcnk->ldcnk", "blocks/mlp_in": "ldr,lre->lde",
                 "patch_embed": "ir,rd->id"}),
}


def _model_and_inputs(name):
    """The tiny model (heads and widths divide the (1, 4, 1, 2) mesh) and a batch of 2 inputs."""
    r = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(r.normal(size=shape).astype(np.float32))
    x = normal(2, 2, 4, 4, 4)
    if name == "wan":
        model = wan_dit.model_from_config(wan_dit.config("tiny"), attention_impl="xla")
        return model, (x, jnp.asarray([100.0, 700.0]), normal(2, 3, model.text_dim))
    model = dit_lib.VideoDiT(latent_channels=4, width=32, depth=2, num_heads=4, mlp_ratio=2, attention_impl="xla")
    mask = jnp.asarray([[True, True, False], [True, False, False]])
    return model, (x, jnp.asarray([0.1, 0.7]), normal(2, 2, 4, 4, 4), jnp.ones((2, 2, 4, 4, 1)), normal(2, 3, 16), mask)


@functools.lru_cache(maxsize=None)
def _setup(name):
    """(model, inputs, boxed abstract params, randomised base params): every base parameter
    perturbed, so zero-initialised gates and outputs (the DiT's final layer) hide nothing."""
    model, inputs = _model_and_inputs(name)
    boxed = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), *inputs)["params"])
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    base = jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return model, inputs, boxed, base


def _flat(tree):
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _adapters(lora):
    """{module path: (A, B)} of unboxed LoRA params."""
    flat = _flat(nn.unbox(lora))
    return {k[:-len("/kernel/lora_a")]: (v, flat[k[:-1] + "b"]) for k, v in flat.items() if k.endswith("lora_a")}


def _random_b(lora, seed=2):
    """The adapters with every B drawn (at init B = 0 hides the update)."""
    flat = traverse_util.flatten_dict(nn.unbox(lora))
    keys = jax.random.split(jax.random.key(seed), len(flat))
    return traverse_util.unflatten_dict({k: jax.random.normal(r, v.shape) if k[-1] == "lora_b" else v
                                         for (k, v), r in zip(flat.items(), keys)})


def test_split_rule_gives_every_dense_its_in_dims():
    """Every Dense kernel of both models: the lead / in / out split read from the logical names
    is the module's own (layers axes first, then in_dims inputs)."""
    for name in CASES:
        model, inputs = _model_and_inputs(name)
        seen = {}

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, Dense) and context.method_name == "__call__":
                seen["/".join(context.module.path)] = context.module.in_dims
            return next_fun(*args, **kwargs)
        with nn.intercept_methods(record):
            boxed = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]
        kernels = {k[:-len("/kernel")]: v for k, v in _flat(boxed).items() if k.endswith("/kernel")}
        assert set(kernels) == set(seen) and len(seen) >= 10, (name, sorted(set(kernels) ^ set(seen)))
        for path, box in kernels.items():
            lead, n_in, n_out = lora_lib.split_kernel_axes(box.names, path)
            assert lead == (1 if path.startswith("blocks/") else 0), (name, path, box.names)
            assert n_in == seen[path] and lead + n_in + n_out == box.value.ndim, (name, path, box.names)


@pytest.mark.parametrize("name", sorted(CASES))
def test_merge_is_the_base_at_init_and_base_plus_low_rank_after(name):
    _, _, boxed, base = _setup(name)
    case = CASES[name]
    lora = lora_lib.init(jax.random.key(3), boxed, rank=RANK, targets=case["targets"])
    adapters = _adapters(lora)
    assert set(adapters) == case["matched"]
    base_flat = _flat(base)
    expected_count = 0
    for path, (a, b) in adapters.items():
        w = base_flat[path + "/kernel"]
        lead = 1 if path.startswith("blocks/") else 0
        assert a.dtype == b.dtype == jnp.float32 and a.shape[-1] == b.shape[lead] == RANK, path
        assert a.shape[:-1] + b.shape[lead + 1:] == w.shape, path
        fan_in = np.prod(w.shape[lead:a.ndim - 1])
        assert not np.any(np.asarray(b)) and 0.75 < np.std(np.asarray(a)) * np.sqrt(fan_in) < 1.25, path
        expected_count += a.size + b.size
    assert lora_lib.num_params(lora) == expected_count

    merged = lora_lib.merge(base, lora, alpha=ALPHA)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    for path, w in base_flat.items():  # exactly the base, every leaf, dtypes included
        m = _flat(merged)[path]
        assert m.dtype == w.dtype and np.array_equal(np.asarray(m), np.asarray(w)), path

    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)  # a bfloat16 base stays bfloat16
    for m, w in zip(jax.tree.leaves(lora_lib.merge(half, lora, alpha=ALPHA)), jax.tree.leaves(half)):
        assert m.dtype == jnp.bfloat16 and np.array_equal(np.asarray(m), np.asarray(w))

    trained = _random_b(lora)
    merged = _flat(lora_lib.merge(base, trained, alpha=ALPHA))
    for path, spec in case["einsums"].items():
        a, b = _adapters(trained)[path]
        want = base_flat[path + "/kernel"] + ALPHA / RANK * jnp.einsum(spec, a, b, precision="highest")
        np.testing.assert_allclose(merged[path + "/kernel"], want, rtol=1e-6, atol=1e-6, err_msg=path)
    for path, w in base_flat.items():
        if path[:-len("/kernel")] not in adapters:
            assert merged[path] is w, path  # untouched leaves are passed through, not copied


@pytest.mark.parametrize("name", sorted(CASES))
def test_side_path_is_the_merged_model(name):
    """With every kernel of the model targeted, the model run on `attach`'s tree (each Dense adds
    (x A)(alpha / R B), what training runs) gives the merged model's output, and so do the
    gradients of the adapters: every kernel a target can match reads its adapters. A kernel
    that ignored them would give the base's output here, far from the merged one."""
    model, inputs, boxed, base = _setup(name)
    lora = _random_b(lora_lib.init(jax.random.key(3), boxed, rank=RANK, targets=".*"))
    assert len(_adapters(lora)) == len([k for k in _flat(base) if k.endswith("kernel")])
    merged_fn = lambda l: model.apply({"params": lora_lib.merge(base, l, alpha=ALPHA)}, *inputs)
    side_fn = lambda l: model.apply({"params": lora_lib.attach(base, l, alpha=ALPHA)}, *inputs)
    merged, side, plain = jax.jit(merged_fn)(lora), jax.jit(side_fn)(lora), model.apply({"params": base}, *inputs)
    scale = float(jnp.abs(merged).max())
    assert float(jnp.abs(merged - plain).max()) > 0.1 * scale  # the adapters change the output
    np.testing.assert_allclose(side, merged, atol=1e-4 * scale)
    g_merged = jax.jit(jax.grad(lambda l: jnp.sum(jnp.sin(merged_fn(l)))))(lora)
    g_side = jax.jit(jax.grad(lambda l: jnp.sum(jnp.sin(side_fn(l)))))(lora)
    for k, g in _flat(g_merged).items():
        gs = _flat(g_side)[k]
        np.testing.assert_allclose(gs, g, atol=1e-4 * float(jnp.abs(g).max()) + 1e-7, err_msg=k)
    with pytest.raises(ValueError, match="already holds"):
        lora_lib.attach(lora_lib.attach(base, lora, alpha=ALPHA), lora, alpha=ALPHA)


@pytest.mark.parametrize("name", sorted(CASES))
def test_only_the_adapters_train(name):
    """make_loss: the base gets a zero gradient, every B a non-zero one, Adam steps on the
    adapters alone fit a regression target, and the base arrays are left as they were."""
    model, inputs, boxed, base = _setup(name)
    target = 0.5 * jax.random.normal(jax.random.key(4), model.apply({"params": base}, *inputs).shape)

    def loss_fn(params, batch, rng):
        del rng
        return jnp.mean(jnp.square(model.apply({"params": params}, *batch["inputs"]) - batch["target"]))
    lora_loss = lora_lib.make_loss(loss_fn, alpha=ALPHA)
    tx = optax.adam(3e-2)

    @jax.jit
    def step(lora, opt_state, base, batch, rng):
        loss, (g_lora, g_base) = jax.value_and_grad(lora_loss, argnums=(0, 1))(lora, base, batch, rng)
        updates, opt_state = tx.update(g_lora, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss, g_lora, g_base

    lora = nn.unbox(lora_lib.init(jax.random.key(3), boxed, rank=RANK, targets=CASES[name]["targets"]))
    before = jax.tree.map(np.asarray, base)
    opt_state = tx.init(lora)
    batch = dict(inputs=inputs, target=target)
    losses = []
    for i in range(6):
        lora, opt_state, loss, g_lora, g_base = step(lora, opt_state, base, batch, jax.random.key(i))
        losses.append(float(loss))
        if i == 0:
            assert jax.tree.structure(g_lora) == jax.tree.structure(lora)
            # With B = 0 the gradient reaches B only (dA = dW B^T); every B gets one.
            assert all(np.any(np.asarray(g)) == k.endswith("lora_b") for k, g in _flat(g_lora).items()), name
        assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(g_base))
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(base)))


def _spec(s, ndim):
    return tuple(s.spec) + (None,) * (ndim - len(s.spec))


@pytest.mark.parametrize("name", sorted(CASES))
def test_adapters_shard_like_their_kernels_and_merge_under_jit(name):
    _, _, boxed, base = _setup(name)
    targets = CASES[name]["targets"]
    mesh = sharding.make_mesh(MESH_SHAPE)
    base_sh = sharding.tree_shardings(mesh, boxed, PRESET)
    init = lambda rng: lora_lib.init(rng, boxed, rank=RANK, targets=targets)
    lora_sh = sharding.tree_shardings(mesh, jax.eval_shape(init, jax.random.key(3)), PRESET)
    kernel_sh, adapter_sh = _flat(base_sh), _flat(lora_sh)
    axes = set()
    for path in CASES[name]["matched"]:
        w = _flat(boxed)[path + "/kernel"]
        lead, n_in, _ = lora_lib.split_kernel_axes(w.names)
        split = lead + n_in
        spec = _spec(kernel_sh[path + "/kernel"], w.value.ndim)
        a_spec = _spec(adapter_sh[path + "/kernel/lora_a"], split + 1)
        b_spec = _spec(adapter_sh[path + "/kernel/lora_b"], w.value.ndim - n_in + 1)
        assert a_spec == spec[:split] + (None,), (path, a_spec, spec)
        assert b_spec == spec[:lead] + (None,) + spec[split:], (path, b_spec, spec)
        axes |= {a for a in a_spec + b_spec if a}
    assert axes == {"fsdp", "tensor"}  # both mesh axes really split some adapter

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(PRESET)):
        lora = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=lora_sh)(jax.random.key(3))
        lora = jax.device_put(_random_b(lora), lora_sh)
        placed = jax.device_put(base, base_sh)
        merged = jax.jit(functools.partial(lora_lib.merge, alpha=ALPHA))(placed, lora)
    want = lora_lib.merge(base, jax.device_get(lora), alpha=ALPHA)
    for (path, m), w, s in zip(_flat(merged).items(), jax.tree.leaves(want), jax.tree.leaves(base_sh)):
        np.testing.assert_allclose(m, w, rtol=1e-6, atol=1e-6, err_msg=path)
        assert m.sharding.is_equivalent_to(s, m.ndim), (path, m.sharding, s)


def test_errors_are_one_line():
    _, _, boxed, base = _setup("wan")
    with pytest.raises(ValueError, match=r"^LoRA target 'attn3/to_q' matches no kernel; kernels are e\.g\. ") as e:
        lora_lib.init(jax.random.key(0), boxed, rank=RANK, targets=("attn1/to_q", "attn3/to_q"))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no logical axis names"):
        lora_lib.init(jax.random.key(0), base, rank=RANK, targets="ffn/proj_in")
    with pytest.raises(ValueError, match="positive integer"):
        lora_lib.init(jax.random.key(0), boxed, rank=0, targets="ffn/proj_in")
    with pytest.raises(ValueError, match="at least one target"):
        lora_lib.init(jax.random.key(0), boxed, rank=RANK, targets=" , ")
    with pytest.raises(ValueError, match=r"cannot tell the input from the output axes of x"):
        lora_lib.split_kernel_axes(("layers", None, None), "x")
    other = lora_lib.init(jax.random.key(0), _setup("dit")[2], rank=RANK, targets="mlp_in")
    with pytest.raises(ValueError, match="blocks/mlp_in/kernel have no kernel in the base params"):
        lora_lib.merge(base, other, alpha=ALPHA)
