r"""Sampling API and command line.

  python -m pixeldance.sample --workdir=DIR --prompt="a red circle moves left" \
      [--first_frame=a.png] [--last_frame=b.png] [--keyframe=8:c.png[:TAU] ...] [--tau=10] \
      [--guidance=3] [--image_guidance=1] \
      [--sampler=euler|heun|dpm++2m|ddim] [--steps=25] [--seed=0] [--num_frames=17] \
      [--height=48 --width=80] [--resize] \
      [--num_clips=3 [--prompts="a red circle moves left|a red circle moves up|..."] \
       [--continuation=latent [--context_latents=2]]] --output=out.mp4
  python -m pixeldance.sample --workdir=DIR --storyboard=story.yaml --output=story.mp4   (pixeldance/story.py)

From Python: `pipe = pixeldance.load_pipeline(DIR); video = pipe.generate("a red circle moves left")`
(uint8 [F, H, W, 3]); `pipe.generate(prompt, keyframes={8: image})` adds keyframes at any pixel
frames (`Pipeline.generate_batch`); `pipe.generate(prompt, num_clips=N)` chains N clips into one long video
(`pipe.generate_clips` yields them clip by clip, with `continuation='latent'` each clip continued
from the previous one's last latents and the whole video decoded as one; `pipe.generate_story(storyboard)` a story of
segments, `pixeldance/story.py`); `height=` / `width=` make other sizes than the
training resolution (any multiple of the VAE's and the DiT patch's factors, e.g. the buckets the
DiT trained on); and `vae = pixeldance.load_vae(DIR)` with `encode` / `decode`.

The Pipeline is thin: models come from `build`, weights and latent statistics from `workdir`
(EMA weights only, sharded over a mesh of this process's devices), and the sampler is the
PixelDance task's `guided_sample` (`diffusion/task.py`), the same function the planner compiles.

Axis letters (glossary: pixeldance/models/__init__.py): B batch, F frames, H/W pixel height/width,
T latent frames, h/w latent height/width, C latent channels.
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before JAX is imported: glibc reads it only at start (hugepages.py)
    from pixeldance import hugepages
    hugepages.reexec()

import functools
import os
import tempfile
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from flax import linen as nn

from pixeldance import build, cli, logs, sharding, story, workdir as workdir_lib
from pixeldance import rng as rng_lib
from pixeldance.data import video_io
from pixeldance.diffusion import conditioning
from pixeldance.diffusion import guidance as guidance_lib
from pixeldance.diffusion import samplers
from pixeldance.diffusion.task import PixelDanceTask
from pixeldance.models import vae_inference

INFERENCE_PRESET = "fsdp"
CONTINUATIONS = ("reencode", "latent")  # how a long video's clips continue (`Pipeline.generate_clips`)
# How an example with no first frame is sampled (config.sample.text_to_video): 'direct', one
# text-only pass; 'first_frame', the paper's route: a text-only pass makes the first frame, then
# image-to-video from it with the same text (`Pipeline._sample_batch`), the frame decoded and
# encoded as any given first frame is; 'first_latent', the same with the text-only pass's latent
# frame 0 given as it is (no pixels in between); 'image', the paper's route proper: a one-frame
# text-to-image pass (a DiT trained with image batches, config.train.image_every) makes the first
# frame, then one image-to-video pass.
TEXT_TO_VIDEO = ("direct", "first_frame", "first_latent", "image")


def inference_mesh(devices=None):
    """The mesh weights are loaded onto for sampling: every device of this process on 'fsdp'
    (weights split by the 'fsdp' preset's rules; a batch whose size the devices divide is split
    over them too). One device: everything on it."""
    return sharding.make_mesh((1, -1, 1, 1), devices)


class VideoVAE:
    """A trained causal video VAE.

    encode: uint8 [B, F, H, W, 3] with F = 1 + 4k -> float32 latents [B, 1 + k, H/8, W/8, C]
      (posterior means). decode: latents -> uint8 [B, 1 + 4(T-1), 8h, 8w, 3]. (4 and 8: the
      model's temporal_factor and spatial_factor.)
    """

    def __init__(self, model, params):
        self.model, self.params = model, params
        self._encode = jax.jit(lambda p, v: model.apply(
            p, v.astype(jnp.float32) / 127.5 - 1.0, method=model.encode)[0])
        self._decode_float = jax.jit(lambda p, z: model.apply(p, z, method=model.decode))
        self._decode = jax.jit(lambda p, z: jnp.clip(
            jnp.round((model.apply(p, z, method=model.decode) + 1.0) * 127.5), 0, 255).astype(jnp.uint8))
        self._stream_programs = {}

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(T, h, w, C) of F frames of H x W pixels (`build.latent_shape`)."""
        return build.latent_shape(self.model, num_frames, height, width)

    def encode(self, video) -> np.ndarray:
        video = np.asarray(video)
        if video.dtype != np.uint8 or video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"encode wants uint8 [B, F, H, W, 3], got {video.dtype} {video.shape}")
        return np.asarray(self._encode(self.params, video))

    def decode(self, latents) -> np.ndarray:
        return np.asarray(self._decode(self.params, self._check_latents(latents)))

    def stream_decoder(self, chunk: int = 1) -> vae_inference.StreamDecoder:
        """A new streaming decode (`vae_inference.StreamDecoder`, uint8 frames): push(latents
        [B, t, h, w, C]) -> uint8 [B, F', 8h, 8w, 3], the first push 1 + 4(t - 1) frames, later
        ones 4t, decoded causally as one video. The compiled code is kept for the next one."""
        if chunk not in self._stream_programs:
            self._stream_programs[chunk] = vae_inference.StreamDecoder.programs(self.model, chunk, uint8=True)
        return vae_inference.StreamDecoder(self.model, self.params, programs=self._stream_programs[chunk])

    def decode_float(self, latents) -> jax.Array:
        """Latents -> float32 video [B, F, H, W, 3], nominally in [-1, 1] (not clipped)."""
        return self._decode_float(self.params, self._check_latents(latents))

    @staticmethod
    def _check_latents(latents) -> np.ndarray:
        latents = np.asarray(latents, np.float32)
        if latents.ndim != 5:
            raise ValueError(f"decode wants latents [B, T, h, w, C], got {latents.shape}")
        return latents


def load_vae(workdir_or_path: str, *, mesh=None) -> VideoVAE:
    """The VAE of a workdir (or of a folder with config.json and vae/ checkpoints): the EMA weights
    of its newest checkpoint, or the open Wan 2.1 VAE converted by `python -m
    pixeldance.convert.wan_vae` (config.json: vae.family 'wan'). Weights are placed on `mesh`
    (default `inference_mesh()`)."""
    config = workdir_lib.read_config(workdir_or_path)
    model = build.vae(config, workdir_lib.read_model_spec(workdir_or_path))
    mesh = inference_mesh() if mesh is None else mesh
    s = model.spatial_factor
    init_fn = build.vae_init_fn(model, 1, s, s)  # the parameters do not depend on the video's shape
    directory = os.path.join(workdir_or_path, workdir_lib.VAE_DIR)
    if config.vae.get("family", "causal") == "wan":  # converted weights: parameters, no train state
        return VideoVAE(model, workdir_lib.load_params(directory, init_fn, mesh, INFERENCE_PRESET))
    params, _ = workdir_lib.load_ema_params(directory, init_fn, mesh, INFERENCE_PRESET)
    return VideoVAE(model, params)


