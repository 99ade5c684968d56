"""Shared fixtures for the mtloop behavioural suite.

Every behavioural test runs against three event loops:

* ``asyncio`` -- the stock loop made by ``asyncio.new_event_loop()`` under the
  default policy.  Its behaviour is the specification: every test must pass
  on it.
* ``uvloop``  -- a reference C loop.  It is *not* the specification: where it
  deviates a test is marked ``@pytest.mark.uvloop_xfail(reason)``, which turns
  into ``xfail(strict=True)`` for the uvloop parameter only.  The parameter is
  skipped only when uvloop is not importable.
* ``mtloop``  -- the loop under test.  It is never skipped: if ``import
  mtloop`` fails, or it lacks the public API, its tests fail.

Fixtures:

* ``loop_factory`` -- parametrized (ids ``asyncio``, ``uvloop``, ``mtloop``);
  a zero-argument callable returning a new, not running, loop.
* ``impl`` -- the :class:`Impl` record of the same parameter (loop class,
  policy class, ``run`` function).
* ``loop`` -- a fresh loop from ``loop_factory``; closed at teardown (and
  checked not to be running any more).
* ``run`` -- ``run(awaitable, timeout=...)`` runs it to completion on ``loop``
  with a hang guard and returns its result.

Options: ``--stress`` runs the tests marked ``stress`` (skipped otherwise).

A hang guard (SIGALRM after 45 s, then faulthandler after 90 s) on every
test that uses ``loop_factory`` keeps a loop that never wakes up from
blocking the whole session.
"""

import asyncio
import dataclasses
import faulthandler
import importlib.machinery
import os
import signal
import socket
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest


def _prefer_built_mtloop():
    """Do not let the source tree's ``mtloop/`` shadow the installed package.

    ``python -m pytest`` run from the repository root puts the root on
    sys.path, where ``mtloop/`` holds the Python sources but not the compiled
    ``_mtloop`` extension (that lives in the installed copy).  When the source
    package has no extension and another ``mtloop`` is importable, the root is
    dropped from sys.path so that the installed package is the one tested.
    Otherwise nothing changes (and a broken import fails the mtloop tests).
    """
    repo = Path(__file__).resolve().parent.parent
    src_pkg = repo / "mtloop"
    if not src_pkg.is_dir() or any(src_pkg.glob("_mtloop*.so")):
        return

    def is_repo(entry):
        try:
            return Path(entry or os.getcwd()).resolve() == repo
        except OSError:
            return False

    others = [p for p in sys.path if not is_repo(p)]
    if len(others) != len(sys.path) and importlib.machinery.PathFinder.find_spec(
        "mtloop", others
    ):
        sys.path[:] = others


_prefer_built_mtloop()

IMPL_IDS = ("asyncio", "uvloop", "mtloop")

# Upper bound for anything that "must happen promptly": it only trips on a hang.
HANG_TIMEOUT = 10.0
# Per-test guard: a test still running after this long is interrupted.
TEST_GUARD_SECONDS = 45
# Last resort: dump all tracebacks and exit if even the guard cannot interrupt.
TEST_HARD_LIMIT_SECONDS = 90


# --------------------------------------------------------------------------
# pytest hooks


def pytest_addoption(parser):
    parser.addoption(
        "--stress",
        action="store_true",
        default=False,
        help="run the long load tests marked 'stress'",
    )
    parser.addoption(
        "--wheel",
        action="store_true",
        default=False,
        help="run the tests marked 'wheel' (tools/wheel.sh and a fresh virtualenv)",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "uvloop_xfail(reason, strict=True, condition=True, run=True): uvloop deviates from "
        "asyncio here; the uvloop parameter of the test is marked xfail with this reason",
    )


def pytest_collection_modifyitems(config, items):
    run_stress = config.getoption("--stress")
    skip_stress = pytest.mark.skip(reason="stress test: run with --stress")
    run_wheel = config.getoption("--wheel")
    skip_wheel = pytest.mark.skip(reason="builds a wheel: run with --wheel (tools/test.sh "
                                  "does, on its first Python)")
    for item in items:
        if not run_stress and item.get_closest_marker("stress") is not None:
            item.add_marker(skip_stress)
        if not run_wheel and item.get_closest_marker("wheel") is not None:
            item.add_marker(skip_wheel)
        callspec = getattr(item, "callspec", None)
        if callspec is None or callspec.params.get("loop_factory") != "uvloop":
            continue
        for mark in item.iter_markers("uvloop_xfail"):
            reason = mark.args[0] if mark.args else mark.kwargs["reason"]
            item.add_marker(
                pytest.mark.xfail(
                    mark.kwargs.get("condition", True),
                    reason=f"uvloop deviates from asyncio: {reason}",
                    strict=mark.kwargs.get("strict", True),
                    run=mark.kwargs.get("run", True),
                )
            )


# --------------------------------------------------------------------------
# the three implementations


@dataclasses.dataclass
class Impl:
    name: str
    new_event_loop: Callable[[], asyncio.AbstractEventLoop]
    loop_class: type
    policy_class: type
    run: Callable[..., Any]  # run(coro) -> result, like asyncio.run
    module: Any

    def __repr__(self):
        return f"<Impl {self.name}>"


_IMPL_CACHE = {}


def _asyncio_new_event_loop():
    # "asyncio.new_event_loop with the default policy", independent of
    # whatever policy a test may have installed.
    return asyncio.DefaultEventLoopPolicy().new_event_loop()


