"""Pure frame transforms shared by the sources and the bucketed pipeline (numpy in, numpy out).

Frames are uint8 [h, w, 3]; videos uint8 [F, H, W, 3].
"""
from __future__ import annotations

import numpy as np


def resize_crop(frames, height: int, width: int, crop: str = "center",
                rng: np.random.Generator | None = None) -> np.ndarray:
    """Frames (uint8 [h, w, 3] arrays, all one size) resized with their aspect kept so they just
    cover height x width (scale max(H/h, W/w): area average when shrinking, bilinear when
    enlarging), then cropped to it, the same window for every frame: centred, or ('random') at
    an offset drawn from `rng` (y, then x). Returns uint8 [len(frames), height, width, 3]."""
    from PIL import Image  # Pillow only when frames are resized: importing the sources stays cheap
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
