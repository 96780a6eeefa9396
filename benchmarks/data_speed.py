r"""Data-loading speed: video decoding with grain worker processes, and the latent cache.

  nice -n 5 python benchmarks/data_speed.py --output=benchmarks/results/data_speed.jsonl
  python benchmarks/data_speed.py --tiny            # a seconds-long check that both run

Writes a folder of mp4s into a temporary directory first (shapes-world clips, `--video_size`
pixels square, `--video_frames` frames, H.264 via `pixeldance.data.video_io.write_mp4`, with a
captions.csv), then measures:

  decode  clips per second read from the folder by `VideoFolderSource` (PyAV decode, resize to
          the config's resolution, random crop, random window of its num_frames) through the
          grain pipeline the trainers use (`pipeline.make_batches`): with `--workers` grain worker
          processes, against one process, both as `make_batches` with num_workers=0 runs it
          (grain's default prefetch threads: `speedup`) and as a plain loop reading one batch
          after the other (`speedup_vs_sequential`, the single-core baseline). Target on 2
          cores: speedup >= 1.8 with 2 workers.
  dit     DiT training steps per second (the config's DiT, randomly initialised, the real
          `trainers.dit.train_setup`'s loss and `train_lib.make_train_step`, async dispatch as in
          `train_lib.train_loop`)
          fed from the latent cache (`LatentCacheSource` over ArrayRecord shards that this script
          first writes with a randomly initialised VAE of the config) against decoding the folder
          and VAE-encoding every batch on the fly (video and last frames, as the cache stage
          does). Target: speedup >= 5. Weights do not change the cost, so none are loaded.

The modes run one after the other, each on one long-lived iterator whose start-up (worker
processes, the first reads) and first burst of prefetched items (grain's prefetch threads all
finish together) are not timed; then `--repeats` back-to-back rounds (never interleaved with
another mode: idle prefetching would run ahead). The DiT step is compiled once beforehand; the
on-the-fly feed decodes in the training thread unless --fly_workers > 0, so its cost is not
hidden by prefetch threads running ahead of a short measurement. The decode speedups use the throughput over all
rounds (clips / seconds: batches can arrive in bursts); per-round values and medians are
reported too. One JSON object per measurement is printed
(versions, settings, per-round values, medians, load average, nice) and appended to --output if
given. Uses absl flags (grain worker processes need them parsed).
"""
from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import platform
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_MEASURE = flags.DEFINE_list("measure", ["decode", "dit"], "Which measurements: decode, dit.")
_CONFIG = flags.DEFINE_string("config", os.path.join(REPO, "experiments", "shapes.py"),
                              "Experiment whose data settings, VAE and DiT are used (path[:arg]).")
_TINY = flags.DEFINE_bool("tiny", False, "A seconds-long check: the runlocal config, few videos and steps.")
_NUM_VIDEOS = flags.DEFINE_integer("num_videos", 64, "mp4 files written to the temporary folder.")
_VIDEO_SIZE = flags.DEFINE_integer("video_size", 128, "Height = width of the mp4s (resized to the config's resolution).")
_VIDEO_FRAMES = flags.DEFINE_integer("video_frames", 34, "Frames per mp4 (clips are windows of the config's num_frames).")
_BATCH = flags.DEFINE_integer("batch", 0, "Batch size (0: the config's train.batch_size).")
_WORKERS = flags.DEFINE_integer("workers", 2, "grain worker processes in the decode measurement.")
_FLY_WORKERS = flags.DEFINE_integer("fly_workers", 0, "grain worker processes decoding for the on-the-fly DiT feed.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds per mode.")
_DECODE_BATCHES = flags.DEFINE_integer("decode_batches", 24, "Batches per timed round (decode): several read-aheads.")
_DIT_STEPS = flags.DEFINE_integer("dit_steps", 10, "Train steps per timed round (dit).")
_OUTPUT = flags.DEFINE_string("output", "", "Append the JSON lines to this file.")


