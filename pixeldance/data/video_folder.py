"""A folder of videos with a captions file, as a grain random-access source (the WebVid layout).

    ROOT/
      captions.csv        header `path,caption` (or captions.jsonl: {"path": ..., "caption": ...})
      videos/0001.mp4     paths in the captions file are relative to ROOT
      ...

Item i is one clip of the entry `i % num_entries`: `num_frames` frames, either at a target fps
(frames picked by timestamp: for each target time the nearest source frame) or every
`stride`-th source frame, from a start drawn from (seed, split, i); resized so the short side is
`resolution` (area average when shrinking, bilinear when enlarging) and cropped square (centre,
or at an offset drawn from the same generator). Only the frames needed are decoded: the reader
seeks to the keyframe before the clip and stops once the clip is complete
(`video_io.decode_clip`, shared with pixeldance/data/tfds_source.py).

Bad input (see pixeldance/data/folder.py). Malformed caption rows, and rows whose path resolves
outside ROOT (`../x.mp4`, an absolute path, a symlink pointing out of ROOT; allowed only with
allow_outside_root=True), are found when the index is built, before any video is opened (their
line numbers are logged and counted); missing, empty, corrupt, truncated or
too-short videos when an item is read. With on_error='skip' a bad entry is logged once and
counted, and the item is replaced by the next good entry (i + 1, i + 2, ... modulo the entries;
the clip position still comes from item i), so batches keep their shape and stay deterministic;
with on_error='raise' the first bad row or video stops with one line naming the file.
`summary()` gives the counts per reason and the first few paths. The counts are per process:
with grain worker processes (config.data.num_workers > 0) the main process only sees its own
reads.

Buckets (pixeldance/data/buckets.py): `read(i, (F, H, W))` gives item i as a clip of F frames
resized to cover H x W and cropped, and `bucket_info` each entry's native shape (the most frames
one clip can have at this fps / stride, height, width) from the container headers, read once and
kept in `<captions>.meta-video_folder.json` (config.data.meta_cache; see `folder.FolderSource`).

Each item is dict(video uint8 [F, R, R, 3], caption str, index int).
"""
from __future__ import annotations

import os

import numpy as np

from pixeldance.data import video_io
from pixeldance.data.folder import FolderSource
from pixeldance.data.transforms import resize_crop


class VideoFolderSource(FolderSource):
    """Random-access clips of a video folder (duck-types grain's RandomAccessDataSource).

    root: the folder; captions: the captions file name in it (.csv or .jsonl).
    num_frames F, resolution R: clips are uint8 [F, R, R, 3].
    fps: target frame rate (0: take every `stride`-th source frame instead).
    crop: 'center' or 'random'. seed, split: with the item index, fix every clip.
    size: the number of items (default: the number of well-formed rows); item i reads entry
        i % entries, each time at another position.
    on_error: 'skip' (log, count, use the next good entry) or 'raise'.
    meta_cache: where container metadata read for buckets is kept (see `FolderSource`).
    allow_outside_root: read rows whose path resolves outside root (symlinks followed) instead
        of refusing them (config.data.allow_outside_root).
    """

    KIND = "video_folder"
    NOUN = "video"

    def __init__(self, root: str, captions: str = "captions.csv", *, num_frames: int = 17,
                 resolution: int = 64, fps: float = 0.0, stride: int = 1, crop: str = "center",
                 seed: int = 0, split: str = "train", size: int | None = None, on_error: str = "skip",
                 meta_cache: str = "", allow_outside_root: bool = False):
        self.meta_cache = meta_cache
        self._init_settings(crop=crop, seed=seed, split=split, on_error=on_error)
        self.allow_outside_root = bool(allow_outside_root)
        video_io.check_clip_settings(num_frames, resolution, fps, stride)
        self.num_frames, self.resolution, self.fps, self.stride = num_frames, resolution, float(fps), stride
        self._index_folder(root, captions, size)

    # -- grain's interface ------------------------------------------------------------------

    def __repr__(self) -> str:
        return (f"VideoFolderSource(root={self.root!r}, captions={self.captions!r}, "
                f"entries={len(self._entries)}, digest={self._digest:08x}, size={self.size}, "
                f"num_frames={self.num_frames}, resolution={self.resolution}, fps={self.fps}, "
                f"stride={self.stride}, crop={self.crop!r}, seed={self.seed}, split={self.split!r})")

    def _read_entry(self, entry: int, rng: np.random.Generator, index: int) -> tuple[np.ndarray, str]:
        """(clip, caption) of entry `entry` for item `index`; BadVideoError if no clip."""
        rel, caption = self._entries[entry]
        return self.read_clip(os.path.join(self.root, rel), rng), caption

    # (bad input: _record, summary and summary_line come from FolderSource)

    # -- decoding -----------------------------------------------------------------------------

    def read_clip(self, path: str, rng: np.random.Generator) -> np.ndarray:
        """The clip of `path` for generator `rng`: uint8 [F, R, R, 3] (or a bucket's
        [F, H, W, 3]); BadVideoError if none."""
        video_io.check_video_file(path)
        frames = video_io.decode_clip(path, path, rng, num_frames=self.num_frames, fps=self.fps,
                                      stride=self.stride)
        H, W = self._target_hw()  # R x R, or a bucket's H x W
        return resize_crop(frames, H, W, self.crop, rng)

    # -- buckets ------------------------------------------------------------------------------

    def _probe(self, path: str) -> list:
        """[frame count, frame rate, height, width] from the container (no frames decoded)."""
        return video_io.probe_video(path)

    def _native_of(self, values: list) -> tuple[int, int, int]:
        """(most frames of one clip at this fps / stride, height, width) of a probed video."""
        count, rate, h, w = values
        return video_io.most_clip_frames(count, rate, fps=self.fps, stride=self.stride), int(h), int(w)
