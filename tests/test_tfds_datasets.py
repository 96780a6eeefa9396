"""TFDS builders for UCF-101 and MSR-VTT (pixeldance/data/tfds_datasets.py) and their clip
source (pixeldance/data/tfds_source.py), on small fake archives laid out like the official ones."""
import csv
import importlib.util
import json
import os
import pickle
import shutil
import sys
import zipfile

import numpy as np
import pytest

from pixeldance.data import folder, pipeline, sources, tfds_datasets, tfds_source, video_folder, video_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F_SRC, H_SRC, W_SRC, FPS_SRC = 20, 48, 64, 10

# UCF-101: (class folder, file name, list) -- the lists name HandstandPushups' files with a
# capital S, as the official ones do; train in split 1 = test in split 2 and the other way round.
UCF_CLASSES = ("ApplyEyeMakeup", "HandstandPushups", "YoYo")
UCF_VIDEOS = [
    ("ApplyEyeMakeup", "v_ApplyEyeMakeup_g01_c01.avi", "test"),
    ("ApplyEyeMakeup", "v_ApplyEyeMakeup_g08_c01.avi", "train"),
    ("HandstandPushups", "v_HandStandPushups_g01_c01.avi", "test"),
    ("HandstandPushups", "v_HandStandPushups_g08_c01.avi", "train"),
    ("YoYo", "v_YoYo_g01_c01.avi", "test"),
    ("YoYo", "v_YoYo_g08_c01.avi", "train"),
    ("YoYo", "v_YoYo_g09_c02.avi", "train"),
]
# MSR-VTT: video numbers across the official ranges (train < 6513 <= validation < 7010 <= test).
MSRVTT_NUMBERS = {0: "train", 1: "train", 6513: "validation", 7010: "test", 7011: "test"}


def _frames(num=F_SRC, h=H_SRC, w=W_SRC, blue=0):
    """Frame k: red = 8k (the frame index), green a column ramp, blue constant (tells videos apart)."""
    v = np.zeros((num, h, w, 3), np.uint8)
    v[..., 0] = (8 * np.arange(num))[:, None, None]
    v[..., 1] = (np.arange(w) * 255 // (w - 1))[None, None, :]
    v[..., 2] = blue
    return v


def _indices(video):
    return np.round(video[..., 0].reshape(len(video), -1).mean(1) / 8).astype(int)


def _write_avi(path, video, fps=FPS_SRC):
    """MPEG-4 part 2 in AVI (UCF-101's container and codec family)."""
    import av
    with av.open(path, "w", format="avi") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        stream.bit_rate = 4_000_000
        for frame in video:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())


