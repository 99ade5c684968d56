#!/usr/bin/env python3
"""Run CPython's own ``test.test_asyncio`` suites against mtloop and the stock
asyncio loop, and compare the two per suite.

Usage::

    python tools/cpython_asyncio.py                       # default group, both loops
    python tools/cpython_asyncio.py --network             # network group only
    python tools/cpython_asyncio.py --all                 # default + network group
    python tools/cpython_asyncio.py --suites test_tasks,test_events -k cancel
    python tools/cpython_asyncio.py --loop stock          # one column only
    python tools/cpython_asyncio.py --loop-class uvloop   # point the "mtloop" column elsewhere
    python tools/cpython_asyncio.py --json out.json -v

The suites come from the interpreter running this script (3.11 - 3.13); run
it with each Python for a table per version.

Groups
------
default: test_events (the tests that need no sockets, pipes or subprocesses),
test_runners, test_taskgroups, test_timeouts, test_tasks, test_futures.
network (``--network``): test_events:network (the rest of test_events' loop
mixins: create_connection/create_server/unix sockets/datagrams/pipes/ptys/
subprocesses), test_streams, test_server, test_buffered_proto,
test_sock_lowlevel, test_sendfile, test_subprocess, test_ssl, test_sslproto.

The table has one row per suite: tests, passes per loop, regressions, known
failures, TLS failures (below), other failures, and seconds per loop.  The
regressions follow, each with its first failure line and where it was raised
("at <innermost frame> <- <deepest frame in the test package>"), then the
same regressions grouped by cause (exception and the function that raised
it), which reads as the list of what the loop lacks.

Tests that need TLS are counted in a "tls" column instead of as regressions
while the known file's ``TLS_REASON`` is set: a test needs TLS when its name
matches ``TLS_NAME_PATTERNS`` or it created an ``ssl.SSLContext`` on either
loop.

How it works
------------
Every (suite, loop) pair runs in a child process of its own (this same file
with ``--child``); the child collects one outcome per test with unittest's
machinery and appends JSON lines to a file that the parent reads.  A child
that crashes or hangs loses only the test it was in: that test is reported as
``crash`` or ``timeout`` and a new child resumes with the tests that are left.
Each test has a time limit (``--test-timeout``, enforced in the child with
faulthandler, which dumps every thread's stack into the child's log and
exits; class and module fixtures get the same limit) and each child one more
(``--timeout``, enforced by the parent with SIGABRT, so faulthandler dumps the
stacks there too, then SIGKILL).  A hung test is reported as ``timeout`` with
the frame its thread was waiting in, and printed as it happens.  Failing
tests that passed on stock are run once more under mtloop to tell timing
flakes from regressions, except crashes, hangs, TLS tests and failures no
rerun can fix (NotImplementedError, a missing attribute).

How the tests are pointed at the loop under test, in the child:

* the default policy's loop factory (``DefaultEventLoopPolicy._loop_factory``)
  is replaced, so every ``asyncio.new_event_loop()``, ``asyncio.run()``,
  ``asyncio.Runner`` and ``IsolatedAsyncioTestCase`` gets the loop under test;
  the child checks that ``asyncio.new_event_loop()`` really returns it before
  running anything;
* suites whose classes pick a loop per selector (test_events, test_sock_lowlevel,
  test_sendfile, test_server, test_buffered_proto) have those classes replaced
  by one class built here from the module's mixin, whose ``create_event_loop``
  / ``new_loop`` returns the loop under test.  The stock column runs the very
  same class with ``SelectorEventLoop(EpollSelector())`` (what the suites'
  EPoll/Selector class runs on Linux), so both columns hold the same test ids:

  - test_events: ``EventLoopTests(EventLoopTestsMixin)`` for the default group;
    ``UnixEventLoopTests(UnixEventLoopTestsMixin, SubprocessTestsMixin)`` (with
    its child-watcher setUp) for test_events:network, which runs that class
    alone; both over test_utils.TestCase, split by NETWORK_TEST_RE;
  - test_sock_lowlevel: ``SockTests(BaseSockTestsMixin)``; test_sendfile:
    ``SendfileTests(SendfileTestsBase)`` (both with ``create_event_loop``);
  - test_server: ``StartServerTests(SelectorStartServerTests)``;
    test_buffered_proto: ``BufferedProtocolTests(BufferedProtocolSelectorTests)``
    (both functional.FunctionalTestCaseMixin, with ``new_loop``);
* test_streams (``StreamTests.setUp`` calls ``asyncio.new_event_loop()``) and
  test_server's IsolatedAsyncioTestCase classes (TestServer2,
  UnixServerCleanupTests) get the loop through the policy alone;
* test_runners' ``BaseTest.new_loop`` (a mocked ``BaseEventLoop``) is replaced
  by a real loop of the column, keeping the ``shutdown_ag_run`` bookkeeping the
  tests check;
* test_tasks / test_futures run as they are: many of their tests use
  ``test_utils.TestLoop`` (a fake loop) and do not touch the loop under test at
  all; the "uses loop" column counts the tests that created one.

Any other module of ``test.test_asyncio`` may be named with ``--suites``; it
runs as is, with only the policy patched.  In the mtloop column the child
counts stock selector loops created by each test, which flags tests that
build a loop of their own and so never exercised the loop under test.

Exit status: 0 when no test regressed (passes on stock, fails on mtloop and
is not listed in ``tools/cpython_asyncio_known.py``), 1 otherwise, 2 on a
usage or setup error.  With a single ``--loop``, 1 means some test failed
(for mtloop: failed and is not listed as known).
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.abspath(__file__)
KNOWN_FILE = os.path.join(HERE, "cpython_asyncio_known.py")
PKG = "test.test_asyncio"

# --------------------------------------------------------------------------
# Suite table
# --------------------------------------------------------------------------

# Tests of test_events' EventLoopTestsMixin that need sockets, pipes, ptys,
# subprocesses or TLS; they belong to the network group.
NETWORK_TEST_RE = re.compile(
    r"connect|server|ssl|datagram|pipe|pty|subprocess|unix|sock|accepted"
    r"|prompt_cancellation")

# CPython classes that exist once per selector (or for the proactor).
SELECTOR_VARIANTS_RE = r"^(Select|EPoll|Poll|Kqueue|Proactor)EventLoopTests$"


def _fresh_child_watcher(test):
    """Gives the stock loop a child watcher of its own for one test, as
    CPython's Subprocess*WatcherTests do (a test before it may have left a
    mock in the policy).  mtloop watches its children itself and ignores it."""
    import asyncio
    import warnings
    if not hasattr(asyncio, "ThreadedChildWatcher"):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        policy = asyncio.get_event_loop_policy()
        watcher = asyncio.ThreadedChildWatcher()
        watcher.attach_loop(test.loop)
        policy.set_child_watcher(watcher)

    def restore():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            policy.set_child_watcher(None)
            watcher.close()
    test.addCleanup(restore)


def _is_network_test(name):
    return bool(NETWORK_TEST_RE.search(name))


def _is_core_test(name):
    return not NETWORK_TEST_RE.search(name)


# Each entry: module (in test.test_asyncio), group, and how to retarget it.
#   drop:   regex of class names not to run (replaced by the built classes)
#   build:  [(new class name, [mixin names, first existing of "A|B"],
#             base ("utils" = test_utils.TestCase, "unittest" = unittest.TestCase,
#             None = the first mixin is a TestCase already),
#             hook method returning the loop, or "setUp": a setUp that
#             sets self.loop)]
#           Dropped classes that define tests of their own must be used as
#           the mixin (the child notes any test that would be lost).
#   filter: predicate over test method names of the built classes
#   only_built: run the built classes alone
#   patch:  [(class name, method name, kind)] methods replaced in place
SUITES = {
    "test_events": dict(
        module="test_events", group="default",
        drop=SELECTOR_VARIANTS_RE,
        build=[("EventLoopTests", ["EventLoopTestsMixin"], "utils",
                "create_event_loop")],
        filter=_is_core_test),
    "test_runners": dict(
        module="test_runners", group="default",
        patch=[("BaseTest", "new_loop", "runner")]),
    "test_taskgroups": dict(module="test_taskgroups", group="default"),
    "test_timeouts": dict(module="test_timeouts", group="default"),
    "test_tasks": dict(module="test_tasks", group="default"),
    "test_futures": dict(module="test_futures", group="default"),
    # -- network group -----------------------------------------------------
    "test_events:network": dict(
        module="test_events", group="network",
        build=[("UnixEventLoopTests",
                ["UnixEventLoopTestsMixin|EventLoopTestsMixin",
                 "SubprocessTestsMixin"], "utils", "create_event_loop")],
        filter=_is_network_test, only_built=True),
    "test_streams": dict(module="test_streams", group="network"),
    "test_server": dict(
        module="test_server", group="network",
        drop=r"^(Selector|Proactor)StartServerTests$",
        # the Selector class has a test of its own (test_start_unix_server_1)
        build=[("StartServerTests", ["SelectorStartServerTests"], None,
                "new_loop")]),
    "test_buffered_proto": dict(
        module="test_buffered_proto", group="network",
        drop=r"^BufferedProtocol(Selector|Proactor)Tests$",
        build=[("BufferedProtocolTests", ["BufferedProtocolSelectorTests"],
                None, "new_loop")]),
    "test_sock_lowlevel": dict(
        module="test_sock_lowlevel", group="network",
        drop=SELECTOR_VARIANTS_RE,
        build=[("SockTests", ["BaseSockTestsMixin"], "utils",
                "create_event_loop")]),
    "test_sendfile": dict(
        module="test_sendfile", group="network",
        drop=SELECTOR_VARIANTS_RE,
        build=[("SendfileTests", ["SendfileTestsBase"], "utils",
                "create_event_loop")]),
    # Subprocesses (the stock column runs them under its policy's default
    # child watcher; mtloop watches its children itself).
    "test_subprocess": dict(
        module="test_subprocess", group="network",
        drop=r"^(Subprocess\w*WatcherTests|SubprocessProactorTests)$",
        build=[("SubprocessTests", ["SubprocessMixin"], "utils", "setUp")]),
    # TLS over transports (asyncio's SSL protocol), start_tls, TLS servers.
    "test_ssl": dict(module="test_ssl", group="network"),
    "test_sslproto": dict(
        module="test_sslproto", group="network",
        drop=r"^(Selector|Proactor)StartTLSTests$",
        build=[("StartTLSTests", ["SelectorStartTLSTests"], None, "new_loop")]),
}

DEFAULT_SUITES = [n for n, s in SUITES.items() if s["group"] == "default"]
NETWORK_SUITES = [n for n, s in SUITES.items() if s["group"] == "network"]

PASS = {"pass", "xfail"}
SKIP = {"skip"}
FAIL = {"fail", "error", "xpass", "crash", "timeout", "notrun"}

COLUMNS = ("stock", "mtloop")


def suite_spec(name):
    if name in SUITES:
        return SUITES[name]
    return dict(module=name, group="extra")


# --------------------------------------------------------------------------
# Child side
# --------------------------------------------------------------------------

def resolve_target(spec):
    """Resolve --loop-class into (expected type, policy factory, hook factory).

    'mod'      -> (mod.Loop, mod.Loop, mod.new_event_loop or mod.Loop)
    'mod:Name' -> Name for both factories; the expected type is Name when it
                  is a class, else None (the caller probes a loop for it).
    """
    modname, _, attr = spec.partition(":")
    mod = importlib.import_module(modname)
    if attr:
        obj = mod
        for part in attr.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, type):
            return obj, obj, obj
        return None, obj, obj
    cls = getattr(mod, "Loop")
    factory = getattr(mod, "new_event_loop", cls)
    return cls, cls, factory


def _flatten(suite):
    import unittest
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from _flatten(t)
        else:
            yield t


def _short_id(test_id):
    prefix = PKG + "."
    if test_id.startswith(prefix):
        return test_id[len(prefix):]
    return test_id.replace("(" + prefix, "(")


def _first_line(text):
    for line in (text or "").strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _match_k(test_id, patterns):
    """Like unittest's -k: a pattern without '*' is a substring; one with '*'
    is an fnmatch pattern over the (short) test id or over any part of it
    that starts after a dot ('CTask_*.test_cancel*' works)."""
    if not patterns:
        return True
    for p in patterns:
        if "*" not in p:
            if p in test_id:
                return True
        elif fnmatch.fnmatchcase(test_id, p) or \
                fnmatch.fnmatchcase(test_id, "*." + p):
            return True
    return False


def child_main(args):
    import faulthandler
    import traceback
    import unittest

    faulthandler.enable(all_threads=True)
    out = open(args.out, "a", encoding="utf-8")

    def emit(**rec):
        out.write(json.dumps(rec) + "\n")
        out.flush()

    import asyncio
    import selectors
    from asyncio import selector_events

    counters = {"loops": 0, "stock_loops": 0, "tls": 0}
    policy_cls = asyncio.DefaultEventLoopPolicy
    stock_policy_factory = policy_cls._loop_factory

    if args.column == "mtloop":
        expected, policy_factory, hook_factory = resolve_target(args.loop_class)
        if expected is None:
            probe = hook_factory()
            expected = type(probe)
            probe.close()
    else:
        expected = asyncio.SelectorEventLoop
        policy_factory = stock_policy_factory

        def hook_factory():
            return asyncio.SelectorEventLoop(selectors.EpollSelector())

    def counted(factory):
        def make():
            loop = factory()
            counters["loops"] += 1
            return loop
        return make

    new_loop = counted(hook_factory)
    policy_cls._loop_factory = staticmethod(counted(policy_factory))

    if args.column == "mtloop":
        # Flag stock loops built behind our back (tests that construct a
        # SelectorEventLoop themselves exercise the stock loop, not ours).
        orig_init = selector_events.BaseSelectorEventLoop.__init__

        def init(self, *a, **kw):
            if not isinstance(self, expected):
                counters["stock_loops"] += 1
            return orig_init(self, *a, **kw)
        selector_events.BaseSelectorEventLoop.__init__ = init

    # Tests that need TLS are reported apart (TLS_REASON in the known file).
    # Besides their names, what marks them is an ssl.SSLContext created while
    # they run, on either loop (ssl=True makes one too).
    try:
        import ssl
    except ImportError:
        ssl = None
    if ssl is not None:
        orig_ctx_new = ssl.SSLContext.__new__

        def ctx_new(cls, *a, **kw):
            counters["tls"] += 1
            return orig_ctx_new(cls, *a, **kw)
        ssl.SSLContext.__new__ = staticmethod(ctx_new)

    # The runner must never silently test the stock loop in the mtloop column.
    asyncio.set_event_loop_policy(None)
    probe = asyncio.new_event_loop()
    probe2 = new_loop()
    try:
        for p in (probe, probe2):
            if not isinstance(p, expected):
                raise AssertionError(
                    "loop under test is %r, expected an instance of %r"
                    % (type(p), expected))
            if (args.column == "mtloop"
                    and isinstance(p, asyncio.SelectorEventLoop)
                    and not issubclass(expected, asyncio.SelectorEventLoop)):
                raise AssertionError("mtloop column got a stock loop")
    finally:
        probe.close()
        probe2.close()
        asyncio.set_event_loop(None)
    counters["loops"] = 0
    counters["stock_loops"] = 0
    counters["tls"] = 0

    spec = suite_spec(args.suite)
    modname = PKG + "." + spec["module"]
    mod = importlib.import_module(modname)
    from test.test_asyncio import utils as test_utils

    notes = []
    built = []

    for cls_name, meth, kind in spec.get("patch", ()):
        cls = getattr(mod, cls_name, None)
        if cls is None or meth not in vars(cls):
            notes.append("expected %s.%s in %s: not found, not patched"
                         % (cls_name, meth, modname))
            continue
        if kind == "runner":
            def runner_loop(self):
                loop = new_loop()
                loop.shutdown_ag_run = False
                orig = loop.shutdown_asyncgens

                async def shutdown_asyncgens():
                    loop.shutdown_ag_run = True
                    await orig()
                loop.shutdown_asyncgens = shutdown_asyncgens
                return loop
            setattr(cls, meth, runner_loop)
        else:
            setattr(cls, meth, lambda self: new_loop())
        notes.append("patched %s.%s -> loop under test" % (cls_name, meth))

    for cls_name, mixins, base, hook in spec.get("build", ()):
        bases = []
        for alternatives in mixins:
            for alt in alternatives.split("|"):
                if hasattr(mod, alt):
                    bases.append(getattr(mod, alt))
                    break
            else:
                raise AssertionError("%s has none of %s" % (modname, alternatives))
        if base == "utils":
            bases.append(test_utils.TestCase)
        elif base == "unittest":
            bases.append(unittest.TestCase)
        ns = {"__module__": modname, "__qualname__": cls_name}
        if hook == "setUp":
            # The mixin reads self.loop, which the dropped classes' setUp made.
            def set_up(self, _new_loop=new_loop):
                super(type(self), self).setUp()
                self.loop = _new_loop()
                self.set_event_loop(self.loop)
                _fresh_child_watcher(self)
            ns["setUp"] = set_up
        else:
            ns[hook] = lambda self: new_loop()
        built.append(type(cls_name, tuple(bases), ns))
        notes.append("built %s(%s) with %s() -> loop under test"
                     % (cls_name, ", ".join(b.__name__ for b in bases), hook))

    loader = unittest.TestLoader()
    tests = []
    drop = re.compile(spec["drop"]) if spec.get("drop") else None
    if not spec.get("only_built"):
        dropped = set()
        for t in _flatten(loader.loadTestsFromModule(mod)):
            name = type(t).__name__
            if drop is not None and drop.search(name):
                dropped.add(name)
                continue
            tests.append(t)
        if dropped:
            notes.append("not run (loop-specific, replaced): "
                         + ", ".join(sorted(dropped)))
        # Guard against losing tests that a dropped class defines itself.
        kept = {m for cls in built for m in loader.getTestCaseNames(cls)}
        for name in sorted(dropped):
            cls = getattr(mod, name, None)
            if cls is None or getattr(cls, "__unittest_skip__", False):
                continue
            lost = [m for m in vars(cls)
                    if m.startswith(loader.testMethodPrefix) and m not in kept]
            if lost:
                notes.append("WARNING: %s defines tests that are not run: %s"
                             % (name, ", ".join(lost)))
    pred = spec.get("filter")
    for cls in built:
        for t in _flatten(loader.loadTestsFromTestCase(cls)):
            if pred is None or pred(getattr(t, "_testMethodName", "")):
                tests.append(t)

    skip_ids = set()
    if args.skip_ids:
        with open(args.skip_ids, encoding="utf-8") as f:
            skip_ids = set(json.load(f))
    tests = [t for t in tests
             if _match_k(_short_id(t.id()), args.k)]
    if args.only_ids:
        with open(args.only_ids, encoding="utf-8") as f:
            only = set(json.load(f))
        tests = [t for t in tests if _short_id(t.id()) in only]
    plan = [_short_id(t.id()) for t in tests]
    emit(event="plan", ids=plan, notes=notes,
         python=sys.version.split()[0], loop=repr(expected),
         loop_file=getattr(sys.modules.get(expected.__module__), "__file__",
                           None))
    tests = [t for t in tests if _short_id(t.id()) not in skip_ids]

    max_detail = 12000

    def arm_watchdog():
        # On a hang, faulthandler dumps every thread's stack into the log
        # and exits; the parent reports the test that was running (its
        # "start" record has no "result") as "timeout" and resumes after it.
        if args.test_timeout:
            faulthandler.dump_traceback_later(args.test_timeout, exit=True)

    class Result(unittest.TestResult):
        def __init__(self):
            super().__init__()
            self.cur = None

        def _new(self, test):
            return {"id": _short_id(test.id()), "outcome": "pass",
                    "summary": "", "detail": "", "subtests_failed": 0}

        def startTest(self, test):
            super().startTest(test)
            counters["loops"] = 0
            counters["stock_loops"] = 0
            counters["tls"] = 0
            self.cur = self._new(test)
            self.t0 = time.monotonic()
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                pos = os.lseek(2, 0, os.SEEK_CUR)
            except OSError:
                pos = None
            emit(event="start", id=self.cur["id"], log_pos=pos)
            arm_watchdog()

        def stopTest(self, test):
            super().stopTest(test)
            # Class and module fixtures run between tests: keep a watchdog
            # on them too (a hang there is reported "outside a test").
            arm_watchdog()
            rec = self.cur
            self.cur = None
            if rec is None:
                return
            rec["time"] = round(time.monotonic() - self.t0, 3)
            rec["loops"] = counters["loops"]
            rec["stock_loops"] = counters["stock_loops"]
            rec["tls"] = counters["tls"]
            emit(event="result", **rec)

        def _record(self, test, outcome, err=None, text=None, prefix=""):
            rank = ["pass", "xfail", "skip", "xpass", "fail", "error"]
            if err is not None:
                text = self._exc_info_to_string(err, test)
                summary = _first_line("".join(
                    traceback.format_exception_only(err[0], err[1])))
            else:
                summary = _first_line(text or "")
            summary = prefix + summary
            rec = self.cur
            if rec is None or not hasattr(test, "_testMethodName"):
                # class/module fixture errors (_ErrorHolder) and the like
                emit(event="result", id=_short_id(test.id()),
                     outcome=outcome, summary=summary,
                     detail=(text or "")[:max_detail], time=0, loops=0,
                     stock_loops=0, fixture=True)
                return
            # The outcome is the worst thing that happened; the summary is the
            # first failure (a cleanup error must not hide the real one).
            first_bad = rec["outcome"] in ("pass", "xfail", "skip")
            if rank.index(outcome) >= rank.index(rec["outcome"]):
                rec["outcome"] = outcome
            if first_bad or not rec["summary"]:
                rec["summary"] = summary
            if text:
                rec["detail"] = (rec["detail"] + text)[:max_detail]

        def addSuccess(self, test):
            super().addSuccess(test)

        def addFailure(self, test, err):
            super().addFailure(test, err)
            self._record(test, "fail", err)

        def addError(self, test, err):
            super().addError(test, err)
            self._record(test, "error", err)

        def addSkip(self, test, reason):
            super().addSkip(test, reason)
            self._record(test, "skip", text=reason)

        def addExpectedFailure(self, test, err):
            super().addExpectedFailure(test, err)
            self._record(test, "xfail", text="expected failure")

        def addUnexpectedSuccess(self, test):
            super().addUnexpectedSuccess(test)
            self._record(test, "xpass", text="unexpected success")

        def addSubTest(self, test, subtest, err):
            super().addSubTest(test, subtest, err)
            if err is not None:
                if self.cur is not None:
                    self.cur["subtests_failed"] += 1
                kind = ("fail" if issubclass(err[0], test.failureException)
                        else "error")
                self._record(test, kind, err,
                             prefix=subtest._subDescription() + ": ")

    result = Result()
    suite = unittest.TestSuite(tests)
    arm_watchdog()
    suite.run(result)
    faulthandler.cancel_dump_traceback_later()
    emit(event="done")
    out.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: loops or threads leaked by a test must not
    # turn a finished run into a hang or a crash.
    os._exit(0)


# --------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------

def _known_module(path):
    spec = importlib.util.spec_from_file_location("_cpython_asyncio_known", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_tls(path):
    """(reason, name patterns) for the tests that need TLS, from the known
    file's TLS_REASON / TLS_NAME_PATTERNS; reason is None once TLS counts."""
    mod = _known_module(path)
    reason = getattr(mod, "TLS_REASON", None)
    if reason is not None and (not isinstance(reason, str) or not reason.strip()):
        raise ValueError("%s: TLS_REASON must be a non-empty string or None"
                         % path)
    patterns = list(getattr(mod, "TLS_NAME_PATTERNS", ()))
    return (reason.strip() if reason else None), patterns


