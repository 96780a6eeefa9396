r"""Our DiT against diffusers' Wan transformer on the CPU: train step and sampling step.

  nice -n 5 python benchmarks/vs_diffusers.py --output=benchmarks/results/vs_diffusers.jsonl
  python benchmarks/vs_diffusers.py --tiny --rounds=2 --steps=1      # a quick end-to-end check
  python benchmarks/vs_diffusers.py --mode=sample --jax_flags=--xla_cpu_use_xnnpack=true

The peer (`../../shared/refs/BENCHMARKS.md`): diffusers' `WanTransformer3DModel` in PyTorch,
random weights, patch (1, 2, 2), 8 heads x 64, 16 latent channels in and out, text width 512,
FFN 2048, 6 layers; latents (B=2, C=16, T=4, H=32, W=32) -> 1,024 tokens per sample, text
(2, 64, 512). Ours: `pixeldance.models.dit.VideoDiT` of the same width (512), depth, heads,
MLP width (mlp_ratio 4), patch and token count, fed the same text embeddings directly.
float32 on both sides.

A train step is forward + MSE against a fixed target + backward + optimizer step. Ours is
`pixeldance.train_lib.make_train_step` with `make_optimizer` (global-norm clipping at 1.0, then
AdamW), which also updates an EMA copy of the parameters; the peer does the same work
(`clip_grad_norm_`, `torch.optim.AdamW`, an EMA by `torch._foreach_lerp_`). A sampling step is
one forward pass without gradients (`jax.jit` of `apply`; `torch.inference_mode`).

Protocol (BENCHMARKS.md): each side runs in its own child process, pinned to one core with
`taskset -c CPU`, one thread (OMP/MKL/OPENBLAS_NUM_THREADS=1, `torch.set_num_threads(1)`,
XLA_FLAGS="--xla_cpu_multi_thread_eigen=false [--jax_flags] intra_op_parallelism_threads=1";
XLA ignores a token without dashes and all flags after it, hence the order). The children build and compile once, then the parent runs rounds, the
order alternating (A B, B A, ...): in each round a side runs `--warmup` untimed and `--steps`
timed steps of each mode, then times a float32 matmul (its peak, in the same process). Reported
per side and mode: median and minimum step times over all rounds; the ratio is diffusers' time
over ours (> 1: we are faster; the target is >= 1.5), from the medians, the minimums and per
round. Model FLOPs are analytic: the formula of BENCHMARKS.md per layer per sample,
2N(6d^2 + 2df) + 4d^2 S + 4N^2 d + 4NSd, plus the patch input and output projections, cross-
checked against `dit_flops_per_sample` and (unless --no_flop_check) against XLA's cost analysis
of an unrolled, plain-XLA-attention forward and PyTorch's FLOP counter (which misses CPU flash
attention, so it counts the linear layers only). A train step counts 3x the forward.

The two models differ where it does not scale with tokens, and in the input projection: our
DiT's input is the noisy latents concatenated with the image-instruction latents and their mask
(2C + 1 channels, not C), so its patch embedding has (C + 1) * prod(patch) * width more weights
and FLOPs; it has an adaLN projection per block (Wan shares one and adds a per-block table); Wan
embeds text with a 2-layer MLP where we use one projection. The per-token matmuls of the blocks
(self-attention q, k, v, out; cross-attention q, out; the MLP) and the cross-attention k, v are
the same sizes; the JSON lists the parameters by role on both sides.

Prints one JSON object and appends it to --output if given.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

# The peer configuration of BENCHMARKS.md, and a much smaller one for quick checks.
PEER = dict(patch=[1, 2, 2], heads=8, head_dim=64, channels=16, text_dim=512, ffn=2048, layers=6,
            batch=2, frames=4, height=32, width=32, text_len=64, freq_dim=256)
TINY = dict(patch=[1, 2, 2], heads=2, head_dim=32, channels=4, text_dim=64, ffn=256, layers=2,
            batch=2, frames=2, height=8, width=8, text_len=8, freq_dim=256)
# The thread settings of the protocol. XLA_FLAGS holds BENCHMARKS.md's two tokens, but XLA's
# parser (jax 0.10) stops at a token without leading dashes and silently ignores it and every
# flag after it ('--intra_op_parallelism_threads' is no XLA flag and aborts): so --jax_flags go
# between them, and one thread comes from the pinning and the Eigen flag.
THREAD_ENV = dict(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
BASE_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false"
IGNORED_XLA_TOKEN = "intra_op_parallelism_threads=1"


def child_xla_flags(jax_flags: str = "") -> str:
    """XLA_FLAGS of our side: the protocol's flags with `jax_flags` where XLA still reads them."""
    return " ".join(f for f in (BASE_XLA_FLAGS, jax_flags.strip(), IGNORED_XLA_TOKEN) if f)
