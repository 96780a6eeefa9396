"""CLIP's image and text towers (ViT-B/32, ViT-B/16), its preprocessing and its tokenizer.

CLIPSIM scores a frame by the cosine of its CLIP image embedding with the caption's text
embedding; the DiT can condition on the text tower's per-token hidden states. The towers follow
transformers' `CLIPModel` (the parity reference, tests/test_clip.py) so that converted OpenAI
weights give OpenAI's embeddings: pre-LayerNorm transformer blocks with quick-GELU MLPs, the
vision tower's class token, position embeddings and extra LayerNorm before the blocks, the text
tower's causal attention that also skips padding keys, and bias-free projections of the pooled
token (the class token for images, the end-of-text token for captions).

  model = CLIP(text=CLIPTextTower(**VARIANTS['B/32']['text']), vision=...)   or load_clip(DIR)
  model.apply(v, preprocess(frames), method=model.encode_image)     -> [B, projection_dim]
  model.apply(v, ids, mask, method=model.encode_text)               -> [B, projection_dim]
  model.apply(v, ids, mask, method=model.text_hidden)               -> [B, S, D]

Every matmul runs at HIGHEST precision (TPUs otherwise multiply float32 in bfloat16 and the
embeddings drift by ~1e-2); inference only (no dropout).

Converted folders (`pixeldance/convert/clip.py`, format `pixeldance/models/weights.py`) hold the
tower fields in config.json ({"network": "clip", "text": {...}, "vision": {...} | null,
"pad_token": ...}) and, where the Hugging Face folder had one, its tokenizer.json.

Axis letters (glossary: pixeldance/models/__init__.py): B batch, S text tokens, M key length,
L image tokens (class token + patches), P patches, H/W pixel height/width, D width, N heads,
K head width, E MLP width. The projection's width has no letter: `projection_dim`.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from pixeldance.models import weights
from pixeldance.models.layers import LayerNorm

HIGHEST = jax.lax.Precision.HIGHEST
NETWORK = "clip"
TOKENIZER = "tokenizer.json"
ORIGIN = ("python -m pixeldance.convert.clip --input=<Hugging Face CLIP folder, e.g. "
          "openai/clip-vit-base-patch16> --output=DIR")

# OpenAI's released sizes (their Hugging Face configs), and a tiny `mu` for tests. The text
# tower is the same for both ViT-Bs; `mu` keeps CLIP's vocabulary, context and image size so any
# CLIP tokenizer and `preprocess` fit it.
_TEXT_B = dict(width=512, layers=12, heads=8, mlp_width=2048, vocab_size=49408, max_positions=77,
               projection_dim=512)
VARIANTS = {
    "B/32": dict(text=_TEXT_B, vision=dict(width=768, layers=12, heads=12, mlp_width=3072, patch_size=32,
                                           image_size=224, projection_dim=512)),
    "B/16": dict(text=_TEXT_B, vision=dict(width=768, layers=12, heads=12, mlp_width=3072, patch_size=16,
                                           image_size=224, projection_dim=512)),
    "mu": dict(text=dict(width=32, layers=2, heads=2, mlp_width=64, vocab_size=49408, max_positions=77,
                         projection_dim=16),
               vision=dict(width=32, layers=2, heads=2, mlp_width=64, patch_size=32, image_size=224,
                           projection_dim=16)),
}

# CLIP's pixel normalisation (OpenAI's training statistics), RGB.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # what OpenAI's CLIP trained with
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),     # some later CLIPs (transformers' 'gelu')
}


def from_variant(name: str) -> "CLIP":
    """'B/32', 'B/16' or 'mu' -> a CLIP with both towers (random weights until loaded)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown CLIP variant {name!r}; choose from {sorted(VARIANTS)}")
    spec = VARIANTS[name]
    return CLIP(text=CLIPTextTower(**spec["text"]), vision=CLIPVisionTower(**spec["vision"]))


# ----------------------------------------------------------------------------------------------
# Layers.

