"""Unix signal handling for mtloop.Loop.

Signals reach the loop through Python's wakeup fd: the C-level handler
writes the signal number to a socket the loop watches, which ends the wait
in the loop's event base.  The signal numbers read there run the handlers
registered with add_signal_handler(); Python-level handlers such as the
default SIGINT handler run from the C run loop (PyErr_CheckSignals), so
Ctrl-C interrupts run_forever() as it does on the stock loop.
"""

from __future__ import annotations

import errno
import signal
import socket
import sys
import threading
import warnings
from asyncio import coroutines, events
from asyncio.log import logger
from typing import Any, Callable


def _noop_handler(signum: int, frame: Any) -> None:
    """Python-level stand-in; the work happens when the loop reads the wakeup fd."""


class SignalMethods:
    """Mixin for mtloop.Loop."""

    _signal_handlers: dict[int, events.Handle]
    _mt_signal_socks: tuple[socket.socket, socket.socket] | None

    def _mt_signal_socket(self) -> int:
        """The write end for signal.set_wakeup_fd(), created and watched on first use."""
        if self._mt_signal_socks is None:
            rsock, wsock = socket.socketpair()
            rsock.setblocking(False)
            wsock.setblocking(False)
            self._mt_signal_socks = (rsock, wsock)
            self._internal_fds += 1
            self._add_reader(rsock.fileno(), self._mt_read_signals)
        return self._mt_signal_socks[1].fileno()

    def _mt_close_signal_socket(self) -> None:
        if self._mt_signal_socks is not None:
            rsock, wsock = self._mt_signal_socks
            self._mt_signal_socks = None
            self._internal_fds -= 1
            self._remove_reader(rsock.fileno())
            rsock.close()
            wsock.close()

    def _mt_read_signals(self) -> None:
        assert self._mt_signal_socks is not None
        while True:
            try:
                data = self._mt_signal_socks[0].recv(4096)
            except InterruptedError:
                continue
            except BlockingIOError:
                return
            if not data:
                return
            for signum in data:
                self._handle_signal(signum)

    def _mt_install_wakeup_fd(self) -> Callable[[], None]:
        """While run_forever() runs in the main thread, make sure signals end
        the wait even with no handler registered; returns the undo."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        fd = self._mt_signal_socket()
        try:
            old = signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
        except (ValueError, OSError):
            return lambda: None
        if old == fd:
            return lambda: None
        if old != -1:
            # Someone else owns the wakeup fd: leave it to them.
            signal.set_wakeup_fd(old)
            return lambda: None

        def restore() -> None:
            if self._signal_handlers:
                return  # add_signal_handler() keeps it, as the stock loop does
            try:
                if signal.set_wakeup_fd(-1) != fd:
                    signal.set_wakeup_fd(old)
            except (ValueError, OSError):
                pass

        return restore

    def _check_signal(self, sig: Any) -> None:
        if not isinstance(sig, int):
            raise TypeError(f"sig must be an int, not {sig!r}")
        if sig not in signal.valid_signals():
            raise ValueError(f"invalid signal number {sig}")

    def add_signal_handler(self, sig: int, callback: Callable[..., object],
                           *args: Any) -> None:
        """Run callback(*args) on the loop thread whenever signal sig arrives."""
        if coroutines.iscoroutine(callback) or coroutines.iscoroutinefunction(callback):
            raise TypeError("coroutines cannot be used with add_signal_handler()")
        self._check_signal(sig)
        self._check_closed()
        try:
            signal.set_wakeup_fd(self._mt_signal_socket(), warn_on_full_buffer=False)
        except (ValueError, OSError) as exc:
            raise RuntimeError(str(exc))
        self._signal_handlers[sig] = events.Handle(callback, args, self, None)
        try:
            signal.signal(sig, _noop_handler)
            signal.siginterrupt(sig, False)
        except OSError as exc:
            del self._signal_handlers[sig]
            if not self._signal_handlers:
                self._mt_clear_wakeup_fd()
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig} cannot be caught")
            raise

    def remove_signal_handler(self, sig: int) -> bool:
        """Remove the handler for sig; returns whether there was one."""
        self._check_signal(sig)
        try:
            del self._signal_handlers[sig]
        except KeyError:
            return False
        handler = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        try:
            signal.signal(sig, handler)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig} cannot be caught")
            raise
        if not self._signal_handlers:
            self._mt_clear_wakeup_fd()
        return True

    def _mt_clear_wakeup_fd(self) -> None:
        try:
            signal.set_wakeup_fd(-1)
        except (ValueError, OSError) as exc:
            logger.info("set_wakeup_fd(-1) failed: %s", exc)

    def _handle_signal(self, sig: int) -> None:
        handle = self._signal_handlers.get(sig)
        if handle is None:
            return
        if handle._cancelled:
            self.remove_signal_handler(sig)
        else:
            self._add_callback_signalsafe(handle)

    def _mt_remove_all_signal_handlers(self) -> None:
        if not self._signal_handlers:
            return
        if sys.is_finalizing():
            warnings.warn(f"Closing the loop {self!r} on interpreter shutdown "
                          f"stage, skipping signal handlers removal",
                          ResourceWarning, source=self)
            self._signal_handlers.clear()
            return
        for sig in list(self._signal_handlers):
            self.remove_signal_handler(sig)
