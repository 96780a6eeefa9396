r"""Train on UCF-101 (class names as captions): VAE, latent cache, DiT (then the sample stage).

The data: the official archives, under their official names, in a manual folder MANUAL:

    MANUAL/UCF101.rar                                  (or the extracted MANUAL/UCF-101/, or a
                                                        UCF101.zip of it; the .rar needs
                                                        `pip install rarfile` and unrar)
    MANUAL/UCF101TrainTestSplits-RecognitionTask.zip   (or the extracted MANUAL/ucfTrainTestlist/)

Build the TFDS dataset once (array_record files holding the original .avi bytes, the class
labels and official train/test list 1; no TensorFlow needed), then train on it:

  python -m pixeldance.data.tfds_build --dataset=ucf101 --manual_dir=MANUAL --data_dir=DATA
  python -m pixeldance.convert.text_encoder --kind=clip --input=HF_CLIP --output=CLIP
  python -m pixeldance.main --config=experiments/ucf101.py --config.data.root=DATA \
      --config.text.encoder_path=CLIP --workdir=workdirs/ucf101

The text encoder is a frozen pretrained CLIP text tower, as in the paper (which does not say
which CLIP): HF_CLIP is a Hugging Face CLIPModel or CLIPTextModel folder with its tokenizer.json,
e.g. openai/clip-vit-large-patch14 (width 768, Stable Diffusion's) or the evaluation suite's
ViT-B/16 (width 512). The cache stage embeds each caption once (77 tokens, bfloat16 states in the
latent cache) and the DiT trains from the cached states; `--config.text.encoder=word` trains
the small hashed-word encoder with the DiT instead.

Lists 2 and 3: add `--ucf101_split=2` to the build and `--config.data.ucf101_split=2` to the run.
Smoke test (a few steps of every stage on a CPU): `--config=experiments/ucf101.py:runlocal`.

Clips: `data.num_frames` frames at `data.fps` (8; 0: every `data.stride`-th frame) from the
'train' split (`data.train_split`), resized and cropped (`data.crop`) to `data.resolution`
square; held-out clips and samples come from 'test' (`data.heldout_split`). The caption is the
class name as words ('ApplyEyeMakeup' -> 'apply eye makeup'). The runlocal smoke test, which has
no weights, uses hashed words (`--config.text.encoder=clip --config.text.encoder_path=CLIP`
smoke-tests CLIP). Corrupt, truncated or too-short videos are logged, counted and skipped
(`--config.data.on_error=raise` stops at the first). The sample stage writes samples for the
captions of a few test clips.
"""
from pixeldance import configs

base = configs.import_sibling(__file__, "base")


def get_config(arg=None):
    c = base.get_config(arg)
    runlocal = configs.parse_arg(arg, runlocal=False, vae="shapes", dit="shapes").runlocal
    c.data.name = "ucf101"
    c.train.lr = 5e-4  # base's 1e-3 was measured on the synthetic world's DiT only
    c.evals.dit = ("samples",)  # captions the faithfulness evaluator cannot score: samples only
    c.evals.protocol = "ucf101_pixeldance"  # the paper's metrics: python -m pixeldance.evaluate --workdir=DIR
    c.data.root = ""  # required: --config.data.root=DATA (the TFDS data_dir of the build)
    c.data.ucf101_split = 1
    c.data.train_split = "train"
    c.data.heldout_split = "test"
    c.data.fps = 8.0  # UCF-101 is 25 fps: 17 frames span 2 s
    c.data.crop = "center"
    c.text.encoder = "clip"  # required: --config.text.encoder_path=CLIP (see above)
    c.text.encoder_path = ""
    # With --config.text.encoder=word: hashed words, trained with the DiT.
    c.text.tokenizer = "hashed"
    c.text.max_length = 8  # class names are 1-4 words
    c.text.vocab_size = 8192
    if not runlocal:
        # Base's VAE stage on 32 px crops was measured on the synthetic world only: whole frames,
        # 4 per batch, 1,500 steps, the stage this experiment was written with.
        c.vae.train_size, c.vae.batch_size, c.vae.num_steps = 0, 4, 1500
        c.cache.num_videos = 9537  # one clip per training video of list 1
    else:
        c.text.encoder = "word"  # no weights in a smoke test
        c.data.fps = 0.0
        c.data.stride = 1
        c.text.vocab_size = 256
        c.vae.eval_videos = 2
        c.vae.stats_videos = 8
    return c