class _Dense(nn.Module):
    """Contracts the last `in_dims` axes of x with a kernel in_shape + features, at HIGHEST
    precision (layers.Dense takes no precision). `kernel_axes` are logical names (inputs, outputs)."""
    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    in_dims: int = 1
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - self.in_dims:]
        n_in, n_out = int(np.prod(in_shape)), int(np.prod(self.features))
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal",
                                                in_axis=tuple(range(self.in_dims)),
                                                out_axis=tuple(range(self.in_dims, self.in_dims + len(self.features))))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                            in_shape + tuple(self.features))
        y = jnp.dot(x.reshape(-1, n_in), kernel.reshape(n_in, n_out), precision=HIGHEST)
        y = y.reshape(x.shape[:x.ndim - self.in_dims] + tuple(self.features))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                   self.kernel_axes[self.in_dims:]),
                              tuple(self.features))
            y = y + bias
        return y


class _Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections (transformers' layout)."""
    width: int
    heads: int

    @nn.compact
    def __call__(self, x, allowed=None):
        """x: float32 [B, L, D]; allowed: bool [B, L, M] (M = L) or None -> float32 [B, L, D]."""
        N, K = self.heads, self.width // self.heads
        q, k, v = (_Dense((N, K), ("embed", "heads", "kv"), name=f"{n}_proj")(x) for n in "qkv")
        logits = jnp.einsum("blnk,bmnk->bnlm", q, k, precision=HIGHEST) * K ** -0.5
        if allowed is not None:
            # The lowest float, not -inf: a row with no allowed key then gives a uniform
            # average instead of NaN (transformers adds the same value).
            logits = jnp.where(allowed[:, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        y = jnp.einsum("bnlm,bmnk->blnk", probs, v, precision=HIGHEST)
        return _Dense((self.width,), ("heads", "kv", "embed"), in_dims=2, name="out_proj")(y)


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
    width: int
    heads: int
    mlp_width: int
    eps: float
    act: str

    @nn.compact
    def __call__(self, x, allowed=None):
        """x: float32 [B, L, D] -> [B, L, D]."""
        x = x + _Attention(self.width, self.heads, name="self_attn")(
            LayerNorm(eps=self.eps, name="layer_norm1")(x), allowed)
        y = LayerNorm(eps=self.eps, name="layer_norm2")(x)
        y = _Dense((self.mlp_width,), ("embed", "mlp"), name="fc1")(y)
        y = _Dense((self.width,), ("mlp", "embed"), name="fc2")(ACTIVATIONS[self.act](y))
        return x + y


def _check_act(act: str):
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; choose from {sorted(ACTIVATIONS)}")


# ----------------------------------------------------------------------------------------------
# The towers.

class CLIPTextTower(nn.Module):
    """Token ids -> (projected pooled embedding, per-token hidden states).

    eos_token_id: which token's hidden state is pooled, as transformers does it: 2 (the value in
      OpenAI's released configs) means the position of the largest id (the end-of-text token is
      the largest id of CLIP's vocabulary); any other value, the first position of that id.
    projection_dim: None for a tower without projection (transformers' `CLIPTextModel`, e.g. a
      diffusion model's text encoder): then only the hidden states are available.
    """
    width: int
    layers: int
    heads: int
    mlp_width: int
    vocab_size: int
    max_positions: int
    projection_dim: int | None
    eps: float = 1e-5
    act: str = "quick_gelu"
    eos_token_id: int = 2

    @nn.compact
    def __call__(self, ids, mask, *, project: bool = True):
        """ids: int32 [B, S] (S <= max_positions); mask: int32/bool [B, S], nonzero for real tokens.

        Returns (embedding float32 [B, projection_dim] or None where `project` is False or the
        tower has no projection, hidden float32 [B, S, D] after the final LayerNorm).
        """
        _check_act(self.act)
        S = ids.shape[1]
        if S > self.max_positions:
            raise ValueError(f"text of {S} tokens, the tower has {self.max_positions} positions")
        init = nn.initializers.normal(0.02)
        tokens = self.param("token_embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
                            (self.vocab_size, self.width))
        positions = self.param("position_embedding", nn.with_logical_partitioning(init, (None, "embed")),
                               (self.max_positions, self.width))
        x = jnp.take(tokens, ids, axis=0) + positions[None, :S]  # [B, S, D]
        # Query s sees keys m <= s that are real tokens (causal, as CLIP trained, plus padding).
        causal = jnp.tril(jnp.ones((S, S), bool))
        allowed = causal[None] & (jnp.asarray(mask) != 0)[:, None, :]  # [B, S, M]
        for i in range(self.layers):
            x = _Block(self.width, self.heads, self.mlp_width, self.eps, self.act, name=f"layers_{i}")(x, allowed)
        hidden = LayerNorm(eps=self.eps, name="final_layer_norm")(x)
        if self.projection_dim is None:
            return None, hidden
        projection = _Dense((self.projection_dim,), ("embed", None), use_bias=False, name="projection")
        if not project:
            if self.is_initializing():
                projection(hidden[:, 0])  # the parameters exist whichever method initialises
            return None, hidden
        if self.eos_token_id == 2:
            eos = jnp.argmax(ids, axis=-1)
        else:
            eos = jnp.argmax(ids == self.eos_token_id, axis=-1)  # first position (argmax of a bool)
        pooled = jnp.take_along_axis(hidden, eos[:, None, None], axis=1)[:, 0]  # [B, D]
        return projection(pooled), hidden


class CLIPVisionTower(nn.Module):
    """Normalised pixels -> projected class-token embedding."""
    width: int
    layers: int
    heads: int
    mlp_width: int
    patch_size: int
    image_size: int
    projection_dim: int
    eps: float = 1e-5
    act: str = "quick_gelu"

    @nn.compact
    def __call__(self, pixels):
        """pixels: float32 [B, image_size, image_size, 3], normalised (`preprocess`) -> float32
        [B, projection_dim] (projected, not unit-normalised)."""
        _check_act(self.act)
        B, H, W, C = pixels.shape
        if (H, W, C) != (self.image_size, self.image_size, 3):
            raise ValueError(f"pixels of shape {pixels.shape[1:]}, the tower takes "
                             f"({self.image_size}, {self.image_size}, 3) (use preprocess)")
        p, D = self.patch_size, self.width
        grid = self.image_size // p
        # Non-overlapping patches as one matmul (the stride-p conv of the reference), row-major
        # over the grid like the conv output's flattening.
        patches = pixels.reshape(B, grid, p, grid, p, 3).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(B, grid * grid, p * p * 3)  # [B, P, p*p*3]
        kernel = self.param("patch_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, None, "conv_in", "embed")), (p, p, 3, D))
        x = jnp.dot(patches, kernel.reshape(p * p * 3, D), precision=HIGHEST)  # [B, P, D]
        cls = self.param("class_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(D ** -0.5), ("embed",)), (D,))
        positions = self.param("position_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "embed")), (grid * grid + 1, D))
        x = jnp.concatenate([jnp.broadcast_to(cls, (B, 1, D)), x], axis=1) + positions[None]  # [B, L, D]
        x = LayerNorm(eps=self.eps, name="pre_layernorm")(x)
        for i in range(self.layers):
            x = _Block(self.width, self.heads, self.mlp_width, self.eps, self.act, name=f"layers_{i}")(x)
        pooled = LayerNorm(eps=self.eps, name="post_layernorm")(x[:, 0])
        return _Dense((self.projection_dim,), ("embed", None), use_bias=False, name="projection")(pooled)


class CLIP(nn.Module):
    """Both towers (either may be None: a converted text-only folder has no vision tower).

    `__call__` (used for init) gives CLIP's image-text logits; the methods give each tower's outputs.
    """
    text: CLIPTextTower | None = None
    vision: CLIPVisionTower | None = None

    def _need(self, tower, which: str):
        if tower is None:
            raise ValueError(f"this CLIP has no {which} tower (converted with --towers=text?)")
        return tower

    def encode_image(self, pixels):
        """pixels: float32 [B, 224, 224, 3] normalised (`preprocess`) -> float32 [B, projection_dim]."""
        return self._need(self.vision, "vision")(pixels)

    def encode_text(self, ids, mask):
        """ids: int32 [B, S]; mask: int32/bool [B, S] -> float32 [B, projection_dim] (projected
        end-of-text state, not unit-normalised)."""
        text = self._need(self.text, "text")
        if text.projection_dim is None:
            raise ValueError("this CLIP text tower has no projection (a CLIPTextModel folder): "
                             "use text_hidden")
        return text(ids, mask)[0]

    def text_hidden(self, ids, mask):
        """ids: int32 [B, S]; mask: int32/bool [B, S] -> float32 [B, S, D], the last block's
        output after the final LayerNorm (transformers' last_hidden_state)."""
        return self._need(self.text, "text")(ids, mask, project=False)[1]

    @nn.compact
    def __call__(self, pixels=None, ids=None, mask=None):
        """Image-text logits float32 [B_images, B_texts]: cosine similarity times exp(logit_scale),
        as `CLIPModel.logits_per_image`; with one tower only, that tower's output."""
        if self.text is None:
            return self.encode_image(pixels)
        if self.vision is None:
            return self.text_hidden(ids, mask) if self.text.projection_dim is None else self.encode_text(ids, mask)
        # Shape (1,), not transformers' (): weights.save writes arrays of at least one dimension.
        scale = self.param("logit_scale", nn.initializers.constant(np.log(1 / 0.07)), (1,))[0]
        image = self.encode_image(pixels)
        text = self.encode_text(ids, mask)
        image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
        text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
        return jnp.exp(scale) * jnp.dot(image, text.T, precision=HIGHEST)


def init_inputs(model: CLIP, batch: int = 1) -> dict:
    """Example inputs of `model.init` (pixels, ids, mask) for the towers it has."""
    out = {}
    if model.vision is not None:
        size = model.vision.image_size
        out["pixels"] = jnp.zeros((batch, size, size, 3), jnp.float32)
    if model.text is not None:
        out["ids"] = jnp.zeros((batch, model.text.max_positions), jnp.int32)
        out["mask"] = jnp.ones((batch, model.text.max_positions), jnp.int32)
    return out


def abstract_variables(model: CLIP) -> dict:
    """{'params': tree of ShapeDtypeStruct} of `model`, without computing anything."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), **init_inputs(model)))
    return {"params": nn.unbox(shapes["params"])}


# ----------------------------------------------------------------------------------------------
# Preprocessing.

def resized_shape(height: int, width: int, size: int = IMAGE_SIZE) -> tuple[int, int]:
    """(height, width) with the shorter side `size` and the longer scaled and truncated to an
    int, as transformers' CLIPImageProcessor computes it."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def preprocess(images, size: int = IMAGE_SIZE):
    """CLIP's preprocessing in JAX: uint8-valued float32 [B, H, W, 3] in [0, 255] -> float32
    [B, size, size, 3] normalised with CLIP's mean and std.

    The shorter side is resized to `size` (bicubic, antialiased), the centre size x size crop
    kept, the values scaled to [0, 1] and normalised, as OpenAI's and transformers' processors do.

    How it differs from theirs (PIL's bicubic, a = -0.5 like JAX's): both widen the cubic kernel
    by the downscaling factor (antialiasing) and renormalise its weights at the borders, but PIL
    resizes uint8 images in two 1-D passes and rounds and clips to uint8 after each, while this
    resizes in float32 and rounds and clips once, at the end (so the values the normalisation
    sees are integers in [0, 255], as PIL's are). The results differ by a grey level where
    PIL's intermediate rounding tips a pixel over (tests/test_clip.py measures it on a real frame).
    """
    images = jnp.asarray(images, jnp.float32)
    B, H, W, _ = images.shape
    h, w = resized_shape(H, W, size)
    if (h, w) != (H, W):
        images = jax.image.resize(images, (B, h, w, 3), "bicubic", antialias=True)
        images = jnp.clip(jnp.round(images), 0.0, 255.0)
    top, left = (h - size) // 2, (w - size) // 2
    x = images[:, top:top + size, left:left + size] / 255.0
    return (x - jnp.asarray(MEAN)) / jnp.asarray(STD)


# ----------------------------------------------------------------------------------------------
# Tokenizer.

DEFAULT_PAD = "<|endoftext|>"  # transformers' CLIPTokenizer default and OpenAI's folders' choice


class ClipTokenizer:
    """CLIP's BPE tokenizer from a Hugging Face tokenizer.json, read with the `tokenizers` package.

    `tokenize` gives what transformers' CLIPTokenizerFast gives with padding='max_length',
    truncation=True, max_length=length: <|startoftext|>, the text's tokens (cut so that the
    end-of-text token still fits), <|endoftext|>, then `pad_token` up to `length`.
    """

    def __init__(self, path: str, pad_token: str = DEFAULT_PAD):
        import tokenizers  # only where captions are tokenized

        if not os.path.isfile(path):
            raise weights.WeightsError(f"{path}: no CLIP tokenizer.json (the file of a Hugging Face CLIP "
                                       f"folder; pixeldance.convert.clip copies it into its output)")
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises plain Exceptions with multi-line messages
            raise weights.WeightsError(f"{path}: not a readable tokenizer.json "
                                       f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if self._tokenizer.post_processor is None:
            raise weights.WeightsError(f"{path}: the tokenizer adds no start/end tokens (no post_processor); "
                                       f"not a CLIP tokenizer.json")
        self.pad_id = self._tokenizer.token_to_id(pad_token)
        if self.pad_id is None:
            raise weights.WeightsError(f"{path}: pad token {pad_token!r} is not in the vocabulary")
        self.path, self.pad_token = path, pad_token

    @classmethod
    def from_folder(cls, directory: str) -> "ClipTokenizer":
        """The tokenizer of a Hugging Face CLIP folder: tokenizer.json, with the pad token of its
        special_tokens_map.json / tokenizer_config.json where they name one."""
        return cls(os.path.join(directory, TOKENIZER), pad_token_of(directory))

    def tokenize(self, texts: Sequence[str], length: int = 77) -> tuple[np.ndarray, np.ndarray]:
        """texts: B strings -> (ids int32 [B, length], mask int32 [B, length], 1 for real tokens)."""
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of strings, not one string")
        tok = self._tokenizer
        tok.enable_truncation(max_length=length)  # counts the added start/end tokens
        tok.enable_padding(length=length, pad_id=self.pad_id, pad_token=self.pad_token)
        encodings = tok.encode_batch(list(texts), add_special_tokens=True)
        ids = np.asarray([e.ids for e in encodings], np.int32).reshape(len(encodings), length)
        mask = np.asarray([e.attention_mask for e in encodings], np.int32).reshape(len(encodings), length)
        return ids, mask

    def num_tokens(self, texts: Sequence[str]) -> list[int]:
        """Each text's length in tokens, start and end tokens included, before `tokenize` cuts it."""
        tok = self._tokenizer
        tok.no_truncation()  # `tokenize` sets truncation and padding again on every call
        tok.no_padding()
        return [len(e.ids) for e in tok.encode_batch(list(texts), add_special_tokens=True)]


def pad_token_of(directory: str) -> str:
    """The pad token a Hugging Face tokenizer folder names (special_tokens_map.json, then
    tokenizer_config.json), else transformers' CLIP default <|endoftext|>."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                pad = json.load(f).get("pad_token")
        except (OSError, ValueError, AttributeError) as e:
            raise weights.WeightsError(f"{path}: not a readable JSON object ({str(e).splitlines()[0]})") from None
        if isinstance(pad, dict):  # {"content": "<|endoftext|>", ...}
            pad = pad.get("content")
        if isinstance(pad, str):
            return pad
    return DEFAULT_PAD


# ----------------------------------------------------------------------------------------------
# Converted folders.

def model_from_config(config: dict, where: str = "") -> CLIP:
    """The CLIP of a converted folder's config ({'text': fields | None, 'vision': fields | None})."""
    try:
        text = CLIPTextTower(**config["text"]) if config.get("text") else None
        vision = CLIPVisionTower(**config["vision"]) if config.get("vision") else None
    except (TypeError, KeyError) as e:
        raise weights.WeightsError(f"{where}: config.json's tower fields do not fit ({e})") from None
    if text is None and vision is None:
        raise weights.WeightsError(f"{where}: config.json has neither a text nor a vision tower")
    return CLIP(text=text, vision=vision)


def load_clip(directory: str) -> tuple[CLIP, dict, ClipTokenizer | None]:
    """(model, variables {'params': ...}, tokenizer or None) of a folder written by
    `pixeldance.convert.clip`. WeightsError (one line naming the path) if it is missing or
    does not fit the model its config describes."""
    config, variables = weights.load(directory, NETWORK, ORIGIN)
    model = model_from_config(config, os.path.join(directory, weights.CONFIG))
    weights.check_like(abstract_variables(model), variables, directory)
    tokenizer = None
    if os.path.isfile(os.path.join(directory, TOKENIZER)):
        tokenizer = ClipTokenizer(os.path.join(directory, TOKENIZER), config.get("pad_token", DEFAULT_PAD))
    return model, variables, tokenizer
