"""Every command line's user errors are one line `error: ...` naming the input, exit code 2.

The entry points (`main` and its cache stage, `sample`, the converters, `plan`, `sweep`,
`tfds_build`, `evaluate`, `tools/metrics`, `paper_tables`, `export_dit`, `ablation_table`) all
fail through pixeldance/cli.py. Most cases run in-process (`run_cli`: the module's own `run()`,
with `cli.run` parsing sys.argv as absl's app.run would, since absl parses flags only once per
process); a few run the real program in a child process. A read-only disk is injected
(`make_read_only`): the tests run as root, which chmod does not stop.
"""
import contextlib
import errno
import json
import os
import sys

import numpy as np
import pytest
from absl import flags
from safetensors.numpy import save_file

from pixeldance import cli
from pixeldance.data import tfds_build  # its flags are defined on import: before run_cli's snapshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
RUNLOCAL = os.path.join(REPO, "experiments", "shapes.py") + ":runlocal"
TRUNCATED = '{"_class_name": "X", "z_dim": 1'  # a config.json cut off mid-write


def make_read_only(root: str):
    """From now on, writes under `root` (files opened for writing, made, renamed or removed,
    folders made or removed) fail with EROFS, as on a read-only mount; reads work. Returns the
    function that undoes it."""
    import builtins
    import io
    root = os.path.realpath(root)

    def inside(path) -> bool:
        if isinstance(path, int):
            return False
        path = os.path.realpath(os.fsdecode(path))
        return path == root or path.startswith(root + os.sep)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    real = dict(open_=builtins.open, os_open=os.open, mkdir=os.mkdir, rename=os.rename, replace=os.replace,
                remove=os.remove, unlink=os.unlink, rmdir=os.rmdir)

    def open_(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and set(mode) & set("wax+") and inside(file):
            refuse(file)
        return real["open_"](file, mode, *args, **kwargs)

    def os_open(path, flag, *args, **kwargs):
        if flag & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC) and inside(path):
            refuse(path)
        return real["os_open"](path, flag, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if inside(path) and not os.path.lexists(path):
            refuse(path)
        return real["mkdir"](path, *args, **kwargs)

    def two(name):
        def patched(src, dst, *args, **kwargs):
            if inside(src) or inside(dst):
                refuse(src if inside(src) else dst)
            return real[name](src, dst, *args, **kwargs)
        return patched

    def one(name):
        def patched(path, *args, **kwargs):
            if inside(path):
                refuse(path)
            return real[name](path, *args, **kwargs)
        return patched

    def install(open_, os_open, mkdir, rename, replace, remove, unlink, rmdir):
        builtins.open = io.open = open_
        os.open, os.mkdir, os.rename, os.replace, os.remove, os.unlink, os.rmdir = (
            os_open, mkdir, rename, replace, remove, unlink, rmdir)

    install(open_, os_open, mkdir, two("rename"), two("replace"), one("remove"), one("unlink"), one("rmdir"))
    return lambda: install(**real)


@contextlib.contextmanager
def read_only(root):
    """`make_read_only(root)` inside the block."""
    undo = make_read_only(str(root))
    try:
        yield
    finally:
        undo()


# `python -c READ_ONLY_CHILD ROOT MODULE ARGS...`: `make_read_only(ROOT)`, then `python -m MODULE ARGS...`.
READ_ONLY_CHILD = (f"import runpy, sys; sys.path.insert(0, {TESTS!r}); from test_cli_errors import make_read_only; "
                   "make_read_only(sys.argv[1]); module = sys.argv[2]; sys.argv = [module] + sys.argv[3:]; "
                   "runpy.run_module(module, run_name='__main__', alter_sys=True)")


def _snapshot(root) -> dict:
    """{relative path: bytes} of every file under root."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return out


def one_line(result, *names) -> str:
    """Exit code 2 and exactly one stderr line, `error: ...`, naming each of `names`."""
    code, _, err = result
    assert code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


IMPORT_TIME = ("pixeldance.data.tfds_build",)  # modules that define their flags on import


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """run_cli(entry, *argv) -> (exit code, stdout, stderr): the command line `entry()` (a module's
    run()) with sys.argv = [prog, *argv], in this process. The flags that pixeldance's entry points
    define when run (e.g. sample's, left by other tests) are set aside for the test and put back
    after it; those an entry point defines (and the flag validators it adds) are removed after
    each call."""
    FLAGS = flags.FLAGS

    def ours(name) -> str | None:
        module = FLAGS.find_module_defining_flag(name) or ""
        return module if module.startswith("pixeldance.") and module not in IMPORT_TIME else None

    aside = {name: (ours(name), FLAGS[name]) for name in list(FLAGS) if ours(name)}
    for name in aside:
        delattr(FLAGS, name)
    before = {name: list(FLAGS[name].validators) for name in FLAGS}

    def run(main, *, errors=()):  # cli.run without app.run's once-per-process flag registration
        cli.one_line_errors(main, errors=errors)(cli.parse_flags(sys.argv))

    monkeypatch.setattr(cli, "run", run)

    def call(entry, *argv):
        monkeypatch.setattr(sys, "argv", ["prog", *map(str, argv)])
        try:
            entry()
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            FLAGS.unparse_flags()
            for name in set(FLAGS) - set(before):  # the entry point's, not a library's imported meanwhile
                if ours(name):
                    delattr(FLAGS, name)
            for name, validators in before.items():  # mark_flags_as_required adds one
                FLAGS[name].validators[:] = validators
        out = capsys.readouterr()
        return code, out.out, out.err

    yield call
    FLAGS.unparse_flags()
    for name, (module, flag) in aside.items():
        FLAGS[name] = flag
        FLAGS.register_flag_by_module(module, flag)


def _converter(name):
    import importlib
    return importlib.import_module(f"pixeldance.convert.{name}").run


# ---------------------------------------------------------------------------------------------
# The converters.
# ---------------------------------------------------------------------------------------------

CONVERTERS = [("i3d", []), ("inception", []), ("c3d", []), ("clip", []), ("text_encoder", ["--kind=t5"]),
              ("wan_vae", []), ("wan_dit", []), ("wan", [])]


@pytest.mark.parametrize("name, extra", CONVERTERS, ids=[c[0] for c in CONVERTERS])
def test_converter_missing_input(run_cli, tmp_path, name, extra):
    missing = tmp_path / "nowhere"
    one_line(run_cli(_converter(name), f"--input={missing}", f"--output={tmp_path / 'out'}", *extra), missing)
    assert not (tmp_path / "out").exists()


def _hf_folder(root, name, config_text, weights=None):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config_text)
    if weights:
        (folder / weights).write_bytes(b"not read: config.json comes first")
    return folder


@pytest.mark.parametrize("name, weights, extra", [
    ("clip", None, []), ("text_encoder", None, ["--kind=t5"]),
    ("wan_vae", "diffusion_pytorch_model.safetensors", []), ("wan_dit", None, [])])
def test_converter_truncated_config_json_is_named(run_cli, tmp_path, name, weights, extra):
    folder = _hf_folder(tmp_path, "in", TRUNCATED, weights)
    line = one_line(run_cli(_converter(name), f"--input={folder}", f"--output={tmp_path / 'out'}", *extra),
                    folder / "config.json")
    assert "JSON" in line, line
    assert not (tmp_path / "out").exists()


def test_wan_converter_names_its_vae_part_config_json(run_cli, tmp_path):
    repo = tmp_path / "repo"
    for part in ("text_encoder", "transformer", "tokenizer"):
        (repo / part).mkdir(parents=True)
    vae = _hf_folder(repo, "vae", TRUNCATED, "diffusion_pytorch_model.safetensors")
    one_line(run_cli(_converter("wan"), f"--input={repo}", f"--output={tmp_path / 'out'}"), vae / "config.json")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("name, config, extra, weights", [
    ("clip", {}, [], "model.safetensors"),
    ("wan_vae", {}, [], "diffusion_pytorch_model.safetensors"),
    ("wan_dit", {"_class_name": "WanTransformer3DModel"}, [], "diffusion_pytorch_model.safetensors")])
def test_converter_missing_safetensors(run_cli, tmp_path, name, config, extra, weights):
    folder = _hf_folder(tmp_path, "in", json.dumps(config))
    one_line(run_cli(_converter(name), f"--input={folder}", f"--output={tmp_path / 'out'}", *extra),
             folder, weights)


def test_text_encoder_converter_names_a_damaged_tokenizer(run_cli, tmp_path):
    folder = _hf_folder(tmp_path, "in", json.dumps({"model_type": "t5"}))
    (folder / "spiece.model").write_bytes(b"\x00 not a SentencePiece model")
    one_line(run_cli(_converter("text_encoder"), f"--input={folder}", f"--output={tmp_path / 'out'}", "--kind=t5"),
             folder / "spiece.model")


def _tiny_wan_dit(root):
    """A valid diffusers WanTransformer3DModel folder of a tiny architecture (zero weights)."""
    from pixeldance.convert import wan_dit as convert_wan
    config = dict(_class_name="WanTransformer3DModel", patch_size=[1, 2, 2], num_attention_heads=2,
                  attention_head_dim=8, in_channels=4, out_channels=4, text_dim=8, freq_dim=8, ffn_dim=16,
                  num_layers=1, rope_max_seq_len=32)
    folder = _hf_folder(root, "dit_in", json.dumps(config))
    fields = convert_wan.fields_from_config(config, "tiny")
    save_file({n: np.zeros(shape, np.float32) for n, (_, _, shape) in convert_wan.expected_tensors(fields).items()},
              str(folder / convert_wan.SINGLE))
    return folder


def test_converter_read_only_output(run_cli, tmp_path, monkeypatch):
    folder = _tiny_wan_dit(tmp_path)
    out = tmp_path / "disk" / "out"
    out.mkdir(parents=True)  # made by the user, on a disk that became read-only
    with read_only(tmp_path / "disk"):
        result = run_cli(_converter("wan_dit"), f"--input={folder}", f"--output={out}")
    line = one_line(result, out)
    assert "Read-only file system" in line and os.listdir(out) == []


def test_converter_output_under_a_file(run_cli, tmp_path):
    folder = _tiny_wan_dit(tmp_path)
    (tmp_path / "notes").write_text("mine")
    one_line(run_cli(_converter("wan_dit"), f"--input={folder}", f"--output={tmp_path / 'notes' / 'out'}"),
             tmp_path / "notes")
    assert (tmp_path / "notes").read_text() == "mine"


@pytest.mark.parametrize("argv, names", [
    (["--dtype=float16"], ["--dtype=float16"]),
    (["--inptu=x"], ["inptu"]),
    (["--verbosity=x"], ["--verbosity=x"]),
    ([], ["--input"]),  # a required flag left out
], ids=["enum", "unknown", "bad-int", "missing"])
def test_converter_bad_flags(run_cli, tmp_path, argv, names):
    given = [] if not argv else [f"--input={tmp_path}"]
    one_line(run_cli(_converter("wan_dit"), *given, f"--output={tmp_path / 'out'}", *argv), *names)


def test_verbosity_1_shows_the_traceback(run_cli, tmp_path):
    from pixeldance.convert.common import ConversionError
    with pytest.raises(ConversionError, match="nowhere"):
        run_cli(_converter("wan_vae"), f"--input={tmp_path / 'nowhere'}", f"--output={tmp_path / 'out'}",
                "--verbosity=1")


def test_a_bug_keeps_its_traceback():
    def main(argv):
        return {}["bug"]
    with pytest.raises(KeyError):
        cli.one_line_errors(main)(["prog"])


def test_converter_program_on_truncated_config_json(python_runner, tmp_path):
    """The real program (absl's app.run): the attack of issue 17, a malformed config.json."""
    folder = _hf_folder(tmp_path, "in", TRUNCATED, "diffusion_pytorch_model.safetensors")
    proc = python_runner("-m", "pixeldance.convert.wan_vae", f"--input={folder}", f"--output={tmp_path / 'out'}")
    one_line((proc.returncode, proc.stdout, proc.stderr), folder / "config.json")


# ---------------------------------------------------------------------------------------------
# The tools.
# ---------------------------------------------------------------------------------------------

def _tool(module):
    import importlib
    return importlib.import_module(f"pixeldance.{module}").run


def test_tools_missing_inputs(run_cli, tmp_path):
    missing = tmp_path / "nowhere"
    one_line(run_cli(_tool("evaluate"), f"--workdir={missing}"), missing)
    one_line(run_cli(_tool("tools.metrics"), f"--generated={missing}", f"--output={tmp_path / 'o.json'}",
                     "--metrics=fid", f"--real={missing}"), missing)
    one_line(run_cli(_tool("tools.paper_tables"), f"--workdirs={missing}"), missing)
    one_line(run_cli(_tool("tools.export_dit"), f"--workdir={missing}", f"--output={tmp_path / 'out'}"), missing)
    one_line(run_cli(_tool("tools.sweep"), f"--config={RUNLOCAL}", f"--workdir={missing}"), missing)
    one_line(run_cli(_tool("tools.sweep"), f"--config={missing}.py", f"--workdir={tmp_path}"), f"{missing}.py")
    assert os.listdir(tmp_path) == []


def test_tools_bad_flag_values(run_cli, tmp_path):
    one_line(run_cli(_tool("evaluate"), f"--workdir={tmp_path}", "--num_generated=1"), "--num_generated")
    one_line(run_cli(_tool("evaluate"), f"--workdir={tmp_path}", "--mode=v2v"), "--mode=v2v")
    one_line(run_cli(_tool("tools.metrics"), f"--generated={tmp_path}", "--batch_size=0",
                     f"--output={tmp_path / 'o.json'}"), "--batch_size")
    one_line(run_cli(_tool("tools.sweep"), f"--config={RUNLOCAL}", f"--workdir={tmp_path}",
                     "--config.sample.stepz=3"), "--config.sample.stepz", "stepz")
    assert os.listdir(tmp_path) == []


def test_paper_tables_names_a_garbled_result(run_cli, tmp_path):
    path = tmp_path / "fvd.json"
    path.write_text('{"name": "ucf101_fvd", "metr')
    one_line(run_cli(_tool("tools.paper_tables"), f"--results={path}"), path)


def test_ablation_table_errors(run_cli, tmp_path):
    from pixeldance.tools import ablation_table
    workdir = tmp_path / "full"
    workdir.mkdir()
    report = workdir / "faithfulness.json"
    one_line(run_cli(ablation_table.main, f"--rows=full={workdir}"), report)  # missing
    report.write_text('{"t2v": {"heldout": ')
    one_line(run_cli(ablation_table.main, f"--rows=full={workdir}"), report)  # truncated
    one_line(run_cli(ablation_table.main, "--rows=full"), "full", "NAME=WORKDIR")
    one_line(run_cli(ablation_table.main), "--rows")  # argparse: a required argument
    one_line(run_cli(ablation_table.main, "--rows=a=b", "--bogus"), "--bogus")


def test_tfds_build_errors(run_cli, tmp_path):
    def entry():
        flags.mark_flags_as_required(["dataset", "manual_dir", "data_dir"])
        cli.run(tfds_build.main)

    missing = tmp_path / "nowhere"
    one_line(run_cli(entry, "--dataset=ucf101", f"--manual_dir={missing}", f"--data_dir={tmp_path / 'data'}"),
             missing)
    one_line(run_cli(entry, "--dataset=kinetics", f"--manual_dir={tmp_path}", f"--data_dir={tmp_path / 'data'}"),
             "--dataset=kinetics")
    one_line(run_cli(entry, "--dataset=ucf101", f"--manual_dir={tmp_path}", f"--data_dir={tmp_path / 'data'}",
                     "--ucf101_split=x"), "--ucf101_split=x")


def test_plan_program_errors(python_runner, tmp_path):
    missing = tmp_path / "nope.py"
    proc = python_runner("-m", "pixeldance.tools.plan", f"--config={missing}")
    one_line((proc.returncode, proc.stdout, proc.stderr), missing)


# ---------------------------------------------------------------------------------------------
# The main job (and its cache stage) and sampling.
# ---------------------------------------------------------------------------------------------

def _main_entry():
    from pixeldance import main
    main.define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main.main)


def test_cache_stage_without_a_vae(run_cli, tmp_path):
    """The cache stage's progress bar, open when the error comes, ends its line first."""
    workdir = tmp_path / "wd"
    code, _, err = run_cli(_main_entry, f"--config={RUNLOCAL}", f"--workdir={workdir}", "--config.mode=cache")
    last = err.rstrip().splitlines()[-1]
    assert code == 2 and last == f"error: no checkpoint in {workdir / 'vae'}", err[-3000:]
    assert "Traceback" not in err and err.count("error:") == 1, err[-3000:]


def test_main_read_only_workdir(python_runner, tmp_path):
    """A run restarted on a workdir whose disk became read-only: one line naming the file it could
    not write, and every file already there unchanged."""
    workdir = tmp_path / "wd"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"mode": "train"}')
    (workdir / "notes.txt").write_text("mine")
    before = _snapshot(workdir)
    proc = python_runner("-c", READ_ONLY_CHILD, str(workdir), "pixeldance.main", f"--config={RUNLOCAL}",
                         f"--workdir={workdir}")
    line = one_line((proc.returncode, proc.stdout, proc.stderr), workdir / "config.json")
    assert "read-only" in line.lower(), line
    assert _snapshot(workdir) == before


def test_sample_read_only_output_folder(run_cli, tmp_path):
    from pixeldance import sample
    workdir = tmp_path / "wd"
    workdir.mkdir()
    out = workdir / "samples" / "a.mp4"
    with read_only(workdir):
        result = run_cli(sample.run, f"--workdir={workdir}", "--prompt=a", f"--output={out}")
    line = one_line(result, out, workdir)
    assert "Read-only file system" in line and os.listdir(workdir) == []


def test_load_pipeline_on_a_converted_vae_folder(run_cli, tmp_path):
    """A folder of `python -m pixeldance.convert.wan_vae` (its config.json as the converter writes
    it): not a pipeline, said in one line, before any weights are read."""
    from pixeldance import sample
    folder = tmp_path / "wan_vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"vae": {"family": "wan", "source": "/x"}}))
    with pytest.raises(ValueError) as e:
        sample.load_pipeline(str(folder))
    message = str(e.value)
    assert "\n" not in message and "converted VAE" in message and "pixeldance.load_vae" in message, message
    assert "load_pipeline expects a trained workdir" in message
    one_line(run_cli(sample.run, f"--workdir={folder}", "--prompt=a", f"--output={tmp_path / 'a.mp4'}"),
             folder, "converted VAE")


# ---------------------------------------------------------------------------------------------
# A failed checkpoint save: Orbax's threads' tracebacks are held back, the cause is the last line
# (the whole job under a file-size limit: tests/test_integrity.py).
# ---------------------------------------------------------------------------------------------

def _orbax_noise():
    """What Orbax and TensorStore threads print when a write fails: an ERROR record logged from
    an Orbax module, asyncio's record of a write task's error (its traceback through Orbax), and
    an unraisable 'Event loop is closed'."""
    import asyncio
    import logging
    import types
    import orbax.checkpoint as ocp
    orbax = os.path.dirname(ocp.__file__)
    record = logging.LogRecord("absl", logging.ERROR, os.path.join(orbax, "future.py"), 387,
                               "_SignalingThread.run() raised an exception", None, None)
    logging.getLogger("absl").handle(record)
    try:
        exec(compile("raise ValueError('OUT_OF_RANGE: Error writing')", os.path.join(orbax, "serialization.py"),
                     "exec"))
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("asyncio", logging.ERROR, asyncio.base_events.__file__, 1771,
                               "Task exception was never retrieved", None, exc_info)
    logging.getLogger("asyncio").handle(record)
    sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("Event loop is closed"),
                                             exc_traceback=None, err_msg=None, object=None))


