"""Huge pages for malloc (pixeldance/hugepages.py): when the command lines start again with
glibc.malloc.hugetlb=1, that they keep their arguments and process id, and that they do it before
anything else runs."""
import ast
import os
import subprocess
import sys
import time

import pytest

from pixeldance import hugepages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIVE = hugepages.wanted(dict(os.environ, GLIBC_TUNABLES="", PIXELDANCE_HUGEPAGES="1"))
NOT_HERE = f"this machine would not re-exec (glibc {hugepages.glibc_version()}, THP {hugepages.thp_mode()})"


def test_wanted_only_where_it_helps_and_once():
    ok = dict(environ={}, glibc=(2, 36), thp="madvise", platform="linux")
    assert hugepages.wanted(**ok)
    assert hugepages.wanted(**dict(ok, thp="always"))
    assert hugepages.wanted(**dict(ok, environ={"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}))
    for change in (dict(platform="darwin"), dict(glibc=(2, 31)), dict(glibc=None), dict(thp="never"),
                   dict(thp=None), dict(environ={"PIXELDANCE_HUGEPAGES": "0"}),
                   dict(environ={"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),  # done: no loop
                   dict(environ={"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"})):
        assert not hugepages.wanted(**dict(ok, **change)), change


def test_tunable_added_to_what_is_set(tmp_path):
    assert hugepages.with_tunable("") == "glibc.malloc.hugetlb=1"
    assert hugepages.with_tunable("glibc.malloc.arena_max=2") == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(str(f)) == "madvise"
    f.write_text("[always] madvise never\n")
    assert hugepages.thp_mode(str(f)) == "always"
    assert hugepages.thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.skipif(not LIVE, reason=NOT_HERE)
def test_reexec_keeps_arguments_and_process_id():
    code = ("import os, sys; from pixeldance import hugepages; print('start', os.getpid(), flush=True); "
            "hugepages.reexec(); print('after', os.getpid(), os.environ['GLIBC_TUNABLES'], sys.argv[1:])")
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.arena_max=4", PYTHONPATH=REPO)
    env.pop("PIXELDANCE_HUGEPAGES", None)
    out = subprocess.run([sys.executable, "-c", code, "a b", "--x=1"], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split("\n")
    starts = [line for line in out if line.startswith("start")]
    assert len(starts) == 2 and starts[0] == starts[1]  # ran twice, as one process
    pid = starts[0].split()[1]
    assert out[2] == f"after {pid} glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1 ['a b', '--x=1']"
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, PIXELDANCE_HUGEPAGES="0"),
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.count("start") == 1 and "hugetlb" not in out  # turned off


@pytest.mark.parametrize("module", ["main", "sample", "evaluate"])
def test_command_lines_reexec_before_any_import(module):
    """The block comes first (after the docstring and `from __future__`): anything imported
    before it would be imported twice, JAX's seconds included."""
    tree = ast.parse(open(os.path.join(REPO, "pixeldance", f"{module}.py")).read())
    body = [node for node in tree.body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    assert isinstance(body[0], ast.ImportFrom) and body[0].module == "__future__"
    block = body[1]
    assert isinstance(block, ast.If) and ast.unparse(block.test) == "__name__ == '__main__'"
    assert [ast.unparse(n) for n in block.body] == ["from pixeldance import hugepages", "hugepages.reexec()"]


@pytest.mark.skipif(not LIVE, reason=NOT_HERE)
def test_main_job_runs_with_huge_pages():
    """`python -m pixeldance.main` is running with the tunable while it imports (read from /proc)."""
    env = dict(os.environ, PYTHONPATH=REPO, GLIBC_TUNABLES="")
    env.pop("PIXELDANCE_HUGEPAGES", None)
    proc = subprocess.Popen([sys.executable, "-m", "pixeldance.main", "--helpshort"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = b""
    try:
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline and b"hugetlb" not in seen:
            try:
                with open(f"/proc/{proc.pid}/environ", "rb") as f:
                    seen = f.read()
            except OSError:
                pass
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    assert b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1\x00" in seen
