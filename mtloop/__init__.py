"""mtloop: a drop-in asyncio event loop for CPython on Linux, written in C.

Use it with ``asyncio.run(main(), loop_factory=mtloop.new_event_loop)``
(Python 3.12+), ``mtloop.run(main())``, or
``asyncio.set_event_loop_policy(mtloop.EventLoopPolicy())``.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import sys
import warnings
from typing import Any, Callable, Coroutine, TypeVar

from . import _mtloop, _tls
from ._loop import Loop
from ._mtloop import libevent_version

__all__ = ["Loop", "EventLoopPolicy", "new_event_loop", "run", "runtime_stats",
           "tls_stats", "shutdown_runtime", "default_io_threads", "libevent_version"]
__version__ = "0.1.0"

_T = TypeVar("_T")


def new_event_loop(*, io_threads: int | None = None, native_tls: bool = True,
                   spin_us: float | None = None) -> Loop:
    """Return a new mtloop event loop.

    ``io_threads`` is how many of the process's I/O threads the loop
    spreads its connections over (the pool grows to at least that many);
    0 runs the loop's I/O on the loop thread itself, inside its wait, as
    uvloop does (no thread, no handoff).  By default $MTLOOP_IO_THREADS,
    or the number of CPUs the process may use (its affinity mask, capped
    by its cgroup's CPU quota) less one (at most 8; 0, inline, on one CPU).

    ``native_tls``: TLS connections run their handshake and record crypto
    on the I/O threads wherever the SSLContext allows it (see
    ``tls_stats()``); False runs asyncio's own SSL protocol on the loop
    thread for every connection of this loop ($MTLOOP_NATIVE_TLS=0 does so
    for the whole process).

    ``spin_us``: before it sleeps, the loop thread polls for work from its
    I/O threads for up to this many microseconds (by default
    $MTLOOP_SPIN_US, else 0: it never spins).  A request/response peer
    that answers within the spin is served without a thread wakeup, which
    cuts round-trip latency at the cost of the CPU the spin burns; after 8
    spins in a row that catch nothing the loop stops spinning for a while,
    so an idle loop sleeps as without it.  An inline loop (io_threads=0)
    never spins: its I/O shows only in its wait."""
    return Loop(io_threads=io_threads, native_tls=native_tls, spin_us=spin_us)


def runtime_stats() -> list[dict[str, int]]:
    """Counters of each running I/O thread, one dict per thread.

    Keys: ``thread`` (index), ``transports`` and ``listeners`` (owned now),
    ``bytes_read``, ``bytes_written`` (with what a loop thread sent itself on
    the thread's connections), ``accepts``, ``commands`` and
    ``completions`` (handled so far), ``wakeups_sent`` (eventfd writes that
    woke the thread), ``wakeups_received``, ``cpu_ns`` (the thread's CPU
    time), ``wait_ns`` (its time asleep, the wait in progress included) and
    ``held_back`` (times it parked a connection because a loop had not yet
    taken 8 MiB of completions the thread had made for it).  Empty before the pool starts and after it stops.  Per loop,
    ``loop.completion_stats()`` tells how its completions arrived."""
    return _mtloop.runtime_stats()


def tls_stats() -> dict[str, Any]:
    """How this process's TLS connections ran: ``native`` (on the I/O
    threads) and ``fallback`` (asyncio's SSL protocol on the loop thread)
    counts, ``fallback_reasons`` (reason -> count), ``available`` and
    ``unavailable_reason`` (whether the native path could be proved here:
    the ssl module and mtloop must share one libssl)."""
    return _tls.stats()


def shutdown_runtime() -> None:
    """Stop and join the I/O threads.  Their open transports are aborted
    (connection_lost gets ConnectionAbortedError); the next transport or
    server starts a fresh pool.  Also done at interpreter exit."""
    _mtloop.shutdown_runtime()


def default_io_threads() -> int:
    """The number of I/O threads a loop uses when not told otherwise (0: inline)."""
    return _mtloop.default_io_threads()


atexit.register(_mtloop._shutdown_at_exit)


def run(main: Coroutine[Any, Any, _T], *, debug: bool | None = None,
        loop_factory: Callable[..., asyncio.AbstractEventLoop] | None = None,
        io_threads: int | None = None, **kwargs: Any) -> _T:
    """Run a coroutine on a new mtloop loop, like asyncio.run() and uvloop.run().

    ``loop_factory`` (default: new_event_loop) makes the loop; it gets
    ``io_threads`` (when given) and any other keyword, so
    ``mtloop.run(main(), io_threads=0, spin_us=50)`` runs with those
    options.  As uvloop.run() insists on a uvloop loop, the loop must be an
    mtloop.Loop (TypeError otherwise)."""
    if asyncio.events._get_running_loop() is not None:
        # Same check and message as asyncio.run(), before a Runner exists.
        raise RuntimeError("asyncio.run() cannot be called from a running event loop")
    if not asyncio.iscoroutine(main):
        raise ValueError(f"a coroutine was expected, got {main!r}")
    factory = new_event_loop if loop_factory is None else loop_factory
    if io_threads is not None:
        kwargs["io_threads"] = io_threads
    if kwargs:
        factory = functools.partial(factory, **kwargs)

    async def on_mtloop() -> _T:
        if not isinstance(asyncio.events._get_running_loop(), Loop):
            main.close()
            raise TypeError("mtloop.run() uses a non-mtloop event loop")
        return await main

    runner = asyncio.Runner(debug=debug, loop_factory=factory)
    try:
        runner.get_loop()  # the factory's errors come before anything awaits main
    except BaseException:
        main.close()
        runner.close()
        raise
    with runner:
        return runner.run(on_mtloop())


# Python 3.14 deprecates asyncio's policies (removal in 3.16) and warns when
# asyncio.DefaultEventLoopPolicy is looked up; the class behind that name is
# taken without the lookup, and mtloop's policy warns on use instead.
_POLICIES_DEPRECATED = sys.version_info >= (3, 14)
if _POLICIES_DEPRECATED:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        _PolicyBase = getattr(asyncio.events, "_DefaultEventLoopPolicy", None) or \
            getattr(asyncio, "DefaultEventLoopPolicy")
else:
    _PolicyBase = asyncio.DefaultEventLoopPolicy


class EventLoopPolicy(_PolicyBase):  # type: ignore[misc, valid-type]
    """An event loop policy whose new_event_loop() returns mtloop loops,
    made with the keywords given here (those of new_event_loop(), which
    checks them when the policy makes its first loop)."""

    def __init__(self, *, io_threads: int | None = None, native_tls: bool = True,
                 spin_us: float | None = None) -> None:
        if _POLICIES_DEPRECATED:
            warnings.warn("'mtloop.EventLoopPolicy' is deprecated and slated for removal in "
                          "Python 3.16, as asyncio's policies are; use mtloop.run() or "
                          "asyncio.run(main, loop_factory=mtloop.new_event_loop)",
                          DeprecationWarning, stacklevel=2)
        super().__init__()
        self._mt_options = {"io_threads": io_threads, "native_tls": native_tls,
                            "spin_us": spin_us}

    def _loop_factory(self) -> Loop:  # type: ignore[override]
        return new_event_loop(**self._mt_options)
