r"""Smoothness of motion (issue 19): held-out synthetic clips, their VAE reconstructions and,
optionally, generated videos.

  python benchmarks/smoothness.py --workdir=workdirs/shapes \
      --output=benchmarks/results/smoothness_main_job_vae.json [--samples=workdirs/shapes/samples]

Per video the score is `pixeldance.evaluators.synthetic.smoothness_from_centroids`: the mean
centroid step (pixels between consecutive frames, where the object is visible in both) across
the VAE's latent-group boundaries over the mean step inside groups; 1.0 is even motion, and a VAE
that decodes each latent's frames nearly alike and jumps between latents scores above 1. The
group length is the workdir VAE's temporal_factor (`--group_frames` overrides it); the step out
of frame 0 (its own latent) counts as a boundary step. Reported per set: median, p90 and the count
of videos with a score (a still or invisible object has none), and per video the scores.

Sets:
  real            `--num_clips` held-out clips of the workdir's world (config.data, the clips the
                  'reconstruction' evaluator uses: world seed config.data.world_seed);
  reconstructions their VAE reconstructions (EMA weights of the newest usable checkpoint,
                  posterior mean), with each clip's PSNR;
  samples/<mode>  with `--samples`: the folder's `<mode>_<k>.mp4` (the 'faithfulness'
                  evaluator's files); `captions.txt` there, when present, gives line k's colours
                  to separate two objects (else all foreground is one object).

With `--latent_noise=0.1,0.2,0.4`, also 'noisy_reconstructions/<kind>_<sigma>': the held-out clips'
latents (posterior mean) plus Gaussian noise of sigma latent standard deviations per channel
(the workdir's latent_stats.json), decoded: 'iid' draws every latent value, 'shared' one draw per
clip repeated on every latent frame (an error that moves nothing in time). Whether the decoder
itself makes steps out of latents that are not quite the encoder's (issue 19: it does not).

Also, for reading the figure: the same ratio without the frame-0 step (boundaries 4 -> 5,
8 -> 9, ... only), and consecutive-frame PSNR across boundaries and inside groups (the issue's
27.1 dB against 32.6 for the reconstructions); and, for the still-object threshold
(synthetic.MIN_MEAN_STEP), 'still_reconstructions': each clip's first frame repeated F times,
reconstructed, its mean centroid step (decoder jitter) and how many clips would score.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import time

import numpy as np


def _ratio_without_first(centroids, g: int, min_step: float):
    """The smoothness ratio with the step out of frame 0 left out (None when undefined)."""
    from pixeldance.evaluators import synthetic as scoring
    steps = np.concatenate([scoring.centroid_steps(c)[1:] for c in centroids])
    across = np.concatenate([scoring.group_boundaries(len(c), g)[1:] for c in centroids])
    counted = ~np.isnan(steps)
    b, i = steps[counted & across], steps[counted & ~across]
    if b.size == 0 or i.size == 0 or steps[counted].mean() < min_step:
        return None
    return float(min(scoring.SMOOTHNESS_CAP, b.mean() / i.mean())) if i.mean() > 0 else scoring.SMOOTHNESS_CAP


def _consecutive_psnr(videos: np.ndarray, g: int) -> dict:
    """Mean PSNR (dB) between consecutive frames, across group boundaries and inside groups."""
    from pixeldance.evaluators import synthetic as scoring
    across = scoring.group_boundaries(videos.shape[1], g)
    values = np.array([[scoring.psnr(v[f], v[f + 1]) for f in range(len(v) - 1)] for v in videos])
    return dict(across=float(values[:, across].mean()), inside=float(values[:, ~across].mean()))


def score_set(videos, captions, g: int, min_step: float) -> dict:
    """Smoothness of a set of uint8 [F, R, R, 3] videos (captions: one per video, or None)."""
    from pixeldance.data import synthetic as world
    from pixeldance.evaluators import synthetic as scoring
    scores, without_first = [], []
    for k, video in enumerate(videos):
        colours = None if captions is None else [c for c, _, _ in world.parse_caption(captions[k])]
        found = [scoring.analyse_video(video)] if colours is None else scoring.analyse_objects(video, colours)
        centroids = [o["centroid"] for o in found]
        scores.append(scoring.smoothness_from_centroids(centroids, g, min_step))
        without_first.append(_ratio_without_first(centroids, g, min_step))
    out = dict(num_videos=len(videos), **scoring.smoothness_summary(scores))
    out["without_frame0_step"] = scoring.smoothness_summary(without_first)
    if len(videos) and len({v.shape for v in videos}) == 1:
        out["consecutive_psnr"] = _consecutive_psnr(np.stack(videos), g)
    out["per_video"] = [None if s is None else round(s, 4) for s in scores]
    return out


def noisy_reconstructions(vae, videos, captions, std, sigmas, g: int, min_step: float, batch_size: int,
                          seed: int = 0) -> dict:
    """{'noisy_reconstructions/<kind>_<sigma>': score_set + psnr} (see the module docstring).
    videos uint8 [N, F, H, W, 3]; std float [C], the latents' per-channel std."""
    from pixeldance.evaluators import synthetic as scoring
    z = np.concatenate([vae.encode(videos[i:i + batch_size]) for i in range(0, len(videos), batch_size)])
    rng = np.random.default_rng(seed)
    out = {}
    for kind in ("iid", "shared"):
        for sigma in sigmas:
            shape = z.shape if kind == "iid" else (z.shape[0], 1, *z.shape[2:])
            noise = np.broadcast_to(rng.standard_normal(shape, dtype=np.float32), z.shape)
            noisy = z + np.float32(sigma) * std * noise
            recon = np.concatenate([vae.decode(noisy[i:i + batch_size]) for i in range(0, len(z), batch_size)])
            out[f"noisy_reconstructions/{kind}_{sigma:g}"] = dict(
                score_set(recon, captions, g, min_step), sigma=sigma, kind=kind,
                psnr=float(np.mean([scoring.psnr(a, b) for a, b in zip(recon, videos)])))
    return out