def sampler_fn(task: PixelDanceTask, model, *, steps: int, sampler: str, branches: int, shift: float = 1.0,
               guidance_rescale: float = 0.0):
    """The Pipeline's sampler, (params, noise, z_first, z_last, has_first, has_last, text, rng,
    guidance, image_guidance, tau, null_text) -> normalised latents (`PixelDanceTask.guided_sample`
    with the model and the static settings bound): what the Pipeline jits, and the planner compiles."""
    return functools.partial(task.guided_sample, model, steps=steps, sampler=sampler, branches=branches,
                             shift=shift, guidance_rescale=guidance_rescale)


def check_tau(tau, steps, config_steps: int, prefix: str = ""):
    """A one-line ValueError naming `prefix` + 'tau' unless a given tau (None: not given) is an
    integer in [0, S], S the sampling steps: `steps`, or when that is None the workdir's
    `config_steps`. (A tau from the config is not checked: one above the steps uses the last
    frame at every step, as tau = S does.)"""
    S = config_steps if steps is None else int(steps)
    if tau is not None and not (samplers.is_int(tau) and 0 <= tau <= S):
        source = f"{prefix}steps" if steps is not None else "the workdir's config.sample.steps"
        raise ValueError(f"{prefix}tau must be an integer in [0, {S}] (0 to {source}), got {tau}")


def check_sample_config(sample, prefix: str = "config.sample.") -> None:
    """Sampling settings from a config (config.sample, or one setting of a sweep's grid: a
    mapping with any of its fields), checked before anything runs: `pixeldance.main` checks
    config.sample before its first stage and `tools.sweep` every grid setting before loading the
    model, so a typo fails in a second, not after the VAE and DiT stages or the sweep's first
    settings. One-line ValueErrors naming `prefix` + the field: the ranges of
    `samplers.check_settings` (steps, guidance, image_guidance, sampler, shift), guidance_rescale in
    [0, 1], text_to_video one of `TEXT_TO_VIDEO`, weights one of `workdir.WEIGHTS`, tau an
    integer >= 0 (above the steps it keeps the last frame at every step, `check_tau`),
    batch_size an integer >= 1."""
    get = sample.get
    samplers.check_settings(prefix, steps=get("steps"), guidance=get("guidance"),
                            image_guidance=get("image_guidance"), sampler=get("sampler"), shift=get("shift"))
    route = get("text_to_video")
    if route is not None and route not in TEXT_TO_VIDEO:
        raise ValueError(f"{prefix}text_to_video must be one of {', '.join(TEXT_TO_VIDEO)}, got {route!r}")
    rescale = get("guidance_rescale")
    if rescale is not None and not (samplers.as_number(rescale) is not None and 0.0 <= samplers.as_number(rescale) <= 1.0):
        raise ValueError(f"{prefix}guidance_rescale must be a number in [0, 1], got {rescale}")
    weights = get("weights")
    if weights is not None and weights not in workdir_lib.WEIGHTS:
        raise ValueError(f"{prefix}weights must be one of {', '.join(workdir_lib.WEIGHTS)}, got {weights!r}")
    for name, low in (("tau", 0), ("batch_size", 1)):
        value = get(name)
        if value is not None and not (samplers.is_int(value) and value >= low):
            raise ValueError(f"{prefix}{name} must be an integer >= {low}, got {value}")


