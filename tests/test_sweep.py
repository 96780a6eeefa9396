"""Sampling sweeps (pixeldance/tools/sweep.py) on the session's :runlocal workdir."""
import json
import os

import pytest

from pixeldance import configs
from pixeldance.tools import sweep


def test_parse_grid():
    assert sweep.parse_grid("sampler=euler,heun;steps=4,8") == [
        dict(sampler="euler", steps=4), dict(sampler="euler", steps=8),
        dict(sampler="heun", steps=4), dict(sampler="heun", steps=8)]
    assert sweep.parse_grid(" tau=0, 5 ") == [dict(tau=0), dict(tau=5)]
    assert sweep.parse_grid("text_to_video=direct,first_frame;guidance=4") == [
        dict(text_to_video="direct", guidance=4.0), dict(text_to_video="first_frame", guidance=4.0)]
    assert sweep.parse_grid("shift=1,3") == [dict(shift=1.0), dict(shift=3.0)]
    assert sweep.parse_grid("guidance_rescale=0,0.7") == [dict(guidance_rescale=0.0), dict(guidance_rescale=0.7)]
    for bad in ("", "taus=1", "tau", "lr=1e-3"):
        with pytest.raises(ValueError, match="grid"):
            sweep.parse_grid(bad)


def test_sweep_rows_differ_only_by_the_setting(runlocal_workdir, tmp_path):
    config = configs.load_config("experiments/sweep_tau.py:runlocal")
    config.sweep.grid = "tau=0,9;steps=3"
    config.sweep.num_per_mode = 2
    before = sorted(os.listdir(runlocal_workdir))
    output = str(tmp_path / "sweep.jsonl")
    rows = sweep.run_sweep(config, runlocal_workdir, output)
    assert [r["setting"] for r in rows] == [dict(tau=0, steps=3), dict(tau=9, steps=3)]
    with open(output) as f:
        assert [json.loads(line)["setting"] for line in f] == [r["setting"] for r in rows]
    # T2V and I2V never see the last frame, so tau changes only FLF2V (same seeds, same videos).
    assert rows[0]["T2V_heldout"] == rows[1]["T2V_heldout"] and rows[0]["I2V_heldout"] == rows[1]["I2V_heldout"]
    assert rows[0]["report"]["FLF2V"]["all"]["n"] == 2
    assert sorted(os.listdir(runlocal_workdir)) == before  # the workdir is only read


def test_a_bad_setting_is_refused_before_the_model_loads(monkeypatch, tmp_path):
    """Every grid setting is checked first: the last one's typo fails before a model loads or the
    first setting spends its minutes (and before --output gets a row)."""
    config = configs.load_config("experiments/sweep_tau.py:runlocal")
    config.sweep.grid = "steps=8,0"
    loads = []
    monkeypatch.setattr(sweep, "load_pipeline", loads.append)
    output = tmp_path / "sweep.jsonl"
    with pytest.raises(ValueError, match=r"^config.sweep.grid: steps must be an integer >= 1, got 0$"):
        sweep.run_sweep(config, str(tmp_path), str(output))
    assert loads == [] and not output.exists()
