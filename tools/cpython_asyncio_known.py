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

KNOWN: dict[str, str] = {
    # -- stock internals ----------------------------------------------------
    "test_events.EventLoopTests.test_timeout_rounding":
        "builds its assertion message from loop._selector, the stock selector "
        "loop's private selector object, which mtloop (a libevent base) has not",
    # -- network: transports and servers are issue #3 ------------------------
    "test_events.TestServer.test_get_loop":
        "network: create_server needs transports and servers (issue #3)",
}