def _and(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Pipeline:
    """Text (+ first frame, + last frame) -> video, with classifier-free guidance and tau.

    config: the workdir's; vae: a `VideoVAE`; model, params: the DiT (`build.dit`) and its
    weights; text: `build.text_conditioner(config)` (captions -> the DiT's text input); stats: the
    `workdir.LatentStats` the DiT was trained with; mesh: where the weights live (the sampler runs
    under its logical rules); step: the DiT training step of the weights (for logs).
    """

    def __init__(self, config, vae: VideoVAE, model, params, text, stats: workdir_lib.LatentStats,
                 mesh=None, step: int | None = None):
        self.config, self.vae, self.model, self.params, self.step = config, vae, model, params, step
        self.text, self.stats = text, stats
        self.task = build.task(config)
        self.mesh = inference_mesh() if mesh is None else mesh
        self.resolution = config.data.resolution  # the default height and width
        self.num_frames = config.data.num_frames
        self._jitted = {}

    def _static_settings(self) -> dict:
        """The compiled samplers' static settings read from config.sample at every call (in their
        cache keys: a sweep may change them between calls): shift and guidance_rescale."""
        s = self.config.sample
        return dict(shift=float(s.get("shift", 1.0)), guidance_rescale=float(s.get("guidance_rescale", 0.0)))

    def sample_latents(self, noise, z_first, z_last, has_first, has_last, text, rng, guidance,
                       image_guidance, tau, *, steps: int, sampler: str, branches: int):
        """Normalised latents [B, T, h, w, C] (`sampler_fn`), compiled once per static setting and
        shape, run on this pipeline's mesh. Instruction latents are normalised; text: the DiT's
        text input (`self.text(prompts)`), guided against `self.text.null`."""
        static = self._static_settings()
        key = (steps, sampler, branches) + tuple(static.values())
        if key not in self._jitted:
            self._jitted[key] = jax.jit(sampler_fn(self.task, self.model, steps=steps, sampler=sampler,
                                                   branches=branches, **static))
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.rules(INFERENCE_PRESET)):
            return self._jitted[key](self.params, noise, z_first, z_last, has_first, has_last, text, rng,
                                     guidance, image_guidance, tau, self.text.null)

    def sample_keyframe_latents(self, noise, z_keys, positions, given, key_tau, text, rng, guidance,
                                image_guidance, keyframe_guidance=None, z_context=None, context=None, *,
                                steps: int, sampler: str, branches: int):
        """Normalised latents [B, T, h, w, C] from keyframes anywhere (`PixelDanceTask.keyframe_sample`:
        z_keys [B, K, h, w, C] normalised, positions int32 [B, K], given bool [B, K], key_tau int32
        [B, K]; keyframe_guidance: float32 scalar with branches = 4; z_context [B, T, h, w, C]
        normalised with context bool [B, T]: latents given as context, continuation in latent
        space), compiled once per static setting and shape (with context or without), run on
        this pipeline's mesh."""
        static = self._static_settings()
        key = ("keyframes" if context is None else "context", steps, sampler, branches) + tuple(static.values())
        if key not in self._jitted:
            self._jitted[key] = jax.jit(functools.partial(
                self.task.keyframe_sample, self.model, steps=steps, sampler=sampler, branches=branches,
                **static))
        args = (self.params, noise, z_keys, positions, given, key_tau, text, rng, guidance, image_guidance,
                self.text.null, keyframe_guidance) + (() if context is None else (z_context, context))
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.rules(INFERENCE_PRESET)):
            return self._jitted[key](*args)

    def keyframe_slots(self, first_frames, last_frames, keyframes, *, num_frames: int, height: int, width: int,
                       tau: int, steps: int):
        """The image instructions of a batch as keyframe slots: (images uint8 [K, B, H, W, 3],
        positions int32 [B, K], given bool [B, K], key_tau int32 [B, K]); images[k] are slot k's.

        first_frames, last_frames: B entries, each None or uint8 [H, W, 3] (slots 1 and 0: latent 0,
        always shown, and latent T - 1, shown for steps < tau). keyframes: None or B entries, each
        None or a dict {pixel frame: image or (image, tau_k)}: slots 2.. . A pixel frame goes to
        its latent frame by `conditioning.latent_index` (tf * k exactly, others the nearest such;
        -1 is the last frame); one at latent 0 is a first frame (always shown: its tau is
        ignored); tau_k is an integer in [0, steps] (default `tau`, which may exceed steps when
        it is the config's: shown at every step). Two keyframes of one example
        on one latent frame are refused in one line."""
        F, H, W = num_frames, height, width
        B = len(first_frames)
        keyframes = [None] * B if keyframes is None else list(keyframes)
        if len(keyframes) != B:
            raise ValueError(f"keyframes has {len(keyframes)} entries for {B} prompts")
        T = self.vae.latent_shape(F, H, W)[0]
        tf = (F - 1) // (T - 1) if T > 1 else 1
        blank = np.zeros((H, W, 3), np.uint8)
        extra = []  # per example: [(latent, image, tau)]
        for b in range(B):
            taken = {0: "first_frame"} if first_frames[b] is not None else {}
            if last_frames[b] is not None and T > 1:  # (T = 1: the first frame is the last, as always)
                taken[T - 1] = "last_frame"
            mine = []
            for pixel, value in (keyframes[b] or {}).items():
                own = isinstance(value, tuple)  # a tau given with the keyframe; else the call's
                image, k_tau = value if own else (value, tau)
                if not (isinstance(pixel, (int, np.integer)) and not isinstance(pixel, bool)):
                    raise ValueError(f"keyframes[{b}]: pixel frame {pixel!r} is not an integer")
                latent = conditioning.latent_index(int(pixel), F, tf)
                if latent in taken:
                    raise ValueError(f"keyframes[{b}]: the keyframe at pixel frame {pixel} and {taken[latent]} fall on "
                                     f"the same latent frame {latent} (pixel frame {conditioning.anchor_pixel(latent, tf)}"
                                     f"; keyframes sit at pixel frames 0, {tf}, {2 * tf}, ...)")
                taken[latent] = f"the keyframe at pixel frame {pixel}"
                # The call's tau is checked by `_settings` (one from the config above the steps
                # shows the keyframe at every step, like tau = steps); a keyframe's own is checked here.
                if own and not (samplers.is_int(k_tau) and 0 <= k_tau <= steps):
                    raise ValueError(f"keyframes[{b}][{pixel}]: tau must be an integer in [0, {steps}] (0 to the "
                                     f"sampling steps), got {k_tau}")
                image = self._check_image(image, f"keyframes[{b}][{pixel}]", H, W)
                mine.append((latent, image, conditioning.ALWAYS if latent == 0 else int(k_tau)))
            extra.append(mine)
        K = 2 + max((len(e) for e in extra), default=0)
        images = np.zeros((K, B, H, W, 3), np.uint8)
        positions = np.full((B, K), -1, np.int32)  # -1: an unused slot
        given = np.zeros((B, K), bool)
        key_tau = np.zeros((B, K), np.int32)
        for b in range(B):
            # Slot 0 the last frame, slot 1 the first (as `PixelDanceTask.guided_sample`), then the rest.
            slots = [(T - 1, last_frames[b], tau), (0, first_frames[b], conditioning.ALWAYS)] + extra[b]
            for k, (latent, image, k_tau) in enumerate(slots):
                positions[b, k], key_tau[b, k] = latent, k_tau
                given[b, k] = image is not None
                images[k, b] = blank if image is None else image
        return images, positions, given, key_tau

    def _check_image(self, image, name: str, height: int, width: int) -> np.ndarray:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.shape != (height, width, 3):
            raise ValueError(f"{name} must be uint8 [{height}, {width}, 3] for these videos, got "
                             f"{image.dtype} {image.shape}")
        return image

    def _settings(self, num_frames, steps, guidance, tau, sampler, image_guidance, height=None,
                  width=None, *, num_clips: int = 1, prefix: str = "", text_to_video: str | None = None) -> dict:
        """The sampling settings, None filled in from the workdir's config.sample (and the
        training clip size; text_to_video 'direct' for a workdir whose config predates it),
        checked (`check_settings`, `check_tau`, and whether the size fits the VAE and the DiT):
        one-line ValueErrors naming `prefix` + the argument."""
        samplers.check_settings(prefix, steps=steps, guidance=guidance, image_guidance=image_guidance, num_frames=num_frames,
                       height=height, width=width, num_clips=num_clips, sampler=sampler)
        s = self.config.sample
        check_tau(tau, steps, s.steps, prefix)
        sampler = s.sampler if sampler is None else sampler
        source = "" if text_to_video is not None else " (from the workdir's config.sample.text_to_video)"
        text_to_video = s.get("text_to_video", "direct") if text_to_video is None else text_to_video
        if text_to_video not in TEXT_TO_VIDEO:
            raise ValueError(f"{prefix}text_to_video must be one of {', '.join(TEXT_TO_VIDEO)}, got "
                             f"{text_to_video!r}{source}")
        if sampler not in samplers.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r} in the workdir's config.sample; choose from "
                             f"{samplers.SAMPLERS}")
        F = self.num_frames if num_frames is None else int(num_frames)
        H = self.resolution if height is None else int(height)
        W = self.resolution if width is None else int(width)
        try:
            _, h, w, _ = self.vae.latent_shape(F, H, W)  # one line if the VAE cannot compress this size
        except ValueError as e:
            raise ValueError(f"{self._misfits(F, H, W, prefix)} not fit the model: {e}") from None
        patch = build.dit_patch(self.config)
        if h % patch[1] or w % patch[2]:
            names = [prefix + n for n, bad in (("height", h % patch[1]), ("width", w % patch[2])) if bad]
            raise ValueError(f"{_and(names)} {'does' if len(names) == 1 else 'do'} not fit the model: {H}x{W} "
                             f"pixels give {h}x{w} latents, which the DiT's {patch[1]}x{patch[2]} patches do not "
                             f"tile: use multiples of {(H // h) * max(patch[1:])}")
        if num_clips > 1 and F < 5:
            raise ValueError(f"{prefix}num_clips > 1 needs {prefix}num_frames >= 5 (clips share a frame), got {F}")
        return dict(num_frames=F, height=H, width=W, steps=s.steps if steps is None else int(steps),
                    guidance=s.guidance if guidance is None else float(guidance),
                    tau=s.tau if tau is None else int(tau), sampler=sampler, text_to_video=text_to_video,
                    image_guidance=s.get("image_guidance", 1.0) if image_guidance is None else float(image_guidance))

    def _misfits(self, F: int, H: int, W: int, prefix: str) -> str:
        """'<names> does' / '<names> do': which of num_frames, height, width the VAE cannot
        compress, each tried beside the training clip's (known good) others."""
        R, F0 = self.resolution, self.num_frames
        names = []
        for name, shape in (("num_frames", (F, R, R)), ("height", (F0, H, R)), ("width", (F0, R, W))):
            try:
                self.vae.latent_shape(*shape)
            except ValueError:
                names.append(prefix + name)
        names = names or [prefix + n for n in ("num_frames", "height", "width")]
        return f"{_and(names)} {'does' if len(names) == 1 else 'do'}"

    def warn_long_prompts(self, prompts: Sequence[str]) -> list[int]:
        """Logs one warning line for each distinct prompt longer than the text encoder's
        max_length (in tokens, special ones included), which is cut to it, naming how many
        tokens are dropped. Returns the dropped counts, per distinct prompt in order."""
        distinct = list(dict.fromkeys(prompts))
        limit = self.text.max_length
        dropped = [max(0, n - limit) for n in self.text.num_tokens(distinct)]
        for prompt, d in zip(distinct, dropped):
            if d:
                logging.warning("prompt %r has %d tokens, more than the text encoder's %d: truncated, the last %d "
                                "dropped", _shorten(prompt), limit + d, limit, d)
        return dropped

    def generate_story(self, storyboard, **overrides) -> Iterator[np.ndarray]:
        """A storyboard (`story.Storyboard`, or a JSON / YAML file path) -> uint8 frame chunks
        [n, H, W, 3], clip by clip; overrides replace its settings (`story.generate_story`)."""
        return story.generate_story(self, storyboard, **overrides)

    def generate_batch(self, prompts: Sequence[str], first_frames=None, last_frames=None, *, keyframes=None,
                       num_frames: int | None = None, height: int | None = None, width: int | None = None,
                       steps: int | None = None, guidance: float | None = None, tau: int | None = None,
                       seed: int = 0, sampler: str | None = None, image_guidance: float | None = None,
                       keyframe_guidance: float | None = None, text_to_video: str | None = None) -> np.ndarray:
        """B prompts, optional per-example first/last frames (uint8 [H, W, 3] or None) -> uint8 [B, F, H, W, 3].

        keyframes: None or B entries, each None or {pixel frame: image or (image, tau_k)}: images
        at any frames (e.g. {8: middle, 16: (last, 5)}), each shown for the first tau_k sampling
        steps (default `tau`; one at pixel 0 is a first frame, always shown). A pixel frame that
        is not 0 or a multiple of the VAE's temporal factor (4) goes to the nearest one
        (`Pipeline.keyframe_slots`, `conditioning.latent_index`). Without keyframes this samples
        exactly what first/last frames always did.
        height, width: the videos' size (default: the training resolution). guidance scales the
        text, image_guidance the image instructions (1: no image guidance, the faster 2-branch
        batch); both default to the workdir's config.sample. keyframe_guidance (None: image_guidance)
        scales the keyframes after the first frame on their own, image_guidance then the first
        frame (a fourth guidance branch, `guidance.combine`); last_frames are such keyframes too.
        text_to_video (`TEXT_TO_VIDEO`; default the workdir's config.sample.text_to_video): how
        an example without a first frame is made; 'first_frame' samples it twice, the text-only
        pass's first frame (decoded and encoded again; 'first_latent': its latent as it is)
        becoming the first-frame instruction of the second.
        """
        samplers.check_settings(keyframe_guidance=keyframe_guidance)
        return self._generate_batch(prompts, first_frames, last_frames, jax.random.key(seed), keyframes=keyframes,
                                    keyframe_guidance=keyframe_guidance,
                                    **self._settings(num_frames, steps, guidance, tau, sampler, image_guidance,
                                                     height, width, text_to_video=text_to_video))

    def _generate_batch(self, prompts, first_frames, last_frames, key, **kwargs) -> np.ndarray:
        """generate_batch with a random key and checked settings (`_settings`): `_sample_batch`,
        decoded."""
        return self.vae.decode(self.stats.denormalise(self._sample_batch(prompts, first_frames, last_frames, key,
                                                                         **kwargs)))

    def _sample_batch(self, prompts, first_frames, last_frames, key, *, num_frames: int, height: int,
                      width: int, steps: int, guidance: float, tau: int, sampler: str,
                      image_guidance: float, keyframes=None, keyframe_guidance: float | None = None,
                      context=None, text_to_video: str = "direct") -> jax.Array:
        """Normalised latents [B, T, h, w, C] of generate_batch with a random key and checked
        settings (`_settings`); the key's streams 0 and 1 draw the initial noise and the
        instruction noise. context: None, or (z_context [B, T, h, w, C] normalised, bool [B, T]),
        latents given as context (continuation in latent space; an example with context needs
        no first frame for its last frame). text_to_video='first_frame' / 'first_latent': the
        examples with neither a first frame nor a context latent at frame 0 are sampled again
        (streams 3 and 4), the first pass's first frame (re-encoded / its latent as it is) given
        as their first frame."""
        F, B, H, W = num_frames, len(prompts), height, width
        first_frames = [None] * B if first_frames is None else list(first_frames)
        last_frames = [None] * B if last_frames is None else list(last_frames)
        for b in range(B):
            if last_frames[b] is not None and first_frames[b] is None and not (context is not None
                                                                               and np.any(context[1][b])):
                raise ValueError("a last frame needs a first frame (PixelDance's instructions are [first, ..., last])")
        first_frames = [None if f is None else self._check_image(f, "first_frame", H, W) for f in first_frames]
        last_frames = [None if f is None else self._check_image(f, "last_frame", H, W) for f in last_frames]
        images, positions, given, key_tau = self.keyframe_slots(first_frames, last_frames, keyframes, num_frames=F,
                                                                height=H, width=W, tau=tau, steps=steps)
        K = images.shape[0]
        # Every instruction image encodes as a one-frame video, in one call: first frames, last
        # frames, then the other keyframes' slots.
        order = [1, 0] + list(range(2, K))
        z_img = self.stats.normalise(self.vae.encode(images[order].reshape(K * B, 1, H, W, 3))[:, 0])
        z_img = z_img.reshape(K, B, *z_img.shape[1:])[np.argsort(order)]  # back to slot order
        z_keys = np.moveaxis(z_img, 0, 1)  # [B, K, h, w, C]
        T, h, w, C = self.vae.latent_shape(F, H, W)
        noise = rng_lib.normal(jax.random.fold_in(key, 0), (B, T, h, w, C))
        text = self.text(prompts)
        z_context, in_context = (None, None) if context is None else (jnp.asarray(c) for c in context)
        branches = guidance_lib.num_branches(image_guidance, keyframe_guidance)

        def run(noise, z_keys, given, rng):
            return self.sample_keyframe_latents(noise, jnp.asarray(z_keys), jnp.asarray(positions), jnp.asarray(given),
                                                jnp.asarray(key_tau), text, rng, jnp.float32(guidance),
                                                jnp.float32(image_guidance),
                                                None if keyframe_guidance is None else jnp.float32(keyframe_guidance),
                                                z_context, in_context, steps=steps, sampler=sampler, branches=branches)

        # Examples with no first frame (and no context latent at frame 0) get one of their own.
        own = ~given[:, 1] & ~(np.zeros(B, bool) if context is None else np.asarray(context[1])[:, 0])
        if text_to_video == "image" and own.any():
            # The paper's route proper: a one-frame text-to-image pass (streams 5 and 6), decoded
            # and encoded as a given first frame is; then the rows without one sample
            # image-to-video from it. Needs a DiT trained with image batches; on the synthetic
            # world those cost the video model its motion (issue 19), so it is not the default.
            z1 = run(rng_lib.normal(jax.random.fold_in(key, 5), (B, 1, h, w, C)), z_keys,
                     np.zeros_like(np.asarray(given)), jax.random.fold_in(key, 6))
            z_keys, given = self._give_first_frames(z_keys, given, own, np.asarray(z1)[:, 0], reencode=True)
        z = run(noise, z_keys, given, jax.random.fold_in(key, 1))
        # The paper's route from a text-only video pass's frame 0: sample those rows again.
        if text_to_video in ("first_frame", "first_latent") and own.any():
            # The text-only pass's latent 0 is the causal VAE's latent of its frame 0 alone, so it
            # could stand in for an encoded first frame as it is ('first_latent'). But the DiT's
            # latents are not quite the encoder's, and the second pass learned image-to-video on
            # encoded frames only: decoding frame 0 and encoding it again, as the paper's route
            # hands a text-to-image frame over, gave smoother motion (text-only smoothness 1.36 ->
            # 1.24 at guidance 4, 1.50 -> 1.37 at 8) and steadier objects (benchmarks/README.md,
            # issue 19). Only the rows without a first frame take theirs. Fresh noise for the
            # second pass: the first pass's also carries a motion of its own.
            z_keys, given = self._give_first_frames(z_keys, given, own, np.asarray(z)[:, 0],
                                                    reencode=text_to_video == "first_frame")
            z2 = run(rng_lib.normal(jax.random.fold_in(key, 3), (B, T, h, w, C)), z_keys, given,
                     jax.random.fold_in(key, 4))
            # The others keep their first pass: what 'direct' samples for them.
            z = jnp.where(jnp.asarray(own)[:, None, None, None, None], z2, z)
        return z

    def _give_first_frames(self, z_keys, given, own, latents, *, reencode: bool):
        """(z_keys [B, K, h, w, C], given bool [B, K]) with the first-frame slot (1) of the rows
        `own` (bool [B]) set to `latents` [B, h, w, C] (normalised), decoded to a frame and
        encoded again if `reencode`; the other rows as they were. One frame each way for all B
        rows: one program shape for any mix of rows."""
        if reencode:
            frame = self.vae.decode(self.stats.denormalise(latents[:, None]))  # uint8 [B, 1, H, W, 3]
            latents = np.asarray(self.stats.normalise(self.vae.encode(frame)[:, 0]))
        z_keys = np.array(z_keys)
        z_keys[own, 1] = latents[own]
        return z_keys, given | (own[:, None] & (np.arange(z_keys.shape[1]) == 1)[None])

    def generate(self, prompt: str | Sequence[str], first_frame=None, last_frame=None, *, num_clips: int = 1,
                 num_frames: int | None = None, height: int | None = None, width: int | None = None,
                 steps: int | None = None, guidance: float | None = None, tau: int | None = None, seed: int = 0,
                 sampler: str | None = None, image_guidance: float | None = None, keyframes=None,
                 continuation: str = "reencode", context_latents: int | None = None,
                 text_to_video: str | None = None) -> np.ndarray:
        """One video, uint8 [F + (num_clips - 1)(F - 1), H, W, 3] (F = num_frames; H, W = height,
        width, default the training resolution): with num_clips > 1 a long video of clips chained
        on their boundary frames (see `generate_clips` for prompt, last_frame and keyframes per
        clip, and for continuation='latent', which makes F + (num_clips - 1) 4(T - K) frames).
        steps/guidance/image_guidance/tau/sampler default to the workdir's config.sample."""
        return np.concatenate(list(self.generate_clips(
            prompt, first_frame, last_frame, num_clips=num_clips, num_frames=num_frames, height=height,
            width=width, steps=steps, guidance=guidance, tau=tau, seed=seed, sampler=sampler,
            image_guidance=image_guidance, keyframes=keyframes, continuation=continuation,
            context_latents=context_latents, text_to_video=text_to_video)))

    def generate_clips(self, prompt: str | Sequence[str], first_frame=None, last_frame=None, *,
                       num_clips: int = 1, num_frames: int | None = None, height: int | None = None,
                       width: int | None = None, steps: int | None = None, guidance: float | None = None,
                       tau: int | None = None, seed: int = 0, sampler: str | None = None,
                       image_guidance: float | None = None, keyframes=None, continuation: str = "reencode",
                       context_latents: int | None = None, text_to_video: str | None = None
                       ) -> Iterator[np.ndarray]:
        """A long video, autoregressively: yields the new frames of each of `num_clips` clips.

        continuation='reencode' (the default, PixelDance's): clip k + 1 takes the last decoded
        frame of clip k as its first-frame instruction (re-encoded by the VAE). The first clip
        yields uint8 [F, H, W, 3], each later one [F - 1, H, W, 3] (its frame 0 stands for the
        previous clip's last frame, already yielded), so together they are
        F + (num_clips - 1)(F - 1) frames with no repeated boundary frame.

        continuation='latent' (continuation in latent space, no decode and re-encode): clip k + 1
        is sampled with the last K = context_latents latent frames of clip k (default
        config.cond.context_frames, an integer in [1, T - 1], T the clip's latent frames) at its
        latent frames 0..K-1, clean: shown as context keyframes at every step and, with
        first_frame='replace', held fixed in x (`PixelDanceTask.keyframe_sample`; the model
        learns them from training's 'context' keyframe set). The latents are decoded as one
        video by the VAE's causal decoder, the cache carried across clips
        (`vae_inference.StreamDecoder`): clip 0 yields its F = 1 + 4(T - 1) frames, each later
        clip the 4(T - K) frames of its latents K..T-1, so F + (num_clips - 1) 4(T - K) frames
        in all, the boundaries decoded like any other latent frame. Only the current clip's
        latents, the K carried ones and the decoder's cache are held; the context latents are
        traced, so the sampler compiles once for any num_clips (clip 0 runs it with no context).
        A later clip's keyframes and pixel frames count from its own frame 0, whose frames
        0..4(K-1) are the previous clip's: keyframes there are refused in one line.

        prompt: one str for every clip, or a list/tuple of num_clips str (one per clip).
        first_frame: uint8 [H, W, 3] or None, the first clip's first frame.
        last_frame: None; one uint8 [H, W, 3] image, the final clip's last frame (where the long
          video ends; later clips always have a first frame, so it needs no first_frame when
          num_clips > 1); or a list/tuple of num_clips entries, each None or an image, per clip.
        keyframes: None; a dict {pixel frame: image or (image, tau_k)} (`generate_batch`) with
          num_clips = 1; or a list/tuple of num_clips entries, each None or such a dict, per clip
          (clips after the first have their first frame already: none at pixel 0).
        seed: the first clip draws as `generate(..., seed=seed)` does (so num_clips=1 is the
          plain single clip); clip k > 0 draws from a key derived from (seed, k), with either
          continuation.
        text_to_video: how a first clip without first_frame is made (`generate_batch`).

        The arguments are checked at the call, before any clip is sampled (one-line ValueErrors:
        guidance scales finite and >= 0, steps >= 1, tau in [0, steps], sizes the VAE and the
        DiT can make). A prompt longer than the text encoder's max_length is cut to it, with one
        warning line (`warn_long_prompts`). Clips are sampled one per step of the iteration;
        only the current clip and the carried frame are held, and every clip has the same
        shapes, so the jitted sampler compiles once for any num_clips.
        """
        settings = self._settings(num_frames, steps, guidance, tau, sampler, image_guidance, height, width,
                                  num_clips=num_clips, text_to_video=text_to_video)
        H, W = settings["height"], settings["width"]
        K = self.context_latents(continuation, context_latents, settings["num_frames"], H, W)
        if isinstance(prompt, str):
            prompts = [prompt] * num_clips
        elif len(prompt) != num_clips or not all(isinstance(p, str) for p in prompt):
            raise ValueError(f"prompt must be a str or a list of num_clips = {num_clips} str, got {prompt!r}")
        else:
            prompts = list(prompt)
        if isinstance(last_frame, (list, tuple)):
            if len(last_frame) != num_clips:
                raise ValueError(f"last_frame has {len(last_frame)} entries, num_clips is {num_clips}")
            lasts = list(last_frame)
        else:
            lasts = [None] * (num_clips - 1) + [last_frame]
        if first_frame is not None:
            first_frame = self._check_image(first_frame, "first_frame", H, W)
        lasts = [None if f is None else self._check_image(f, "last_frame", H, W) for f in lasts]
        if lasts[0] is not None and first_frame is None:
            raise ValueError("a last frame needs a first frame (PixelDance's instructions are [first, ..., last])")
        if isinstance(keyframes, dict) or keyframes is None:
            if keyframes and num_clips > 1:
                raise ValueError(f"keyframes: give a list of num_clips = {num_clips} entries (None or a dict per clip)")
            keys = [keyframes] + [None] * (num_clips - 1)
        elif len(keyframes) != num_clips:
            raise ValueError(f"keyframes has {len(keyframes)} entries, num_clips is {num_clips}")
        else:
            keys = list(keyframes)
        blank = np.zeros((H, W, 3), np.uint8)
        for k, (last, kf) in enumerate(zip(lasts, keys)):  # every clip's keyframes checked before any sampling
            if kf:
                # A later clip starts from the carried frame, or in latent space from its context.
                start = first_frame if k == 0 else blank if K is None else None
                self.keyframe_slots([start], [last], [kf],
                                    **{n: settings[n] for n in ("num_frames", "height", "width", "tau", "steps")})
                if k > 0 and K is not None:
                    self._check_context_keyframes(kf, k, K, settings["num_frames"], H, W)
        self.warn_long_prompts(prompts)
        if K is not None:
            return self._latent_clips(prompts, first_frame, lasts, seed, settings, keys, K)
        return self._chain_clips(prompts, first_frame, lasts, seed, settings, keys)

    def context_latents(self, continuation: str, context_latents, num_frames: int, height: int, width: int,
                        prefix: str = "") -> int | None:
        """generate_clips' K, the context latents of continuation='latent' (None for 'reencode'):
        context_latents, or config.cond.context_frames when None, checked to be an integer in
        [1, T - 1] (T: the latent frames of num_frames); continuation one of `CONTINUATIONS`.
        One-line ValueErrors naming `prefix` + the argument."""
        if continuation not in CONTINUATIONS:
            raise ValueError(f"{prefix}continuation must be one of {', '.join(CONTINUATIONS)}, got {continuation!r}")
        if continuation == "reencode":
            return None
        T = self.vae.latent_shape(num_frames, height, width)[0]
        K = self.config.cond.get("context_frames", 2) if context_latents is None else context_latents
        if T < 2:
            raise ValueError(f"{prefix}continuation=latent needs clips of >= 2 latent frames, {prefix}num_frames="
                             f"{num_frames} gives {T}")
        if not (samplers.is_int(K) and not isinstance(K, bool) and 1 <= K <= T - 1):
            source = "" if context_latents is not None else " (from the workdir's config.cond.context_frames)"
            raise ValueError(f"{prefix}context_latents must be an integer in [1, {T - 1}] (1 to the clip's {T} latent "
                             f"frames - 1), got {K}{source}")
        return int(K)

    def _check_context_keyframes(self, keyframes: dict, clip: int, K: int, num_frames: int, height: int, width: int):
        """Refuses, in one line, a keyframe of a later clip of continuation='latent' on one of its
        K context latent frames (they are the previous clip's last K)."""
        T = self.vae.latent_shape(num_frames, height, width)[0]
        tf = (num_frames - 1) // (T - 1)
        free = next(p for p in range(num_frames) if conditioning.latent_index(p, num_frames, tf) >= K)
        for pixel in keyframes:
            latent = conditioning.latent_index(int(pixel), num_frames, tf)
            if latent < K:
                raise ValueError(f"keyframes[{clip}]: the keyframe at pixel frame {pixel} falls on latent frame "
                                 f"{latent}, one of the {K} context latents of continuation=latent (the previous "
                                 f"clip's); a later clip's keyframes start at pixel frame {free}")

    def _latent_clips(self, prompts, first_frame, last_frames, seed, settings, keyframes, K: int
                      ) -> Iterator[np.ndarray]:
        """generate_clips' iteration with continuation='latent', after its checks: clip k + 1's
        latents 0..K-1 are clip k's last K (normalised, clean), and the clips' new latents go
        through one streaming causal decode (clip 0 all T, later ones K..T-1)."""
        key = jax.random.key(seed)
        T, h, w, C = self.vae.latent_shape(settings["num_frames"], settings["height"], settings["width"])
        decoder = self.vae.stream_decoder()
        # Clip 0 runs the same compiled sampler with no context: one program for every clip.
        z_context, context = np.zeros((1, T, h, w, C), np.float32), np.zeros((1, T), bool)
        for k, (prompt, last, kf) in enumerate(zip(prompts, last_frames, keyframes)):
            # The keys of continuation='reencode' (`_chain_clips`).
            clip_key = key if k == 0 else jax.random.fold_in(jax.random.fold_in(key, 2), k)
            z = self._sample_batch([prompt], [first_frame if k == 0 else None], [last], clip_key, keyframes=[kf],
                                   context=(z_context, context), **settings)
            frames = decoder.push(self.stats.denormalise(z if k == 0 else z[:, K:]))
            # All that is kept of clip k, on the host (K latent frames): as clip 0's zeros, so the
            # sampler's inputs have one placement and it compiles once.
            z_context = np.zeros(z.shape, np.float32)
            z_context[:, :K] = self._carried_latents(z, K)
            context = np.arange(T)[None] < K
            yield np.asarray(frames[0])

    def _carried_latents(self, z, K: int) -> np.ndarray:
        """What clip k + 1 continues from in latent space: clip k's last K latents [B, K, h, w, C]
        (normalised, as sampled) of its latents z [B, T, h, w, C]. A seam for probes
        (benchmarks/probe_reencoded_context.py)."""
        return np.asarray(z[:, z.shape[1] - K:])

    def _chain_clips(self, prompts, first_frame, last_frames, seed, settings, keyframes=None) -> Iterator[np.ndarray]:
        """generate_clips' iteration, after its checks (a generator runs nothing until iterated)."""
        key = jax.random.key(seed)
        keyframes = [None] * len(prompts) if keyframes is None else keyframes
        for k, (prompt, last, kf) in enumerate(zip(prompts, last_frames, keyframes)):
            # Later clips draw from stream 2 of the seed's key, which a clip leaves unused
            # (0: noise, 1: instruction noise, 3 and 4: text_to_video's second
            # pass), so no clip repeats another's draws.
            clip_key = key if k == 0 else jax.random.fold_in(jax.random.fold_in(key, 2), k)
            video = self._generate_batch([prompt], [first_frame], [last], clip_key, keyframes=[kf], **settings)[0]
            first_frame = video[-1].copy()  # a copy: a view would keep the whole clip alive
            yield video if k == 0 else video[1:]