def _zip_folder(zip_path, folder, arcroot):
    """Zips `folder` as `arcroot/...` (stored: the videos are compressed already)."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as z:
        for dirpath, _, files in os.walk(folder):
            for f in sorted(files):
                full = os.path.join(dirpath, f)
                z.write(full, os.path.join(arcroot, os.path.relpath(full, folder)))


def _ucf_lists(folder):
    """ucfTrainTestlist/ as officially laid out (CRLF lines; test lists without labels)."""
    os.makedirs(folder)
    with open(os.path.join(folder, "classInd.txt"), "w", newline="") as f:
        f.write("".join(f"{i + 1} {c}\r\n" for i, c in enumerate(UCF_CLASSES)))
    for n, train_is in ((1, "train"), (2, "test")):
        train = [(c, v) for c, v, s in UCF_VIDEOS if s == train_is]
        test = [(c, v) for c, v, s in UCF_VIDEOS if s != train_is]
        with open(os.path.join(folder, f"trainlist0{n}.txt"), "w", newline="") as f:
            f.write("".join(f"{c}/{v} {UCF_CLASSES.index(c) + 1}\r\n" for c, v in train))
        with open(os.path.join(folder, f"testlist0{n}.txt"), "w", newline="") as f:
            f.write("".join(f"{c}/{v}\r\n" for c, v in test))
    for n in (3,):
        shutil.copy(os.path.join(folder, "trainlist01.txt"), os.path.join(folder, f"trainlist0{n}.txt"))
        shutil.copy(os.path.join(folder, "testlist01.txt"), os.path.join(folder, f"testlist0{n}.txt"))


@pytest.fixture(scope="module")
def ucf_files(tmp_path_factory):
    """Extracted official UCF-101 files: UCF-101/<Class>/*.avi (video k has blue 30k) and
    ucfTrainTestlist/; plus the two zips (UCF101.zip, the official splits zip)."""
    root = tmp_path_factory.mktemp("ucf_files")
    for k, (cls, name, _) in enumerate(UCF_VIDEOS):
        os.makedirs(root / "UCF-101" / cls, exist_ok=True)
        _write_avi(str(root / "UCF-101" / cls / name), _frames(blue=30 * k))
    _ucf_lists(str(root / "ucfTrainTestlist"))
    _zip_folder(root / "UCF101.zip", root / "UCF-101", "UCF-101")
    _zip_folder(root / "UCF101TrainTestSplits-RecognitionTask.zip", root / "ucfTrainTestlist", "ucfTrainTestlist")
    return root


@pytest.fixture(scope="module")
def ucf_built(ucf_files, tmp_path_factory):
    """UCF-101 split 1 built from the official zips (videos zipped too) into a data_dir."""
    manual = tmp_path_factory.mktemp("ucf_manual")
    for name in ("UCF101.zip", "UCF101TrainTestSplits-RecognitionTask.zip"):
        os.symlink(ucf_files / name, manual / name)
    data_dir = tmp_path_factory.mktemp("ucf_data")
    b = tfds_datasets.build("ucf101", str(manual), str(data_dir))
    return str(data_dir), b


def _msrvtt_json(numbers, with_split, sentences_key="sentences", id_key="video_id"):
    videos = [dict(video_id=f"video{n}", id=n, category=n % 20, url="https://example.invalid")
              | (dict(split={"validation": "validate"}.get(s, s)) if with_split else {})
              for n, s in numbers.items()]
    sentences = [{id_key: f"video{n}", "caption": f"clip {n} caption {j}", "sen_id": 2 * n + j}
                 for n in numbers for j in range(2)]
    return dict(info=dict(year="2016"), videos=videos, **{sentences_key: sentences})


@pytest.fixture(scope="module")
def msrvtt_manual(tmp_path_factory):
    """MSRVTT.zip as commonly distributed: MSRVTT/videos/all/videoN.mp4 (blue = N % 250) and
    MSRVTT/annotation/MSR_VTT.json (COCO-like, no splits: the official ranges apply)."""
    root = tmp_path_factory.mktemp("msrvtt_manual")
    with zipfile.ZipFile(root / "MSRVTT.zip", "w") as z:
        for n in MSRVTT_NUMBERS:
            path = str(root / f"video{n}.mp4")
            video_io.write_mp4(path, _frames(blue=n % 250), fps=FPS_SRC)
            z.write(path, f"MSRVTT/videos/all/video{n}.mp4")
            os.remove(path)
        z.writestr("MSRVTT/annotation/MSR_VTT.json",
                   json.dumps(_msrvtt_json(MSRVTT_NUMBERS, False, "annotations", "image_id")))
    return root


@pytest.fixture(scope="module")
def msrvtt_built(msrvtt_manual, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("msrvtt_data")
    return str(data_dir), tfds_datasets.build("msrvtt", str(msrvtt_manual), str(data_dir))


# ---------------------------------------------------------------------------------------------
# UCF-101.
# ---------------------------------------------------------------------------------------------

def test_ucf101_splits_labels_and_bytes(ucf_built, ucf_files):
    data_dir, b = ucf_built
    assert "tensorflow" not in sys.modules  # built and read without TensorFlow
    assert b.data_path.name == "1.0.0" and b.data_path.parent.name == "split1"
    assert {s: i.num_examples for s, i in b.info.splits.items()} == {"train": 4, "test": 3}
    assert any(f.endswith(".array_record-00000-of-00001") for f in os.listdir(b.data_path))
    assert b.info.features["label"].names == list(UCF_CLASSES)
    assert b.skips.line("x") == "x: nothing skipped"
    for split in ("train", "test"):
        records = b.as_data_source(split)
        got = {}
        for r in records:
            path = r["path"].decode()
            cls, name = path.split("/")
            assert UCF_CLASSES[r["label"]] == cls
            assert r["video"] == (ucf_files / "UCF-101" / cls / name).read_bytes()  # the original bytes
            got[path] = split
        assert got == {f"{c}/{v}": split for c, v, s in UCF_VIDEOS if s == split}


def test_ucf101_clips_equal_video_folder_clips(ucf_built, ucf_files, tmp_path):
    """Item i of the TFDS source is the clip VideoFolderSource makes of the same file."""
    data_dir, _ = ucf_built
    kw = dict(num_frames=5, resolution=16, stride=2, crop="random", seed=3, split="heldout", size=6)
    src = tfds_source.TfdsVideoSource(data_dir, "ucf101", **kw)
    assert src.tfds_split == "test" and len(src) == 6 and len(src._entries) == 3
    with open(tmp_path / "captions.csv", "w", newline="") as f:  # the records' order
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for e in range(3):
            w.writerow([os.path.join(ucf_files, "UCF-101", src.record(e)["path"].decode()), "x"])
    # Absolute paths to the files elsewhere: read only with allow_outside_root (data/paths.py).
    folder = video_folder.VideoFolderSource(str(tmp_path), allow_outside_root=True, **kw)
    for i in range(6):
        item = src[i]
        assert item["index"] == i and item["video"].shape == (5, 16, 16, 3) and item["video"].dtype == np.uint8
        np.testing.assert_array_equal(item["video"], folder[i]["video"])
        np.testing.assert_array_equal(np.diff(_indices(item["video"])), 2)
        cls = src.record(i % 3)["path"].decode().split("/")[0]
        assert item["caption"] == tfds_datasets.class_caption(cls)
    assert {src[i]["caption"] for i in range(3)} == {"apply eye makeup", "handstand pushups", "yo yo"}
    assert src.summary()["skipped"] == {}
    # Pickled for grain worker processes: no open files travel, reads agree.
    copy = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(copy[4]["video"], src[4]["video"])


def test_ucf101_other_layouts_and_split_number(ucf_files, tmp_path):
    """The extracted folders instead of the zips; official list 2 (train and test swapped)."""
    manual = tmp_path / "manual"
    os.makedirs(manual)
    for name in ("UCF-101", "ucfTrainTestlist"):
        os.symlink(ucf_files / name, manual / name)
    b = tfds_datasets.build("ucf101", str(manual), str(tmp_path / "data"), ucf101_split=2)
    assert b.data_path.parent.name == "split2"
    assert {s: i.num_examples for s, i in b.info.splits.items()} == {"train": 3, "test": 4}
    src = tfds_source.TfdsVideoSource(str(tmp_path / "data"), "ucf101", "train", ucf101_split=2,
                                      num_frames=3, resolution=8)
    assert len(src) == 3 and src[0]["video"].shape == (3, 8, 8, 3)
    with pytest.raises(FileNotFoundError, match=r"ucf101 is not built .*--ucf101_split=3$"):
        tfds_source.TfdsVideoSource(str(tmp_path / "data"), "ucf101", ucf101_split=3)
    with pytest.raises(ValueError, match=r"unknown split 'validation' of ucf101 .* it has \['test', 'train'\]"):
        tfds_source.TfdsVideoSource(str(tmp_path / "data"), "ucf101", "validation", ucf101_split=2)


def test_ucf101_rar_is_extracted_once(ucf_files, tmp_path, monkeypatch):
    """UCF101.rar goes through the optional rarfile package (a stand-in here: no unrar in tests)."""
    calls = []

    class FakeRar:
        def __init__(self, path):
            assert path.endswith("UCF101.rar")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def extractall(self, dest):
            calls.append(dest)
            shutil.copytree(ucf_files / "UCF-101", os.path.join(dest, "UCF-101"))

    fake = type(sys)("rarfile")
    fake.RarFile, fake.Error = FakeRar, RuntimeError
    monkeypatch.setitem(sys.modules, "rarfile", fake)
    manual = tmp_path / "manual"
    os.makedirs(manual)
    (manual / "UCF101.rar").write_bytes(b"Rar!")
    os.symlink(ucf_files / "UCF101TrainTestSplits-RecognitionTask.zip",
               manual / "UCF101TrainTestSplits-RecognitionTask.zip")
    b = tfds_datasets.build("ucf101", str(manual), str(tmp_path / "data"))
    assert {s: i.num_examples for s, i in b.info.splits.items()} == {"train": 4, "test": 3}
    assert calls == [str(tmp_path / "data" / "downloads" / "extracted" / "UCF101_rar")]
    tfds_datasets.build("ucf101", str(manual), str(tmp_path / "data"), ucf101_split=2)
    assert len(calls) == 1  # the extracted folder is reused


def test_ucf101_missing_archives_are_one_line_errors(ucf_files, tmp_path):
    manual = tmp_path / "manual"
    os.makedirs(manual)
    data = str(tmp_path / "data")

    def error(**kw):
        with pytest.raises(tfds_datasets.ManualDataError) as e:
            tfds_datasets.build("ucf101", str(manual), data, **kw)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert error().startswith("manual folder is empty")
    os.symlink(ucf_files / "UCF101.zip", manual / "UCF101.zip")
    assert "UCF101TrainTestSplits-RecognitionTask.zip" in error()
    os.remove(manual / "UCF101.zip")
    os.symlink(ucf_files / "UCF101TrainTestSplits-RecognitionTask.zip",
               manual / "UCF101TrainTestSplits-RecognitionTask.zip")
    msg = error()
    assert msg.startswith("UCF-101 videos not found") and "UCF101.rar" in msg and "UCF-101/" in msg
    (manual / "UCF101.zip").write_bytes(b"not a zip at all")
    assert error().startswith("not a readable zip archive: ") and "UCF101.zip" in error()
    os.remove(manual / "UCF101.zip")
    (manual / "UCF101.rar").write_bytes(b"Rar!")
    if importlib.util.find_spec("rarfile") is None:
        assert "needs the rarfile package" in error()
    with pytest.raises(tfds_datasets.ManualDataError, match="manual folder not found"):
        tfds_datasets.build("ucf101", str(tmp_path / "nope"), data)
    assert not os.path.exists(os.path.join(data, "pixeldance_ucf101", "split1", "1.0.0"))


def test_ucf101_bad_videos_skipped_or_raised(ucf_files, tmp_path, caplog):
    """In the archive: one listed video missing, one empty (both skipped at build time, counted),
    one corrupt (stored; the source skips it, counted, or names it with on_error='raise')."""
    manual = tmp_path / "manual"
    shutil.copytree(ucf_files / "UCF-101", manual / "UCF-101")
    os.symlink(ucf_files / "ucfTrainTestlist", manual / "ucfTrainTestlist")
    os.remove(manual / "UCF-101" / "YoYo" / "v_YoYo_g08_c01.avi")
    (manual / "UCF-101" / "YoYo" / "v_YoYo_g09_c02.avi").write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes()
    (manual / "UCF-101" / "HandstandPushups" / "v_HandStandPushups_g08_c01.avi").write_bytes(noise)
    with pytest.raises(ValueError, match=r"^cannot store video, missing: YoYo/v_YoYo_g08_c01.avi \(not in "):
        tfds_datasets.build("ucf101", str(manual), str(tmp_path / "data"), on_error="raise")
    b = tfds_datasets.build("ucf101", str(manual), str(tmp_path / "data"))
    assert {s: i.num_examples for s, i in b.info.splits.items()} == {"train": 2, "test": 3}
    assert b.skips.counts == {"missing": 1, "empty": 1}
    assert b.skips.line("ucf") == ("ucf: skipped empty 1 (e.g. YoYo/v_YoYo_g09_c02.avi), "
                                   "missing 1 (e.g. YoYo/v_YoYo_g08_c01.avi)")
    src = tfds_source.TfdsVideoSource(str(tmp_path / "data"), "ucf101", "train", num_frames=3, resolution=8)
    items = [src[i] for i in range(2)]
    assert [it["caption"] for it in items] == ["apply eye makeup"] * 2  # the corrupt one replaced
    assert src.summary()["skipped"] == {"corrupt": 1}
    assert src.summary()["examples"]["corrupt"] == ["train:HandstandPushups/v_HandStandPushups_g08_c01.avi"]
    assert src.summary_line().startswith("tfds ") and "corrupt 1" in src.summary_line()
    strict = tfds_source.TfdsVideoSource(str(tmp_path / "data"), "ucf101", "train", num_frames=3,
                                         resolution=8, on_error="raise")
    with pytest.raises(folder.BadVideoError) as e:
        [strict[i] for i in range(2)]
    assert str(e.value).startswith("corrupt: train:HandstandPushups/v_HandStandPushups_g08_c01.avi (")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# MSR-VTT.
# ---------------------------------------------------------------------------------------------

def test_msrvtt_official_ranges_and_captions(msrvtt_built):
    data_dir, b = msrvtt_built
    assert {s: i.num_examples for s, i in b.info.splits.items()} == {"train": 2, "validation": 1, "test": 2}
    for split in ("train", "validation", "test"):
        for r in b.as_data_source(split):
            n = int(r["video_id"].decode()[len("video"):])
            assert MSRVTT_NUMBERS[n] == split and r["category"] == n % 20
            assert [c.decode() for c in r["captions"]] == [f"clip {n} caption 0", f"clip {n} caption 1"]
            assert r["video"][4:8] == b"ftyp"  # the mp4 itself
    src = tfds_source.TfdsVideoSource(data_dir, "msrvtt", num_frames=4, resolution=16, stride=3, size=8)
    captions = set()
    for i in range(8):
        item = src[i]
        n = int(src.record(i % 2)["video_id"].decode()[len("video"):])
        assert item["video"].shape == (4, 16, 16, 3) and abs(item["video"][..., 2].mean() - n % 250) < 8
        np.testing.assert_array_equal(np.diff(_indices(item["video"])), 3)
        assert item["caption"] in (f"clip {n} caption 0", f"clip {n} caption 1")
        captions.add(item["caption"])
    assert len(captions) > 2  # captions drawn per item, not always the first
    heldout = tfds_source.TfdsVideoSource(data_dir, "msrvtt", split="heldout", num_frames=4, resolution=16)
    assert heldout.tfds_split == "test" and len(heldout) == 2


def test_msrvtt_official_annotations_and_loose_videos(tmp_path, msrvtt_manual):
    """train_val_videodatainfo.json + test_videodatainfo.json ('validate' splits) with the videos
    in TrainValVideo/ and a zip of TestVideo/; one annotated video missing."""
    manual = tmp_path / "manual"
    os.makedirs(manual / "TrainValVideo")
    with zipfile.ZipFile(msrvtt_manual / "MSRVTT.zip") as z:
        for n, split in MSRVTT_NUMBERS.items():
            if split != "test" and n != 1:  # video1 is missing
                (manual / "TrainValVideo" / f"video{n}.mp4").write_bytes(z.read(f"MSRVTT/videos/all/video{n}.mp4"))
        with zipfile.ZipFile(manual / "test_videos.zip", "w") as t:
            for n in (7010, 7011):
                t.writestr(f"TestVideo/video{n}.mp4", z.read(f"MSRVTT/videos/all/video{n}.mp4"))
    trainval = {n: s for n, s in MSRVTT_NUMBERS.items() if s != "test"}
    (manual / "train_val_videodatainfo.json").write_text(json.dumps(_msrvtt_json(trainval, True)))
    with pytest.raises(tfds_datasets.ManualDataError, match=r"^train_val_videodatainfo.json found in .* but not test_videodatainfo.json$"):
        tfds_datasets.build("msrvtt", str(manual), str(tmp_path / "data"))
    test = {n: s for n, s in MSRVTT_NUMBERS.items() if s == "test"}
    (manual / "test_videodatainfo.json").write_text(json.dumps(_msrvtt_json(test, True)))
    b = tfds_datasets.build("msrvtt", str(manual), str(tmp_path / "data"))
    assert {s: i.num_examples for s, i in b.info.splits.items()} == {"train": 1, "validation": 1, "test": 2}
    assert b.skips.counts == {"missing": 1} and b.skips.examples["missing"] == ["video1.mp4"]
    r = b.as_data_source("validation")[0]
    assert r["video_id"] == b"video6513" and len(r["captions"]) == 2


def test_msrvtt_missing_annotations_and_videos(tmp_path, msrvtt_manual):
    manual = tmp_path / "manual"
    os.makedirs(manual)
    (manual / "video0.mp4").write_bytes(b"x")
    with pytest.raises(tfds_datasets.ManualDataError, match=r"^MSR-VTT annotations not found in .*MSRVTT.zip"):
        tfds_datasets.build("msrvtt", str(manual), str(tmp_path / "data"))
    os.remove(manual / "video0.mp4")
    (manual / "MSR_VTT.json").write_text(json.dumps(_msrvtt_json({0: "train"}, False)))
    with pytest.raises(tfds_datasets.ManualDataError, match=r"^no MSR-VTT videos \(videoN.mp4\) in "):
        tfds_datasets.build("msrvtt", str(manual), str(tmp_path / "data"))
    (manual / "MSR_VTT.json").write_text("{broken")
    with pytest.raises(tfds_datasets.ManualDataError, match=r"^unreadable annotation file MSR_VTT.json \(JSONDecodeError"):
        tfds_datasets.build("msrvtt", str(manual), str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match=r"^msrvtt is not built in .*tfds_build --dataset=msrvtt"):
        tfds_source.TfdsVideoSource(str(tmp_path), "msrvtt")


# ---------------------------------------------------------------------------------------------
# Wiring: experiments, make_source, grain, the build command.
# ---------------------------------------------------------------------------------------------

def _experiment(name):
    spec = importlib.util.spec_from_file_location(f"exp_{name}", os.path.join(REPO, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["ucf101", "msrvtt"])
def test_experiment_configs_and_make_source(name, ucf_built, msrvtt_built):
    data_dir = (ucf_built if name == "ucf101" else msrvtt_built)[0]
    config = _experiment(name).get_config("runlocal")
    assert config.data.name == name and config.text.tokenizer == "hashed"
    with pytest.raises(ValueError, match="config.data.root"):
        sources.make_source(config)
    config.data.root = data_dir
    src = sources.make_source(config, "train", size=5)
    assert isinstance(src, tfds_source.TfdsVideoSource) and len(src) == 5
    item = src[0]
    assert item["video"].shape == (config.data.num_frames, config.data.resolution, config.data.resolution, 3)
    assert isinstance(item["caption"], str) and item["caption"]
    heldout = sources.make_source(config, "heldout", size=2)
    assert heldout.tfds_split == config.data.heldout_split == "test"
    _experiment(name).get_config()  # the full config builds too


def test_grain_pipeline_iterates_and_restores(msrvtt_built):
    src = tfds_source.TfdsVideoSource(msrvtt_built[0], "msrvtt", num_frames=3, resolution=8, size=6)
    make = lambda: pipeline.make_batches(src, batch_size=4, seed=1, process_index=0, process_count=1)
    it = make()
    first = next(it)
    assert first["video"].shape == (4, 3, 8, 8, 3) and len(first["caption"]) == 4
    state = it.get_state()
    expected = [next(it) for _ in range(2)]  # crosses an epoch boundary (6 items)
    resumed = make()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["video"], want["video"])
        assert list(got["caption"]) == list(want["caption"])


def test_build_command(ucf_files, tmp_path, python_runner):
    manual = tmp_path / "manual"
    os.makedirs(manual)
    os.symlink(ucf_files / "UCF101.zip", manual / "UCF101.zip")
    proc = python_runner("-m", "pixeldance.data.tfds_build", "--dataset=ucf101", f"--manual_dir={manual}",
                         f"--data_dir={tmp_path / 'data'}", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: UCF-101 split lists not found in ")
    os.symlink(ucf_files / "ucfTrainTestlist", manual / "ucfTrainTestlist")
    args = ("-m", "pixeldance.data.tfds_build", "--dataset=ucf101", f"--manual_dir={manual}",
            f"--data_dir={tmp_path / 'data'}", "--ucf101_split=1")
    proc = python_runner(*args, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pixeldance_ucf101/split1 in " in proc.stdout and "test 3, train 4" in proc.stdout
    assert "pixeldance_ucf101: nothing skipped" in proc.stdout
    proc = python_runner(*args, timeout=120)
    assert proc.returncode == 0 and "already built" in proc.stdout
