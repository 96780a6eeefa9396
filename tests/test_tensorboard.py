"""TensorBoard: every stage of the main job writes its documented tags (workdir.TENSORBOARD_TAGS)
to its own folder, read back with TensorBoard's own event reader; writers never lose events."""
import io
import itertools
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboardX import event_file_writer

from pixeldance import train_lib
from pixeldance import workdir as workdir_lib
from pixeldance.data import video_io


def _read(folder: str) -> EventAccumulator:
    events = EventAccumulator(folder, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_every_stage_writes_its_documented_tags(runlocal_workdir):
    boards = os.path.join(runlocal_workdir, "tensorboard")
    assert sorted(os.listdir(boards)) == sorted(workdir_lib.TENSORBOARD_TAGS)
    for stage, tags in workdir_lib.TENSORBOARD_TAGS.items():
        events = _read(os.path.join(boards, stage)).Tags()
        for kind in ("scalars", "images"):
            missing = {f"{stage}/{name}" for name in tags[kind]} - set(events[kind])
            assert not missing, (stage, kind, missing)


def test_tensorboard_holds_what_metrics_jsonl_holds(runlocal_workdir):
    """The scalars are metrics.jsonl's, per stage and step (vae_eval's PSNR / SSIM were lost once),
    and the videos are animated GIFs of the clips' frames."""
    with open(os.path.join(runlocal_workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    boards = os.path.join(runlocal_workdir, "tensorboard")
    for stage, tags in workdir_lib.TENSORBOARD_TAGS.items():
        events = _read(os.path.join(boards, stage))
        logged = [line for line in lines if line["stage"] == stage]
        assert logged, stage
        for name in tags["scalars"]:
            got = events.Scalars(f"{stage}/{name}")
            assert [e.step for e in got] == [line["step"] for line in logged], (stage, name)
            assert [e.value for e in got] == pytest.approx([line[name] for line in logged], rel=1e-6), (stage, name)
    (grid,) = _read(os.path.join(boards, "dit_eval")).Images("dit_eval/samples")
    with Image.open(io.BytesIO(grid.encoded_image_string)) as gif:
        assert gif.format == "GIF" and gif.n_frames == 9 and gif.size == (grid.width, grid.height)


def _fixed_clock(monkeypatch):
    """tensorboardX names an event file by the second: every writer opens in the same one."""
    monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1796361916.0))


def test_writers_of_one_folder_in_one_second_lose_nothing(tmp_path, monkeypatch):
    """A periodic evaluation and the final one (or a resumed stage) open the same folder within a
    second: both keep their events."""
    _fixed_clock(monkeypatch)
    # TensorBoard reads a folder's files in name order: the 10th writer of a process sorts after
    # the 9th (CI failed here when the counter was not zero-padded: '.10' < '.9').
    monkeypatch.setattr(train_lib, "_writer_count", itertools.count(9))
    for step in (5, 7):
        writer = train_lib.MetricWriter(str(tmp_path), "vae_eval")
        writer.write(step, dict(psnr=float(step)))
        writer.close()
    events = _read(str(tmp_path / "tensorboard" / "vae_eval"))
    assert [(e.step, e.value) for e in events.Scalars("vae_eval/psnr")] == [(5, 5.0), (7, 7.0)]


def test_one_writer_per_folder(tmp_path):
    writer = train_lib.MetricWriter(str(tmp_path), "dit_eval")
    other = train_lib.MetricWriter(str(tmp_path), "dit")  # another stage: its own folder
    with pytest.raises(RuntimeError, match="open already"):
        train_lib.MetricWriter(str(tmp_path), "dit_eval")
    writer.close()
    other.close()
    train_lib.MetricWriter(str(tmp_path), "dit_eval").close()  # closed: the folder is free again


def test_videos_are_gifs_tensorboard_reads(tmp_path):
    video = np.random.default_rng(0).integers(0, 255, (5, 6, 8, 3), dtype=np.uint8)
    writer = train_lib.MetricWriter(str(tmp_path), "toy")
    writer.gif("clip", video_io.encode_gif(video), 6, 8, step=3)
    writer.close()
    (image,) = _read(str(tmp_path / "tensorboard" / "toy")).Images("toy/clip")
    assert (image.step, image.width, image.height) == (3, 8, 6)
    with Image.open(io.BytesIO(image.encoded_image_string)) as gif:
        assert gif.n_frames == 5


def test_readme_lists_exactly_the_tags_written():
    """The README's TensorBoard table (section "The main job") names each folder's tags as
    `TENSORBOARD_TAGS` does; brace groups `{A,B}/{c,d}/{x}` expand to every combination."""
    import re
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    table = readme[readme.index("| folder | scalars | images / videos |"):]
    table = table[:table.index("\n\n")]
    rows = {m.group(1): (m.group(2), m.group(3)) for m in
            re.finditer(r"^\| `(\w+)` \|\s*([^|]*?)\s*\|\s*([^|]*?)\s*\|$", table, re.M)}
    assert set(rows) == set(workdir_lib.TENSORBOARD_TAGS)

    def names(cell):
        out = set()
        for item in re.findall(r"`([^`]+)`|([a-z_0-9]+)(?![^(]*\))", cell):
            text = item[0] or item[1]
            if item[0] and "{" in text:
                groups = [g.split(",") for g in re.findall(r"\{([^}]*)\}", text)]
                out |= {"/".join(p) for p in itertools.product(*groups)}
            elif text and text not in ("when", "a", "cache", "is", "built"):
                out.add(text)
        return out
    for stage, (scalars, images) in rows.items():
        want = workdir_lib.TENSORBOARD_TAGS[stage]
        documented = names(scalars)
        # first_psnr / last_psnr are documented once with the modes they exist for
        for tag in ("first_psnr", "last_psnr"):
            if tag in documented:
                documented.discard(tag)
                documented |= {t for t in want["scalars"] if t.endswith("/" + tag)}
        assert documented == set(want["scalars"]), stage
        assert names(images) - {"image"} == set(want["images"]), stage


def test_writer_does_not_import_torch(tmp_path):
    """tensorboardX imports torch when it is installed (the test extra installs it); a trainer's
    writer must not: the library never uses torch, and it cost every main job 2.4 s."""
    code = ("import sys; from pixeldance import train_lib; w = train_lib.MetricWriter(sys.argv[1], 'dit'); "
            "w.write(1, {'loss': 1.0}); w.close(); print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False"
    assert os.listdir(tmp_path / "tensorboard" / "dit")  # the event file is written all the same
