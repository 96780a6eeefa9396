"""What the folder sources share (pixeldance/data/video_folder.py, image_folder.py and, for
its bad-input bookkeeping, tfds_source.py): the captions file, the metadata cache, and
`FolderSource`, the base class that keeps the bad-input counts, replaces a bad entry by the next
good one and, for buckets, gives each entry's native shape.

    ROOT/
      captions.csv        header `path,caption` (or captions.jsonl: {"path": ..., "caption": ...})
      videos/0001.mp4     paths in the captions file are relative to ROOT (videos or images)
      ...

Bad input. Malformed caption rows are found when the index is built (their line numbers are
logged and counted), and so are rows whose path resolves outside ROOT (`../x.png`, an absolute
path, a symlink in ROOT pointing out of it: refused before anything is opened, see
pixeldance/data/paths.py; allow_outside_root=True, config.data.allow_outside_root, lets them
through); missing, empty, corrupt, truncated or too-short files when an item is
read. With on_error='skip' a bad entry is logged once and counted, and the item is replaced by
the next good entry (i + 1, i + 2, ... modulo the entries; a clip's position still comes from
item i), so batches keep their shape and stay deterministic; with on_error='raise' the first bad
row or file stops with one line naming it. `summary()` gives the counts per reason and the first
few paths. The counts are per process: with grain worker processes (config.data.num_workers > 0)
the main process only sees its own reads.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import threading
import zlib

import numpy as np
from absl import logging

from pixeldance.data.paths import OutsideRootError, resolve_inside

REASONS = ("malformed_row", "outside_root", "missing", "empty", "corrupt", "too_short")
# The pipeline's read threads (pipeline.READ_THREADS) can hit one bad entry at the same moment:
# the check-and-count is one step under this lock, so each bad entry is counted once. One lock for
# the module, not per source: a source is pickled into grain's worker processes, a lock cannot be.
_SKIP_LOCK = threading.Lock()
SPLITS = ("train", "heldout")
_EXAMPLES = 5  # paths kept per reason in summary()


class BadVideoError(ValueError):
    """A video (or caption row) that cannot give a clip; `reason` is one of REASONS."""

    def __init__(self, reason: str, path: str, detail: str = ""):
        self.reason, self.path = reason, path
        super().__init__(f"{reason.replace('_', ' ')}: {path}" + (f" ({detail})" if detail else ""))


def read_captions(path: str, on_error: str = "skip", *, root: str | None = None,
                  allow_outside_root: bool = False, name: str | None = None):
    """The (relative path, caption) rows of a CSV (header path,caption) or JSONL captions file.

    Returns (rows, bad): bad lists "file:line: why" for each malformed row (on_error='skip'); with
    on_error='raise' the first one raises ValueError.

    root: when given, each row's path must resolve inside it (`paths.resolve_inside`; nothing is
    opened): a row that does not is refused, with on_error='skip' listed in bad as the
    OutsideRootError (its message one line: "NAME:LINE: 'PATH' resolves outside the data root
    ROOT (...)"), with on_error='raise' raised; allow_outside_root=True keeps it. name: the
    captions file as rows are named in those messages (default: path).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"captions file not found: {path}")
    rows, bad = [], []
    name = path if name is None else name

    def reject(line: int, why: str):
        msg = f"{path}:{line}: {why}"
        if on_error == "raise":
            raise ValueError(f"malformed caption row {msg}")
        bad.append(msg)

    def add(line: int, rel: str, caption: str):
        if "\0" in rel:  # os.path refuses it; no file has such a name
            reject(line, "the path holds a NUL character")
            return
        if root is not None:
            try:
                resolve_inside(root, rel, where=f"{name}:{line}", allow_outside=allow_outside_root)
            except OutsideRootError as e:
                if on_error == "raise":
                    raise
                bad.append(e)
                return
        rows.append((rel, caption))

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
                add(line_no, row["path"], row["caption"])
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
                add(reader.line_num, fields[0].strip(), fields[1])
    return rows, bad


def _stable_id(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


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

    A subclass sets num_frames and resolution, calls `_init_settings` (crop, seed, split,
    on_error and the empty bad-input counts) and `_index_folder` (root, captions, _entries
    [(relative path, caption)]) or sets those itself, and defines
    `_read_entry(entry, rng, index) -> (video uint8 [F, H, W, 3], caption)`, and for buckets
    `_probe(path) -> list` (header values of one file, BadVideoError if unreadable) and
    `_native_of(values) -> (most frames one item can have, height, width)`.

    meta_cache: where the probed header values are kept, a JSON file per folder: '' next to the
    captions file (`<captions>.meta-<kind>.json`), a folder to keep them in, or 'memory'.
    """

    KIND = "folder"           # the name in log lines and summaries
    NOUN = "file"
    meta_cache = ""
    # Rows whose path resolves outside root are refused unless True (config.data.allow_outside_root).
    allow_outside_root = False
    _shape = None             # (F, H, W) in a view made by `read` for a bucket
    _native_table = None

    def _init_settings(self, *, crop: str, seed: int, split: str, on_error: str, reasons=REASONS):
        """Checks and sets the settings every folder source has and empties the bad-input counts
        (one per reason of `reasons`)."""
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.crop, self.seed, self.split, self.on_error = crop, seed, split, on_error
        self._counts = {r: 0 for r in reasons}
        self._examples = {r: [] for r in reasons}
        self._bad: dict[int, str] = {}  # entry -> reason, once found (per process)

    def _index_folder(self, root: str, captions: str, size: int | None):
        """Reads the captions file of `root` into _entries (malformed rows, and rows whose path
        resolves outside root unless allow_outside_root, counted, or raised with
        on_error='raise'; an outside path is never opened), sets root, captions, size (default:
        one item per entry) and the digest that pins the entries down for grain's checkpoint
        check (which compares reprs)."""
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{self.KIND.replace('_', ' ')} not found: {root}")
        self.root, self.captions = root, captions
        self._entries, bad = read_captions(os.path.join(root, captions), self.on_error, root=root,
                                           allow_outside_root=self.allow_outside_root, name=captions)
        for msg in bad:
            if isinstance(msg, OutsideRootError):
                self._record("outside_root", msg.row, str(msg))
            else:
                self._record("malformed_row", msg)
        if not self._entries:
            raise ValueError(f"no usable rows in {os.path.join(root, captions)}")
        self.size = len(self._entries) if size is None else int(size)
        self._digest = zlib.crc32(json.dumps(self._entries).encode("utf-8"))

    # -- grain's interface (with the subclass's __repr__) ---------------------------------------

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self!r}")
        return self._first_good(index)  # bad entries replaced by the next good one

    # -- bad input ----------------------------------------------------------------------------

    def _skip_bad(self, entry: int, error: BadVideoError):
        """A bad entry: with on_error='raise' the error propagates; else it is remembered (never
        read again in this process), logged and counted, once even where read threads find it
        together."""
        if self.on_error == "raise":
            raise error
        with _SKIP_LOCK:
            if entry in self._bad:  # another read thread found it first
                return
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
