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


NETWORK_LIMITS = ("--test-timeout", "30", "--timeout", "240")

# test_ssl takes over a minute, most of it waiting out timeouts that its
# tests expect of the stock loop: it runs in the background from the start
# of this module, beside the other suites, and its test collects the result.
BACKGROUND = {"test_ssl": NETWORK_LIMITS}
_background = {}


def _command(suite, *extra):
    return [sys.executable, str(RUNNER), "--loop", "both", "--suites", suite, "-v", *extra]


@pytest.fixture(scope="module", autouse=True)
def _background_suites(request):
    selected = {item.callspec.params.get("suite") for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")}
    for suite, extra in BACKGROUND.items():
        if suite in selected:
            _background[suite] = subprocess.Popen(
                _command(suite, *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True)
    yield
    for proc in _background.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    _background.clear()


def _check(returncode, report):
    assert returncode == 0, report
    assert "0 regression(s)" in report, report


def _run(suite, *extra):
    if suite in _background:
        proc = _background[suite]
        report, _ = proc.communicate(timeout=900)
        _check(proc.returncode, report)
        return
    proc = subprocess.run(_command(suite, *extra), capture_output=True, text=True, timeout=900)
    _check(proc.returncode, proc.stdout + proc.stderr)


@pytest.mark.cpython
@pytest.mark.parametrize("suite", CORE_SUITES)
def test_cpython_suite_has_no_regressions(suite):
    _run(suite)


@pytest.mark.cpython
@pytest.mark.parametrize("suite", NETWORK_SUITES)
def test_cpython_network_suite_has_no_regressions(suite):
    # Each of these takes seconds on either loop; the limits only bound a
    # hang (a hung test is reported by name, with the stack it hung in).
    _run(suite, *NETWORK_LIMITS)
