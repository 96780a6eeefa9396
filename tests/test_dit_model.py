"""The video DiT: size table and parameter count, logical names, sharded = single-device forward,
bfloat16 compute, remat policies, attention kernels and factorised attention's receptive field.

Tiny shapes throughout (8 forced CPU devices, see conftest.py).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from pixeldance import sharding
from pixeldance.models import attention as attn_lib
from pixeldance.models import attention_kernels as kernels
from pixeldance.models import dit as dit_lib
from pixeldance.models import text as text_lib

TEXT_WIDTH = 16
# A small DiT whose head count (4) and widths divide a tensor axis of 4 devices.
TINY = dict(width=32, depth=2, num_heads=4, mlp_ratio=2)


def _inputs(batch=8, frames=2, size=4, text_len=5, seed=0):
    """x, t, c_image, c_mask, text, text_mask for latents [B, T, size, size, 16]."""
    r = np.random.default_rng(seed)
    x = r.normal(size=(batch, frames, size, size, 16)).astype(np.float32)
    c = r.normal(size=x.shape).astype(np.float32)
    m = (r.uniform(size=x.shape[:-1] + (1,)) < 0.5).astype(np.float32)
    t = r.uniform(size=(batch,)).astype(np.float32)
    text = r.normal(size=(batch, text_len, TEXT_WIDTH)).astype(np.float32)
    mask = (r.uniform(size=(batch, text_len)) < 0.6)
    mask[:, 0] = True
    return tuple(jnp.asarray(a) for a in (x, t, c, m, text, mask))


def _randomised(params, seed=1, scale=0.3):
    """Every parameter perturbed, so zero-initialised gates and outputs do not hide anything."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys)])


def _model(**kw):
    return dit_lib.VideoDiT(latent_channels=16, **{**TINY, **kw})


def _params(model, inputs, seed=1):
    return _randomised(nn.unbox(model.init(jax.random.key(0), *inputs)), seed)


@pytest.fixture(scope="module")
def reference():
    """Inputs (batch 8), randomised parameters and the single-device float32 output and gradients
    of the TINY model with the XLA kernel, shared by the tests below."""
    model = _model(attention_impl="xla")
    inputs = _inputs(batch=8)
    params = _params(model, inputs)
    out = jax.jit(model.apply)(params, *inputs)
    return dict(inputs=inputs, params=params, out=out, grads=_grads(model, params, inputs))


def _grads(model, params, inputs):
    def loss(p):
        return jnp.mean(jnp.square(model.apply(p, *inputs) - 0.5))
    return jax.jit(jax.grad(loss))(params)


def _partitioned_leaves(tree):
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


# ----------------------------------------------------------------------------------------------
# Size table, parameter count, logical names

def test_decode_variant():
    assert dit_lib.decode_variant("B/2")["patch_size"] == (1, 2, 2)
    assert dit_lib.decode_variant("1.5B/4")["patch_size"] == (1, 4, 4)
    assert "patch_size" not in dit_lib.decode_variant("S")
    with pytest.raises(ValueError, match="XXL"):
        dit_lib.decode_variant("XXL/2")


@pytest.mark.parametrize("name,attention", [(n, "full") for n in dit_lib.DIT_VARIANTS] + [("mu", "factorised")])
def test_param_count_formula_matches_init(name, attention):
    """The analytic count equals the initialised tree, from shapes only (1.5B is never allocated)."""
    kw = dit_lib.decode_variant(name)
    model = dit_lib.VideoDiT(latent_channels=16, attention=attention, **kw)
    x, t, c, m, text, mask = _inputs(batch=1, frames=2, size=4, text_len=3)
    text = jnp.zeros((1, 3, 64))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, c, m, text, mask))
    actual = sum(math.prod(p.value.shape) for p in _partitioned_leaves(shapes))
    expected = dit_lib.count_params(**kw, text_width=64, latent_channels=16, attention=attention)
    assert actual == expected
    if name == "1.5B":
        assert 1.4e9 < actual < 1.6e9  # PixelDance's 1.5B


