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
import time

_DEVICE_FLAG = "--xla_force_host_platform_device_count"

_flags = re.sub(_DEVICE_FLAG + r"=\S+", "", os.environ.get("XLA_FLAGS", "")).split()
os.environ["XLA_FLAGS"] = " ".join(_flags + [f"{_DEVICE_FLAG}=8"])
# The suite is compile-bound: cheap XLA:CPU compilation (see pixeldance/xla_flags.py) computes
# the same functions and cuts compile time 2-3x. PIXELDANCE_TEST_FULL_OPT=1 keeps XLA's defaults.
if not os.environ.get("PIXELDANCE_TEST_FULL_OPT"):
    from pixeldance import xla_flags  # noqa: E402  (imports no jax at module level)
    os.environ["XLA_FLAGS"] = xla_flags.with_fast_compile(os.environ["XLA_FLAGS"])
os.environ["JAX_PLATFORMS"] = "cpu"
# numpy's OpenBLAS and torch's OpenMP start a thread per core and busy-wait; beside XLA's threads
# and the other xdist worker they are oversubscribed: the 2048-wide eigh of an FID
# (pixeldance/metrics/scores.py) took 20 s instead of 1-2 s, a torch Conv3d reference loop 9.6 s
# instead of 1.6 s. One thread each (set before numpy or torch is imported; children inherit it).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
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


def _shared_root(basetemp):
    """The folder every xdist worker of this session shares (a worker's basetemp is under it)."""
    return basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp


def _runlocal_paths(basetemp) -> dict:
    workdir = str(_shared_root(basetemp) / "runlocal_workdir")
    return dict(workdir=workdir, lock=workdir + ".lock", done=workdir + ".done", failed=workdir + ".failed",
                started=workdir + ".started")


def build_runlocal(workdir: str) -> None:
    """Runs the runlocal main job into `workdir`; writes its stdout/stderr beside it, then the
    .done or .failed marker (renamed into place, so a reader never sees half a marker)."""
    shutil.rmtree(workdir, ignore_errors=True)
    proc = run_main_job(workdir)
    for name in ("stdout", "stderr"):  # beside the workdir: `runlocal_output`
        with open(f"{workdir}.{name}", "w") as f:
            f.write(getattr(proc, name))
    marker = workdir + (".done" if proc.returncode == 0 else ".failed")
    with open(marker + ".tmp", "w") as f:
        f.write(f"exit {proc.returncode}\n{proc.stderr[-5000:]}")
    os.replace(marker + ".tmp", marker)


