r"""Long videos on the synthetic world: 64-clip stories, faithfulness and FVD per clip index,
re-encoding against continuation in latent space, and keyframe adherence, on a trained workdir.

  python benchmarks/long_video.py --workdir=workdirs/shapes_keyframes --networks=ROOT \
      --num_videos=8 --num_clips=64 --continuation=reencode,latent \
      --output=benchmarks/results/long_video.json

Each video starts from the first frame of a held-out synthetic clip (world seed +
`--world_seed_offset`, a seed neither training (+0) nor the evaluation stage (+1000) uses) and
follows per-clip prompts that keep the object inside the frame: the clip's own caption for even
clips and the opposite direction for odd ones (right, left, right, ...). Every continuation mode
in `--continuation` makes the same videos (same first frames, prompts and seeds) with
`Pipeline.generate_clips`:
  reencode  clip k + 1's first-frame instruction is clip k's last decoded frame, encoded again
            (PixelDance's long videos): F + (n - 1)(F - 1) frames;
  latent    clip k + 1 continues from clip k's last K latent frames (`--context_latents`,
            default the workdir's config.cond.context_frames), clean, and the whole latent
            video is decoded once, causally: F + (n - 1) 4(T - K) frames.
Clip k is scored on the F frames that end with its last frame (for re-encoding exactly clip k;
in latent space its new frames and the context before them). Because a re-encoded clip's own
frames never contain a boundary, every boundary is also scored on the F frames centred on it
(`boundary_frames`; colour, shape and consistency against the later clip's prompt, direction
left out: it reverses there): an object that changes size or colour at a boundary fails there.

Reported per mode and clip index k (fractions over the videos): colour kept, shape kept,
direction as asked, consistency (the synthetic-world evaluator against clip k's prompt); the
same averaged over the last 8 clips; what shape each true shape is read as, at clip 0 and over
the second half of the clips (`shape_confusion`: a DiT that rounds squares reads them as
circles); per 16-frame window, FVD against `--num_real` real 16-frame
windows with the real I3D (`--networks`, README "Feature networks"; `--networks=none` skips it),
and pooled over `--group` windows (few videos make one window's FVD rank-deficient and noisy).
With both modes: per clip index, latent minus re-encode for each score, and at how many clip
indices latent is at or above re-encoding.
The VAE's ceiling (`--ceiling_videos` real held-out clips encoded and decoded, scored against
their captions): what the decoder lets the evaluator read at best, beside which the per-clip
scores are read (the shape of a 13-16 px object at 64 px does not survive the main job's VAE);
and over long streams (up to 16 of them read `--ceiling_long_frames` frames, encoded and decoded
whole, scored on F-frame windows): whether one causal decode of a long video keeps the object.
Keyframe adherence (`--keyframe_videos` held-out clips, 0 skips): from the clip's first frame
and the real frame at pixel 4k as a middle keyframe (k = 1 .. T - 2, one at a time), PSNR of
the generated frame 4k against it, beside the same frame's PSNR from the first frame alone.
A PNG plot (`--output` with .png) shows the scores per clip and FVD per window for each mode.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
WINDOW = 16


def clip_prompts(caption: str, num_clips: int) -> list[str]:
    """The item's caption for even clips, the opposite direction for odd ones."""
    from pixeldance.data import synthetic
    (colour, shape, direction), = synthetic.parse_caption(caption)
    return [synthetic.caption([(colour, shape, direction if k % 2 == 0 else OPPOSITE[direction])])
            for k in range(num_clips)]


def clip_frames(video: np.ndarray, k: int, F: int, step: int | None = None) -> np.ndarray:
    """The F frames of a long video that end with clip k's last frame: clip 0 is frames 0..F-1
    and each later clip adds `step` frames (F - 1, the default, when clip k starts on clip
    k - 1's last frame; 4(T - K) in latent space)."""
    step = F - 1 if step is None else step
    end = F + k * step
    return video[end - F:end]


