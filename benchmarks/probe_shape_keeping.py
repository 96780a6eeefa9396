r"""Where a trained DiT loses the synthetic world's shapes (issue 20): held-out real clips with
their first frame given (image-to-video) and their caption, read per true shape (circle, square,
triangle: how often the evaluator reads it, and the bounding-box fill it reads it from), three
ways:

  vae      the clips encoded and decoded: the ceiling (`vae_shape_ceiling.py`'s reading); and
           `latent_distance`, each clip drawn as each shape: how far apart two shapes' latents
           are (`swap_distances`).
  denoise  the clips' own latents noised to level t (`--levels`, the objective's time), one DiT
           call, its clean-sample estimate decoded: does the DiT keep a shape it is shown at
           that noise? (An estimate at high noise is a mean over clips, so it blurs by design.)
  sample   sampled from noise with the first frame and caption given (guided as the workdir's
           config.sample says, or `--guidance` / `--image_guidance`), by DDIM with eta 0
           (deterministic, the 'ddim' sampler) and eta 1 (fresh noise at each step, DDPM's
           posterior variance), at each of `--steps`: does sampling make the shape?
  pipeline the Pipeline's own sampler (the workdir's config.sample, `--guidance` /
           `--image_guidance` over it), per `--pipeline_modes`: 'i2v' (the first frame given),
           'direct' / 'first_frame' (text alone, by that text-to-video route): does the DiT
           draw a shape it is only told about?

  python benchmarks/probe_shape_keeping.py --workdir=workdirs/shapes_keyframes_sharp \
      --num_videos=64 --output=benchmarks/results/probe_shape_keeping.json

Measured in benchmarks/README.md (issue 20, session 25). The clips are long_video.py's held-out
ones (world seed + `--world_seed_offset`), the same as vae_shape_ceiling.py's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import long_video as lv  # noqa: E402  (benchmarks/ is not a package)
import vae_shape_ceiling  # noqa: E402


def read_shapes(videos: np.ndarray, captions) -> dict:
    """Scores of uint8 [N, F, R, R, 3] videos against their captions: the fraction with shape,
    colour and direction as asked and consistent, and per true shape its fraction read right
    and its fills' [min, median, max] (None where no fill was read)."""
    from pixeldance.data import synthetic
    from pixeldance.evaluators.synthetic import score_video
    truth = [synthetic.parse_caption(c)[0][1] for c in captions]
    scores = [score_video(v, c) for v, c in zip(videos, captions)]
    out = {k: float(np.mean([s[f"{k}_correct"] for s in scores])) for k in ("shape", "colour", "direction")}
    out["consistent"] = float(np.mean([s["consistent"] for s in scores]))
    fills = vae_shape_ceiling.fills_by_shape(videos, captions)
    for shape in sorted(set(truth)):
        mine = [i for i, t in enumerate(truth) if t == shape]
        out[shape] = dict(n=len(mine), read=float(np.mean([scores[i]["shape_correct"] for i in mine])),
                          fill=fills.get(shape))
    return out


def swap_distances(pipe, source, n: int) -> dict:
    """How far apart the shapes are where the DiT works: source's items 0..n-1 (one object each)
    drawn again as each shape (same colour, size, path and background), encoded, normalised by
    the workdir's latent statistics; the mean squared difference per pair of shapes, over every
    latent element. A pair whose latents differ little costs the DiT's loss little when it
    draws one for the other."""
    import itertools
    from pixeldance.data import synthetic
    cfg = source.config
    latents = {}
    for shape in synthetic.SHAPES:
        videos = []
        for i in range(n):
            _, objects, background = source.objects(i)
            videos.append(synthetic.render([dict(o, shape=shape) for o in objects], background,
                                           cfg.num_frames, cfg.resolution))
        videos = np.stack(videos)
        z = np.concatenate([pipe.vae.encode(videos[i:i + 8]) for i in range(0, n, 8)])
        latents[shape] = np.asarray(pipe.stats.normalise(z), np.float64)
    return {f"{a}-{b}": float(np.mean((latents[a] - latents[b]) ** 2))
            for a, b in itertools.combinations(sorted(synthetic.SHAPES), 2)}


def negative_captions(captions, negative: dict) -> list:
    """Per caption the negative prompt that guidance pushes away from: the same caption with its
    object's shape replaced by negative[shape], or None (the empty prompt) where negative names
    no replacement for that shape. One object per caption."""
    from pixeldance.data import synthetic
    out = []
    for c in captions:
        (colour, shape, direction), = synthetic.parse_caption(c)
        out.append(synthetic.caption([(colour, negative[shape], direction)]) if shape in negative else None)
    return out


