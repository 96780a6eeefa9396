"""One interface over the frozen pretrained text encoders: CLIP's text tower, T5 v1.1 and umT5.

  encoder = load_text_encoder(DIR)                  # a folder of pixeldance.convert.text_encoder
  ids, mask = encoder.tokenize(["a cat", ...])      # int32 [B, max_length] each
  states = encoder.embed(ids, mask)                 # float32 [B, max_length, encoder.dim]
  states, mask = encoder(["a cat", ...])            # both steps

`embed` gives what transformers' `last_hidden_state` gives (CLIPTextModel, T5EncoderModel,
UMT5EncoderModel), states at padded positions included; it is jit-compiled once per input shape.
The networks are pixeldance/models/clip.py's `CLIPTextTower` (its `text_hidden` path) and
pixeldance/models/t5.py's `T5Encoder`.

Tokenizers, as transformers' with padding='max_length', truncation=True, max_length=L:
  clip   <|startoftext|> tokens <|endoftext|>, padded (models/clip.py's ClipTokenizer); L = 77
  t5/umt5  tokens </s>, padded with <pad>; from tokenizer.json (the `tokenizers` package) when the
         folder has one, else spiece.model (`sentencepiece`); L = 512 by default (Wan 2.1's)
Texts longer than L are cut so that the end token still fits; the mask is 1 for real tokens.

A converted folder (format pixeldance/models/weights.py):
  config.json  {"network": "text_encoder", "kind": "clip" | "t5" | "umt5", "encoder": {fields of
               the network}, "max_length": L, "dtype": default compute dtype, "tokenizer":
               {"pad_token", "eos_token"}, "source", "sha256"}
  params.safetensors, and the tokenizer files copied by the converter (tokenizer.json,
  spiece.model, tokenizer_config.json, special_tokens_map.json: those the source had).

Axis letters (glossary: pixeldance/models/__init__.py): B batch, S text tokens, D width.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from pixeldance import sharding
from pixeldance.models import clip, t5, weights

NETWORK = "text_encoder"
KINDS = ("clip", "t5", "umt5")
ORIGIN = ("python -m pixeldance.convert.text_encoder --kind=clip|t5|umt5 --input=<Hugging Face folder, e.g. "
          "Wan2.1's text_encoder/ with --tokenizer=<its tokenizer/>> --output=DIR")
DEFAULT_MAX_LENGTH = {"clip": 77, "t5": 512, "umt5": 512}
TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE = "spiece.model"
# Every tokenizer file the converter copies when the source has it.
TOKENIZER_FILES = (TOKENIZER_JSON, SENTENCEPIECE, "tokenizer_config.json", "special_tokens_map.json")
T5_PAD, T5_EOS = "<pad>", "</s>"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------------------------
# The T5 / umT5 tokenizer.

class T5Tokenizer:
    """T5's and umT5's SentencePiece unigram tokenizer, read without transformers; `vocab_size`
    counts its tokens (at most the network's vocabulary).

    From DIRECTORY's tokenizer.json (the `tokenizers` package, exactly transformers'
    T5TokenizerFast) when it has one, else from its spiece.model (`sentencepiece`, which gives the
    same ids for ordinary text; transformers' added `<extra_id_N>` sentinel tokens are not
    recognised inside texts on this path).
    """

    def __init__(self, directory: str, pad_token: str = T5_PAD, eos_token: str = T5_EOS):
        json_path, spm_path = (os.path.join(directory, n) for n in (TOKENIZER_JSON, SENTENCEPIECE))
        self.pad_token, self.eos_token = pad_token, eos_token
        if os.path.isfile(json_path):
            import tokenizers  # only where captions are tokenized

            self.path = json_path
            try:
                self._json = tokenizers.Tokenizer.from_file(json_path)
            except Exception as e:  # tokenizers raises plain Exceptions with multi-line messages
                raise weights.WeightsError(f"{json_path}: not a readable tokenizer.json "
                                           f"({_first_line(e)})") from None
            if self._json.post_processor is None:
                raise weights.WeightsError(f"{json_path}: the tokenizer appends no {eos_token} (no post_processor); "
                                           f"not a T5 tokenizer.json")
            self._spm = None
            self.pad_id, self.eos_id = (self._json.token_to_id(t) for t in (pad_token, eos_token))
            self.vocab_size = self._json.get_vocab_size(with_added_tokens=True)
        elif os.path.isfile(spm_path):
            import sentencepiece  # only where captions are tokenized

            self.path, self._json = spm_path, None
            try:
                self._spm = sentencepiece.SentencePieceProcessor(model_file=spm_path)
            except Exception as e:  # sentencepiece raises OSError / RuntimeError with its own text
                raise weights.WeightsError(f"{spm_path}: not a readable SentencePiece model "
                                           f"({_first_line(e)})") from None
            self.vocab_size = self._spm.get_piece_size()
            # piece_to_id maps an unknown piece to <unk>'s id: look the piece back up.
            self.pad_id, self.eos_id = (i if self._spm.id_to_piece(i) == t else None
                                        for t, i in ((t, self._spm.piece_to_id(t)) for t in (pad_token, eos_token)))
        else:
            raise weights.WeightsError(f"{directory}: no {TOKENIZER_JSON} or {SENTENCEPIECE} (a T5 / umT5 tokenizer; "
                                       f"{ORIGIN} copies them)")
        for name, token, index in (("pad", pad_token, self.pad_id), ("end", eos_token, self.eos_id)):
            if index is None:
                raise weights.WeightsError(f"{self.path}: {name} token {token!r} is not in the vocabulary")

    def tokenize(self, texts: Sequence[str], length: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """texts: B strings -> (ids int32 [B, length], mask int32 [B, length], 1 for real tokens)."""
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of strings, not one string")
        if self._json is not None:
            tok = self._json
            tok.enable_truncation(max_length=length)  # counts the appended </s>
            tok.enable_padding(length=length, pad_id=self.pad_id, pad_token=self.pad_token)
            encodings = tok.encode_batch(list(texts), add_special_tokens=True)
            ids = np.asarray([e.ids for e in encodings], np.int32).reshape(len(texts), length)
            mask = np.asarray([e.attention_mask for e in encodings], np.int32).reshape(len(texts), length)
            return ids, mask
        ids = np.full((len(texts), length), self.pad_id, np.int32)
        mask = np.zeros((len(texts), length), np.int32)
        for b, pieces in enumerate(self._spm.encode(list(texts))):
            row = list(pieces)[:length - 1] + [self.eos_id]
            ids[b, :len(row)], mask[b, :len(row)] = row, 1
        return ids, mask

    def num_tokens(self, texts: Sequence[str]) -> list[int]:
        """Each text's length in tokens, the appended </s> included, before `tokenize` cuts it."""
        if self._json is not None:
            tok = self._json
            tok.no_truncation()  # `tokenize` sets truncation and padding again on every call
            tok.no_padding()
            return [len(e.ids) for e in tok.encode_batch(list(texts), add_special_tokens=True)]
        return [len(pieces) + 1 for pieces in self._spm.encode(list(texts))]


