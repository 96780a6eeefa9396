r"""Sampling API and command line.

  python -m pixeldance.sample --workdir=DIR --prompt="a red circle moves left" \
      [--first_frame=a.png] [--last_frame=b.png] [--tau=10] [--guidance=3] [--image_guidance=1] \
      [--sampler=euler|heun|dpm++2m|ddim] [--steps=25] [--seed=0] [--num_frames=17] [--resize] \
      [--num_clips=3 [--prompts="a red circle moves left|a red circle moves up|..."]] --output=out.mp4

From Python: `pipe = pixeldance.load_pipeline(DIR); video = pipe.generate("a red circle moves left")`
(uint8 [F, H, W, 3]); `pipe.generate(prompt, num_clips=N)` chains N clips into one long video
(`pipe.generate_clips` yields them clip by clip); and `vae = pixeldance.load_vae(DIR)` with `encode` / `decode`.

Axis glossary: B batch, F frames, H/W pixels, T latent frames, h/w latent height/width, C channels.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pixeldance import rng as rng_lib
from pixeldance import train_lib
from pixeldance.diffusion import conditioning, objectives, samplers
from pixeldance.diffusion import guidance as guidance_lib


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no pixeldance workdir at {workdir} (missing {path})")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


class VideoVAE:
    """A trained causal video VAE.

    encode: uint8 [B, F, H, W, 3] with F = 1 + 4k -> float32 latents [B, 1 + k, H/8, W/8, C]
      (posterior means). decode: latents -> uint8 [B, 1 + 4(T-1), 8h, 8w, 3].
    """

    def __init__(self, model, params):
        self.model, self.params = model, params
        self._encode = jax.jit(lambda p, v: model.apply(
            p, v.astype(jnp.float32) / 127.5 - 1.0, method=model.encode)[0])
        self._decode = jax.jit(lambda p, z: jnp.clip(
            jnp.round((model.apply(p, z, method=model.decode) + 1.0) * 127.5), 0, 255).astype(jnp.uint8))

    def encode(self, video) -> np.ndarray:
        video = np.asarray(video)
        if video.dtype != np.uint8 or video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"encode wants uint8 [B, F, H, W, 3], got {video.dtype} {video.shape}")
        return np.asarray(self._encode(self.params, video))

    def decode(self, latents) -> np.ndarray:
        latents = np.asarray(latents, np.float32)
        if latents.ndim != 5:
            raise ValueError(f"decode wants latents [B, T, h, w, C], got {latents.shape}")
        return np.asarray(self._decode(self.params, latents))


def load_vae(workdir_or_path: str) -> VideoVAE:
    """The VAE of a workdir (or of a folder with config.json and vae/ checkpoints), or the open
    Wan 2.1 VAE converted by `python -m pixeldance.convert.wan_vae` (config.json: vae.family 'wan')."""
    from pixeldance.trainers import vae as vae_trainer
    config = load_workdir_config(workdir_or_path)
    model = vae_trainer.build_vae(config, workdir_or_path)
    if config.vae.get("family", "causal") == "wan":  # converted weights: parameters, no train state
        from pixeldance.convert import wan_vae
        return VideoVAE(model, wan_vae.load_params(workdir_or_path, model))
    dummy = jnp.zeros((1, 1, config.data.resolution, config.data.resolution, 3))
    params, _ = train_lib.load_ema_params(os.path.join(workdir_or_path, "vae"),
                                          lambda rng: model.init(rng, dummy), config.vae)
    return VideoVAE(model, params)


class Pipeline:
    """Text (+ first frame, + last frame) -> video, with classifier-free guidance and tau."""

    def __init__(self, config, vae: VideoVAE, model, params, tokenizer, latent_mean, latent_std):
        self.config, self.vae, self.model, self.params = config, vae, model, params
        self.tokenizer = tokenizer
        self.latent_mean = jnp.asarray(latent_mean)
        self.latent_std = jnp.asarray(latent_std)
        self.resolution = config.data.resolution
        self.num_frames = config.data.num_frames
        self._sample = jax.jit(self._sample_latents, static_argnames=("steps", "sampler", "branches"))

    def _sample_latents(self, params, noise, z_first, z_last, has_first, has_last, tokens, rng,
                        guidance, image_guidance, tau, *, steps: int, sampler: str, branches: int):
        """All arguments batched on B; returns normalised latents [B, T, h, w, C].

        guidance, image_guidance: text and image guidance scales (float32 scalars); branches:
        `guidance.num_branches(image_guidance)`, the conditioning branches batched per model call.
        """
        from pixeldance.trainers.dit import null_tokens
        B, T = noise.shape[:2]
        cond, diffusion = self.config.cond, self.config.diffusion
        c_full, m_full = conditioning.make_instructions(z_first, z_last, has_first, has_last, T)
        c_full = conditioning.noise_instructions(rng, c_full, m_full, cond.noise)
        c_drop, m_drop = conditioning.drop_last(c_full, m_full)
        null = null_tokens(B, tokens.shape[1])
        # Branches (full, image, none): text only in the first; image instructions in the first two.
        tok = jnp.concatenate([tokens, null, null][:branches])
        replace = cond.first_frame == "replace"

        def denoise(x, t, i):
            use_last = i < tau  # PixelDance's strength: the last frame guides the first tau steps
            c = jnp.where(use_last, c_full, c_drop)
            m = jnp.where(use_last, m_full, m_drop)
            xx = guidance_lib.stack(x, branches)
            tt = jnp.full((branches * B,), t)
            cc = jnp.concatenate([c, c, jnp.zeros_like(c)][:branches])
            mm = jnp.concatenate([m, m, jnp.zeros_like(m)][:branches])
            out = self.model.apply(params, xx, tt, cc, mm, tok)
            pred = objectives.denoise(out, xx, tt, objective=diffusion.objective,
                                      prediction=diffusion.prediction, min_t=diffusion.min_t_for_x0)
            return guidance_lib.combine(pred, branches, text_scale=guidance, image_scale=image_guidance)

        project = (lambda x: conditioning.replace_first(x, z_first, has_first)) if replace else None
        return samplers.solve(denoise, noise, steps=steps, sampler=sampler,
                              path=objectives.path(diffusion.objective), project=project)

    def _check_image(self, image, name: str) -> np.ndarray:
        image = np.asarray(image)
        R = self.resolution
        if image.dtype != np.uint8 or image.shape != (R, R, 3):
            raise ValueError(f"{name} must be uint8 [{R}, {R}, 3] for this model, got {image.dtype} {image.shape}")
        return image

    def _settings(self, num_frames, steps, guidance, tau, sampler, image_guidance) -> dict:
        """The sampling settings, None filled in from the workdir's config.sample, checked."""
        s = self.config.sample
        sampler = s.sampler if sampler is None else sampler
        if sampler not in samplers.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose from {samplers.SAMPLERS}")
        F = self.num_frames if num_frames is None else int(num_frames)
        if F < 1 or (F - 1) % 4:
            raise ValueError(f"num_frames must be 1 + 4k (1, 5, 9, 13, 17, ...), got {F}")
        return dict(num_frames=F, steps=s.steps if steps is None else int(steps),
                    guidance=s.guidance if guidance is None else float(guidance),
                    tau=s.tau if tau is None else int(tau), sampler=sampler,
                    image_guidance=s.get("image_guidance", 1.0) if image_guidance is None else float(image_guidance))

    def generate_batch(self, prompts: Sequence[str], first_frames=None, last_frames=None, *,
                       num_frames: int | None = None, steps: int | None = None, guidance: float | None = None,
                       tau: int | None = None, seed: int = 0, sampler: str | None = None,
                       image_guidance: float | None = None) -> np.ndarray:
        """B prompts, optional per-example first/last frames (uint8 [H, W, 3] or None) -> uint8 [B, F, H, W, 3].

        guidance scales the text, image_guidance the image instructions (1: no image guidance,
        the faster 2-branch batch); both default to the workdir's config.sample.
        """
        return self._generate_batch(prompts, first_frames, last_frames, jax.random.key(seed),
                                    **self._settings(num_frames, steps, guidance, tau, sampler, image_guidance))

    def _generate_batch(self, prompts, first_frames, last_frames, key, *, num_frames: int, steps: int,
                        guidance: float, tau: int, sampler: str, image_guidance: float) -> np.ndarray:
        """generate_batch with a random key and checked settings (`_settings`); the key's streams
        0 and 1 draw the initial noise and the instruction noise."""
        F, B, R = num_frames, len(prompts), self.resolution
        first_frames = [None] * B if first_frames is None else list(first_frames)
        last_frames = [None] * B if last_frames is None else list(last_frames)
        for b in range(B):
            if last_frames[b] is not None and first_frames[b] is None:
                raise ValueError("a last frame needs a first frame (PixelDance's instructions are [first, ..., last])")
        blank = np.zeros((R, R, 3), np.uint8)
        firsts = np.stack([blank if f is None else self._check_image(f, "first_frame") for f in first_frames])
        lasts = np.stack([blank if f is None else self._check_image(f, "last_frame") for f in last_frames])
        # Both instruction images encode as one-frame videos, in one call.
        z_img = self.vae.encode(np.concatenate([firsts, lasts])[:, None])[:, 0]
        z_img = (z_img - np.asarray(self.latent_mean)) / np.asarray(self.latent_std)
        z_first, z_last = z_img[:B], z_img[B:]
        T = 1 + (F - 1) // 4
        h = z_first.shape[1]
        noise = rng_lib.normal(jax.random.fold_in(key, 0), (B, T, h, h, z_first.shape[-1]))
        tokens = jnp.asarray(self.tokenizer(prompts))
        has_first = jnp.asarray([f is not None for f in first_frames])
        has_last = jnp.asarray([f is not None for f in last_frames])
        z = self._sample(self.params, noise, jnp.asarray(z_first), jnp.asarray(z_last), has_first, has_last,
                         tokens, jax.random.fold_in(key, 1), jnp.float32(guidance), jnp.float32(image_guidance),
                         jnp.int32(tau), steps=steps, sampler=sampler,
                         branches=guidance_lib.num_branches(image_guidance))
        return self.vae.decode(z * self.latent_std + self.latent_mean)

    def generate(self, prompt: str | Sequence[str], first_frame=None, last_frame=None, *, num_clips: int = 1,
                 num_frames: int | None = None, steps: int | None = None, guidance: float | None = None,
                 tau: int | None = None, seed: int = 0, sampler: str | None = None,
                 image_guidance: float | None = None) -> np.ndarray:
        """One video, uint8 [F + (num_clips - 1)(F - 1), H, W, 3] (F = num_frames): with
        num_clips > 1 a long video of clips chained on their boundary frames (see `generate_clips`
        for prompt and last_frame per clip). steps/guidance/image_guidance/tau/sampler default to
        the workdir's config.sample."""
        return np.concatenate(list(self.generate_clips(
            prompt, first_frame, last_frame, num_clips=num_clips, num_frames=num_frames, steps=steps,
            guidance=guidance, tau=tau, seed=seed, sampler=sampler, image_guidance=image_guidance)))

    def generate_clips(self, prompt: str | Sequence[str], first_frame=None, last_frame=None, *,
                       num_clips: int = 1, num_frames: int | None = None, steps: int | None = None,
                       guidance: float | None = None, tau: int | None = None, seed: int = 0,
                       sampler: str | None = None, image_guidance: float | None = None) -> Iterator[np.ndarray]:
        """A long video, autoregressively: yields the new frames of each of `num_clips` clips.

        Clip k + 1 takes the last decoded frame of clip k as its first-frame instruction
        (re-encoded by the VAE). The first clip yields uint8 [F, H, W, 3], each later one
        [F - 1, H, W, 3] (its frame 0 stands for the previous clip's last frame, already yielded),
        so together they are F + (num_clips - 1)(F - 1) frames with no repeated boundary frame.

        prompt: one str for every clip, or a list/tuple of num_clips str (one per clip).
        first_frame: uint8 [H, W, 3] or None, the first clip's first frame.
        last_frame: None; one uint8 [H, W, 3] image, the final clip's last frame (where the long
          video ends; later clips always have a first frame, so it needs no first_frame when
          num_clips > 1); or a list/tuple of num_clips entries, each None or an image, per clip.
        seed: the first clip draws as `generate(..., seed=seed)` does (so num_clips=1 is the
          plain single clip); clip k > 0 draws from a key derived from (seed, k).

        The arguments are checked at the call, before any clip is sampled. Clips are sampled one
        per step of the iteration; only the current clip and the carried frame are held, and
        every clip has the same shapes, so the jitted sampler compiles once for any num_clips.
        """
        if num_clips < 1:
            raise ValueError(f"num_clips must be >= 1, got {num_clips}")
        settings = self._settings(num_frames, steps, guidance, tau, sampler, image_guidance)
        if num_clips > 1 and settings["num_frames"] < 5:
            raise ValueError(f"num_clips > 1 needs num_frames >= 5 (clips share a frame), got {settings['num_frames']}")
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
            first_frame = self._check_image(first_frame, "first_frame")
        lasts = [None if f is None else self._check_image(f, "last_frame") for f in lasts]
        if lasts[0] is not None and first_frame is None:
            raise ValueError("a last frame needs a first frame (PixelDance's instructions are [first, ..., last])")
        return self._chain_clips(prompts, first_frame, lasts, seed, settings)

    def _chain_clips(self, prompts, first_frame, last_frames, seed, settings) -> Iterator[np.ndarray]:
        """generate_clips' iteration, after its checks (a generator runs nothing until iterated)."""
        key = jax.random.key(seed)
        for k, (prompt, last) in enumerate(zip(prompts, last_frames)):
            # Later clips draw from stream 2 of the seed's key, which a clip leaves unused
            # (0: noise, 1: instruction noise), so no clip repeats another's draws.
            clip_key = key if k == 0 else jax.random.fold_in(jax.random.fold_in(key, 2), k)
            video = self._generate_batch([prompt], [first_frame], [last], clip_key, **settings)[0]
            first_frame = video[-1].copy()  # a copy: a view would keep the whole clip alive
            yield video if k == 0 else video[1:]


