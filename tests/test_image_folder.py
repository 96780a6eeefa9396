"""Image folders (pixeldance/data/image_folder.py) and weighted mixtures (pixeldance/data/mixture.py)."""
import json
import logging
import os
import shutil

import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageOps

from pixeldance import configs
from pixeldance.data import image_folder, mixture, pipeline, sources, transforms, video_folder, video_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_csv(root, rows, name="captions.csv"):
    with open(os.path.join(root, name), "w") as f:
        f.write("path,caption\n" + "".join(r + "\n" for r in rows))


def _place(src, dst):
    """A copy of file or folder `src` at `dst` (a symlink to it would point outside the data
    root, which the folder sources refuse: pixeldance/data/paths.py)."""
    (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)


def _ramp(h, w, blue=0):
    """uint8 [h, w, 3]: red a row ramp, green a column ramp, blue constant."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (np.arange(h) * 255 // max(h - 1, 1))[:, None]
    img[..., 1] = (np.arange(w) * 255 // max(w - 1, 1))[None, :]
    img[..., 2] = blue
    return img


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Good images of several formats and modes, and every kind of bad image and row."""
    root = tmp_path_factory.mktemp("images")
    os.makedirs(root / "sub")
    Image.fromarray(_ramp(24, 40, blue=10)).save(root / "wide.png")
    Image.fromarray(_ramp(40, 24, blue=0)[..., 0]).save(root / "sub" / "grey.jpg", quality=95)
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0], rgba[:, :16, 3] = 200, 255  # left half opaque red, right half transparent
    Image.fromarray(rgba, "RGBA").save(root / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 20 x 40 (h x w), shown rotated: 40 x 20
    Image.fromarray(_ramp(20, 40, blue=90)).save(root / "rotated.jpg", exif=exif, quality=95)
    png = open(root / "wide.png", "rb").read()
    (root / "empty.png").write_bytes(b"")
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "noise.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8).tobytes())
    (root / "text.png").write_text("not an image\n")
    _write_csv(root, [
        'wide.png,"a wide, ramped image"',   # entry 0 (line 2)
        "sub/grey.jpg,a grey image",         # 1
        "empty.png,zero bytes",              # 2
        "truncated.png,cut short",           # 3
        "noise.jpg,random bytes",            # 4
        "oops",                              # malformed (line 7)
        "text.png,a text file",              # 5
        "missing.png,not there",             # 6
        "alpha.png,half transparent",        # 7
        "rotated.jpg,turned by exif",        # 8
        ",no path",                          # malformed (line 12)
    ])
    return str(root)


@pytest.fixture(scope="module")
def clean_images(tmp_path_factory):
    """Three good images, blue 0 / 100 / 200."""
    root = tmp_path_factory.mktemp("clean_images")
    for k in range(3):
        Image.fromarray(_ramp(16, 24, blue=100 * k)).save(root / f"{k}.png")
    _write_csv(root, [f"{k}.png,image {k}" for k in range(3)])
    return str(root)


def test_images_are_one_frame_videos(image_dir):
    src = image_folder.ImageFolderSource(image_dir, resolution=16, size=20)
    assert len(src) == 20 and src.item_shape == (1, 16, 16)
    wide = src[0]
    assert wide["video"].shape == (1, 16, 16, 3) and wide["video"].dtype == np.uint8
    assert wide["caption"] == "a wide, ramped image" and wide["index"] == 0
    # Short side to 16 (area average), centre crop: 24 x 40 -> 16 x 27, columns 5..20.
    ref = np.asarray(Image.open(os.path.join(image_dir, "wide.png")).convert("RGB").resize((27, 16), Image.BOX))
    np.testing.assert_array_equal(wide["video"][0], ref[:, 5:21])
    grey = src[1]["video"][0].astype(int)
    assert np.abs(grey[..., 0] - grey[..., 1]).max() == 0 and np.abs(grey[..., 0] - grey[..., 2]).max() == 0
    alpha = src[7]["video"][0].astype(int)  # transparent pixels over white
    assert (np.abs(alpha[:, :6] - [200, 0, 0]).max() <= 2) and alpha[:, 10:].min() >= 253
    # EXIF orientation applied: the upright image is 40 x 20 (tall), read as the PIL reference.
    upright = np.asarray(ImageOps.exif_transpose(Image.open(os.path.join(image_dir, "rotated.jpg"))).convert("RGB"))
    assert upright.shape == (40, 20, 3)
    ref = transforms.resize_crop([upright], 16, 16)
    np.testing.assert_array_equal(src[8]["video"], ref)
    # Read at a bucket's shape (1, H, W); more than one frame is refused.
    assert src.read(0, (1, 16, 24))["video"].shape == (1, 16, 24, 3)
    with pytest.raises(ValueError, match="one-frame"):
        src.read(0, (5, 16, 16))


def test_random_crop_deterministic_by_seed(clean_images):
    kw = dict(resolution=8, size=12, crop="random")
    a, b = (image_folder.ImageFolderSource(clean_images, seed=1, **kw) for _ in range(2))
    c = image_folder.ImageFolderSource(clean_images, seed=2, **kw)
    for i in (5, 0, 11, 3):
        np.testing.assert_array_equal(a[i]["video"], b[i]["video"])
    left_green = lambda s: [s[i]["video"][0, :, 0, 1].mean() for i in range(12)]  # column ramp
    assert np.ptp(left_green(a)) > 10  # the crop offset varies with the item
    assert any(not np.array_equal(a[i]["video"], c[i]["video"]) for i in range(12))
    centre = image_folder.ImageFolderSource(clean_images, resolution=8, size=12)
    assert np.ptp(left_green(centre)) == 0
    assert [centre[i]["caption"] for i in range(4)] == ["image 0", "image 1", "image 2", "image 0"]


def test_bad_images_and_rows_skipped_counted_logged(image_dir, caplog):
    caplog.set_level(logging.WARNING)
    src = image_folder.ImageFolderSource(image_dir, resolution=8)
    assert len(src) == 9
    s = src.summary()
    assert s["skipped"] == {"malformed_row": 2}
    assert s["examples"]["malformed_row"][0].endswith("captions.csv:7: expected 2 fields (path, caption), got 1")
    assert "captions.csv:12" in s["examples"]["malformed_row"][1]
    captions = [src[i]["caption"] for i in range(len(src))]
    # Entries 2-6 are bad and replaced by the next good entry (7, alpha.png).
    assert captions == ["a wide, ramped image", "a grey image"] + ["half transparent"] * 6 + ["turned by exif"]
    s = src.summary()
    assert s["skipped"] == {"malformed_row": 2, "empty": 1, "corrupt": 3, "missing": 1}
    assert sorted(s["examples"]["corrupt"]) == [os.path.join(image_dir, n) for n in ("noise.jpg", "text.png", "truncated.png")]
    src[3], src[4]
    assert src.summary()["skipped"]["corrupt"] == 3  # counted once per file
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for name in ("empty.png", "truncated.png", "noise.jpg", "text.png", "missing.png", "captions.csv:7"):
        assert name in logged
    line = src.summary_line()
    assert line.startswith("image_folder ") and "corrupt 3" in line and "\n" not in line
    # The same folder described by JSONL, with a malformed line.
    jsonl = os.path.join(image_dir, "captions.jsonl")
    with open(jsonl, "w") as f:
        f.write(json.dumps(dict(path="wide.png", caption="w")) + "\n[1, 2]\n"
                + json.dumps(dict(path="noise.jpg", caption="n")) + "\n")
    src = image_folder.ImageFolderSource(image_dir, "captions.jsonl", resolution=8)
    assert [src[i]["caption"] for i in range(2)] == ["w", "w"]
    assert src.summary()["skipped"] == {"malformed_row": 1, "corrupt": 1}


@pytest.mark.parametrize("name,kind", [("empty.png", "empty"), ("truncated.png", "corrupt"),
                                       ("noise.jpg", "corrupt"), ("text.png", "corrupt"),
                                       ("missing.png", "missing")])
def test_raise_names_the_file(image_dir, tmp_path, name, kind):
    if name != "missing.png":
        _place(os.path.join(image_dir, name), tmp_path / name)
    _write_csv(tmp_path, [f"{name},x"])
    src = image_folder.ImageFolderSource(str(tmp_path), resolution=8, on_error="raise")
    with pytest.raises(image_folder.BadImageError) as e:
        src[0]
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(kind) and os.path.join(str(tmp_path), name) in msg


def test_raise_on_malformed_row_and_bad_settings(image_dir, tmp_path):
    with pytest.raises(ValueError, match=r"^malformed caption row .*captions.csv:7: expected 2 fields") as e:
        image_folder.ImageFolderSource(image_dir, on_error="raise")
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="image folder not found: .*nope"):
        image_folder.ImageFolderSource(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="crop"):
        image_folder.ImageFolderSource(image_dir, crop="middle")
    _write_csv(tmp_path, ["gone.png,x"])
    with pytest.raises(ValueError, match="no readable image"):
        image_folder.ImageFolderSource(str(tmp_path))[0]


