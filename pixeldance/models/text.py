"""Text encoder for captions: a word-level tokenizer and a small transformer trained jointly.

Choice for the synthetic world: its captions use a closed vocabulary of 17 words
("a red circle moves left"), so a word tokenizer is exact and a 2-layer transformer trained
together with the DiT is enough to bind colour, shape and direction words. Pretrained
encoders (CLIP/T5) would need downloaded weights; for real data they come in through
converters, behind the same interface: tokens [B, S] -> embeddings [B, S, D] and a mask.

Axis letters (glossary: pixeldance/models/__init__.py): B batch, S text tokens, D width, N heads,
K head width.
"""
from __future__ import annotations

import re
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from pixeldance.models import attention
from pixeldance.models.layers import Dense, LayerNorm

PAD, UNK, BOS = 0, 1, 2
_SPECIAL = ("<pad>", "<unk>", "<bos>")


def null_tokens(batch: int, length: int):
    """The empty prompt, int32 [batch, length]: BOS then padding (the unconditional input of
    classifier-free guidance, and the dropped text of training)."""
    return jnp.zeros((batch, length), jnp.int32).at[:, 0].set(BOS)


# -- text inputs ---------------------------------------------------------------------------------
# The DiT's text input is one of two pytrees: tokens int32 [B, S] for the encoder trained with it
# (`TextEncoder`), or dict(states [B, S, D], mask bool [B, S]) computed once by a frozen pretrained
# encoder (`FrozenText`; CLIP / T5 / umT5 states cached with the latents). The diffusion task drops
# and batches either kind through the helpers below, so it never asks which one it holds.


def text_input(fields: dict):
    """The DiT's text input from latent-cache fields (a record, a batch, or the cache's empty
    prompt): tokens [B, S], or dict(states, mask) from text_states and text_mask."""
    if "text_states" in fields:
        return dict(states=fields["text_states"], mask=fields["text_mask"])
    return fields["tokens"]


def text_batch_size(text) -> int:
    """B of a text input (tokens [B, S] or dict(states [B, S, D], mask [B, S]))."""
    return jax.tree.leaves(text)[0].shape[0]


def null_text(text, null=None):
    """The empty prompt in the structure and batch size of `text`.

    null: None for tokens (BOS then padding, `null_tokens`), or for frozen states the encoder's
    output for the empty prompt, dict(states [1, S, D], mask [1, S]) (stored once with the cache),
    broadcast to the batch.
    """
    B = text_batch_size(text)
    if null is None:
        if isinstance(text, dict):
            raise ValueError("frozen text states need the encoder's empty-prompt states (null)")
        return null_tokens(B, text.shape[1])
    return jax.tree.map(lambda n, t: jnp.broadcast_to(n, (B,) + n.shape[1:]).astype(t.dtype), null, text)


def select_text(use_null, text, null):
    """Per example: `null` where use_null (bool [B]) is True, else `text` (same structures)."""
    return jax.tree.map(lambda t, n: jnp.where(use_null.reshape((-1,) + (1,) * (t.ndim - 1)), n, t), text, null)


def concat_text(texts):
    """Text inputs of batches B1, B2, ... -> one of batch B1 + B2 + ... (guidance branches)."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *texts)


def _pad(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """B texts -> int32 [B, max_length]: each text's `tokenizer.ids`, cut to max_length, padded."""
    out = np.full((len(texts), tokenizer.max_length), PAD, np.int32)
    for b, text in enumerate(texts):
        ids = tokenizer.ids(text)[: tokenizer.max_length]
        out[b, : len(ids)] = ids
    return out


class WordTokenizer:
    """Lower-cased words -> ids; id 2 (BOS) always leads, so an empty prompt is one valid token."""

    def __init__(self, words: Sequence[str], max_length: int):
        self.words = tuple(dict.fromkeys(w.lower() for w in words))
        self.vocab = {w: i for i, w in enumerate(_SPECIAL + self.words)}
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def ids(self, text: str) -> list[int]:
        """One text's token ids, BOS first, not cut to max_length."""
        return [BOS] + [self.vocab.get(w, UNK) for w in re.findall(r"[a-z0-9']+", text.lower())]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """texts: B strings -> int32 [B, max_length]; words past max_length are dropped."""
        return _pad(self, texts)

    def num_tokens(self, texts: Sequence[str]) -> list[int]:
        """Each text's length in tokens (BOS included) before it is cut to max_length."""
        return [len(self.ids(t)) for t in texts]


