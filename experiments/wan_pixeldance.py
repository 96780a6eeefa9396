r"""PixelDance on the open Wan 2.1 text-to-video model: fine-tune its DiT with image instructions.

Start from a Wan 2.1 T2V diffusers folder WAN (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers, or 14B):
convert its three parts once (safetensors only), the VAE straight into the new workdir W, whose
VAE it becomes (converted weights and Wan's own latent normalisation, which the cache stage
keeps: the pretrained DiT expects it):

  python -m pixeldance.convert.wan_vae --input=WAN/vae --output=W
  python -m pixeldance.convert.text_encoder --kind=umt5 --input=WAN --output=UMT5
  python -m pixeldance.convert.wan_dit --input=WAN --output=WAN_DIT
  python -m pixeldance.main --config=experiments/wan_pixeldance.py --workdir=W \
      --config.dit.init_from=WAN_DIT --config.text.encoder_path=UMT5 --config.data.root=VIDEOS \
      --config.mode=cache          # then --config.mode=train_dit, then --config.mode=sample

(mode 'train' would train a VAE of its own first: run the three stages by name). VIDEOS is a
folder of videos with captions (experiments/video_folder.py's layout); for a TFDS dataset set
--config.data.name=ucf101|msrvtt and its data_dir as root.

What it does: the DiT is Wan's (config.dit.family='wan'), its patch embedding widened by 2C + 1
input channels for [c_image, c_mask] with zero weights, so before any step it is exactly the
text-to-video model; it learns PixelDance's instructions (first frame p_first, last frame
p_last from the clip's last frames, noise on them, text dropped for guidance) with Wan's own
velocity objective on the flow path. Text: umT5-XXL states computed once by the cache stage
(512 tokens, bfloat16). Sampling: Euler on a time grid shifted by 3 (Wan's 480p setting; 5 at
720p), guidance 5, tau as the paper.

  --config=experiments/wan_pixeldance.py            full fine-tuning (every weight; 14B: a v5p-32)
  --config=experiments/wan_pixeldance.py:lora       LoRA rank 32 on attention, FFN and the patch
                                                    embedding (the base frozen; checkpoints hold
                                                    the adapters; sampling and export merge them)
  --config=experiments/wan_pixeldance.py:lora,rank=64
  --config=experiments/wan_pixeldance.py:runlocal   a few steps of tiny models on a CPU (the
                                                    folders still given as above)

Export the fine-tuned DiT as a converted folder (LoRA merged): `python -m
pixeldance.tools.export_dit --workdir=W --output=DIR`. What each fine-tune needs per chip on v5e
and v5p slices: README "Compile-ahead planning".
"""
from pixeldance import configs

base = configs.import_sibling(__file__, "base")


def get_config(arg=None):
    a = configs.parse_arg(arg, lora=False, rank=32, runlocal=False)
    c = base.get_config("runlocal" if a.runlocal else None)
    c.data.name = "video_folder"
    c.data.root = ""             # required: --config.data.root=VIDEOS
    c.data.resolution = 480      # square crops; 480 / (8 x 2) = 30 patches a side
    c.data.num_frames = 33       # 1 + 4k: 9 latent frames (Wan generates 81 at 16 fps)
    c.data.fps = 16.0            # Wan 2.1's frame rate
    c.data.crop = "center"
    c.evals.dit = ("samples",)   # free-text captions: samples, no synthetic-world score
    c.cache.num_videos = 4096

    c.vae.family = "wan"         # W holds the converted Wan 2.1 VAE (see above)

    c.text.encoder = "umt5"
    c.text.encoder_path = ""     # required: the converted umT5-XXL folder
    c.text.encoder_max_length = 512
    c.text.encoder_dtype = "bfloat16"  # only the cache stage and the sampler run it

    c.dit.family = "wan"
    c.dit.init_from = ""         # required: the converted Wan 2.1 DiT folder
    c.dit.widen = True
    c.dit.remat = "full"
    c.dit.dtype = "bfloat16"     # compute; parameters and optimizer state stay float32

    c.diffusion.objective = "flow"       # Wan 2.1 is a rectified-flow model (the main job's is 'v')
    c.diffusion.prediction = "velocity"  # Wan predicts the flow velocity eps - x0
    c.diffusion.time_sampling = "logit_normal"

    c.train.batch_size = 8
    c.train.num_steps = 3000
    c.train.warmup_steps = 100
    c.train.lr = 1e-5            # full fine-tuning of a pretrained model: small steps
    c.train.ckpt_every = 250
    if a.lora:
        c.train.lora_rank = a.rank
        c.train.lora_alpha = float(a.rank)
        c.train.lr = 1e-4        # adapters start at zero: larger steps than full fine-tuning

    c.sample.sampler = "euler"
    c.sample.steps = 50
    c.sample.shift = 3.0
    c.sample.guidance = 5.0
    c.sample.image_guidance = 1.0
    c.sample.tau = 25            # the last frame guides the first half of the steps
    c.sample.batch_size = 1
    if a.runlocal:  # seconds on a CPU, with tiny converted folders (tests/test_wan_pixeldance.py)
        c.data.resolution, c.data.num_frames, c.cache.num_videos = 32, 9, 8
        c.text.encoder_max_length = 24
        c.dit.remat, c.dit.dtype = "none", "float32"
        c.train.num_steps, c.train.warmup_steps, c.train.ckpt_every = 4, 1, 2
        c.sample.steps, c.sample.tau, c.sample.batch_size = 3, 1, 4
    return c