TARGET_RATIO = 1.5
LR = 1e-4
EMA_DECAY = 0.999
_MARK = "@@vs_diffusers "  # prefix of the children's result lines on stdout


# ----------------------------------------------------------------------------------------------
# Shapes, FLOPs and parameter roles (no jax or torch needed).

def tokens_per_sample(cfg: dict) -> int:
    pt, ph, pw = cfg["patch"]
    return (cfg["frames"] // pt) * (cfg["height"] // ph) * (cfg["width"] // pw)


def model_width(cfg: dict) -> int:
    return cfg["heads"] * cfg["head_dim"]


def patch_dims(cfg: dict, side: str) -> tuple[int, int]:
    """(input, output) features of the patch projections: ours sees 2C + 1 channels, Wan C."""
    p, c = math.prod(cfg["patch"]), cfg["channels"]
    return p * ((2 * c + 1) if side == "ours" else c), p * c


def peer_forward_flops_per_sample(cfg: dict, patch_in: int, patch_out: int) -> dict:
    """BENCHMARKS.md's per-layer count times the depth, plus the patch in/out projections."""
    N, S, d, f = tokens_per_sample(cfg), cfg["text_len"], model_width(cfg), cfg["ffn"]
    linear = 2 * N * (6 * d * d + 2 * d * f) + 4 * d * d * S
    attention = 4 * N * N * d + 4 * N * S * d
    patch = 2 * N * d * (patch_in + patch_out)
    return dict(linear=cfg["layers"] * linear + patch, attention=cfg["layers"] * attention,
                total=cfg["layers"] * (linear + attention) + patch)


def _role_ours(path: str) -> str:
    """Role of one of our VideoDiT parameters, from its path ('blocks/qkv/kernel', ...)."""
    name = path.split("/")[-2] if "/" in path else path
    if name == "patch_embed":
        return "input_projection"
    if name == "final":
        return "output_projection"
    if name in ("qkv", "self_out", "cross_q", "cross_out", "mlp_in", "mlp_out"):
        return "per_token_blocks"
    if name in ("cross_kv", "text_proj"):
        return "per_text_token"
    if name in ("adaln", "time_in", "time_out", "text_pool", "final_adaln"):
        return "conditioning"
    return "norms"


def _role_diffusers(name: str) -> str:
    """Role of one of the Wan transformer's parameters, from its module path."""
    if name.startswith("patch_embedding."):
        return "input_projection"
    if name.startswith("proj_out."):
        return "output_projection"
    if name.startswith("condition_embedder.text_embedder."):
        return "per_text_token"
    if name.startswith("condition_embedder.") or name.endswith("scale_shift_table"):
        return "conditioning"
    parts = name.split(".")
    if parts[0] == "blocks":
        sub = ".".join(parts[2:4])
        if sub in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out", "attn2.to_q", "attn2.to_out") \
                or parts[2] == "ffn":
            return "per_token_blocks"
        if sub in ("attn2.to_k", "attn2.to_v"):
            return "per_text_token"
    return "norms"


def _roles(named_sizes) -> dict:
    out = dict(input_projection=0, output_projection=0, per_token_blocks=0, per_text_token=0,
               conditioning=0, norms=0)
    total = 0
    for role, size in named_sizes:
        out[role] += int(size)
        total += int(size)
    out["total"] = total
    return out


# ----------------------------------------------------------------------------------------------
# Model construction, shared by the timed sides and by the tests.

def ours_model_kwargs(cfg: dict, *, attention_impl=None, scan_layers=True, remat="none") -> dict:
    """VideoDiT arguments of the peer's shape: width heads x head_dim, MLP width ffn."""
    import jax.numpy as jnp
    d = model_width(cfg)
    if cfg["ffn"] % d:
        raise ValueError(f"ffn {cfg['ffn']} is not a multiple of the width {d}")
    return dict(latent_channels=cfg["channels"], patch_size=tuple(cfg["patch"]), width=d, depth=cfg["layers"],
                num_heads=cfg["heads"], mlp_ratio=cfg["ffn"] // d, remat=remat, scan_layers=scan_layers,
                dtype=jnp.float32, attention="full", attention_impl=attention_impl)


def ours_batch(cfg: dict) -> dict:
    """Inputs of our DiT (numpy): latents, instruction latents (first and last frame) and mask,
    the flow time, text embeddings fed directly (all valid), and the regression target."""
    B, T, H, W, C, S = (cfg[k] for k in ("batch", "frames", "height", "width", "channels", "text_len"))
    rng = np.random.default_rng(0)
    mask = np.zeros((B, T, H, W, 1), np.float32)
    mask[:, 0] = mask[:, -1] = 1.0
    return dict(x=rng.normal(size=(B, T, H, W, C)).astype(np.float32),
                t=rng.uniform(size=(B,)).astype(np.float32),
                c=(rng.normal(size=(B, T, H, W, C)) * mask).astype(np.float32), m=mask,
                text=rng.normal(size=(B, S, cfg["text_dim"])).astype(np.float32),
                text_mask=np.ones((B, S), bool),
                target=rng.normal(size=(B, T, H, W, C)).astype(np.float32))


def _ours_args(b: dict, n: int | None = None):
    return tuple(b[k][:n] for k in ("x", "t", "c", "m", "text", "text_mask"))


def _ours_roles(params) -> dict:
    import jax
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return _roles((_role_ours("/".join(str(getattr(k, "key", k)) for k in path)), math.prod(leaf.shape))
                  for path, leaf in flat)


def ours_param_roles(cfg: dict) -> dict:
    """Our DiT's parameters by role, from abstract shapes (nothing is computed)."""
    import jax
    from flax import linen as nn

    from pixeldance.models import dit as dit_lib
    model = dit_lib.VideoDiT(**ours_model_kwargs(cfg))
    args = _ours_args(ours_batch(dict(cfg, batch=1)))
    return _ours_roles(nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args)))