def load_pipeline(workdir: str) -> Pipeline:
    """The trained pipeline of a workdir (EMA weights of the newest VAE and DiT checkpoints)."""
    from pixeldance.trainers import dit as dit_trainer
    config = load_workdir_config(workdir)
    vae = load_vae(workdir)
    mean, std = dit_trainer.load_latent_stats(workdir)
    C = len(mean)
    model = dit_trainer.build_model(config, C)
    R, S = config.data.resolution, config.text.max_length
    T, h = 1 + (config.data.num_frames - 1) // 4, R // 8
    dummy = (jnp.zeros((1, T, h, h, C)), jnp.zeros((1,)), jnp.zeros((1, T, h, h, C)),
             jnp.zeros((1, T, h, h, 1)), jnp.zeros((1, S), jnp.int32))
    params, _ = train_lib.load_ema_params(os.path.join(workdir, "dit"),
                                          lambda rng: model.init(rng, *dummy), config.train)
    return Pipeline(config, vae, model, params, dit_trainer.build_tokenizer(config), mean, std)


def main(argv):
    from absl import flags
    from pixeldance.data import video_io
    FLAGS = flags.FLAGS
    del argv
    try:
        if not FLAGS.output:
            raise ValueError("--output is required (a .mp4 or .gif path)")
        if not FLAGS.output.endswith((".mp4", ".gif")):
            raise ValueError(f"--output must end in .mp4 or .gif, got {FLAGS.output}")
        if FLAGS.num_clips < 1:
            raise ValueError(f"--num_clips must be >= 1, got {FLAGS.num_clips}")
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
        pipe = load_pipeline(FLAGS.workdir)
        size = pipe.resolution if FLAGS.resize else None
        first = video_io.read_image(FLAGS.first_frame, size) if FLAGS.first_frame else None
        last = video_io.read_image(FLAGS.last_frame, size) if FLAGS.last_frame else None
        for name, img in (("first_frame", first), ("last_frame", last)):
            if img is not None and img.shape[:2] != (pipe.resolution,) * 2:
                path = getattr(FLAGS, name)
                raise ValueError(f"--{name} {path} is {img.shape[1]}x{img.shape[0]}, the model makes "
                                 f"{pipe.resolution}x{pipe.resolution} videos (pass --resize to resize it)")
        clips = pipe.generate_clips(prompt, first, last, num_clips=FLAGS.num_clips, num_frames=FLAGS.num_frames,
                                    steps=FLAGS.steps, guidance=FLAGS.guidance, tau=FLAGS.tau, seed=FLAGS.seed,
                                    sampler=FLAGS.sampler, image_guidance=FLAGS.image_guidance)
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
        if FLAGS.output.endswith(".mp4"):
            with video_io.Mp4Writer(FLAGS.output) as writer:  # streamed: one clip in memory at a time
                for frames in clips:
                    writer.write(frames)
            num_frames = writer.num_frames
        else:  # Pillow writes a GIF from all its frames at once
            video = np.concatenate(list(clips))
            video_io.write_gif(FLAGS.output, video, scale=4)
            num_frames = video.shape[0]
        R = pipe.resolution
        print(f"wrote {FLAGS.output} ({num_frames} frames, {R}x{R})")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def define_flags():
    """The command line's flags, on absl's global FLAGS."""
    from absl import flags
    flags.DEFINE_string("workdir", None, "Workdir of a trained pipeline.", required=True)
    flags.DEFINE_string("prompt", "", "Text instruction.")
    flags.DEFINE_string("prompts", None, "Per-clip text instructions, '|'-separated, one per clip "
                        "(instead of --prompt, which applies to every clip).")
    flags.DEFINE_integer("num_clips", 1, "Clips chained into one long video: each starts from the "
                         "previous clip's last frame; F + (num_clips - 1)(F - 1) frames in all.")
    flags.DEFINE_string("first_frame", None, "First-frame instruction image (png/jpg).")
    flags.DEFINE_string("last_frame", None, "Last-frame instruction image (needs --first_frame when "
                        "--num_clips=1); with several clips, the final clip's last frame.")
    flags.DEFINE_boolean("resize", False, "Resize instruction images to the model's resolution.")
    flags.DEFINE_integer("num_frames", None, "Frames per clip (1 + 4k); default: the training clip length.")
    flags.DEFINE_integer("steps", None, "Sampling steps; default: config.sample.steps.")
    flags.DEFINE_float("guidance", None, "Text guidance scale; default: config.sample.guidance.")
    flags.DEFINE_float("image_guidance", None, "Image-instruction guidance scale (1: none, the faster "
                       "2-branch batch); default: config.sample.image_guidance.")
    flags.DEFINE_integer("tau", None, "Steps during which the last frame is used; default: config.sample.tau.")
    flags.DEFINE_string("sampler", None, f"One of {', '.join(samplers.SAMPLERS)}; default: config.sample.sampler.")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_string("output", None, "Output .mp4 or .gif path.")


def run():
    from absl import app, logging
    logging.set_verbosity(logging.WARNING)  # keep Orbax's INFO lines out of the one-line errors
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
