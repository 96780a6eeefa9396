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
seeks to the keyframe before the clip and stops once the clip is complete.

Bad input. Malformed caption rows are found when the index is built (their line numbers are
logged and counted); missing, empty, corrupt, truncated or too-short videos when an item is
read. With on_error='skip' a bad entry is logged once and counted, and the item is replaced by
the next good entry (i + 1, i + 2, ... modulo the entries; the clip position still comes from
item i), so batches keep their shape and stay deterministic; with on_error='raise' the first bad
row or video stops with one line naming the file. `summary()` gives the counts per reason and
the first few paths. The counts are per process: with grain worker processes
(config.data.num_workers > 0) the main process only sees its own reads.

Buckets (pixeldance/data/buckets.py): `read(i, (F, H, W))` gives item i as a clip of F frames
resized to cover H x W and cropped, and `bucket_info` each entry's native shape (the most frames
one clip can have at this fps / stride, height, width) from the container headers, read once and
kept in `<captions>.meta-video_folder.json` (config.data.meta_cache; see `FolderSource`).

Each item is dict(video uint8 [F, R, R, 3], caption str, index int).
"""
from __future__ import annotations

import copy
import csv
import json
import os
import zlib

import numpy as np
from absl import logging

REASONS = ("malformed_row", "missing", "empty", "corrupt", "too_short")
SPLITS = ("train", "heldout")
_EXAMPLES = 5  # paths kept per reason in summary()


class BadVideoError(ValueError):
    """A video (or caption row) that cannot give a clip; `reason` is one of REASONS."""

    def __init__(self, reason: str, path: str, detail: str = ""):
        self.reason, self.path = reason, path
        super().__init__(f"{reason.replace('_', ' ')}: {path}" + (f" ({detail})" if detail else ""))


def read_captions(path: str, on_error: str = "skip"):
    """The (relative path, caption) rows of a CSV (header path,caption) or JSONL captions file.

    Returns (rows, bad): bad lists "file:line: why" for each malformed row (on_error='skip'); with
    on_error='raise' the first one raises ValueError.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"captions file not found: {path}")
    rows, bad = [], []

    def reject(line: int, why: str):
        msg = f"{path}:{line}: {why}"
        if on_error == "raise":
            raise ValueError(f"malformed caption row {msg}")
        bad.append(msg)

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        if path.endswith((".jsonl", ".json")):
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    reject(line_no, f"not JSON ({e.msg})")
                    continue
                if (not isinstance(row, dict) or not isinstance(row.get("path"), str) or not row["path"]
                        or not isinstance(row.get("caption"), str)):
                    reject(line_no, "needs string fields 'path' and 'caption'")
                    continue
                rows.append((row["path"], row["caption"]))
        else:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip().lower() for h in header[:2]] != ["path", "caption"]:
                raise ValueError(f"captions file {path} must start with the header 'path,caption', "
                                 f"got {header}")
            for fields in reader:
                if not fields or not any(x.strip() for x in fields):
                    continue
                if len(fields) != 2 or not fields[0].strip():
                    reject(reader.line_num, f"expected 2 fields (path, caption), got {len(fields)}")
                    continue
                rows.append((fields[0].strip(), fields[1]))
    return rows, bad


