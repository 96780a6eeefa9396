r"""Base experiment: the synthetic shapes world, VAE then DiT, all defaults in one place.

Every other experiment file starts from `get_config` here and changes only what it is about.

  python -m pixeldance.main --config=experiments/base.py --workdir=/tmp/pd_base
  python -m pixeldance.main --config=experiments/base.py:runlocal --workdir=/tmp/pd_smoke

Arguments after the colon: `runlocal` (shrink everything to seconds on a CPU),
`vae=NAME` and `dit=NAME` (size-table variants).
"""
import ml_collections

from pixeldance import configs


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, vae="shapes", dit="shapes")
    c = ml_collections.ConfigDict()
    # 'train' runs every stage in order: VAE, latent cache, DiT, sampling + evaluation.
    # The stages can also be run one by one: train_vae, cache, train_dit, sample.
    c.mode = "train"
    c.seed = 0
    # Compile with cheap XLA flags (pixeldance/xla_flags.py): 2-3x faster compiles, slower steps.
    # For smoke tests, where compiling is most of the time.
    c.xla_fast_compile = False

    # Mesh ('data','fsdp','context','tensor'); -1 fills with the remaining devices.
    # shape: the mesh (of one slice, with dcn_shape); one -1 is filled from the device count.
    # dcn_shape: how several slices are laid out over DCN, e.g. (2, 1, 1, 1) for data parallelism
    # across 2 slices (None: across TPU slices where there are several, else one flat mesh).
    c.mesh = dict(shape=(1, -1, 1, 1), preset="fsdp", dcn_shape=ml_collections.FieldReference(None, field_type=tuple))

    c.data = dict(
        name="shapes",       # the built-in synthetic world (see pixeldance/data/synthetic.py)
        num_frames=17,       # 1 + 4k so the causal VAE gives 1 + k latent frames
        resolution=64,
        num_objects=1,
        world_seed=0,
        num_workers=0,       # grain worker processes (0: in the main process)
        # name='video_folder' (pixeldance/data/video_folder.py): clips of the videos in `root`,
        # captioned by its `captions` file (CSV with header path,caption, or JSONL; paths
        # relative to root), num_frames frames at `fps` (0: every `stride`-th frame), resized
        # and cropped ('center' | 'random') to resolution x resolution. on_error: 'skip' (log,
        # count and replace bad videos/rows by the next good one) or 'raise'.
        root="",
        captions="captions.csv",
        fps=0.0,
        stride=1,
        crop="center",
        on_error="skip",
        # name='ucf101' | 'msrvtt' (pixeldance/data/tfds_source.py): the TFDS datasets that
        # `python -m pixeldance.data.tfds_build` builds into the data_dir `root`, clipped as above
        # (captions: the UCF-101 class as words, or one of a MSR-VTT video's captions).
        # train_split / heldout_split: the TFDS splits read for training and for held-out clips
        # and samples (MSR-VTT also has 'validation'); ucf101_split: which official UCF-101
        # train/test list (1, 2 or 3) the dataset was built with (--ucf101_split).
        train_split="train",
        heldout_split="test",
        ucf101_split=1,
        # name='image_folder' (pixeldance/data/image_folder.py): the images in `root` with its
        # `captions` file (as above), each a one-frame video [1, R, R, 3], resized and cropped the
        # same way; broken images and rows are skipped and counted as for videos.
        # name='mixture' (pixeldance/data/mixture.py): `mixture` = "NAME:WEIGHT,..." (relative
        # weights), e.g. "videos:0.8,images:0.2"; component NAME is config.data with
        # sources.NAME's fields laid over it (sources.NAME.name: its kind, default NAME), e.g.
        # sources = dict(videos=dict(name='video_folder', root=...),
        #                images=dict(name='image_folder', root=...))
        # (add the entries in an experiment file; then --config.data.sources.videos.root=DIR).
        # Item k of the mixture is a pure function of (world_seed, k); proportions are exact in
        # every block of 1000 items. Stages that need one item shape (the latent cache, VAE
        # held-out clips and statistics, samples) read the components shaped like the first.
        mixture="",
        sources={},
        # Buckets (pixeldance/data/buckets.py; the VAE trainer, and with cache.bucketed the
        # latent cache and the DiT): "FxHxW,..." e.g.
        # "17x64x64,17x48x80,1x64x64". Each item goes to the bucket with the most frames it can
        # fill, then the nearest aspect, and is resized/cropped to it; every batch is one bucket's
        # shape (one compile per shape). Frames 1 + 4k, H and W multiples of 8. "": off.
        buckets="",
        # Where the headers read for buckets (frame counts, sizes) are kept: "" next to the
        # captions file (<captions>.meta-<kind>.json), a folder, or "memory" (not written).
        meta_cache="",
        # Data roots are boundaries (pixeldance/data/paths.py): a path in a captions file (and a
        # file a latent cache's meta.json or buckets.json names) must resolve inside its folder
        # (`root`, the cache folder) after following symlinks. A `../` row, an absolute path or
        # a symlink pointing out of the folder is refused before it is opened (named with its
        # file:line; skipped and counted with on_error='skip', an error with 'raise'), so a
        # captions file from elsewhere cannot make training read arbitrary files. True: read
        # them anyway (data spread over several disks on purpose, linked from one root).
        allow_outside_root=False,
    )

    c.vae = dict(
        variant=arg.vae,
        # Random 32 x 32 crops, 8 per batch (a crop usually holds the object, so the decoder sees
        # more object per pixel). At 3,000 steps on seeds 0 / 1 / 2 (benchmarks/README.md, issue
        # 19, session 25): held-out text-only direction 0.92 / 0.97 / 0.94, consistency >= 0.87 in
        # every mode, smoothness 0.74-0.98, first-frame PSNR 28.6-28.9 dB (whole clips: 26.1-26.5),
        # real clips through it keep their shape more often (0.39 / 0.45 on seeds 1 / 2, was
        # 0.31). 2,000 steps (session 28) cost 0.8 dB of evaluation PSNR (27.7 against 28.5 on
        # seed 0) and no item-1 number of issue 19, and save a third of the stage.
        batch_size=8,
        train_frames=9,      # clips the VAE trains on: the first frame plus two 4-frame groups, so
                             # the decoder learns the steady state of group after group (with
                             # 5-frame clips it never saw one, and objects vanished at the start of
                             # every later group: consistency 0.42 on reconstructions, now 0.97)
        num_steps=2000,
        # 1e-3: the stage (on whole clips) keeps the world's colours on seeds 0, 1 and 2 (64 held-out clips: 1.00
        # each, PSNR 25.7-26.2 dB); at 2e-3 only seed 0 did (seeds 1, 2: 0.52 / 0.45, 22.6 / 21.6
        # dB), at 4e-3 seed 1 kept 0.16 (benchmarks/results/issue19_vae_seeds.json).
        lr=1e-3,
        warmup_steps=50,
        weight_decay=0.0,
        grad_clip=1.0,
        kl_weight=1e-6,
        l2_weight=1.0,
        l1_weight=1.0,
        ema_decay=0.999,
        log_every=25,
        ckpt_every=500,
        keep_checkpoints=2,
        train_size=32,            # random spatial crops of this many pixels (0: full frames); the
                                  # VAE is convolutional: it encodes and decodes whole frames
        perceptual_weight=0.0,    # LPIPS-style feature loss (needs perceptual_path)
        perceptual_path="",       # safetensors of a VGG-layout feature net; "": no perceptual loss
        disc_weight=0.0,          # 3D patch discriminator, hinge loss (0: none)
        disc_start=0,             # step from which the GAN losses count
        disc_channels=(32, 64, 128),
        disc_adaptive=True,       # VQGAN's adaptive weight (else lambda = 1)
        eval_videos=8,            # held-out clips reconstructed after training (0: none)
        stats_videos=64,          # training clips encoded for latent_stats.json (0: the cache stage's)
        # The cache stage refuses a VAE of this workdir whose reconstructions keep the synthetic
        # world's colours in fewer than this fraction of 16 held-out clips (trainers/cache.py
        # check_vae_colours): at lr 2e-3 seeds 1 and 2 of this VAE stage lost hues (0.45-0.52)
        # and every DiT number followed. 0: no check. Only for config.data.name 'shapes'.
        min_colour_acc=0.75,
        # Distance between consecutive-frame differences of the reconstruction and of the input
        # (trainers/vae.py temporal_difference): penalises motion that steps at the 4-frame
        # latent-group boundaries (issue 19). Squared at weight 10: reconstructions' smoothness
        # 1.88 -> 1.11 (1 = even motion), evaluation PSNR +1.4 dB, and the DiT's samples more
        # faithful in every mode (benchmarks/README.md, "Levers on the VAE"). 0: off, the loss
        # before the option (configs saved without these fields read as off).
        temporal_diff_weight=10.0,
        temporal_diff_norm="l2",  # 'l1' | 'l2' (squared); L1 makes frames inside a group alike
        # How the decoder's temporal upsamplers start (models/vae.py Upsample): 'copy' (each
        # latent's frames start equal: nearest neighbour in time) or 'independent' (each new
        # frame its own kernel). Read when the workdir has no vae_model.json yet.
        temporal_upsample_init="copy",
    )

    c.cache = dict(
        num_videos=2048,     # training videos encoded once into the latent cache
        batch_size=16,
        # ArrayRecord shards (pixeldance/data/latent_cache.py): num_shards, or 0 for
        # ceil(num_videos / records_per_shard) (likewise for the image cache, at most one shard
        # per image). Each host writes its share of the shards.
        num_shards=0,
        records_per_shard=1024,
        path="",             # the cache folder (default <workdir>/cache); the DiT reads it from here
        # With data.buckets: one cache per bucket (<path>/bucket-FxHxW/, items encoded at their
        # bucket's shape, one-frame buckets too) and DiT batches of one bucket's shape each.
        # False: one cache of data.num_frames x data.resolution clips, as without buckets.
        bucketed=True,
        # The image cache (written when train.image_source names a source): its folder (default
        # <workdir>/cache_images) and how many images it holds (0: every image of the source once).
        image_path="",
        num_images=0,
        # The DiT checks every shard of the caches it reads against meta.json's SHA-256 before
        # training (about 0.8 s per GB on two CPU cores; benchmarks/checkpoint_verify.py), so a
        # damaged shard stops it at once, named. False: the reader's own per-chunk hashes only,
        # which stop training at the first bad record, mid-run.
        verify_on_read=True,
    )

    c.text = dict(
        # 'word': a small encoder of config.text's tokens trained with the DiT (the synthetic
        # world's); 'clip' / 't5' / 'umt5': a frozen pretrained encoder, the folder of
        # `python -m pixeldance.convert.text_encoder` in encoder_path, run once by the cache stage
        # (states stored bfloat16 in the latent cache) and by the Pipeline on prompts.
        encoder="word",
        encoder_path="",
        encoder_max_length=0,      # a frozen encoder's padded length; 0: the folder's (77 CLIP, 512 T5)
        encoder_dtype="float32",   # T5 / umT5 compute and parameter dtype ('bfloat16' halves umT5-XXL)
        max_length=12,       # word tokens incl. the leading BOS token
        tokenizer="words",   # 'words': the shapes world's closed vocabulary; for free-text
                             # captions 'hashed' (words hashed into vocab_size ids) or 'bytes'
        vocab_size=4096,     # ids of the 'hashed' tokenizer (incl. pad, unk, BOS)
        width=128,
        num_layers=2,
        num_heads=4,
    )

    c.dit = dict(
        # 'pixeldance': this codebase's VideoDiT (variant, patch_size, attention below); 'wan': the
        # Wan 2.1 DiT (pixeldance/models/wan_dit.py), from the converted folder init_from (its
        # architecture and weights) or, with init_from empty, the named wan_config at random.
        family="pixeldance",
        init_from="",
        wan_config="",
        widen=True,          # wan: [x, c_image, c_mask] in, zero-initialised (False: text-to-video)
        mask_text=False,     # wan: False zeroes padded text states (Wan's own way); True masks them
        variant=arg.dit,
        # Layers; 0: the variant's (models/dit.py DIT_VARIANTS). The main job's DiT has 3 of the
        # 'shapes' row's 4: on seed 0 (session 28, 2,000-step VAE) held-out text-only direction
        # 0.906 -> 0.969, consistency 0.89 / 0.98 / 0.98 -> 0.85 / 1.00 / 0.99, the DiT stage
        # 515 -> 440 s (benchmarks/README.md, issue 19).
        depth=3 if arg.dit == "shapes" else 0,
        patch_size=(1, 2, 2),
        attention="full",    # 'full' space-time attention
        pos_embed="sincos",  # 'none': 3D RoPE only (relative); 'sincos': plus fixed absolute
                             # positions of the (t, h, w) tokens (models/dit.py sincos_3d): on the
                             # main job consistency 0.74/0.41/0.59 -> 0.83/0.59/0.60 (T2V/I2V/FLF2V),
                             # I2V direction 0.938 -> 0.969 (benchmarks/README.md, issue 19)
        context_parallel="ulysses",  # 'ulysses' | 'ring': self-attention over a 'context'-split sequence
        remat="none",        # 'none' | 'full' | 'dots'
        # The attention kernel (models/attention_kernels.py): '' picks per backend and shape
        # (splash on TPU, cuDNN on GPU, on the CPU 'dense' for short sequences and 'chunked' for
        # long ones), or one of 'xla' | 'dense' | 'chunked' | 'cudnn' | 'splash' forced.
        attention_impl="",
        # Layers per iteration of the scanned layer loop (models/dit.py VideoDiT.scan_unroll): the
        # small DiTs of the built-in world run unrolled (no loop, the same parameters): the main
        # job's train step 1.2x faster on a 2-core CPU (benchmarks/README.md, issue 19);
        # larger variants keep 1 (one compiled layer, compile time independent of depth).
        scan_unroll=4 if arg.dit in ("shapes", "shapes_wide") else 1,
        dtype="float32",
    )

    c.diffusion = dict(
        # 'v_zero_snr': DDPM (T = 1000) with v-prediction, its steps rescaled so the last is pure
        # noise (Lin et al. 2024): the scaled-linear path leaves a trace of the clip at t = 1 that
        # the DiT learns to read, so sampling took the layout from the starting noise, not the
        # caption. Against 'v' on seeds 0 / 1 (benchmarks/README.md, issue 19): held-out text-only
        # direction 0.61 / 0.56 -> 0.75 / 0.70 (0.80 / 0.97 at 2,000 steps), consistency with a
        # first frame 0.85 / 0.82 -> 0.98 / 0.90. 'v': the same without the rescaling (better than
        # rectified flow on every faithfulness number, issue 19); 'flow': rectified flow
        # x_t = (1 - t) x0 + t eps (experiments/shapes_flow.py; Wan 2.1's); 'eps': the paper's.
        objective="v_zero_snr",
        prediction="x0",           # flow only: network output 'x0' or 'velocity'; the loss is on velocity
        time_sampling="logit_normal",  # flow only
        ddpm_time_sampling="uniform",  # eps / v only: which of DDPM's 1000 steps training draws,
                                       # 'uniform' or 'logit_normal' (mean < 0: more at low noise)
        logit_mean=0.0,            # the logit-normal of either time sampling
        logit_std=1.0,
        min_t_for_x0=0.05,         # velocity from an x0 prediction divides by max(t, this)
    )

    c.cond = dict(
        first_frame="replace",     # 'replace': clean first latent replaces the noisy one (and is
                                   # masked out of the loss) plus channel concat; 'concat': concat only
        p_first=0.7,               # probability that a training example gets a first frame
        p_last=0.5,                # ... and, given a first frame, a last frame (1 - eta). 0.5, not
                                   # 0.75: first-frame-only examples (the I2V mode) are 35 % of the
                                   # batch instead of 17.5 %; with 3,500 steps I2V direction went
                                   # 0.75-0.80 -> 0.89 held-out (README, main job run 4)
        last_from=3,               # last-frame instruction drawn from the last `last_from` frames
        noise=0.1,                 # noise on c_image: flow time 0.1 ~ 100 of 1000 DDPM steps
        p_drop_text=0.1,           # text dropped (BOS only) for classifier-free guidance
        keyframe_sets="",          # keyframes anywhere (diffusion/task.py): "" draws PixelDance's first /
                                   # last frame from p_first and p_last exactly as before; else weights
                                   # of the sets drawn per example, e.g. "none:0.3,first:0.25,
                                   # first_last:0.2,first_middle:0.15,random:0.1,context:0.1" (normalised)
        keyframe_rate=0.25,        # the 'random' set: each latent frame a keyframe with this probability
        keyframe_drop=0.0,         # each keyframe but the first dropped with this probability
        keyframe_latents="frames",  # middle keyframes' latents: 'frames' one-frame encodings of pixel
                                   # frames 4k (the cache stage stores them as z_frames when a set
                                   # needs them) or 'clip' (the clip's own latent there; old caches)
        context_frames=2,          # the 'context' set (continuation in latent space): the first n
                                   # latents, clean, n uniform in 1..context_frames
        continue_turns=0.0,        # the 'continue' set, synthetic world only: this fraction of its
                                   # windows moves another way during the context, then as the caption
                                   # says (a story's next prompt); the cache stores each window's n
        first_latent_weight=1.0,   # loss weight of latent 0 where it is generated (no first frame):
                                   # it is in the loss of 1 - p_first of the examples only
        object_weight=0.0,         # loss weight 1 + w * (object map) per latent position
                                   # (diffusion/task.py object_map); 0: every position alike
    )

    c.train = dict(
        batch_size=32,
        num_steps=2000,            # 7.5-9 min on the 2-core CPU (batch 32, 80 tokens, 3 layers), issue 19's
                                   # time budget; with zero SNR 1,600 -> 2,000 steps raised held-out
                                   # text-only direction 0.75 / 0.70 -> 0.80 / 0.97 (seeds 0 / 1)
        # 1e-3 on the shapes DiT: at 1,600 steps consistency with a first frame 0.41-0.48 -> 0.70-0.78
        # and held-out text-only direction 0.33-0.36 -> 0.47-0.55 on seeds 0 and 1, text-only
        # consistency 0.77-0.80 -> 0.65-0.71 (benchmarks/README.md, issue 19). Experiments on real
        # data keep 5e-4 (their own get_config), the rate they were written with.
        lr=1e-3,
        warmup_steps=200,
        weight_decay=0.0,
        grad_clip=1.0,
        ema_decay=0.999,
        log_every=50,
        ckpt_every=500,
        keep_checkpoints=2,
        image_every=0,             # joint image-video training: every k-th batch is images (0: off)
        image_source="",           # where those images come from: "" the first latent frames of the
                                   # cached clips; or a source of data.sources (e.g. "images", an
                                   # image_folder of the videos' resolution), encoded by the cache
                                   # stage into the image cache (cache.image_path)
        lora_rank=0,               # > 0: LoRA adapters of this rank over config.dit.init_from's
                                   # frozen weights, instead of training every weight
        lora_targets="",           # comma-separated regexes of kernel paths ("": build.LORA_TARGETS,
                                   # attention, FFN and the widened patch embedding)
        lora_alpha=0.0,            # update scale alpha / rank (0: alpha = rank)
        lora_base_dtype="float32",  # the frozen base's storage: 'bfloat16' halves its memory (the
                                   # 14B's 53 GiB -> 27 GiB); merged kernels are then bfloat16, which
                                   # a bfloat16-compute DiT rounds them to at use anyway
    )

    c.sample = dict(
        sampler="euler",
        steps=8,                   # 8 Euler steps: the faithfulness of 25 at a third of the time
        # Text guidance 4: against 8 (two seeds, benchmarks/README.md issue 19), motion is smoother
        # (median smoothness I2V 1.32 -> 1.17, FLF2V 1.34 -> 1.22, text-only 1.37 -> 1.24 on seed
        # 0), objects steadier with a first frame (consistency 0.78 -> 0.85) and the last frame
        # closer (19.4 -> 21.5 dB), for text-only consistency (0.67 -> 0.63) and, on seed 0,
        # direction (0.67 -> 0.61). Long videos keep 8 (experiments/shapes_keyframes.py).
        guidance=4.0,
        image_guidance=1.5,        # image-instruction guidance (1: off, 2 branches per model call;
                                   # 1.5: I2V direction 0.797 -> 0.813 held-out, see README)
        tau=10,                    # last frame used for the first `tau` steps only
        shift=2.0,                 # time-grid shift t' = s t / (1 + (s - 1) t) (Wan 2.1: 3 at 480p, 5 at 720p);
                                   # 2 against 1 with zero SNR: held-out text-only direction 0.80 ->
                                   # 0.81 on seed 0 (0.97 both on seed 1), every other number within
                                   # 0.05 (benchmarks/README.md, issue 19)
        guidance_rescale=0.0,      # guided x0's spread brought this fraction of the way back to the
                                   # conditional branch's (Lin et al.; against strong guidance's
                                   # over-saturated colours); 0: off
        text_to_video="first_frame",  # no first frame given: the paper's route, a text-only pass makes
                                   # the first frame, then image-to-video from it with the text
                                   # (text-only direction 0.55 -> 0.64, 0.47 -> 0.59 held-out on seeds
                                   # 0 / 1, README); the frame decoded and encoded again (smoothness
                                   # 1.36 -> 1.24 against 'first_latent', its latent as it is);
                                   # 'direct': the one text-only pass
        batch_size=16,
        weights="ema",             # the DiT weights sampled: 'ema' (train.ema_decay's average) or
                                   # 'train' (the trained weights at the last step)
    )

    # Evaluators (pixeldance/evaluators/) of each trained model, by name: the VAE stage runs
    # `vae` on its final EMA weights ('reconstruction': held-out PSNR / SSIM, with
    # vae.eval_videos clips), the 'sample' stage runs `dit` on the trained pipeline
    # ('faithfulness': the synthetic world's exact scores; 'samples': samples of another
    # dataset's captions). every > 0: the trainers also run them every `every` steps (scores
    # only, logged as stages 'vae_eval' / 'dit_eval' in metrics.jsonl and TensorBoard).
    c.evals = dict(
        every=0,
        vae=("reconstruction",),
        dit=("faithfulness",),
        num_per_mode=128,          # faithfulness: held-out and seen videos sampled per mode
        heldout_fraction=0.5,
        num_mp4=4,                 # mp4 files written per mode
        # 'metrics' (FVD / FID / IS / CLIPSIM, pixeldance/evaluators/metrics.py): the protocol
        # (pixeldance/metrics/protocols.py), the root of the converted feature networks and the
        # cache of real-set statistics ("": $PIXELDANCE_NETWORKS / $PIXELDANCE_STATS, else
        # ~/.cache/pixeldance/{networks,stats}).
        protocol="shapes_17f",
        networks="",
        stats_dir="",
    )

    # Sampling sweeps on a trained workdir (`python -m pixeldance.tools.sweep`): every
    # combination of `grid` ("field=v1,v2;field=..." over sampler/steps/guidance/image_guidance/tau).
    c.sweep = dict(
        grid="",
        num_per_mode=64,
    )

    # Compile-ahead planning (`--config.mode=plan` or `python -m pixeldance.tools.plan`): the train
    # step and sampler compiled for a target mesh without its hardware (pixeldance/tools/plan.py).
    c.plan = dict(
        num_devices=0,             # forced host (CPU) devices to compile for (0: see topology)
        topology="",               # TPU topology, e.g. 'v5p:2x2x1' (pip install -e '.[tpu-plan]')
        num_slices=1,              # slices of that topology (data parallel across them)
        memory_gib=0.0,            # per-device memory to fit (0: the target's own, where known)
        sample=True,               # also compile the sampler (config.sample)
        output="",                 # also write the report here as JSON
        part="dit",                # 'dit': train step (+ sampler); 'text_encoder': the frozen encoder's forward
        text_arch="",              # a frozen encoder by name instead of its folder, e.g. 'umt5-xxl'
        height=0,                  # frame height and width in pixels (0: config.data.resolution),
        width=0,                   # e.g. Wan's 480 x 832
    )

    if arg.runlocal:
        c.xla_fast_compile = True
        c.data.num_frames = 9
        c.data.resolution = 32
        c.vae.variant = "mu"
        c.vae.batch_size = 8  # divisible by the 8 devices the tests force
        c.vae.train_size = 0
        c.vae.train_frames = 5
        c.vae.num_steps = 4
        c.vae.min_colour_acc = 0.0  # 4 steps learn no colours: the smoke test checks the plumbing
        c.vae.warmup_steps = 1
        c.vae.log_every = 2
        c.vae.ckpt_every = 2
        c.cache.num_videos = 8
        c.cache.batch_size = 4
        c.text.width = 32
        c.text.num_layers = 1
        c.text.num_heads = 2
        c.dit.variant = "mu"
        c.dit.depth = 0
        c.train.batch_size = 8
        c.train.num_steps = 4
        c.train.warmup_steps = 1
        c.train.log_every = 2
        c.train.ckpt_every = 2
        c.sample.steps = 3
        c.sample.tau = 1
        c.sample.batch_size = 4
        c.evals.num_per_mode = 4
        c.evals.num_mp4 = 1
        c.evals.protocol = "runlocal"
    return c
