r"""Train on a folder of your own videos: VAE, latent cache, DiT (then the sample stage).

The data (the WebVid layout): a folder DIR holding the videos (any container/codec FFmpeg reads,
in subfolders or not) and a captions file, by default DIR/captions.csv with the header
`path,caption` (or `--config.data.captions=captions.jsonl`, one {"path": ..., "caption": ...}
per line), paths relative to DIR:

    path,caption
    clips/0001.mp4,"a dog runs on the beach"

  python -m pixeldance.main --config=experiments/video_folder.py --config.data.root=DIR \
      --workdir=workdirs/my_videos

Smoke test (a few steps of every stage on a CPU): `--config=experiments/video_folder.py:runlocal`.

Clips: `data.num_frames` frames at `--config.data.fps=8` (0, the default: every
`--config.data.stride`-th frame), resized and cropped (`data.crop`: center | random) to
`data.resolution` square. Corrupt, truncated, too-short or missing videos and malformed caption
rows are logged, counted and skipped (`--config.data.on_error=raise` stops at the first one); the
counts are printed at the end of the VAE and cache stages. Captions are free text, tokenized by
hashed words (`text.tokenizer='hashed'`, `text.vocab_size` ids).

The sample stage ('sample', last in mode 'train') writes samples for the captions of a few
folder clips, text only and first frame + text (`samples/folder_*.mp4`); the faithfulness
report is the synthetic world's alone. Sample your own prompts with the CLI
(`python -m pixeldance.sample --workdir=... --prompt=... --output=x.mp4`).
"""
from pixeldance import configs

base = configs.import_sibling(__file__, "base")


def get_config(arg=None):
    c = base.get_config(arg)
    runlocal = configs.parse_arg(arg, runlocal=False, vae="shapes", dit="shapes").runlocal
    c.data.name = "video_folder"
    c.train.lr = 5e-4  # base's 1e-3 was measured on the synthetic world's DiT only
    c.evals.dit = ("samples",)  # captions the faithfulness evaluator cannot score: samples only
    c.data.root = ""  # required: --config.data.root=DIR
    c.data.fps = 0.0
    c.data.stride = 2
    c.data.crop = "center"
    c.text.tokenizer = "hashed"
    c.text.max_length = 24
    c.text.vocab_size = 8192
    if not runlocal:
        # Base's VAE stage on 32 px crops was measured on the synthetic world only: whole frames,
        # 4 per batch, 1,500 steps, the stage this experiment was written with.
        c.vae.train_size, c.vae.batch_size, c.vae.num_steps = 0, 4, 1500
        c.cache.num_videos = 4096  # clips cached for the DiT (item i: a window of video i % N)
    else:
        c.data.stride = 1
        c.text.max_length = 12
        c.text.vocab_size = 256
        c.vae.eval_videos = 2
        c.vae.stats_videos = 8
    return c