def _sample_sets(folder: str) -> dict:
    """{mode: (videos, captions or None)} from a folder of `<mode>_<k>.mp4`."""
    from pixeldance.data import video_io
    paths = glob.glob(os.path.join(folder, "*.mp4"))
    if not paths:
        raise FileNotFoundError(f"no .mp4 videos in --samples folder {folder}")
    captions = None
    if os.path.exists(os.path.join(folder, "captions.txt")):
        with open(os.path.join(folder, "captions.txt")) as f:
            captions = [line.split("  [")[0].strip() for line in f if line.strip()]
    sets = {}
    for path in paths:
        m = re.fullmatch(r"(.+)_(\d+)\.mp4", os.path.basename(path))
        if not m:
            continue
        sets.setdefault(m.group(1), []).append((int(m.group(2)), path))
    out = {}
    for mode, entries in sorted(sets.items()):
        entries.sort()
        have = captions is not None and all(k < len(captions) for k, _ in entries)
        out[mode] = ([video_io.read_video(p) for _, p in entries],
                     [captions[k] for k, _ in entries] if have else None,
                     [os.path.basename(p) for _, p in entries])
    return out


def main(argv=None):
    from pixeldance import cli
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a workdir with a trained VAE (vae/, vae_model.json)")
    p.add_argument("--samples", default=None, help="a folder of generated <mode>_<k>.mp4 to score too")
    p.add_argument("--num_clips", type=int, default=48, help="held-out clips")
    p.add_argument("--group_frames", type=int, default=0, help="latent group length (default: the VAE's temporal_factor)")
    p.add_argument("--min_mean_step", type=float, default=None, help="pixels/frame (default: the evaluator's)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--latent_noise", default="", help="comma-separated sigmas (latent stds) for noisy_reconstructions")
    p.add_argument("--output", default=None, help="JSON file to write (e.g. benchmarks/results/smoothness.json)")
    args = p.parse_args(argv)
    run(args)


