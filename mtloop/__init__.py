"""mtloop: a drop-in asyncio event loop for CPython on Linux, written in C.

Use it with ``asyncio.run(main(), loop_factory=mtloop.new_event_loop)``
(Python 3.12+), ``mtloop.run(main())``, or
``asyncio.set_event_loop_policy(mtloop.EventLoopPolicy())``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine, TypeVar

from ._loop import Loop
from ._mtloop import libevent_version

__all__ = ["Loop", "EventLoopPolicy", "new_event_loop", "run",
           "libevent_version"]
__version__ = "0.1.0"

_T = TypeVar("_T")


def new_event_loop() -> Loop:
    """Return a new mtloop event loop."""
    return Loop()


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