def needs_tls(test_id, recs, tls):
    """Whether a test needs TLS: its method name matches one of the
    patterns, or it created an ssl.SSLContext on either loop (recs: the
    test's records, one per column, None where absent)."""
    reason, patterns = tls
    if not reason:
        return False
    name = test_id.rsplit(".", 1)[-1].lower()
    if any(fnmatch.fnmatchcase(name, p.lower()) for p in patterns):
        return True
    return any(r and r.get("tls") for r in recs)


def load_known(path):
    mod = _known_module(path)
    known = getattr(mod, "KNOWN", None)
    if not isinstance(known, dict):
        raise ValueError("%s: KNOWN must be a dict" % path)
    ver = "%d.%d" % sys.version_info[:2]
    active = {}
    for key, reason in known.items():
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError("%s: entry %r has no reason (every entry needs "
                             "a non-empty reason string)" % (path, key))
        m = re.match(r"^(\d+\.\d+):(.*)$", key)
        if m:
            if m.group(1) != ver:
                continue
            pattern = m.group(2)
        else:
            pattern = key
        active[key] = (pattern, reason.strip())
    return active


def known_reason(test_id, known):
    for key, (pattern, reason) in known.items():
        if test_id == pattern or fnmatch.fnmatchcase(test_id, pattern):
            return key, reason
    return None, None


