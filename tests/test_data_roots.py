"""Data roots are boundaries (pixeldance/data/paths.py): paths in captions files, TFDS manual
folders and latent cache metadata must resolve inside their folder, or they are refused (one
line naming the row) before anything is opened, unless config.data.allow_outside_root."""
import builtins
import json
import logging
import os
import shutil
import zipfile

import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from pixeldance import configs
from pixeldance.data import image_folder, latent_cache, paths, sources, tfds_datasets, video_folder, video_io
from test_tfds_datasets import UCF_VIDEOS, _msrvtt_json, _ucf_lists, _write_avi
from test_tfds_datasets import _frames as _avi_frames

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HINT = "(set config.data.allow_outside_root=True to allow it)"
BUILD_HINT = "(pass --allow_outside_root to tfds_build to allow it)"
DARK, BRIGHT = 0, 250  # blue of the files inside the root, and of the outside file


@pytest.fixture
def opened(monkeypatch):
    """The real paths of every file opened through open(), PIL or PyAV from here on."""
    import av
    seen = []

    def recording(fn):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)):
                seen.append(os.path.realpath(file))
            return fn(file, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(builtins, "open", recording(builtins.open))
    monkeypatch.setattr(Image, "open", recording(Image.open))
    monkeypatch.setattr(av, "open", recording(av.open))
    return seen


def _under(paths_seen, folder):
    folder = os.path.realpath(folder)
    return [p for p in paths_seen if p == folder or p.startswith(folder + os.sep)]


# ---------------------------------------------------------------------------------------------
# Image and video folders.
# ---------------------------------------------------------------------------------------------

KINDS = ("image", "video")
EXT = {"image": "png", "video": "mp4"}


def _write(kind, path, blue):
    if kind == "image":
        Image.fromarray(np.full((12, 12, 3), (0, 0, blue), np.uint8)).save(path)
    else:
        v = np.zeros((6, 16, 16, 3), np.uint8)
        v[..., 2] = blue
        video_io.write_mp4(str(path), v, fps=10)


def _layout(tmp_path, kind):
    """tmp_path/root: good.EXT (dark), alias.EXT -> good.EXT (a symlink inside the root),
    out.EXT -> the outside file (a symlink pointing out); tmp_path/outside/secret.EXT (bright).
    Returns (root, {row kind: the path as written in a captions file}, the outside folder)."""
    ext = EXT[kind]
    root, outside = tmp_path / "root", tmp_path / "outside"
    os.makedirs(root)
    os.makedirs(outside)
    _write(kind, root / f"good.{ext}", DARK)
    _write(kind, outside / f"secret.{ext}", BRIGHT)
    os.symlink(f"good.{ext}", root / f"alias.{ext}")
    os.symlink(outside / f"secret.{ext}", root / f"out.{ext}")
    rows = {"dotdot": f"../outside/secret.{ext}", "absolute": str(outside / f"secret.{ext}"),
            "symlink": f"out.{ext}"}
    return str(root), rows, str(outside)


def _captions(root, rows):
    with open(os.path.join(root, "captions.csv"), "w") as f:
        f.write("path,caption\n" + "".join(f"{r},caption {k}\n" for k, r in enumerate(rows)))


def _source(kind, root, **kw):
    if kind == "image":
        return image_folder.ImageFolderSource(root, resolution=8, **kw)
    return video_folder.VideoFolderSource(root, num_frames=3, resolution=8, **kw)


def _blue(item):
    return float(item["video"][..., 2].mean())


@pytest.mark.parametrize("row", ["dotdot", "absolute", "symlink"])
@pytest.mark.parametrize("kind", KINDS)
def test_outside_row_raises_one_line_and_is_never_opened(kind, row, tmp_path, opened):
    root, rows, outside = _layout(tmp_path, kind)
    _captions(root, [f"good.{EXT[kind]}", rows[row]])
    opened.clear()  # what the set-up wrote
    with pytest.raises(paths.OutsideRootError) as e:
        _source(kind, root, on_error="raise")
    assert str(e.value) == f"captions.csv:3: {rows[row]!r} resolves outside the data root {root} {HINT}"
    assert isinstance(e.value, ValueError)
    assert _under(opened, outside) == []


@pytest.mark.parametrize("kind", KINDS)
def test_outside_rows_skipped_counted_and_never_opened(kind, tmp_path, opened, caplog):
    """With on_error='skip' each outside row is refused at index time, counted as outside_root
    and named (file:line and the path as written); the reported '../../etc/passwd' row too.
    Reading every item, and every header for buckets, opens nothing outside; a symlink that
    stays inside the root reads like its target."""
    caplog.set_level(logging.WARNING)
    root, rows, outside = _layout(tmp_path, kind)
    passwd = "../" * (root.count("/") + 2) + "etc/passwd"
    ext = EXT[kind]
    _captions(root, [f"good.{ext}", rows["dotdot"], rows["absolute"], rows["symlink"], passwd, f"alias.{ext}"])
    opened.clear()
    src = _source(kind, root, size=6)
    assert src._entries == [(f"good.{ext}", "caption 0"), (f"alias.{ext}", "caption 5")]
    s = src.summary()
    assert s["skipped"] == {"outside_root": 4}
    assert s["examples"]["outside_root"] == [f"captions.csv:{n}: {r!r}" for n, r in
                                             ((3, rows["dotdot"]), (4, rows["absolute"]), (5, rows["symlink"]),
                                              (6, passwd))]
    logged = [r.getMessage() for r in caplog.records]
    for n, r in ((3, rows["dotdot"]), (4, rows["absolute"]), (5, rows["symlink"]), (6, passwd)):
        assert f"{kind}_folder: skipping captions.csv:{n}: {r!r} resolves outside the data root {root} {HINT}" in logged
    assert "outside_root 4 (e.g. captions.csv:3: '../outside/" in src.summary_line()
    items = [src[i] for i in range(6)]
    assert [it["caption"] for it in items] == ["caption 0", "caption 5"] * 3
    assert all(_blue(it) < 10 for it in items)
    np.testing.assert_array_equal(items[0]["video"], items[1]["video"])  # the inside symlink = its target
    src.bucket_info(np.arange(6))  # the header probes of buckets
    assert _under(opened, outside) == [] and "/etc/passwd" not in opened
    assert src.summary()["skipped"] == {"outside_root": 4}  # nothing else went wrong


@pytest.mark.parametrize("row", ["dotdot", "absolute", "symlink"])
@pytest.mark.parametrize("kind", KINDS)
def test_allow_outside_root_reads_the_outside_file(kind, row, tmp_path):
    root, rows, _ = _layout(tmp_path, kind)
    _captions(root, [f"good.{EXT[kind]}", rows[row]])
    src = _source(kind, root, allow_outside_root=True, on_error="raise")
    assert len(src) == 2 and src.summary()["skipped"] == {}
    assert _blue(src[0]) < 10 and _blue(src[1]) > 200  # the outside file, read on purpose


@pytest.mark.parametrize("kind", KINDS)
def test_config_field_reaches_the_sources(kind, tmp_path):
    """config.data.allow_outside_root (experiments/base.py, default False) is what make_source
    gives the folder sources; a mixture component may set its own."""
    root, rows, _ = _layout(tmp_path, kind)
    _captions(root, [f"good.{EXT[kind]}", rows["dotdot"]])
    config = configs.load_config(os.path.join(REPO, "experiments", "base.py") + ":runlocal")
    assert config.data.allow_outside_root is False
    config.data.name, config.data.root, config.data.resolution = f"{kind}_folder", root, 8
    config.data.num_frames = 3
    src = sources.make_source(config, "train")
    assert len(src) == 1 and src.summary()["skipped"] == {"outside_root": 1}
    config.data.allow_outside_root = True
    src = sources.make_source(config, "train")
    assert len(src) == 2 and _blue(src[1]) > 200
    config.data.allow_outside_root = False
    config.data.name, config.data.mixture = "mixture", "part:1"
    config.data.sources = dict(part=dict(name=f"{kind}_folder", allow_outside_root=True))
    assert len(sources.make_source(config, "train")._entries) == 2


# ---------------------------------------------------------------------------------------------
# TFDS manual folders.
# ---------------------------------------------------------------------------------------------

OUTSIDE_UCF = ("YoYo", "v_YoYo_g08_c01.avi")  # a train video of split 1 (trainlist01.txt line 3)


@pytest.fixture(scope="module")
def ucf_parts(tmp_path_factory):
    """UCF-101/ videos (video k blue 30k) and ucfTrainTestlist/, and elsewhere a bright .avi."""
    root = tmp_path_factory.mktemp("ucf_parts")
    for k, (cls, name, _) in enumerate(UCF_VIDEOS):
        os.makedirs(root / "UCF-101" / cls, exist_ok=True)
        _write_avi(str(root / "UCF-101" / cls / name), _avi_frames(blue=30 * k))
    _ucf_lists(str(root / "ucfTrainTestlist"))
    os.makedirs(root / "outside")
    _write_avi(str(root / "outside" / "secret.avi"), _avi_frames(blue=BRIGHT))
    return root


def _ucf_manual(ucf_parts, tmp_path):
    """A manual folder whose UCF-101/ (a real folder) holds one video as a symlink out of it; the
    split lists are linked in whole (a name the builder looks for: opened where it links to)."""
    manual = tmp_path / "manual"
    shutil.copytree(ucf_parts / "UCF-101", manual / "UCF-101")
    os.symlink(ucf_parts / "ucfTrainTestlist", manual / "ucfTrainTestlist")
    target = manual / "UCF-101" / OUTSIDE_UCF[0] / OUTSIDE_UCF[1]
    os.remove(target)
    os.symlink(ucf_parts / "outside" / "secret.avi", target)
    return manual


def test_ucf101_video_linked_out_of_its_folder(ucf_parts, tmp_path, opened, caplog):
    caplog.set_level(logging.WARNING)
    manual = _ucf_manual(ucf_parts, tmp_path)
    opened.clear()
    line = [ln.split()[0] for ln in open(ucf_parts / "ucfTrainTestlist" / "trainlist01.txt")].index(
        "/".join(OUTSIDE_UCF)) + 1
    want = (f"trainlist01.txt:{line}: '{'/'.join(OUTSIDE_UCF)}' resolves outside the manual folder "
            f"{manual / 'UCF-101'} {BUILD_HINT}")
    with pytest.raises(paths.OutsideRootError) as e:
        tfds_datasets.build("ucf101", str(manual), str(tmp_path / "strict"), on_error="raise")
    assert str(e.value) == want
    b = tfds_datasets.build("ucf101", str(manual), str(tmp_path / "data"))
    assert {s: i.num_examples for s, i in b.info.splits.items()} == {"train": 3, "test": 3}
    assert b.skips.counts == {"outside_root": 1}
    assert b.skips.examples["outside_root"] == [f"trainlist01.txt:{line}: '{'/'.join(OUTSIDE_UCF)}'"]
    assert f"tfds build: skipping {want}" in [r.getMessage() for r in caplog.records]
    assert _under(opened, ucf_parts / "outside") == []
    secret = (ucf_parts / "outside" / "secret.avi").read_bytes()
    assert all(r["video"] != secret for r in b.as_data_source("train"))
    # Opted in: the linked file is read and stored.
    b = tfds_datasets.build("ucf101", str(manual), str(tmp_path / "allowed"), allow_outside_root=True)
    assert b.skips.counts == {} and b.info.splits["train"].num_examples == 4
    assert any(r["video"] == secret for r in b.as_data_source("train"))


def _msrvtt_manual(tmp_path, outside):
    """MSR_VTT.json and videos/video0.mp4 in the manual folder; videos/video1.mp4 a symlink to
    outside/video1.mp4 (bright)."""
    manual = tmp_path / "manual"
    os.makedirs(manual / "videos")
    os.makedirs(outside, exist_ok=True)
    video_io.write_mp4(str(manual / "videos" / "video0.mp4"), _avi_frames(blue=DARK), fps=10)
    video_io.write_mp4(str(outside / "video1.mp4"), _avi_frames(blue=BRIGHT), fps=10)
    os.symlink(outside / "video1.mp4", manual / "videos" / "video1.mp4")
    (manual / "MSR_VTT.json").write_text(json.dumps(_msrvtt_json({0: "train", 1: "train"}, False)))
    return manual


def test_msrvtt_video_and_annotations_linked_out_of_the_manual_folder(tmp_path, opened):
    outside = tmp_path / "outside"
    manual = _msrvtt_manual(tmp_path, outside)
    opened.clear()
    want = (f"MSR_VTT.json[video1]: 'videos/video1.mp4' resolves outside the manual folder {manual} "
            f"{BUILD_HINT}")
    with pytest.raises(paths.OutsideRootError) as e:
        tfds_datasets.build("msrvtt", str(manual), str(tmp_path / "strict"), on_error="raise")
    assert str(e.value) == want
    b = tfds_datasets.build("msrvtt", str(manual), str(tmp_path / "data"))
    assert b.skips.counts == {"outside_root": 1} and b.info.splits["train"].num_examples == 1
    assert b.skips.line("msrvtt") == "msrvtt: skipped outside_root 1 (e.g. MSR_VTT.json[video1]: 'videos/video1.mp4')"
    assert _under(opened, outside) == []
    b = tfds_datasets.build("msrvtt", str(manual), str(tmp_path / "allowed"), allow_outside_root=True)
    assert b.skips.counts == {} and b.info.splits["train"].num_examples == 2
    # An annotation file linked from elsewhere stops the build (before it is read).
    shutil.move(manual / "MSR_VTT.json", outside / "MSR_VTT.json")
    os.symlink(outside / "MSR_VTT.json", manual / "MSR_VTT.json")
    opened.clear()
    with pytest.raises(paths.OutsideRootError) as e:
        tfds_datasets.build("msrvtt", str(manual), str(tmp_path / "data2"))
    assert str(e.value) == (f"MSR-VTT annotation file: 'MSR_VTT.json' resolves outside the manual folder "
                            f"{manual} {BUILD_HINT}")
    assert _under(opened, outside) == []
    b = tfds_datasets.build("msrvtt", str(manual), str(tmp_path / "data3"), allow_outside_root=True)
    assert b.info.splits["train"].num_examples == 2


def test_zip_members_and_linked_archives_are_not_refused(tmp_path):
    """Members of a .zip are read from the archive; the archives themselves are names the builder
    looks for, opened wherever they link to."""
    outside = tmp_path / "outside"
    os.makedirs(outside)
    with zipfile.ZipFile(outside / "videos.zip", "w") as z:
        for n in (0, 1):
            video_io.write_mp4(str(tmp_path / "v.mp4"), _avi_frames(blue=n), fps=10)
            z.write(tmp_path / "v.mp4", f"../../videos/video{n}.mp4")
    manual = tmp_path / "manual"
    os.makedirs(manual)
    os.symlink(outside / "videos.zip", manual / "videos.zip")
    (manual / "MSR_VTT.json").write_text(json.dumps(_msrvtt_json({0: "train", 1: "train"}, False)))
    b = tfds_datasets.build("msrvtt", str(manual), str(tmp_path / "data"))
    assert b.skips.counts == {} and b.info.splits["train"].num_examples == 2


# ---------------------------------------------------------------------------------------------
# Latent caches.
# ---------------------------------------------------------------------------------------------

def _cache(tmp_path, frozen=False, n=4):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(n, 2, 2, 2, 4)).astype(np.float32)
    if frozen:
        text = dict(text_states=rng.normal(size=(n, 3, 8)).astype(ml_dtypes.bfloat16),
                    text_mask=np.ones((n, 3), bool))
        null = dict(text_states=np.zeros((1, 3, 8), ml_dtypes.bfloat16), text_mask=np.ones((1, 3), bool))
    else:
        text, null = rng.integers(0, 9, (n, 5)).astype(np.int32), None
    path = str(tmp_path / "cache")
    meta = latent_cache.write_arrays(path, z, z[:, -1:], text, [f"c{i}" for i in range(n)], num_shards=2,
                                     null_text=null)
    return path, meta, z


