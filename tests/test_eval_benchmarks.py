"""benchmarks/long_video.py and benchmarks/feature_speed.py: their pieces and tiny end-to-end runs
(timings are never asserted: see benchmarks/README.md)."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


long_video = _load("long_video")


def test_clip_prompts_frames_and_windows():
    assert long_video.clip_prompts("a red circle moves up", 3) == [
        "a red circle moves up", "a red circle moves down", "a red circle moves up"]
    F = 9
    video = np.arange(F + 2 * (F - 1))[:, None, None, None] * np.ones((1, 2, 2, 3), int)  # 3 clips
    for k in range(3):  # clip k starts on clip k - 1's last frame
        np.testing.assert_array_equal(long_video.clip_frames(video, k, F)[:, 0, 0, 0], np.arange(8 * k, 8 * k + F))
    w = long_video.windows(video, 16)
    assert w.shape == (1, 16, 2, 2, 3) and w[0, -1, 0, 0, 0] == 15  # the last 9 frames make no whole window


def test_long_video_end_to_end(runlocal_workdir, networks_root, tmp_path):
    out = tmp_path / "long.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "long_video.py"), f"--workdir={runlocal_workdir}",
         f"--networks={networks_root}", "--num_videos=2", "--num_clips=3", "--num_real=4", "--group=1",
         f"--output={out}"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["frames_per_video"] == 9 + 2 * 8
    assert all(len(v) == 3 and all(0.0 <= x <= 1.0 for x in v) for v in result["per_clip"].values())
    assert len(result["fvd_per_window"]) == 1 and np.isfinite(result["fvd_per_window"][0])
    assert result["fvd_per_group"] == result["fvd_per_window"]  # groups of one window
    png = Image.open(tmp_path / "long.png")
    assert png.size == (900, 520)


def test_feature_speed_quick(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "feature_speed.py"), "--quick",
                           "--networks=inception", f"--output={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["cpu"] and len(result["results"]) == 1
    r = result["results"][0]
    assert r["network"] == "inception" and r["batch"] == 2 and r["ours_per_s"] > 0 and r["ratio"] > 0