def _sig_name(rc):
    if rc is not None and rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            return "signal %d" % -rc
    return "exit status %s" % rc


def _crash_summary(kind, rc, tail, test_timeout, timeout):
    if kind == "timeout":
        if "Timeout (" in tail:
            return "ran past --test-timeout=%ss (faulthandler)" % test_timeout
        return "child ran past --timeout=%ss and was killed" % timeout
    for pat in ("Fatal Python error:", "AddressSanitizer", "Assertion",
                "terminate called", "Segmentation fault", "Aborted"):
        for line in tail.splitlines():
            if pat in line:
                return "%s: %s" % (_sig_name(rc), line.strip()[:200])
    last = ""
    for line in tail.splitlines():
        if line.strip():
            last = line.strip()
    return "%s: %s" % (_sig_name(rc), last[:200])


def _tail(path, nbytes=8000, start=None):
    """The end of a child's log, from offset start when given."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            begin = max(0, size - nbytes)
            if start is not None and start <= size:
                begin = max(begin, start)
            f.seek(begin)
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_column(suite, column, args, workdir, tag=""):
    """Run one suite in one column, restarting after crashes/hangs.  tag
    keeps the files of a second run of the same pair apart."""
    tests = {}
    plan = None
    notes = []
    runs = []
    meta = {}
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", suite) + "." + column + tag
    t_start = time.monotonic()
    for attempt in range(args.max_restarts + 1):
        out_path = os.path.join(workdir, "%s.%d.jsonl" % (safe, attempt))
        log_path = os.path.join(workdir, "%s.%d.log" % (safe, attempt))
        cmd = [sys.executable, SCRIPT, "--child", "--suite", suite,
               "--column", column, "--out", out_path,
               "--loop-class", args.loop_class,
               "--test-timeout", str(args.test_timeout)]
        for k in args.k or ():
            cmd += ["-k", k]
        if getattr(args, "only_ids", None):
            only_path = os.path.join(workdir, "%s.%d.only.json" % (safe, attempt))
            with open(only_path, "w", encoding="utf-8") as f:
                json.dump(sorted(args.only_ids), f)
            cmd += ["--only-ids", only_path]
        if tests:
            skip_path = os.path.join(workdir, "%s.%d.skip.json" % (safe, attempt))
            with open(skip_path, "w", encoding="utf-8") as f:
                json.dump(sorted(tests), f)
            cmd += ["--skip-ids", skip_path]
        cwd = os.path.join(workdir, "cwd-" + safe)
        os.makedirs(cwd, exist_ok=True)
        env = dict(os.environ)
        env.pop("PYTHONASYNCIODEBUG", None)
        t0 = time.monotonic()
        timed_out = False
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=cwd, env=env,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                # SIGABRT first: faulthandler dumps every thread's stack into
                # the log, which tells where the child hung.
                try:
                    os.kill(proc.pid, signal.SIGABRT)
                    proc.wait(timeout=5)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                rc = proc.wait()
            except BaseException:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                raise
        # Reap whatever the tests left running in the child's session.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        seconds = round(time.monotonic() - t0, 2)

        pending = None
        pending_pos = None
        done = False
        new = 0
        try:
            with open(out_path, encoding="utf-8") as f:
                lines = f.readlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            ev = rec.pop("event", None)
            if ev == "plan":
                if plan is None:
                    plan = rec["ids"]
                    notes = rec.get("notes", [])
                    meta = {k: rec.get(k) for k in ("python", "loop", "loop_file")}
            elif ev == "start":
                pending = rec["id"]
                pending_pos = rec.get("log_pos")
            elif ev == "result":
                tid = rec.pop("id")
                tests[tid] = rec
                new += 1
                if tid == pending:
                    pending = None
            elif ev == "done":
                done = True
        tail = _tail(log_path)
        run = dict(attempt=attempt, rc=rc, timed_out=timed_out,
                   seconds=seconds, results=new, done=done)
        runs.append(run)
        if done and rc == 0:
            break
        kind = "timeout" if (timed_out or (rc == 1 and "Timeout (" in tail)) \
            else "crash"
        summary = _crash_summary(kind, rc, tail, args.test_timeout, args.timeout)
        run["summary"] = summary
        run["kind"] = kind
        run["log_tail"] = tail
        if pending is not None:
            tests[pending] = dict(
                outcome=kind, summary=summary,
                detail=_tail(log_path, start=pending_pos),
                time=0, loops=0, stock_loops=0)
        else:
            # Died outside any test: at start-up, in a class or module
            # fixture, or at exit.
            mod = suite_spec(suite)["module"]
            if plan is None:
                where = "startup"
            elif done:
                where = "exit"
            else:
                where = "outside a test, run %d" % attempt
            tests["%s.<%s>" % (mod, where)] = dict(
                outcome="error" if plan is None else kind, summary=summary,
                detail=tail, time=0, loops=0, stock_loops=0, fixture=True)
        if plan is None or done:
            break
        remaining = [t for t in plan if t not in tests]
        if not remaining:
            break
        if pending is None and new == 0:
            break       # no progress: don't loop forever
        if time.monotonic() - t_start > args.suite_budget:
            notes.append("gave up restarting: --suite-budget spent")
            break
    return dict(tests=tests, plan=plan, notes=notes, runs=runs, meta=meta,
                seconds=round(time.monotonic() - t_start, 2))


def fill_missing(colres, all_ids):
    """Tests the column should have run but did not (crashed out) become
    'notrun'; ids it could not have had (fixture errors) become 'absent'."""
    plan = colres["plan"]
    planned = set(plan) if plan is not None else None
    out = {}
    for tid in all_ids:
        rec = colres["tests"].get(tid)
        if rec is not None:
            out[tid] = rec["outcome"]
        elif planned is None or tid in planned:
            out[tid] = "notrun"
        else:
            out[tid] = "absent"
    return out


def classify(s, m, kreason, tls=False):
    if m in FAIL:
        if kreason:
            return "known"
        if tls:
            return "tls"
        if s in PASS:
            return "regression"
        if s in FAIL:
            return "both-fail"
        return "target-only"
    if m in PASS:
        if kreason:
            return "known-passing"
        if s in FAIL:
            return "stock-only"
        return "ok"
    if m in SKIP and s in PASS:
        return "target-skip"
    return "skip"


MAX_RETRIES = 20


# Failures that a second run cannot turn into passes: a missing method is
# missing every time.  Not retried (it would only double the suite's time).
NOT_RETRIED_RE = re.compile(
    r"^(error|fail): (NotImplementedError\b|AttributeError: .* has no attribute )")


def retry_regressions(results, columns, known, tls, args, workdir):
    """Runs each apparent regression once more, alone, under mtloop.

    The suites hold timing-sensitive tests that can fail on a loaded 2-core
    machine whatever the loop; a test that passes on the second run is
    reported as flaky instead of as a regression.  Crashes and hangs are
    not retried (a loop that crashes or hangs now and then is broken), nor
    are failures that cannot be timing (NOT_RETRIED_RE), nor TLS tests.
    Returns [(id, first failure summary)]; the passing outcome replaces the
    first one."""
    flaky = []
    if len(columns) != 2:
        return flaky
    for suite, cols in results.items():
        stock, target = cols["stock"]["tests"], cols["mtloop"]["tests"]
        suspects = [tid for tid, rec in target.items()
                    if rec["outcome"] in FAIL
                    and rec["outcome"] not in ("crash", "timeout")
                    and not NOT_RETRIED_RE.match(
                        _summary_of(rec, rec["outcome"]))
                    and stock.get(tid, {}).get("outcome") in PASS
                    and not known_reason(tid, known)[0]
                    and not needs_tls(tid, (rec, stock.get(tid)), tls)]
        if not suspects or len(suspects) > MAX_RETRIES:
            continue
        sys.stderr.write("retrying %d apparent regression(s) of %s under mtloop ... "
                         % (len(suspects), suite))
        again = run_column(suite, "mtloop",
                           argparse.Namespace(**{**vars(args), "k": None,
                                                 "only_ids": suspects}),
                           workdir, tag=".retry")
        passed = 0
        for tid in suspects:
            rec = again["tests"].get(tid)
            if rec is not None and rec["outcome"] in PASS:
                flaky.append((tid, _summary_of(target[tid], target[tid]["outcome"])))
                target[tid] = rec
                passed += 1
        sys.stderr.write("%d passed the second time\n" % passed)
    return flaky


def _fmt_table(headers, rows, total=None):
    allrows = [headers] + rows + ([total] if total else [])
    widths = [max(len(str(r[i])) for r in allrows) for i in range(len(headers))]

    def fmt(r):
        cells = []
        for i, c in enumerate(r):
            cells.append(str(c).ljust(widths[i]) if i == 0
                         else str(c).rjust(widths[i]))
        return "  ".join(cells).rstrip()
    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    if total:
        lines.append("  ".join("-" * w for w in widths))
        lines.append(fmt(total))
    return "\n".join(lines)


def _summary_of(rec, outcome):
    if rec is None:
        if outcome == "notrun":
            return "not run (the child crashed or hung before reaching it)"
        return outcome
    s = rec.get("summary") or ""
    return "%s: %s" % (outcome, s) if s else outcome


_TB_FRAME_RE = re.compile(r'^\s*File "([^"]+)", line (\d+), in (\S+)')
_FH_FRAME_RE = re.compile(r'^\s*File "([^"]+)", line (\d+) in (\S+)')
_TEST_DIR_RE = re.compile(r"[/\\]test[/\\]test_asyncio[/\\]")


def _frame_str(frame):
    path, line, func = frame
    return "%s:%s %s" % (os.path.basename(path), line, func)


def _py_frames(detail):
    """The frames (innermost last) and exception line of the last traceback
    in a unittest error text (a chain prints the newest exception last)."""
    blocks = []
    cur = None
    for line in (detail or "").splitlines():
        if line.startswith("Traceback (most recent call last):"):
            cur = {"frames": [], "exc": ""}
            blocks.append(cur)
            continue
        if cur is None:
            continue
        m = _TB_FRAME_RE.match(line)
        if m:
            cur["frames"].append((m.group(1), m.group(2), m.group(3)))
        elif line and not line[0].isspace() and not cur["exc"]:
            cur["exc"] = line.strip()
    return blocks[-1] if blocks else None


def _fh_frames(detail):
    """The frames (innermost last) of the thread running the test in a
    faulthandler dump: the thread whose stack holds unittest's case.py,
    else the first thread dumped."""
    threads = []
    cur = None
    for line in (detail or "").splitlines():
        if re.match(r"^(Current thread|Thread) 0x[0-9a-f]+", line):
            cur = []
            threads.append(cur)
            continue
        m = _FH_FRAME_RE.match(line)
        if m and cur is not None:
            cur.append((m.group(1), m.group(2), m.group(3)))
    if not threads:
        return None
    for t in threads:
        if any(f[0].endswith(os.path.join("unittest", "case.py")) for f in t):
            return list(reversed(t))
    return list(reversed(threads[0]))


def where_of(rec):
    """'innermost frame <- deepest frame in the test package' for a failure
    record, or ''.  For a hang it is where the test's thread was waiting."""
    if not rec:
        return ""
    detail = rec.get("detail") or ""
    if rec.get("outcome") == "timeout":
        frames = _fh_frames(detail)
    else:
        block = _py_frames(detail)
        frames = block["frames"] if block else None
    if not frames:
        return ""
    inner = frames[-1]
    tests = [f for f in frames if _TEST_DIR_RE.search(f[0])]
    text = "at " + _frame_str(inner)
    if tests and tests[-1] != inner:
        text += " <- " + _frame_str(tests[-1])
    return text