def read_pipeline_config(workdir: str):
    """The workdir's config (`workdir.read_config`), refused in one line unless it describes a
    pipeline: a converted VAE's folder, say, has a config.json with only its 'vae' section."""
    config = workdir_lib.read_config(workdir)
    missing = [k for k in ("data", "text", "dit", "sample") if k not in config]
    if missing:
        what = ("a converted VAE (its config.json holds only 'vae': load it with pixeldance.load_vae)"
                if "vae" in config and "dit" not in config else
                f"not a pipeline (its {workdir_lib.CONFIG} has no {', '.join(missing)})")
        raise ValueError(f"{workdir} is {what}; load_pipeline expects a trained workdir or a folder of "
                         f"python -m pixeldance.convert.wan")
    return config


def load_pipeline(workdir: str, *, mesh=None) -> Pipeline:
    """The trained pipeline of a workdir: the EMA weights of the newest VAE and DiT checkpoints
    (the DiT's trained weights instead where config.sample.weights is 'train'; nothing else of
    their train states), placed on `mesh` (default `inference_mesh()`). A
    workdir whose DiT starts from converted weights (config.dit.init_from) and has no DiT
    checkpoint yet samples from those weights (step 0)."""
    config = read_pipeline_config(workdir)
    mesh = inference_mesh() if mesh is None else mesh
    vae = load_vae(workdir, mesh=mesh)
    stats = workdir_lib.LatentStats.read(workdir)
    model = build.dit(config, stats.channels)
    R = config.data.resolution
    T, h, w, _ = vae.latent_shape(config.data.num_frames, R, R)
    text = build.text_conditioner(config, mesh=mesh)
    init_fn = build.dit_init_fn(model, (T, h, w, stats.channels), text.example())
    dit_dir, lora = os.path.join(workdir, workdir_lib.DIT_DIR), build.dit_lora(config)
    weights = config.sample.get("weights", "ema")  # (workdirs written before the setting: 'ema')
    trained = workdir_lib.latest_step(dit_dir) is not None
    if build.pretrained_dit_params(config) is not None and (lora is not None or not trained):
        # The converted weights (e.g. Wan 2.1 text-to-video, widened): as they are before any
        # fine-tuning, and under LoRA the frozen base the EMA adapters are merged into.
        params, shardings = pretrained_dit(config, init_fn, mesh, INFERENCE_PRESET,
                                           None if lora is None else lora["base_dtype"])
        step = 0
        if lora is not None and trained:
            adapters, step = workdir_lib.load_ema_params(dit_dir, build.lora_init_fn(init_fn, lora), mesh,
                                                         INFERENCE_PRESET, weights=weights)
            params = build.merge_lora(params, adapters, lora, shardings)
    else:
        params, step = workdir_lib.load_ema_params(dit_dir, init_fn, mesh, INFERENCE_PRESET, weights=weights)
    return Pipeline(config, vae, model, params, text, stats, mesh, step)