@pytest.mark.parametrize("shape,in_dims", [((16, 3, 4, 8), 1), ((4, 8, 16), 2), ((12, 20), 1)])
def test_dense_kernels_draw_flat_the_values_of_their_shape(shape, in_dims):
    """`layers.Dense` draws its kernel as an [inputs, outputs] matrix (cheaper to compile): bit
    for bit the draw of the N-D shape with the input axes as fan-in and the rest as fan-out."""
    from pixeldance.models import layers
    nd_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=tuple(range(in_dims)),
                                               out_axis=tuple(range(in_dims, len(shape))))

    class NDKernel(nn.Module):  # the same parameter path and name, drawn in its N-D shape
        @nn.compact
        def __call__(self, x):
            return self.param("kernel", nd_init, shape)

    key, x = jax.random.key(3), jnp.zeros((1,) + shape[:in_dims])
    dense = layers.Dense(shape[in_dims:], (None,) * len(shape), in_dims=in_dims)
    kernel = nn.unbox(dense.init(key, x))["params"]["kernel"]
    assert kernel.shape == shape
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(NDKernel().init(key, x)["params"]["kernel"]))


@pytest.mark.parametrize("attention,scan", [("full", True), ("factorised", True), ("full", False)])
def test_every_parameter_has_logical_names(attention, scan):
    """Each leaf is boxed with one known logical name per dimension (scanned: 'layers' first)."""
    model = _model(attention=attention, scan_layers=scan)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *_inputs(batch=1)))
    boxed = _partitioned_leaves(shapes)
    assert len(boxed) == len(jax.tree.leaves(shapes)) > 10
    known = set(sharding.PRESETS["fsdp"]) | {None}
    for p in boxed:
        assert isinstance(p, nn.Partitioned), p
        assert len(p.names) == p.value.ndim, p
        assert set(p.names) <= known, p.names
    if scan:
        assert all(p.names[0] == "layers" for p in jax.tree.leaves(shapes["params"]["blocks"],
                                                                  is_leaf=lambda x: isinstance(x, nn.Partitioned)))


# ----------------------------------------------------------------------------------------------
# Sharded forward pass == single device

@pytest.mark.parametrize("preset,mesh_shape,impl", [
    ("fsdp", (2, 4, 1, 1), None),  # 'dense' (the CPU's pick for these short sequences)
    ("fsdp", (2, 4, 1, 1), "chunked"),
    ("fsdp_context", (1, 2, 4, 1), None),  # Ulysses with 'dense' per device
    ("fsdp_tensor", (1, 2, 1, 4), "chunked"),
    ("fsdp_context", (1, 2, 4, 1), "chunked"),
    ("fsdp_context_params", (1, 2, 4, 1), "chunked"),
])
def test_sharded_forward_equals_single_device(reference, preset, mesh_shape, impl):
    """On 8 devices (data x fsdp, fsdp x tensor, fsdp x context) the output is the single-device one."""
    model = _model(attention_impl=impl)
    inputs, params = reference["inputs"], reference["params"]
    mesh = sharding.make_mesh(mesh_shape)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(preset)):
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
        param_sh = sharding.tree_shardings(mesh, boxed, preset)
        placed = jax.device_put(params, param_sh)
        batch_sh = sharding.batch_sharding(mesh)
        placed_inputs = [jax.device_put(a, batch_sh) for a in inputs]
        out = jax.jit(model.apply, in_shardings=(param_sh, *[batch_sh] * 6))(placed, *placed_inputs)
    expected = np.asarray(reference["out"])
    # float32 sums split over devices (and over Eigen's threads, which vary with load) add up in
    # another order: the error scales with the output's magnitude (here up to ~15), not with
    # each element's, so atol is relative to the largest output (a sharding bug is off by O(1)).
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-5, atol=5e-6 * np.abs(expected).max())
    assert float(jnp.std(expected)) > 0.1
    # The parameters really are split as the preset says.
    qkv = placed["params"]["blocks"]["qkv"]["kernel"]
    axes = {a for s in qkv.sharding.spec if s for a in (s if isinstance(s, tuple) else (s,))}
    assert axes == {"fsdp_tensor": {"fsdp", "tensor"}, "fsdp_context_params": {"fsdp", "context"}}.get(preset, {"fsdp"})


# ----------------------------------------------------------------------------------------------
# bfloat16 compute with float32 parameters

