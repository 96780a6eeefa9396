"""Packaging: pyproject.toml's metadata builds a wheel with the package's files and pins,
`python -m pixeldance --help` lists every entry point without importing JAX, and the quick
subset of tests/conftest.py names tests that exist."""
import ast
import fnmatch
import importlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

from pixeldance import __main__ as listing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "pixeldance")
_MAIN_BLOCK = re.compile(r"""^if __name__ == ['"]__main__['"]\s*:""", re.M)


def _pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _modules_with_a_main_block() -> set[str]:
    found = set()
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and name != "__main__.py":
                with open(path, encoding="utf-8") as f:
                    if _MAIN_BLOCK.search(f.read()):
                        found.add(os.path.relpath(path[:-3], REPO).replace(os.sep, "."))
    return found


def test_every_entry_point_is_listed_described_and_imports():
    listed = [m for _, modules in listing.ENTRY_POINTS for m in modules]
    assert len(listed) == len(set(listed))
    assert set(listed) == _modules_with_a_main_block()
    for module in listed:
        assert listing.summary(module), f"{module} has no docstring to describe it"
        importlib.import_module(module)  # the listing names modules that exist and import


def test_help_lists_them_without_importing_jax():
    code = ("import runpy, sys\n"
            "sys.argv = ['pixeldance', '--help']\n"
            "try:\n"
            "    runpy.run_module('pixeldance', run_name='__main__', alter_sys=True)\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "heavy = sorted(m for m in ('jax', 'flax', 'numpy', 'tensorflow_datasets') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for _, modules in listing.ENTRY_POINTS:
        for module in modules:
            assert f"  {module} " in proc.stdout
    assert "Sampling API and command line." in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "pixeldance", "train"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "'train'" in bad.stderr


def test_pyproject_metadata():
    meta = _pyproject()
    project = meta["project"]
    assert project["name"] == "pixeldance" and project["requires-python"] == ">=3.11"
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pixeldance.__version__"}
    module, func = project["scripts"]["pixeldance"].split(":")
    assert callable(getattr(importlib.import_module(module), func))
    # The README's and CI's install commands name extras that exist.
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci = f.read()
    assert "pip install -e '.[test]'" in ci
    extras = project["optional-dependencies"]
    assert {"test", "tpu-plan", "tensorboard"} <= set(extras)
    assert set(extras["tensorboard"]) <= set(extras["test"])  # the tests read event files with it
    # Every dependency is pinned (numpy by its major version: jax, tfds and torch share it).
    for req in project["dependencies"] + [r for reqs in extras.values() for r in reqs]:
        assert "==" in req or req.startswith("numpy>=2.0,<3"), req


def test_package_data_covers_every_non_python_file():
    """The wheel holds only what [tool.setuptools] names: a data file added under pixeldance/
    must be listed in package-data, or an installed package would miss it."""
    proc = subprocess.run(["git", "ls-files", "pixeldance"], cwd=REPO, capture_output=True, text=True)
    tracked = proc.stdout.split() if proc.returncode == 0 else []
    data = [p for p in tracked if not p.endswith(".py")]
    patterns = _pyproject()["tool"].get("setuptools", {}).get("package-data", {})
    for path in data:
        rel = os.path.relpath(path, "pixeldance")
        assert any(fnmatch.fnmatch(rel, pat) for pats in patterns.values() for pat in pats), (
            f"{path} is not .py and not in [tool.setuptools.package-data]")


def test_wheel_has_the_package_and_its_pins(tmp_path):
    """`pip wheel` of a copy of the sources (pyproject.toml, README.md, pixeldance/): the
    metadata lists the pinned dependencies and extras, and the wheel holds every module."""
    src = tmp_path / "src"
    shutil.copytree(PACKAGE, src / "pixeldance", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    # No build isolation: the setuptools of the test environment builds it, offline and in seconds.
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", str(src), "-w", str(tmp_path / "whl")],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "No module named" in proc.stderr and "setuptools" in proc.stderr:
        pytest.fail("setuptools is not installed in the test environment")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "whl").glob("pixeldance-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = z.read(meta_name).decode()
        entry_points = z.read(meta_name.replace("METADATA", "entry_points.txt")).decode()
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), REPO).replace(os.sep, "/")
                assert rel in names, rel
    project = _pyproject()["project"]
    requires = set(re.findall(r"^Requires-Dist: (\S+)", meta, re.M))
    for req in project["dependencies"]:
        if "==" in req:
            assert req in requires, req
    for extra in project["optional-dependencies"]:
        assert f"Provides-Extra: {extra}" in meta
    assert "pixeldance = pixeldance.main:run" in entry_points
    from pixeldance import __version__
    assert f"\nVersion: {__version__}\n" in meta


def test_quick_subset_names_existing_tests():
    """Every entry of conftest.QUICK is a test function of an existing file (a renamed test would
    otherwise silently drop out of `pytest -m quick`)."""
    import conftest
    assert conftest.QUICK
    for entry in conftest.QUICK:
        path, _, name = entry.partition("::")
        with open(os.path.join(REPO, path), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        assert name.split("[")[0] in names, f"conftest.QUICK names {entry}, which is not a test"
