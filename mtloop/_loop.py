"""mtloop.Loop: the C core joined with asyncio's event loop API."""

from __future__ import annotations

import asyncio
import os
import weakref
from asyncio import base_events, format_helpers
from asyncio.log import logger
from typing import Any

from . import _mtloop
from ._datagram import DatagramMethods
from ._pipes import PipeMethods
from ._signals import SignalMethods
from ._sock import SocketMethods
from ._streams import StreamMethods
from ._subprocess import SubprocessMethods
from ._unix import UnixSocketMethods

__all__ = ["Loop"]


def _spin_from_environment() -> float:
    """$MTLOOP_SPIN_US: the default spin_us (a value that is not a number
    from 0 to 1,000,000 is ignored, as $MTLOOP_IO_THREADS's are)."""
    try:
        value = float(os.environ.get("MTLOOP_SPIN_US", "0"))
    except ValueError:
        return 0.0
    return value if 0.0 <= value <= 1e6 else 0.0


class Loop(_mtloop.LoopCore, SignalMethods, SocketMethods, StreamMethods, UnixSocketMethods,
           PipeMethods, SubprocessMethods, DatagramMethods, asyncio.BaseEventLoop):
    """An asyncio event loop whose run loop, handles, timers and fd watchers
    are in C (mtloop._mtloop.LoopCore).

    The C base comes first in the MRO, so its call_soon/call_later/call_at/
    call_soon_threadsafe/time/_run_once/add_reader/... replace the stock
    ones; asyncio.BaseEventLoop supplies the cold paths on top of them
    (run_until_complete, tasks, exception handling, executors, address
    resolution)."""

    def __init__(self, *, io_threads: int | None = None, native_tls: bool = True,
                 spin_us: float | None = None) -> None:
        # Whether TLS may run on the I/O threads (mtloop._tls); False takes
        # asyncio's SSL protocol for every connection of this loop.
        self._mt_native_tls = bool(native_tls)
        try:
            if spin_us is None:
                spin_us = _spin_from_environment()
            elif not isinstance(spin_us, (int, float)) or isinstance(spin_us, bool):
                raise TypeError("spin_us must be a number or None, not "
                                f"{type(spin_us).__name__}")
            self._mt_set_spin(float(spin_us))
        except BaseException:
            # Half-made: BaseEventLoop.__del__ must find nothing to close.
            self._closed = True
            raise
        if io_threads is not None:
            try:
                if not isinstance(io_threads, int) or isinstance(io_threads, bool):
                    raise TypeError("io_threads must be an int or None, not "
                                    f"{type(io_threads).__name__}")
                self._mt_configure_io(io_threads)
            except BaseException:
                # Half-made: BaseEventLoop.__del__ must find nothing to close.
                self._closed = True
                raise
        asyncio.BaseEventLoop.__init__(self)
        self._signal_handlers = {}
        self._mt_signal_socks = None
        self._mt_listeners = {}
        self._mt_children = {}
        # fd -> transport, for asyncio's datagram transport (mtloop._datagram).
        self._transports = weakref.WeakValueDictionary()

    def run_forever(self) -> None:
        restore = self._mt_install_wakeup_fd() if not self.is_running() else None
        try:
            super().run_forever()
        finally:
            if restore is not None:
                restore()

    def close(self) -> None:
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        if self.is_closed():
            return
        self._mt_remove_all_signal_handlers()
        # Listeners still serving are let go by _core_close(), with every
        # other record of the loop.
        self._mt_listeners = {}
        super().close()
        self._mt_close_children()
        self._mt_close_signal_socket()
        self._core_close()

    def _mt_callback_error(self, handle: Any, exc: BaseException) -> None:
        """A callback raised: report it as asyncio's Handle._run() does."""
        cb = format_helpers._format_callback_source(handle._callback, handle._args)
        context = {
            "message": f"Exception in callback {cb}",
            "exception": exc,
            "handle": handle,
        }
        if handle._source_traceback:
            context["source_traceback"] = handle._source_traceback
        self.call_exception_handler(context)

    def _mt_slow_callback(self, handle: Any, seconds: float) -> None:
        logger.warning("Executing %s took %.3f seconds",
                       base_events._format_handle(handle), seconds)