def _stable_id(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# What the folder sources share (this one and pixeldance/data/image_folder.py).
# ---------------------------------------------------------------------------------------------

def resize_crop(frames, height: int, width: int, crop: str = "center",
                rng: np.random.Generator | None = None) -> np.ndarray:
    """Frames (uint8 [h, w, 3] arrays, all one size) resized with their aspect kept so they just
    cover height x width (scale max(H/h, W/w): area average when shrinking, bilinear when
    enlarging), then cropped to it, the same window for every frame: centred, or ('random') at
    an offset drawn from `rng` (y, then x). Returns uint8 [len(frames), height, width, 3]."""
    from PIL import Image
    h, w = frames[0].shape[:2]
    scale = max(height / h, width / w)
    nh, nw = max(height, int(round(h * scale))), max(width, int(round(w * scale)))
    if crop == "center":
        y, x = (nh - height) // 2, (nw - width) // 2
    else:
        y, x = int(rng.integers(0, nh - height + 1)), int(rng.integers(0, nw - width + 1))
    method = Image.BOX if scale < 1 else Image.BILINEAR
    out = np.empty((len(frames), height, width, 3), np.uint8)
    for i, frame in enumerate(frames):
        img = Image.fromarray(frame)
        if (nh, nw) != (h, w):
            img = img.resize((nw, nh), method)
        out[i] = np.asarray(img)[y:y + height, x:x + width]
    return out


class MetaCache:
    """Per-file header metadata of a folder (frame count, rate, size), read once and kept.

    path: a JSON file {relative path: [size, mtime_ns, *values]}; an entry is reused while its
    file's size and modification time are unchanged. '' keeps everything in memory only, and a
    file that cannot be written leaves a warning (memory only).
    """

    def __init__(self, path: str):
        self.path, self._data, self._dirty = path, {}, False
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    self._data = dict(json.load(f))
            except (OSError, ValueError, TypeError) as e:
                logging.warning("metadata cache %s unreadable (%s): reading the headers again", path, e)

    def get(self, rel: str, full: str) -> list | None:
        """The values kept for `rel` if its file `full` is unchanged, else None."""
        got = self._data.get(rel)
        try:
            st = os.stat(full)
        except OSError:
            return None
        if got and got[0] == st.st_size and got[1] == st.st_mtime_ns:
            return list(got[2:])
        return None

    def put(self, rel: str, full: str, values: list):
        st = os.stat(full)
        self._data[rel] = [st.st_size, st.st_mtime_ns, *values]
        self._dirty = True

    def save(self):
        if not (self.path and self._dirty):
            return
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self._data, f)
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError as e:
            logging.warning("metadata cache not written to %s (%s): kept in memory only", self.path, e)


