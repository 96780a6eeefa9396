r"""FVD / FID of a workdir's VAE reconstructions: the floor a DiT trained on that VAE's latents
cannot go below (issue 15: why Table 3's FVD level moved between two sets of defaults).

  python benchmarks/fvd_vae_ceiling.py --workdir=workdirs/shapes --networks=ROOT \
      --metrics=fvd,fid --num_videos=256 --output=benchmarks/results/fvd_vae_ceiling.json

The reconstructed clips are the protocol's real items 0..N-1 (posterior mean, EMA weights of the
newest usable VAE checkpoint, `evaluators.reconstruction.reconstruct`): the same items whose
first and last frames `python -m pixeldance.evaluate --num_generated=N` conditions on, scored
against the same real statistics (all `num_real` items, cached per protocol), so a generated row
and this one differ only by what the DiT adds. The reconstructions are written as mp4 (the
evaluator's frame rate and codec, so they pass the same encode / decode as generated videos)
under `<workdir>/eval/<protocol>/vae_reconstructions/`, kept between runs.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def main(argv=None):
    from pixeldance import cli
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a workdir with a trained VAE (vae/, vae_model.json)")
    p.add_argument("--networks", required=True, help="root of the converted feature networks (i3d/, inception/)")
    p.add_argument("--protocol", default="shapes_17f")
    p.add_argument("--metrics", default="fvd", help="comma-separated: fvd, fid")
    p.add_argument("--num_videos", type=int, default=256, help="real items reconstructed (0..N-1)")
    p.add_argument("--stats_dir", default="", help="real-statistics cache (default: the evaluator's)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--output", default=None, help="JSON file to write")
    return run(p.parse_args(argv))


def run(args) -> dict:
    from pixeldance import evaluate, sample
    from pixeldance import workdir as workdir_lib
    from pixeldance.data import video_io
    from pixeldance.evaluators import metrics as metrics_eval
    from pixeldance.evaluators import reconstruction
    from pixeldance.metrics import suite
    from pixeldance.tools import metrics as metrics_tool

    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    bad = [m for m in metrics if m not in suite.FRECHET]
    if bad or not metrics:
        raise ValueError(f"--metrics takes {', '.join(suite.FRECHET)}, got {args.metrics!r}")
    if args.num_videos < 2:
        raise ValueError(f"--num_videos must be >= 2 (a covariance needs two), got {args.num_videos}")
    config = workdir_lib.read_config(args.workdir)
    evaluator = metrics_eval.ProtocolMetrics(config, args.protocol, root=args.networks,
                                             stats_dir=args.stats_dir or None,
                                             num_generated=args.num_videos, metrics=metrics)
    protocol = evaluator.protocol
    source = metrics_eval.real_source(config, protocol)
    if args.num_videos > len(source):
        raise ValueError(f"--num_videos {args.num_videos} > the protocol's {len(source)} real items")
    folder = os.path.join(args.workdir, evaluate.EVAL_DIR, protocol.name)
    out_dir = os.path.join(folder, "vae_reconstructions")
    os.makedirs(out_dir, exist_ok=True)
    names = [metrics_eval.video_name(i) for i in range(args.num_videos)]
    vae = sample.load_vae(args.workdir)
    start = time.time()
    psnrs = []
    for lo in range(0, args.num_videos, args.batch_size):
        batch = names[lo:lo + args.batch_size]
        if all(os.path.exists(os.path.join(out_dir, n)) for n in batch):
            continue  # an earlier run wrote them (same VAE checkpoint: see vae_step in the output)
        videos = np.stack([source[i]["video"] for i in range(lo, lo + len(batch))])
        rec = reconstruction.reconstruct(vae, videos, batch_size=args.batch_size)
        psnrs.extend(rec["psnr"].tolist())
        for n, video in zip(batch, rec["recon"]):
            video_io.write_mp4(os.path.join(out_dir, n), video, fps=metrics_eval.fps_of(protocol))
    reconstruct_seconds = time.time() - start
    extractor = suite.Extractor(protocol, metrics, evaluator.root)
    ref = suite.real_stats(extractor, lambda: evaluator.write_real(os.path.join(folder, "real"), source),
                           stats_dir=evaluator.stats_dir, batch_size=8, fingerprint=evaluator.real_key())
    report = suite.score_generated(extractor, out_dir, ref, captions=None, batch_size=8, names=names)
    step = workdir_lib.latest_step(os.path.join(args.workdir, workdir_lib.VAE_DIR))
    result = dict(benchmark="fvd_vae_ceiling", date=time.strftime("%Y-%m-%d %H:%M"), workdir=args.workdir,
                  vae_step=step, real_key=evaluator.real_key(),
                  reconstructed="the protocol's real items 0..N-1, posterior mean, written as mp4",
                  psnr_this_run=float(np.mean(psnrs)) if psnrs else None,
                  reconstruct_seconds=round(reconstruct_seconds, 1), **report)
    print(json.dumps({k: result[k] for k in (*metrics, "num_generated", "protocol")}))
    if args.output:
        metrics_tool.write_json(args.output, result)
        print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    from pixeldance import cli as _cli
    _cli.one_line_errors(main)()
