"""Pipe transports: connect_read_pipe() and connect_write_pipe() on the I/O
threads.

A pipe is one more flow kind (src/transport/pipe_ops.c under the same pump
as sockets): reading, writing, read credit and write accounting are the
stream's; what differs is the end of the connection, which follows the
stock loop's _UnixReadPipeTransport and _UnixWritePipeTransport:

- a read pipe's EOF calls eof_received() (its answer is ignored) and then
  connection_lost(None); EIO (a pty whose other side closed) ends it
  quietly, other read errors go to the exception handler;
- a write pipe has no half-close: write_eof() is close(), and writes after
  it are dropped and counted; the read end going away (readability of the
  write end, watched for pipes, FIFOs and sockets but not character
  devices) ends it with BrokenPipeError when output was still queued;
- the pipe object is closed once, when the connection is lost.

BaseEventLoop's connect_read_pipe()/connect_write_pipe() call the two
hooks here, so their waiter and error handling are the stock ones.
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from asyncio import constants
from asyncio.log import logger
from typing import Any

from ._transports import FlowTransport

__all__ = ["PipeMethods", "ReadPipeTransport", "WritePipeTransport"]


class _PipeTransport(FlowTransport):
    """What both pipe ends share: the pipe object and its checks.  Pipe
    transports keep a __dict__, as the stock ones do: tests and tools
    replace their methods per instance (CPython's test_subprocess mocks
    pause_reading())."""

    _kind = ""
    _not_a_pipe = ""

    def __init__(self, loop: Any, pipe: Any, protocol: Any, waiter: Any = None,
                 extra: dict | None = None) -> None:
        self._pipe = None
        fileno = pipe.fileno()
        mode = os.fstat(fileno).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)):
            raise ValueError(self._not_a_pipe)
        os.set_blocking(fileno, False)
        self._fileno = fileno
        # The record reads and writes its own copy of the descriptor; the
        # pipe object is the caller's and is closed when the connection is.
        self._mt_open(loop, fileno, protocol, True, extra, kind=self._kind)
        try:
            self._pipe = pipe
            self._extra["pipe"] = pipe
            self._mt_start(protocol, waiter, read=self._mt_watches(mode))
        except BaseException:
            self._mt_undo()
            raise

    def _mt_watches(self, mode: int) -> bool:
        """Whether the I/O thread watches the fd for reading."""
        return True

    def close(self) -> None:
        # connection_lost() comes with RELEASED (_mt_closed()), once the I/O
        # thread has let go of its copy of the descriptor: the other end then
        # sees the pipe closed by the time the protocol hears of it, as with
        # the stock loop (a child writing to a stdout the parent closed gets
        # EPIPE; CPython's test_subprocess_close_client_stream waits for it).
        if not self._core.closing:
            self._core.close()

    def __repr__(self) -> str:
        info = [type(self).__name__]
        if self._pipe is None:
            info.append("closed")
        elif self._core.closing:
            info.append("closing")
        info.append(f"fd={self._fileno}")
        if self._pipe is not None:
            if self._core.fd < 0:
                info.append("open")  # the loop closed; the pipe object is still open
            else:
                info.extend(self._mt_state())
        return "<{}>".format(" ".join(info))

    def _mt_state(self) -> list[str]:
        return ["polling" if self.is_reading() else "idle"]

    def __del__(self, _warn: Any = warnings.warn) -> None:
        # Unclosed while the pipe object is open (after the loop closed,
        # too): warn and close it, as the stock transport does.  The core
        # aborts the flow when it goes.
        if getattr(self, "_pipe", None) is not None:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self._mt_lost()

    def _mt_lost(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            pipe.close()

    def _mt_loop_closed(self) -> None:
        """As with the stock loop, the pipe object stays open (the record's
        own copy of the descriptor is closed)."""


class ReadPipeTransport(_PipeTransport):
    """asyncio's ReadTransport over a pipe, FIFO, pty or socket."""

    _kind = "read-pipe"
    _not_a_pipe = "Pipe transport is for pipes/sockets only."

    def _mt_after_eof(self, keep_open: Any) -> None:
        if self._loop.get_debug():
            logger.info("%r was closed by peer", self)
        self.close()  # whatever eof_received() answered, as asyncio does

    def _mt_read_error(self, err: int) -> None:
        if self._lost_scheduled:
            return
        exc = OSError(err, os.strerror(err))
        if err == errno.EIO:
            # A pty whose other side closed: asyncio ends quietly.
            if self._loop.get_debug():
                logger.debug("%r: Fatal read error on pipe transport", self, exc_info=exc)
        else:
            self._loop.call_exception_handler({
                "message": "Fatal read error on pipe transport",
                "exception": exc,
                "transport": self,
                "protocol": self._protocol,
            })
        self._force_close(exc)


class WritePipeTransport(_PipeTransport):
    """asyncio's WriteTransport over a pipe, FIFO, pty or socket."""

    _kind = "write-pipe"
    _not_a_pipe = "Pipe transport is only for pipes, sockets and character devices"

    def __init__(self, loop: Any, pipe: Any, protocol: Any, waiter: Any = None,
                 extra: dict | None = None) -> None:
        self._dropped = 0
        super().__init__(loop, pipe, protocol, waiter, extra)

    def _mt_state(self) -> list[str]:
        size = self.get_write_buffer_size()
        return ["polling" if size else "idle", f"bufsize={size}"]

    def _mt_watches(self, mode: int) -> bool:
        # The read end going away makes a pipe's or socket's write end
        # readable; a character device (a pty) is readable for its data.
        return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)

    def write(self, data: Any) -> None:
        core = self._core
        if core.closing or core.conn_lost:
            # After write_eof(), close() or a failure: dropped and counted,
            # as the stock pipe transport does.
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError("data argument must be a bytes-like object, "
                                f"not '{type(data).__name__}'")
            if len(data):
                if self._dropped >= constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                    logger.warning("pipe closed by peer or os.write(pipe, data) raised exception.")
                self._dropped += 1
            return
        core.write(data)

    def write_eof(self) -> None:
        self.close()  # a pipe ends by closing

    def can_write_eof(self) -> bool:
        return True

    def _mt_eof(self) -> None:
        # Readable: the read end is gone.
        if self._lost_scheduled:
            return
        if self._loop.get_debug():
            logger.info("%r was closed by peer", self)
        self._force_close(BrokenPipeError() if self.get_write_buffer_size() else None)

    def _mt_write_error(self, err: int) -> None:
        if self._lost_scheduled:
            return
        self._fatal_error(OSError(err, os.strerror(err)), "Fatal write error on pipe transport")


class PipeMethods:
    """Mixin for mtloop.Loop: the hooks of BaseEventLoop.connect_*_pipe()."""

    def _make_read_pipe_transport(self, pipe: Any, protocol: Any, waiter: Any = None,
                                  extra: dict | None = None) -> ReadPipeTransport:
        return ReadPipeTransport(self, pipe, protocol, waiter, extra)

    def _make_write_pipe_transport(self, pipe: Any, protocol: Any, waiter: Any = None,
                                   extra: dict | None = None) -> WritePipeTransport:
        return WritePipeTransport(self, pipe, protocol, waiter, extra)