def _edit_meta(path, edit):
    with open(os.path.join(path, latent_cache.META)) as f:
        meta = json.load(f)
    edit(meta)
    with open(os.path.join(path, latent_cache.META), "w") as f:
        json.dump(meta, f)
    return meta


def _move_shard_out(path, outside, how):
    """Moves shard 0 of the cache to `outside` and makes meta.json reach it by `how`: a '../'
    name, an absolute name, or a symlink in the cache folder (name unchanged). Returns the name."""
    os.makedirs(outside, exist_ok=True)
    name = latent_cache.shard_name(0, 2)
    shutil.move(os.path.join(path, name), os.path.join(outside, name))
    if how == "symlink":
        os.symlink(os.path.join(outside, name), os.path.join(path, name))
        return name
    written = os.path.relpath(os.path.join(outside, name), path) if how == "dotdot" else os.path.join(outside, name)
    _edit_meta(path, lambda m: m["shards"][0].update(file=written))
    return written


@pytest.fixture
def array_record_opens(monkeypatch):
    """The shard lists given to array_record's reader from here on."""
    from array_record.python import array_record_data_source
    seen, real = [], array_record_data_source.ArrayRecordDataSource
    monkeypatch.setattr(array_record_data_source, "ArrayRecordDataSource",
                        lambda files, *a, **k: seen.append(list(files)) or real(files, *a, **k))
    return seen


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_latent_cache_shard_outside_the_folder(how, tmp_path, opened, array_record_opens):
    path, _, z = _cache(tmp_path)
    outside = str(tmp_path / "outside")
    written = _move_shard_out(path, outside, how)
    opened.clear()
    want = f"meta.json shards[0]: {written!r} resolves outside the latent cache folder {path} {HINT}"
    with pytest.raises(latent_cache.CacheError) as e:
        latent_cache.LatentCacheSource(path)
    assert str(e.value) == want
    assert array_record_opens == [] and _under(opened, outside) == []
    assert not latent_cache.is_complete(path)
    meta = latent_cache.read_meta(path)
    assert latent_cache.verify(path, meta) == [(written, want)]
    assert _under(opened, outside) == []  # not hashed either
    # The cache stage rewrites it: salvage keeps the shard inside, never links the outside one.
    assert latent_cache.salvage(path, meta, {}, []) == 1  # not even when not named bad
    assert sorted(os.listdir(path + ".partial")) == sorted(
        [latent_cache.shard_name(1, 2), latent_cache.shard_name(1, 2) + ".json", "plan.json"])
    shutil.rmtree(path + ".partial")
    # Opted in: read as written.
    assert latent_cache.is_complete(path, allow_outside_root=True)
    assert latent_cache.verify(path, meta, allow_outside_root=True) == []
    src = latent_cache.LatentCacheSource(path, allow_outside_root=True)
    np.testing.assert_array_equal(src.read_all()["z"], z)


