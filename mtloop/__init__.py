"""mtloop: a drop-in asyncio event loop for CPython on Linux, written in C.

Use it with ``asyncio.run(main(), loop_factory=mtloop.new_event_loop)``
(Python 3.12+), ``mtloop.run(main())``, or
``asyncio.set_event_loop_policy(mtloop.EventLoopPolicy())``.
"""

from __future__ import annotations

import asyncio
import atexit
from typing import Any, Coroutine, TypeVar

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
    ``bytes_read``, ``bytes_written``, ``accepts``, ``commands`` and
    ``completions`` (handled so far), ``wakeups_sent`` (eventfd writes that
    woke the thread) and ``wakeups_received``.  Empty before the pool
    starts and after it stops."""
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


def run(main: Coroutine[Any, Any, _T], *, debug: bool | None = None) -> _T:
    """Run a coroutine on a new mtloop loop, like asyncio.run()."""
    if asyncio.events._get_running_loop() is not None:
        # Same check and message as asyncio.run(), before a Runner exists.
        raise RuntimeError("asyncio.run() cannot be called from a running event loop")
    with asyncio.Runner(debug=debug, loop_factory=new_event_loop) as runner:
        return runner.run(main)


class EventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """An event loop policy whose new_event_loop() returns mtloop loops."""

    def _loop_factory(self) -> Loop:  # type: ignore[override]
        return new_event_loop()
