"""The Table 3 printer: rows from faithfulness reports, the paper's numbers by row name, bad input."""
import json
import os
import re

import pytest

from pixeldance.tools import ablation_table as at


def _report(colour, direction, last_psnr):
    split = dict(n=64, colour_acc=colour, direction_acc=direction, consistency_acc=0.5, first_psnr=25.0,
                 last_psnr=last_psnr)
    return {mode: dict(seen=split, heldout=split, all=split) for mode in ("T2V", "I2V", "FLF2V")}


def _workdir(tmp_path, name, report):
    d = tmp_path / name
    d.mkdir()
    (d / "faithfulness.json").write_text(json.dumps(report))
    return str(d)


def test_rows_metrics_and_paper_numbers(tmp_path):
    full = _workdir(tmp_path, "full", _report(0.9, 0.8, 18.5))
    eps = _workdir(tmp_path, "eps", _report(0.5, 0.25, None))
    rows = at.table_rows(at.parse_rows(f"full={full}, eps={eps}"))
    assert [r["name"] for r in rows] == ["full", "eps"]
    assert rows[0]["metrics"]["I2V direction"] == 0.8
    assert rows[0]["metrics"]["last-frame PSNR"] == 18.5
    assert rows[0]["paper"] == dict(row="PixelDance", ucf101_fid=49.36, ucf101_fvd=242.82)
    assert rows[1]["paper"] is None and rows[1]["experiment"] == "experiments/shapes_eps.py"
    md = at.markdown(rows).splitlines()
    assert len(md) == 4 and "49.36 / 242.82" in md[2] and "18.5 dB" in md[2]
    assert "–" in md[3]  # a missing PSNR prints as a dash, not as None


def test_every_paper_row_has_an_experiment_file():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in at.PAPER_TABLE3:
        assert os.path.exists(os.path.join(root, at.EXPERIMENT_FILES[name])), name


def test_bad_rows_and_missing_reports(tmp_path):
    with pytest.raises(ValueError, match="NAME=WORKDIR"):
        at.parse_rows("full")
    with pytest.raises(ValueError, match="empty"):
        at.parse_rows(" , ")
    with pytest.raises(FileNotFoundError, match="faithfulness.json"):
        at.table_rows([("full", str(tmp_path))])


def test_command_line_writes_json(tmp_path, capsys):
    full = _workdir(tmp_path, "full", _report(0.9, 0.8, 18.5))
    out = tmp_path / "t.json"
    at.main([f"--rows=full={full}", f"--output={out}"])
    assert "| full (PixelDance) |" in capsys.readouterr().out
    assert json.loads(out.read_text())["rows"][0]["metrics"]["T2V colour"] == 0.9


def test_cited_repository_files_exist():
    """The module's text cites files of this repository only where they exist."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(at.__file__) as f:
        text = f.read()
    cited = re.findall(r"\b((?:benchmarks|experiments|pixeldance|tests|refs)/[\w./-]+\.(?:py|json|md))", text)
    assert "benchmarks/results/table3_shapes.json" in cited
    for path in cited:
        assert os.path.exists(os.path.join(root, path)), path