def _versions() -> dict:
    out = dict(python=platform.python_version())
    for pkg in ("jax", "jaxlib", "flax", "grain", "array-record", "av", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _context() -> dict:
    return dict(versions=_versions(), cpus=os.cpu_count(), nice=os.nice(0),
                machine=platform.processor() or platform.machine(), date=time.strftime("%Y-%m-%d %H:%M"))


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def write_folder(root: str, num_videos: int, size: int, frames: int) -> str:
    """num_videos shapes-world mp4s (uint8 [frames, size, size, 3]) and captions.csv in root."""
    from pixeldance.data import synthetic, video_io
    source = synthetic.ShapesSource("train", size=num_videos,
                                    config=synthetic.WorldConfig(num_frames=frames, resolution=size))
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    rows = []
    for i in range(num_videos):
        item = source[i]
        rel = os.path.join("videos", f"{i:04d}.mp4")
        video_io.write_mp4(os.path.join(root, rel), item["video"])
        rows.append((rel, item["caption"]))
    with open(os.path.join(root, "captions.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        w.writerows(rows)
    return root


def folder_source(config, root: str):
    """The training clips of the folder: config.data's num_frames and resolution, random crops."""
    from pixeldance.data import video_folder
    d = config.data
    return video_folder.VideoFolderSource(root, num_frames=d.num_frames, resolution=d.resolution,
                                          crop="random", seed=0, size=100_000, on_error="raise")


def _close(iterator):
    close = getattr(getattr(iterator, "_it", None), "close", None)
    if close is not None:
        close()


def _sequential_batches(source, batch: int):
    """The batches of make_batches (same order) read one by one in this thread: no prefetch."""
    import grain
    ds = grain.MapDataset.source(source).shuffle(seed=0).repeat().batch(batch, drop_remainder=True)
    return iter(ds[i] for i in range(len(ds)))


def _burst(num_workers: int) -> int:
    """Batches a fresh BatchIterator reads ahead (per worker process): they are read while the
    iterator starts, so they are skipped, not timed (pipeline.READ_AHEAD, READ_THREADS)."""
    from pixeldance.data import pipeline
    return max(pipeline.READ_AHEAD, pipeline.READ_THREADS) * max(num_workers, 1)


def _timed_rounds(it, skip: int, items_per_round: int, per_item: int) -> tuple[list[float], float]:
    """One long-lived iterator: the first item (start-up: threads, worker processes) and `skip`
    more are not timed; then --repeats back-to-back rounds of items_per_round items (no pause in
    which prefetching could run ahead). Returns (per-round items*per_item per second, start-up s)."""
    t0 = time.perf_counter()
    next(it)
    startup = time.perf_counter() - t0
    for _ in range(skip):
        next(it)
    rates = []
    for _ in range(_REPEATS.value):
        t0 = time.perf_counter()
        for _ in range(items_per_round):
            next(it)
        rates.append(items_per_round * per_item / (time.perf_counter() - t0))
    return rates, startup


def measure_decode(config, root: str, batch: int) -> dict:
    """Clips/s from the folder: make_batches with --workers grain worker processes, against one
    process (make_batches with num_workers=0, i.e. grain's default prefetch threads, as the trainers
    run it; and a plain sequential read, one clip after the other, the single-core baseline)."""
    from pixeldance.data import pipeline
    source = folder_source(config, root)
    modes = {
        "sequential": (lambda: _sequential_batches(source, batch), 0),
        "main_process": (lambda: pipeline.make_batches(source, batch_size=batch, seed=0, process_index=0,
                                                       process_count=1), _burst(0)),
        "workers": (lambda: pipeline.make_batches(source, batch_size=batch, seed=0, num_workers=_WORKERS.value,
                                                  process_index=0, process_count=1), _burst(_WORKERS.value)),
    }
    result = {}
    for mode, (make_iter, skip) in modes.items():
        it = make_iter()
        rates, startup = _timed_rounds(it, skip, _DECODE_BATCHES.value, batch)
        _close(it)
        del it
        result[mode] = dict(clips_per_s=rates, clips_per_s_median=_median(rates),
                            clips_per_s_overall=len(rates) / sum(1 / r for r in rates),
                            startup_s=startup, skipped_batches=skip)
    result["workers"]["num_workers"] = _WORKERS.value
    # Throughput over all timed rounds (clips / seconds): robust to batches arriving in bursts.
    rate = lambda m: result[m]["clips_per_s_overall"]
    return dict(benchmark="data_speed", measurement="decode", speedup=rate("workers") / rate("main_process"),
                speedup_vs_sequential=rate("workers") / rate("sequential"), target_speedup=1.8,
                settings=_settings(config, batch), **result)


def _settings(config, batch: int) -> dict:
    d = config.data
    return dict(config=_CONFIG.value + (":runlocal" if _TINY.value and ":" not in _CONFIG.value else ""),
                batch=batch, num_frames=d.num_frames, resolution=d.resolution,
                num_videos=_NUM_VIDEOS.value, video_size=_VIDEO_SIZE.value, video_frames=_VIDEO_FRAMES.value,
                repeats=_REPEATS.value, decode_batches=_DECODE_BATCHES.value, dit_steps=_DIT_STEPS.value,
                workers=_WORKERS.value, fly_workers=_FLY_WORKERS.value,
                xla_flags=os.environ.get("XLA_FLAGS", ""))


def measure_dit(config, root: str, batch: int, tmp: str) -> dict:
    """DiT train steps/s from the latent cache against decode + VAE encode per batch."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from pixeldance import build, train_lib
    from pixeldance import workdir as workdir_lib
    from pixeldance.data import latent_cache, pipeline
    from pixeldance.sample import VideoVAE
    from pixeldance.trainers import cache as cache_stage
    from pixeldance.trainers import dit as dit_trainer

    d, K = config.data, config.cond.last_from
    vae_model = build.vae(config)
    vae_params = nn.unbox(build.vae_init_fn(vae_model, 1, d.resolution, d.resolution)(jax.random.key(0)))
    vae = VideoVAE(vae_model, vae_params)
    text = build.text_conditioner(config)
    source = folder_source(config, root)

    # The cache: n clips of the folder, written as the cache stage writes them (the DiT cycles over them).
    n = max(batch * 4, _NUM_VIDEOS.value)
    encode_range = cache_stage.batch_encoder(vae, text, source, config.cache.batch_size, K)
    cache_dir = os.path.join(tmp, "cache")
    t0 = time.perf_counter()
    latent_cache.build(cache_dir, count=n, num_shards=latent_cache.num_shards_for(n, 0, max(n // 2, 1)),
                       encode_range=encode_range, info=dict(vae_step=None), log=lambda _: None)
    cache_write_s = time.perf_counter() - t0
    cached = latent_cache.LatentCacheSource(cache_dir)
    T, h, w, C = cached[0]["z"].shape
    rng = np.random.default_rng(0)
    mean, std = rng.normal(size=C).astype(np.float32), rng.uniform(0.5, 2, size=C).astype(np.float32)

    _, init_fn, tx, loss_fn = dit_trainer.train_setup(config, (T, h, w, C), workdir_lib.LatentStats(mean, std))
    params = nn.unbox(init_fn(jax.random.key(1)))
    step = jax.jit(train_lib.make_train_step(loss_fn, tx, config.train.ema_decay), donate_argnums=0)
    state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                 ema_params=jax.tree.map(jnp.copy, params))
    key = jax.random.key(2)

    def from_cache():  # as train_dit reads it: make_batches over LatentCacheSource
        it = pipeline.make_batches(cached, batch_size=batch, seed=0, process_index=0, process_count=1)
        return it, lambda b: b, _burst(0)

    def on_the_fly():  # decode (in this thread, or --fly_workers processes) + VAE encode per batch
        if _FLY_WORKERS.value:
            it = pipeline.make_batches(source, batch_size=batch, seed=0, num_workers=_FLY_WORKERS.value,
                                       process_index=0, process_count=1)
        else:
            it = _sequential_batches(source, batch)

        def encode(b):
            videos = b["video"]  # uint8 [B, F, H, W, 3]
            z = vae.encode(videos)
            lasts = np.ascontiguousarray(videos[:, ::-1][:, :K]).reshape(-1, 1, *videos.shape[2:])
            z_last = vae.encode(lasts)[:, 0].reshape(len(videos), K, h, w, C)
            return dict(z=z, z_last=z_last, **text.record([str(c) for c in b["caption"]]))
        return it, encode, _burst(_FLY_WORKERS.value) if _FLY_WORKERS.value else 0

    # Warm-up: compile the train step (and the VAE encode) on a batch of each feed.
    t0 = time.perf_counter()
    for make in (from_cache, on_the_fly):
        it, prepare, _ = make()
        state, metrics = step(state, prepare(next(it)), key)
        jax.block_until_ready(metrics)
        _close(it)
    warmup_s = time.perf_counter() - t0

    result = {}
    for mode, make in (("cache", from_cache), ("on_the_fly", on_the_fly)):
        it, prepare, skip = make()
        for _ in range(1 + skip):  # start-up and the prefetch burst (see _burst), not timed
            b = next(it)
        state, metrics = step(state, prepare(b), key)
        jax.block_until_ready(metrics)
        rates, load_before = [], os.getloadavg()
        for _ in range(_REPEATS.value):  # back-to-back rounds; async dispatch as in train_loop
            t0 = time.perf_counter()
            for _ in range(_DIT_STEPS.value):
                state, metrics = step(state, prepare(next(it)), key)
            jax.block_until_ready(metrics)
            rates.append(_DIT_STEPS.value / (time.perf_counter() - t0))
        _close(it)
        result[mode] = dict(steps_per_s=rates, steps_per_s_median=_median(rates), load_avg_before=load_before,
                            load_avg_after=os.getloadavg())
    speedup = result["cache"]["steps_per_s_median"] / result["on_the_fly"]["steps_per_s_median"]
    return dict(benchmark="data_speed", measurement="dit", speedup=speedup, target_speedup=5.0,
                cache=dict(result["cache"], records=n, write_s=cache_write_s, shards=len(cached.meta["shards"])),
                on_the_fly=result["on_the_fly"], warmup_s=warmup_s, latent_shape=[T, h, w, C], dit_variant=config.dit.variant,
                vae_variant=config.vae.variant, backend=jax.default_backend(), devices=jax.device_count(),
                settings=_settings(config, batch))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = set(_MEASURE.value) - {"decode", "dit"}
    if unknown:
        raise app.UsageError(f"unknown --measure {sorted(unknown)}; choose decode, dit")
    from pixeldance import configs, xla_flags
    spec = _CONFIG.value
    if _TINY.value:
        spec = spec if ":" in spec else spec + ":runlocal"
        for flag, value in (("num_videos", 8), ("video_size", 64), ("video_frames", 12), ("repeats", 2),
                            ("decode_batches", 2), ("dit_steps", 2)):
            if not flags.FLAGS[flag].present:
                flags.FLAGS[flag].value = value
    config = configs.load_config(spec)
    if config.get("xla_fast_compile"):
        xla_flags.enable_fast_compile()
    batch = _BATCH.value or (4 if _TINY.value else config.train.batch_size)
    lines = []
    with tempfile.TemporaryDirectory(prefix="pixeldance_data_speed_") as tmp:
        t0 = time.perf_counter()
        root = write_folder(os.path.join(tmp, "videos"), _NUM_VIDEOS.value, _VIDEO_SIZE.value, _VIDEO_FRAMES.value)
        folder_s = time.perf_counter() - t0
        if "decode" in _MEASURE.value:
            lines.append(dict(measure_decode(config, root, batch), folder_write_s=folder_s))
            lines[-1].update(_context(), load_avg=os.getloadavg())
            print(json.dumps(lines[-1]), flush=True)
        if "dit" in _MEASURE.value:
            lines.append(measure_dit(config, root, batch, tmp))
            lines[-1].update(_context())
            print(json.dumps(lines[-1]), flush=True)
    if _OUTPUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
        with open(_OUTPUT.value, "a") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    app.run(main)