def cause_of(rec, summary):
    """A key that groups failures by what is missing: the exception and the
    function that raised it (assertion failures raised in the test itself
    are grouped by their exception type only)."""
    if not rec:
        return summary
    outcome = rec.get("outcome")
    if outcome in ("timeout", "crash"):
        frames = _fh_frames(rec.get("detail")) if outcome == "timeout" else None
        if frames:
            return "%s (waiting in %s)" % (outcome, _frame_str(frames[-1]))
        return "%s: %s" % (outcome, rec.get("summary", ""))
    block = _py_frames(rec.get("detail"))
    if not block or not block["frames"]:
        return summary
    exc = block["exc"] or summary
    path, _, func = block["frames"][-1]
    if _TEST_DIR_RE.search(path):
        if exc.startswith("AssertionError"):
            exc = "AssertionError"
        return "%s (raised in the test)" % exc[:160]
    return "%s (in %s %s)" % (exc[:160], os.path.basename(path), func)


def _display_path(path):
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def check_target(args):
    """Make sure the loop under test imports before spending time on it."""
    code = ("import sys; sys.path[0:0] = [%r]; import cpython_asyncio as c; "
            "e, p, f = c.resolve_target(%r); l = f(); "
            "print(type(l).__module__ + '.' + type(l).__qualname__, "
            "getattr(sys.modules[type(l).__module__], '__file__', '?')); l.close()"
            % (HERE, args.loop_class))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, cwd=tempfile.gettempdir(), timeout=120)
    if proc.returncode != 0:
        sys.stderr.write("cannot create the loop under test (%s):\n%s\n"
                         % (args.loop_class, proc.stderr[-3000:] or proc.stdout))
        return None
    return proc.stdout.strip()


