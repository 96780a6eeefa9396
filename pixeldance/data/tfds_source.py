"""Clips of the TFDS-built UCF-101 and MSR-VTT (pixeldance/data/tfds_datasets.py), as a grain
random-access source that works without TensorFlow.

    DATA_DIR/pixeldance_ucf101/split1/1.0.0/*.array_record   built by
    DATA_DIR/pixeldance_msrvtt/1.0.0/*.array_record          python -m pixeldance.data.tfds_build

Item i is one clip of record `i % num_records` of a TFDS split, exactly as VideoFolderSource
makes it (and with its decoder, `video_io.decode_clip`): the stored video bytes are decoded by
PyAV from memory, only the frames needed; `num_frames` frames at `fps` (or every `stride`-th),
a start drawn from (seed, split, i), resized so the short side is `resolution` and cropped
square. The caption is the UCF-101 class name as words ('ApplyEyeMakeup' -> 'apply eye
makeup') or one of the MSR-VTT video's captions, drawn from (seed, split, i) too.

Bad input as in VideoFolderSource (the bookkeeping of `folder.FolderSource`): empty, corrupt,
truncated or too-short videos are logged, counted and replaced by the next good record
(on_error='skip'), or stop with one line naming the split and video (on_error='raise', e.g.
"corrupt: test:ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi (...)"). A data_dir without the
built dataset, or an unknown split, is a one-line error.

Each item is dict(video uint8 [F, R, R, 3], caption str, index int).
"""
from __future__ import annotations

import io
import os
import zlib

import numpy as np

from pixeldance.data import video_io
from pixeldance.data.folder import SPLITS, BadVideoError, FolderSource
from pixeldance.data.transforms import resize_crop

SPLIT_DEFAULTS = {"train": "train", "heldout": "test"}


