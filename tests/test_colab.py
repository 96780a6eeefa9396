"""The notebooks run top to bottom against a real workdir (the runlocal main job's)."""
import json
import os
import shutil

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "colabs", "01_quickstart.ipynb")
EVALUATE = os.path.join(REPO, "colabs", "02_evaluate.ipynb")
PRETRAINED = os.path.join(REPO, "colabs", "03_pretrained.ipynb")
MODES = ("text", "first frame + text", "first + last frame + text")


def run_notebook(path, workdir, env, **parameters):
    """Executes a notebook with WORKDIR and `parameters` (in its cell tagged 'parameters') set."""
    nb = nbformat.read(path, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "WORKDIR =" in params[0].source
    for name in parameters:
        assert f"{name} =" in params[0].source, name
    params[0].source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in dict(WORKDIR=workdir, **parameters).items())
    client = NotebookClient(nb, kernel_name="python3", timeout=600, allow_errors=False,
                            resources={"metadata": {"path": REPO}})
    client.execute(env=env)  # raises CellExecutionError on the first failing cell
    return nb


def _text(cell):
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_quickstart(runlocal_workdir, child_env):
    nb = run_notebook(QUICKSTART, runlocal_workdir, child_env)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    for cell in code:
        assert not [o for o in cell.outputs if o.output_type == "error"]
        assert "Traceback" not in _text(cell)
    text = "\n".join(_text(c) for c in code)
    assert "9 frames of 32x32 pixels" in text
    for mode in MODES:
        assert f"{mode}: uint8 (9, 32, 32, 3)" in text.splitlines(), text
        assert any(line.startswith(mode + " {") and "'colour_correct'" in line for line in text.splitlines()), mode
    gifs = [o for c in code for o in c.outputs
            if o.output_type == "display_data" and "image/gif" in o.get("data", {})]
    assert len(gifs) == 1 + len(MODES)  # the real clip and the three generated videos


def test_evaluate_notebook(runlocal_workdir, networks_root, child_env, tmp_path):
    workdir = str(tmp_path / "wd")
    shutil.copytree(runlocal_workdir, workdir)
    env = dict(child_env, PIXELDANCE_STATS=str(tmp_path / "stats"))
    nb = run_notebook(EVALUATE, workdir, env, NETWORKS=networks_root, NUM_GENERATED=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = "\n".join(_text(c) for c in code)
    assert "Traceback" not in text
    result = json.load(open(os.path.join(workdir, "eval", "runlocal.json")))
    assert result["num_generated"] == 4 and f'"fvd": {result["fvd"]}' in text.replace("\n ", " ")
    gifs = [o for c in code for o in c.outputs
            if o.output_type == "display_data" and "image/gif" in o.get("data", {})]
    assert len(gifs) == 3
    tables = [o["data"]["text/markdown"] for c in code for o in c.outputs
              if o.output_type == "display_data" and "text/markdown" in o.get("data", {})]
    assert any("### Table 1: MSR-VTT" in t and "### Protocol runlocal" in t for t in tables)


def test_notebooks_are_stored_without_outputs():
    """Notebooks are committed clean: outputs belong to a run, not to the repository."""
    for name in sorted(os.listdir(os.path.join(REPO, "colabs"))):
        if name.endswith(".ipynb"):
            nb = nbformat.read(os.path.join(REPO, "colabs", name), as_version=4)
            nbformat.validate(nb)
            for cell in nb.cells:
                if cell.cell_type == "code":
                    assert not cell.outputs and cell.execution_count is None, name


def test_pretrained_notebook(child_env, tmp_path):
    """03_pretrained on a tiny random Wan repository built in the notebook: convert, generate
    text-to-video, LoRA fine-tune on the synthetic world, generate in the three modes."""
    workdir = str(tmp_path / "wan_lora")
    nb = run_notebook(PRETRAINED, workdir, child_env, CONVERTED=str(tmp_path / "wan21"), LORA_RANK=2)
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = "\n".join(_text(c) for c in code)
    assert "Traceback" not in text
    assert "text-to-video: uint8 (9, 32, 32, 3), sampling shift 3" in text
    assert "LoRA step 6:" in text and os.path.isdir(os.path.join(workdir, "dit", "6"))
    for mode in MODES:
        assert f"{mode}: uint8 (9, 32, 32, 3) (step 6)" in text.splitlines(), text
    gifs = [o for c in code for o in c.outputs
            if o.output_type == "display_data" and "image/gif" in o.get("data", {})]
    assert len(gifs) == len(MODES)