@pytest.mark.parametrize("fails", [True, False], ids=["failed", "succeeded"])
def test_save_holds_back_orbax_noise_until_its_outcome(tmp_path, monkeypatch, caplog, fails):
    import logging
    from pixeldance import checkpoint as ckpt_lib
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda args: seen.append(str(args.exc_value)))
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), use_async=False)

    def save(step, args, force=False):
        _orbax_noise()
        sys.unraisablehook(type("Args", (), dict(exc_value=ValueError("a real bug")))())  # passes at once
        if fails:
            raise OSError(errno.EFBIG, "File too large")
        return False  # nothing saved: the noise is printed at the next wait

    monkeypatch.setattr(ckpt._manager, "save", save)
    caplog.set_level(logging.ERROR, logger="absl")
    if fails:
        with pytest.raises(ckpt_lib.CheckpointWriteError, match="File too large"):
            ckpt.save(3, {"w": np.zeros(3, np.float32)})
    else:
        ckpt.save(3, {"w": np.zeros(3, np.float32)})
        assert seen == ["a real bug"] and not caplog.records  # held while the save may still fail
        ckpt.wait()
    ckpt.close()
    if fails:
        assert seen == ["a real bug"] and not caplog.records
    else:
        assert seen == ["a real bug", "Event loop is closed"]
        assert [r.getMessage() for r in caplog.records] == ["_SignalingThread.run() raised an exception",
                                                            "Task exception was never retrieved"]
    assert not any(isinstance(f, ckpt_lib._HeldErrors) for f in logging.getLogger("absl").filters)
    before = list(seen)
    _orbax_noise()  # after close(): Orbax's records pass; a failed save's late callbacks stay silent
    assert [r.getMessage() for r in caplog.records[-2:]] == ["_SignalingThread.run() raised an exception",
                                                             "Task exception was never retrieved"]
    assert seen == before + ([] if fails else ["Event loop is closed"])


def test_full_disk_is_one_line_naming_the_file(run_cli, tmp_path, monkeypatch):
    """A write that fails with ENOSPC (here: ablation_table's --output)."""
    import builtins
    from pixeldance.tools import ablation_table
    workdir = tmp_path / "full"
    workdir.mkdir()
    (workdir / "faithfulness.json").write_text("{}")
    out = tmp_path / "table.json"
    real_open = builtins.open

    def full(file, mode="r", *args, **kwargs):
        if os.fspath(file) == str(out) and "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full)
    line = one_line(run_cli(ablation_table.main, f"--rows=full={workdir}", f"--output={out}"), out)
    assert line == f"error: {out}: No space left on device"