def test_latent_cache_null_text_outside_the_folder(tmp_path, opened):
    path, meta, _ = _cache(tmp_path, frozen=True)
    outside = tmp_path / "outside"
    os.makedirs(outside)
    shutil.move(os.path.join(path, latent_cache.NULL_TEXT), outside / latent_cache.NULL_TEXT)
    _edit_meta(path, lambda m: m["null_text"].update(file=f"../outside/{latent_cache.NULL_TEXT}"))
    opened.clear()
    src = latent_cache.LatentCacheSource(path)  # the shards are fine
    with pytest.raises(latent_cache.CacheError) as e:
        src.null_text()
    assert str(e.value) == (f"meta.json null_text: '../outside/{latent_cache.NULL_TEXT}' resolves outside "
                            f"the latent cache folder {path} {HINT}")
    assert _under(opened, outside) == []
    assert [f for f, _ in latent_cache.verify(path, latent_cache.read_meta(path))] == [f"../outside/{latent_cache.NULL_TEXT}"]
    null = latent_cache.LatentCacheSource(path, allow_outside_root=True).null_text()
    assert null["text_states"].shape == (1, 3, 8)


def test_bucket_index_folder_outside_the_cache(tmp_path, array_record_opens):
    path = str(tmp_path / "buckets")
    _cache(tmp_path)  # tmp_path/cache: a bucket's cache, outside the bucketed cache folder
    latent_cache.write_bucket_index(path, [dict(shape=[5, 16, 16], dir="../cache", count=4),
                                           dict(shape=[1, 16, 16], dir="bucket-1x16x16", count=0)])
    with pytest.raises(latent_cache.CacheError) as e:
        latent_cache.open_bucket_caches(path, [(5, 16, 16), (1, 16, 16)])
    assert str(e.value) == (f"buckets.json buckets[0].dir: '../cache' resolves outside the latent cache "
                            f"folder {path} {HINT}")
    assert array_record_opens == []
    caches = latent_cache.open_bucket_caches(path, [(5, 16, 16), (1, 16, 16)], allow_outside_root=True)
    assert len(caches[0]) == 4 and caches[1] == []


