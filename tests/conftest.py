"""Test setup: 8 forced CPU devices, a per-session compilation cache, and the shared main job.

The environment is set here, before anything imports jax, so every test sees 8 CPU devices
(meshes like (2, 4, 1, 1) work on any machine).

`runlocal_workdir` runs the real entry point once per test session,
`python -m pixeldance.main --config=experiments/shapes.py:runlocal --workdir=...`, and the
pipeline, CLI, notebook and main-job tests all read its workdir. Under pytest-xdist the workers
share one run through a file lock. Subprocesses inherit the 8 CPU devices, so the main job's
training steps run sharded too.
"""
import atexit
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile

_DEVICE_FLAG = "--xla_force_host_platform_device_count"

_flags = re.sub(_DEVICE_FLAG + r"=\S+", "", os.environ.get("XLA_FLAGS", "")).split()
os.environ["XLA_FLAGS"] = " ".join(_flags + [f"{_DEVICE_FLAG}=8"])
# The suite is compile-bound: cheap XLA:CPU compilation (see pixeldance/xla_flags.py) computes
# the same functions and cuts compile time 2-3x. PIXELDANCE_TEST_FULL_OPT=1 keeps XLA's defaults.
if not os.environ.get("PIXELDANCE_TEST_FULL_OPT"):
    from pixeldance import xla_flags  # noqa: E402  (imports no jax at module level)
    os.environ["XLA_FLAGS"] = xla_flags.with_fast_compile(os.environ["XLA_FLAGS"])
os.environ["JAX_PLATFORMS"] = "cpu"
# Identical computations compiled by several tests (and by their subprocesses, which inherit the
# variable) are compiled once. A fresh folder per session: nothing carries over between runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="pixeldance_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNLOCAL = os.path.join(REPO, "experiments", "shapes.py") + ":runlocal"
MAIN_JOB_TIMEOUT_S = 1800  # a hang guard, not a timing check


def subprocess_env() -> dict:
    """The test environment for child processes (8 CPU devices, the shared compilation cache)."""
    return dict(os.environ)


def run_python(*args, cwd=REPO, timeout=600) -> subprocess.CompletedProcess:
    """`python *args` in a child process; returns the completed process (text stdout/stderr)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def run_main_job(workdir: str, *flags) -> subprocess.CompletedProcess:
    """The main job, exactly as the experiment's docstring runs it."""
    return run_python("-m", "pixeldance.main", f"--config={RUNLOCAL}", f"--workdir={workdir}", *flags,
                      timeout=MAIN_JOB_TIMEOUT_S)


@pytest.fixture(scope="session")
def child_env() -> dict:
    """The environment for child processes (kernels, CLIs): see `subprocess_env`."""
    return subprocess_env()


@pytest.fixture(scope="session")
def python_runner():
    """`run_python` for tests: runs `python ARGS` in a child process with the test environment."""
    return run_python


@pytest.fixture(scope="session")
def main_job_runner():
    """`run_main_job(workdir, *flags)` for tests."""
    return run_main_job


@pytest.fixture(scope="session")
def runlocal_workdir(tmp_path_factory) -> str:
    """Workdir of one complete main job with `experiments/shapes.py:runlocal`; treat as read-only.

    Tests that modify a workdir copy it first (xdist workers may read this one concurrently).
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by all workers of this session
    workdir = str(root / "runlocal_workdir")
    done, failed = workdir + ".done", workdir + ".failed"
    with open(workdir + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not os.path.exists(done) and not os.path.exists(failed):
                shutil.rmtree(workdir, ignore_errors=True)
                proc = run_main_job(workdir)
                marker = done if proc.returncode == 0 else failed
                with open(marker, "w") as f:
                    f.write(f"exit {proc.returncode}\n{proc.stderr[-5000:]}")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if os.path.exists(failed):  # one failed run is reported by every test that needs it
        with open(failed) as f:
            raise RuntimeError(f"the runlocal main job failed: {f.read()}")
    return workdir


@pytest.fixture(scope="session")
def networks_root(tmp_path_factory) -> str:
    """A root of converted feature networks (tests/feature_nets.py: the real I3D, random
    InceptionV3 and CLIP 'mu'), built once per session and shared by the xdist workers."""
    from feature_nets import make_networks_root
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = str(root / "networks")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not os.path.exists(path + ".done"):
                shutil.rmtree(path, ignore_errors=True)
                make_networks_root(path)
                open(path + ".done", "w").close()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def pytest_collection_modifyitems(config, items):
    """Tests that need the main job go last, so xdist workers run the others while one builds it."""
    items.sort(key=lambda item: "runlocal_workdir" in getattr(item, "fixturenames", ()))
