"""Reading and writing images and videos (PyAV for mp4, Pillow for images and GIFs), and
decoding one clip of a video (PyAV) for the video sources.

Videos are uint8 [F, H, W, 3]; images uint8 [H, W, 3]. PyAV and Pillow are imported inside the
functions that use them, so importing this module (and the sources) stays cheap.
"""
from __future__ import annotations

import io
import os

import numpy as np
from absl import logging

from pixeldance.data.folder import BadVideoError


def read_image(path: str, size: int | tuple[int, int] | None = None, *, name: str = "image") -> np.ndarray:
    """An RGB image as uint8 [H, W, 3]; resized (bilinear) to `size` when given: (height, width),
    or one int for size x size.

    Any bit depth and mode Pillow reads (`to_rgb8`): 16-bit images are scaled to 8 bits (by
    255/65535, not clipped), and an image with transparency (RGBA, LA, a palette or a colour key
    with a transparent entry) is composited on black, with one warning line naming `name` and
    the file. Raises FileNotFoundError / ValueError with one line naming the file.
    """
    from PIL import Image, UnidentifiedImageError
    if not os.path.exists(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            image = to_rgb8(im, f"{name} {path}")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        if image.shape[:2] != (height, width):
            image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR), np.uint8)
    return image


_SIXTEEN_BIT = 65535  # Pillow's 'I;16*' modes, and 'I' as 16-bit PNGs open in older Pillow
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb8(im, what: str = "image") -> np.ndarray:
    """A Pillow image as uint8 [H, W, 3], whatever its mode and bit depth.

    16-bit greyscale (modes 'I;16', 'I;16B', ... and 'I', taken as 0..65535) is scaled by
    255/65535 and rounded (Pillow's own conversion would clip every value above 255 to white);
    48- and 64-bit RGB(A) PNGs already open as 8-bit RGB(A) in Pillow (the high byte, within one
    level of the scaled value). An image with transparency (modes RGBA / LA / PA, or a palette /
    colour key with a transparent entry) is composited on black: each colour times its alpha, so
    fully transparent pixels become black; when any pixel is not fully opaque one warning line
    says so, naming `what` (e.g. '--first_frame a.png').
    """
    mode = im.mode
    if mode == "I" or mode.startswith("I;16"):
        grey = np.asarray(im).astype(np.float64)
        grey = np.round(np.clip(grey, 0, _SIXTEEN_BIT) * (255 / _SIXTEEN_BIT)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"))
        alpha = rgba[..., 3:].astype(np.float32) / 255
        see_through = float(np.mean(alpha < 1))
        if see_through:
            logging.warning("%s has transparency (mode %s): composited on black (%.1f %% of its pixels are "
                            "not fully opaque)", what, mode, 100 * see_through)
        return np.round(rgba[..., :3] * alpha).astype(np.uint8)
    return np.asarray(im.convert("RGB"), np.uint8)


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
            try:
                os.replace(self._tmp, self.path)
                return
            except OSError:  # e.g. the path is a folder: no partial file is left either way
                os.remove(self._tmp)
                raise
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


def encode_gif(video: np.ndarray, fps: int = 8, scale: int = 1) -> bytes:
    """uint8 [F, H, W, 3] -> an animated GIF, looping; `scale` repeats pixels so small videos are
    visible (TensorBoard shows it as an image: `train_lib.MetricWriter.gif`)."""
    from PIL import Image
    video = np.asarray(video, np.uint8)
    # Each frame gets its own 256-colour palette by Pillow's fast octree, at the video's own
    # resolution; the palette indices are then enlarged, not the RGB frames. Pillow's default
    # (median cut, on the enlarged frames) took 6 of the main job's 39 s of sampling, and on
    # decoded synthetic-world grids it mapped some object pixels 191 levels off (octree: at most
    # 11, mean error 3.6 against 2.7), 50x slower.
    frames = []
    for f in video:
        p = Image.fromarray(f).quantize(256, method=Image.Quantize.FASTOCTREE)
        if scale > 1:  # nearest: each palette index repeated scale x scale, the palette kept
            p = p.resize((p.width * scale, p.height * scale), Image.Resampling.NEAREST)
        frames.append(p)
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return out.getvalue()


def write_gif(path: str, video: np.ndarray, fps: int = 8, scale: int = 1):
    """`encode_gif` to `path`, written to `path + '.tmp.gif'` and renamed, so a failed write leaves
    no partial file."""
    tmp = path + ".tmp.gif"
    try:
        data = encode_gif(video, fps, scale)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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


# ---------------------------------------------------------------------------------------------
# Clips (PyAV): one clip of a video, decoding only the frames it needs. Used by both
# VideoFolderSource (files, pixeldance/data/video_folder.py) and TfdsVideoSource (stored bytes,
# pixeldance/data/tfds_source.py), so the two give the same clip of the same video.
# ---------------------------------------------------------------------------------------------

def check_clip_settings(num_frames: int, resolution: int, fps: float, stride: int):
    """One-line ValueError for settings no clip can have."""
    if num_frames < 1 or resolution < 1 or stride < 1 or fps < 0:
        raise ValueError(f"bad clip settings: num_frames={num_frames}, resolution={resolution}, "
                         f"stride={stride}, fps={fps}")


def check_video_file(path: str):
    """BadVideoError if the file at `path` is missing or empty."""
    if not os.path.exists(path):
        raise BadVideoError("missing", path)
    if os.path.getsize(path) == 0:
        raise BadVideoError("empty", path)


def stream_info(container, stream, name: str) -> tuple[float, int]:
    """(frame rate, frame count) from the container's metadata; BadVideoError naming `name` if
    unknown."""
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    if rate <= 0:
        raise BadVideoError("corrupt", name, "unknown frame rate")
    if stream.duration:
        duration = stream.duration * float(stream.time_base)
    elif container.duration:
        duration = container.duration / 1e6
    else:
        duration = 0.0
    count = int(stream.frames) or int(round(duration * rate))
    if count <= 0:
        raise BadVideoError("corrupt", name, "no frames")
    return rate, count


def decode_clip(file, name: str, rng: np.random.Generator, *, num_frames: int, fps: float = 0.0,
                stride: int = 1) -> list[np.ndarray]:
    """The frames of one clip of `file` (a path, or a binary file object such as io.BytesIO of a
    video's bytes), uint8 [H, W, 3] each, at their native size: `num_frames` frames either at a
    target `fps` (for each target time the nearest source frame) or (fps=0) every `stride`-th
    source frame, from a start drawn from `rng`. Only the frames needed are decoded: the reader
    seeks to the keyframe before the clip and stops once the clip is complete. BadVideoError
    naming `name` if there is no such clip (corrupt, truncated or too short)."""
    import av  # PyAV only when clips are decoded: importing the sources stays cheap
    try:
        with av.open(file) as container:
            if not container.streams.video:
                raise BadVideoError("corrupt", name, "no video stream")
            return _pick_frames(container, container.streams.video[0], name, rng, num_frames, fps, stride)
    except BadVideoError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError, ZeroDivisionError) as e:
        raise BadVideoError("corrupt", name, f"{type(e).__name__}: {e}".splitlines()[0]) from None


