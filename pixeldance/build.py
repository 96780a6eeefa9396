"""The one config reader for models: config -> VAE, DiT, tokenizer, latent shapes, init inputs.

Every stage, the Pipeline, the planner and the tools build their models here, so a config field
means the same thing everywhere:

  vae(config, spec)          the CausalVAE of config.vae (or of a saved spec, or the converted
                             Wan 2.1 VAE when config.vae.family == 'wan')
  tokenizer(config)          config.text's tokenizer (the encoder trained with the DiT)
  text_conditioner(config)   captions -> the DiT's text input and the cache's text fields, per
                             config.text.encoder (the word encoder, or a frozen CLIP / T5 / umT5)
  dit(config, C)             text encoder + video DiT for latents of C channels
  latent_shape(vae, F, H, W) (T, h, w, C) of F frames of H x W pixels, from the VAE's own factors
  dit_init_fn / vae_init_fn  model.init with example inputs of the right shapes (zeros: only
                             shapes matter, the parameters do not depend on T, h, w)

Axis letters (glossary: pixeldance/models/__init__.py): F pixel frames, H/W pixel height/width,
T latent frames, h/w latent height/width, C latent channels, S text tokens.
"""
from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from pixeldance.data import synthetic
from pixeldance.diffusion.task import PixelDanceTask
from pixeldance.models import attention_kernels
from pixeldance.models import dit as dit_lib
from pixeldance.models import lora as lora_lib
from pixeldance.models import text as text_lib
from pixeldance.models import text_encoder as text_encoder_lib
from pixeldance.models import vae as vae_lib
from pixeldance.models import wan_dit, wan_vae, weights

VAE_FAMILIES = ("causal", "wan")


def task(config) -> PixelDanceTask:
    """The PixelDance task of config.diffusion and config.cond."""
    return PixelDanceTask.from_config(config)


def vae(config, spec: dict | None = None) -> vae_lib.CausalVAE | wan_vae.WanVAE:
    """The VAE of `config`; with `spec` (`workdir.read_model_spec`), the architecture saved when it
    was trained or converted. config.vae.family 'wan' (a folder of `pixeldance.convert.wan_vae`)
    needs the spec; 'causal' (default) without one is config.vae.variant of the size table, with
    a discriminator when config.vae.disc_weight > 0."""
    family = config.vae.get("family", "causal")
    if family not in VAE_FAMILIES:
        raise ValueError(f"unknown config.vae.family {family!r}; expected one of {VAE_FAMILIES}")
    if family == "wan":
        if spec is None:
            raise FileNotFoundError("converted Wan VAE without its architecture (vae_model.json)")
        return wan_vae.WanVAE(**spec)
    if spec is not None:
        return vae_lib.CausalVAE(**spec)
    disc_weight = config.vae.get("disc_weight", 0.0)
    disc = tuple(config.vae.get("disc_channels", (32, 64, 128))) if disc_weight > 0 else ()
    return vae_lib.vae_from_variant(config.vae.variant, disc_channels=disc)