def build_wan(cfg: dict):
    """The peer: diffusers' WanTransformer3DModel as BENCHMARKS.md configures it."""
    from diffusers import WanTransformer3DModel
    return WanTransformer3DModel(
        patch_size=tuple(cfg["patch"]), num_attention_heads=cfg["heads"], attention_head_dim=cfg["head_dim"],
        in_channels=cfg["channels"], out_channels=cfg["channels"], text_dim=cfg["text_dim"],
        freq_dim=cfg["freq_dim"], ffn_dim=cfg["ffn"], num_layers=cfg["layers"], cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def wan_param_roles(cfg: dict) -> dict:
    """The peer's parameters by role, built on the meta device (nothing is allocated)."""
    import torch
    with torch.device("meta"):
        model = build_wan(cfg)
    return _roles((_role_diffusers(n), p.numel()) for n, p in model.named_parameters())


# ----------------------------------------------------------------------------------------------
# The two sides. Each builds its model, inputs and step functions; `train()` and `sample()` run
# one step to completion; `peak()` times one float32 matmul (FLOP/s).

def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class Ours:
    """pixeldance's VideoDiT, train step from pixeldance.train_lib, in JAX."""

    def __init__(self, cfg: dict, modes=("train", "sample"), attention_impl=None, scan_layers=True,
                 remat="none", peak_n=2048):
        import jax
        import jax.numpy as jnp
        from flax import linen as nn

        from pixeldance import train_lib
        from pixeldance.models import attention_kernels
        from pixeldance.models import dit as dit_lib

        self.jax, self.cfg, self.peak_n = jax, cfg, peak_n
        self.model_kwargs = ours_model_kwargs(cfg, attention_impl=attention_impl, scan_layers=scan_layers,
                                              remat=remat)
        self.model = dit_lib.VideoDiT(**self.model_kwargs)
        B, S = cfg["batch"], cfg["text_len"]
        self.batch = jax.tree.map(jnp.asarray, ours_batch(cfg))
        b = self.batch
        # Jitted: an eager init dispatches hundreds of small ops one by one (seconds at any size).
        params = jax.jit(lambda k: nn.unbox(self.model.init(k, *_ours_args(b, 1))))(jax.random.key(0))
        copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
        self.params = copy(params)  # for sampling: the train step donates its state
        self.param_roles = _ours_roles(params)
        L = tokens_per_sample(cfg)
        K = cfg["head_dim"]
        self.attention_kernels = dict(
            self_attention=attention_impl or attention_kernels.pick_implementation((B, L, cfg["heads"], K),
                                                                          (B, L, cfg["heads"], K), jnp.float32),
            cross_attention=attention_impl or attention_kernels.pick_implementation((B, L, cfg["heads"], K),
                                                                           (B, S, cfg["heads"], K), jnp.float32))
        self.modes = tuple(modes)
        model = self.model

        def forward(p, b):
            return model.apply(p, *_ours_args(b))

        self.forward = forward
        if "train" in self.modes:
            self.tx = train_lib.make_optimizer(lr=LR, warmup_steps=1, num_steps=10 ** 6)

            def loss_fn(p, b, rng):
                del rng
                return jnp.mean(jnp.square(forward(p, b) - b["target"])), {}

            self.state = jax.jit(lambda p: train_lib.TrainState(
                step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.copy, p), opt_state=self.tx.init(p),
                ema_params=jax.tree.map(jnp.copy, p)))(params)
            self._train = jax.jit(train_lib.make_train_step(loss_fn, self.tx, EMA_DECAY), donate_argnums=0)
            self._key = jax.random.key(0)
        if "sample" in self.modes:
            self._sample = jax.jit(forward)
        a = jax.random.normal(jax.random.key(1), (peak_n, peak_n), jnp.float32)
        self._peak_args = (a, a + 1.0)
        self._matmul = jax.jit(jnp.matmul)

    def train(self):
        self.state, metrics = self._train(self.state, self.batch, self._key)
        self.jax.block_until_ready(metrics)
        return float(metrics["loss"])

    def sample(self):
        out = self._sample(self.params, self.batch)
        out.block_until_ready()
        return out.shape

    def peak(self, repeats=3):
        self._matmul(*self._peak_args).block_until_ready()
        return 2 * self.peak_n ** 3 / _best_time(lambda: self._matmul(*self._peak_args).block_until_ready(), repeats)

    def xla_forward_flops(self) -> float | None:
        """XLA's count of one forward: layers unrolled, plain XLA attention (a scanned or
        lax.map'ped body is counted once). Includes elementwise ops and per-sample terms."""
        from pixeldance.models import dit as dit_lib
        kw = dict(self.model_kwargs, scan_layers=False, attention_impl="xla", remat="none")
        model = dit_lib.VideoDiT(**kw)
        b = self.batch
        # The scanned parameters, one leading layer axis, as the unrolled model's block_0, block_1, ...
        p = dict(self.params["params"])
        if "blocks" in p:
            blocks = p.pop("blocks")
            for i in range(self.cfg["layers"]):
                p[f"block_{i}"] = self.jax.tree.map(lambda x: x[i], blocks)
        f = lambda p, b: model.apply(p, *_ours_args(b))
        lowered = self.jax.jit(f).lower({"params": p}, b)
        try:
            cost = lowered.cost_analysis()
        except Exception:  # noqa: BLE001 - older/newer jax: fall back to the compiled count
            cost = lowered.compile().cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        return float(cost["flops"]) if cost and "flops" in cost else None

    def versions(self) -> dict:
        import flax
        import jaxlib
        import optax
        return dict(jax=self.jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__,
                    optax=optax.__version__, backend=self.jax.default_backend(),
                    devices=self.jax.device_count())