# ---------------------------------------------------------------------------------------------
# Mixtures.
# ---------------------------------------------------------------------------------------------

def _colour_source(tmp_path, name, blue, count=3):
    root = tmp_path / name
    os.makedirs(root)
    for k in range(count):
        Image.fromarray(np.full((8, 8, 3), blue, np.uint8)).save(root / f"{k}.png")
    _write_csv(root, [f"{k}.png,{name} {k}" for k in range(count)])
    return image_folder.ImageFolderSource(str(root), resolution=8)


def test_mixture_index_map_is_exact_and_deterministic(tmp_path):
    a, b, c = (_colour_source(tmp_path, n, v, count) for n, v, count in (("a", 0, 3), ("b", 100, 5), ("c", 200, 2)))
    default = mixture.MixtureSource([a, b, c], [5, 3, 2], seed=7)
    assert len(default) == 17  # about enough to read each component once: b's 5 items at 0.3
    mix = mixture.MixtureSource([a, b, c], [5, 3, 2], seed=7, size=5000, names=["a", "b", "c"])
    assert mix.block == 1000 and mix.counts.tolist() == [500, 300, 200]
    comp, idx = mix.locate(np.arange(3000))
    for blk in range(3):  # exact proportions in every block, in a block-specific order
        assert np.bincount(comp[blk * 1000:(blk + 1) * 1000], minlength=3).tolist() == [500, 300, 200]
    assert not np.array_equal(comp[:1000], comp[1000:2000])
    # Each component is read in order: every item once before any twice.
    for k, n in enumerate((3, 5, 2)):
        np.testing.assert_array_equal(idx[comp == k], np.arange((comp == k).sum()) % n)
    # A pure function of (seed, k), whatever the access order; another seed, another order.
    again = mixture.MixtureSource([a, b, c], [5, 3, 2], seed=7, size=5000)
    sel = np.array([2999, 5, 1500, 0, 4999])
    for got, want in zip(again.locate(sel), mix.locate(sel)):
        np.testing.assert_array_equal(got, want)
    other = mixture.MixtureSource([a, b, c], [5, 3, 2], seed=8, size=5000)
    assert not np.array_equal(other.locate(np.arange(1000))[0], comp[:1000])
    item = mix[1234]
    assert set(item) == {"video", "caption", "index", "source"} and item["index"] == 1234
    assert item["caption"].startswith("abc"[item["source"]]) and item["video"][0, 0, 0, 2] == 100 * item["source"]
    # A tiny weight enlarges the block so that it still gets an item per block.
    tiny = mixture.MixtureSource([a, b], [0.9995, 0.0005])
    assert tiny.block == 2000 and tiny.counts.tolist() == [1999, 1]
    for bad in ([1, 0, 1], [1, -2, 1], [1, float("nan"), 1], [1, 1]):
        with pytest.raises(ValueError, match="weight"):
            mixture.MixtureSource([a, b, c], bad)