def _start_runlocal_in_background(paths: dict) -> None:
    """Starts `build_runlocal` in a child process unless it was started or done: called at
    collection when a selected test needs the main job, so the job runs beside the first tests
    instead of one xdist worker waiting on the lock while the other builds it (48 s idle)."""
    with open(paths["lock"], "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not any(os.path.exists(paths[k]) for k in ("done", "failed", "started")):
                child = subprocess.Popen(
                    [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import conftest; "
                     "conftest.build_runlocal(sys.argv[2])", os.path.dirname(os.path.abspath(__file__)),
                     paths["workdir"]],
                    cwd=REPO, env=subprocess_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
                with open(paths["started"], "w") as f:
                    f.write(str(child.pid))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _wait_for_background_runlocal(paths: dict) -> None:
    """Waits until the background build writes its marker; a build that died without one is
    reported as failed (the .failed marker names it)."""
    pid = int(open(paths["started"]).read())
    deadline = time.monotonic() + MAIN_JOB_TIMEOUT_S
    while not (os.path.exists(paths["done"]) or os.path.exists(paths["failed"])):
        try:
            os.waitpid(pid, os.WNOHANG)  # reaps it if this process started it; others: ChildProcessError
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        if not alive and not (os.path.exists(paths["done"]) or os.path.exists(paths["failed"])):
            with open(paths["failed"], "w") as f:
                f.write(f"the background runlocal build (pid {pid}) ended without a result")
        elif time.monotonic() > deadline:
            raise RuntimeError(f"the background runlocal build (pid {pid}) ran past {MAIN_JOB_TIMEOUT_S} s")
        else:
            time.sleep(0.5)


@pytest.fixture(scope="session")
def runlocal_workdir(tmp_path_factory) -> str:
    """Workdir of one complete main job with `experiments/shapes.py:runlocal`; treat as read-only.

    Tests that modify a workdir copy it first (xdist workers may read this one concurrently).
    Usually started in the background at collection (`_start_runlocal_in_background`); built
    here when it was not.
    """
    paths = _runlocal_paths(tmp_path_factory.getbasetemp())
    workdir, done, failed = paths["workdir"], paths["done"], paths["failed"]
    with open(paths["lock"], "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            background = os.path.exists(paths["started"])
            if not background and not os.path.exists(done) and not os.path.exists(failed):
                build_runlocal(workdir)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if background:
        _wait_for_background_runlocal(paths)
    if os.path.exists(failed):  # one failed run is reported by every test that needs it
        with open(failed) as f:
            raise RuntimeError(f"the runlocal main job failed: {f.read()}")
    return workdir


@pytest.fixture(scope="session")
def runlocal_output(runlocal_workdir) -> tuple[str, str]:
    """(stdout, stderr) of the `runlocal_workdir` main job, as it printed them."""
    return tuple(open(f"{runlocal_workdir}.{name}").read() for name in ("stdout", "stderr"))


@pytest.fixture(scope="session")
def networks_root(tmp_path_factory) -> str:
    """A root of converted feature networks (tests/feature_nets.py: the real I3D, random
    InceptionV3 and CLIP 'mu'), built once per session and shared by the xdist workers."""
    from feature_nets import make_networks_root
    root = _shared_root(tmp_path_factory.getbasetemp())
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


@pytest.fixture(scope="session")
def evaluated_workdir(runlocal_workdir, networks_root, tmp_path_factory) -> dict:
    """A copy of `runlocal_workdir` (named wd) evaluated once by `python -m pixeldance.evaluate`
    (protocol runlocal, 6 generated videos: a shard of 4 and a partial one), shared by the xdist
    workers; treat as read-only. dict(workdir, stats_dir (its real statistics), stdout). The CLI's
    test checks this run; the evaluation notebook's resumes a copy of it (nothing left to
    generate, the real statistics cached), so the two pay for one evaluation."""
    root = _shared_root(tmp_path_factory.getbasetemp())
    folder = root / "evaluated"
    workdir, stats_dir = str(folder / "wd"), str(folder / "stats")
    done, failed = str(folder) + ".done", str(folder) + ".failed"
    with open(str(folder) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not os.path.exists(done) and not os.path.exists(failed):
                shutil.rmtree(folder, ignore_errors=True)
                shutil.copytree(runlocal_workdir, workdir)
                proc = run_python("-m", "pixeldance.evaluate", f"--workdir={workdir}", f"--networks={networks_root}",
                                  f"--stats_dir={stats_dir}", "--num_generated=6", timeout=900)
                with open(str(folder) + ".stdout", "w") as f:
                    f.write(proc.stdout)
                with open(done if proc.returncode == 0 else failed, "w") as f:
                    f.write(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if os.path.exists(failed):
        with open(failed) as f:
            raise RuntimeError(f"python -m pixeldance.evaluate on the runlocal workdir failed: {f.read()}")
    return dict(workdir=workdir, stats_dir=stats_dir, stdout=open(str(folder) + ".stdout").read())


def pytest_collection_modifyitems(config, items):
    """Tests that need the main job go last, so xdist workers run the others while one builds it."""
    items.sort(key=lambda item: "runlocal_workdir" in getattr(item, "fixturenames", ()))
    _mark_quick(items)


def pytest_collection_finish(session):
    """After `-m` / `-k` deselection: the main job starts only when a selected test needs it."""
    if any("runlocal_workdir" in getattr(item, "fixturenames", ()) for item in session.items):
        _start_runlocal_in_background(_runlocal_paths(session.config._tmp_path_factory.getbasetemp()))


# `python -m pytest -n 2 -m quick`: a subset that touches every area in under 2 minutes on an idle
# 2-core machine, for a check before the full suite. One list here (not markers in the test files,
# which several people edit), by test function: every parametrization of one is in. None may use
# the main job (`runlocal_workdir`); tests/test_packaging.py checks that each entry still exists.
QUICK = (
    # models
    "tests/test_dit_model.py::test_decode_variant",
    "tests/test_dit_model.py::test_every_parameter_has_logical_names",
    "tests/test_dit_model.py::test_chunked_attention_matches_reference",
    "tests/test_dit_model.py::test_kernel_choice_on_cpu",
    "tests/test_vae_model.py::test_bad_video_shape_raises",
    "tests/test_vae_model.py::test_bad_latent_shape_raises",
    "tests/test_vae_model.py::test_unknown_variant_names_valid_ones",
    "tests/test_vae_model.py::test_bad_constructor_fields_raise",
    "tests/test_vae_model.py::test_rearrangements_invert",
    "tests/test_vae_model.py::test_encoder_is_causal",
    "tests/test_vae_model.py::test_decoder_is_causal",
    "tests/test_vae_model.py::test_every_param_is_partitioned_with_known_logical_names",
    # diffusion and sampling
    "tests/test_diffusion.py::test_objective_paths",
    "tests/test_diffusion.py::test_guidance_scale_one_is_the_conditional_prediction",
    "tests/test_diffusion.py::test_guidance_separate_scales",
    "tests/test_diffusion.py::test_guided_sample_branches",
    "tests/test_diffusion.py::test_tau_is_the_number_of_steps_that_see_the_last_frame",
    "tests/test_diffusion.py::test_samplers_reject_unknown_names",
    "tests/test_diffusion.py::test_sampler_order_on_the_flow_path",
    "tests/test_diffusion.py::test_exact_output_gives_zero_loss_and_the_true_denoising",
    "tests/test_diffusion.py::test_task_loss_dropout_rates",
    "tests/test_sampling.py::test_time_grid",
    "tests/test_sampling.py::test_make_instructions",
    "tests/test_sampling.py::test_velocity_and_x0_are_inverses",
    # training
    "tests/test_train.py::test_ema_decay_warmup",
    "tests/test_train.py::test_non_finite_loss_stops_training",
    # data
    "tests/test_synthetic.py::test_held_out_are_novel_combinations_of_seen_parts",
    "tests/test_synthetic.py::test_caption_round_trip",
    "tests/test_synthetic.py::test_source_is_deterministic_and_order_free",
    "tests/test_synthetic.py::test_item_format",
    "tests/test_synthetic.py::test_importable_without_jax",
    "tests/test_synthetic.py::test_two_objects_scored_separately",
    "tests/test_buckets.py::test_every_batch_one_shape_and_the_right_bucket",
    "tests/test_video_folder.py::test_stride_clips_match_a_full_decode",
    "tests/test_video_folder.py::test_raise_names_the_file",
    "tests/test_image_folder.py::test_images_are_one_frame_videos",
    "tests/test_image_folder.py::test_mixture_index_map_is_exact_and_deterministic",
    "tests/test_data_roots.py::test_outside_row_raises_one_line_and_is_never_opened",
    "tests/test_latent_cache.py::test_record_round_trip_and_bad_records",
    "tests/test_latent_cache.py::test_missing_and_corrupt_caches_name_the_path",
    "tests/test_workdir.py::test_latent_stats_round_trip_and_normalise",
    "tests/test_workdir.py::test_latent_stats_bad_files_name_the_file",
    # checkpoint integrity
    "tests/test_integrity.py::test_every_save_is_sealed_with_its_files_checksums",
    "tests/test_integrity.py::test_damaged_newest_checkpoint_falls_back_to_the_older_one",
    "tests/test_integrity.py::test_unsealed_newest_checkpoint_is_not_trusted",
    "tests/test_integrity.py::test_no_usable_checkpoint_is_one_line_naming_each",
    "tests/test_integrity.py::test_damaged_cache_shard_is_found_and_only_it_is_rewritten",
    # configs and command-line validation
    "tests/test_configs.py::test_experiment_builds",
    "tests/test_configs.py::test_override_misspelt_key",
    "tests/test_configs.py::test_parse_arg_errors",
    "tests/test_cli_validation.py::test_bad_setting_is_one_line_before_any_work",
    "tests/test_cli_validation.py::test_output_naming_a_folder",
    "tests/test_cli_validation.py::test_writers_leave_no_partial_file_when_the_path_is_a_folder",
    "tests/test_cli_validation.py::test_over_long_prompt_is_cut_with_one_warning",
    "tests/test_ablation_table.py::test_bad_rows_and_missing_reports",
    "tests/test_ablation_table.py::test_cited_repository_files_exist",
    # import layers and packaging
    "tests/test_layers.py::test_import_contracts_are_kept",
    "tests/test_packaging.py::test_every_entry_point_is_listed_described_and_imports",
    "tests/test_packaging.py::test_help_lists_them_without_importing_jax",
    "tests/test_packaging.py::test_pyproject_metadata",
    "tests/test_packaging.py::test_wheel_has_the_package_and_its_pins",
    "tests/test_packaging.py::test_quick_subset_names_existing_tests",
)
_QUICK_FILES = {entry.split("::")[0].rsplit("/", 1)[-1] for entry in QUICK}


def _mark_quick(items):
    quick = set(QUICK)
    for item in items:
        if item.nodeid.split("[")[0] in quick:
            if "runlocal_workdir" in getattr(item, "fixturenames", ()):
                raise pytest.UsageError(f"conftest.QUICK: {item.nodeid} needs the main job")
            item.add_marker(pytest.mark.quick)


def pytest_ignore_collect(collection_path, config):
    """With exactly `-m quick`, the files without quick tests are not even imported (collecting
    all of them, with torch and diffusers, would be a fifth of the quick run)."""
    if (config.getoption("markexpr", "") == "quick" and collection_path.suffix == ".py"
            and collection_path.name.startswith("test_")
            and collection_path.name not in _QUICK_FILES):
        return True
    return None