class Diffusers:
    """diffusers' WanTransformer3DModel in PyTorch (eager), random weights."""

    def __init__(self, cfg: dict, modes=("train", "sample"), peak_n=2048):
        import torch

        self.torch, self.cfg, self.peak_n = torch, cfg, peak_n
        torch.manual_seed(0)
        self.model = build_wan(cfg).float()
        self.param_roles = _roles((_role_diffusers(n), p.numel()) for n, p in self.model.named_parameters())
        B, T, H, W, C, S = (cfg[k] for k in ("batch", "frames", "height", "width", "channels", "text_len"))
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(B, C, T, H, W, generator=g)
        self.t = torch.rand(B, generator=g) * 1000.0
        self.text = torch.randn(B, S, cfg["text_dim"], generator=g)
        self.target = torch.randn(B, C, T, H, W, generator=g)
        self.modes = tuple(modes)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer_kind = "AdamW"
        if "train" in self.modes:
            self.optimizer, self.optimizer_kind = self._adamw()
            self.ema = [p.detach().clone() for p in self.params]
            self._step = 0
        a = torch.randn(peak_n, peak_n, generator=g)
        self._peak_args = (a, a + 1.0)

    def _adamw(self):
        # The fastest AdamW PyTorch has on a CPU (fused, torch >= 2.4), else its default.
        kw = dict(lr=LR, betas=(0.9, 0.99), weight_decay=0.0)
        try:
            return self.torch.optim.AdamW(self.params, fused=True, **kw), "AdamW(fused=True)"
        except (RuntimeError, TypeError, ValueError):
            return self.torch.optim.AdamW(self.params, **kw), "AdamW"

    def _forward(self):
        return self.model(self.x, self.t, self.text, return_dict=False)[0]

    def train(self):
        torch = self.torch
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(self._forward(), self.target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self._step += 1
        decay = min(EMA_DECAY, self._step / (9.0 + self._step))  # = train_lib.ema_decay_at
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - decay)
        return float(loss.detach())

    def sample(self):
        self.model.eval()
        with self.torch.inference_mode():
            out = self._forward()
        return tuple(out.shape)

    def peak(self, repeats=3):
        torch = self.torch
        with torch.inference_mode():
            torch.matmul(*self._peak_args)
            return 2 * self.peak_n ** 3 / _best_time(lambda: torch.matmul(*self._peak_args), repeats)

    def torch_forward_flops(self) -> float | None:
        """PyTorch's FLOP counter on one forward: matmuls and convolutions; CPU flash attention
        (`_scaled_dot_product_flash_attention_for_cpu`) is not counted."""
        try:
            from torch.utils.flop_counter import FlopCounterMode
        except ImportError:
            return None
        with self.torch.inference_mode(), FlopCounterMode(display=False) as counter:
            self._forward()
        return float(counter.get_total_flops())

    def versions(self) -> dict:
        import diffusers
        torch = self.torch
        return dict(torch=torch.__version__, diffusers=diffusers.__version__,
                    num_threads=torch.get_num_threads(), num_interop_threads=torch.get_num_interop_threads(),
                    mkldnn=bool(torch.backends.mkldnn.is_available()), optimizer=self.optimizer_kind,
                    sdpa_backend="F.scaled_dot_product_attention (diffusers 'native')")


