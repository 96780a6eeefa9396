"""Reading and writing images and videos (PyAV for mp4, Pillow for images and GIFs).

Videos are uint8 [F, H, W, 3]; images uint8 [H, W, 3].
"""
from __future__ import annotations

import os

import numpy as np


def read_image(path: str, size: int | None = None) -> np.ndarray:
    """An RGB image as uint8 [H, W, 3]; resized (bilinear) to size x size when `size` is given.

    Raises FileNotFoundError / ValueError with one line naming the file.
    """
    from PIL import Image, UnidentifiedImageError
    if not os.path.exists(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def write_image(path: str, image: np.ndarray):
    from PIL import Image
    Image.fromarray(np.asarray(image, np.uint8)).save(path)


def write_mp4(path: str, video: np.ndarray, fps: int = 8):
    """H.264 mp4 (yuv420p, so height and width must be even)."""
    import av
    video = np.asarray(video, np.uint8)
    F, H, W, _ = video.shape
    tmp = path + ".tmp.mp4"
    with av.open(tmp, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "12"}
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)  # a reader never sees a half-written file


def read_video(path: str) -> np.ndarray:
    """All frames of a video file as uint8 [F, H, W, 3]."""
    import av
    if not os.path.exists(path):
        raise FileNotFoundError(f"video not found: {path}")
    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"no frames in video {path}")
    return np.stack(frames)


def write_gif(path: str, video: np.ndarray, fps: int = 8, scale: int = 1):
    """Animated GIF, looping; `scale` repeats pixels so small videos are visible."""
    from PIL import Image
    video = np.asarray(video, np.uint8)
    if scale > 1:
        video = video.repeat(scale, axis=1).repeat(scale, axis=2)
    frames = [Image.fromarray(f) for f in video]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)


def video_grid(videos: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """uint8 [N, F, H, W, 3] -> one video [F, rows*(H+pad), columns*(W+pad), 3] (white padding)."""
    videos = np.asarray(videos, np.uint8)
    N, F, H, W, _ = videos.shape
    rows = -(-N // columns)
    out = np.full((F, rows * (H + pad), columns * (W + pad), 3), 255, np.uint8)
    for n in range(N):
        r, c = divmod(n, columns)
        out[:, r * (H + pad):r * (H + pad) + H, c * (W + pad):c * (W + pad) + W] = videos[n]
    return out
