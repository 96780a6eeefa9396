"""Long and large videos through either VAE (`vae.CausalVAE`, `wan_vae.WanVAE`), in bounded memory.

Both VAEs are causal in time, so a video can be encoded chunk by chunk (frame 0 alone, then
`temporal_factor` frames per latent frame) and latents decoded a few latent frames at a time,
each causal conv carrying its last input frames in the 'cache' collection through `lax.scan`:
`encode_chunked` / `decode_chunked` equal the models' one-pass `encode` / `decode` up to float
rounding, in memory that does not grow with the length (diffusers' Wan VAE runs exactly these
chunks). `StreamDecoder` decodes a latent video pushed piece by piece (the clips of a long video
continued in latent space), the cache carried from piece to piece. `encode_tiled` /
`decode_tiled` split large frames into overlapping tiles blended with linear ramps.

The model interface used: `encode`, `decode`, `encode_chunk(x, first)`, `decode_chunk(z, first)`,
`check_video`, `check_latents`, `temporal_factor`, `spatial_factor`, `latent_channels`.

Axis letters (glossary: pixeldance/models/__init__.py): B batch, F pixel frames, T latent frames
(Tc, T0, Tt: those of a chunk, of the first chunk and of the shorter last one), H/W pixel
height/width, h/w latent height/width, C channels; a stack of chunks leads with an axis `chunks`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


# ---------------------------------------------------------------------------------------------
# Chunked encoding and decoding: memory flat in the number of frames.
# ---------------------------------------------------------------------------------------------

def _scan_chunks(model, params, method, first_chunk: jax.Array, chunks: jax.Array,
                 tail: jax.Array | None):
    """Runs `method` on `first_chunk` (first=True), then on each of `chunks` [chunks, ...] in a
    `lax.scan` carrying the causal cache, then on `tail` (a shorter last chunk, or None).

    Returns (output of the first chunk, stacked outputs of the others [chunks, ...], tail output).
    """
    params = {"params": params["params"]}
    out0, variables = model.apply(params, first_chunk, True, method=method, mutable=["cache"])
    _, outs, out_tail = _continue_chunks(model, params, method, variables["cache"], chunks, tail)
    return out0, outs, out_tail


def _continue_chunks(model, params, method: str, cache, chunks: jax.Array, tail: jax.Array | None):
    """Runs `method` (first=False) on each of `chunks` [chunks, ...] in a `lax.scan` from the
    causal `cache`, then on `tail` (or None). Returns (cache after the last chunk, stacked
    outputs [chunks, ...], tail output or None)."""
    params = {"params": params["params"]}

    def step(cache, chunk):
        out, new = model.apply({**params, "cache": cache}, chunk, False, method=method,
                               mutable=["cache"])
        return new["cache"], out

    cache, outs = lax.scan(step, cache, chunks)
    out_tail = None
    if tail is not None:
        out_tail, new = model.apply({**params, "cache": cache}, tail, False, method=method,
                                    mutable=["cache"])
        cache = new["cache"]
    return cache, outs, out_tail


def _join_chunks(first: jax.Array, rest: jax.Array, tail: jax.Array | None) -> jax.Array:
    """[B, T0, ...], [chunks, B, Tc, ...] and [B, Tt, ...] or None -> [B, T0 + chunks*Tc (+ Tt), ...]."""
    n, b, tc = rest.shape[:3]
    parts = [first, jnp.moveaxis(rest, 0, 1).reshape((b, n * tc) + rest.shape[3:])]
    return jnp.concatenate(parts + ([tail] if tail is not None else []), axis=1)


def _split_chunks(x: jax.Array, start: int, size: int) -> tuple[jax.Array, jax.Array | None]:
    """x[:, start:] as chunks of `size` frames [chunks, B, size, ...] plus a shorter tail (or None)."""
    b, t = x.shape[0], x.shape[1] - start
    n = t // size
    body = x[:, start:start + n * size].reshape((b, n, size) + x.shape[2:])
    tail = x[:, start + n * size:] if t % size else None
    return jnp.moveaxis(body, 1, 0), tail


def encode_chunked(model, params, video: jax.Array, chunk: int = 1):
    """`model.encode` frame 0 alone, then ``4 * chunk`` frames (`chunk` latent frames) at a time.

    params: {'params': ...}; video as for `model.encode`. Returns (mean, logvar) as `encode`
    does, equal to it up to float rounding; activations are those of one chunk.
    """
    model.check_video(video, "encode_chunked")
    chunks, tail = _split_chunks(video, 1, model.temporal_factor * chunk)
    (m0, l0), (ms, ls), tails = _scan_chunks(model, params, "encode_chunk", video[:, :1],
                                             chunks, tail)
    mt, lt = tails if tails is not None else (None, None)
    return _join_chunks(m0, ms, mt), _join_chunks(l0, ls, lt)


def decode_chunked(model, params, z: jax.Array, chunk: int = 1) -> jax.Array:
    """`model.decode` latent 0 alone, then `chunk` latent frames at a time.

    params: {'params': ...}; z [B, T, h, w, C] -> float32 [B, 1 + 4(T-1), 8h, 8w, 3] (4 and 8:
    the model's temporal and spatial factors), equal to
    `decode` up to float rounding; activations are those of one chunk, so memory grows with T
    only by the output itself.
    """
    model.check_latents(z, "decode_chunked")
    chunks, tail = _split_chunks(z, 1, chunk)
    first, rest, tail = _scan_chunks(model, params, "decode_chunk", z[:, :1], chunks, tail)
    return _join_chunks(first, rest, tail)


def to_uint8(video: jax.Array) -> jax.Array:
    """A decoded float video, nominally in [-1, 1] -> uint8 (rounded, clipped to [0, 255])."""
    return jnp.clip(jnp.round((video + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


class StreamDecoder:
    """Decodes a latent video pushed piece by piece, the causal cache carried between pieces:
    the pieces' frames, concatenated, are `decode_chunked` of the whole latent video (up to
    float rounding), so piece boundaries are seamless, and memory is one piece plus the cache.

    push(z [B, t, h, w, C]) -> float32 [B, F', 8h, 8w, 3] (uint8 with ``uint8=True``; 4 and 8:
    the model's temporal and spatial factors): the first push yields F' = 1 + 4(t - 1) frames
    (its latent 0 decodes alone, as `decode_chunked` does), every later one 4t. Latents are
    decoded `chunk` latent frames at a time (a shorter tail at the end of a piece); each piece
    size compiles once (continuation in latent space pushes two: a whole clip, then T - K).
    Holds the latest cache only: start a new video with a new StreamDecoder; pass `programs`
    (`StreamDecoder.programs`, kept by the caller) so that new ones reuse the compiled code.
    """

    def __init__(self, model, params, chunk: int = 1, uint8: bool = False, programs=None):
        self.model, self.params = model, {"params": params["params"]}
        self.cache = None  # the causal convs' last input frames, after the latest push
        self._first, self._rest = programs or self.programs(model, chunk, uint8)

    @staticmethod
    def programs(model, chunk: int = 1, uint8: bool = False):
        """The jitted (first push, later push) functions of a StreamDecoder of `model`."""
        if chunk < 1:
            raise ValueError(f"StreamDecoder: chunk must be >= 1, got {chunk}")
        post = to_uint8 if uint8 else (lambda x: x)

        def first(params, z):
            out0, variables = model.apply(params, z[:, :1], True, method="decode_chunk", mutable=["cache"])
            cache, out = rest(params, variables["cache"], z[:, 1:])
            return cache, jnp.concatenate([post(out0), out], axis=1)

        def rest(params, cache, z):
            chunks, tail = _split_chunks(z, 0, chunk)
            cache, outs, out_tail = _continue_chunks(model, params, "decode_chunk", cache, chunks, tail)
            n, b = outs.shape[:2]
            parts = [jnp.moveaxis(outs, 0, 1).reshape((b, n * outs.shape[2]) + outs.shape[3:])]
            return cache, post(jnp.concatenate(parts + ([out_tail] if out_tail is not None else []), axis=1))

        return jax.jit(first), jax.jit(rest)

    def push(self, z) -> jax.Array:
        """The frames the latents z [B, t >= 1, h, w, C] add to the video (class docstring)."""
        z = jnp.asarray(z, jnp.float32)
        self.model.check_latents(z, "StreamDecoder.push")
        if self.cache is None:
            self.cache, frames = self._first(self.params, z)
        else:
            self.cache, frames = self._rest(self.params, self.cache, z)
        return frames


# ---------------------------------------------------------------------------------------------
# Spatial tiling with blended seams: memory of one tile, for high resolutions.
# ---------------------------------------------------------------------------------------------

def _tiles_1d(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of equal tiles covering [0, size), neighbours overlapping by >= `overlap`
    (the last tile is aligned to the end, so its overlap may be larger)."""
    if tile >= size:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be in [0, tile={tile})")
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def _ramp_1d(starts: list[int], tile: int, scale: float) -> np.ndarray:
    """Blend weights [num_tiles, tile * scale]: 1 inside a tile, linear ramps across each overlap
    with a neighbour (the two ramps of an overlap sum to 1), so seams cross-fade."""
    n = round(tile * scale)
    pos = np.arange(n) + 0.5
    weights = []
    for i, s in enumerate(starts):
        w = np.ones(n)
        if i > 0:  # overlap with the previous tile, in output units
            w = np.minimum(w, pos / ((starts[i - 1] + tile - s) * scale))
        if i + 1 < len(starts):
            w = np.minimum(w, (n - pos) / ((s + tile - starts[i + 1]) * scale))
        weights.append(w)
    return np.stack(weights)


def _tiled(fn, x: jax.Array, tile: int, overlap: int, scale: float, out_channels: int):
    """Applies fn to overlapping spatial tiles of x [B, T, H, W, C] and blends the outputs.

    fn: tile [B, T, tile', tile', C] -> [B, T', tile' * scale, tile' * scale, out_channels]
    (tile' = min(tile, H) and likewise in W). The tiles run one at a time in a `lax.scan`
    that accumulates weighted outputs into one buffer, so memory is one tile's activations
    plus the output.
    """
    b, _, h, w, _ = x.shape
    th, tw = min(tile, h), min(tile, w)
    ys, xs = _tiles_1d(h, th, overlap), _tiles_1d(w, tw, overlap)
    wy, wx = _ramp_1d(ys, th, scale), _ramp_1d(xs, tw, scale)
    out_shape = jax.eval_shape(fn, jax.ShapeDtypeStruct((b,) + x.shape[1:2] + (th, tw) + x.shape[4:],
                                                        x.dtype)).shape
    t_out, oh, ow = out_shape[1], round(h * scale), round(w * scale)
    total = np.zeros((oh, ow))
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            oy, ox = round(y0 * scale), round(x0 * scale)
            total[oy:oy + wy.shape[1], ox:ox + wx.shape[1]] += np.outer(wy[i], wx[j])
    index = np.array([(i, j) for i in range(len(ys)) for j in range(len(xs))], np.int32)
    starts = np.array([(ys[i], xs[j]) for i, j in index], np.int32)

    def step(acc, item):
        (i, j), (y0, x0) = item
        part = lax.dynamic_slice(x, (0, 0, y0, x0, 0), (b, x.shape[1], th, tw, x.shape[4]))
        weight = jnp.asarray(wy, jnp.float32)[i][:, None] * jnp.asarray(wx, jnp.float32)[j][None, :]
        out = fn(part).astype(jnp.float32) * weight[:, :, None]
        at = (0, 0, (y0 * scale).astype(jnp.int32), (x0 * scale).astype(jnp.int32), 0)
        return lax.dynamic_update_slice(acc, lax.dynamic_slice(acc, at, out.shape) + out, at), None

    acc = jnp.zeros((b, t_out, oh, ow, out_channels), jnp.float32)
    acc, _ = lax.scan(step, acc, (jnp.asarray(index), jnp.asarray(starts)))
    return acc / jnp.asarray(total, jnp.float32)[:, :, None]


def decode_tiled(model, params, z: jax.Array, tile: int = 16, overlap: int = 4,
                 chunk: int | None = None) -> jax.Array:
    """`model.decode` on overlapping spatial tiles of `tile` x `tile` latent pixels (neighbours
    sharing at least `overlap`), blended with linear ramps across each overlap.

    params: {'params': ...}; z [B, T, h, w, C] -> float32 [B, 1 + 4(T-1), 8h, 8w, 3].
    `chunk`: also decode each tile `chunk` latent frames at a time (`decode_chunked`), for long
    and large videos. With ``norm_groups=0`` pixels far enough from a tile border (the
    decoder's receptive field) equal the one-pass decode; with GroupNorm the statistics are the
    tile's, so tiles differ everywhere (as in other tiled VAEs with GroupNorm).
    """
    model.check_latents(z, "decode_tiled")
    if chunk is None:
        fn = lambda part: model.apply({"params": params["params"]}, part, method="decode")
    else:
        fn = lambda part: decode_chunked(model, params, part, chunk)
    return _tiled(fn, z, tile, overlap, model.spatial_factor, 3)


def encode_tiled(model, params, video: jax.Array, tile: int = 128, overlap: int = 32,
                 chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """`model.encode` on overlapping spatial tiles of `tile` x `tile` pixels (multiples of 8;
    neighbours sharing at least `overlap` pixels), means and log-variances blended with linear
    ramps. `chunk`: also encode each tile chunk by chunk. Returns (mean, logvar) as `encode`."""
    model.check_video(video, "encode_tiled")
    s = model.spatial_factor
    if tile % s or overlap % s:
        raise ValueError(f"encode_tiled: tile {tile} and overlap {overlap} must be multiples of {s}")
    c = model.latent_channels

    def fn(part):
        if chunk is None:
            mean, logvar = model.apply({"params": params["params"]}, part, method="encode")
        else:
            mean, logvar = encode_chunked(model, params, part, chunk)
        return jnp.concatenate([mean, logvar], axis=-1)

    moments = _tiled(fn, video, tile, overlap, 1 / s, 2 * c)
    return moments[..., :c], moments[..., c:]