def boundary_frames(video: np.ndarray, k: int, F: int, step: int) -> np.ndarray:
    """The F frames centred on the boundary before clip k >= 1, whose first new frame is
    F + (k - 1) step: frames from F // 2 before it (clip_frames' layout)."""
    first_new = F + (k - 1) * step
    return video[first_new - F // 2:first_new - F // 2 + F]


def frames_per_clip(mode: str, F: int, T: int, K: int) -> int:
    """New frames each clip after the first adds: F - 1 re-encoding, 4(T - K) in latent space
    (a causal VAE's F = 1 + 4(T - 1))."""
    return F - 1 if mode == "reencode" else (F - 1) // (T - 1) * (T - K)


def open_workdir(workdir: str, context_latents: int | None, world_seed_offset: int, size: int,
                 split: str = "heldout"):
    """(pipe, F, T, K, world, items): the trained pipeline, its clip's frames and latent frames,
    K (config.cond.context_frames unless given), and `size` items of the synthetic world's
    `split` ('heldout' combinations, or 'train': those the DiT was trained on) at seed +
    world_seed_offset."""
    import pixeldance
    from pixeldance.data import synthetic

    pipe = pixeldance.load_pipeline(workdir)
    F = pipe.num_frames
    T = pipe.vae.latent_shape(F, pipe.resolution, pipe.resolution)[0]
    K = pipe.config.cond.get("context_frames", 1) if context_latents is None else context_latents
    world = synthetic.world_config(pipe.config)
    world = synthetic.WorldConfig(**{**world.__dict__, "seed": world.seed + world_seed_offset})
    return pipe, F, T, K, world, synthetic.ShapesSource(split, size=size, config=world)


def windows(video: np.ndarray, size: int = WINDOW) -> np.ndarray:
    """uint8 [F_total, R, R, 3] -> [J, size, R, R, 3], the whole windows from frame 0."""
    J = len(video) // size
    return video[:J * size].reshape((J, size) + video.shape[1:])


def fvd(logits_real: np.ndarray, logits_gen: np.ndarray) -> float:
    from pixeldance.metrics import scores
    return scores.frechet_distance(logits_real.mean(0), np.cov(logits_real, rowvar=False),
                                   logits_gen.mean(0), np.cov(logits_gen, rowvar=False))


SCORES = (("colour", "colour_correct"), ("shape", "shape_correct"), ("direction", "direction_correct"),
          ("consistent", "consistent"))


def per_clip_fractions(scores_k: list[list[dict]], names=None) -> dict:
    """scores_k[k]: score_video dicts of clip k over the videos -> {name: [fraction per clip]}
    for the SCORES named in `names` (None: all)."""
    return {name: [float(np.mean([s[key] for s in clip])) for clip in scores_k] for name, key in SCORES
            if names is None or name in names}


def shape_confusion(scores_k: list[list[dict]], true_shapes: list[str]) -> dict:
    """{true shape: {read shape: fraction}} over the clips and videos of scores_k[k][v] (video v's
    true shape true_shapes[v]; 'none' where no object or no fill was read): which shapes a model
    fails to keep, and what the evaluator reads them as."""
    counts = {}
    for clip in scores_k:
        for s, true in zip(clip, true_shapes):
            read = s["predicted_shapes"][0] if s["predicted_shapes"] and s["predicted_shapes"][0] else "none"
            counts.setdefault(true, {}).setdefault(read, 0)
            counts[true][read] += 1
    return {t: {r: n / sum(c.values()) for r, n in sorted(c.items())} for t, c in sorted(counts.items())}


def compare(latent: dict, reencode: dict) -> dict:
    """Per score: latent minus re-encode per clip index, and the clip indices where latent is
    at or above re-encoding (out of all)."""
    out = {}
    for name in latent:
        diff = [a - b for a, b in zip(latent[name], reencode[name])]
        out[name] = dict(latent_minus_reencode=diff, at_or_above=int(sum(d >= 0 for d in diff)),
                         clips=len(diff))
    return out


BOUNDARY_SCORES = ("colour", "shape", "consistent")  # direction reverses at every boundary
MODE_SHADES = {"latent": 1.0, "reencode": 0.45}  # re-encoding drawn in paler lines


def plot(path: str, per_mode: dict, width: int = 900, height: int = 560):
    """Two panels drawn with Pillow: scores per clip (top), FVD per window (bottom), one line
    per score and continuation mode. per_mode[mode] = dict(per_clip, fvd_per_window, F, step)."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    left, right = 60, width - 20
    total = max(max(len(next(iter(m["per_clip"].values()))) * m["step"] + m["F"],
                    len(m["fvd_per_window"]) * WINDOW) for m in per_mode.values())
    fvd_max = max([v for m in per_mode.values() for v in m["fvd_per_window"]] + [1.0]) * 1.05

    def x_of(frame):
        return left + (right - left) * frame / total

    panels = [(20, height // 2 - 30, 0.0, 1.0, "scores per clip (paler: re-encoding)"),
              (height // 2 + 10, height - 40, 0.0, fvd_max, "FVD per 16 frames")]
    for top, bottom, lo, hi, title in panels:
        d.rectangle([left, top, right, bottom], outline="black")
        d.text((left + 5, top + 3), title, fill="black")
        d.text((5, top), f"{hi:.3g}", fill="black")
        d.text((5, bottom - 10), f"{lo:.3g}", fill="black")
    colours = {"colour": (220, 40, 40), "shape": (230, 150, 20), "direction": (40, 120, 220),
               "consistent": (40, 160, 60), "fvd": (120, 40, 160)}

    def shade(rgb, mode):
        a = MODE_SHADES.get(mode, 1.0)
        return tuple(int(255 - a * (255 - c)) for c in rgb)

    for row, (mode, m) in enumerate(per_mode.items()):
        top, bottom = panels[0][:2]
        for i, (name, values) in enumerate(m["per_clip"].items()):
            pts = [(x_of(k * m["step"] + m["F"] / 2), bottom - (bottom - top) * v) for k, v in enumerate(values)]
            if len(pts) > 1:
                d.line(pts, fill=shade(colours[name], mode), width=2)
            d.text((right - 220 + 110 * row, top + 5 + 12 * i), f"{name} {mode}", fill=shade(colours[name], mode))
        top, bottom, lo, hi, _ = panels[1]
        pts = [(x_of(j * WINDOW + WINDOW / 2), bottom - (bottom - top) * (v - lo) / (hi - lo))
               for j, v in enumerate(m["fvd_per_window"])]
        if len(pts) > 1:
            d.line(pts, fill=shade(colours["fvd"], mode), width=2)
        d.text((right - 220 + 110 * row, top + 5), f"fvd {mode}", fill=shade(colours["fvd"], mode))
    d.text((left, height - 20), f"frame 0 .. {total}", fill="black")
    im.save(path)


def keyframe_adherence(pipe, items, num_videos: int, seed: int = 0) -> dict:
    """{pixel 4k: dict(with_keyframe, first_frame_only)}: mean PSNR (dB) of generated frame 4k
    against the real clip's frame 4k, given as a middle keyframe beside the first frame, and
    from the first frame alone (k = 1 .. T - 2), over `num_videos` held-out clips."""
    from pixeldance.evaluators.synthetic import psnr
    F = pipe.num_frames
    T = pipe.vae.latent_shape(F, pipe.resolution, pipe.resolution)[0]
    tf = (F - 1) // (T - 1)
    videos = [items[v]["video"] for v in range(num_videos)]
    prompts, firsts = [items[v]["caption"] for v in range(num_videos)], [v[0] for v in videos]
    plain = pipe.generate_batch(prompts, firsts, seed=seed)  # the same noise with and without
    out = {}
    for k in range(1, T - 1):
        p = tf * k
        given = pipe.generate_batch(prompts, firsts, keyframes=[{p: v[p]} for v in videos], seed=seed)
        out[str(p)] = dict(with_keyframe=float(np.mean([psnr(g[p], v[p]) for g, v in zip(given, videos)])),
                           first_frame_only=float(np.mean([psnr(g[p], v[p]) for g, v in zip(plain, videos)])))
    return out


def vae_ceiling(pipe, items, num: int) -> dict:
    """{score: fraction} of `num` real held-out clips passed through the VAE (encode, decode) and
    scored against their own captions: what the decoder lets the evaluator read at best (the
    main job's VAE blurs a 13-16 px square or triangle towards a disc at 64 px)."""
    recon = reconstruct(pipe.vae, np.stack([items[i]["video"] for i in range(num)]))
    return ceiling_scores(recon, [items[i]["caption"] for i in range(num)])


def reconstruct(vae, videos: np.ndarray) -> np.ndarray:
    """uint8 [N, F, R, R, 3] -> the same encoded and decoded by `vae`, 8 videos at a time."""
    return np.concatenate([vae.decode(vae.encode(videos[i:i + 8])) for i in range(0, len(videos), 8)])


def ceiling_scores(recon: np.ndarray, captions) -> dict:
    """{score: fraction} of reconstructions scored against their own captions."""
    from pixeldance.evaluators.synthetic import score_video
    scores = [score_video(v, c) for v, c in zip(recon, captions)]
    return {name: float(np.mean([s[key] for s in scores])) for name, key in SCORES}


def vae_long_ceiling(pipe, world, num: int, num_frames: int) -> dict:
    """The same over long streams: `num` real held-out items of `world` read `num_frames` frames
    (the same paths, slower), each encoded and decoded whole by the causal VAE, then scored on
    its F-frame windows every F - 1 frames (colour, shape, consistency: what latent continuation
    could keep at best over a long decode). Returns {score: fraction}, windows."""
    from pixeldance.data import synthetic
    from pixeldance.evaluators.synthetic import score_video
    F = pipe.num_frames
    longer = synthetic.ShapesSource("heldout", size=num, config=synthetic.WorldConfig(
        **{**world.__dict__, "num_frames": num_frames}))
    scores = []
    for i in range(num):
        item = longer[i]
        recon = pipe.vae.decode(pipe.vae.encode(item["video"][None]))[0]
        scores += [score_video(recon[s:s + F], item["caption"]) for s in range(0, num_frames - F + 1, F - 1)]
    out = {name: float(np.mean([s[key] for s in scores])) for name, key in SCORES if name in BOUNDARY_SCORES}
    return dict(out, windows=len(scores), num_frames=num_frames)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--networks", default=None, help="root of the converted feature networks, or 'none'")
    parser.add_argument("--num_videos", type=int, default=8)
    parser.add_argument("--num_clips", type=int, default=64)
    parser.add_argument("--continuation", default="reencode,latent", help="comma list of reencode, latent")
    parser.add_argument("--context_latents", type=int, default=None)
    parser.add_argument("--num_real", type=int, default=256)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--keyframe_videos", type=int, default=16)
    parser.add_argument("--ceiling_videos", type=int, default=64, help="real clips through the VAE (0 skips)")
    parser.add_argument("--ceiling_long_frames", type=int, default=129,
                        help="frames of the long real streams of the VAE's long ceiling (1 + 4k; 0 skips)")
    parser.add_argument("--world_seed_offset", type=int, default=3000)
    parser.add_argument("--guidance", type=float, default=None, help="text guidance (default: the workdir's config.sample)")
    parser.add_argument("--image_guidance", type=float, default=None,
                        help="image guidance (default: the workdir's config.sample); 1 samples without the none branch")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the workdir's config.sample)")
    parser.add_argument("--shift", type=float, default=None, help="time shift (default: the workdir's config.sample)")
    parser.add_argument("--guidance_rescale", type=float, default=None,
                        help="guidance rescale in [0, 1] (default: the workdir's config.sample, else 0)")
    parser.add_argument("--output", required=True, help=".json (a .png of the same name is written too)")
    args = parser.parse_args()
    modes = [m.strip() for m in args.continuation.split(",") if m.strip()]
    if not modes or any(m not in ("reencode", "latent") for m in modes):
        parser.error(f"--continuation must list reencode and/or latent, got {args.continuation!r}")

    from pixeldance.data import synthetic
    from pixeldance.evaluators.synthetic import score_video
    from pixeldance.metrics import networks

    start = time.time()
    pipe, F, T, K, world, items = open_workdir(args.workdir, args.context_latents, args.world_seed_offset,
                                               max(args.num_videos, args.num_real, args.keyframe_videos,
                                                   args.ceiling_videos))
    with pipe.config.unlocked():  # the Pipeline reads these per call (its compiled samplers are keyed on them)
        if args.shift is not None:
            pipe.config.sample.shift = args.shift
        if args.guidance_rescale is not None:
            pipe.config.sample.guidance_rescale = args.guidance_rescale
    i3d = None
    if args.networks != "none":
        i3d = networks.load("i3d", args.networks or networks.default_root(), pipe.mesh)
        real = np.stack([items[i]["video"][:WINDOW] for i in range(args.num_real)])
        real_logits = np.concatenate([i3d(real[i:i + 16])["logits"] for i in range(0, len(real), 16)])

    true_shapes = [synthetic.parse_caption(items[v]["caption"])[0][1] for v in range(args.num_videos)]
    per_mode = {}
    for mode in modes:
        step = frames_per_clip(mode, F, T, K)
        scores_k = [[] for _ in range(args.num_clips)]
        scores_b = [[] for _ in range(args.num_clips - 1)]
        gen_windows, t_mode = [], time.time()
        extra = dict(guidance=args.guidance, image_guidance=args.image_guidance, steps=args.steps)
        if mode == "latent":
            extra.update(continuation="latent", context_latents=K)
        for v in range(args.num_videos):
            item = items[v]
            prompts = clip_prompts(item["caption"], args.num_clips)
            video = np.concatenate(list(pipe.generate_clips(prompts, item["video"][0], num_clips=args.num_clips,
                                                            seed=v, **extra)))
            assert len(video) == F + (args.num_clips - 1) * step, (mode, len(video))
            for k in range(args.num_clips):
                scores_k[k].append(score_video(clip_frames(video, k, F, step), prompts[k]))
            for k in range(1, args.num_clips):
                scores_b[k - 1].append(score_video(boundary_frames(video, k, F, step), prompts[k]))
            gen_windows.append(windows(video))
            print(f"{mode} video {v + 1}/{args.num_videos}: {len(video)} frames ({time.time() - start:.0f} s)",
                  flush=True)
        per_clip = per_clip_fractions(scores_k)
        per_boundary = per_clip_fractions(scores_b, BOUNDARY_SCORES)
        half = len(per_boundary["colour"]) // 2
        m = dict(frames_per_video=int(F + (args.num_clips - 1) * step), step=step, F=F, per_clip=per_clip,
                 per_boundary=per_boundary,
                 boundaries_second_half={n: float(np.mean(v[half:])) for n, v in per_boundary.items()},
                 last_8_clips={n: float(np.mean(v[-8:])) for n, v in per_clip.items()},
                 at_last_clip={n: v[-1] for n, v in per_clip.items()},
                 true_shapes=true_shapes, shape_read_first_clip=shape_confusion(scores_k[:1], true_shapes),
                 shape_read_second_half=shape_confusion(scores_k[args.num_clips // 2:], true_shapes),
                 generate_seconds=round(time.time() - t_mode, 1), fvd_per_window=[], fvd_per_group=[])
        if i3d is not None:
            gw = np.stack(gen_windows)  # [num_videos, J, 16, R, R, 3]
            J = gw.shape[1]
            gen_logits = np.stack([i3d(gw[:, j])["logits"] for j in range(J)])  # [J, num_videos, 400]
            m["fvd_per_window"] = [fvd(real_logits, gen_logits[j]) for j in range(J)]
            m["fvd_per_group"] = [fvd(real_logits, gen_logits[j:j + args.group].reshape(-1, gen_logits.shape[-1]))
                                  for j in range(0, J - args.group + 1, args.group)]
        per_mode[mode] = m
    result = dict(
        workdir=os.path.abspath(args.workdir), dit_step=pipe.step,
        guidance=pipe.config.sample.guidance if args.guidance is None else args.guidance, num_videos=args.num_videos,
        image_guidance=pipe.config.sample.image_guidance if args.image_guidance is None else args.image_guidance,
        steps=pipe.config.sample.steps if args.steps is None else args.steps,
        shift=pipe.config.sample.get("shift", 1.0),
        guidance_rescale=pipe.config.sample.get("guidance_rescale", 0.0),
        num_clips=args.num_clips, context_latents=K, latent_frames=T, num_real_windows=args.num_real,
        group=args.group, i3d_sha256=None if i3d is None else i3d.sha256, modes=per_mode)
    if "latent" in per_mode and "reencode" in per_mode:
        result["latent_vs_reencode"] = compare(per_mode["latent"]["per_clip"], per_mode["reencode"]["per_clip"])
        result["latent_vs_reencode_boundaries"] = compare(per_mode["latent"]["per_boundary"],
                                                          per_mode["reencode"]["per_boundary"])
    if args.ceiling_videos:
        result["vae_ceiling"] = vae_ceiling(pipe, items, args.ceiling_videos)
        if args.ceiling_long_frames:
            result["vae_ceiling_long"] = vae_long_ceiling(pipe, world, min(args.ceiling_videos, 16),
                                                          args.ceiling_long_frames)
    if args.keyframe_videos:
        result["keyframe_psnr"] = keyframe_adherence(pipe, items, args.keyframe_videos)
    result["seconds"] = round(time.time() - start, 1)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    png = os.path.splitext(args.output)[0] + ".png"
    plot(png, per_mode)
    print(json.dumps({mode: dict(at_last_clip=m["at_last_clip"], last_8_clips=m["last_8_clips"],
                                 fvd_per_group=m["fvd_per_group"]) for mode, m in per_mode.items()}))
    print(f"wrote {args.output} and {png}")


if __name__ == "__main__":
    main()