# ----------------------------------------------------------------------------------------------
# Child process: builds one side, then answers the parent's commands (one JSON line each).

def _emit(obj):
    sys.stdout.write(_MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def child_main(side: str, opts: dict):
    cfg, modes = opts["cfg"], tuple(opts["modes"])
    t0 = time.perf_counter()
    if side == "ours":
        impl = Ours(cfg, modes, attention_impl=opts.get("attention_impl"),
                    scan_layers=opts.get("scan_layers", True), remat=opts.get("remat", "none"),
                    peak_n=opts["peak_n"])
    else:
        import torch
        torch.set_num_threads(1)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        impl = Diffusers(cfg, modes, peak_n=opts["peak_n"])
    info = dict(build_s=time.perf_counter() - t0, params=impl.param_roles, versions=impl.versions())
    for mode in modes:  # compile (JAX) and first-call costs, excluded from all timings
        t0 = time.perf_counter()
        getattr(impl, mode)()
        info[f"first_{mode}_s"] = time.perf_counter() - t0
    if side == "ours":
        info["attention_kernels"] = impl.attention_kernels
        info["model_kwargs"] = {k: str(v) for k, v in impl.model_kwargs.items()}
    if opts.get("flop_check", True):
        try:
            info["counted_forward_flops"] = (impl.xla_forward_flops() if side == "ours"
                                             else impl.torch_forward_flops())
        except Exception as e:  # noqa: BLE001 - a cross-check must not sink the benchmark
            info["counted_forward_flops_error"] = repr(e)
    info.update(setup_cpu_s=time.process_time(), pid=os.getpid(), affinity=sorted(os.sched_getaffinity(0)), nice=os.nice(0),
                xla_flags=os.environ.get("XLA_FLAGS", ""), thread_env={k: os.environ.get(k) for k in THREAD_ENV})
    info["sample_output_shape"] = list(impl.sample()) if "sample" in modes else None
    _emit(dict(ok=True, info=info))
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        result = {}
        for mode in modes:
            fn = getattr(impl, mode)
            for _ in range(cmd["warmup"]):
                fn()
            times = []
            for _ in range(cmd["steps"]):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            result[mode] = times
        result["peak_flops"] = impl.peak()
        result["load_avg"] = os.getloadavg()
        _emit(dict(ok=True, round=result))


# ----------------------------------------------------------------------------------------------
# Parent: starts both children, interleaves the rounds, summarises.

class _Child:
    def __init__(self, side: str, opts: dict, cpu: str | None, xla_flags: str):
        env = dict(os.environ, **THREAD_ENV, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu",
                   PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        cmd = [sys.executable, os.path.abspath(__file__), f"--_child={side}", "--_opts=" + json.dumps(opts)]
        if cpu is not None:
            cmd = ["taskset", "-c", cpu] + cmd
        self.side, self.cmd = side, cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(_MARK):
                return json.loads(line[len(_MARK):])
        raise RuntimeError(f"the {self.side} child exited (status {self.proc.wait()}); see its stderr above")

    def send(self, obj: dict):
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.send(dict(cmd="quit"))
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()


def _pinning(cpu: str | None) -> str | None:
    """The CPU to pin to, or None where taskset or that CPU is unavailable."""
    if cpu in (None, "", "none") or shutil.which("taskset") is None:
        return None
    allowed = os.sched_getaffinity(0)
    wanted = {int(c) for c in cpu.split(",")}
    return cpu if wanted <= allowed else None


def run(cfg: dict, *, modes=("train", "sample"), rounds=4, steps=3, warmup=1, cpu="1", jax_flags="",
        attention_impl=None, scan_layers=True, remat="none", peak_n=2048, flop_check=True,
        size="peer", parallel_start=False) -> dict:
    """The whole benchmark; returns the result dict."""
    pinned = _pinning(cpu)
    xla_flags = child_xla_flags(jax_flags)
    opts = dict(cfg=cfg, modes=list(modes), peak_n=peak_n, flop_check=flop_check)
    ours_opts = dict(opts, attention_impl=attention_impl, scan_layers=scan_layers, remat=remat)
    load_before = os.getloadavg()
    children = {}
    try:
        # Started one after the other, so that their set-up and compilation times (reported,
        # never part of the comparison) do not include the other's; at once with parallel_start.
        infos = {}
        for side, o in (("ours", ours_opts), ("diffusers", opts)):
            children[side] = _Child(side, o, pinned, xla_flags)
            if not parallel_start:
                infos[side] = children[side].read()["info"]
        for side in children:
            if side not in infos:
                infos[side] = children[side].read()["info"]
        rounds_out = {side: [] for side in children}
        for r in range(rounds):
            order = ("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours")
            for side in order:
                children[side].send(dict(cmd="round", steps=steps, warmup=warmup))
                rounds_out[side].append(children[side].read()["round"])
    finally:
        for c in children.values():
            c.close()
    return summarise(cfg, infos, rounds_out, modes=modes, rounds=rounds, steps=steps, warmup=warmup,
                     pinned=pinned, cpu=cpu, xla_flags=xla_flags, jax_flags=jax_flags, peak_n=peak_n,
                     attention_impl=attention_impl, scan_layers=scan_layers, remat=remat, size=size,
                     load_before=load_before, parallel_start=parallel_start)


def summarise(cfg, infos, rounds_out, *, modes, rounds, steps, warmup, pinned, cpu, xla_flags, jax_flags,
              peak_n, attention_impl, scan_layers, remat, size, load_before, parallel_start=False) -> dict:
    from pixeldance.models import dit as dit_lib  # loads jax, but the parent runs no computation

    L, B, d = tokens_per_sample(cfg), cfg["batch"], model_width(cfg)
    flops = {}
    for side in ("ours", "diffusers"):
        p_in, p_out = patch_dims(cfg, side)
        fwd = peer_forward_flops_per_sample(cfg, p_in, p_out)
        flops[side] = dict(patch_dim_in=p_in, patch_dim_out=p_out, forward_per_sample=fwd["total"],
                           forward_linear_per_sample=fwd["linear"], forward_attention_per_sample=fwd["attention"],
                           forward_step=B * fwd["total"], train_step=3 * B * fwd["total"],
                           counted_forward_step=infos[side].get("counted_forward_flops"))
    ours_p_in, ours_p_out = patch_dims(cfg, "ours")
    pixeldance_count = dit_lib.dit_flops_per_sample(
        num_tokens=L, text_len=cfg["text_len"], width=d, depth=cfg["layers"], mlp_ratio=cfg["ffn"] // d,
        patch_dim_in=ours_p_in, patch_dim_out=ours_p_out)
    flops["cross_check"] = dict(
        dit_flops_per_sample=pixeldance_count,
        rel_diff_vs_formula=pixeldance_count / flops["ours"]["forward_per_sample"] - 1.0,
        ours_xla_unrolled_over_analytic=_ratio(flops["ours"]["counted_forward_step"], flops["ours"]["forward_step"]),
        diffusers_torch_counter_over_analytic_linear=_ratio(
            flops["diffusers"]["counted_forward_step"], B * flops["diffusers"]["forward_linear_per_sample"]),
        note="XLA's count (unrolled layers, plain attention) includes elementwise and per-sample ops; "
             "PyTorch's counter misses CPU flash attention, so it is compared with the linear FLOPs only.")

    sides = {}
    for side in ("ours", "diffusers"):
        rs = rounds_out[side]
        peaks = [r["peak_flops"] for r in rs]
        s = dict(info=infos[side], peak_flops_max=max(peaks), peak_flops_median=float(np.median(peaks)),
                 peak_matmul=f"float32 {peak_n}x{peak_n}, best of 3 per round")
        for mode in modes:
            times = [t for r in rs for t in r[mode]]
            work = flops[side]["train_step" if mode == "train" else "forward_step"]
            s[mode] = dict(median_s=float(np.median(times)), min_s=float(min(times)), times_s=times,
                           round_medians_s=[float(np.median(r[mode])) for r in rs],
                           achieved_flops_median=work / float(np.median(times)),
                           achieved_flops_best=work / float(min(times)),
                           fraction_of_peak=work / float(min(times)) / max(peaks),
                           fraction_of_peak_median=work / float(np.median(times)) / float(np.median(peaks)))
        sides[side] = s

    comparison = {}
    for mode in modes:
        o, p = sides["ours"][mode], sides["diffusers"][mode]
        per_round = [dt / ot for dt, ot in zip(p["round_medians_s"], o["round_medians_s"])]
        ratio = p["median_s"] / o["median_s"]
        comparison[mode] = dict(ratio_median=ratio, ratio_min=p["min_s"] / o["min_s"],
                                ratio_per_round=per_round, ratio_per_round_median=float(np.median(per_round)),
                                target=TARGET_RATIO, meets_target=bool(ratio >= TARGET_RATIO))

    po, pd = sides["ours"]["info"]["params"], sides["diffusers"]["info"]["params"]
    p_in_ours, p_in_peer = patch_dims(cfg, "ours")[0], patch_dims(cfg, "diffusers")[0]
    params = dict(
        ours=po, diffusers=pd,
        input_projection_difference=po["input_projection"] - pd["input_projection"],
        input_projection_difference_expected=(p_in_ours - p_in_peer) * d,
        per_token_blocks_equal=po["per_token_blocks"] == pd["per_token_blocks"],
        note=("ours: patch embedding over 2C+1 channels (noisy latents, instruction latents, mask), an adaLN "
              "projection per block, a 1-layer text projection plus a pooled-text conditioning projection; "
              "Wan: patch embedding over C channels, one shared time projection plus a per-block "
              "scale-shift table, a 2-layer text MLP. Per-token block matmuls and cross-attention k/v: same sizes."))
    shapes = dict(ours=dict(x=[B, cfg["frames"], cfg["height"], cfg["width"], cfg["channels"]],
                            c_image=[B, cfg["frames"], cfg["height"], cfg["width"], cfg["channels"]],
                            c_mask=[B, cfg["frames"], cfg["height"], cfg["width"], 1],
                            text=[B, cfg["text_len"], cfg["text_dim"]],
                            output=sides["ours"]["info"].get("sample_output_shape")),
                  diffusers=dict(hidden_states=[B, cfg["channels"], cfg["frames"], cfg["height"], cfg["width"]],
                                 encoder_hidden_states=[B, cfg["text_len"], cfg["text_dim"]],
                                 output=sides["diffusers"]["info"].get("sample_output_shape")),
                  tokens_per_sample=dict(ours=L, diffusers=L), text_tokens=cfg["text_len"])
    return dict(
        benchmark="vs_diffusers", size=size, config=cfg, dtype="float32", modes=list(modes),
        shapes=shapes, params=params, flops=flops, ours=sides["ours"], diffusers=sides["diffusers"],
        comparison=comparison,
        protocol=dict(rounds=rounds, steps=steps, warmup=warmup, order="alternating: ours first in even rounds",
                      cpu_requested=cpu, cpu_pinned=pinned, thread_env=THREAD_ENV, xla_flags=xla_flags,
                      xla_flags_note=f"XLA reads the flags before {IGNORED_XLA_TOKEN!r} and ignores it and "
                                     "any after it", jax_flags=jax_flags, torch_threads=1, attention_impl=attention_impl,
                      scan_layers=scan_layers, remat=remat, parallel_start=parallel_start,
                      train_step="forward + MSE + backward + clip_by_global_norm(1.0) + AdamW(lr 1e-4, b1 .9, "
                                 "b2 .99, wd 0) + EMA(0.999), both sides",
                      sample_step="one forward, no gradients, batch as in training"),
        machine=dict(processor=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                     python=platform.python_version(), load_avg_before=load_before,
                     load_avg_after=os.getloadavg(), nice=os.nice(0)),
        date=time.strftime("%Y-%m-%d %H:%M"))


def _ratio(a, b):
    return None if a is None or not b else a / b


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="both", choices=("train", "sample", "both"))
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds per side")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode at the start of each round")
    p.add_argument("--tiny", action="store_true", help="a much smaller shape, for quick checks (not a benchmark)")
    p.add_argument("--cpu", default="1", help="the core both children are pinned to (taskset -c); 'none': no pinning")
    p.add_argument("--jax_flags", default="", help="extra XLA_FLAGS for our side, e.g. --xla_cpu_use_xnnpack=true")
    p.add_argument("--attention_impl", default=None, help="force our attention kernel: xla | chunked")
    p.add_argument("--no_scan", action="store_true", help="unroll our layers instead of nn.scan")
    p.add_argument("--remat", default="none", help="our remat policy")
    p.add_argument("--peak_n", type=int, default=None, help="matmul size of the peak (default 2048; tiny 512)")
    p.add_argument("--no_flop_check", action="store_true", help="skip XLA's and PyTorch's FLOP counts")
    p.add_argument("--parallel_start", action="store_true",
                   help="start both children at once (quicker; their reported set-up times then overlap)")
    p.add_argument("--output", default=None, help="append the JSON line to this file")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_opts", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        child_main(args._child, json.loads(args._opts))
        return None
    cfg = dict(TINY if args.tiny else PEER)
    modes = ("train", "sample") if args.mode == "both" else (args.mode,)
    result = run(cfg, modes=modes, rounds=args.rounds, steps=args.steps, warmup=args.warmup, cpu=args.cpu,
                 jax_flags=args.jax_flags, attention_impl=args.attention_impl, scan_layers=not args.no_scan,
                 remat=args.remat, peak_n=args.peak_n or (512 if args.tiny else 2048),
                 flop_check=not args.no_flop_check, size="tiny" if args.tiny else "peer",
                 parallel_start=args.parallel_start)
    line = json.dumps(result)
    print(line)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "a") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