def test_config_field_reaches_the_dit_and_cache_stages(tmp_path, capsys):
    """config.data.allow_outside_root is what the DiT's readers (one-shape and bucketed caches)
    and the cache stage's keep-or-rebuild check give the latent cache."""
    from pixeldance.trainers import cache as cache_stage
    from pixeldance.trainers import dit as dit_stage
    path, meta, z = _cache(tmp_path)
    _move_shard_out(path, str(tmp_path / "outside"), "symlink")
    buckets = str(tmp_path / "buckets")
    latent_cache.write_bucket_index(buckets, [dict(shape=[2, 16, 16], dir="../cache", count=4)])
    config = configs.load_config(os.path.join(REPO, "experiments", "base.py") + ":runlocal")
    config.cache.path, config.train.batch_size = path, 2
    assert config.data.allow_outside_root is False
    with pytest.raises(latent_cache.CacheError, match="resolves outside the latent cache folder"):
        dit_stage.video_cache_source(config, str(tmp_path))
    config.cache.path = buckets
    with pytest.raises(latent_cache.CacheError, match="resolves outside the latent cache folder"):
        dit_stage.bucketed_batches(config, str(tmp_path), [(2, 16, 16)])

    class Rebuilt(Exception):
        pass

    def vae():
        raise Rebuilt
    info = {"vae_step": meta.get("vae_step")}
    with pytest.raises(Rebuilt):  # the outside shard counts as damaged: the cache is rebuilt
        cache_stage._write_cache(config, path, None, 4, info, vae, None, noun="videos", stage="cache")
    assert "resolves outside the latent cache folder" in capsys.readouterr().out
    shutil.rmtree(path + ".partial", ignore_errors=True)

    config.data.allow_outside_root, config.cache.path = True, path
    assert cache_stage._write_cache(config, path, None, 4, info, vae, None, noun="videos",
                                    stage="cache") == (latent_cache.read_meta(path), True)
    np.testing.assert_array_equal(dit_stage.video_cache_source(config, str(tmp_path)).read_all()["z"], z)
    config.cache.path = buckets
    batches, source = dit_stage.bucketed_batches(config, str(tmp_path), [(2, 16, 16)])
    assert len(source) == 4
