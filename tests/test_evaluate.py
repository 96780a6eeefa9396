"""The protocol evaluator's plumbing without feature networks: which videos it generates with
which instructions and seeds, resuming, the protocol/dataset checks, the paper tables and the
command lines' one-line errors. (The networks and the numbers: test_metrics_tool.py.)"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import base
from pixeldance.data import video_io
from pixeldance.evaluators import metrics as metrics_ev
from pixeldance.evaluators import registry
from pixeldance.tools import paper_tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakePipe:
    """Records generate_batch calls; a video's pixels encode (seed, index in batch)."""

    def __init__(self):
        self.calls = []

    def generate_batch(self, prompts, firsts, lasts, *, seed, num_frames, height, width, **settings):
        self.calls.append(dict(prompts=list(prompts), firsts=firsts, lasts=lasts, seed=seed, **settings))
        v = np.zeros((len(prompts), num_frames, height, width, 3), np.uint8)
        v[..., 0] = (10 * seed)
        v[..., 1] = (40 * np.arange(len(prompts)))[:, None, None, None]
        return v


def _config(protocol="runlocal"):
    c = base.get_config("runlocal")
    c.evals.protocol = protocol
    return c


def test_generate_plan_modes_and_resume(tmp_path):
    ev = metrics_ev.ProtocolMetrics(_config(), num_generated=10, root=str(tmp_path / "nets"))
    assert ev.protocol.mode == "flf2v" and ev.protocol.num_generated == 10
    source = metrics_ev.real_source(ev.config, ev.protocol)
    assert source[0]["video"].shape == (9, 32, 32, 3)
    pipe = FakePipe()
    captions = ev.generate(pipe, str(tmp_path), source)
    bs = ev.config.sample.batch_size
    assert [c["seed"] for c in pipe.calls] == list(range(-(-10 // bs)))  # seed = protocol seed + shard
    first = pipe.calls[0]
    assert first["prompts"] == [source[i]["caption"] for i in range(bs)]
    np.testing.assert_array_equal(first["firsts"][1], source[1]["video"][0])
    np.testing.assert_array_equal(first["lasts"][1], source[1]["video"][-1])
    rows = [json.loads(l) for l in open(captions)]
    assert [r["path"] for r in rows] == [f"{i:06d}.mp4" for i in range(10)]
    # Cycling through the real items past num_real: item i % num_real.
    assert rows[ev.protocol.num_real % 10]["caption"] == source[ev.protocol.num_real % 10]["caption"]
    gen = tmp_path / metrics_ev.GENERATED
    assert sorted(os.listdir(gen)) == [f"{i:06d}.mp4" for i in range(10)] + [metrics_ev.GENERATION_KEY]
    # Interrupted after the first shard: a rerun regenerates only the missing shards, same seeds.
    for i in range(bs, 10):
        os.remove(gen / f"{i:06d}.mp4")
    again = FakePipe()
    ev.generate(again, str(tmp_path), source)
    assert [c["seed"] for c in again.calls] == list(range(1, -(-10 // bs)))
    video = video_io.read_video(str(gen / f"{bs + 1:06d}.mp4"))
    assert abs(int(video[0, 4, 4, 0]) - 10) <= 3 and abs(int(video[0, 4, 4, 1]) - 40) <= 3  # seed 1, item 1


@pytest.mark.parametrize("mode,has_first,has_last", [("t2v", False, False), ("i2v", True, False)])
def test_generate_modes(tmp_path, mode, has_first, has_last):
    ev = metrics_ev.ProtocolMetrics(_config(), num_generated=4, root=str(tmp_path))
    ev.protocol = metrics_ev.dataclasses.replace(ev.protocol, mode=mode)
    pipe = FakePipe()
    ev.generate(pipe, str(tmp_path), metrics_ev.real_source(ev.config, ev.protocol))
    assert (pipe.calls[0]["firsts"] is not None) == has_first
    assert (pipe.calls[0]["lasts"] is not None) == has_last



def test_videos_of_another_generation_are_made_again(tmp_path):
    """A rerun after more training (another step), with other weights or other sampler settings,
    or on a folder from before generation keys, regenerates every video instead of scoring the
    old ones as this pipeline's; the same generation resumes."""
    ev = metrics_ev.ProtocolMetrics(_config(), num_generated=6, root=str(tmp_path / "nets"))
    source = metrics_ev.real_source(ev.config, ev.protocol)
    shards = list(range(-(-6 // ev.config.sample.batch_size)))
    gen = tmp_path / metrics_ev.GENERATED

    def run(step=1, params=None, guidance=8.0):
        pipe = FakePipe()
        pipe.config, pipe.params = _config(), params if params is not None else {"w": np.ones(3)}
        pipe.config.sample.guidance = guidance
        ev.generate(pipe, str(tmp_path), source, step=step)
        return [c["seed"] for c in pipe.calls]

    assert run() == shards
    assert run() == []  # the same generation: nothing to make
    assert json.loads((gen / metrics_ev.GENERATION_KEY).read_text())["step"] == 1
    assert run(step=2) == shards
    assert run(step=2, params={"w": np.full(3, 2.0)}) == shards
    assert run(step=2, params={"w": np.full(3, 2.0)}, guidance=4.0) == shards
    assert run(step=2, params={"w": np.full(3, 2.0)}, guidance=4.0) == []
    (gen / metrics_ev.GENERATION_KEY).unlink()  # a folder written before the key existed
    assert run(step=2, params={"w": np.full(3, 2.0)}, guidance=4.0) == shards
    assert sorted(os.listdir(gen)) == [f"{i:06d}.mp4" for i in range(6)] + [metrics_ev.GENERATION_KEY]


def test_weights_fingerprint():
    a = {"dense": {"kernel": np.arange(6.0).reshape(2, 3), "bias": np.zeros(3)}}
    same = {"dense": {"kernel": np.arange(6.0).reshape(2, 3), "bias": np.zeros(3)}}
    assert metrics_ev.weights_fingerprint(a) == metrics_ev.weights_fingerprint(same)
    assert metrics_ev.weights_fingerprint(None, a) == metrics_ev.weights_fingerprint(a)
    assert metrics_ev.weights_fingerprint(None) is None
    scaled = {"dense": {"kernel": np.arange(6.0).reshape(2, 3) * 1.001, "bias": np.zeros(3)}}
    assert metrics_ev.weights_fingerprint(a) != metrics_ev.weights_fingerprint(scaled)
    assert metrics_ev.weights_fingerprint(a) != metrics_ev.weights_fingerprint(a, {"vae": np.ones(1)})


def test_evaluate_scores_exactly_its_plan(tmp_path, monkeypatch):
    """A folder kept from a run with a larger --num_generated: the rerun generates nothing and
    scores its own first videos, not a subset of the stale ones."""
    ev = metrics_ev.ProtocolMetrics(_config(), num_generated=10, root=str(tmp_path / "nets"))
    ev.generate(FakePipe(), str(tmp_path), metrics_ev.real_source(ev.config, ev.protocol), step=0)
    seen = {}

    def fake_score(extractor, generated, ref, *, captions, batch_size, names=None):
        seen.update(generated=generated, names=names)
        return {"warnings": []}

    monkeypatch.setattr(metrics_ev.suite, "Extractor", lambda *a: None)
    monkeypatch.setattr(metrics_ev.suite, "real_stats", lambda *a, **k: {})
    monkeypatch.setattr(metrics_ev.suite, "score_generated", fake_score)
    small = metrics_ev.ProtocolMetrics(_config(), num_generated=4, root=str(tmp_path / "nets"))
    pipe = FakePipe()
    pipe.mesh = None
    small.evaluate(pipe, step=0, out_dir=str(tmp_path))
    assert pipe.calls == []  # every shard of the 4 exists already
    assert seen["names"] == [f"{i:06d}.mp4" for i in range(4)]
    assert seen["generated"] == str(tmp_path / metrics_ev.GENERATED)

def test_protocol_must_fit_the_dataset():
    with pytest.raises(ValueError, match="is for the ucf101 dataset"):
        metrics_ev.ProtocolMetrics(_config("ucf101_pixeldance"))
    with pytest.raises(ValueError, match="needs 17-frame clips at 64px"):
        metrics_ev.ProtocolMetrics(_config("shapes_17f"))  # the runlocal world is 9 x 32
    assert isinstance(registry.make(["metrics"], _config(), "pipeline")[0], metrics_ev.ProtocolMetrics)


def test_real_key_follows_protocol_and_data():
    a = metrics_ev.ProtocolMetrics(_config())
    c = _config()
    c.data.seed = 123
    assert a.real_key() == metrics_ev.ProtocolMetrics(_config()).real_key()
    assert a.real_key() != metrics_ev.ProtocolMetrics(c).real_key()
    # The generated count and the metrics do not change the real set; its count does.
    assert a.real_key() == metrics_ev.ProtocolMetrics(_config(), num_generated=4, metrics=("fvd",)).real_key()
    b = metrics_ev.ProtocolMetrics(_config())
    b.protocol = metrics_ev.dataclasses.replace(b.protocol, num_real=8)
    assert a.real_key() != b.real_key()


def test_paper_tables_place_results_by_protocol(tmp_path):
    wd = tmp_path / "ucf"
    (wd / "eval").mkdir(parents=True)
    (wd / "eval" / "ucf101_pixeldance.json").write_text(json.dumps(
        dict(protocol="ucf101_pixeldance", step=7, fvd=300.5, fid=55.25, **{"is": 30.0})))
    (wd / "eval" / "shapes_17f.json").write_text(json.dumps(dict(protocol="shapes_17f", fvd=12.0, fid=3.5)))
    text = paper_tables.tables(paper_tables.read_results([str(wd)], []))
    t2 = text.split("### Table 2")[1].split("### Table 3")[0]
    assert "| ours: ucf (step 7) | 30.00 | 55.25 | 300.50 |" in t2
    assert "| PixelDance (paper) | 42.10 | 49.36 | 242.82 |" in t2
    assert "| ours: ucf (step 7) | 55.25 | 300.50 |" in text.split("### Table 3")[1]
    assert "ours: ucf" not in text.split("### Table 2")[0]  # not in the MSR-VTT table
    assert "### Protocol shapes_17f" in text and "| ours: ucf | 12.00 | 3.50 |" in text
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        paper_tables.read_results([], [str(tmp_path / "bad.json")])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_metrics_cli_one_line_errors(tmp_path):
    (tmp_path / "gen").mkdir()
    video_io.write_mp4(str(tmp_path / "gen" / "a.mp4"), np.zeros((16, 32, 32, 3), np.uint8))
    cases = [
        (["--generated", str(tmp_path / "gen"), "--metrics=fvd"], "fvd and fid need --real"),
        (["--generated", str(tmp_path / "gen"), "--metrics=lpips"], "unknown metric lpips"),
        (["--generated", str(tmp_path / "gen"), "--metrics=clipsim"], "clipsim needs --captions"),
        (["--generated", str(tmp_path / "gen"), "--protocol=fvd"], "unknown protocol 'fvd'"),
        (["--generated", str(tmp_path / "gen"), "--real", str(tmp_path / "gen"), "--metrics=fvd",
          "--networks", str(tmp_path / "none")], "no config.json of converted i3d weights"),
    ]
    for args, message in cases:
        r = _cli("pixeldance.tools.metrics", *args, "--output", str(tmp_path / "out.json"))
        assert r.returncode == 2, (args, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, r.stderr[-2000:])
    assert not (tmp_path / "out.json").exists()
    r = _cli("pixeldance.tools.paper_tables", "--workdirs", str(tmp_path / "nope"))
    assert r.returncode == 2 and "workdir not found" in r.stderr