def select_suites(args):
    """The suites to run: --suites, else the default group; --network adds
    the network group to --suites and stands alone otherwise; --all is both
    groups."""
    if args.suites:
        suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    elif args.network and not args.all:
        suites = []
    else:
        suites = list(DEFAULT_SUITES)
    if args.network or args.all:
        suites += [s for s in NETWORK_SUITES if s not in suites]
    return suites


def parent_main(args):
    suites = select_suites(args)
    for s in suites:
        mod = suite_spec(s)["module"]
        try:
            found = importlib.util.find_spec(PKG + "." + mod)
        except ImportError:
            found = None
        if found is None:
            sys.stderr.write("unknown suite %r (no module %s.%s)\n" % (s, PKG, mod))
            return 2
    columns = list(COLUMNS) if args.loop == "both" else [args.loop]
    try:
        known = load_known(args.known)
        tls = load_tls(args.known)
    except (ValueError, OSError, SyntaxError) as exc:
        sys.stderr.write("%s\n" % exc)
        return 2

    target_desc = None
    if "mtloop" in columns:
        target_desc = check_target(args)
        if target_desc is None:
            return 2
    pyver = sys.version.split()[0]
    out = sys.stdout
    out.write("CPython test.test_asyncio from %s (Python %s, %s)\n"
              % (os.path.dirname(importlib.util.find_spec("test").origin),
                 pyver, sys.executable))
    if target_desc:
        out.write("mtloop column: --loop-class %s -> %s\n"
                  % (args.loop_class, target_desc))
    out.flush()

    workdir = tempfile.mkdtemp(prefix="cpython_asyncio.")
    results = {}
    jobs = [(s, c) for s in suites for c in columns]
    try:
        for i, (s, c) in enumerate(jobs, 1):
            sys.stderr.write("[%d/%d] %s (%s) ... " % (i, len(jobs), s, c))
            sys.stderr.flush()
            r = run_column(s, c, args, workdir)
            results.setdefault(s, {})[c] = r
            outcomes = [v["outcome"] for v in r["tests"].values()]
            bad = sum(o in FAIL for o in outcomes)
            crashes = sum(o in ("crash", "timeout") for o in outcomes)
            sys.stderr.write("%d tests, %d pass, %d fail%s, %.1fs\n" % (
                len(outcomes), sum(o in PASS for o in outcomes), bad,
                (" (%d crash/timeout)" % crashes) if crashes else "",
                r["seconds"]))
            for tid, rec in r["tests"].items():
                if rec["outcome"] == "timeout":
                    sys.stderr.write("    hung: %s %s\n" % (tid, where_of(rec)))
            sys.stderr.flush()
        flaky = retry_regressions(results, columns, known, tls, args, workdir)
    finally:
        if args.keep_logs:
            sys.stderr.write("child logs kept in %s\n" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    report = dict(python=sys.version, executable=sys.executable,
                  loop_class=args.loop_class if "mtloop" in columns else None,
                  target=target_desc, columns=columns, suites={},
                  regressions=[], known_passing=[], target_only=[],
                  tls_reason=tls[0], argv=sys.argv[1:])
    rows = []
    listing = {"regression": [], "target-only": [], "known-passing": [],
               "known": [], "tls": [], "both-fail": [], "stock-only": [],
               "target-skip": [], "failures": []}
    used_known = set()
    stock_loop_users = []
    for s in suites:
        cols = results[s]
        all_ids = []
        seen = set()
        for c in columns:
            for tid in (cols[c]["plan"] or []) + list(cols[c]["tests"]):
                if tid not in seen:
                    seen.add(tid)
                    all_ids.append(tid)
        outcomes = {c: fill_missing(cols[c], all_ids) for c in columns}
        per_test = {}
        counts = dict.fromkeys(["regression", "known", "tls", "target-only",
                                "both-fail", "known-passing", "stock-only",
                                "target-skip", "ok", "skip"], 0)
        for tid in all_ids:
            entry = {c: outcomes[c][tid] for c in columns}
            key, reason = known_reason(tid, known)
            if key:
                entry["known"] = reason
            is_tls = needs_tls(tid, [cols[c]["tests"].get(tid) for c in columns],
                               tls)
            if is_tls:
                entry["tls"] = True
            if len(columns) == 2:
                cl = classify(entry["stock"], entry["mtloop"], reason, is_tls)
                entry["class"] = cl
                counts[cl] += 1
                if key and cl in ("known", "known-passing"):
                    used_known.add(key)
                if cl in listing:
                    rec = cols["mtloop"]["tests"].get(tid)
                    summary = _summary_of(rec, entry["mtloop"])
                    listing[cl].append(dict(
                        suite=s, id=tid,
                        reason=tls[0] if cl == "tls" else reason,
                        stock=entry["stock"], summary=summary,
                        where=where_of(rec), cause=cause_of(rec, summary),
                        detail=(rec or {}).get("detail", "")))
            else:
                c = columns[0]
                o = entry[c]
                if o in FAIL:
                    if key and c == "mtloop":
                        used_known.add(key)
                        listing["known"].append(dict(suite=s, id=tid,
                                                     reason=reason))
                    elif is_tls and c == "mtloop":
                        listing["tls"].append(dict(suite=s, id=tid,
                                                   reason=tls[0]))
                    else:
                        rec = cols[c]["tests"].get(tid)
                        summary = _summary_of(rec, o)
                        listing["failures"].append(dict(
                            suite=s, id=tid, summary=summary,
                            where=where_of(rec), cause=cause_of(rec, summary),
                            detail=(rec or {}).get("detail", "")))
                elif key and c == "mtloop" and o in PASS:
                    used_known.add(key)
                    listing["known-passing"].append(dict(suite=s, id=tid,
                                                         reason=reason))
            per_test[tid] = entry
        if "mtloop" in columns:
            for tid, rec in cols["mtloop"]["tests"].items():
                if rec.get("stock_loops"):
                    stock_loop_users.append("%s (%d)" % (tid, rec["stock_loops"]))

        def n_pass(c):
            return sum(o in PASS for o in outcomes[c].values())

        def n_uses(c):
            return sum(1 for r in cols[c]["tests"].values() if r.get("loops"))

        def n(c, kinds):
            return sum(o in kinds for o in outcomes[c].values())

        def secs(c):
            return "%.1f" % cols[c]["seconds"]
        if len(columns) == 2:
            rows.append([s, len(all_ids), n_pass("stock"), n_pass("mtloop"),
                         counts["regression"], counts["known"], counts["tls"],
                         counts["target-only"], counts["both-fail"],
                         n(c="mtloop", kinds=SKIP), n_uses("mtloop"),
                         secs("stock"), secs("mtloop")])
        else:
            c = columns[0]
            rows.append([s, len(all_ids), n_pass(c),
                         n(c, {"fail", "xpass"}), n(c, {"error", "notrun"}),
                         n(c, {"crash", "timeout"}), n(c, SKIP), n_uses(c),
                         secs(c)])
        report["suites"][s] = dict(
            module=suite_spec(s)["module"], counts=counts,
            columns={c: dict(notes=cols[c]["notes"], runs=cols[c]["runs"],
                             meta=cols[c]["meta"], seconds=cols[c]["seconds"],
                             tests=cols[c]["tests"]) for c in columns},
            tests=per_test)

    # ---- table ---------------------------------------------------------
    if len(columns) == 2:
        headers = ["suite", "tests", "stock pass", "mtloop pass",
                   "regressions", "known", "tls", "mtloop-only failures",
                   "both fail", "mtloop skip", "uses mtloop", "stock s",
                   "mtloop s"]
    else:
        headers = ["suite", "tests", "%s pass" % columns[0], "fail", "error",
                   "crash/timeout", "skip", "uses loop", "seconds"]
    n_num = len(headers) - (3 if len(columns) == 2 else 2)
    total = (["total"] + [sum(r[i] for r in rows) for i in range(1, n_num + 1)]
             + ["%.1f" % sum(float(r[i]) for r in rows)
                for i in range(n_num + 1, len(headers))])
    out.write("\nPython %s\n" % pyver)
    out.write(_fmt_table(headers, rows, total if len(rows) > 1 else None)
              + "\n")
    if any(s in ("test_tasks", "test_futures") for s in suites):
        out.write(
            "\nCounts are per test method: test_tasks/test_futures count their C and\n"
            "Python Task/Future variants separately, and many of their tests run on\n"
            "test_utils.TestLoop, a fake loop.\n")
    out.write("'%s' counts the tests that created at least one loop of the %s "
              "column;\nseconds are wall time per suite and loop (restarts "
              "included, retries not).\n"
              % (headers[-3] if len(columns) == 2 else headers[-2],
                 "mtloop" if len(columns) == 2 else columns[0]))
    if len(columns) == 2:
        out.write(
            "regressions: pass on stock, fail under mtloop, not in the known list.\n"
            "known: fail under mtloop, listed in %s.\n"
            "tls: fail under mtloop and need TLS (%s), not counted.\n"
            "mtloop-only failures: fail under mtloop, skipped (or absent) on "
            "stock, not known.\n"
            "both fail: fail on both loops, not known.\n"
            % (_display_path(args.known),
               tls[0] or "TLS_REASON is unset: TLS tests count like any other"))

    def show(title, items, limit):
        if not items:
            return
        out.write("\n%s (%d):\n" % (title, len(items)))
        shown = items if (args.verbose or len(items) <= limit) else items[:limit]
        for it in shown:
            line = "  %s" % it["id"]
            if it.get("summary"):
                line += "\n      %s" % it["summary"]
            if it.get("where"):
                line += "\n      %s" % it["where"]
            if it.get("reason"):
                line += "\n      known: %s" % it["reason"]
            out.write(line + "\n")
            if args.verbose and it.get("detail"):
                for dl in it["detail"].rstrip().splitlines()[-25:]:
                    out.write("        | %s\n" % dl)
        if len(shown) < len(items):
            out.write("  ... and %d more (-v or --json for all)\n"
                      % (len(items) - len(shown)))

    def show_causes(title, items):
        """The failures grouped by cause_of(), most frequent first."""
        if len(items) < 2:
            return
        groups = {}
        for it in items:
            groups.setdefault(it["cause"], []).append(it)
        out.write("\n%s (%d tests, %d causes):\n"
                  % (title, len(items), len(groups)))
        for cause, its in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            out.write("  %4d  %s\n" % (len(its), cause))
            by_suite = {}
            for it in its:
                mod, _, rest = it["id"].partition(".")
                by_suite.setdefault(mod, []).append(rest)
            for mod, names in by_suite.items():
                out.write("        %s: %s\n" % (mod, ", ".join(names)))

    def show_ids(title, items):
        if not items:
            return
        out.write("\n%s (%d):\n" % (title, len(items)))
        for it in items:
            out.write("  %s\n" % it["id"])

    if len(columns) == 2:
        show("REGRESSIONS (pass on stock, fail under mtloop)",
             listing["regression"], 200)
        show_causes("regressions by cause", listing["regression"])
        show("mtloop-only failures (stock skipped these)",
             listing["target-only"], 50)
        show("known entries now passing under mtloop (remove them?)",
             listing["known-passing"], 100)
        if listing["tls"]:
            if args.verbose:
                show("failing under mtloop, need TLS (%s)" % tls[0],
                     listing["tls"], 10**6)
            else:
                show_ids("failing under mtloop, need TLS, not counted: %s"
                         % tls[0], listing["tls"])
        if args.verbose:
            show("known failures", listing["known"], 10**6)
            show("failing on both loops", listing["both-fail"], 10**6)
            show("failing on stock only", listing["stock-only"], 10**6)
            show("pass on stock, skipped under mtloop",
                 listing["target-skip"], 10**6)
        else:
            n_skip = len(listing["target-skip"])
            if n_skip:
                out.write("\n%d tests pass on stock but are skipped under "
                          "mtloop (-v lists them).\n" % n_skip)
    else:
        show("failures (%s)" % columns[0], listing["failures"], 200)
        show_causes("failures by cause", listing["failures"])
        show_ids("failing, need TLS, not counted: %s" % tls[0], listing["tls"])
        show("known entries now passing", listing["known-passing"], 100)
        if args.verbose:
            show("known failures", listing["known"], 10**6)
    if stock_loop_users:
        out.write("\n%d tests in the mtloop column built a stock selector loop "
                  "themselves%s\n" % (
                      len(stock_loop_users),
                      ":" if args.verbose else " (-v lists them)."))
        if args.verbose:
            for u in stock_loop_users:
                out.write("  %s\n" % u)
    for s in suites:
        for c in columns:
            runs = results[s][c]["runs"]
            if len(runs) > 1 or not runs[-1]["done"]:
                kinds = [r.get("kind") for r in runs]
                out.write("\nnote: %s (%s) ran %d child process(es): %d crashed, "
                          "%d hung%s\n" % (
                              s, c, len(runs), kinds.count("crash"),
                              kinds.count("timeout"),
                              "" if runs[-1]["done"] else
                              "; the last one did not finish"))
                for tid, rec in results[s][c]["tests"].items():
                    if rec["outcome"] in ("crash", "timeout"):
                        out.write("  %s %s: %s\n      %s\n" % (
                            rec["outcome"], tid, rec.get("summary", ""),
                            where_of(rec) or "(no stack was dumped; "
                            "--keep-logs keeps the child's log)"))
            for note in results[s][c]["notes"]:
                if args.verbose or note.startswith(("gave up", "WARNING")):
                    out.write("note: %s (%s): %s\n" % (s, c, note))
    if args.verbose and "mtloop" in columns:
        unused = sorted(set(known) - used_known)
        if unused:
            out.write("\nknown entries that matched no failing or passing test "
                      "in this run (%d):\n" % len(unused))
            for k in unused:
                out.write("  %s\n" % k)

    report["regressions"] = listing["regression"]
    report["known_passing"] = listing["known-passing"]
    report["target_only"] = listing["target-only"]
    report["failures"] = listing["failures"]
    report["tls"] = listing["tls"]
    report["stock_loop_users"] = stock_loop_users
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, sort_keys=True)
        out.write("\ndetails written to %s\n" % args.json)

    if len(columns) == 2:
        if flaky:
            out.write("\nfailed under mtloop, then passed when run again "
                      "(timing-sensitive under load; not counted) (%d):\n" % len(flaky))
            for tid, first in flaky:
                out.write("  %s\n      first run: %s\n" % (tid, first))
        bad = len(listing["regression"])
        out.write("\n%d regression(s)\n" % bad)
    else:
        bad = len(listing["failures"])
        out.write("\n%d failure(s) not listed as known\n" % bad)
    out.flush()
    return 1 if bad else 0


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Run CPython's test.test_asyncio suites against mtloop "
                    "and the stock loop, and compare them.")
    p.add_argument("--loop", choices=["stock", "mtloop", "both"], default="both",
                   help="which column(s) to run (default: both)")
    p.add_argument("--suites", metavar="S1,S2",
                   help="comma-separated suites (default: %s; network group: "
                        "%s; any other test.test_asyncio module runs as is)"
                        % (",".join(DEFAULT_SUITES), ",".join(NETWORK_SUITES)))
    p.add_argument("--network", action="store_true",
                   help="run the network group (transports, servers, streams, "
                        "sendfile); alone, or added to --suites")
    p.add_argument("--all", action="store_true",
                   help="run the default and the network group")
    p.add_argument("--json", metavar="OUT", help="write all details to OUT")
    p.add_argument("-k", action="append", metavar="PATTERN",
                   help="only tests whose id contains PATTERN (fnmatch if it "
                        "has a '*'); may be repeated")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--loop-class", default="mtloop", metavar="MOD[:NAME]",
                   help="loop for the mtloop column: MOD means MOD.Loop for the "
                        "policy and MOD.new_event_loop() for the suites' own "
                        "hooks; MOD:NAME uses that class or factory for both "
                        "(default: mtloop)")
    p.add_argument("--impl-module", help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=300,
                   help="seconds per child process (default 300)")
    p.add_argument("--test-timeout", type=float, default=60,
                   help="seconds per test before it counts as hung (default 60)")
    p.add_argument("--max-restarts", type=int, default=50,
                   help="child restarts per suite and loop after crashes or "
                        "hangs (default 50)")
    p.add_argument("--suite-budget", type=float, default=900,
                   help="no more restarts once a suite/loop pair has run this "
                        "many seconds (default 900)")
    p.add_argument("--known", default=KNOWN_FILE, help=argparse.SUPPRESS)
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the children's output in a temp directory")
    # child mode
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--suite", help=argparse.SUPPRESS)
    p.add_argument("--column", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--skip-ids", help=argparse.SUPPRESS)
    p.add_argument("--only-ids", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.impl_module:
        args.loop_class = args.impl_module
    if args.child:
        return child_main(args)
    try:
        return parent_main(args)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
