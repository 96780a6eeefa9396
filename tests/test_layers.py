"""The import layers of ARCHITECTURE.md hold: import-linter's contracts in `.importlinter`
(layers data -> models -> diffusion -> build/workdir -> sample -> evaluators -> trainers ->
tools/convert -> main; the library never imports torch, diffusers or transformers)."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_contracts_are_kept():
    # A child process: import-linter builds the import graph of the installed package afresh.
    proc = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports; "
                           "raise SystemExit(lint_imports(config_filename='.importlinter', no_cache=True))"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in proc.stdout


def test_a_wrong_way_import_is_caught(tmp_path):
    """The contract is not vacuous: the same config over a copy of the package in which a data
    module imports the sampler is broken."""
    import shutil
    pkg = tmp_path / "pixeldance"
    shutil.copytree(os.path.join(REPO, "pixeldance"), pkg, ignore=shutil.ignore_patterns("__pycache__"))
    with open(pkg / "data" / "synthetic.py", "a") as f:
        f.write("\nfrom pixeldance import sample  # noqa: E402,F401  (the wrong way)\n")
    shutil.copy(os.path.join(REPO, ".importlinter"), tmp_path / ".importlinter")
    proc = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports; "
                           "raise SystemExit(lint_imports(config_filename='.importlinter', no_cache=True))"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert proc.returncode != 0
    assert "pixeldance.data is not allowed to import pixeldance.sample" in proc.stdout