class HashedTokenizer:
    """Free text: lower-cased words, each hashed (CRC-32) to one of ids 3..vocab_size-1; BOS leads,
    padding is 0. Deterministic across processes and runs (unlike Python's `hash`)."""

    def __init__(self, vocab_size: int, max_length: int):
        if vocab_size <= len(_SPECIAL):
            raise ValueError(f"vocab_size must exceed {len(_SPECIAL)}, got {vocab_size}")
        self._size, self.max_length = int(vocab_size), max_length

    @property
    def vocab_size(self) -> int:
        return self._size

    def ids(self, text: str) -> list[int]:
        """One text's token ids, BOS first, not cut to max_length."""
        n = self._size - len(_SPECIAL)
        words = re.findall(r"[a-z0-9']+", text.lower())
        return [BOS] + [len(_SPECIAL) + zlib.crc32(w.encode("utf-8")) % n for w in words]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """texts: B strings -> int32 [B, max_length]; words past max_length are dropped."""
        return _pad(self, texts)

    def num_tokens(self, texts: Sequence[str]) -> list[int]:
        """Each text's length in tokens (BOS included) before it is cut to max_length."""
        return [len(self.ids(t)) for t in texts]


class ByteTokenizer:
    """Free text as UTF-8 bytes: byte v -> id 3 + v (vocab 259); BOS leads, padding is 0."""

    def __init__(self, max_length: int):
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return len(_SPECIAL) + 256

    def ids(self, text: str) -> list[int]:
        """One text's token ids, BOS first, not cut to max_length."""
        return [BOS] + [len(_SPECIAL) + v for v in text.encode("utf-8")]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """texts: B strings -> int32 [B, max_length]; bytes past max_length are dropped."""
        return _pad(self, texts)

    def num_tokens(self, texts: Sequence[str]) -> list[int]:
        """Each text's length in tokens (BOS included) before it is cut to max_length."""
        return [len(self.ids(t)) for t in texts]


class FrozenText(nn.Module):
    """A frozen pretrained encoder's precomputed output, passed through: dict(states [B, S, D],
    mask [B, S]) -> (states in `dtype`, mask bool). No parameters: the DiT's cross-attention
    projects the states from the encoder's width D."""

    dtype: jnp.dtype = jnp.float32

    def __call__(self, text):
        return text["states"].astype(self.dtype), text["mask"].astype(bool)


class TextEncoder(nn.Module):
    """tokens int32 [B, S] -> (embeddings float [B, S, D], mask bool [B, S])."""

    vocab_size: int
    max_length: int
    width: int = 128
    num_layers: int = 2
    num_heads: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        mask = tokens != PAD
        init = nn.initializers.normal(0.02)
        emb = self.param("embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
                         (self.vocab_size, self.width))
        pos = self.param("position", nn.with_logical_partitioning(init, (None, "embed")),
                         (self.max_length, self.width))
        x = jnp.take(emb, tokens, axis=0) + pos[None, : tokens.shape[1]]
        x = x.astype(self.dtype)
        head = self.width // self.num_heads
        for i in range(self.num_layers):
            y = LayerNorm(dtype=self.dtype, name=f"ln_attn_{i}")(x)
            qkv = Dense((3, self.num_heads, head), ("embed", None, "heads", "kv"), dtype=self.dtype,
                        name=f"qkv_{i}")(y)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            y = attention.dot_product_attention(q, k, v, key_mask=mask)
            x = x + Dense(self.width, ("heads", "kv", "embed"), in_dims=2, dtype=self.dtype,
                          name=f"out_{i}")(y)
            y = LayerNorm(dtype=self.dtype, name=f"ln_mlp_{i}")(x)
            y = Dense(4 * self.width, ("embed", "mlp"), dtype=self.dtype, name=f"mlp_in_{i}")(y)
            y = Dense(self.width, ("mlp", "embed"), dtype=self.dtype, name=f"mlp_out_{i}")(nn.gelu(y))
            x = x + y
        x = LayerNorm(dtype=self.dtype, name="ln_final")(x)
        return x, mask