def pretrained_dit(config, init_fn, mesh, preset: str, dtype=None):
    """(params, shardings): config.dit.init_from's converted weights (`build.pretrained_dit_params`,
    widened for the instructions), read straight into their shards on `mesh` under `preset`'s
    rules, as `dtype` (None: the model's, float32). The Pipeline's weights before fine-tuning,
    and LoRA's frozen base (in config.train.lora_base_dtype)."""
    abstract, shardings = workdir_lib.abstract_params(init_fn, mesh, preset, dtype)
    return build.pretrained_dit_params(config)(abstract, shardings), shardings


def _check_output(path: str):
    """--output: a .mp4 / .gif file path that can be written (a missing parent folder is created
    once the video is made, as `mkdir -p` would; a folder or a file in the way is refused)."""
    if not path:
        raise ValueError("--output is required (a .mp4 or .gif path)")
    if not path.endswith((".mp4", ".gif")):
        raise ValueError(f"--output must end in .mp4 or .gif, got {path}")
    if os.path.isdir(path):
        raise ValueError(f"--output {path} is a folder: give a .mp4 or .gif file path")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(folder):  # the nearest existing ancestor: where the folders would be made
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"--output {path}: {folder} is a file, not a folder")
    try:  # a file made and removed there: access() can say yes where writing fails (root, network disks)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"--output {path}: {folder} is not writable ({e.strerror or e})") from None