class FolderSource:
    """What the folder sources share: bad-input bookkeeping, the loop that replaces a bad entry
    by the next good one, and for buckets (pixeldance/data/buckets.py) each entry's native
    shape and reading an item at a bucket's shape.

    A subclass sets root, captions, _entries [(relative path, caption)], seed, split, on_error,
    num_frames, resolution, _counts/_examples {reason: ...} and _bad {entry: reason}, and defines
    `_read_entry(entry, rng, index) -> (video uint8 [F, H, W, 3], caption)`, and for buckets
    `_probe(path) -> list` (header values of one file, BadVideoError if unreadable) and
    `_native_of(values) -> (most frames one item can have, height, width)`.

    meta_cache: where the probed header values are kept, a JSON file per folder: '' next to the
    captions file (`<captions>.meta-<kind>.json`), a folder to keep them in, or 'memory'.
    """

    KIND = "folder"           # the name in log lines and summaries
    NOUN = "file"
    meta_cache = ""
    _shape = None             # (F, H, W) in a view made by `read` for a bucket
    _native_table = None

    def _index_folder(self, root: str, captions: str, size: int | None):
        """Reads the captions file of `root` into _entries (malformed rows counted, or raised
        with on_error='raise'), sets root, captions, size (default: one item per entry) and the
        digest that pins the entries down for grain's checkpoint check (which compares reprs)."""
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{self.KIND.replace('_', ' ')} not found: {root}")
        self.root, self.captions = root, captions
        self._entries, bad = read_captions(os.path.join(root, captions), self.on_error)
        for msg in bad:
            self._record("malformed_row", msg)
        if not self._entries:
            raise ValueError(f"no usable rows in {os.path.join(root, captions)}")
        self.size = len(self._entries) if size is None else int(size)
        self._digest = zlib.crc32(json.dumps(self._entries).encode("utf-8"))

    # -- bad input ----------------------------------------------------------------------------

    # -- grain's interface (with the subclass's __repr__) ---------------------------------------

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self!r}")
        return self._first_good(index)  # bad entries replaced by the next good one

    def _skip_bad(self, entry: int, error: BadVideoError):
        """A bad entry: with on_error='raise' the error propagates; else it is remembered (never
        read again in this process), logged and counted."""
        if self.on_error == "raise":
            raise error
        self._bad[entry] = error.reason
        self._record(error.reason, error.path, str(error))

    def _record(self, reason: str, path: str, message: str | None = None):
        self._counts[reason] += 1
        if len(self._examples[reason]) < _EXAMPLES:
            self._examples[reason].append(path)
        logging.warning("%s: skipping %s", self.KIND, message or f"{reason.replace('_', ' ')}: {path}")

    def summary(self) -> dict:
        """dict(entries, skipped {reason: count}, examples {reason: first paths}) of this process."""
        return dict(entries=len(self._entries),
                    skipped={r: c for r, c in self._counts.items() if c},
                    examples={r: list(p) for r, p in self._examples.items() if p})

    def summary_line(self) -> str:
        s = self.summary()
        if not s["skipped"]:
            return f"{self.KIND} {self.root}: {s['entries']} entries, nothing skipped"
        parts = ", ".join(f"{r} {c} (e.g. {s['examples'][r][0]})" for r, c in s["skipped"].items())
        return f"{self.KIND} {self.root}: {s['entries']} entries; skipped {parts}"

    def _first_good(self, index: int) -> dict:
        """Item `index` from its entry, or from the next good entry (on_error='skip')."""
        n = len(self._entries)
        for k in range(n):
            entry = (index + k) % n
            if entry in self._bad or not self._fits(entry):
                continue
            try:
                rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
                video, caption = self._read_entry(entry, rng, index)
            except BadVideoError as e:
                self._skip_bad(entry, e)
                continue
            return dict(video=video, caption=caption, index=index)
        need = f" of {self._shape[0]}+ frames" if self._shape else ""
        raise ValueError(f"no readable {self.NOUN}{need} in {os.path.join(self.root, self.captions)} "
                         f"({self.summary()['skipped']})")

    # -- shapes and buckets ---------------------------------------------------------------------

    @property
    def item_shape(self) -> tuple[int, int, int]:
        """(frames, height, width) of the items `source[i]` gives."""
        return (self.num_frames, self.resolution, self.resolution)

    def _target_hw(self) -> tuple[int, int]:
        return tuple(self._shape[1:]) if self._shape else (self.resolution, self.resolution)

    def _fits(self, entry: int) -> bool:
        """Whether the entry has the frames `read`'s shape asks for (True where unknown)."""
        table = self._native_table
        return self._shape is None or table is None or table[entry, 0] >= self._shape[0]

    def _check_shape(self, shape: tuple[int, int, int]):
        """Raises ValueError for a shape this source cannot give (subclasses)."""

    def read(self, index: int, shape: tuple[int, int, int] | None = None) -> dict:
        """Item `index` at `shape` = (F, H, W): video uint8 [F, H, W, 3] (default: item_shape).
        A bad entry is replaced by the next good one that has F frames (on_error='skip')."""
        if shape is None:
            return self[index]
        shape = tuple(int(s) for s in shape)
        self._check_shape(shape)
        try:
            self._native()  # computed once, shared with the view
        except NotImplementedError:
            pass  # no per-entry shapes: entries too short for F are found when decoded
        view = copy.copy(self)
        view._shape, view.num_frames = shape, shape[0]
        return view[index]

    def bucket_info(self, indices) -> dict:
        """The native shape of items `indices` (int [N]), from the files' headers, read once per
        entry (kept in meta_cache): dict(frames, height, width), int64 [N] each; frames is the
        most frames the item can have at this source's fps/stride (0: unreadable entry)."""
        table = self._native()
        entry = np.asarray(indices, np.int64) % len(self._entries)
        return dict(frames=table[entry, 0], height=table[entry, 1], width=table[entry, 2])

    def _meta_cache_path(self) -> str:
        if self.meta_cache == "memory":
            return ""
        name = f"{os.path.basename(self.captions)}.meta-{self.KIND}.json"
        if not self.meta_cache:
            return os.path.join(self.root, os.path.dirname(self.captions), name)
        return os.path.join(self.meta_cache, f"{_stable_id(os.path.abspath(self.root)):08x}-{name}")

    def _native(self) -> np.ndarray:
        """int64 [entries, 3]: (most frames, height, width) per entry; zeros for bad entries."""
        if self._native_table is not None:
            return self._native_table
        if not hasattr(self, "_probe") or not hasattr(self, "_entries"):
            raise NotImplementedError(f"{type(self).__name__} has no per-entry shapes for buckets")
        cache = MetaCache(self._meta_cache_path())
        table = np.zeros((len(self._entries), 3), np.int64)
        for entry, (rel, _) in enumerate(self._entries):
            if entry in self._bad:
                continue
            path = os.path.join(self.root, rel)
            values = cache.get(rel, path)
            if values is None:
                try:
                    values = self._probe(path)
                except BadVideoError as e:
                    self._skip_bad(entry, e)
                    continue
                cache.put(rel, path, values)
            table[entry] = self._native_of(values)
        cache.save()
        self._native_table = table
        return table


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
    """

    KIND = "video_folder"
    NOUN = "video"

    def __init__(self, root: str, captions: str = "captions.csv", *, num_frames: int = 17,
                 resolution: int = 64, fps: float = 0.0, stride: int = 1, crop: str = "center",
                 seed: int = 0, split: str = "train", size: int | None = None, on_error: str = "skip",
                 meta_cache: str = ""):
        self.meta_cache = meta_cache
        self._init_clips(num_frames=num_frames, resolution=resolution, fps=fps, stride=stride, crop=crop,
                         seed=seed, split=split, on_error=on_error)
        self._index_folder(root, captions, size)

    def _init_clips(self, *, num_frames, resolution, fps, stride, crop, seed, split, on_error):
        """Checks and sets the clip settings and empties the bad-input counts (shared with the
        sources that subclass this one, e.g. pixeldance.data.tfds_source)."""
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if num_frames < 1 or resolution < 1 or stride < 1 or fps < 0:
            raise ValueError(f"bad clip settings: num_frames={num_frames}, resolution={resolution}, "
                             f"stride={stride}, fps={fps}")
        self.num_frames, self.resolution, self.fps, self.stride = num_frames, resolution, float(fps), stride
        self.crop, self.seed, self.split, self.on_error = crop, seed, split, on_error
        self._counts = {r: 0 for r in REASONS}
        self._examples = {r: [] for r in REASONS}
        self._bad: dict[int, str] = {}  # entry -> reason, once found (per process)

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
        """The clip of `path` for generator `rng`: uint8 [F, R, R, 3]; BadVideoError if none."""
        if not os.path.exists(path):
            raise BadVideoError("missing", path)
        if os.path.getsize(path) == 0:
            raise BadVideoError("empty", path)
        return self.decode_clip(path, path, rng)

    def decode_clip(self, file, name: str, rng: np.random.Generator) -> np.ndarray:
        """The clip of `file` (a path, or a binary file object such as io.BytesIO of a video's
        bytes) for generator `rng`: uint8 [F, R, R, 3]; BadVideoError naming `name` if none."""
        import av
        try:
            with av.open(file) as container:
                if not container.streams.video:
                    raise BadVideoError("corrupt", name, "no video stream")
                frames = self._decode(container, container.streams.video[0], name, rng)
        except BadVideoError:
            raise
        except (av.FFmpegError, OSError, ValueError, IndexError, ZeroDivisionError) as e:
            raise BadVideoError("corrupt", name, f"{type(e).__name__}: {e}".splitlines()[0]) from None
        return self._resize_crop(frames, rng)

    @staticmethod
    def _stream_info(container, stream, path) -> tuple[float, int]:
        """(frame rate, frame count) from the container's metadata; BadVideoError if unknown."""
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        if rate <= 0:
            raise BadVideoError("corrupt", path, "unknown frame rate")
        if stream.duration:
            duration = stream.duration * float(stream.time_base)
        elif container.duration:
            duration = container.duration / 1e6
        else:
            duration = 0.0
        count = int(stream.frames) or int(round(duration * rate))
        if count <= 0:
            raise BadVideoError("corrupt", path, "no frames")
        return rate, count

    def _decode(self, container, stream, path, rng) -> list[np.ndarray]:
        F = self.num_frames
        rate, count = self._stream_info(container, stream, path)
        tb = float(stream.time_base)
        if self.fps > 0:  # target times (seconds from the first frame) at self.fps
            span = (F - 1) / self.fps  # seconds from the first to the last frame of the clip
            last = (count - 1) / rate  # time of the last source frame
            if span > last + 1e-6:
                raise BadVideoError("too_short", path, f"{count} frames at {rate:.3g} fps < {F} at {self.fps:g} fps")
            t0 = rng.uniform() * (last - span)
            times = t0 + np.arange(F) / self.fps
        else:
            need = (F - 1) * self.stride + 1
            if count < need:
                raise BadVideoError("too_short", path, f"{count} frames < {need} (stride {self.stride})")
            start = int(rng.integers(0, count - need + 1))
            times = (start + self.stride * np.arange(F)) / rate
        half = 0.5 / rate  # a frame counts as showing time t if it starts by t + half a frame
        start_pts = stream.start_time or 0
        if times[0] > 1.0 / rate:
            container.seek(int(start_pts + max(times[0] - half, 0) / tb), stream=stream, backward=True)
        out, k = [], 0
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = (frame.pts - start_pts) * tb
            array = None
            while k < F and t + half >= times[k] - 1e-9:  # the nearest frame to times[k]
                if array is None:
                    array = frame.to_ndarray(format="rgb24")
                out.append(array)
                k += 1
            if k == F:
                break
        if len(out) < F:
            raise BadVideoError("too_short" if out else "corrupt", path,
                                f"decoded {len(out)} of {F} frames")
        return out

    def _resize_crop(self, frames: list[np.ndarray], rng) -> np.ndarray:
        H, W = self._target_hw()  # R x R, or a bucket's H x W
        return resize_crop(frames, H, W, self.crop, rng)

    # -- buckets ------------------------------------------------------------------------------

    def _probe(self, path: str) -> list:
        """[frame count, frame rate, height, width] from the container (no frames decoded)."""
        import av
        if not os.path.exists(path):
            raise BadVideoError("missing", path)
        if os.path.getsize(path) == 0:
            raise BadVideoError("empty", path)
        try:
            with av.open(path) as container:
                if not container.streams.video:
                    raise BadVideoError("corrupt", path, "no video stream")
                stream = container.streams.video[0]
                rate, count = self._stream_info(container, stream, path)
                h, w = int(stream.codec_context.height), int(stream.codec_context.width)
        except BadVideoError:
            raise
        except (av.FFmpegError, OSError, ValueError, IndexError, ZeroDivisionError) as e:
            raise BadVideoError("corrupt", path, f"{type(e).__name__}: {e}".splitlines()[0]) from None
        if h < 1 or w < 1:
            raise BadVideoError("corrupt", path, f"frame size {w}x{h}")
        return [count, rate, h, w]

    def _native_of(self, values: list) -> tuple[int, int, int]:
        """(most frames of one clip at this fps / stride, height, width) of a probed video."""
        count, rate, h, w = values
        if self.fps > 0:  # as in _decode: (F - 1) / fps must fit in the last frame's time
            most = int(np.floor((count - 1) / rate * self.fps + 1e-6)) + 1
        else:
            most = (int(count) - 1) // self.stride + 1
        return most, int(h), int(w)


