"""Pinned evaluation protocols: every choice that changes an FVD / FID / IS / CLIPSIM number.

Two FVDs are comparable only when they were computed the same way: which clips (frames, stride or
fps, where in the video), how frames are resized (kernel, crop or squash, to what size), how many
real and generated videos (covariances of fewer than ~400 samples are rank-deficient and biased),
which network and which layer. Each protocol here writes all of it down, so a number of ours
carries its protocol's name and means one thing. README.md ("Evaluation protocols") explains
each choice and which published numbers each protocol is comparable to.

How a video becomes features under a protocol (`pixeldance/metrics/videos.py`,
`pixeldance/metrics/networks.py`):

  1. one clip of `num_frames` frames: every `stride`-th frame at the native rate (fps=0), or
     the nearest frame to each time at `fps`; starting at `clip_start`: 'random' (drawn from a
     generator seeded by the protocol's seed and the file name, so reruns pick the same clip),
     'start' or 'center';
  2. each frame to `resolution` x `resolution`: 'center' resizes the shorter side to
     `resolution` (PIL bilinear, antialiased when shrinking) and crops the centre; 'squash'
     resizes both sides. Generated videos go through the same step (a no-op at the size);
  3. per network, its own input step: I3D squashes to 224 x 224 (bilinear, no antialiasing, as
     the TF FVD reference) in [-1, 1] and gives 400 logits per clip (FVD); InceptionV3 resizes
     each frame to 299 (TF1 bilinear) and gives 2048 pool features (FID: `fid_frames` of every
     clip) and 1008 logits; C3D takes TGAN-v2's resize/crop/mean (IS on UCF-101 clips, 101
     classes); CLIP takes its resize/centre crop/normalisation per frame (CLIPSIM).
"""
from __future__ import annotations

import dataclasses

METRICS = ("fvd", "fid", "is", "clipsim")


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    summary: str
    comparable_to: str
    metrics: tuple[str, ...]
    # -- clips: the same for real and generated videos --
    num_frames: int = 16
    fps: float = 0.0              # 0: every `stride`-th frame at the video's own rate
    stride: int = 1
    clip_start: str = "random"    # 'random' (seeded per file) | 'start' | 'center'
    resolution: int = 256
    crop: str = "center"          # 'center' (shorter side to resolution, centre crop) | 'squash'
    # -- sets --
    dataset: str = ""             # what `pixeldance.evaluate` reads real clips and prompts from
    real_split: str = "test"
    num_real: int = 2048          # videos; a folder with more is subsampled (seeded), with fewer used whole
    num_generated: int = 2048
    seed: int = 0                 # clip starts, subsets, captions and generation noise
    # -- metrics --
    fid_frames: str = "all"       # 'all' frames of every clip | 'middle' one frame per clip
    is_network: str = "c3d"       # 'c3d' (video IS, UCF-101 classes) | 'inception' (frame IS)
    is_splits: int = 10
    clip_variant: str = "B/16"    # CLIPSIM's CLIP
    # -- generation (pixeldance.evaluate) --
    mode: str = "t2v"             # the instructions the model gets: 't2v' text only, 'i2v' text +
                                  # the real clip's first frame, 'flf2v' + its last frame
    sampler: str = "ddim"
    steps: int = 50
    guidance: float = 9.0
    image_guidance: float = 1.0

    def __post_init__(self):
        bad = [m for m in self.metrics if m not in METRICS]
        checks = {
            "metrics": not bad and self.metrics,
            "num_frames": self.num_frames >= 1, "stride": self.stride >= 1, "fps": self.fps >= 0,
            "clip_start": self.clip_start in ("random", "start", "center"),
            "crop": self.crop in ("center", "squash"), "resolution": self.resolution >= 8,
            "num_real": self.num_real >= 2, "num_generated": self.num_generated >= 2,
            "fid_frames": self.fid_frames in ("all", "middle"),
            "is_network": self.is_network in ("c3d", "inception"),
            "is_splits": 1 <= self.is_splits <= self.num_generated,
            "mode": self.mode in ("t2v", "i2v", "flf2v"),
        }
        wrong = [k for k, ok in checks.items() if not ok]
        if wrong:
            raise ValueError(f"protocol {self.name!r}: bad {wrong[0]}={getattr(self, wrong[0])!r}")

    def describe(self) -> dict:
        return dataclasses.asdict(self)


PROTOCOLS: dict[str, Protocol] = {}


def register(protocol: Protocol) -> Protocol:
    PROTOCOLS[protocol.name] = protocol
    return protocol


