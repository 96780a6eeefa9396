"""SHA-256 of files, in parallel threads: what checkpoint manifests and latent-cache shards are
verified with (`pixeldance.checkpoint`, `pixeldance.data.latent_cache`).

hashlib releases the GIL on large buffers, so threads scale with cores up to the disk's read
rate (measured in benchmarks/checkpoint_verify.py).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os

_CHUNK = 8 << 20


def file_digest(path: str) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex) of one file, read in 8 MiB chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def digests(paths: list[str]) -> list[tuple[int, str]]:
    """`file_digest` of each path, in order, over min(8, cores) threads."""
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(file_digest, paths))