def _check_flags(FLAGS):
    """Everything the command line decides on its own, before any file is read (one-line
    ValueErrors naming the flag); returns the prompt (a str, or one per clip)."""
    _check_output(FLAGS.output)
    samplers.check_settings("--", steps=FLAGS.steps, guidance=FLAGS.guidance, image_guidance=FLAGS.image_guidance,
                   num_frames=FLAGS.num_frames, height=FLAGS.height, width=FLAGS.width, num_clips=FLAGS.num_clips,
                   sampler=FLAGS.sampler)
    if FLAGS.storyboard:
        given = [f"--{n}" for n in STORY_SETS if FLAGS[n].present]
        if given:
            raise ValueError(f"--storyboard sets the prompts, the first frame and the clips: drop {_and(given)}")
    prompt = FLAGS.prompt
    if FLAGS.prompts is not None:
        if FLAGS.prompt:
            raise ValueError("give --prompt or --prompts, not both")
        prompt = [p.strip() for p in FLAGS.prompts.split("|")]
        if len(prompt) != FLAGS.num_clips:
            raise ValueError(f"--prompts has {len(prompt)} '|'-separated prompts, --num_clips is {FLAGS.num_clips}")
    # With several clips the last frame ends the final clip, which starts from the previous clip's last frame.
    if FLAGS.last_frame and not FLAGS.first_frame and FLAGS.num_clips == 1:
        raise ValueError("--last_frame needs --first_frame (the instructions are [first, ..., last])")
    if FLAGS.keyframe and FLAGS.num_clips != 1:
        raise ValueError("--keyframe needs --num_clips=1 (keyframes of one clip)")
    if FLAGS.continuation not in CONTINUATIONS:
        raise ValueError(f"--continuation must be one of {', '.join(CONTINUATIONS)}, got {FLAGS.continuation!r}")
    if FLAGS.context_latents is not None and FLAGS.continuation != "latent":
        raise ValueError("--context_latents needs --continuation=latent")
    if FLAGS.context_latents is not None and FLAGS.context_latents < 1:
        raise ValueError(f"--context_latents must be an integer >= 1, got {FLAGS.context_latents}")
    parse_keyframe_flags(FLAGS.keyframe or [])
    return prompt


