"""Weighted mixtures of random-access sources, deterministic by seed (e.g. videos and images).

`MixtureSource(components, weights, seed=...)` is itself a random-access source, so every
pipeline takes it as it takes one source (`pipeline.make_batches`, `buckets.make_bucketed_batches`),
and element k of the stream stays a pure function of (seed, k), with the iterator position as
the whole data state.

The index map. Mixture items are cut into blocks of L items (L = 1000, more if a weight is under
1/1000). Each block holds n_c items of component c: L * w_c rounded by largest remainders, so
the proportions are exact in every block to 1/L. Their order inside block b is a permutation
drawn from (seed, b). Within a component the indices count up across blocks (block b's items of
c are its indices b n_c, b n_c + 1, ...), taken modulo the component's length: each component
is read in order, every item once before any twice. A pipeline shuffles the mixture as a whole
on top of this, so a batch holds each component in about its proportion.

From a config (`config.data.name = 'mixture'`):

    config.data.mixture = "videos:0.8,images:0.2"      NAME:WEIGHT,... (weights relative)
    config.data.sources = dict(                         per component, fields of config.data
        videos=dict(name="video_folder", root="/data/clips"),
        images=dict(name="image_folder", root="/data/stills", captions="captions.jsonl"))

A component is built by `sources.make_source` from config.data with its entry of
config.data.sources laid over it; `name` there is the dataset kind (default: the component's
own name, so "video_folder:0.5,shapes:0.5" works with no entries at all). Components that give
items of different shapes (videos [F, R, R, 3], images [1, R, R, 3]) can only be batched by
buckets (config.data.buckets, pixeldance/data/buckets.py); stages that need one shape (the
latent cache, the VAE's held-out clips and statistics, samples) get the components shaped like
the first one (`sources.make_source(..., mixed_shapes=False)`), so list the videos first.

Items: dict(video uint8 [F, H, W, 3], caption str, index int (the mixture index k),
source int (the component)).
"""
from __future__ import annotations

import collections
import copy
import math

import numpy as np

from pixeldance.data import buckets

BLOCK = 1000
_TAG = 0x6D6978  # separates the block permutations from other draws of the same seed
_KEYS = ("video", "caption")


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """'a:0.8,b:0.2' -> [('a', 0.8), ('b', 0.2)]; one-line ValueError naming a bad part."""
    out = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, weight = part.partition(":")
        name = name.strip()
        try:
            w = float(weight) if sep else float("nan")
        except ValueError:
            w = float("nan")
        if not name or not math.isfinite(w) or w <= 0:
            raise ValueError(f"bad mixture component {part!r} in config.data.mixture={spec!r}: "
                             f"expected NAME:WEIGHT with a positive weight")
        if name in (n for n, _ in out):
            raise ValueError(f"mixture component {name!r} listed twice in config.data.mixture={spec!r}")
        out.append((name, w))
    if not out:
        raise ValueError(f"config.data.mixture={spec!r} names no components (expected e.g. 'a:0.8,b:0.2')")
    return out