register(Protocol(
    name="fvd2048_16f",
    summary="StyleGAN-V's FVD: 2,048 real and 2,048 generated videos, one 16-frame clip of "
            "consecutive frames each from a random start, at the dataset's resolution (256), "
            "I3D logits on frames squashed to 224.",
    comparable_to="StyleGAN-V's tables and papers that report 'FVD_16' with its code (DIGAN, "
                  "MoCoGAN-HD re-evaluated by StyleGAN-V); not TGAN-v2/TATS numbers computed on "
                  "other counts or frame spacings.",
    metrics=("fvd",), num_frames=16, stride=1, clip_start="random", resolution=256, crop="center",
    dataset="", num_real=2048, num_generated=2048))

register(Protocol(
    name="ucf101_pixeldance",
    summary="PixelDance Table 2, UCF-101 zero-shot, as Boximator (same group, 'following "
            "PixelDance') states it: real statistics from 2,048 test videos (official list 1), "
            "16 frames each; 10,240 generated 16-frame videos from the class prompts; IS with "
            "TGAN-v2's C3D (10 splits), FID on all frames, FVD with I3D logits; DDIM 50 steps, "
            "guidance 9. Frames at 4 fps, the rate PixelDance trains on (not stated for the "
            "real clips); 256 x 256 centre crops.",
    comparable_to="PixelDance Table 2 and 3 (IS 42.10, FID 49.36, FVD 242.82) and Boximator; "
                  "other papers of that table used 10K train videos (VideoPoet) or other "
                  "counts: compare with care.",
    metrics=("is", "fid", "fvd"), num_frames=16, fps=4.0, clip_start="random", resolution=256,
    crop="center", dataset="ucf101", real_split="test", num_real=2048, num_generated=10240,
    is_network="c3d", is_splits=10, mode="t2v", sampler="ddim", steps=50, guidance=9.0))

register(Protocol(
    name="msrvtt_zeroshot",
    summary="PixelDance Table 1, MSR-VTT zero-shot: the 2,990 test videos, one caption each "
            "(drawn with the seed), one generated video per caption; CLIPSIM with CLIP ViT-B/16 "
            "on every frame (VideoPoet's backbone; the paper does not name one); FVD on 16 "
            "frames at 4 fps (Boximator's reading) from random starts; DDIM 50, guidance 9.",
    comparable_to="PixelDance Table 1 (CLIPSIM 0.3125, FVD 381); CLIPSIM numbers of papers that "
                  "used all 59,794 captions or ViT-B/32 differ by a few thousandths.",
    metrics=("clipsim", "fvd"), num_frames=16, fps=4.0, clip_start="random", resolution=256,
    crop="center", dataset="msrvtt", real_split="test", num_real=2990, num_generated=2990,
    clip_variant="B/16", mode="t2v", sampler="ddim", steps=50, guidance=9.0))

register(Protocol(
    name="msrvtt_zeroshot_b32",
    summary="msrvtt_zeroshot with CLIP ViT-B/32, the backbone of Make-A-Video's and CogVideo's "
            "CLIPSIM.",
    comparable_to="CLIPSIM tables computed with ViT-B/32.",
    metrics=("clipsim", "fvd"), num_frames=16, fps=4.0, clip_start="random", resolution=256,
    crop="center", dataset="msrvtt", real_split="test", num_real=2990, num_generated=2990,
    clip_variant="B/32", mode="t2v", sampler="ddim", steps=50, guidance=9.0))

register(Protocol(
    name="shapes_17f",
    summary="The synthetic world of the main job (experiments/shapes.py): 512 held-out real clips "
            "and 512 generated ones, all 17 frames at 64 x 64 (the world's own clips, so no crop "
            "or resampling), FVD and FID (all frames). Generation in the mode the protocol "
            "names, with the Pipeline's default sampler settings.",
    comparable_to="only runs of this codebase on the synthetic world under the same protocol.",
    metrics=("fvd", "fid"), num_frames=17, stride=1, clip_start="start", resolution=64,
    crop="squash", dataset="synthetic", real_split="heldout", num_real=512, num_generated=512,
    mode="flf2v", sampler="", steps=0, guidance=0.0, image_guidance=0.0))

register(Protocol(
    name="runlocal",
    summary="A seconds-long smoke protocol for tests and :runlocal workdirs: 16 videos of 9 frames "
            "at 32 x 32, every metric.",
    comparable_to="nothing: a smoke test.",
    metrics=("fvd", "fid", "is", "clipsim"), num_frames=9, stride=1, clip_start="start",
    resolution=32, crop="squash", dataset="synthetic", real_split="heldout", num_real=16,
    num_generated=16, fid_frames="middle", is_network="inception", is_splits=2, clip_variant="mu",
    mode="flf2v", sampler="", steps=0, guidance=0.0, image_guidance=0.0))


def get(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(sorted(PROTOCOLS))}")
    return PROTOCOLS[name]