def parse_keyframe_flags(values: Sequence[str]) -> list[tuple[int, str, int | None]]:
    """--keyframe values 'PIXEL:PATH[:TAU]' -> [(pixel frame, path, tau or None)]; one-line errors."""
    out = []
    for v in values:
        pixel, sep, rest = v.partition(":")
        path, tau = rest, None
        head, sep2, tail = rest.rpartition(":")
        if sep2 and tail.lstrip("-").isdigit():
            path, tau = head, int(tail)
        try:
            pixel = int(pixel)
        except ValueError:
            pixel = None
        if not sep or pixel is None or not path:
            raise ValueError(f"--keyframe must be PIXEL:PATH[:TAU] (e.g. 8:middle.png or 8:middle.png:5), got {v!r}")
        out.append((pixel, path, tau))
    return out


@cli.one_line_errors  # bad flags, missing or damaged files, an unwritable output: one line
def main(argv):
    """Every input is checked before any work: the flags on their own, then against the
    workdir's config (tau against the steps; the instruction images, read and sized), then,
    once the pipeline is loaded, the video size against the VAE and the DiT. Each refusal is one
    line `error: ...` on stderr naming the flag, exit status 2, and nothing written."""
    FLAGS = flags.FLAGS
    del argv
    prompt = _check_flags(FLAGS)
    config = read_pipeline_config(FLAGS.workdir)
    check_tau(FLAGS.tau, FLAGS.steps, config.sample.steps, "--")
    if FLAGS.storyboard:
        return _write_clips(FLAGS.output, _story_clips(FLAGS))
    H = config.data.resolution if FLAGS.height is None else FLAGS.height
    W = config.data.resolution if FLAGS.width is None else FLAGS.width
    size = (H, W) if FLAGS.resize else None
    images = {}
    for name in ("first_frame", "last_frame"):
        path = getattr(FLAGS, name)
        if path:
            images[name] = img = video_io.read_image(path, size, name=f"--{name}")
            if img.shape[:2] != (H, W):
                raise ValueError(f"--{name} {path} is {img.shape[1]}x{img.shape[0]}, the videos are "
                                 f"{W}x{H} (--width x --height; pass --resize to resize it)")
    keyframes = {}
    for pixel, path, k_tau in parse_keyframe_flags(FLAGS.keyframe or []):
        img = video_io.read_image(path, size, name="--keyframe")
        if img.shape[:2] != (H, W):
            raise ValueError(f"--keyframe {path} is {img.shape[1]}x{img.shape[0]}, the videos are "
                             f"{W}x{H} (--width x --height; pass --resize to resize it)")
        keyframes[pixel] = img if k_tau is None else (img, k_tau)
    pipe = load_pipeline(FLAGS.workdir)
    kwargs = dict(num_frames=FLAGS.num_frames, height=H, width=W, steps=FLAGS.steps, guidance=FLAGS.guidance,
                  tau=FLAGS.tau, sampler=FLAGS.sampler, image_guidance=FLAGS.image_guidance,
                  text_to_video=FLAGS.text_to_video)
    settings = pipe._settings(prefix="--", num_clips=FLAGS.num_clips, **kwargs)  # the size against the model
    pipe.context_latents(FLAGS.continuation, FLAGS.context_latents, settings["num_frames"], H, W, prefix="--")
    clips = pipe.generate_clips(prompt, images.get("first_frame"), images.get("last_frame"),
                                num_clips=FLAGS.num_clips, seed=FLAGS.seed, keyframes=keyframes or None,
                                continuation=FLAGS.continuation, context_latents=FLAGS.context_latents, **kwargs)
    _write_clips(FLAGS.output, clips)


