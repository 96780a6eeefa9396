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


class Mp4Writer:
    """Streams frames into an H.264 mp4 (yuv420p, so height and width must be even).

        with Mp4Writer(path) as writer:
            for frames in chunks:      # uint8 [F, H, W, 3], the same H, W throughout
                writer.write(frames)

    Frames are encoded as they come (only the current chunk is held) into `path + '.tmp.mp4'`,
    renamed to `path` on a clean exit so a reader never sees a half-written file; on an error
    the partial file is removed. `num_frames` counts the frames written.
    """

    def __init__(self, path: str, fps: int = 8):
        self.path, self.fps, self.num_frames = path, fps, 0
        self._tmp = path + ".tmp.mp4"
        self._container = self._stream = None

    def __enter__(self) -> "Mp4Writer":
        import av
        self._container = av.open(self._tmp, mode="w")
        return self

    def write(self, frames: np.ndarray):
        import av
        frames = np.asarray(frames, np.uint8)
        if self._stream is None:  # the size is known from the first chunk
            _, H, W, _ = frames.shape
            self._stream = self._container.add_stream("libx264", rate=self.fps)
            self._stream.width, self._stream.height, self._stream.pix_fmt = W, H, "yuv420p"
            self._stream.options = {"crf": "12"}
        for frame in frames:
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                self._container.mux(packet)
        self.num_frames += len(frames)

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None and self._stream is not None:
                for packet in self._stream.encode():  # flush the encoder's delayed frames
                    self._container.mux(packet)
        finally:
            self._container.close()
        if exc_type is None and self.num_frames:
            os.replace(self._tmp, self.path)
            return
        if os.path.exists(self._tmp):  # PyAV creates it only once it writes
            os.remove(self._tmp)
        if exc_type is None:
            raise ValueError(f"no frames written to {self.path}")


def write_mp4(path: str, video: np.ndarray, fps: int = 8):
    """H.264 mp4 of video uint8 [F, H, W, 3] (yuv420p, so height and width must be even)."""
    with Mp4Writer(path, fps) as writer:
        writer.write(video)


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


def square_windows(video: np.ndarray, frames: int, size: int, count: int) -> tuple[list[np.ndarray], list[int]]:
    """`count` evenly spaced windows of `frames` frames of video uint8 [F, H, W, 3], each
    centre-cropped square and area-resized to size x size: ([uint8 [frames, size, size, 3]], starts)."""
    from PIL import Image
    _, h, w, _ = video.shape
    s = min(h, w)
    video = video[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    clips, starts = [], []
    for k in range(count):
        start = k * (len(video) - frames) // max(count - 1, 1)
        clips.append(np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BOX))
                               for f in video[start:start + frames]]))
        starts.append(start)
    return clips, starts
