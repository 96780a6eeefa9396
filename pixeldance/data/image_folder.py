"""A folder of images with a captions file, as a grain random-access source (for joint
image-video training: each image is a one-frame video, as the causal VAE encodes images).

    ROOT/
      captions.csv        header `path,caption` (or captions.jsonl: {"path": ..., "caption": ...})
      images/0001.jpg     paths in the captions file are relative to ROOT; any format PIL reads
      ...

Item i is the image of entry `i % num_entries`, turned upright by its EXIF orientation, made RGB
(transparent pixels over white), resized so that it covers the target (square `resolution`, or
a bucket's height x width: area average when shrinking, bilinear when enlarging) and cropped
(centre, or at an offset drawn from (seed, split, i)).

Bad input, as in VideoFolderSource (and with its code, pixeldance/data/folder.py): malformed
caption rows, and rows whose path resolves outside ROOT (`../x.png`, an absolute path, a symlink
pointing out of ROOT; allowed only with allow_outside_root=True), are found when the index is
built, before any image is opened; missing, empty or corrupt (unreadable,
truncated) images when an item is read. With on_error='skip' a bad entry is logged once and
counted, and the item is replaced by the next good entry (i + 1, i + 2, ... modulo the
entries), so batches keep their shape and stay deterministic; with on_error='raise' the first
bad row or image stops with one line naming the file. `summary()` gives the counts per reason and the first few paths (per process).

Each item is dict(video uint8 [1, R, R, 3] in [0, 255], caption str, index int).
"""
from __future__ import annotations

import os

import numpy as np

from pixeldance.data.folder import BadVideoError, FolderSource
from pixeldance.data.transforms import resize_crop

REASONS = ("malformed_row", "outside_root", "missing", "empty", "corrupt")
_ORIENTATION = 0x0112  # EXIF tag; values 5-8 are rotated by 90 or 270 degrees
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, MemoryError)


class BadImageError(BadVideoError):
    """An image that cannot be read; `reason` is one of REASONS (message: 'corrupt: PATH (...)')."""


class ImageFolderSource(FolderSource):
    """Random-access images of a folder as one-frame videos (duck-types grain's
    RandomAccessDataSource).

    root: the folder; captions: the captions file name in it (.csv or .jsonl).
    resolution R: items are uint8 [1, R, R, 3] (`read(i, (1, H, W))`: [1, H, W, 3], for buckets).
    crop: 'center' or 'random'. seed, split: with the item index, fix every random crop.
    size: the number of items (default: the number of well-formed rows); item i is entry i % entries.
    on_error: 'skip' (log, count, use the next good entry) or 'raise'.
    meta_cache: where image sizes read for buckets are kept (see `FolderSource`).
    allow_outside_root: read rows whose path resolves outside root (symlinks followed) instead
        of refusing them (config.data.allow_outside_root).
    """

    KIND = "image_folder"
    NOUN = "image"

    def __init__(self, root: str, captions: str = "captions.csv", *, resolution: int = 64,
                 crop: str = "center", seed: int = 0, split: str = "train", size: int | None = None,
                 on_error: str = "skip", meta_cache: str = "", allow_outside_root: bool = False):
        self._init_settings(crop=crop, seed=seed, split=split, on_error=on_error, reasons=REASONS)
        self.allow_outside_root = bool(allow_outside_root)
        if resolution < 1:
            raise ValueError(f"bad image settings: resolution={resolution}")
        self.meta_cache = meta_cache
        self.num_frames, self.resolution = 1, resolution
        self._index_folder(root, captions, size)

    def __repr__(self) -> str:
        return (f"ImageFolderSource(root={self.root!r}, captions={self.captions!r}, "
                f"entries={len(self._entries)}, digest={self._digest:08x}, size={self.size}, "
                f"resolution={self.resolution}, crop={self.crop!r}, seed={self.seed}, split={self.split!r})")

    def _read_entry(self, entry: int, rng: np.random.Generator, index: int) -> tuple[np.ndarray, str]:
        """(image as uint8 [1, H, W, 3], caption) of entry `entry`; BadImageError if unreadable."""
        rel, caption = self._entries[entry]
        return self.read_image(os.path.join(self.root, rel), rng), caption

    def read_image(self, path: str, rng: np.random.Generator) -> np.ndarray:
        """The image at `path` resized and cropped to the target: uint8 [1, H, W, 3]."""
        from PIL import Image, ImageOps  # Pillow only when images are read: importing stays cheap
        self._check_file(path)
        try:
            with Image.open(path) as img:
                img = ImageOps.exif_transpose(img)
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    img = img.convert("RGBA")
                    img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
                array = np.asarray(img.convert("RGB"))
        except _READ_ERRORS + (Image.DecompressionBombError,) as e:
            raise BadImageError("corrupt", path, f"{type(e).__name__}: {e}".splitlines()[0]) from None
        if array.ndim != 3 or min(array.shape[:2]) < 1:
            raise BadImageError("corrupt", path, f"image of shape {array.shape}")
        H, W = self._target_hw()
        return resize_crop([array], H, W, self.crop, rng)

    # -- buckets ------------------------------------------------------------------------------

    @staticmethod
    def _check_file(path: str):
        if not os.path.exists(path):
            raise BadImageError("missing", path)
        if os.path.getsize(path) == 0:
            raise BadImageError("empty", path)

    def _probe(self, path: str) -> list:
        """[height, width] of the upright image from its header (no pixels decoded)."""
        from PIL import Image  # Pillow only when headers are read, as in read_image
        self._check_file(path)
        try:
            with Image.open(path) as img:
                w, h = img.size
                if img.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):
                    h, w = w, h
        except _READ_ERRORS + (Image.DecompressionBombError,) as e:
            raise BadImageError("corrupt", path, f"{type(e).__name__}: {e}".splitlines()[0]) from None
        if h < 1 or w < 1:
            raise BadImageError("corrupt", path, f"size {w}x{h}")
        return [int(h), int(w)]

    def _native_of(self, values: list) -> tuple[int, int, int]:
        h, w = values
        return 1, h, w

    def _check_shape(self, shape: tuple[int, int, int]):
        if shape[0] != 1:
            raise ValueError(f"an image folder gives one-frame items, not {shape[0]} frames ({self.root})")