def ddim_eta_step(x0, eps, t, t_next, noise, eta, path: str):
    """One DDIM step from time t to t_next < t on a Gaussian path, from the clean-sample and noise
    estimates x0, eps: alpha' x0 + sqrt(sigma'^2 - s^2) eps + s noise with s = eta times DDPM's
    posterior standard deviation (Song et al. 2021, eq. 16), clipped to sigma'. eta = 0 is the
    deterministic 'ddim' sampler's step; at t_next = 0 the step returns x0 for any eta."""
    import jax.numpy as jnp
    from pixeldance.diffusion import schedules
    a_t, s_t = schedules.alpha_sigma(t, path)
    a_n, s_n = schedules.alpha_sigma(t_next, path)
    ratio = (s_n ** 2 / jnp.maximum(s_t ** 2, 1e-12)) * (1.0 - a_t ** 2 / jnp.maximum(a_n ** 2, 1e-12))
    s = jnp.minimum(eta * jnp.sqrt(jnp.clip(ratio, 0.0, 1.0)), s_n)
    return a_n * x0 + jnp.sqrt(jnp.maximum(s_n ** 2 - s ** 2, 0.0)) * eps + s * noise


PIPELINE_MODES = ("i2v", "direct", "first_frame")


def pipeline_videos(pipe, mode: str, captions, first_frames, guidance: float, image_guidance: float,
                    batch: int = 16) -> np.ndarray:
    """uint8 [N, F, R, R, 3]: the captions sampled by `pipe.generate_batch` in `mode` ('i2v': with
    their first frames; else text alone by that `text_to_video` route), `batch` at a time."""
    out = []
    for i in range(0, len(captions), batch):
        caps = list(captions[i:i + batch])
        firsts = list(first_frames[i:i + batch]) if mode == "i2v" else [None] * len(caps)
        route = None if mode == "i2v" else mode
        out.append(pipe.generate_batch(caps, firsts, [None] * len(caps), seed=i, guidance=guidance,
                                       image_guidance=image_guidance, text_to_video=route))
    return np.concatenate(out)


