"""The dataset registry: the one place that turns config.data into a random-access source.

    config.data.name      the source
    'shapes'              the synthetic world (pixeldance/data/synthetic.py)
    'video_folder'        clips of a folder of videos (video_folder.py)
    'image_folder'        images of a folder as one-frame videos (image_folder.py)
    'ucf101' | 'msrvtt'   clips of the TFDS-built datasets (tfds_source.py)
    'mixture'             weighted components, each one of the above (mixture.py)

`make_source(config, split, size, mixed_shapes=...)` gives the source; `log_summary(source,
stage)` logs a folder (or mixture) source's skip summary.
"""
from __future__ import annotations

from absl import logging

from pixeldance.data import buckets, image_folder, mixture, synthetic, tfds_source, video_folder


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
        return _image_folder(config, split, size)
    if name == "mixture":
        return _mixture(config, split, size, mixed_shapes=mixed_shapes)
    if name == "shapes":
        return synthetic.ShapesSource(split, size=size if size is not None else 1_000_000,
                                      config=synthetic.world_config(config))
    if name == "video_folder":
        if not config.data.get("root"):
            raise ValueError("config.data.root must name the video folder (config.data.name='video_folder')")
        return _video_folder(config, split, size)
    if name in ("ucf101", "msrvtt"):
        if not config.data.get("root"):
            raise ValueError(f"config.data.root must name the TFDS data_dir (config.data.name={name!r})")
        return _tfds(config, split, size)
    raise ValueError(f"unknown dataset config.data.name={name!r}; expected 'shapes', 'video_folder', "
                     f"'ucf101', 'msrvtt', 'image_folder' or 'mixture'")


def log_summary(source, stage: str):
    """Logs (and prints) a folder (or mixture) source's skip summary; nothing for other sources."""
    if hasattr(source, "summary_line"):
        line = f"{stage}: {source.summary_line()}"
        logging.info(line)
        print(line)


# ---------------------------------------------------------------------------------------------
# Each kind from config.data.
# ---------------------------------------------------------------------------------------------

def _video_folder(config, split: str = "train", size: int | None = None) -> video_folder.VideoFolderSource:
    d = config.data
    return video_folder.VideoFolderSource(
        d.root, d.get("captions", "captions.csv"), num_frames=d.num_frames, resolution=d.resolution,
        fps=d.get("fps", 0.0), stride=d.get("stride", 1), crop=d.get("crop", "center"),
        seed=d.get("world_seed", 0), split=split, size=size, on_error=d.get("on_error", "skip"),
        meta_cache=d.get("meta_cache", ""), allow_outside_root=d.get("allow_outside_root", False))


def _image_folder(config, split: str = "train", size: int | None = None) -> image_folder.ImageFolderSource:
    """The ImageFolderSource of config.data (root, captions, resolution, crop, on_error,
    meta_cache, allow_outside_root; world_seed seeds the random crops)."""
    d = config.data
    if not d.get("root"):
        raise ValueError("config.data.root must name the image folder (config.data.name='image_folder')")
    return image_folder.ImageFolderSource(
        d.root, d.get("captions", "captions.csv"), resolution=d.resolution, crop=d.get("crop", "center"),
        seed=d.get("world_seed", 0), split=split, size=size, on_error=d.get("on_error", "skip"),
        meta_cache=d.get("meta_cache", ""), allow_outside_root=d.get("allow_outside_root", False))


def _tfds(config, split: str = "train", size: int | None = None) -> tfds_source.TfdsVideoSource:
    """The source of config.data.name ('ucf101' | 'msrvtt') in the data_dir config.data.root."""
    d = config.data
    tfds_split = d.get("train_split", "train") if split == "train" else d.get("heldout_split", "test")
    return tfds_source.TfdsVideoSource(
        d.root, d.name, tfds_split, ucf101_split=d.get("ucf101_split", 1), num_frames=d.num_frames,
        resolution=d.resolution, fps=d.get("fps", 0.0), stride=d.get("stride", 1), crop=d.get("crop", "center"),
        seed=d.get("world_seed", 0), split=split, size=size, on_error=d.get("on_error", "skip"))


def _mixture(config, split: str = "train", size: int | None = None, *, mixed_shapes: bool = False):
    """The mixture of config.data.mixture (see pixeldance/data/mixture.py), each component made by
    `make_source` from `mixture.component_config`. mixed_shapes=False keeps only the components
    whose items have the first component's shape (a lone one is returned as itself); True keeps
    them all (for bucketed batches)."""
    spec = mixture.parse_mixture(config.data.get("mixture", ""))
    names = [n for n, _ in spec]
    parts = []
    for n in names:
        try:
            parts.append(make_source(mixture.component_config(config, n), split, size))
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"mixture component {n!r}: {e}") from None
    weights = [w for _, w in spec]
    if not mixed_shapes:
        shapes = [buckets.item_shape(p) for p in parts]
        keep = [i for i, s in enumerate(shapes) if s == shapes[0]]
        if len(keep) < len(parts):
            logging.info("mixture: one-shape use reads %s (items %s); %s differ in shape and are read "
                         "only by bucketed training", [names[i] for i in keep], shapes[0],
                         [n for i, n in enumerate(names) if i not in keep])
        names, parts, weights = ([x[i] for i in keep] for x in (names, parts, weights))
        if len(parts) == 1:
            return parts[0]
    return mixture.MixtureSource(parts, weights, seed=config.data.get("world_seed", 0), size=size, names=names)