def _equations(jaxpr):
    """Every equation of a closed jaxpr, sub-jaxprs (scan, custom_vjp, pjit, ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _equations(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _equations(sub)


@pytest.mark.parametrize("impl", ["xla", "dense", "chunked"])
def test_bfloat16_compute_float32_params(reference, impl):
    inputs, params = reference["inputs"], reference["params"]
    bf16 = _model(attention_impl=impl, dtype=jnp.bfloat16)
    boxed = jax.eval_shape(lambda: bf16.init(jax.random.key(0), *inputs))
    assert {p.value.dtype for p in _partitioned_leaves(boxed)} == {jnp.dtype(jnp.float32)}
    ref = reference["out"]
    out = jax.jit(bf16.apply)(params, *inputs)
    assert out.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 0.05, rel
    # Matmuls run on bfloat16 operands; exp / rsqrt / log (softmax, norms) in float32.
    eqns = list(_equations(jax.make_jaxpr(bf16.apply)(params, *inputs).jaxpr))
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    f32_ops = [e for e in eqns if e.primitive.name in ("exp", "rsqrt", "log", "cos", "sin")]
    assert f32_ops and all(e.outvars[0].aval.dtype == jnp.float32 for e in f32_ops)


# ----------------------------------------------------------------------------------------------
# Remat policies: same gradients as no remat

@pytest.mark.parametrize("impl,policies", [
    ("xla", sorted(set(dit_lib.REMAT_POLICIES) - {"none"})),
    ("chunked", ["none", "full"]),  # the custom VJP alone and under remat
    ("dense", ["none", "full", "dots"]),
])
def test_remat_policies_give_equal_gradients(reference, impl, policies):
    inputs, params, ref = reference["inputs"], reference["params"], reference["grads"]
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref))
    for policy in policies:
        grads = _grads(_model(attention_impl=impl, remat=policy), params, inputs)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale,
                                       err_msg=f"{impl} {policy}")
    with pytest.raises(ValueError, match="remat"):
        _model(remat="most").init(jax.random.key(0), *inputs)


# ----------------------------------------------------------------------------------------------
# Attention kernels

def _reference_attention(q, k, v, key_mask):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("blnk,bmnk->bnlm", q, k) / math.sqrt(q.shape[-1])
    logits = np.where(np.asarray(key_mask)[:, None, None, :], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bnlm,bmnk->blnk", p / p.sum(-1, keepdims=True), v)


def test_chunked_attention_matches_reference(monkeypatch):
    monkeypatch.setattr(kernels, "_CHUNK_LOGITS", 60)  # 24 queries x 10 keys -> chunks of 6
    r = np.random.default_rng(0)
    q = jnp.asarray(r.normal(size=(2, 24, 3, 8)), jnp.float32)
    k, v = (jnp.asarray(r.normal(size=(2, 10, 3, 8)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(r.uniform(size=(2, 10)) < 0.5).at[:, 0].set(True)

    def attend(impl):
        return lambda q, k, v: attn_lib.dot_product_attention(q, k, v, key_mask=mask, implementation=impl)

    out = jax.jit(attend("chunked"))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), _reference_attention(q, k, v, mask), atol=1e-5)
    g = jnp.asarray(r.normal(size=out.shape), jnp.float32)
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * g), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(grad(attend("chunked")), grad(attend("xla"))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_dense_attention_matches_reference():
    """The 'dense' kernel: values against float64 softmax attention (masked keys, a row that may
    attend to one key only), gradients against autodiff of jax.nn's, bfloat16 in -> bfloat16 out."""
    r = np.random.default_rng(0)
    q = jnp.asarray(r.normal(size=(3, 20, 2, 8)), jnp.float32)
    k, v = (jnp.asarray(r.normal(size=(3, 12, 2, 8)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(r.uniform(size=(3, 12)) < 0.5).at[:, 0].set(True).at[2].set(jnp.arange(12) == 0)
    for key_mask in (None, mask):
        full = np.ones((3, 12), bool) if key_mask is None else key_mask
        out = jax.jit(lambda q, k, v: kernels.dense_attention(q, k, v, key_mask))(q, k, v)
        np.testing.assert_allclose(np.asarray(out), _reference_attention(q, k, v, full), atol=2e-6)
        g = jnp.asarray(r.normal(size=out.shape), jnp.float32)
        grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * g), argnums=(0, 1, 2)))(q, k, v)
        mask4 = None if key_mask is None else key_mask[:, None, None, :]
        for a, b in zip(grad(lambda q, k, v: kernels.dense_attention(q, k, v, key_mask)),
                        grad(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask4))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
    bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    out = kernels.dense_attention(*bf, mask)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), _reference_attention(q, k, v, mask), atol=0.05)


