"""Every notebook runs top to bottom on a tiny configuration: 01 trains `:runlocal` inside the
notebook, 02, 04 and 05 read the runlocal main job's workdir, 03 builds a tiny random Wan
repository. Any cell that raises fails its test."""
import json
import os
import shutil

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "colabs", "01_quickstart.ipynb")
EVALUATE = os.path.join(REPO, "colabs", "02_evaluate.ipynb")
PRETRAINED = os.path.join(REPO, "colabs", "03_pretrained.ipynb")
VAE = os.path.join(REPO, "colabs", "04_vae.ipynb")
LONG_VIDEO = os.path.join(REPO, "colabs", "05_long_video.ipynb")
NOTEBOOKS = sorted(os.path.join(REPO, "colabs", n) for n in os.listdir(os.path.join(REPO, "colabs"))
                   if n.endswith(".ipynb"))
RUNLOCAL = "experiments/shapes.py:runlocal"
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


def _videos(code) -> list[str]:
    """The inline videos shown (notebook.show_videos: HTML <video> tags), one entry each."""
    html = [o["data"]["text/html"] for c in code for o in c.outputs
            if o.output_type == "display_data" and "text/html" in o.get("data", {})]
    return [v for h in html for v in h.split("<video ")[1:]]


def _checked(nb):
    """The code cells of an executed notebook, after checking that each ran without an error."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    for cell in code:
        assert not [o for o in cell.outputs if o.output_type == "error"]
        assert "Traceback" not in _text(cell)
    return code


def test_quickstart(child_env, tmp_path):
    """01_quickstart trains `:runlocal` in the notebook (VAE, cache, DiT), then generates."""
    workdir = str(tmp_path / "quickstart")
    nb = run_notebook(QUICKSTART, workdir, child_env, CONFIG=RUNLOCAL)
    code = _checked(nb)
    text = "\n".join(_text(c) for c in code)
    assert "seconds per stage: train_vae " in text and os.path.isdir(os.path.join(workdir, "dit", "4"))
    assert "9 frames of 32x32 pixels, DiT step 4" in text
    for mode in MODES:
        assert f"{mode}: uint8 (9, 32, 32, 3)" in text.splitlines(), text
        assert any(line.startswith(mode + " {") and "'colour_correct'" in line for line in text.splitlines()), mode
    videos = _videos(code)
    assert len(videos) == 1 + len(MODES) + 2  # the real clip, the three modes, two own prompts
    assert all('src="data:video/mp4;base64,' in v for v in videos)


def test_vae_notebook(runlocal_workdir, child_env, tmp_path):
    """04_vae on the runlocal VAE (not retrained) and a tiny random Wan VAE."""
    nb = run_notebook(VAE, runlocal_workdir, child_env, LONG_FRAMES=33, WAN_CONVERTED=str(tmp_path / "wan_vae"))
    code = _checked(nb)
    text = "\n".join(_text(c) for c in code)
    assert f"{runlocal_workdir} is trained: train_vae step 4" in text
    assert "clip 3: PSNR" in text and "SSIM" in text
    assert "video (1, 9, 32, 32, 3) -> latents (1, 3, 4, 4, 16), float32" in text
    assert "33 frames -> latents (1, 9, 4, 4, 16) -> chunked decode (1, 33, 32, 32, 3)" in text
    assert "Wan VAE latents (1, 3, 4, 4, 16); PSNR" in text
    assert os.path.exists(tmp_path / "wan_vae" / "config.json")
    assert len(_videos(code)) == 4 + 2 + 2 + 2


def test_long_video_notebook(runlocal_workdir, child_env):
    """05_long_video: three clips with a prompt each, then with a last frame each."""
    nb = run_notebook(LONG_VIDEO, runlocal_workdir, child_env, NUM_CLIPS=3)
    code = _checked(nb)
    lines = "\n".join(_text(c) for c in code).splitlines()
    assert "3 clips of 9 frames -> 25 frames" in lines
    assert [line.split(":")[0] for line in lines if " new frames, moves " in line] == ["clip 0", "clip 1", "clip 2"]
    assert "prompt per clip: uint8 (25, 32, 32, 3)" in lines
    assert len([line for line in lines if "dB from its keyframe" in line]) == 3
    assert len(_videos(code)) == 3 + 1 + 2


def test_every_notebook_starts_with_the_same_set_up():
    """One set-up cell everywhere: installs the project in Colab (from REPO_URL), prints the
    devices; and one cell tagged 'parameters' that the tests override."""
    setups = []
    for path in NOTEBOOKS:
        code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        setups.append(code[0].source)
        assert 'REPO_URL = "https://github.com/' in code[0].source and '"google.colab" in sys.modules' in code[0].source
        assert "notebook.describe_devices()" in code[0].source
        assert len([c for c in code if "parameters" in c.metadata.get("tags", [])]) == 1, path
    assert len(set(setups)) == 1
    assert len(NOTEBOOKS) == 5


def test_a_failing_cell_fails_the_run(child_env, tmp_path):
    """run_notebook does not let an error pass (the notebook tests rely on it)."""
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("WORKDIR = None", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("raise ValueError('broken cell')"),
        nbformat.v4.new_code_cell("print('after')")])
    path = tmp_path / "broken.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(CellExecutionError, match="broken cell"):
        run_notebook(str(path), None, child_env)


def test_evaluate_notebook(evaluated_workdir, networks_root, child_env, tmp_path):
    """02_evaluate resuming the CLI's evaluation of the runlocal workdir (conftest's
    `evaluated_workdir`, tested in test_metrics_tool.py): its videos are there and the real
    statistics cached, so the notebook scores and shows them without generating them again."""
    workdir, stats = str(tmp_path / "wd"), str(tmp_path / "stats")
    shutil.copytree(evaluated_workdir["workdir"], workdir)
    shutil.copytree(evaluated_workdir["stats_dir"], stats)
    env = dict(child_env, PIXELDANCE_STATS=stats)
    generated = os.path.join(workdir, "eval", "runlocal", "generated")
    written = {n: os.path.getmtime(os.path.join(generated, n)) for n in os.listdir(generated)}
    nb = run_notebook(EVALUATE, workdir, env, NETWORKS=networks_root, NUM_GENERATED=6)
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = "\n".join(_text(c) for c in code)
    assert "Traceback" not in text and "computing once" not in text  # resumed: nothing computed again
    assert {n: os.path.getmtime(os.path.join(generated, n)) for n in os.listdir(generated)} == written
    result = json.load(open(os.path.join(workdir, "eval", "runlocal.json")))
    assert result["num_generated"] == 6 and f'"fvd": {result["fvd"]}' in text.replace("\n ", " ")
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
