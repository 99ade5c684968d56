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

# The runner's network group: transports, servers, streams, sendfile (issue #3),
# TLS (issue #10).
NETWORK_SUITES = ["test_events:network", "test_streams", "test_server",
                  "test_buffered_proto", "test_sock_lowlevel", "test_sendfile",
                  "test_ssl", "test_sslproto"]


def _run(suite, *extra):
    proc = subprocess.run(
        [sys.executable, str(RUNNER), "--loop", "both", "--suites", suite, "-v",
         *extra],
        capture_output=True, text=True, timeout=900)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert "0 regression(s)" in report, report


@pytest.mark.cpython
@pytest.mark.parametrize("suite", CORE_SUITES)
def test_cpython_suite_has_no_regressions(suite):
    _run(suite)


@pytest.mark.cpython
@pytest.mark.parametrize("suite", NETWORK_SUITES)
def test_cpython_network_suite_has_no_regressions(suite):
    # Each of these takes seconds on either loop; the limits only bound a
    # hang (a hung test is reported by name, with the stack it hung in).
    _run(suite, "--test-timeout", "30", "--timeout", "240")