class MixtureSource:
    """Random access over a weighted mixture of random-access sources (see the module docstring).

    components: sources (len, getitem; items with 'video' and 'caption'); weights: positive,
    relative. seed: fixes the order inside every block. size: the number of items (default:
    about enough to read every component through once). names: for reprs and summaries.
    """

    def __init__(self, components, weights, *, seed: int = 0, size: int | None = None, names=None):
        self.components = list(components)
        w = np.asarray(weights, np.float64)
        if not self.components or w.shape != (len(self.components),):
            raise ValueError(f"a mixture needs one weight per component, got {len(self.components)} "
                             f"components and weights {list(weights)}")
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"mixture weights must be positive, got {list(weights)}")
        self.weights = w / w.sum()
        self.names = list(names) if names is not None else [f"c{i}" for i in range(len(w))]
        self.seed = int(seed)
        self.block = max(BLOCK, int(math.ceil(1.0 / self.weights.min())))
        if self.block > 1_000_000:
            raise ValueError(f"mixture weight {self.weights.min():.2g} too small (under 1e-6 of the total)")
        raw = self.block * self.weights
        counts = np.floor(raw).astype(np.int64)
        extra = np.argsort(-(raw - counts), kind="stable")[: self.block - counts.sum()]
        counts[extra] += 1
        self.counts = counts  # items of each component per block, >= 1 each
        self._labels = np.repeat(np.arange(len(counts)), counts)
        self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._lengths = np.array([len(c) for c in self.components], np.int64)
        if np.any(self._lengths <= 0):
            raise ValueError(f"empty mixture component: {[n for n, l in zip(self.names, self._lengths) if l <= 0]}")
        if size is None:
            size = int(max(math.ceil(l * self.block / n) for l, n in zip(self._lengths, counts)))
        self.size = int(size)
        self._blocks: collections.OrderedDict = collections.OrderedDict()

    # -- the index map ------------------------------------------------------------------------

    def _block_table(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(component [L], index within the component's share of the block [L]) of block b."""
        got = self._blocks.get(b)
        if got is None:
            perm = np.random.default_rng([self.seed, _TAG, int(b)]).permutation(self._labels)
            order = np.argsort(perm, kind="stable")
            rank = np.empty(self.block, np.int64)
            rank[order] = np.arange(self.block) - self._starts[perm[order]]
            got = (perm, rank)
            self._blocks[b] = got
            if len(self._blocks) > 64:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(b)
        return got

    def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Mixture indices (int [N]) -> (component int [N], index in that component int64 [N])."""
        k = np.asarray(indices, np.int64).reshape(-1)
        if k.size and (k.min() < 0 or k.max() >= self.size):
            raise IndexError(f"mixture index out of range [0, {self.size}): {k.min()}..{k.max()}")
        b, s = np.divmod(k, self.block)
        comp, idx = np.empty_like(k), np.empty_like(k)
        order = np.argsort(b, kind="stable")
        blocks, first = np.unique(b[order], return_index=True)
        for blk, lo, hi in zip(blocks, first, list(first[1:]) + [len(k)]):
            rows = order[lo:hi]
            perm, rank = self._block_table(int(blk))
            c = perm[s[rows]]
            comp[rows] = c
            idx[rows] = blk * self.counts[c] + rank[s[rows]]
        return comp, idx % self._lengths[comp]

    # -- grain's interface --------------------------------------------------------------------

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}:{w:.4g}={c!r}" for n, w, c in zip(self.names, self.weights, self.components))
        return f"MixtureSource([{parts}], seed={self.seed}, size={self.size}, block={self.block})"

    def _item(self, k: int, c: int, item: dict) -> dict:
        return dict({key: item[key] for key in _KEYS}, index=int(k), source=int(c))

    def __getitem__(self, index: int) -> dict:
        k = int(index)
        if not 0 <= k < self.size:
            raise IndexError(f"index {k} out of range for a mixture of {self.size}")
        (c,), (j,) = self.locate([k])
        return self._item(k, c, self.components[c][int(j)])

    def read(self, index: int, shape=None) -> dict:
        """Item `index` at `shape` = (F, H, W) (for buckets; see buckets.read_item)."""
        k = int(index)
        (c,), (j,) = self.locate([k])
        return self._item(k, c, buckets.read_item(self.components[c], int(j), shape))

    def bucket_info(self, indices) -> dict:
        """dict(frames, height, width) int64 [N]: each item's native shape, from its component."""
        comp, idx = self.locate(indices)
        out = {key: np.zeros(len(comp), np.int64) for key in ("frames", "height", "width")}
        for c in np.unique(comp):
            rows = comp == c
            info = buckets.native_info(self.components[c], idx[rows])
            for key in out:
                out[key][rows] = info[key]
        return out

    def item_shapes(self) -> list[tuple[int, int, int]]:
        """(frames, height, width) of each component's items."""
        return [buckets.item_shape(c) for c in self.components]

    @property
    def item_shape(self) -> tuple[int, int, int] | None:
        """The shape of every item, or None when the components differ."""
        shapes = set(self.item_shapes())
        return shapes.pop() if len(shapes) == 1 else None

    def summary(self) -> dict:
        """{component name: its summary()} for the components that keep one."""
        return {n: c.summary() for n, c in zip(self.names, self.components) if hasattr(c, "summary")}

    def summary_line(self) -> str:
        lines = [f"{n}: {c.summary_line()}" for n, c in zip(self.names, self.components)
                 if hasattr(c, "summary_line")]
        return "mixture " + " | ".join(lines) if lines else "mixture: nothing to report"


# ---------------------------------------------------------------------------------------------
# From a config.
# ---------------------------------------------------------------------------------------------

def component_config(config, name: str):
    """A copy of `config` whose config.data is component `name`'s: config.data with
    config.data.sources[name] laid over it; data.name the component's kind."""
    sources = config.data.get("sources") or {}
    overrides = dict(sources[name].to_dict() if hasattr(sources[name], "to_dict") else sources[name]) \
        if name in sources else {}
    kind = overrides.pop("name", name)
    if kind == "mixture":
        raise ValueError(f"mixture component {name!r} is itself a mixture; list its parts instead")
    for key in overrides:
        if key not in config.data:
            raise ValueError(f"config.data.sources.{name}.{key}: no field config.data.{key} to override")
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
        for key, value in overrides.items():
            cfg.data[key] = value
        cfg.data.name = kind
        cfg.data.mixture = ""
    return cfg