def _pick_frames(container, stream, name, rng, num_frames, fps, stride) -> list[np.ndarray]:
    F = num_frames
    rate, count = stream_info(container, stream, name)
    tb = float(stream.time_base)
    if fps > 0:  # target times (seconds from the first frame) at fps
        span = (F - 1) / fps  # seconds from the first to the last frame of the clip
        last = (count - 1) / rate  # time of the last source frame
        if span > last + 1e-6:
            raise BadVideoError("too_short", name, f"{count} frames at {rate:.3g} fps < {F} at {fps:g} fps")
        t0 = rng.uniform() * (last - span)
        times = t0 + np.arange(F) / fps
    else:
        need = (F - 1) * stride + 1
        if count < need:
            raise BadVideoError("too_short", name, f"{count} frames < {need} (stride {stride})")
        start = int(rng.integers(0, count - need + 1))
        times = (start + stride * np.arange(F)) / rate
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
        raise BadVideoError("too_short" if out else "corrupt", name,
                            f"decoded {len(out)} of {F} frames")
    return out


def probe_video(path: str) -> list:
    """[frame count, frame rate, height, width] of the video at `path` from the container (no
    frames decoded); BadVideoError if missing, empty or unreadable."""
    import av  # PyAV only when headers are read: importing the sources stays cheap
    check_video_file(path)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise BadVideoError("corrupt", path, "no video stream")
            stream = container.streams.video[0]
            rate, count = stream_info(container, stream, path)
            h, w = int(stream.codec_context.height), int(stream.codec_context.width)
    except BadVideoError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError, ZeroDivisionError) as e:
        raise BadVideoError("corrupt", path, f"{type(e).__name__}: {e}".splitlines()[0]) from None
    if h < 1 or w < 1:
        raise BadVideoError("corrupt", path, f"frame size {w}x{h}")
    return [count, rate, h, w]


def most_clip_frames(count: int, rate: float, *, fps: float = 0.0, stride: int = 1) -> int:
    """The most frames one clip of a video of `count` frames at `rate` fps can have at a target
    `fps` (0: every `stride`-th frame)."""
    if fps > 0:  # as in decode_clip: (F - 1) / fps must fit in the last frame's time
        return int(np.floor((count - 1) / rate * fps + 1e-6)) + 1
    return (int(count) - 1) // stride + 1
