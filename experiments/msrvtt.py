r"""Train on MSR-VTT (free-text captions): VAE, latent cache, DiT (then the sample stage).

The data, in a manual folder MANUAL, either as commonly distributed:

    MANUAL/MSRVTT.zip       MSRVTT/videos/all/video0.mp4 .. video9999.mp4 and
                            MSRVTT/annotation/MSR_VTT.json (or the extracted MANUAL/MSRVTT/)

or the official annotation files `train_val_videodatainfo.json` and `test_videodatainfo.json`
(loose in MANUAL or in any .zip in it; preferred when present) with the videos videoN.mp4
anywhere under MANUAL or in any .zip in it (e.g. TrainValVideo/ and TestVideo/). Build the TFDS
dataset once (array_record files holding the original .mp4 bytes, all 20 captions of each video
and the official splits train 6513 / validation 497 / test 2990; no TensorFlow needed), then
train on it:

  python -m pixeldance.data.tfds_build --dataset=msrvtt --manual_dir=MANUAL --data_dir=DATA
  python -m pixeldance.convert.text_encoder --kind=clip --input=HF_CLIP --output=CLIP
  python -m pixeldance.main --config=experiments/msrvtt.py --config.data.root=DATA \
      --config.text.encoder_path=CLIP --workdir=workdirs/msrvtt

The text encoder is a frozen pretrained CLIP text tower, as in the paper (which does not say
which CLIP): HF_CLIP is a Hugging Face CLIPModel or CLIPTextModel folder with its tokenizer.json,
e.g. openai/clip-vit-large-patch14 (width 768, Stable Diffusion's) or the evaluation suite's
ViT-B/16 (width 512). The cache stage embeds each caption once (77 tokens, bfloat16 states in the
latent cache) and the DiT trains from the cached states; `--config.text.encoder=word` trains
the small hashed-word encoder with the DiT instead.

Smoke test (a few steps of every stage on a CPU): `--config=experiments/msrvtt.py:runlocal`.

Clips: `data.num_frames` frames at `data.fps` (8; 0: every `data.stride`-th frame) from the
'train' split (`data.train_split`), resized and cropped (`data.crop`) to `data.resolution`
square; held-out clips and samples come from 'test' (`data.heldout_split`; or 'validation').
Each item's caption is one of its video's captions, drawn per item. The runlocal smoke test,
which has no weights, tokenizes captions by hashed words (`--config.text.encoder=clip
--config.text.encoder_path=CLIP` smoke-tests CLIP). Corrupt, truncated or too-short videos are
logged, counted and skipped (`--config.data.on_error=raise` stops at the first). The sample
stage writes samples for the captions of a few test clips.
"""
from pixeldance import configs

base = configs.import_sibling(__file__, "base")


def get_config(arg=None):
    c = base.get_config(arg)
    runlocal = configs.parse_arg(arg, runlocal=False, vae="shapes", dit="shapes").runlocal
    c.data.name = "msrvtt"
    c.train.lr = 5e-4  # base's 1e-3 was measured on the synthetic world's DiT only
    c.evals.dit = ("samples",)  # captions the faithfulness evaluator cannot score: samples only
    c.evals.protocol = "msrvtt_zeroshot"  # the paper's metrics: python -m pixeldance.evaluate --workdir=DIR
    c.data.root = ""  # required: --config.data.root=DATA (the TFDS data_dir of the build)
    c.data.train_split = "train"
    c.data.heldout_split = "test"
    c.data.fps = 8.0  # MSR-VTT videos are 10-30 s, mostly 30 fps: 17 frames span 2 s
    c.data.crop = "center"
    c.text.encoder = "clip"  # required: --config.text.encoder_path=CLIP (see above)
    c.text.encoder_path = ""
    # With --config.text.encoder=word: hashed words, trained with the DiT.
    c.text.tokenizer = "hashed"
    c.text.max_length = 32
    c.text.vocab_size = 16384
    if not runlocal:
        # Base's VAE stage on 32 px crops was measured on the synthetic world only: whole frames,
        # 4 per batch, 1,500 steps, the stage this experiment was written with.
        c.vae.train_size, c.vae.batch_size, c.vae.num_steps = 0, 4, 1500
        c.cache.num_videos = 6513  # one clip per training video
    else:
        c.text.encoder = "word"  # no weights in a smoke test
        c.data.fps = 0.0
        c.data.stride = 1
        c.text.max_length = 12
        c.text.vocab_size = 256
        c.vae.eval_videos = 2
        c.vae.stats_videos = 8
    return c