def test_splash_attention_in_interpreter():
    """The TPU kernel's wrapper (head-major layout, q scaling, padded keys as segment ids), run by
    the Pallas interpreter on the CPU: one example, one head, one 128 x 128 block."""
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.normal(size=(1, 128, 1, 64)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(r.uniform(size=(1, 128)) < 0.5).at[:, 0].set(True)
    out = kernels.splash_attention(q, k, v, mask, interpret=True)
    np.testing.assert_allclose(np.asarray(out), _reference_attention(q, k, v, mask), atol=1e-5)


def test_splash_attention_pads_other_lengths():
    """Lengths that are not multiples of 128 (self-attention over 200 tokens, cross-attention of
    those to 77 masked text tokens): zero-padded to the kernel's blocks, padded keys masked out and
    padded queries cut; values and gradients equal unpadded attention's."""
    r = np.random.default_rng(1)
    q, k, v = (jnp.asarray(r.normal(size=(2, 200, 2, 32)), jnp.float32) for _ in range(3))
    text = jnp.asarray(r.normal(size=(2, 77, 2, 32)), jnp.float32)
    mask = jnp.asarray(r.uniform(size=(2, 77)) < 0.5).at[:, 0].set(True)
    out = kernels.splash_attention(q, k, v, None, interpret=True)
    np.testing.assert_allclose(np.asarray(out), _reference_attention(q, k, v, np.ones((2, 200), bool)), atol=1e-5)
    out = kernels.splash_attention(q, text, text, mask, interpret=True)
    np.testing.assert_allclose(np.asarray(out), _reference_attention(q, text, text, mask), atol=1e-5)
    g = jnp.asarray(r.normal(size=q.shape), jnp.float32)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * g)
    splash = jax.grad(loss(lambda q, k, v: kernels.splash_attention(q, k, v, mask, interpret=True)), (0, 1, 2))
    xla = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])),
                   (0, 1, 2))
    for a, b in zip(splash(q, text, text), xla(q, text, text)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_splash_kernel_per_device_under_a_mesh():
    """The TPU kernel as the model runs it on a mesh: per device under shard_map (interpreted)."""
    import functools
    r = np.random.default_rng(3)
    q, k, v = (jnp.asarray(r.normal(size=(8, 128, 2, 64)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(r.uniform(size=(8, 128)) < 0.7).at[:, 0].set(True)
    kernel = functools.partial(kernels.splash_attention, interpret=True)
    assert kernels.is_pallas(kernel) and not kernels.is_pallas(kernels.chunked_attention)
    with jax.set_mesh(sharding.make_mesh((1, 8, 1, 1))), nn.logical_axis_rules(sharding.rules("fsdp")):
        out = jax.jit(lambda q, k, v, m: attn_lib._per_device(kernel, q, k, v, m))(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), _reference_attention(q, k, v, mask), atol=1e-5)


def test_kernel_choice_on_cpu():
    pick = kernels.pick_implementation
    assert pick((2, 1024, 6, 64), (2, 1024, 6, 64), jnp.float32) == "chunked"
    assert pick((8, 80, 4, 32), (8, 80, 4, 32), jnp.float32) == "dense"
    assert pick((8, 1024, 4, 32), (8, 12, 4, 32), jnp.float32, masked=True) == "dense"  # cross-attention to text
    with pytest.raises(ValueError, match="flash"):
        attn_lib.dot_product_attention(*([jnp.zeros((1, 4, 1, 8))] * 3), implementation="flash")


def test_kernel_choice_on_gpu(monkeypatch):
    """cuDNN for half-precision self-attention; XLA for float32, wide heads and masked (text) keys."""
    monkeypatch.setattr(kernels.jax, "default_backend", lambda: "gpu")
    pick = kernels.pick_implementation
    assert pick((2, 1280, 12, 64), (2, 1280, 12, 64), jnp.bfloat16) == "cudnn"
    assert pick((2, 1280, 12, 128), (2, 1280, 12, 128), jnp.float16) == "cudnn"
    assert pick((2, 1280, 12, 64), (2, 1280, 12, 64), jnp.float32) == "xla"
    assert pick((2, 1280, 2, 256), (2, 1280, 2, 256), jnp.bfloat16) == "xla"
    assert pick((2, 1280, 12, 64), (2, 64, 12, 64), jnp.bfloat16, masked=True) == "xla"


def test_kernel_choice_follows_the_mesh_platform(monkeypatch):
    """Compiling ahead for a TPU from a CPU host (pixeldance.tools.plan): the mesh's platform decides."""
    import types
    tpu_mesh = types.SimpleNamespace(abstract_device=types.SimpleNamespace(platform="tpu"))
    monkeypatch.setattr(kernels.jax.sharding, "get_abstract_mesh", lambda: tpu_mesh)
    assert kernels.target_platform() == "tpu"
    want = "splash" if kernels._splash is not None else "xla"
    assert kernels.pick_implementation((1, 31744, 3, 128), (1, 31744, 3, 128), jnp.bfloat16) == want
    # Any length: splash pads to its 128-blocks (Wan 2.1's 480 x 832 x 81 frames: 32,760 tokens).
    assert kernels.pick_implementation((1, 32760, 3, 128), (1, 512, 3, 128), jnp.bfloat16, masked=True) == want


# ----------------------------------------------------------------------------------------------
# Factorised attention: which tokens a perturbation reaches after one block

def _token_changes(apply, params, inputs, frame, row, col):
    """Per token (t, h, w): whether the output changed when latent (frame, row, col) changed."""
    x = inputs[0]
    bumped = x.at[:, frame, row, col, :].add(1.0)
    diff = jnp.abs(apply(params, bumped, *inputs[1:]) - apply(params, *inputs))  # [B, T, H, W, C]
    B, T, H, W, C = diff.shape
    per_token = diff.reshape(B, T, H // 2, 2, W // 2, 2, C).max(axis=(0, 3, 5, 6))  # patch 2 x 2
    return np.asarray(per_token > 0)


def _zeroed(params, name):
    blocks = dict(params["params"]["blocks"])
    blocks[name] = jax.tree.map(jnp.zeros_like, blocks[name])
    return {"params": {**params["params"], "blocks": blocks}}


def test_factorised_attention_receptive_field():
    model = _model(depth=1, attention="factorised")
    inputs = _inputs(batch=1, frames=3, size=4)
    params = _params(model, inputs)
    apply = jax.jit(model.apply)
    frame, row, col = 1, 0, 3  # token (t=1, h=0, w=1)
    token = (frame, row // 2, col // 2)
    changes = lambda apply, params: _token_changes(apply, params, inputs, frame, row, col)
    same_frame = np.zeros((3, 2, 2), bool)
    same_frame[frame] = True
    same_place = np.zeros((3, 2, 2), bool)
    same_place[:, token[1], token[2]] = True

    # Spatial attention alone (temporal output projection zeroed): the perturbed frame only.
    np.testing.assert_array_equal(changes(apply, _zeroed(params, "time_out")), same_frame)
    # Temporal attention alone (spatial output projection zeroed): the same place in every frame.
    np.testing.assert_array_equal(changes(apply, _zeroed(params, "self_out")), same_place)
    # Both: space then time reaches every token within one block.
    assert changes(apply, params).all()
    # Full attention with its self-attention zeroed: the token alone (cross-attention and MLP
    # are per token); with it, every token.
    full = _model(depth=1)
    full_params, full_apply = _params(full, inputs), jax.jit(full.apply)
    only = np.zeros((3, 2, 2), bool)
    only[token] = True
    np.testing.assert_array_equal(changes(full_apply, _zeroed(full_params, "self_out")), only)
    assert changes(full_apply, full_params).all()


# ----------------------------------------------------------------------------------------------
# Analytic FLOPs against XLA's count of an unrolled graph

@pytest.mark.parametrize("attention", ["full", "factorised"])
def test_flops_formula_matches_xla(attention):
    """Forward FLOPs: the formula vs XLA's cost analysis (unrolled, XLA attention; matmuls dominate)."""
    kw = dict(width=128, depth=2, num_heads=4, mlp_ratio=4)
    model = dit_lib.VideoDiT(latent_channels=16, scan_layers=False, attention=attention,
                             attention_impl="xla", **kw)
    inputs = _inputs(batch=1, frames=4, size=8, text_len=6)
    inputs = inputs[:4] + (jnp.zeros((1, 6, 128)),) + inputs[5:]
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *inputs)))
    cost = jax.jit(model.apply).lower(params, *inputs).compile().cost_analysis()
    xla_flops = cost["flops"] if isinstance(cost, dict) else cost[0]["flops"]
    analytic = dit_lib.dit_flops_per_sample(num_tokens=4 * 4 * 4, text_len=6, width=128, depth=2, mlp_ratio=4,
                                            patch_dim_in=4 * 33, patch_dim_out=4 * 16, attention=attention,
                                            num_frames=4)
    assert 0.9 < analytic / xla_flops < 1.05, (analytic, xla_flops)


def test_frozen_text_states_condition_the_dit(reference):
    """PixelDanceModel over a frozen encoder's cached states (FrozenText: no parameters of its
    own) equals the bare VideoDiT fed the same states and mask, in bfloat16 as cached."""
    x, t, c, m, text, mask = reference["inputs"]
    text = text.astype(jnp.bfloat16)
    bare = _model(attention_impl="xla")
    model = dit_lib.PixelDanceModel(text_lib.FrozenText(), bare)
    frozen = dict(states=text, mask=mask)
    variables = nn.unbox(model.init(jax.random.key(0), x, t, c, m, frozen))
    assert set(variables["params"]) == {"dit"}  # nothing trainable besides the DiT
    params = {"params": {"dit": reference["params"]["params"]}}
    out = jax.jit(model.apply)(params, x, t, c, m, frozen)
    want = jax.jit(bare.apply)(reference["params"], x, t, c, m, text.astype(jnp.float32), mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Absolute positions (config.dit.pos_embed)

def test_sincos_3d_layout():
    grid, dim = (3, 2, 4), 32
    feats = np.asarray(dit_lib.sincos_3d(grid, dim))
    dt, dh, dw = dit_lib.rope_split(dim)
    assert feats.shape == (3 * 2 * 4, dim) and dt + dh + dw == dim
    for t in range(3):
        for h in range(2):
            for w in range(4):
                row = feats[(t * 2 + h) * 4 + w]  # the patchified tokens' row-major order
                # Each axis: cos then sin of its index, the first frequency 1.
                np.testing.assert_allclose(row[[0, dt // 2]], [np.cos(t), np.sin(t)], atol=1e-6)
                np.testing.assert_allclose(row[[dt, dt + dh // 2]], [np.cos(h), np.sin(h)], atol=1e-6)
                np.testing.assert_allclose(row[[dt + dh, dt + dh + dw // 2]], [np.cos(w), np.sin(w)],
                                           atol=1e-6)
    assert len({tuple(r) for r in feats.round(6)}) == len(feats)  # every token its own position


@pytest.mark.parametrize("pos_embed", ["none", "sincos"])
def test_pos_embed_tells_tokens_apart(pos_embed):
    """With self-attention zeroed every token is processed alone: equal tokens give equal outputs
    under RoPE alone (it only acts between tokens), and different ones with absolute positions."""
    model = _model(depth=1, pos_embed=pos_embed)
    x, t, c, m, text, mask = _inputs(batch=1, frames=3, size=4)
    inputs = (jnp.ones_like(x), t, jnp.ones_like(c), jnp.ones_like(m), text, mask)
    params = _zeroed(_params(model, inputs), "self_out")
    out = np.asarray(jax.jit(model.apply)(params, *inputs))[0]  # [T, 4, 4, C], tokens of 2 x 2
    tokens = out.reshape(3, 2, 2, 2, 2, 16).transpose(0, 1, 3, 2, 4, 5).reshape(12, -1)
    spread = np.abs(tokens - tokens[0]).max()
    if pos_embed == "none":
        assert spread < 1e-5
    else:
        assert spread > 1e-2


def test_unknown_pos_embed_is_refused():
    with pytest.raises(ValueError, match="pos_embed"):
        _model(pos_embed="learned").init(jax.random.key(0), *_inputs(batch=1))


# ----------------------------------------------------------------------------------------------
# Unrolled layer loop: the same parameters and gradients, no loop in the compiled step

@pytest.mark.parametrize("unroll", [2, 5])
def test_unrolled_layers_give_equal_gradients_without_a_loop(reference, unroll):
    """scan_unroll keeps the scanned parameter layout (checkpoints stay interchangeable) and the
    gradients; at >= depth the compiled step has no while loop (the point: no per-layer stacking)."""
    inputs, params, ref = reference["inputs"], reference["params"], reference["grads"]
    model = _model(attention_impl="xla", scan_unroll=unroll)
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *inputs)))
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(params)))
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref))
    grads = _grads(model, params, inputs)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)

    def loops(m):
        return jax.jit(lambda p: m.apply(p, *inputs)).lower(params).as_text().count("stablehlo.while")
    assert loops(_model()) >= 1  # the scanned default: one loop over the layers
    assert loops(model) == 0     # TINY has depth 2: both settings unroll it whole


def test_scan_unroll_below_one_is_refused():
    with pytest.raises(ValueError, match="scan_unroll"):
        _model(scan_unroll=0).init(jax.random.key(0), *_inputs(batch=1))
