"""Known differences between mtloop and the stock asyncio loop in CPython's
own ``test.test_asyncio`` suites, as run by ``tools/cpython_asyncio.py``.

``KNOWN`` maps a test id, or an ``fnmatch`` pattern over test ids, to the
reason why the test is allowed to fail under mtloop.  A test that passes on
the stock loop but fails under mtloop is reported as a REGRESSION (and makes
the runner exit with status 1) unless it matches an entry here; a test that
matches an entry here but passes under mtloop is reported as "known entry now
passing", so stale entries are easy to spot and remove.

Every entry MUST carry a reason: a non-empty string that says why the
difference is acceptable or which issue will remove it.  Good reasons name
the cause, for example:

    "asserts the stock loop's private internals (loop._selector)"
    "network: transports come in issue #3"

Test ids have the form ``<module>.<Class>.<test>``, where ``<module>`` is the
module name without the ``test.test_asyncio.`` prefix, e.g.

    test_tasks.CTask_CFuture_Tests.test_cancel
    test_events.EventLoopTests.test_internal_fds

For suites whose CPython classes pick a loop per selector (test_events,
test_sock_lowlevel, test_sendfile, test_server, test_buffered_proto) the
runner replaces those classes by one class of its own, whose ids are
``EventLoopTests`` / ``UnixEventLoopTests`` (test_events; the latter holds
the network tests), ``SockTests``, ``SendfileTests``, ``StartServerTests`` and
``BufferedProtocolTests``.  ``python tools/cpython_asyncio.py -v`` prints the
ids of every test that did not pass.

A key may start with a Python version and a colon, e.g.
``"3.13:test_runners.RunTests.test_loop_factory_default_event_loop"``, to
apply only when the runner itself runs under that minor version (the suites
differ between 3.11, 3.12 and 3.13).  Patterns use ``fnmatch.fnmatchcase``:
``*`` matches across dots, so ``"test_events.UnixEventLoopTests.test_*ssl*"``
covers all SSL tests of that class.
"""

# -- TLS ----------------------------------------------------------------------
# While TLS_REASON is a string, tests that need TLS are not regressions: the
# runner counts those that fail under mtloop in a "tls" column of their own
# and lists them with this reason.  It is None since TLS came (issue #10):
# every TLS test counts like any other.  A test needs TLS when its method name
# matches one of TLS_NAME_PATTERNS (fnmatch, case-insensitive) or when it
# created an ssl.SSLContext while it ran, on either loop (so a TLS test whose
# name says nothing is caught on the stock side).  Set TLS_REASON = None when
# mtloop gets TLS: they then count like any other test.
TLS_REASON: str | None = None
TLS_NAME_PATTERNS: list[str] = ["*ssl*", "*tls*"]

KNOWN: dict[str, str] = {
    # -- stock internals ----------------------------------------------------
    "test_events.EventLoopTests.test_timeout_rounding":
        "builds its assertion message from loop._selector, the stock selector "
        "loop's private selector object, which mtloop (a libevent base) has not",
    # -- asyncio's SSL protocol, white-box --------------------------------------
    # These drive asyncio.sslproto.SSLProtocol's internals through the
    # transport (tr._ssl_protocol, tr._test__append_write_backlog()).  A native
    # TLS transport (issue #10) has no SSLProtocol under it; what they check
    # (output flushed before close_notify, data written while the peer's
    # close_notify arrives) is in tests/test_tls_native.py, and they pass on
    # mtloop's fallback path (new_event_loop(native_tls=False)).
    "test_ssl.TestSSL.test_flush_before_shutdown":
        "white-box test of asyncio.sslproto.SSLProtocol (reads tr._ssl_protocol); "
        "the native TLS transport has none under it",
    "test_ssl.TestSSL.test_remote_shutdown_receives_trailing_data":
        "white-box test of asyncio.sslproto.SSLProtocol (calls "
        "tr._test__append_write_backlog()); the native TLS transport has none under it",
    # -- timing of a flushing close() ------------------------------------------
    # The handler does write(b'1'); close(); the test then asserts, right after
    # run_until_complete() returns, that the connection is already detached
    # from the server.  The stock loop sends the byte inside write(), so close()
    # finds an empty buffer and connection_lost() follows on the next
    # iteration; mtloop's I/O thread flushes the byte first, and
    # connection_lost() comes once it reports the socket released, a
    # cross-thread round trip later, racing the end of run_until_complete().
    "test_server.StartServerTests.test_start_server_1":
        "asserts connection_lost() ran within the iterations after write()+close(); "
        "mtloop flushes on an I/O thread first (a round trip later), which races "
        "the end of run_until_complete()",
    "test_server.StartServerTests.test_start_unix_server_1":
        "asserts connection_lost() ran within the iterations after write()+close(); "
        "mtloop flushes on an I/O thread first (a round trip later), which races "
        "the end of run_until_complete()",
    # -- child watchers (issue #11) ------------------------------------------
    "test_subprocess.GenericWatcherTests.test_create_subprocess_fails_with_inactive_watcher":
        "asserts that the stock loop consults the policy's child watcher (an API "
        "deprecated in 3.12 and gone in 3.14); mtloop watches its own children "
        "with pidfds and never asks the policy, as uvloop does not",
}
