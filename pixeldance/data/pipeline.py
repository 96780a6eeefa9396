"""grain pipelines: random-access source -> shuffle -> transform -> batch -> this host's rows.

Every pipeline is a `grain.MapDataset` shuffled by seed and repeated, so element k of the
stream is a pure function of (seed, k): the iterator position is all the state a checkpoint
needs, and each host reads only its own rows of each global batch.
"""
from __future__ import annotations

from typing import Callable

import grain
import jax
import numpy as np


# Read-ahead of a BatchIterator, in host batches (each element of these pipelines is a whole
# batch). grain's defaults (16 threads, 500 elements) would hold hundreds of batches: 3.3 GB of
# 32 x 17 x 64 x 64 clips, and a burst of 16 batches finishing at once. 4 threads decode in
# parallel (PyAV and numpy release the GIL) on the machines we run on; 8 batches ahead hide a
# slow batch.
READ_THREADS = 4
READ_AHEAD = 8


class BatchIterator:
    """A resumable iterator of host batches (dicts of numpy arrays).

    Batches are read ahead by READ_THREADS threads, at most READ_AHEAD of them, in this process
    or in each of `num_workers` grain worker processes.
    """

    def __init__(self, dataset: grain.MapDataset, num_workers: int = 0):
        ids = dataset.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_AHEAD))
        if num_workers > 0:
            ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
        self._it = iter(ids)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: dict):
        if state:
            self._it.set_state(state)


def make_batches(source, *, batch_size: int, seed: int, transform: Callable[[dict, np.random.Generator], dict] | None = None,
                 num_workers: int = 0, process_index: int | None = None,
                 process_count: int | None = None) -> BatchIterator:
    """Batches of this host's share of `batch_size` (the global batch), endlessly reshuffled.

    One global stream: the source is shuffled as a whole and global batch b is elements
    [b B, (b + 1) B) of it; host p reads only rows [p B / P, (p + 1) B / P) of each. So the global
    batches, and the iterator position (batches consumed), do not depend on the number of hosts:
    a run restarted on another number of hosts, or one host standing in for several, sees the
    same data in the same order. transform(example, rng) -> example runs per element with a
    generator seeded by (seed, position in the global stream), so random crops are reproducible
    too. process_index / process_count: this host and the number of hosts (default: JAX's).
    """
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if batch_size % n:
        raise ValueError(f"global batch size {batch_size} is not divisible by {n} hosts")
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    if transform is not None:
        ds = ds.random_map(lambda ex, rng: transform(ex, rng), seed=seed)
    # Host batches in the order (global batch, host): this host's are every n-th from p. Batching
    # and slicing a MapDataset are lazy, so each host reads and transforms only its own rows.
    ds = ds.batch(batch_size // n, drop_remainder=True)[p::n]
    return BatchIterator(ds, num_workers=num_workers)