def test_mixture_stream_weights_determinism_and_resume(tmp_path):
    a, b = _colour_source(tmp_path, "a", 0), _colour_source(tmp_path, "b", 200)
    mix = mixture.MixtureSource([a, b], [0.7, 0.3], seed=0, size=100_000)
    make = lambda seed=3: pipeline.make_batches(mix, batch_size=16, seed=seed, process_index=0, process_count=1)
    it = make()
    batches = [next(it) for _ in range(50)]
    share = np.mean(np.concatenate([b_["source"] for b_ in batches]) == 1)
    assert abs(share - 0.3) < 0.05, share  # 800 items: standard deviation 0.016
    for b_ in batches:  # the colour is the component's
        np.testing.assert_array_equal(b_["video"][:, 0, 0, 0, 2], 200 * b_["source"])
    # Deterministic: a second iterator gives the same stream; another seed another one.
    it2 = make()
    for want in batches[:5]:
        np.testing.assert_array_equal(next(it2)["index"], want["index"])
    assert not np.array_equal(next(make(seed=4))["index"], batches[0]["index"])
    # Resumes exactly from get_state / set_state.
    it = make()
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    resumed = make()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["index"], want["index"])
        np.testing.assert_array_equal(got["source"], want["source"])
        np.testing.assert_array_equal(got["video"], want["video"])