def latent_shape(vae_model, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(T, h, w, C) of a video of F = num_frames frames of H x W pixels under `vae_model`'s
    compression; ValueError (one line) when they do not compress evenly."""
    tf, sf = vae_model.temporal_factor, vae_model.spatial_factor
    if num_frames < 1 or (num_frames - 1) % tf or height % sf or width % sf or min(height, width) < sf:
        raise ValueError(f"{num_frames} frames of {height}x{width} pixels do not compress by the VAE's "
                         f"{tf}x{sf}x{sf}: frames must be 1 + {tf}k and height, width multiples of {sf}")
    return 1 + (num_frames - 1) // tf, height // sf, width // sf, vae_model.latent_channels


def data_latent_shape(config) -> tuple[int, int, int, int]:
    """(T, h, w, C) of config.data's clips under config.vae (no workdir needed)."""
    R = config.data.resolution
    return latent_shape(vae(config), config.data.num_frames, R, R)


def tokenizer(config):
    """config.text.tokenizer: 'words' (default; the shapes world's closed vocabulary), or for
    free-text captions 'hashed' (words hashed into config.text.vocab_size ids) or 'bytes'."""
    kind = config.text.get("tokenizer", "words")
    if kind == "hashed":
        return text_lib.HashedTokenizer(config.text.get("vocab_size", 4096), config.text.max_length)
    if kind == "bytes":
        return text_lib.ByteTokenizer(config.text.max_length)
    if kind != "words":
        raise ValueError(f"unknown config.text.tokenizer {kind!r}; expected 'words', 'hashed' or 'bytes'")
    if config.data.name != "shapes":
        raise ValueError(f"no word tokenizer for dataset {config.data.name!r}: set "
                         f"config.text.tokenizer='hashed' or 'bytes' for free-text captions")
    words = ("a", "moves", "and") + synthetic.COLOURS + synthetic.SHAPES + synthetic.DIRECTIONS
    return text_lib.WordTokenizer(words, config.text.max_length)


TEXT_ENCODERS = ("word", "clip", "t5", "umt5")


class TokenText:
    """The text input of the encoder trained with the DiT (config.text.encoder = 'word'):
    captions -> tokens int32 [B, S] (`tokenizer(config)`); the empty prompt is made from the
    tokens' shape (`models.text.null_tokens`), so `null` is None."""

    frozen = False
    null = None

    def __init__(self, tok):
        self.tokenizer = tok

    def record(self, captions) -> dict:
        """The latent-cache fields of B captions: tokens int32 [B, S]."""
        return dict(tokens=np.asarray(self.tokenizer(list(captions)), np.int32))

    def __call__(self, captions):
        """The DiT's text input for B captions: tokens int32 [B, S]."""
        return jnp.asarray(self.record(captions)["tokens"])

    def example(self):
        """A text input of batch 1 (zeros) for `dit_init_fn`."""
        return jnp.zeros((1, self.tokenizer.max_length), jnp.int32)

    @property
    def max_length(self) -> int:
        """Tokens per caption (BOS included); longer captions are cut."""
        return self.tokenizer.max_length

    def num_tokens(self, captions) -> list[int]:
        """Each caption's length in tokens before it is cut to max_length."""
        return self.tokenizer.num_tokens(list(captions))


class EncoderText:
    """The text input of a frozen pretrained encoder (config.text.encoder = clip / t5 / umt5, a
    folder of `pixeldance.convert.text_encoder` in config.text.encoder_path): captions ->
    dict(states bfloat16 [B, S, D], mask bool [B, S]), the encoder's last hidden states rounded
    to bfloat16 as the latent cache stores them, so that sampling sees what training saw.

    The folder's config.json alone gives the shapes (`example`, `identity`): the DiT trainer,
    which reads the cached states, never loads the weights; the cache stage and the Pipeline load
    them on first use. S: config.text.encoder_max_length, or the folder's (0). dtype: T5 / umT5
    compute and parameter dtype (CLIP: float32): 'bfloat16' holds umT5-XXL in 11.4 GB, not 22.7.
    mesh: where the weights are placed, sharded by their logical names under the 'fsdp_tensor'
    rules (None: the default device), one array at a time (`load_text_encoder`): the cache stage
    and the Pipeline pass their mesh of this process's devices, so no chip holds the whole encoder.
    """

    frozen = True
    PRESET = "fsdp_tensor"

    def __init__(self, kind: str, path: str, max_length: int = 0, dtype: str = "float32", mesh=None):
        if not path:
            raise ValueError(f"config.text.encoder={kind!r} needs config.text.encoder_path, a folder of "
                             f"{text_encoder_lib.ORIGIN}")
        folder = weights.read_config(path, text_encoder_lib.NETWORK, text_encoder_lib.ORIGIN)
        where = os.path.join(path, weights.CONFIG)
        if folder.get("kind") != kind:
            raise ValueError(f"{where}: a {folder.get('kind')!r} text encoder, but config.text.encoder={kind!r}")
        model = text_encoder_lib.model_from_config(kind, folder.get("encoder") or {}, where=where)
        self.kind, self.path, self.dtype, self.mesh = kind, path, dtype, mesh
        self.dim = model.text.width if kind == "clip" else model.width
        self.max_length = int(max_length or folder.get("max_length") or text_encoder_lib.DEFAULT_MAX_LENGTH[kind])
        self.sha256 = folder.get("sha256")
        self._tokenizer_config = folder.get("tokenizer") or {}
        self._encoder, self._null, self._tokenizer = None, None, None

    @property
    def encoder(self) -> text_encoder_lib.TextEncoder:
        if self._encoder is None:
            dtype = None if self.kind == "clip" else self.dtype
            self._encoder = text_encoder_lib.load_text_encoder(
                self.path, dtype, param_dtype=dtype, max_length=self.max_length, mesh=self.mesh,
                preset=self.PRESET)
        return self._encoder

    def num_tokens(self, captions) -> list[int]:
        """Each caption's length in tokens (special tokens included) before it is cut to
        max_length; needs the folder's tokenizer only, not the weights."""
        if self._tokenizer is None:
            self._tokenizer = (self._encoder.tokenizer if self._encoder is not None else
                               text_encoder_lib.make_tokenizer(self.kind, self.path, self._tokenizer_config))
        return self._tokenizer.num_tokens(list(captions))

    def identity(self) -> dict:
        """What cached states depend on (the latent cache's info): kind, weights' hash, length."""
        return dict(kind=self.kind, sha256=self.sha256, max_length=self.max_length)

    def record(self, captions) -> dict:
        """The latent-cache fields of B captions: text_states bfloat16 [B, S, D], text_mask bool
        [B, S]."""
        states, mask = self.encoder(list(captions))
        return dict(text_states=np.asarray(states.astype(jnp.bfloat16)), text_mask=np.asarray(mask, bool))

    def null_record(self) -> dict:
        """The empty prompt's fields (batch 1), stored once beside the cache for guidance."""
        return self.record([""])

    def __call__(self, captions) -> dict:
        """The DiT's text input for B captions: dict(states bfloat16 [B, S, D], mask bool [B, S])."""
        return jax.tree.map(jnp.asarray, text_lib.text_input(self.record(captions)))

    @property
    def null(self) -> dict:
        """The empty prompt's text input, dict(states [1, S, D], mask [1, S])."""
        if self._null is None:
            self._null = self([""])
        return self._null

    def example(self) -> dict:
        """A text input of batch 1 (zeros) for `dit_init_fn`, from the folder's config alone."""
        return dict(states=jnp.zeros((1, self.max_length, self.dim), jnp.bfloat16),
                    mask=jnp.zeros((1, self.max_length), bool))


def text_conditioner(config, mesh=None):
    """What turns captions into the DiT's text input, per config.text.encoder: 'word' (default)
    a `TokenText` over `tokenizer(config)`, the encoder trained with the DiT; 'clip', 't5' or
    'umt5' an `EncoderText` over the converted folder config.text.encoder_path, its weights
    placed on `mesh` when they are loaded (None: the default device)."""
    kind = config.text.get("encoder", "word")
    if kind not in TEXT_ENCODERS:
        raise ValueError(f"unknown config.text.encoder {kind!r}; choose from {TEXT_ENCODERS}")
    if kind == "word":
        return TokenText(tokenizer(config))
    return EncoderText(kind, config.text.get("encoder_path", ""), config.text.get("encoder_max_length", 0),
                       config.text.get("encoder_dtype", "float32"), mesh=mesh)


def text_model(config, dtype) -> nn.Module:
    """The DiT's text module: the `TextEncoder` trained with it ('word'), or `FrozenText`, which
    passes a frozen encoder's cached states through (no parameters)."""
    if config.text.get("encoder", "word") != "word":
        return text_lib.FrozenText(dtype=dtype)
    tok = tokenizer(config)
    return text_lib.TextEncoder(vocab_size=tok.vocab_size, max_length=config.text.max_length,
                                width=config.text.width, num_layers=config.text.num_layers,
                                num_heads=config.text.num_heads, dtype=dtype)


def dit_patch(config) -> tuple[int, int, int]:
    """The DiT's (t, h, w) patch: the variant's suffix ('B/2') or config.dit.patch_size; a Wan
    DiT's own."""
    if config.dit.get("family", "pixeldance") == "wan":
        return tuple(wan_fields(config)["patch_size"])
    return tuple(dit_lib.decode_variant(config.dit.variant).get("patch_size", tuple(config.dit.patch_size)))


DIT_FAMILIES = ("pixeldance", "wan")


def wan_fields(config) -> dict:
    """The Wan DiT architecture of config.dit: the converted folder init_from's (its config.json),
    else the named config.dit.wan_config (`wan_dit.WAN_DIT_CONFIGS`)."""
    d = config.dit
    if d.get("init_from"):
        return dict(weights.read_config(d.init_from, wan_dit.NETWORK, wan_dit.ORIGIN).get("dit") or {})
    if not d.get("wan_config"):
        raise ValueError("config.dit.family='wan' needs config.dit.init_from (a converted Wan DiT folder) "
                         f"or config.dit.wan_config (one of {sorted(wan_dit.WAN_DIT_CONFIGS)})")
    return wan_dit.config(d.wan_config)


def wan_video(config, latent_channels: int, dtype) -> wan_dit.WanVideo:
    """The Wan 2.1 DiT as the video DiT (config.dit.family = 'wan'): `wan_fields` with the input
    widened to 2C + 1 channels for [x, c_image, c_mask] (config.dit.widen) and C outputs."""
    d, C = config.dit, latent_channels
    fields = wan_fields(config)
    if fields["out_channels"] != C:
        raise ValueError(f"the Wan DiT of config.dit outputs {fields['out_channels']} latent channels, the VAE's "
                         f"latents have {C}")
    fields = dict(fields, in_channels=2 * C + 1 if d.get("widen", True) else C)
    transformer = wan_dit.model_from_config(fields, dtype=dtype, remat=d.remat,
                                            context_parallel=d.get("context_parallel", "ulysses"),
                                            attention_impl=attention_impl(config), where="config.dit")
    return wan_dit.WanVideo(transformer, widen=d.get("widen", True), mask_text=d.get("mask_text", False))


def attention_impl(config) -> str | None:
    """config.dit.attention_impl: '' (None: the kernel `attention_kernels.pick_implementation`
    chooses per backend and shape) or one of `attention_kernels.IMPLEMENTATIONS`, forced for every
    attention of the DiT; refused in one line naming it otherwise."""
    impl = config.dit.get("attention_impl", "") or None
    if impl is not None and impl not in attention_kernels.IMPLEMENTATIONS:
        raise ValueError(f"unknown config.dit.attention_impl {impl!r}; choose from "
                         f"{attention_kernels.IMPLEMENTATIONS} or '' (per backend)")
    return impl


def check_dit_loop(config) -> int:
    """config.dit.scan_unroll (default 1), refused below 1 in one line naming it: checked by
    `pixeldance.main` before the first stage, so a typo does not wait for the DiT stage.
    Also checks config.dit.depth (`dit_size`) and config.dit.attention_impl."""
    attention_impl(config)
    unroll = config.dit.get("scan_unroll", 1)
    if not isinstance(unroll, int) or unroll < 1:
        raise ValueError(f"config.dit.scan_unroll must be an integer >= 1 (layers per loop iteration), got {unroll!r}")
    if config.dit.get("family", "pixeldance") == "pixeldance":
        dit_size(config)
    return unroll


def dit_size(config) -> dict:
    """VideoDiT's size kwargs (width, depth, num_heads, mlp_ratio[, patch_size]): the size table's
    row config.dit.variant (`dit_lib.decode_variant`), its depth replaced by config.dit.depth
    where that is > 0 (0 or absent: the table's). A depth that is not an integer >= 0 is refused
    in one line naming it."""
    kwargs = dit_lib.decode_variant(config.dit.variant)
    depth = config.dit.get("depth", 0)
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ValueError(f"config.dit.depth must be an integer >= 0 (0: the variant's), got {depth!r}")
    if depth:
        kwargs["depth"] = depth
    return kwargs


def dit(config, latent_channels: int) -> dit_lib.PixelDanceModel:
    """Text encoder + video DiT of config.text / config.dit for latents of `latent_channels`:
    this codebase's VideoDiT, or the Wan 2.1 DiT (config.dit.family = 'wan', which needs a frozen
    text encoder whose width is the DiT's text_dim)."""
    dtype = jnp.dtype(config.dit.dtype)
    text = text_model(config, dtype)
    family = config.dit.get("family", "pixeldance")
    if family not in DIT_FAMILIES:
        raise ValueError(f"unknown config.dit.family {family!r}; choose from {DIT_FAMILIES}")
    if family == "wan":
        if config.text.get("encoder", "word") == "word":
            raise ValueError("config.dit.family='wan' conditions on a frozen text encoder: set config.text.encoder "
                             "(umt5 for Wan 2.1) and config.text.encoder_path")
        return dit_lib.PixelDanceModel(text, wan_video(config, latent_channels, dtype))
    kwargs = dit_size(config)
    kwargs.setdefault("patch_size", tuple(config.dit.patch_size))
    video = dit_lib.VideoDiT(latent_channels=latent_channels, remat=config.dit.remat, dtype=dtype,
                             attention=config.dit.attention,
                             context_parallel=config.dit.get("context_parallel", "ulysses"),
                             pos_embed=config.dit.get("pos_embed", "none"),
                             scan_unroll=check_dit_loop(config), attention_impl=attention_impl(config),
                             **kwargs)
    return dit_lib.PixelDanceModel(text, video)


def dit_init_fn(model: dit_lib.PixelDanceModel, latent: tuple[int, int, int, int], text) -> Callable:
    """rng -> boxed parameters, from example inputs for latents (T, h, w, C) and `text`: S, the
    token count of the encoder trained with the DiT, or a text input of one example (frozen
    states, see models/text.py). x, t, c_image, c_mask of one example are zeros (under
    `jax.eval_shape` they are never allocated)."""
    T, h, w, C = latent
    text = jnp.zeros((1, text), jnp.int32) if isinstance(text, int) else text
    example = (jnp.zeros((1, T, h, w, C)), jnp.zeros((1,)), jnp.zeros((1, T, h, w, C)),
               jnp.zeros((1, T, h, w, 1)), text)
    return lambda rng: model.init(rng, *example)


def vae_init_fn(model, num_frames: int, height: int, width: int) -> Callable:
    """rng -> boxed parameters of a VAE, from one float32 video [1, F, H, W, 3] of zeros."""
    example = jnp.zeros((1, num_frames, height, width, 3), jnp.float32)
    return lambda rng: model.init(rng, example)


def pretrained_dit_params(config):
    """(abstract params, their shardings) -> placed params, when the DiT starts from converted
    weights (config.dit.family = 'wan' with config.dit.init_from: the Wan 2.1 DiT, its input
    widened with zero weights for PixelDance's instructions), else None (random init). The DiT
    trainer's `train_lib.fit(initial_params=...)`, and the Pipeline of a
    workdir with no DiT checkpoint yet."""
    if config.dit.get("family", "pixeldance") != "wan" or not config.dit.get("init_from"):
        return None

    def initial_params(abstract, shardings):
        return {"params": {"dit": {"transformer": wan_params(config.dit.init_from, abstract, shardings)}}}
    return initial_params


def wan_params(directory: str, abstract, shardings) -> dict:
    """The transformer subtree of a Wan-family PixelDanceModel's params, read from a converted
    Wan DiT folder into `shardings` (`wan_dit.read_params`). abstract, shardings: the model's
    whole {'params': ...} trees, which hold nothing else (FrozenText has no parameters)."""
    tree = abstract["params"]
    if set(tree) != {"dit"} or set(tree["dit"]) != {"transformer"}:
        raise ValueError(f"a Wan-family DiT holds only dit/transformer parameters, not {sorted(tree)}")
    flat_abstract = traverse_util.flatten_dict(tree["dit"]["transformer"])
    flat_sh = traverse_util.flatten_dict(shardings["params"]["dit"]["transformer"])
    flat = wan_dit.read_params(directory, flat_abstract, lambda path, value: jax.device_put(value, flat_sh[path]))
    return traverse_util.unflatten_dict(flat)



# LoRA fine-tuning of a pretrained DiT (config.train.lora_rank > 0): the Wan family's attention,
# feed-forward and patch-embedding kernels. The patch embedding is a target because its widened
# instruction channels start at zero: without an adapter there, c_image and c_mask would never
# be read.
LORA_TARGETS = "blocks/attn1/to_.*,blocks/attn2/to_.*,blocks/ffn/proj_.*,patch_embedding"


LORA_BASE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dit_lora(config, need_weights: bool = True) -> dict | None:
    """{'rank', 'targets', 'alpha', 'base_dtype'} of config.train.lora_rank / lora_targets /
    lora_alpha / lora_base_dtype, or None for full fine-tuning (rank 0). LoRA trains adapters over
    converted weights (`pretrained_dit_params`): a rank without them is a config error (one line),
    unless need_weights is False (the planner: a Wan DiT named by config.dit.wan_config, no
    weights). alpha 0 means alpha = rank (the update W + (alpha / R) A @ B at scale 1).
    base_dtype: the jnp dtype the frozen base is held in, in training and sampling alike."""
    c = config.train
    rank = c.get("lora_rank", 0)
    if not rank:
        return None
    if isinstance(rank, bool) or int(rank) != rank or rank < 0:
        raise ValueError(f"config.train.lora_rank must be a non-negative integer, got {rank!r}")
    wan = config.dit.get("family", "pixeldance") == "wan"
    if pretrained_dit_params(config) is None and (need_weights or not wan):
        raise ValueError(f"config.train.lora_rank={rank} trains adapters over pretrained weights: set "
                         f"config.dit.family='wan' and config.dit.init_from (a converted Wan DiT folder), "
                         f"or lora_rank=0 to train every weight")
    alpha = float(c.get("lora_alpha", 0.0) or rank)
    # Prefixed by 'params/dit/transformer/' in the model's tree: targets are searched in the whole path.
    base_dtype = c.get("lora_base_dtype", "float32")
    if base_dtype not in LORA_BASE_DTYPES:
        raise ValueError(f"config.train.lora_base_dtype must be one of {sorted(LORA_BASE_DTYPES)}, "
                         f"got {base_dtype!r}")
    return dict(rank=int(rank), targets=c.get("lora_targets", "") or LORA_TARGETS, alpha=alpha,
                base_dtype=jnp.dtype(LORA_BASE_DTYPES[base_dtype]))


def lora_init_fn(init_fn: Callable, lora: dict) -> Callable:
    """rng -> boxed LoRA adapters (`models/lora.py`) for the kernels of the model whose boxed
    params init_fn(rng) makes (only their shapes and logical names are read), per `dit_lora`'s
    spec; a tree {'params': ...} like the model's, so merging is by path."""
    def make(rng):
        boxed = jax.eval_shape(init_fn, jax.random.key(0))
        return lora_lib.init(rng, boxed, rank=lora["rank"], targets=lora["targets"])
    return make


def lora_loss(loss_fn: Callable, lora: dict) -> Callable:
    """loss_fn(params, batch, rng) -> loss(adapters, batch, rng, base): the merged weights' loss,
    computed through the adapters' side path (`lora.make_loss`), the base frozen
    (`train_lib.fit(frozen=...)` passes it as the fourth argument)."""
    side_loss = lora_lib.make_loss(loss_fn, alpha=lora["alpha"])
    return lambda adapters, batch, rng, base: side_loss(adapters, base, batch, rng)


def merge_lora(base, adapters, lora: dict, shardings=None):
    """The base params with the adapters merged in (`lora.merge`), jitted into `shardings` (the
    base's, default: as the inputs'); what sampling, periodic evaluation and export use."""
    merge = lambda b, a: lora_lib.merge(b, a, alpha=lora["alpha"])
    return jax.jit(merge, out_shardings=shardings)(base, adapters)