# ---------------------------------------------------------------------------------------------
# From a config.
# ---------------------------------------------------------------------------------------------

def folder_source(config, split: str = "train", size: int | None = None) -> VideoFolderSource:
    d = config.data
    return VideoFolderSource(
        d.root, d.get("captions", "captions.csv"), num_frames=d.num_frames, resolution=d.resolution,
        fps=d.get("fps", 0.0), stride=d.get("stride", 1), crop=d.get("crop", "center"),
        seed=d.get("world_seed", 0), split=split, size=size, on_error=d.get("on_error", "skip"),
        meta_cache=d.get("meta_cache", ""))


def make_source(config, split: str = "train", size: int | None = None, *, mixed_shapes: bool = False):
    """The training source named by config.data.name: 'shapes' (the synthetic world; `size`
    items), 'video_folder' (config.data.root; `size` items, default one per entry), 'ucf101' /
    'msrvtt' (the TFDS datasets built into the data_dir config.data.root; likewise),
    'image_folder' (images of config.data.root as one-frame videos; likewise) or 'mixture'
    (config.data.mixture's weighted components, pixeldance/data/mixture.py).

    mixed_shapes: a mixture whose components give items of different shapes (videos and
    images) is whole only where a bucketed pipeline batches it (True: the VAE trainer with
    config.data.buckets); otherwise it is cut to the components shaped like its first one."""
    name = config.data.name
    if name == "image_folder":
        from pixeldance.data import image_folder
        return image_folder.image_source(config, split, size)
    if name == "mixture":
        from pixeldance.data import mixture
        return mixture.mixture_source(config, split, size, mixed_shapes=mixed_shapes)
    if name == "shapes":
        from pixeldance.data import synthetic
        from pixeldance.trainers.vae import world_config
        return synthetic.ShapesSource(split, size=size if size is not None else 1_000_000,
                                      config=world_config(config))
    if name == "video_folder":
        if not config.data.get("root"):
            raise ValueError("config.data.root must name the video folder (config.data.name='video_folder')")
        return folder_source(config, split, size)
    if name in ("ucf101", "msrvtt"):
        if not config.data.get("root"):
            raise ValueError(f"config.data.root must name the TFDS data_dir (config.data.name={name!r})")
        from pixeldance.data import tfds_source
        return tfds_source.tfds_source(config, split, size)
    raise ValueError(f"unknown dataset config.data.name={name!r}; expected 'shapes', 'video_folder', "
                     f"'ucf101', 'msrvtt', 'image_folder' or 'mixture'")


