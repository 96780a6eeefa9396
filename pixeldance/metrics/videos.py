"""Videos of a folder as a protocol's clips: uint8 [F, H, W, 3] at the protocol's resolution.

A folder holds mp4, gif (or any format PyAV reads: avi, webm, mov, mkv) files, read in sorted
name order (subfolders included); a folder with more files than the protocol's count is
subsampled with the protocol's seed. Each file gives one clip (`pixeldance.metrics.protocols`,
steps 1 and 2). A file that has no such clip (too short, corrupt) stops the run with one line
naming it: silently skipping files would change the set the number describes.
"""
from __future__ import annotations

import hashlib
import os
import zlib
from typing import Iterator

import numpy as np

from pixeldance.data import video_io
from pixeldance.data.folder import BadVideoError
from pixeldance.metrics.protocols import Protocol

EXTENSIONS = (".mp4", ".gif", ".avi", ".webm", ".mov", ".mkv")


class VideoSetError(ValueError):
    """A missing folder, no videos, or a video without the protocol's clip; one line."""


def list_videos(folder: str, limit: int | None = None, seed: int = 0) -> list[str]:
    """Video files under `folder` (relative paths, sorted); at most `limit`, a seeded subset
    kept in sorted order."""
    if not os.path.isdir(folder):
        raise VideoSetError(f"video folder not found: {folder}")
    names = sorted(
        os.path.relpath(os.path.join(root, f), folder)
        for root, _, files in os.walk(folder) for f in files if f.lower().endswith(EXTENSIONS)
        and not f.endswith(".tmp.mp4"))
    if not names:
        raise VideoSetError(f"no videos ({', '.join(EXTENSIONS)}) in {folder}")
    if limit is not None and len(names) > limit:
        keep = np.random.default_rng(seed).choice(len(names), limit, replace=False)
        names = [names[i] for i in sorted(keep)]
    return names


def fingerprint(folder: str, names: list[str]) -> str:
    """A short hash of the set: the names, sizes and modification times of its files, so cached
    statistics of a folder whose files changed are not reused."""
    h = hashlib.sha256()
    for name in names:
        st = os.stat(os.path.join(folder, name))
        h.update(f"{name}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


class _Fixed:
    """Stands in for the generator `video_io.decode_clip` draws a start from: always the same
    fraction of the range (0: the first frames, 0.5: the centre)."""

    def __init__(self, fraction: float):
        self.fraction = fraction

    def integers(self, low, high):
        return low + int(round((high - 1 - low) * self.fraction))

    def uniform(self):
        return self.fraction


def _clip_rng(protocol: Protocol, name: str):
    if protocol.clip_start == "random":
        return np.random.default_rng([protocol.seed, zlib.crc32(name.encode())])
    return _Fixed(0.0 if protocol.clip_start == "start" else 0.5)


def resize_frames(frames, resolution: int, crop: str) -> np.ndarray:
    """uint8 [F, H, W, 3] -> [F, resolution, resolution, 3]: 'center' resizes the shorter side to
    `resolution` and crops the centre, 'squash' resizes both sides (PIL bilinear, which
    antialiases when shrinking). Frames already at the size are returned as they are."""
    from PIL import Image
    out = []
    for frame in frames:
        H, W = frame.shape[:2]
        if (H, W) == (resolution, resolution):
            out.append(np.asarray(frame, np.uint8))
            continue
        if crop == "squash":
            size = (resolution, resolution)
        else:
            scale = resolution / min(H, W)
            size = (max(resolution, round(W * scale)), max(resolution, round(H * scale)))
        im = Image.fromarray(np.asarray(frame, np.uint8)).resize(size, Image.BILINEAR)
        a = np.asarray(im)
        top, left = (a.shape[0] - resolution) // 2, (a.shape[1] - resolution) // 2
        out.append(a[top:top + resolution, left:left + resolution])
    return np.stack(out)


def read_clip(folder: str, name: str, protocol: Protocol) -> np.ndarray:
    """The protocol's clip of one file: uint8 [num_frames, resolution, resolution, 3]."""
    try:
        frames = video_io.decode_clip(os.path.join(folder, name), name, _clip_rng(protocol, name),
                                      num_frames=protocol.num_frames, fps=protocol.fps,
                                      stride=protocol.stride)
    except BadVideoError as e:
        raise VideoSetError(f"{os.path.join(folder, name)}: no {protocol.num_frames}-frame clip "
                            f"for protocol {protocol.name} ({e})") from None
    return resize_frames(frames, protocol.resolution, protocol.crop)


def iterate_clips(folder: str, names: list[str], protocol: Protocol,
                  batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """(names, clips uint8 [B, F, R, R, 3]) batches of the files `names`, in order."""
    for i in range(0, len(names), batch_size):
        chunk = names[i:i + batch_size]
        yield chunk, np.stack([read_clip(folder, n, protocol) for n in chunk])
