r"""Joint image-video training: a folder of videos and a folder of images, mixed by weight.

The data: two folders, each with a captions file (`path,caption` CSV, or JSONL), as for
experiments/video_folder.py; the images are one-frame videos (the causal VAE encodes a frame
alone), any format PIL reads:

  python -m pixeldance.main --config=experiments/video_image_mix.py \
      --config.data.sources.videos.root=VIDEOS --config.data.sources.images.root=IMAGES \
      --workdir=workdirs/video_image_mix

Smoke test (a few steps of every stage on a CPU): `--config=experiments/video_image_mix.py:runlocal`.

What each stage reads:
  train_vae  the mixture (`data.mixture`, videos 0.8 and images 0.2 of the items), in batches
             grouped by `data.buckets`: clips of 17 frames in three aspects and images in the
             same three, each item in the bucket nearest its own duration and aspect, each batch
             one shape (so the VAE learns images and videos, and wide and tall frames).
  cache      `cache.num_videos` items of the same mixture, each encoded at its bucket's shape
             into one latent cache per bucket (`<workdir>/cache/bucket-17x48x80/`, ...; clips too
             short for 17 frames and the images land in the one-frame buckets), listed in
             `<workdir>/cache/buckets.json` (`cache.bucketed`, on by default with `data.buckets`).
  train_dit  the DiT on those caches: every batch one bucket's latent shape (wide, tall or square
             clips, or images trained text-to-image), batches drawn in the order of the VAE's
             buckets (a pure function of the seed and the step, resumed exactly); one compile
             of the train step per shape.
To train the DiT at one shape instead (square clips, and every 4th batch images from the image
folder via the image cache, `<workdir>/cache_images`, images at the clips' size):
`--config.cache.bucketed=False --config.train.image_every=4 --config.train.image_source=images`.
Swap the weights (`--config.data.mixture=videos:0.5,images:0.5`), the buckets
(`--config.data.buckets=17x64x64,1x64x64`) or the image folder's captions file
(`--config.data.sources.images.captions=captions.jsonl`) from the command line.
"""
from pixeldance import configs

base = configs.import_sibling(__file__, "base")


def get_config(arg=None):
    c = base.get_config(arg)
    runlocal = configs.parse_arg(arg, runlocal=False, vae="shapes", dit="shapes").runlocal
    c.data.name = "mixture"
    c.train.lr = 5e-4  # base's 1e-3 was measured on the synthetic world's DiT only
    c.evals.dit = ("samples",)  # captions the faithfulness evaluator cannot score: samples only
    c.data.mixture = "videos:0.8,images:0.2"  # videos first: the one-shape stages read them
    c.data.sources = dict(
        videos=dict(name="video_folder", root="", captions="captions.csv"),   # required: root
        images=dict(name="image_folder", root="", captions="captions.csv"),   # required: root
    )
    c.data.stride = 2
    c.data.crop = "center"
    R, F = c.data.resolution, c.data.num_frames
    c.data.buckets = f"{F}x{R}x{R},{F}x48x80,{F}x80x48,1x{R}x{R},1x48x80,1x80x48"
    c.text.tokenizer = "hashed"
    c.text.max_length = 24
    c.text.vocab_size = 8192
    # The DiT's images come from the one-frame buckets (cache.bucketed); image_every and
    # image_source are for the one-shape DiT (cache.bucketed=False), see the docstring.
    c.train.image_every = 0
    c.train.image_source = ""
    if not runlocal:
        # Base's VAE stage on 32 px crops was measured on the synthetic world only: whole frames,
        # 4 per batch, 1,500 steps, the stage this experiment was written with.
        c.vae.train_size, c.vae.batch_size, c.vae.num_steps = 0, 4, 1500
        c.cache.num_videos = 4096
    else:
        R, F = c.data.resolution, c.data.num_frames
        c.data.stride = 1
        c.data.buckets = f"{F}x{R}x{R},1x{R}x{R}"  # two shapes: two VAE compiles
        c.text.max_length = 12
        c.text.vocab_size = 256
        c.vae.eval_videos = 2
        c.vae.stats_videos = 8
        c.cache.num_videos = 32  # enough items that both buckets fill a DiT batch of 8
    return c