def log_summary(source, stage: str):
    """Logs (and prints) a folder (or mixture) source's skip summary; nothing for other sources."""
    if hasattr(source, "summary_line"):
        line = f"{stage}: {source.summary_line()}"
        logging.info(line)
        print(line)


def write_samples(config, workdir: str, num: int | None = None, pipeline=None) -> list[str]:
    """Samples for the captions of the first `num` folder clips (default config.eval.num_mp4):
    `samples/folder_T2V_{k}.mp4` (text only) and `samples/folder_I2V_{k}.mp4` (the clip's first
    frame + text), and `samples/folder_captions.txt`. Returns the mp4 paths. (The folder's
    stand-in for the shapes world's faithfulness stage, which only makes sense there.)"""
    from pixeldance.data import video_io
    from pixeldance.sample import load_pipeline
    pipe = pipeline or load_pipeline(workdir)
    num = config.eval.num_mp4 if num is None else num
    source = make_source(config, "heldout", size=num)
    items = [source[i] for i in range(num)]
    prompts = [it["caption"] for it in items]
    out_dir = os.path.join(workdir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for mode, firsts in (("T2V", None), ("I2V", [it["video"][0] for it in items])):
        videos = pipe.generate_batch(prompts, firsts, None, seed=0)
        for k, video in enumerate(videos):
            paths.append(os.path.join(out_dir, f"folder_{mode}_{k}.mp4"))
            video_io.write_mp4(paths[-1], video)
    with open(os.path.join(out_dir, "folder_captions.txt"), "w") as f:
        f.write("\n".join(prompts) + "\n")
    log_summary(source, "samples")
    return paths
