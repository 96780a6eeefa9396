r"""Who sets the motion of a text-only video: the caption or the noise? (issue 19)

  python benchmarks/text_control.py --workdir=workdirs/shapes \
      --output=benchmarks/results/text_control_main_job.json

Takes `--num_clips` clips of the workdir's synthetic world (split `--split`), encodes them, noises
them to each time in `--times` on the model's own noise path (flow: x_t = (1 - t) z + t eps; DDPM:
its alpha(t), sigma(t)), and asks the DiT for its guided clean estimate with no image instruction
(the text-to-video mode, guidance `--guidance`; `--mode=i2v` gives the clip's first frame as
the first-frame instruction), once with the clip's own caption and once with
the caption's direction replaced by the opposite one. Each estimate is decoded and its direction
scored by the faithfulness evaluator (`evaluators.synthetic.analyse_video`). Per time and caption:

  follows_text   the estimate moves as the caption asks;
  follows_clip   the estimate moves as the noised clip does.

A model that reads direction from its caption follows the opposite caption once the noise has
hidden the clip's motion (large t); one that follows the clip there takes the motion from what the
noise happens to suggest, and text-only direction is then at chance whatever the sampler does.
On a CPU a run of 24 clips at 4 times takes about a minute.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def opposite_caption(caption: str) -> str:
    """'a red circle moves left' -> 'a red circle moves right' (one-object captions)."""
    words = caption.split()
    return " ".join(words[:-1] + [OPPOSITE[words[-1]]])


def measure(workdir: str, num_clips: int, times, guidance: float, split: str, seed: int,
            mode: str = "t2v") -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from pixeldance import sample, sharding
    from pixeldance.data import synthetic
    from pixeldance.diffusion import conditioning, objectives
    from pixeldance.evaluators import synthetic as scoring

    pipe = sample.load_pipeline(workdir)
    task = pipe.task
    source = synthetic.ShapesSource(split, num_clips, synthetic.world_config(pipe.config))
    items = [source[i] for i in range(num_clips)]
    captions = [item["caption"] for item in items]
    if any(" and " in c for c in captions):
        raise ValueError("text_control scores one-object worlds (config.data.num_objects = 1)")
    clip_dirs = [c.split()[-1] for c in captions]
    z = jnp.asarray(pipe.stats.normalise(pipe.vae.encode(np.stack([item["video"] for item in items]))))
    B, T, h, w, C = z.shape
    noise = jax.random.normal(jax.random.key(seed), z.shape)
    # i2v: the clip's first latent frame as the first-frame instruction (the causal VAE encodes
    # frame 0 alone, as the Pipeline encodes a first-frame image), put in as the sampler does.
    has_first = jnp.full((B,), mode == "i2v")
    c_image, c_mask = conditioning.make_instructions(z[:, 0], z[:, 0], has_first, jnp.zeros((B,), bool), T)
    out = dict(workdir=os.path.abspath(workdir), split=split, num_clips=num_clips, guidance=guidance, mode=mode,
               objective=task.objective, prediction=task.prediction, rows=[])
    for kind in ("own", "opposite"):
        prompts = captions if kind == "own" else [opposite_caption(c) for c in captions]
        text = pipe.text(prompts)
        for t in times:
            x_t = objectives.add_noise(z, noise, jnp.full((B,), t, jnp.float32), objective=task.objective)
            if task.replace:
                x_t = conditioning.replace_first(x_t, z[:, 0], has_first)
            with jax.set_mesh(pipe.mesh), nn.logical_axis_rules(sharding.rules(sample.INFERENCE_PRESET)):
                denoise = task.denoiser(pipe.model, pipe.params, c_image, c_mask, text, jnp.float32(guidance),
                                        jnp.float32(1.0), jnp.int32(0), branches=2, null_text=pipe.text.null)
                x0, _ = jax.jit(denoise)(x_t, jnp.float32(t), jnp.int32(0))
            videos = pipe.vae.decode(pipe.stats.denormalise(x0))
            found = [scoring.analyse_video(v)["direction"] for v in videos]
            row = dict(caption=kind, t=float(t),
                       follows_text=float(np.mean([f == p.split()[-1] for f, p in zip(found, prompts)])),
                       follows_clip=float(np.mean([f == d for f, d in zip(found, clip_dirs)])),
                       undecided=float(np.mean([f is None for f in found])))
            print(f"{kind:9s} t={t:.2f}  follows text {row['follows_text']:.2f}  follows clip "
                  f"{row['follows_clip']:.2f}  undecided {row['undecided']:.2f}", flush=True)
            out["rows"].append(row)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--output", default="")
    parser.add_argument("--num_clips", type=int, default=24)
    parser.add_argument("--times", default="0.7,0.9,0.97,1.0")
    parser.add_argument("--guidance", type=float, default=8.0)
    parser.add_argument("--split", default="train")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--mode", choices=("t2v", "i2v"), default="t2v",
                        help="t2v: no image instruction; i2v: the clip's first frame given")
    args = parser.parse_args()
    result = measure(args.workdir, args.num_clips, [float(t) for t in args.times.split(",")],
                     args.guidance, args.split, args.seed, args.mode)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