def run(args):
    if args.num_clips < 1:
        raise ValueError(f"--num_clips must be >= 1, got {args.num_clips}")
    if args.group_frames < 0:
        raise ValueError(f"--group_frames must be >= 1 (0: the VAE's), got {args.group_frames}")
    sigmas = [float(x) for x in args.latent_noise.split(",") if x.strip()]
    if any(not np.isfinite(x) or x < 0 for x in sigmas):
        raise ValueError(f"--latent_noise takes finite sigmas >= 0, got {args.latent_noise!r}")
    if args.samples and not os.path.isdir(args.samples):
        raise FileNotFoundError(f"--samples folder not found: {args.samples}")
    import jax
    from pixeldance import sample
    from pixeldance import workdir as workdir_lib
    from pixeldance.data import sources
    from pixeldance.evaluators import reconstruction
    from pixeldance.evaluators import synthetic as scoring

    config = workdir_lib.read_config(args.workdir)
    if config.data.get("name", "shapes") != "shapes":
        raise ValueError(f"smoothness scores the synthetic world only, not config.data.name={config.data.name!r}")
    vae = sample.load_vae(args.workdir)
    g = args.group_frames or vae.model.temporal_factor
    min_step = scoring.MIN_MEAN_STEP if args.min_mean_step is None else args.min_mean_step
    source = sources.make_source(config, "heldout", size=args.num_clips)
    items = [source[i] for i in range(args.num_clips)]
    videos = np.stack([it["video"] for it in items])
    captions = [it["caption"] for it in items]
    start = time.time()
    out = reconstruction.reconstruct(vae, videos, batch_size=args.batch_size)
    seconds = time.time() - start
    sets = dict(real=score_set(videos, captions, g, min_step),
                reconstructions=score_set(out["recon"], captions, g, min_step))
    still = np.repeat(videos[:, :1], videos.shape[1], axis=1)
    still_recon = reconstruction.reconstruct(vae, still, batch_size=args.batch_size)["recon"]
    jitter = np.array([np.nanmean(scoring.centroid_steps(scoring.analyse_video(v)["centroid"]))
                       for v in still_recon])
    sets["still_reconstructions"] = dict(
        num_videos=len(still), **scoring.smoothness_summary(scoring.smoothness_scores(still_recon, captions, g, min_step)),
        mean_step_px=dict(median=float(np.nanmedian(jitter)), p90=float(np.nanpercentile(jitter, 90)),
                          max=float(np.nanmax(jitter))),
        unthresholded=scoring.smoothness_summary(scoring.smoothness_scores(still_recon, captions, g, 0.0)))
    sets["reconstructions"]["psnr"] = float(out["psnr"].mean())
    sets["reconstructions"]["psnr_per_video"] = np.round(out["psnr"], 2).tolist()
    if sigmas:
        std = workdir_lib.LatentStats.read(args.workdir).std
        sets.update(noisy_reconstructions(vae, videos, captions, std, sigmas, g, min_step, args.batch_size))
    if args.samples:
        for mode, (vids, caps, names) in _sample_sets(args.samples).items():
            sets[f"samples/{mode}"] = dict(score_set(vids, caps, g, min_step), files=names,
                                           captions="captions.txt" if caps else "none: all foreground as one object")
    step = workdir_lib.latest_step(os.path.join(args.workdir, workdir_lib.VAE_DIR))
    result = dict(benchmark="smoothness", date=time.strftime("%Y-%m-%d %H:%M"), workdir=args.workdir,
                  vae_step=step, vae=workdir_lib.read_model_spec(args.workdir), vae_config=config.vae.to_dict(),
                  world=dict(num_frames=config.data.num_frames, resolution=config.data.resolution,
                             num_objects=config.data.num_objects, world_seed=config.data.world_seed,
                             split="heldout"),
                  group_frames=g, min_mean_step=min_step, smoothness_cap=scoring.SMOOTHNESS_CAP,
                  definition=("per video: mean centroid step across latent-group boundaries (steps f -> f+1 "
                              "with f+1 = 1 mod g, the step out of frame 0 included) over the mean step inside "
                              "groups, steps where the object is visible in both frames; None when either kind "
                              "has no step or the mean step < min_mean_step; per set median and p90 (numpy "
                              "linear) over the videos with a score"),
                  reconstruct_seconds=round(seconds, 2), jax=jax.__version__, sets=sets)
    for name, s in sets.items():
        med, p90 = s["smoothness_median"], s["smoothness_p90"]
        text = "no score" if med is None else f"median {med:.2f}, p90 {p90:.2f}"
        print(f"{name}: {text} ({s['smoothness_n']} of {s['num_videos']} scored)", flush=True)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    from pixeldance import cli as _cli
    _cli.one_line_errors(main)()
