"""How the test process ends (tests/conftest.py): with pytest's exit status, after the atexit handlers,
without the interpreter's teardown of native libraries (unless TESTS_FULL_TEARDOWN=1)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TEST_MODULE = '''
import atexit
from pathlib import Path

MARKS = Path({marks!r})


def _at_exit():
    (MARKS / "atexit").write_text("ran")


class _TornDown:
    def __init__(self, path):
        self.path = str(path)

    def __del__(self, open=open):  # a default: the module's globals may be gone by then
        with open(self.path, "w") as f:
            f.write("ran")


atexit.register(_at_exit)
TORN_DOWN = _TornDown(MARKS / "teardown")  # a module global: collected only in the interpreter's teardown


def test_outcome():
    assert {passes}
'''


def run_session(tmp_path, passes: bool, full_teardown: bool = False):
    marks = tmp_path / "marks"
    marks.mkdir()
    module = tmp_path / "test_outcome_module.py"
    module.write_text(TEST_MODULE.format(marks=str(marks), passes=passes))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    env.pop("TESTS_FULL_TEARDOWN", None)
    if full_teardown:
        env["TESTS_FULL_TEARDOWN"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           "--rootdir", str(tmp_path), str(module)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return proc, {p.name for p in marks.iterdir()}


@pytest.mark.parametrize("passes, status, summary", [(True, 0, "1 passed"), (False, 1, "1 failed")])
def test_the_process_exits_with_pytests_status_after_its_summary(tmp_path, passes, status, summary):
    proc, _ = run_session(tmp_path, passes)
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert summary in proc.stdout.splitlines()[-1]


def test_the_atexit_handlers_run_but_the_interpreter_teardown_does_not(tmp_path):
    proc, marks = run_session(tmp_path, passes=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert marks == {"atexit"}


def test_full_teardown_keeps_the_ordinary_interpreter_exit(tmp_path):
    proc, marks = run_session(tmp_path, passes=True, full_teardown=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert marks == {"atexit", "teardown"}