def _load_impl(name):
    if name in _IMPL_CACHE:
        return _IMPL_CACHE[name]
    if name == "asyncio":
        impl = Impl(
            name="asyncio",
            new_event_loop=_asyncio_new_event_loop,
            loop_class=asyncio.SelectorEventLoop,
            policy_class=asyncio.DefaultEventLoopPolicy,
            run=asyncio.run,
            module=asyncio,
        )
    elif name == "uvloop":
        try:
            import uvloop
        except ImportError as exc:  # the only reason a parameter is skipped
            pytest.skip(f"uvloop is not importable: {exc}")
        impl = Impl(
            name="uvloop",
            new_event_loop=uvloop.new_event_loop,
            loop_class=uvloop.Loop,
            policy_class=uvloop.EventLoopPolicy,
            run=uvloop.run,
            module=uvloop,
        )
    elif name == "mtloop":
        try:
            import mtloop
        except BaseException:  # never a skip: a broken import is a failure
            pytest.fail("import mtloop failed:\n" + traceback.format_exc(), pytrace=False)
        missing = [
            attr
            for attr in ("new_event_loop", "Loop", "run", "EventLoopPolicy")
            if not hasattr(mtloop, attr)
        ]
        if missing:
            pytest.fail(
                f"mtloop (from {getattr(mtloop, '__file__', None) or list(mtloop.__path__)}) "
                f"lacks {missing}",
                pytrace=False,
            )
        impl = Impl(
            name="mtloop",
            new_event_loop=mtloop.new_event_loop,
            loop_class=mtloop.Loop,
            policy_class=mtloop.EventLoopPolicy,
            run=mtloop.run,
            module=mtloop,
        )
    else:  # pragma: no cover
        raise ValueError(name)
    _IMPL_CACHE[name] = impl
    return impl


def get_impl(name):
    """The :class:`Impl` for ``name`` (skips for a missing uvloop, fails for mtloop)."""
    return _load_impl(name)


@pytest.fixture(params=IMPL_IDS, ids=IMPL_IDS)
def loop_factory(request):
    """A callable returning a new event loop of the parametrized implementation."""
    return _load_impl(request.param).new_event_loop


@pytest.fixture
def impl(request, loop_factory):
    """The :class:`Impl` record of the current ``loop_factory`` parameter."""
    return _load_impl(request.node.callspec.params["loop_factory"])


@pytest.fixture
def impl_name(request, loop_factory):
    return request.node.callspec.params["loop_factory"]


@pytest.fixture
def loop(loop_factory):
    """A new loop; closed at teardown, which also checks it is not running."""
    lp = loop_factory()
    try:
        yield lp
    finally:
        running = lp.is_running()
        if not lp.is_closed() and not running:
            lp.close()
        assert asyncio._get_running_loop() is None, "a loop is still marked running"
        assert not running, "loop is still running at teardown"


def run_on(loop, aw, timeout=HANG_TIMEOUT):
    """Run awaitable ``aw`` on ``loop`` until done, failing after ``timeout`` s."""

    async def guarded():
        return await asyncio.wait_for(aw, timeout)

    return loop.run_until_complete(guarded())


@pytest.fixture
def run(loop):
    """``run(awaitable, timeout=HANG_TIMEOUT)``: run to completion on ``loop``."""

    def _run(aw, timeout=HANG_TIMEOUT):
        return run_on(loop, aw, timeout)

    return _run


# --------------------------------------------------------------------------
# hang guard


class TestHung(SystemExit):
    """Raised by the per-test guard.

    Derived from SystemExit so that loop internals (Handle._run, Task.__step)
    let it propagate instead of routing it to the exception handler.
    """

    __test__ = False


def _on_alarm(signum, frame):
    raise TestHung(
        f"test still running after {TEST_GUARD_SECONDS} s: the loop probably hangs"
    )


@pytest.fixture(autouse=True)
def _hang_guard(request):
    # Only for the loop behaviour tests (those parametrized by loop_factory);
    # others (e.g. long subprocess-based suites) keep their own timeouts.
    if "loop_factory" not in request.fixturenames:
        yield
        return
    in_main = threading.current_thread() is threading.main_thread()
    old = None
    if in_main:
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, TEST_GUARD_SECONDS)
    faulthandler.dump_traceback_later(TEST_HARD_LIMIT_SECONDS, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        if in_main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


@pytest.fixture(autouse=True)
def _no_leaked_running_loop_or_policy():
    policy = asyncio.get_event_loop_policy()
    hooks = sys.get_asyncgen_hooks()
    yield
    assert asyncio._get_running_loop() is None
    if asyncio.get_event_loop_policy() is not policy:
        asyncio.set_event_loop_policy(None)
        pytest.fail("test left a different event loop policy installed")
    assert sys.get_asyncgen_hooks() == hooks, "asyncgen hooks not restored"


# Convenience for tests.
PY312 = sys.version_info >= (3, 12)


@pytest.fixture
def sockpair():
    """A connected pair of non-blocking stream sockets."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


@pytest.fixture(params=("tcp-client", "tcp-server", "unix-client", "unix-server"))
def endpoint_kind(request):
    """Which end of which stream a transport test drives (see tests/netutil.py's
    Endpoint): the client or server side of a TCP or a Unix connection."""
    return request.param
