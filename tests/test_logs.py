"""The command lines' log (pixeldance/logs.py): no library INFO lines unless --verbosity=1, one
line per stage start and end, and log lines written around tqdm's progress bars."""
import os
import re
import subprocess
import sys

from pixeldance import workdir as workdir_lib

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pixeldance")
# absl's prefix: level, date, time, thread, file:line]
RECORD = re.compile(r"([IWEF])\d{4} [\d:.]+\s+\d+ ([\w.]+):\d+\] ([^\n\r]*)")


def _modules_logging_info() -> set[str]:
    """Basenames of pixeldance's modules that log INFO lines (a library's module of the same name,
    such as Orbax's checkpoint.py, is told apart by pixeldance's not logging INFO)."""
    names = set()
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py") and re.search(r"logging\.info\(", open(os.path.join(root, name)).read()):
                names.add(name)
    return names


def test_main_job_logs_no_library_info_lines(runlocal_output, runlocal_workdir):
    stdout, stderr = runlocal_output
    records = RECORD.findall(stdout + stderr)
    ours = _modules_logging_info()
    library_info = [r for r in records if r[0] == "I" and r[1] not in ours]
    assert not library_info, library_info[:5]
    # One line as each stage starts and one as it ends, naming what it writes.
    config = workdir_lib.read_config(runlocal_workdir)
    stage_lines = [message for _, name, message in records if name == "logs.py"]
    expected = []
    for stage in ("train_vae", "cache", "train_dit", "sample"):
        outputs = ", ".join(workdir_lib.stage_outputs(config, runlocal_workdir, stage))
        expected += [f"stage {stage}: starting; writes {outputs}", f"stage {stage}: done in"]
    assert len(stage_lines) == len(expected)
    for line, start in zip(stage_lines, expected):
        assert line.startswith(start), (line, start)


SCRIPT = r'''
import logging, sys
from absl import app, logging as absl_logging
from tqdm import tqdm
from pixeldance import logs

def main(argv):
    logs.setup()
    absl_logging.info("library info")  # this file is not pixeldance's: a library's line
    logging.getLogger("orbax").info("orbax info")
    absl_logging.warning("library warning")
    bar = tqdm(total=3, desc="bar", file=sys.stderr)
    bar.update(1)
    absl_logging.warning("warning while the bar is drawn")
    print("printed", end="")
    print(" whole")
    bar.update(2)
    bar.close()
    with logs.stage("toy", [argv[1]]):
        open(argv[1], "w").close()

app.run(main)
'''


def _run(tmp_path, *flags):
    script = tmp_path / "toy_main.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out.txt"), *flags],
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return proc.stdout.decode(), proc.stderr.decode()  # bytes: the bars' carriage returns kept


def test_library_info_lines_only_with_verbosity(tmp_path):
    stdout, stderr = _run(tmp_path)
    assert "library info" not in stderr and "orbax info" not in stderr
    assert "library warning" in stderr  # a library's warnings stay
    assert re.search(r"logs\.py:\d+\] stage toy: starting; writes .*out\.txt\n", stderr)
    assert re.search(r"logs\.py:\d+\] stage toy: done in 0 s; wrote .*out\.txt\n", stderr)
    assert stdout == "printed whole\n"
    _, stderr = _run(tmp_path, "--verbosity=1")
    assert "library info" in stderr and "orbax info" in stderr


def test_log_lines_are_written_around_progress_bars(tmp_path):
    """The bar is cleared (a carriage return) before the line and drawn again after it: the line
    does not continue the bar's text."""
    _, stderr = _run(tmp_path)
    (record,) = [m for m in re.finditer(r"W\d{4} [^\n]*warning while the bar is drawn\n", stderr)]
    assert stderr[record.start() - 1] == "\r", repr(stderr[record.start() - 80:record.end()])
    assert stderr[record.end():].startswith("\rbar:  33%")