def _first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__


def make_tokenizer(kind: str, directory: str, tokenizer_config: dict):
    """The tokenizer of `kind` from the files in DIRECTORY; tokenizer_config: {'pad_token',
    'eos_token'} (a folder's config.json 'tokenizer' entry). WeightsError (one line) if missing."""
    if kind == "clip":
        return clip.ClipTokenizer(os.path.join(directory, TOKENIZER_JSON),
                                  tokenizer_config.get("pad_token", clip.DEFAULT_PAD))
    return T5Tokenizer(directory, tokenizer_config.get("pad_token", T5_PAD), tokenizer_config.get("eos_token", T5_EOS))


def check_vocabulary(tokenizer, model, where: str):
    """A T5 tokenizer whose ids reach past the network's embedding table does not belong to it
    (JAX would clamp those ids silently)."""
    if isinstance(tokenizer, T5Tokenizer) and tokenizer.vocab_size > model.vocab_size:
        raise weights.WeightsError(f"{where}: the tokenizer ({tokenizer.path}) has {tokenizer.vocab_size} tokens, "
                                   f"the encoder's vocabulary {model.vocab_size}: not this encoder's tokenizer")


# ----------------------------------------------------------------------------------------------
# Networks.

def model_from_config(kind: str, fields: dict, dtype=jnp.float32, param_dtype=jnp.float32, where: str = ""):
    """The network of a folder's 'kind' and 'encoder' fields: CLIP(text=CLIPTextTower) for
    'clip' (computes in float32 only), T5Encoder for 't5' / 'umt5' (per-layer bias for umT5)."""
    if kind not in KINDS:
        raise weights.WeightsError(f"{where}: kind {kind!r} is not one of {KINDS}")
    try:
        if kind == "clip":
            if jnp.dtype(dtype) != jnp.float32:
                raise weights.WeightsError(f"{where}: the CLIP text tower computes in float32 only, not "
                                           f"{jnp.dtype(dtype).name}")
            return clip.CLIP(text=clip.CLIPTextTower(**fields))
        return t5.T5Encoder(**dict(fields, per_layer_bias=kind == "umt5"), dtype=dtype, param_dtype=param_dtype)
    except TypeError as e:
        raise weights.WeightsError(f"{where}: config.json's encoder fields do not fit ({e})") from None


