"""The PixelDance task: what training and sampling do with a denoiser, written once.

`PixelDanceTask` holds the fields of `config.diffusion` (objective, prediction, time sampling)
and `config.cond` (how image instructions are drawn, noised, dropped and put in) and gives

  training_inputs  a batch of clean latents -> the denoiser's inputs and the loss's targets:
                   which examples get a first / last frame (last picked among the J cached
                   candidates), or with config.cond.keyframe_sets which keyframe set (none,
                   first, first + last, first + middle, random positions, context latents of
                   the clip itself or of the window one latent later), noise on c_image,
                   text dropped for guidance, time, x_t and first-frame replacement;
  loss             the objective's loss on those inputs (the DiT trainer's loss, also compiled
                   by the planner);
  denoiser         one guided denoising call (branches full / image / none, the tau switch,
                   per keyframe);
  keyframe_sample  the whole `lax.scan` sampler from keyframes at any latent positions, each
                   with its own tau, and context latents (continuation in latent space; the
                   Pipeline's);
  guided_sample    the same from a first and a last frame (PixelDance's; the planner compiles it).

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
KEYFRAME_SETS = ("none", "first", "first_last", "first_middle", "random", "context", "continue")
KEYFRAME_LATENTS = ("frames", "clip")


def object_map(z):
    """z [B, T, h, w, C] clean latents -> float32 [B, T, h, w, 1] in [0, 1]: each position's
    distance from its frame's mean latent over the frame's largest distance. On the synthetic
    world a frame is a plain background and one small object (a few latent positions), so the
    mean is the background's latent and the map is near 1 on the object and near 0 elsewhere.
    Computed from the clean latents and held constant (no gradient flows through a loss weight)."""
    z = jax.lax.stop_gradient(z.astype(jnp.float32))
    d = jnp.sqrt(jnp.sum(jnp.square(z - z.mean(axis=(2, 3), keepdims=True)), axis=-1, keepdims=True))
    return d / jnp.maximum(d.max(axis=(2, 3), keepdims=True), 1e-6)


def parse_keyframe_sets(spec: str) -> tuple[float, ...]:
    """config.cond.keyframe_sets, 'none:0.3,first:0.35,first_last:0.35,...' -> the probabilities
    of `KEYFRAME_SETS` in that order (weights >= 0, normalised; a set not named has weight 0);
    '' -> () (the sets come from p_first and p_last, today's draws). One-line errors."""
    if not spec.strip():
        return ()
    weights = dict.fromkeys(KEYFRAME_SETS, 0.0)
    for item in spec.split(","):
        name, sep, value = item.strip().partition(":")
        if name not in weights or not sep:
            raise ValueError(f"config.cond.keyframe_sets: {item.strip()!r} is not name:weight with name one of "
                             f"{KEYFRAME_SETS}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"config.cond.keyframe_sets: weight {value!r} of {name} is not a number") from None
        if not weights[name] >= 0:
            raise ValueError(f"config.cond.keyframe_sets: weight of {name} must be >= 0, got {value}")
    total = sum(weights.values())
    if not total > 0:
        raise ValueError(f"config.cond.keyframe_sets: the weights sum to 0 in {spec!r}")
    return tuple(weights[n] / total for n in KEYFRAME_SETS)


@dataclasses.dataclass(frozen=True)
class PixelDanceTask:
    """The diffusion objective and PixelDance's conditioning rules (see the module docstring).

    objective 'flow' | 'eps' | 'v' | 'v_zero_snr'; prediction 'x0' | 'velocity' (flow only); min_t: velocity
    from an x0 prediction divides by max(t, min_t); time_sampling: flow training times,
    ddpm_time_sampling: DDPM ones ('uniform' or 'logit_normal' over the 1000 steps,
    `schedules.sample_ddpm_time`); logit_mean, logit_std: the logit-normal of either.
    first_frame 'replace' (the clean first latent replaces the noisy one and leaves the loss)
    or 'concat' (channel concatenation only); p_first, p_last: probability of a first frame, and
    of a last frame given one; last_from: the last-frame instruction is one of
    the last `last_from` frames; noise: flow time of the noise on c_image; p_drop_text: text
    dropped (the empty prompt) for classifier-free guidance.

    Keyframes anywhere (`training_inputs`): keyframe_sets, the probabilities of `KEYFRAME_SETS`
    (`parse_keyframe_sets`; () keeps p_first / p_last and today's draws bit for bit);
    keyframe_rate: each latent frame's probability of being a keyframe in the 'random' set;
    keyframe_drop: each keyframe but the first dropped with this probability (the paper's drop
    of the last frame, per keyframe); keyframe_latents: where middle keyframes' latents come from,
    'frames' (one-frame encodings of pixel frames 4k, cached as z_frames) or 'clip' (the clip's
    own latent at that position); context_frames: the 'context' and 'continue' sets' largest
    number of leading latent frames (continuation in latent space).

    object_weight: w >= 0; each latent position's loss weight is 1 + w * `object_map(z)` (about 1
    on the world's object, 0 on its plain background), so the few positions that carry an
    object's shape are not outweighed by the many that carry background; 0 weighs all alike.
    first_latent_weight: the loss weight of latent frame 0 in examples that generate it (no first
    frame given, no context there); 1 weighs every latent alike. With p_first = 0.7 latent 0 is
    in the loss of 30 % of the examples only; weighting it 4x did not place text-only samples'
    first frames better (benchmarks/README.md, issue 19), so 1 is the default.
    """

    objective: str = "flow"
    prediction: str = "x0"
    min_t: float = 0.05
    time_sampling: str = "logit_normal"
    ddpm_time_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    first_frame: str = "replace"
    p_first: float = 0.7
    p_last: float = 0.5
    last_from: int = 3
    noise: float = 0.1
    p_drop_text: float = 0.1
    keyframe_sets: tuple = ()
    keyframe_rate: float = 0.25
    keyframe_drop: float = 0.0
    keyframe_latents: str = "frames"
    context_frames: int = 2
    first_latent_weight: float = 1.0
    object_weight: float = 0.0

    def __post_init__(self):
        objectives.path(self.objective)  # rejects unknown objectives, naming the choices
        if self.ddpm_time_sampling not in schedules.DDPM_TIME_SAMPLINGS:
            raise ValueError(f"config.diffusion.ddpm_time_sampling must be one of "
                             f"{schedules.DDPM_TIME_SAMPLINGS}, got {self.ddpm_time_sampling!r}")
        if self.first_frame not in FIRST_FRAME_MODES:
            raise ValueError(f"config.cond.first_frame must be one of {FIRST_FRAME_MODES}, got {self.first_frame!r}")
        if self.last_from < 1:
            raise ValueError(f"config.cond.last_from must be >= 1, got {self.last_from}")
        if self.keyframe_sets and len(self.keyframe_sets) != len(KEYFRAME_SETS):
            raise ValueError(f"keyframe_sets holds one probability per set of {KEYFRAME_SETS}, got {self.keyframe_sets}")
        if self.keyframe_latents not in KEYFRAME_LATENTS:
            raise ValueError(f"config.cond.keyframe_latents must be one of {KEYFRAME_LATENTS}, "
                             f"got {self.keyframe_latents!r}")
        if not self.first_latent_weight > 0:
            raise ValueError(f"config.cond.first_latent_weight must be > 0, got {self.first_latent_weight}")
        if not self.object_weight >= 0:
            raise ValueError(f"config.cond.object_weight must be >= 0, got {self.object_weight}")
        if self.context_frames < 1:
            raise ValueError(f"config.cond.context_frames must be >= 1, got {self.context_frames}")
        for name in ("keyframe_rate", "keyframe_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"config.cond.{name} must be in [0, 1], got {getattr(self, name)}")

    @classmethod
    def from_config(cls, config) -> "PixelDanceTask":
        """From config.diffusion and config.cond."""
        d, c = config.diffusion, config.cond
        return cls(objective=d.objective, prediction=d.prediction, min_t=d.min_t_for_x0,
                   time_sampling=d.time_sampling, ddpm_time_sampling=d.get("ddpm_time_sampling", "uniform"),
                   logit_mean=d.logit_mean, logit_std=d.logit_std,
                   first_frame=c.first_frame, p_first=c.p_first, p_last=c.p_last, last_from=c.last_from,
                   noise=c.noise, p_drop_text=c.p_drop_text,
                   keyframe_sets=parse_keyframe_sets(c.get("keyframe_sets", "")),
                   keyframe_rate=c.get("keyframe_rate", 0.25), keyframe_drop=c.get("keyframe_drop", 0.0),
                   keyframe_latents=c.get("keyframe_latents", "frames"),
                   context_frames=c.get("context_frames", 2),
                   first_latent_weight=c.get("first_latent_weight", 1.0),
                   object_weight=c.get("object_weight", 0.0))

    @property
    def path(self) -> str:
        """The noise path: 'flow' or 'ddpm'."""
        return objectives.path(self.objective)

    @property
    def replace(self) -> bool:
        return self.first_frame == "replace"

    @property
    def needs_shift_latents(self) -> bool:
        """Whether training reads the cache's z_shift (the 'continue' set's windows)."""
        return bool(self.keyframe_sets) and self.keyframe_sets[KEYFRAME_SETS.index("continue")] > 0

    @property
    def needs_frame_latents(self) -> bool:
        """Whether training reads the cache's z_frames (middle keyframes from one-frame encodings)."""
        p = dict(zip(KEYFRAME_SETS, self.keyframe_sets or (0.0,) * len(KEYFRAME_SETS)))
        return self.keyframe_latents == "frames" and (p["first_middle"] > 0 or p["random"] > 0)

    def denoise(self, output, x_t, t):
        """Network output -> (x0_hat, v_hat), `objectives.denoise` with this task's settings."""
        return objectives.denoise(output, x_t, t, objective=self.objective, prediction=self.prediction,
                                  min_t=self.min_t)

    # -- training -------------------------------------------------------------------------------

    def training_inputs(self, z, z_last, text, rng, null_text=None, z_frames=None, z_shift=None,
                        shift_context=None) -> dict:
        """The denoiser's inputs for a batch of normalised latents.

        z [B, T, h, w, C]; z_last [B, J, h, w, C], candidate last-frame latents (latest first);
        z_frames [B, T, h, w, C] or None: one-frame latents of pixel frames 4k (the cache's, for
        keyframe_latents='frames'); z_shift [B, T, h, w, C] or None: latents 1..T of the same item
        read tf frames longer (the cache's, for the 'continue' set); shift_context int [B, 1] or
        None: the context length each z_shift window was drawn for (the cache's, with
        config.cond.continue_turns: a turning window changes direction where that context ends, so
        a 'continue' example takes exactly that many; None: drawn as for 'context');
        text: tokens int32 [B, S] or frozen states (module docstring; null_text: their empty
        prompt). Per example: a first-frame instruction with probability p_first;
        given one, a last-frame instruction with probability p_last, picked uniformly among the
        first min(last_from, J) candidates; noise on c_image; text dropped with probability
        p_drop_text. One-frame batches (images) get no image instructions.

        With keyframe_sets, instead: each example draws one set of `KEYFRAME_SETS` (none; first;
        first + last; first + one middle latent frame, uniform in 1..T-2, none for T < 3; random,
        each latent frame with probability keyframe_rate), then each keyframe but the first is
        dropped with probability keyframe_drop. Keyframe latents, like the ones sampling encodes
        from single images: latent 0 is z[:, 0] (a causal VAE encodes frame 0 alone); latent T - 1
        the picked last-frame candidate, as above; a middle latent k is z_frames[:, k], pixel
        frame 4k encoded alone, because a user's middle keyframe is one image encoded alone
        while the clip's own z[:, k] encodes 4 frames after all earlier ones (keyframe_latents=
        'clip' takes z[:, k] anyway, for caches without z_frames).

        Context sets (continuation in latent space): 'context' gives the clip's own first n
        latents (n uniform in 1..context_frames), clean in x_t and out of the loss, never dropped;
        'continue' does the same on z_shift, which the example then trains on instead of z. Why
        both: a continued clip's context is the previous clip's last latents, each of which
        encodes a 4-frame group, while a clip's own latent 0 encodes frame 0 alone; only
        'continue' shows the DiT group latents at the leading positions, as sampling gives them.

        Returns dict(x_t [B, T, h, w, C], t [B], c_image [B, T, h, w, C], c_mask [B, T, h, w, 1],
        text (as given, dropped ones replaced), noise [B, T, h, w, C], loss_mask [B, T, 1, 1, 1] ([B, T, h, w, 1] with object_weight), has_first [B],
        has_last [B], last_pick int32 [B], keyframes bool [B, T]: the latent frames given,
        context bool [B, T]: the context sets' frames, a subset of keyframes, z [B, T, h, w, C]:
        the clean latents each example trains on (z, or z_shift for the 'continue' set)).
        """
        B, T = z.shape[:2]
        keys = jax.random.split(rng, 7)
        pick = jax.random.randint(keys[2], (B,), 0, min(self.last_from, z_last.shape[1]))
        last = jnp.take_along_axis(z_last, pick[:, None, None, None, None], axis=1)[:, 0]
        context = jnp.zeros((B, T), bool)
        if self.keyframe_sets:
            given, context, shifted = self._keyframe_sets(keys[0], B, T, shift_context)
            if self.needs_shift_latents:
                if z_shift is None:
                    raise ValueError("config.cond.keyframe_sets with 'continue' needs the latent cache's z_shift "
                                     "(latents 1..T of each item read 4 frames longer): rerun the 'cache' stage")
                z = jnp.where(shifted[:, None, None, None, None], z_shift, z)
            c_image, c_mask = self._keyframe_instructions(z, last, z_frames, given, context)
            has_first, has_last = given[:, 0], given[:, -1]  # context stops before T - 1
        else:  # PixelDance's first and last frame, today's draws
            has_first = jax.random.uniform(keys[0], (B,)) < self.p_first
            if T == 1:  # an image batch (joint image-video training): text-to-image, no instructions
                has_first = jnp.zeros_like(has_first)
            has_last = has_first & (jax.random.uniform(keys[1], (B,)) < self.p_last)
            c_image, c_mask = conditioning.make_instructions(z[:, 0], last, has_first, has_last, T)
            given = jnp.zeros((B, T), bool).at[:, 0].set(has_first)
            if T > 1:
                given = given.at[:, -1].set(has_last)
        c_image = conditioning.noise_instructions(keys[3], c_image, c_mask, self.noise)

        drop = jax.random.uniform(keys[4], (B,)) < self.p_drop_text
        text = text_lib.select_text(drop, text, text_lib.null_text(text, null_text))

        if self.path == "flow":
            t = schedules.sample_time(keys[5], B, kind=self.time_sampling, mean=self.logit_mean,
                                      std=self.logit_std)
        else:
            t = schedules.sample_ddpm_time(keys[5], B, kind=self.ddpm_time_sampling, mean=self.logit_mean,
                                           std=self.logit_std)
        noise = rng_lib.normal(keys[6], z.shape)
        x_t = objectives.add_noise(z, noise, t, objective=self.objective)
        loss_mask = conditioning.first_frame_loss_mask(has_first, T, self.replace)
        if self.replace:
            x_t = conditioning.replace_first(x_t, z[:, 0], has_first)
            x_t = conditioning.replace_frames(x_t, z, context)
            loss_mask = loss_mask * (~context).astype(loss_mask.dtype)[:, :, None, None, None]
        if self.first_latent_weight != 1.0:
            # Latent 0 weighed where it is generated (0 where given stays 0): the losses are means
            # over each example's weighted elements (objectives._masked_mse).
            loss_mask = loss_mask.at[:, 0].multiply(self.first_latent_weight)
        if self.object_weight:
            loss_mask = loss_mask * (1.0 + self.object_weight * object_map(z))  # [B, T, h, w, 1]
        return dict(x_t=x_t, t=t, c_image=c_image, c_mask=c_mask, text=text, noise=noise, loss_mask=loss_mask,
                    has_first=has_first, has_last=has_last, last_pick=pick, keyframes=given, context=context, z=z)

    def _keyframe_sets(self, rng, B: int, T: int, shift_context=None):
        """(given, context, shifted): bool [B, T] the latent frames given as keyframes, one set of
        `KEYFRAME_SETS` drawn per example (`training_inputs`); bool [B, T] those of the context
        sets; bool [B] the examples of the 'continue' set, whose context length is shift_context
        (int [B, 1]) where given. One-frame batches (images) get none."""
        k_set, k_middle, k_random, k_drop = jax.random.split(rng, 4)
        k_random, k_context = jax.random.split(k_random)
        which = jax.random.choice(k_set, len(KEYFRAME_SETS), (B,), p=jnp.asarray(self.keyframe_sets, jnp.float32))
        is_set = {name: (which == i)[:, None] for i, name in enumerate(KEYFRAME_SETS)}
        frames = jnp.arange(T)[None]
        if T == 1:
            return jnp.zeros((B, 1), bool), jnp.zeros((B, 1), bool), jnp.zeros((B,), bool)
        with_first = is_set["first"] | is_set["first_last"] | is_set["first_middle"]
        given = (frames == 0) & with_first
        given |= (frames == T - 1) & is_set["first_last"]
        if T > 2:
            middle = jax.random.randint(k_middle, (B, 1), 1, T - 1)
            given |= (frames == middle) & is_set["first_middle"]
        given |= (jax.random.uniform(k_random, (B, T)) < self.keyframe_rate) & is_set["random"]
        n_context = jax.random.randint(k_context, (B, 1), 1, min(self.context_frames, T - 1) + 1)
        if shift_context is not None:  # the windows' own, capped as the draws are
            n_shift = jnp.clip(jnp.asarray(shift_context).reshape(B, 1), 1, T - 1)
            n_context = jnp.where(is_set["continue"], n_shift, n_context)
        context = (frames < n_context) & (is_set["context"] | is_set["continue"])
        dropped = (jax.random.uniform(k_drop, (B, T)) < self.keyframe_drop) & (frames > 0) & ~context
        return (given & ~dropped) | context, context, is_set["continue"][:, 0]

    def _keyframe_instructions(self, z, last, z_frames, given, context):
        """c_image [B, T, h, w, C], c_mask [B, T, h, w, 1] of the keyframes `given` (bool [B, T]):
        latent 0 from z, T - 1 from `last` [B, h, w, C], middle ones from z_frames or z, the
        `context` frames (bool [B, T]) from z (`training_inputs`)."""
        T = z.shape[1]
        if self.keyframe_latents == "frames" and T > 2 and self.needs_frame_latents:
            if z_frames is None:
                raise ValueError("config.cond.keyframe_latents='frames' needs the latent cache's z_frames (one-frame "
                                 "latents of pixel frames 4k): rerun the 'cache' stage, or set it to 'clip'")
            source = z_frames
        else:
            source = z
        source = source.at[:, 0].set(z[:, 0])
        if T > 1:
            source = source.at[:, -1].set(last)
        source = jnp.where(context[:, :, None, None, None], z, source)
        g = given.astype(z.dtype)[:, :, None, None, None]
        return source * g, jnp.broadcast_to(g, (*z.shape[:-1], 1))

    def loss(self, model, params, batch, rng, null_text=None):
        """(loss, dict(x0_mse)) on a batch of normalised latents: z [B, T, h, w, C], z_last
        [B, J, h, w, C] and tokens int32 [B, S] or frozen text states (text_states [B, S, D],
        text_mask [B, S]; `models.text.text_input`), see `training_inputs`. The objective sets the noise
        path, the training times (flow: time_sampling; eps / v: ddpm_time_sampling over DDPM's 1000 steps)
        and the regression target."""
        x = self.training_inputs(batch["z"], batch["z_last"], text_lib.text_input(batch), rng, null_text,
                                 batch.get("z_frames"), batch.get("z_shift"), batch.get("shift_context"))
        z = x["z"]  # the 'continue' set's examples train on z_shift
        out = model.apply(params, x["x_t"], x["t"], x["c_image"], x["c_mask"], x["text"])
        loss, _ = objectives.loss(out, z, x["noise"], x["t"], x["loss_mask"], objective=self.objective,
                                  prediction=self.prediction, min_t=self.min_t)
        x0_hat, _ = self.denoise(out, x["x_t"], x["t"])
        x0_err = jnp.mean(jnp.square(x0_hat - z) * x["loss_mask"]) / jnp.mean(x["loss_mask"])
        return loss, dict(x0_mse=x0_err)

    # -- sampling -------------------------------------------------------------------------------

    def denoiser(self, model, params, c_full, m_full, text, guidance, image_guidance, tau, *,
                 branches: int, null_text=None, keyframe_guidance=None, guidance_rescale: float = 0.0):
        """denoise(x [B, T, h, w, C], t, i) -> guided (x0_hat, v_hat), the samplers' interface.

        c_full [B, T, h, w, C], m_full [B, T, h, w, 1]: the instructions with every given frame;
        tau: int32 scalar, for sampling steps i >= tau the frames after the first are dropped
        (PixelDance's strength of the last frame); or int32 [B, T], each latent frame's own tau
        (its keyframe is dropped for steps i >= tau[b, t]; `conditioning.ALWAYS`: never).
        Branches, batched in one model call: full (text and image instructions), image (image
        instructions, the empty prompt), with branches >= 3 none (neither) and with branches = 4
        first (the first frame's instruction alone, the empty prompt); `guidance.combine` mixes
        them with the text scale `guidance`, the image scale `image_guidance` and, with 4
        branches, the other keyframes' scale `keyframe_guidance` (float32 scalars, traced is
        fine). text, null_text: see `training_inputs`.
        guidance_rescale (static float in [0, 1]; 0: off, the program unchanged): the guided x0
        prediction brought by that fraction to the spread of the full branch's
        (`guidance.rescale`), and the velocity moved with it so that the pair still describes the
        same x_t (v = (y - x0) / s in flow coordinates: v' = v - (x0' - x0) / s).
        """
        B = text_lib.text_batch_size(text)
        T = c_full.shape[1]
        tau = jnp.asarray(tau)
        if tau.ndim == 0:  # PixelDance's: the first frame always, every later one for i < tau
            tau = jnp.broadcast_to(jnp.where(jnp.arange(T) == 0, conditioning.ALWAYS, tau), (B, T))
        null = text_lib.null_text(text, null_text)
        tok = text_lib.concat_text([text, null, null, null][:branches])
        first_only = (jnp.arange(T) == 0)[None, :, None, None, None]

        def denoise(x, t, i):
            c, m = conditioning.keep_frames(c_full, m_full, i < tau)
            xx = guidance_lib.stack(x, branches)
            tt = jnp.full((branches * B,), t)
            cc = jnp.concatenate([c, c, jnp.zeros_like(c), c * first_only][:branches])
            mm = jnp.concatenate([m, m, jnp.zeros_like(m), m * first_only][:branches])
            pred = self.denoise(model.apply(params, xx, tt, cc, mm, tok), xx, tt)
            x0, v = guidance_lib.combine(pred, branches, text_scale=guidance, image_scale=image_guidance,
                                         keyframe_scale=keyframe_guidance)
            if guidance_rescale:
                x0_full = jnp.split(pred[0], branches)[0]
                x0_rescaled = guidance_lib.rescale(x0, x0_full, guidance_rescale)
                s, _ = schedules.flow_coordinates(jnp.asarray(t, jnp.float32), self.path)
                # s > 0 at every step the samplers use; Heun's last extra call (at t = 0) is discarded.
                v = v - (x0_rescaled - x0) / jnp.maximum(s, 1e-3)
                x0 = x0_rescaled
            return x0, v
        return denoise

    def guided_sample(self, model, params, noise, z_first, z_last, has_first, has_last, text, rng,
                      guidance, image_guidance, tau, null_text=None, *, steps: int, sampler: str,
                      branches: int, shift: float = 1.0, guidance_rescale: float = 0.0):
        """Normalised latents [B, T, h, w, C] from `noise` [B, T, h, w, C] at t = 1.

        z_first, z_last [B, h, w, C] with has_first, has_last bool [B]: the image instructions
        (noised like training's, from `rng`); text, null_text: see `training_inputs`; guidance, image_guidance:
        float32 scalars; tau: int32 scalar (see `denoiser`); steps, sampler, branches
        (`guidance.num_branches(image_guidance)`) and shift (of the time grid,
        `schedules.shift_time`; Wan 2.1 samples with 3 to 5) and guidance_rescale (`denoiser`) are static. With first_frame='replace' the
        clean first latent is put back after every step where it is given.
        """
        B, T = noise.shape[:2]
        # Keyframes at latent T - 1 (shown for steps i < tau) and 0 (always; it wins at T = 1).
        z_keys = jnp.stack([z_last, z_first], axis=1)
        given = jnp.stack([has_last, has_first], axis=1)
        key_tau = jnp.stack([jnp.broadcast_to(jnp.asarray(tau, jnp.int32), (B,)),
                             jnp.full((B,), conditioning.ALWAYS, jnp.int32)], axis=1)
        return self.keyframe_sample(model, params, noise, z_keys, jnp.array([T - 1, 0]), given, key_tau, text, rng,
                                    guidance, image_guidance, null_text, steps=steps, sampler=sampler,
                                    branches=branches, shift=shift, guidance_rescale=guidance_rescale)

    def keyframe_sample(self, model, params, noise, z_keys, positions, given, key_tau, text, rng, guidance,
                        image_guidance, null_text=None, keyframe_guidance=None, z_context=None, context=None, *,
                        steps: int, sampler: str, branches: int, shift: float = 1.0, guidance_rescale: float = 0.0):
        """Normalised latents [B, T, h, w, C] from `noise` [B, T, h, w, C] at t = 1, guided by
        keyframes anywhere.

        z_keys [B, K, h, w, C]: K keyframe slots' latents; positions int32 [B, K] or [K]: their
        latent frames (`conditioning.place_keyframes`: outside [0, T) an unused slot, later slots
        win); given bool [B, K]; key_tau int32 [B, K]: each keyframe is shown for sampling steps
        i < its tau (`conditioning.ALWAYS`: every step; PixelDance's first frame). The keyframes
        are noised like training's (from `rng`); the image guidance scale applies to them all
        (the image branch holds every keyframe shown at the step, the none branch none), or with
        branches = 4 (`guidance.num_branches(image_guidance, keyframe_guidance)`) to the first
        frame, and keyframe_guidance (float32 scalar) to the other keyframes. With
        first_frame='replace' a keyframe at latent 0 is put back, clean, after every step; later
        keyframes only condition (a one-frame latent is not the clip's own latent there).

        Continuation in latent space (training's 'context' set): context bool [B, T] marks latent
        frames given as the clip's own latents, z_context [B, T, h, w, C] (read where context
        holds; e.g. the previous clip's last K latents at 0..K-1). They are keyframes shown at
        every step (noised like training's; over a keyframe slot at the same frame) and, with
        first_frame='replace' as in training, put back clean into x before the first step and
        after every step, so the result holds them exactly. Traced: one compiled sampler serves
        a clip without context (all False) and the clips continued from it.
        Other arguments as `guided_sample`.
        """
        T = noise.shape[1]
        c_clean, m_full, frame_tau = conditioning.place_keyframes(z_keys, positions, given, T,
                                                                  jnp.asarray(key_tau, jnp.int32))
        if context is not None:
            c_clean = conditioning.replace_frames(c_clean, z_context, context)
            m_full = jnp.where(context[:, :, None, None, None], jnp.ones_like(m_full), m_full)
            frame_tau = jnp.where(context, conditioning.ALWAYS, frame_tau)
        c_full = conditioning.noise_instructions(rng, c_clean, m_full, self.noise)
        denoise = self.denoiser(model, params, c_full, m_full, text, guidance, image_guidance, frame_tau,
                                branches=branches, null_text=null_text, keyframe_guidance=keyframe_guidance,
                                guidance_rescale=guidance_rescale)
        has_first = m_full[:, 0, 0, 0, 0] > 0
        project = (lambda x: conditioning.replace_first(x, c_clean[:, 0], has_first)) if self.replace else None
        if self.replace and context is not None:
            project = lambda x: conditioning.replace_frames(conditioning.replace_first(x, c_clean[:, 0], has_first),
                                                            z_context, context)
        return samplers.solve(denoise, noise, steps=steps, sampler=sampler, path=self.path, shift=shift,
                              project=project)