class TfdsVideoSource(FolderSource):
    """Random-access clips of a built TFDS video dataset (duck-types grain's RandomAccessDataSource).

    data_dir: the TFDS data_dir given to the build; dataset: 'ucf101' or 'msrvtt';
    tfds_split: the TFDS split to read ('train', 'test', MSR-VTT also 'validation'; default
        'train' for split='train', 'test' for split='heldout'); ucf101_split: the official
        UCF-101 list (1, 2 or 3) the dataset was built with.
    The other arguments are VideoFolderSource's: clips are uint8 [num_frames, resolution,
    resolution, 3]; split ('train' | 'heldout') and seed fix every clip with the item index;
    size: the number of items (default: the number of records).
    """

    KIND = "tfds"  # the name in log lines and summaries
    NOUN = "video"

    def __init__(self, data_dir: str, dataset: str, tfds_split: str | None = None, *, ucf101_split: int = 1,
                 num_frames: int = 17, resolution: int = 64, fps: float = 0.0, stride: int = 1,
                 crop: str = "center", seed: int = 0, split: str = "train", size: int | None = None,
                 on_error: str = "skip"):
        from pixeldance.data import tfds_datasets  # tensorflow_datasets only when a TFDS source is made
        self._init_settings(crop=crop, seed=seed, split=split, on_error=on_error)
        video_io.check_clip_settings(num_frames, resolution, fps, stride)
        self.num_frames, self.resolution, self.fps, self.stride = num_frames, resolution, float(fps), stride
        tfds_datasets.config_name(dataset, ucf101_split)  # checks both
        self.data_dir, self.dataset, self.ucf101_split = os.fspath(data_dir), dataset, ucf101_split
        self.tfds_split = tfds_split or SPLIT_DEFAULTS[split]
        if not os.path.isdir(self.data_dir):
            raise FileNotFoundError(f"TFDS data_dir not found: {self.data_dir}")
        builder = tfds_datasets.builder(dataset, self.data_dir, ucf101_split)
        if not os.path.exists(os.path.join(builder.data_path, "dataset_info.json")):
            raise FileNotFoundError(
                f"{dataset} is not built in {self.data_dir} (no {builder.data_path}): run python -m "
                f"pixeldance.data.tfds_build --dataset={dataset} --manual_dir=MANUAL_DIR --data_dir={self.data_dir}"
                + (f" --ucf101_split={ucf101_split}" if dataset == "ucf101" else ""))
        splits = builder.info.splits
        if self.tfds_split not in splits:
            raise ValueError(f"unknown split {self.tfds_split!r} of {dataset} in {builder.data_path}; "
                             f"it has {sorted(splits.keys())}")
        num = splits[self.tfds_split].num_examples
        if num == 0:
            raise ValueError(f"split {self.tfds_split!r} of {dataset} in {builder.data_path} is empty")
        # FolderSource's names: root (the dataset folder) and captions (the split) only
        # appear in messages; _entries only gives the number of records.
        self.root, self.captions = str(builder.data_path), self.tfds_split
        self._entries = range(num)
        self._class_names = (list(builder.info.features["label"].names) if dataset == "ucf101" else None)
        self.size = num if size is None else int(size)
        # Pins down the records for grain's checkpoint check (which compares reprs).
        shards = splits[self.tfds_split].shard_lengths
        self._digest = zlib.crc32(repr((self.root, self.tfds_split, shards)).encode("utf-8"))
        self._builder = builder
        self._records = None  # the TFDS data source, opened on first read (in each process)

    def __getstate__(self):  # grain workers get a copy without open files
        state = dict(self.__dict__)
        state["_builder"] = state["_records"] = None
        return state

    def __repr__(self) -> str:
        return (f"TfdsVideoSource(dataset={self.dataset!r}, root={self.root!r}, tfds_split={self.tfds_split!r}, "
                f"entries={len(self._entries)}, digest={self._digest:08x}, size={self.size}, "
                f"num_frames={self.num_frames}, resolution={self.resolution}, fps={self.fps}, "
                f"stride={self.stride}, crop={self.crop!r}, seed={self.seed}, split={self.split!r})")

    def record(self, entry: int) -> dict:
        """The stored record `entry` of the split (video bytes, text as bytes, as TFDS decodes it)."""
        if self._records is None:
            if self._builder is None:
                from pixeldance.data import tfds_datasets  # not imported yet in a grain worker process
                self._builder = tfds_datasets.builder(self.dataset, self.data_dir, self.ucf101_split)
            self._records = self._builder.as_data_source(self.tfds_split)
        return self._records[int(entry)]

    def caption_of(self, record: dict, index: int) -> str:
        """The caption of a record for item `index`: the UCF-101 class as words, or one of the
        MSR-VTT captions drawn from (seed, split, index) ('' if it has none)."""
        from pixeldance.data.tfds_datasets import class_caption  # tensorflow_datasets, as in __init__
        if self._class_names is not None:
            return class_caption(self._class_names[int(record["label"])])
        captions = record["captions"]
        if len(captions) == 0:
            return ""
        k = np.random.default_rng([self.seed, SPLITS.index(self.split), index, 1]).integers(len(captions))
        return _text(captions[k])

    def _read_entry(self, entry: int, rng: np.random.Generator, index: int) -> tuple[np.ndarray, str]:
        ex = self.record(entry)
        key = _text(ex["path"]) if "path" in ex else _text(ex["video_id"]) + ".mp4"
        name = f"{self.tfds_split}:{key}"
        data = ex["video"]
        if not data:
            raise BadVideoError("empty", name)
        frames = video_io.decode_clip(io.BytesIO(data), name, rng, num_frames=self.num_frames, fps=self.fps,
                                      stride=self.stride)
        H, W = self._target_hw()  # R x R, or a bucket's H x W
        return resize_crop(frames, H, W, self.crop, rng), self.caption_of(ex, index)

    def _native(self):
        """Per-record shapes for buckets (config.data.buckets) would mean reading every stored
        video's header: not provided (bucketing falls back to the item shape)."""
        raise NotImplementedError(f"{self.dataset} (TFDS) gives no per-video shapes for buckets")


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