def boxed_variables(kind: str, model) -> dict:
    """{'params': ...} of the network as ShapeDtypeStructs in `nn.Partitioned` boxes (the
    logical axis names), nothing computed."""
    if kind == "clip":
        inputs = clip.init_inputs(model)
        return {"params": jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs))["params"]}
    return t5.abstract_variables(model, boxed=True)


class TextEncoder:
    """A frozen text encoder with its tokenizer (see the module docstring); `load_text_encoder`
    makes one from a converted folder.

    kind: 'clip', 't5' or 'umt5'; dim: the states' width D; max_length: the length texts are
    padded or cut to; dtype: the compute dtype; mesh, preset: where the parameters live (None: the
    default device) and the logical rules `embed` runs under.
    """

    def __init__(self, kind: str, model, variables: dict, tokenizer, *, max_length: int, dtype=jnp.float32,
                 mesh=None, preset: str = "fsdp_tensor"):
        self.kind, self.model, self.variables, self.tokenizer = kind, model, variables, tokenizer
        self.max_length, self.dtype, self.mesh, self.preset = int(max_length), jnp.dtype(dtype), mesh, preset
        if kind == "clip" and self.max_length > model.text.max_positions:
            raise ValueError(f"max_length {self.max_length}: the CLIP text tower has {model.text.max_positions} "
                             f"positions")
        method = "text_hidden" if kind == "clip" else None
        # The variables are an argument, not a closure: jit would otherwise bake them in as constants.
        self._embed = jax.jit(lambda v, ids, mask: model.apply(v, ids, mask, method=method))

    @property
    def dim(self) -> int:
        return self.model.text.width if self.kind == "clip" else self.model.width

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """B strings -> (ids int32 [B, max_length], mask int32 [B, max_length], 1 for real tokens)."""
        return self.tokenizer.tokenize(texts, self.max_length)

    def num_tokens(self, texts: Sequence[str]) -> list[int]:
        """Each text's length in tokens before `tokenize` cuts it to max_length."""
        return self.tokenizer.num_tokens(texts)

    def embed(self, ids, mask) -> jax.Array:
        """ids: int32 [B, S]; mask: int32/bool [B, S] -> float32 [B, S, D] (last_hidden_state)."""
        ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask)
        if self.mesh is None:
            return self._embed(self.variables, ids, mask)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.rules(self.preset)):
            return self._embed(self.variables, ids, mask)

    def lower(self, ids, mask):
        """`embed`'s function lowered for ids, mask given as ShapeDtypeStructs (with shardings)
        and the variables as this encoder holds them (arrays, or ShapeDtypeStructs with
        shardings): what the compile-ahead planner compiles (pixeldance/tools/plan.py)."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.rules(self.preset)):
            return self._embed.lower(self.variables, ids, mask)

    def __call__(self, texts: Sequence[str]) -> tuple[jax.Array, np.ndarray]:
        """B strings -> (states float32 [B, max_length, D], mask int32 [B, max_length])."""
        ids, mask = self.tokenize(texts)
        return self.embed(ids, mask), mask


def _dtype(value, where: str):
    """None -> None; 'float32' / 'bfloat16' or such a dtype -> that jnp dtype; else WeightsError."""
    if value is None:
        return None
    name = value if isinstance(value, str) else jnp.dtype(value).name
    if name not in DTYPES:
        raise weights.WeightsError(f"{where}: dtype {name!r} is not one of {sorted(DTYPES)}")
    return jnp.dtype(DTYPES[name])


def load_text_encoder(directory: str, dtype=None, *, param_dtype=None, max_length: int | None = None,
                      mesh=None, preset: str = "fsdp_tensor", verify: bool = True) -> TextEncoder:
    """The TextEncoder of a folder written by `pixeldance.convert.text_encoder`.

    dtype: compute dtype ('float32', 'bfloat16' or a jnp dtype; None: the folder's, i.e. the
      converter's --dtype); CLIP computes in float32 only.
    param_dtype: the dtype the parameters are held in (None: float32; bfloat16 halves umT5-XXL's
      22.7 GB).
    max_length: texts' padded length (None: the folder's, 77 for CLIP, 512 for T5 / umT5).
    mesh, preset: shard the parameters over `mesh` by their logical names under `preset`'s rules
      (pixeldance/sharding.py; e.g. 'fsdp_tensor'), each array read and placed one at a time; None:
      the default device.
    verify: re-hash params.safetensors against config.json's sha256 first (`weights.check_sha256`).

    WeightsError (one line naming the path and, for a missing folder or file, the converter
    command) if the folder, its weights or its tokenizer are missing or do not fit.
    """
    from safetensors import SafetensorError, safe_open

    config = weights.read_config(directory, NETWORK, ORIGIN)
    where = os.path.join(directory, weights.CONFIG)
    kind = config.get("kind")
    dtype = _dtype(dtype, where) or _dtype(config.get("dtype", "float32"), where)
    param_dtype = _dtype(param_dtype, where) or jnp.dtype(jnp.float32)
    model = model_from_config(kind, config.get("encoder") or {}, dtype, param_dtype, where)
    params_path = os.path.join(directory, weights.PARAMS)
    if not os.path.isfile(params_path):
        raise weights.WeightsError(f"{directory}: no {weights.PARAMS} ({ORIGIN})")
    if verify:
        weights.check_sha256(params_path, config)
    tokenizer = make_tokenizer(kind, directory, config.get("tokenizer") or {})
    check_vocabulary(tokenizer, model, directory)

    boxed = boxed_variables(kind, model)
    abstract = nn.unbox(boxed)
    if mesh is not None:
        shardings = traverse_util.flatten_dict(sharding.tree_shardings(mesh, boxed, preset))
    try:
        with safe_open(params_path, framework="numpy") as f:
            stored = {tuple(k.split("/")): jax.ShapeDtypeStruct(tuple(f.get_slice(k).get_shape()), jnp.float32)
                      for k in f.keys()}
            weights.check_like(abstract, traverse_util.unflatten_dict(stored), directory)
            flat = {}
            for path in stored:  # one array in host memory at a time
                value = np.asarray(f.get_tensor("/".join(path)), param_dtype)
                flat[path] = jax.device_put(value, shardings[path]) if mesh is not None else jnp.asarray(value)
    except SafetensorError as e:
        raise weights.WeightsError(f"cannot read {params_path} as safetensors: {_first_line(e)}") from None
    length = max_length or config.get("max_length") or DEFAULT_MAX_LENGTH[kind]
    return TextEncoder(kind, model, traverse_util.unflatten_dict(flat), tokenizer, max_length=length,
                       dtype=dtype if kind != "clip" else jnp.float32, mesh=mesh, preset=preset)


def abstract_params(kind: str, fields: dict) -> dict:
    """Flat {path: ShapeDtypeStruct} of the float32 network of `kind` and `fields` (what a
    converter must write), e.g. {('params', 'layers_0', 'attn', 'q', 'kernel'): ...}."""
    model = model_from_config(kind, fields)
    return traverse_util.flatten_dict(nn.unbox(boxed_variables(kind, model)))
