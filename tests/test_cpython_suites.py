"""CPython's own test.test_asyncio suites, run against mtloop.

tools/cpython_asyncio.py runs each suite on the stock loop and on mtloop in
separate processes and fails when a test passes on the stock loop but not on
mtloop, unless tools/cpython_asyncio_known.py lists it with a reason.
"""

import pathlib
import subprocess
import sys

import pytest

RUNNER = pathlib.Path(__file__).resolve().parent.parent / "tools" / "cpython_asyncio.py"

CORE_SUITES = ["test_events", "test_runners", "test_taskgroups", "test_timeouts",
               "test_tasks", "test_futures"]


@pytest.mark.cpython
@pytest.mark.parametrize("suite", CORE_SUITES)
def test_cpython_suite_has_no_regressions(suite):
    proc = subprocess.run(
        [sys.executable, str(RUNNER), "--loop", "both", "--suites", suite, "-v"],
        capture_output=True, text=True, timeout=900)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert "0 regression(s)" in report, report
