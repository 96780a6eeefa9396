"""The PixelDance task: what training and sampling do with a denoiser, written once.

`PixelDanceTask` holds the fields of `config.diffusion` (objective, prediction, time sampling)
and `config.cond` (how image instructions are drawn, noised, dropped and put in) and gives

  training_inputs  a batch of clean latents -> the denoiser's inputs and the loss's targets:
                   which examples get a first / last frame (last picked among the J cached
                   candidates), noise on c_image, text dropped for guidance, time, x_t and
                   first-frame replacement;
  loss             the objective's loss on those inputs (the DiT trainer's loss, also compiled
                   by the planner);
  denoiser         one guided denoising call (branches full / image / none, the tau switch);
  guided_sample    the whole `lax.scan` sampler (the Pipeline's, also compiled by the planner).

Latents here are normalised (`workdir.LatentStats.normalise`); the model is any Flax module
called as ``model.apply(params, x_t, t, c_image, c_mask, text) -> output [B, T, h, w, C]``
(`models.dit.PixelDanceModel`). `text` is a text input of `models.text`: tokens int32 [B, S] for
the encoder trained with the DiT, or dict(states [B, S, D], mask [B, S]) from a frozen pretrained
encoder, whose empty-prompt states (`null_text`, leading dimension 1) are then passed too. Pure functions of their arguments: nothing here reads a config
after `from_config`.

Axis letters (glossary: pixeldance/models/__init__.py): B batch, T latent frames, h/w latent
height/width, C latent channels, S text tokens, J candidate last frames.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pixeldance import rng as rng_lib
from pixeldance.diffusion import conditioning, objectives, samplers, schedules
from pixeldance.diffusion import guidance as guidance_lib
from pixeldance.models import text as text_lib

FIRST_FRAME_MODES = ("replace", "concat")


@dataclasses.dataclass(frozen=True)
class PixelDanceTask:
    """The diffusion objective and PixelDance's conditioning rules (see the module docstring).

    objective 'flow' | 'eps' | 'v'; prediction 'x0' | 'velocity' (flow only); min_t: velocity
    from an x0 prediction divides by max(t, min_t); time_sampling, logit_mean, logit_std: flow
    training times. first_frame 'replace' (the clean first latent replaces the noisy one and
    leaves the loss) or 'concat' (channel concatenation only); p_first, p_last: probability of a
    first frame, and of a last frame given one; last_from: the last-frame instruction is one of
    the last `last_from` frames; noise: flow time of the noise on c_image; p_drop_text: text
    dropped (the empty prompt) for classifier-free guidance.
    """

    objective: str = "flow"
    prediction: str = "x0"
    min_t: float = 0.05
    time_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    first_frame: str = "replace"
    p_first: float = 0.7
    p_last: float = 0.5
    last_from: int = 3
    noise: float = 0.1
    p_drop_text: float = 0.1

    def __post_init__(self):
        objectives.path(self.objective)  # rejects unknown objectives, naming the choices
        if self.first_frame not in FIRST_FRAME_MODES:
            raise ValueError(f"config.cond.first_frame must be one of {FIRST_FRAME_MODES}, got {self.first_frame!r}")
        if self.last_from < 1:
            raise ValueError(f"config.cond.last_from must be >= 1, got {self.last_from}")

    @classmethod
    def from_config(cls, config) -> "PixelDanceTask":
        """From config.diffusion and config.cond."""
        d, c = config.diffusion, config.cond
        return cls(objective=d.objective, prediction=d.prediction, min_t=d.min_t_for_x0,
                   time_sampling=d.time_sampling, logit_mean=d.logit_mean, logit_std=d.logit_std,
                   first_frame=c.first_frame, p_first=c.p_first, p_last=c.p_last, last_from=c.last_from,
                   noise=c.noise, p_drop_text=c.p_drop_text)

    @property
    def path(self) -> str:
        """The noise path: 'flow' or 'ddpm'."""
        return objectives.path(self.objective)

    @property
    def replace(self) -> bool:
        return self.first_frame == "replace"

    def denoise(self, output, x_t, t):
        """Network output -> (x0_hat, v_hat), `objectives.denoise` with this task's settings."""
        return objectives.denoise(output, x_t, t, objective=self.objective, prediction=self.prediction,
                                  min_t=self.min_t)

    # -- training -------------------------------------------------------------------------------

    def training_inputs(self, z, z_last, text, rng, null_text=None) -> dict:
        """The denoiser's inputs for a batch of normalised latents.

        z [B, T, h, w, C]; z_last [B, J, h, w, C], candidate last-frame latents (latest first);
        text: tokens int32 [B, S] or frozen states (module docstring; null_text: their empty
        prompt). Per example: a first-frame instruction with probability p_first;
        given one, a last-frame instruction with probability p_last, picked uniformly among the
        first min(last_from, J) candidates; noise on c_image; text dropped with probability
        p_drop_text. One-frame batches (images) get no image instructions.

        Returns dict(x_t [B, T, h, w, C], t [B], c_image [B, T, h, w, C], c_mask [B, T, h, w, 1],
        text (as given, dropped ones replaced), noise [B, T, h, w, C], loss_mask [B, T, 1, 1, 1], has_first [B],
        has_last [B], last_pick int32 [B]).
        """
        B, T = z.shape[:2]
        keys = jax.random.split(rng, 7)
        has_first = jax.random.uniform(keys[0], (B,)) < self.p_first
        if T == 1:  # an image batch (joint image-video training): text-to-image, no instructions
            has_first = jnp.zeros_like(has_first)
        has_last = has_first & (jax.random.uniform(keys[1], (B,)) < self.p_last)
        pick = jax.random.randint(keys[2], (B,), 0, min(self.last_from, z_last.shape[1]))
        last = jnp.take_along_axis(z_last, pick[:, None, None, None, None], axis=1)[:, 0]
        c_image, c_mask = conditioning.make_instructions(z[:, 0], last, has_first, has_last, T)
        c_image = conditioning.noise_instructions(keys[3], c_image, c_mask, self.noise)

        drop = jax.random.uniform(keys[4], (B,)) < self.p_drop_text
        text = text_lib.select_text(drop, text, text_lib.null_text(text, null_text))

        if self.path == "flow":
            t = schedules.sample_time(keys[5], B, kind=self.time_sampling, mean=self.logit_mean,
                                      std=self.logit_std)
        else:
            t = schedules.sample_ddpm_time(keys[5], B)
        noise = rng_lib.normal(keys[6], z.shape)
        x_t = objectives.add_noise(z, noise, t, objective=self.objective)
        if self.replace:
            x_t = conditioning.replace_first(x_t, z[:, 0], has_first)
        return dict(x_t=x_t, t=t, c_image=c_image, c_mask=c_mask, text=text, noise=noise,
                    loss_mask=conditioning.first_frame_loss_mask(has_first, T, self.replace),
                    has_first=has_first, has_last=has_last, last_pick=pick)

    def loss(self, model, params, batch, rng, null_text=None):
        """(loss, dict(x0_mse)) on a batch of normalised latents: z [B, T, h, w, C], z_last
        [B, J, h, w, C] and tokens int32 [B, S] or frozen text states (text_states [B, S, D],
        text_mask [B, S]; `models.text.text_input`), see `training_inputs`. The objective sets the noise
        path, the training times (flow: time_sampling; eps / v: uniform over DDPM's 1000 steps)
        and the regression target."""
        z = batch["z"]
        x = self.training_inputs(z, batch["z_last"], text_lib.text_input(batch), rng, null_text)
        out = model.apply(params, x["x_t"], x["t"], x["c_image"], x["c_mask"], x["text"])
        loss, _ = objectives.loss(out, z, x["noise"], x["t"], x["loss_mask"], objective=self.objective,
                                  prediction=self.prediction, min_t=self.min_t)
        x0_hat, _ = self.denoise(out, x["x_t"], x["t"])
        x0_err = jnp.mean(jnp.square(x0_hat - z) * x["loss_mask"]) / jnp.mean(x["loss_mask"])
        return loss, dict(x0_mse=x0_err)

    # -- sampling -------------------------------------------------------------------------------

    def denoiser(self, model, params, c_full, m_full, text, guidance, image_guidance, tau, *,
                 branches: int, null_text=None):
        """denoise(x [B, T, h, w, C], t, i) -> guided (x0_hat, v_hat), the samplers' interface.

        c_full [B, T, h, w, C], m_full [B, T, h, w, 1]: the instructions with every given frame;
        for sampling steps i >= tau the frames after the first are dropped (PixelDance's
        strength of the last frame). Branches, batched in one model call: full (text and
        image instructions), image (image instructions, the empty prompt) and, with
        branches = 3, none (neither); `guidance.combine` mixes them with the text scale
        `guidance` and the image scale `image_guidance` (float32 scalars, traced is fine). text,
        null_text: see `training_inputs`.
        """
        B = text_lib.text_batch_size(text)
        c_drop, m_drop = conditioning.drop_last(c_full, m_full)
        null = text_lib.null_text(text, null_text)
        tok = text_lib.concat_text([text, null, null][:branches])

        def denoise(x, t, i):
            use_last = i < tau
            c = jnp.where(use_last, c_full, c_drop)
            m = jnp.where(use_last, m_full, m_drop)
            xx = guidance_lib.stack(x, branches)
            tt = jnp.full((branches * B,), t)
            cc = jnp.concatenate([c, c, jnp.zeros_like(c)][:branches])
            mm = jnp.concatenate([m, m, jnp.zeros_like(m)][:branches])
            pred = self.denoise(model.apply(params, xx, tt, cc, mm, tok), xx, tt)
            return guidance_lib.combine(pred, branches, text_scale=guidance, image_scale=image_guidance)
        return denoise

    def guided_sample(self, model, params, noise, z_first, z_last, has_first, has_last, text, rng,
                      guidance, image_guidance, tau, null_text=None, *, steps: int, sampler: str,
                      branches: int, shift: float = 1.0):
        """Normalised latents [B, T, h, w, C] from `noise` [B, T, h, w, C] at t = 1.

        z_first, z_last [B, h, w, C] with has_first, has_last bool [B]: the image instructions
        (noised like training's, from `rng`); text, null_text: see `training_inputs`; guidance, image_guidance:
        float32 scalars; tau: int32 scalar (see `denoiser`); steps, sampler, branches
        (`guidance.num_branches(image_guidance)`) and shift (of the time grid,
        `schedules.shift_time`; Wan 2.1 samples with 3 to 5) are static. With first_frame='replace' the
        clean first latent is put back after every step where it is given.
        """
        T = noise.shape[1]
        c_full, m_full = conditioning.make_instructions(z_first, z_last, has_first, has_last, T)
        c_full = conditioning.noise_instructions(rng, c_full, m_full, self.noise)
        denoise = self.denoiser(model, params, c_full, m_full, text, guidance, image_guidance, tau,
                                branches=branches, null_text=null_text)
        project = (lambda x: conditioning.replace_first(x, z_first, has_first)) if self.replace else None
        return samplers.solve(denoise, noise, steps=steps, sampler=sampler, path=self.path, shift=shift,
                              project=project)