def main(argv=None):
    from pixeldance import cli
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a trained workdir (VAE and DiT)")
    p.add_argument("--num_videos", type=int, default=64)
    p.add_argument("--levels", default="0.02,0.05,0.1,0.2,0.3,0.5,0.7", help="noise levels t in (0, 1) for 'denoise'")
    p.add_argument("--steps", default="8,32", help="sampling steps for 'sample' (comma list; '' skips)")
    p.add_argument("--guidance", type=float, default=None, help="text guidance (default: the workdir's config.sample)")
    p.add_argument("--image_guidance", type=float, default=None,
                   help="image-instruction guidance (default: the workdir's config.sample; 1: off)")
    p.add_argument("--pipeline_modes", default="", help="comma list of i2v, direct, first_frame: the "
                   "Pipeline's own sampling of the same captions ('' skips)")
    p.add_argument("--world_seed_offset", type=int, default=3000)
    p.add_argument("--negative", default="", help="'sample' only: comma list of shape:other (e.g. "
                   "square:circle): the captions naming that shape are guided against the same caption "
                   "with the other shape instead of the empty prompt (a negative prompt)")
    p.add_argument("--split", default="heldout", choices=("heldout", "train"),
                   help="the clips' colour-shape-direction combinations: held out of training, or trained on")
    p.add_argument("--output", default=None, help=".json to write (default: print only)")
    args = p.parse_args(argv)
    if args.num_videos < 1:
        raise ValueError(f"--num_videos must be >= 1, got {args.num_videos}")
    try:
        levels = [float(x) for x in args.levels.split(",") if x.strip()]
        steps_list = [int(x) for x in args.steps.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--levels must be numbers and --steps integers, got {args.levels!r} / {args.steps!r}") from None
    if not all(0.0 < t < 1.0 for t in levels):
        raise ValueError(f"--levels must lie in (0, 1), got {args.levels!r}")
    if not all(s >= 1 for s in steps_list):
        raise ValueError(f"--steps must be >= 1, got {args.steps!r}")
    modes = [m.strip() for m in args.pipeline_modes.split(",") if m.strip()]
    if not set(modes) <= set(PIPELINE_MODES):
        raise ValueError(f"--pipeline_modes must be a comma list of {', '.join(PIPELINE_MODES)}, got "
                         f"{args.pipeline_modes!r}")
    from pixeldance.data import synthetic
    try:
        negative = dict(pair.split(":") for pair in args.negative.split(",") if pair.strip())
    except ValueError:
        raise ValueError(f"--negative must be a comma list of shape:other, got {args.negative!r}") from None
    if not all(a in synthetic.SHAPES and b in synthetic.SHAPES and a != b for a, b in negative.items()):
        raise ValueError(f"--negative must pair two different shapes of {synthetic.SHAPES}, got {args.negative!r}")
    if args.image_guidance is not None and args.image_guidance < 1.0:
        raise ValueError(f"--image_guidance must be >= 1 (1: off), got {args.image_guidance}")

    import jax
    import jax.numpy as jnp
    from flax import linen as nn
    from pixeldance import rng as rng_lib, sharding
    from pixeldance.diffusion import conditioning, objectives, schedules
    from pixeldance.diffusion import guidance as guidance_lib

    start = time.time()
    pipe, _, _, _, _, items = lv.open_workdir(args.workdir, None, args.world_seed_offset, args.num_videos,
                                                split=args.split)
    N = args.num_videos
    videos = np.stack([items[i]["video"] for i in range(N)])
    captions = [items[i]["caption"] for i in range(N)]
    task, s = pipe.task, pipe.config.sample
    path = task.path
    if path == "flow":
        raise ValueError(f"{args.workdir}: a rectified-flow DiT; the DDIM probe needs a DDPM objective")
    z = jnp.asarray(pipe.stats.normalise(np.concatenate([pipe.vae.encode(videos[i:i + 8]) for i in range(0, N, 8)])))
    first = z[:, 0]
    text = pipe.text(captions)
    c_clean = jnp.zeros_like(z).at[:, 0].set(first)
    m_full = jnp.zeros(z.shape[:-1] + (1,), z.dtype).at[:, 0].set(1.0)

    def put_first(x):  # 'replace': the clean first latent, as training and sampling put it back
        return x.at[:, 0].set(first) if task.replace else x

    def decode(latents):
        lat = pipe.stats.denormalise(np.asarray(latents))
        return np.concatenate([pipe.vae.decode(lat[i:i + 8]) for i in range(0, N, 8)])

    guidance = float(s.guidance if args.guidance is None else args.guidance)
    image_guidance = float(s.image_guidance if args.image_guidance is None else args.image_guidance)
    branches = guidance_lib.num_branches(image_guidance)
    c_full = conditioning.noise_instructions(jax.random.key(11), c_clean, m_full, task.noise)
    null = pipe.text.null
    if negative:  # per caption: its negative prompt, or the empty prompt
        from pixeldance.models import text as text_lib
        negs = negative_captions(captions, negative)
        use_null = jnp.asarray([n is None for n in negs])
        null = text_lib.select_text(use_null, pipe.text([n or c for n, c in zip(negs, captions)]),
                                    text_lib.null_text(text, null))
    guided = task.denoiser(pipe.model, pipe.params, c_full, m_full, text, jnp.float32(guidance),
                           jnp.float32(image_guidance), jnp.int32(conditioning.ALWAYS), branches=branches,
                           null_text=null)

    @jax.jit
    def one_call(x_t, t):  # the unguided full branch, as training sees it
        return task.denoise(pipe.model.apply(pipe.params, x_t, t, c_clean, m_full, text), x_t, t)[0]

    @jax.jit
    def sample_step(x, t, t_next, key, eta):
        x0, v = guided(x, t, 0)
        return put_first(ddim_eta_step(x0, x0 + v, t, t_next, rng_lib.normal(key, x.shape), eta, path))

    result = dict(workdir=os.path.abspath(args.workdir), num_videos=N, split=args.split, captions=captions,
                  negative=negative, objective=task.objective, guidance=guidance,
                  image_guidance=image_guidance, shift=float(s.shift),
                  vae=read_shapes(decode(z), captions), denoise={}, sample={}, pipeline={},
                  latent_distance=swap_distances(pipe, items, N))
    eps = rng_lib.normal(jax.random.key(7), z.shape)
    with jax.set_mesh(pipe.mesh), nn.logical_axis_rules(sharding.rules("fsdp")):
        for t in levels:
            tv = jnp.full((N,), t, jnp.float32)
            x_t = put_first(objectives.add_noise(z, eps, tv, objective=task.objective))
            result["denoise"][f"{t:g}"] = read_shapes(decode(put_first(one_call(x_t, tv))), captions)
        for steps in steps_list:
            grid = np.asarray(schedules.time_grid(steps, float(s.shift), path))
            for eta in (0.0, 1.0):
                x = put_first(rng_lib.normal(jax.random.key(5), z.shape))
                for i in range(steps):
                    x = sample_step(x, jnp.float32(grid[i]), jnp.float32(grid[i + 1]),
                                    jax.random.fold_in(jax.random.key(6), i), jnp.float32(eta))
                result["sample"][f"steps{steps}_eta{eta:g}"] = read_shapes(decode(x), captions)
    for mode in modes:
        result["pipeline"][mode] = read_shapes(pipeline_videos(pipe, mode, captions, videos[:, 0], guidance,
                                                               image_guidance), captions)
    result["seconds"] = round(time.time() - start, 1)
    print(json.dumps(result))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    from pixeldance import cli as _cli
    _cli.one_line_errors(main)()