def test_parse_mixture():
    assert mixture.parse_mixture("videos:0.8, images:0.2") == [("videos", 0.8), ("images", 0.2)]
    for spec, match in (("", "no components"), ("a", "NAME:WEIGHT"), ("a:x", "NAME:WEIGHT"),
                        ("a:0", "positive"), ("a:1,a:2", "twice"), (":1", "NAME:WEIGHT")):
        with pytest.raises(ValueError, match=match):
            mixture.parse_mixture(spec)


def test_mixture_from_config(image_dir, clean_images, tmp_path):
    """make_source(name='mixture'): components from config.data.sources; one-shape stages get
    the components shaped like the first, bucketed training all of them."""
    videos = tmp_path / "videos"
    os.makedirs(videos)
    frames = np.zeros((12, 16, 24, 3), np.uint8)
    frames[..., 0] = (20 * np.arange(12))[:, None, None]
    video_io.write_mp4(str(videos / "a.mp4"), frames, fps=8)
    _write_csv(videos, ["a.mp4,a clip"])
    config = configs.load_config(os.path.join(REPO, "experiments", "video_image_mix.py") + ":runlocal")
    config.data.sources.videos.root = str(videos)
    config.data.sources.images.root = clean_images
    whole = sources.make_source(config, "train", size=50, mixed_shapes=True)
    assert isinstance(whole, mixture.MixtureSource) and whole.names == ["videos", "images"]
    assert whole.item_shapes() == [(9, 32, 32), (1, 32, 32)] and whole.item_shape is None
    assert np.allclose(whole.weights, [0.8, 0.2]) and len(whole) == 50
    shapes = {whole[k]["source"]: whole[k]["video"].shape for k in range(10)}
    assert shapes == {0: (9, 32, 32, 3), 1: (1, 32, 32, 3)}
    assert "videos: video_folder" in whole.summary_line() and "images: image_folder" in whole.summary_line()
    one = sources.make_source(config, "train", size=8)  # the latent cache's view: the videos
    assert isinstance(one, video_folder.VideoFolderSource) and len(one) == 8
    # Two components of one shape stay a mixture in the one-shape view.
    config.data.mixture = "images:1,more:3"
    config.data.sources.videos.root = image_dir  # unused now
    with pytest.raises(ValueError, match="^mixture component 'more': unknown dataset config.data.name='more'"):
        sources.make_source(config, "train", size=10)  # no sources entry: its kind is its name
    config.data.sources.images.root = ""
    with pytest.raises(ValueError, match="^mixture component 'images': config.data.root must name the image folder"):
        sources.make_source(config, "train", size=10)
    config.data.sources.images.root = clean_images
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.data.sources.more = dict(name="image_folder", root=image_dir)
    two = sources.make_source(cfg, "train", size=10)
    assert isinstance(two, mixture.MixtureSource) and two.item_shape == (1, 32, 32)
    cfg.data.sources.more.rot = "x"
    with pytest.raises(ValueError, match="config.data.sources.more.rot"):
        sources.make_source(cfg, "train")
    cfg.data.sources.more = dict(name="mixture")
    with pytest.raises(ValueError, match="itself a mixture"):
        sources.make_source(cfg, "train")
    # A plain image folder by name.
    cfg = configs.load_config(os.path.join(REPO, "experiments", "base.py") + ":runlocal")
    cfg.data.name, cfg.data.root = "image_folder", clean_images
    src = sources.make_source(cfg, "heldout", size=4)
    assert isinstance(src, image_folder.ImageFolderSource) and src[3]["video"].shape == (1, 32, 32, 3)