STORY_SETS = ("prompt", "prompts", "num_clips", "first_frame", "last_frame", "keyframe")  # a storyboard's


def _story_clips(FLAGS) -> Iterator[np.ndarray]:
    """--storyboard: the story's clips (`story.generate_story`), the file checked and its images
    read before the pipeline loads, positions and sizes before any clip is sampled; the sampling
    flags given (and --seed, --resize) override the storyboard's settings."""
    board = story.load_storyboard(FLAGS.storyboard)
    names = [n for n in story.OVERRIDES if n in FLAGS and FLAGS[n].present]  # --continuation where defined
    pipe = load_pipeline(FLAGS.workdir)
    return story.generate_story(pipe, board, **{n: FLAGS[n].value for n in names})


def _write_clips(path: str, clips: Iterator[np.ndarray]):
    """Writes the chunks uint8 [n, H, W, 3] to `path`: an mp4 streamed (one clip in memory at a
    time), a GIF from all its frames at once (as Pillow writes them)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".mp4"):
        with video_io.Mp4Writer(path) as writer:
            for frames in clips:
                writer.write(frames)
                H, W = frames.shape[1:3]
        num_frames = writer.num_frames
    else:
        video = np.concatenate(list(clips))
        video_io.write_gif(path, video, scale=4)
        num_frames, H, W = video.shape[:3]
    print(f"wrote {path} ({num_frames} frames, {W}x{H})")


def define_flags():
    """The command line's flags, on absl's global FLAGS."""
    flags.DEFINE_string("workdir", None, "Workdir of a trained pipeline.", required=True)
    flags.DEFINE_string("prompt", "", "Text instruction; one longer than the text encoder's max_length tokens "
                        "is cut to it, with a warning naming how many were dropped.")
    flags.DEFINE_string("prompts", None, "Per-clip text instructions, '|'-separated, one per clip "
                        "(instead of --prompt, which applies to every clip).")
    flags.DEFINE_integer("num_clips", 1, "Clips chained into one long video: each starts from the "
                         "previous clip's last frame; F + (num_clips - 1)(F - 1) frames in all (with "
                         "--continuation=latent, from its last K latents: F + (num_clips - 1) 4(T - K)).")
    flags.DEFINE_string("continuation", "reencode", "How a clip continues the previous one: 'reencode' (its last "
                        "decoded frame, encoded again, is the first-frame instruction) or 'latent' (its last "
                        "--context_latents latent frames are the next clip's first ones, clean; the whole video "
                        "is decoded as one by the causal VAE).")
    flags.DEFINE_integer("context_latents", None, "K, the latent frames carried by --continuation=latent, 1 to "
                         "T - 1 (T: a clip's latent frames); default: config.cond.context_frames.")
    flags.DEFINE_string("first_frame", None, "First-frame instruction image (png/jpg, any mode Pillow reads: "
                        "16-bit images are scaled to 8 bits; one with transparency (RGBA, LA, a palette with a "
                        "transparent colour) is composited on black, with a warning).")
    flags.DEFINE_string("last_frame", None, "Last-frame instruction image (needs --first_frame when "
                        "--num_clips=1); with several clips, the final clip's last frame. Read as --first_frame.")
    flags.DEFINE_multi_string("keyframe", None, "A keyframe image at a pixel frame, PIXEL:PATH[:TAU] (repeat for "
                              "several; -1: the last frame): shown for the first TAU sampling steps (default --tau; "
                              "at pixel 0 always); a frame that is not a multiple of the VAE's temporal factor (4) "
                              "goes to the nearest one. Read as --first_frame; needs --num_clips=1.")
    flags.DEFINE_integer("height", None, "Video height in pixels; default: the training resolution.")
    flags.DEFINE_integer("width", None, "Video width in pixels; default: the training resolution.")
    flags.DEFINE_boolean("resize", False, "Resize instruction images to the videos' height x width.")
    flags.DEFINE_integer("num_frames", None, "Frames per clip (1 + 4k); default: the training clip length.")
    flags.DEFINE_integer("steps", None, "Sampling steps (>= 1); default: config.sample.steps.")
    flags.DEFINE_float("guidance", None, "Text guidance scale (finite, >= 0); default: config.sample.guidance.")
    flags.DEFINE_float("image_guidance", None, "Image-instruction guidance scale (finite, >= 0; 1: none, the "
                       "faster 2-branch batch); default: config.sample.image_guidance.")
    flags.DEFINE_integer("tau", None, "Steps during which the last frame is used, 0 to the steps; default: "
                         "config.sample.tau.")
    flags.DEFINE_string("sampler", None, f"One of {', '.join(samplers.SAMPLERS)}; default: config.sample.sampler.")
    flags.DEFINE_string("text_to_video", None, f"Without --first_frame: {', '.join(TEXT_TO_VIDEO)} ('first_frame': "
                        "a text-only pass makes the first frame, then image-to-video from it; 'first_latent': "
                        "its latent frame 0 without the decode and encode; 'image': a one-frame text-to-image pass "
                        "makes it, for a DiT trained with image batches); default: config.sample.text_to_video.")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_string("output", None, "Output .mp4 or .gif file path (missing parent folders are created).")
    flags.DEFINE_string("storyboard", None, "A story from a JSON or YAML storyboard: segments, each a prompt, a "
                        "length in clips and optional keyframe images (pixeldance/story.py), streamed clip by clip; "
                        "instead of --prompt, --prompts, --num_clips, --first_frame, --last_frame and --keyframe. "
                        "The sampling flags given, --seed and --resize override its settings.")


def run():
    logs.setup()  # the libraries' INFO lines (Orbax) only with --verbosity=1, not among the one-line errors
    define_flags()
    cli.run(main)


if __name__ == "__main__":
    run()
