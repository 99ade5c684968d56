"""Stream transports whose socket I/O runs on mtloop's I/O threads.

`SocketTransport` is asyncio's Transport API around a C core
(`mtloop._mtloop.StreamCore`): writes, reading, read credit and the
dispatch of received data to the protocol are in C; the state machine of
closing, errors and flow-control callbacks follows the stock selector
transport here, in Python, where it is cold.

The socket object stays the owner of the file descriptor.  The I/O thread
does every system call on it until it reports the transport closed; only
then is the socket closed, so the fd number cannot be reused under it.
"""

from __future__ import annotations

import os
import socket
import sys
import warnings
from asyncio import base_events, constants, exceptions, futures, transports, trsock
from asyncio.log import logger
from typing import Any

from . import _mtloop
from ._sock import sendfile_source

__all__ = ["SocketTransport"]

_ATTACH_TAKES_TRANSPORT = sys.version_info >= (3, 13)


def _core_flag(name: str, doc: str) -> property:
    def get(self: "SocketTransport") -> Any:
        return getattr(self._core, name)

    def set(self: "SocketTransport", value: Any) -> None:
        setattr(self._core, name, value)

    return property(get, set, doc=doc)


_SOCKNAMES: dict[Any, Any] = {}


def _share_sockname(addr: Any) -> Any:
    """One tuple for equal local addresses: every connection a listener
    accepts has the listener's address, and a tuple a connection costs
    about 150 bytes.  The table is small and bounded."""
    shared = _SOCKNAMES.setdefault(addr, addr)
    if len(_SOCKNAMES) > 256:
        _SOCKNAMES.clear()
    return shared


class SocketTransport(_mtloop.StreamWriteMethods, transports._FlowControlMixin,
                      transports.Transport):
    """A TCP or Unix stream transport driven by an mtloop I/O thread."""

    # write() and writelines() come from StreamWriteMethods, in C: a
    # protocol's transport.write(data) runs no Python frame.
    __slots__ = ("_core", "_sock", "_server", "_lost_scheduled", "__weakref__")

    _sendfile_compatible = constants._SendfileMode.TRY_NATIVE

    # asyncio's attribute names, kept in the C core so both halves agree.
    _sock_fd = property(lambda self: self._core.fd, doc="The socket's file descriptor.")
    _closing = _core_flag("closing", "close() or abort() was called.")
    _eof = _core_flag("eof", "write_eof() was called.")
    _conn_lost = _core_flag("conn_lost", "Writes attempted after the connection was lost.")
    _protocol_paused = _core_flag("protocol_paused", "pause_writing() is in effect.")
    _high_water = _core_flag("high_water", "High-water mark of the write buffer.")
    _low_water = _core_flag("low_water", "Low-water mark of the write buffer.")

    def __init__(self, loop: Any, sock: socket.socket, protocol: Any, waiter: Any = None,
                 extra: dict | None = None, server: Any = None) -> None:
        self._sock = None
        self._server = None
        self._lost_scheduled = False
        self._core = _mtloop.StreamCore(loop, sock.fileno(), self, protocol)
        super().__init__(extra, loop)
        try:
            sockname = sock.getsockname()
        except OSError:
            sockname = None
        self._extra["sockname"] = _share_sockname(sockname) if server is not None else sockname
        if "peername" not in self._extra:
            try:
                self._extra["peername"] = sock.getpeername()
            except OSError:
                self._extra["peername"] = None
        self._sock = sock
        self._server = server
        if server is not None:
            if _ATTACH_TAKES_TRANSPORT:
                server._attach(self)
            else:
                server._attach()
        base_events._set_nodelay(sock)
        loop.call_soon(protocol.connection_made, self)
        # Reading starts only after connection_made(), as asyncio orders it.
        loop.call_soon(self._core.start_reading)
        if waiter is not None:
            loop.call_soon(futures._set_result_unless_cancelled, waiter, None)

    def __repr__(self) -> str:
        info = [self.__class__.__name__]
        if self._sock is None:
            info.append("closed")
        elif self._closing:
            info.append("closing")
        info.append(f"fd={self._sock_fd}")
        if self._sock is not None and not self._closing:
            info.append("read=" + ("polling" if self.is_reading() else "idle"))
            info.append(f"write=<bufsize={self.get_write_buffer_size()}>")
        return "<{}>".format(" ".join(info))

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if self._sock is not None:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self._sock.close()
            self._sock = None
            if self._server is not None:
                self._detach_server()

    # ---- asyncio.BaseTransport ------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        # The "socket" entry is made on first use (or when the connection
        # is lost): an idle connection need not carry its TransportSocket.
        if name == "socket" and "socket" not in self._extra and self._sock is not None:
            self._extra["socket"] = trsock.TransportSocket(self._sock)
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._core.closing

    def get_protocol(self) -> Any:
        return self._core.protocol

    def set_protocol(self, protocol: Any) -> None:
        self._core.set_protocol(protocol)

    @property
    def _protocol(self) -> Any:
        return self._core.protocol

    def close(self) -> None:
        core = self._core
        if core.closing:
            return
        core.close()
        if core.get_write_buffer_size() == 0:
            # Nothing left to flush: connection_lost() comes on the next
            # iteration, as with the stock loop; the I/O thread finishes
            # the release on its own.
            core.conn_lost += 1
            self._schedule_connection_lost(None)

    # ---- asyncio.ReadTransport -----------------------------------------

    def is_reading(self) -> bool:
        return not self._core.reading_paused and not self._core.closing

    def pause_reading(self) -> None:
        if self._core.closing or self._core.reading_paused:
            return
        self._core.pause_reading()
        if self._loop.get_debug():
            logger.debug("%r pauses reading", self)

    def resume_reading(self) -> None:
        if self._core.closing or not self._core.reading_paused:
            return
        self._core.resume_reading()
        if self._loop.get_debug():
            logger.debug("%r resumes reading", self)

    # ---- asyncio.WriteTransport ----------------------------------------

    def write_eof(self) -> None:
        core = self._core
        if core.closing or core.eof:
            return
        core.shutdown_write()

    def can_write_eof(self) -> bool:
        return True

    def abort(self) -> None:
        self._force_close(None)

    def get_write_buffer_size(self) -> int:
        return self._core.get_write_buffer_size()

    # ---- errors and the end of the connection ---------------------------

    def _fatal_error(self, exc: BaseException, message: str = "Fatal error on transport") -> None:
        if isinstance(exc, OSError):
            if self._loop.get_debug():
                logger.debug("%r: %s", self, message, exc_info=True)
        else:
            self._loop.call_exception_handler({
                "message": message,
                "exception": exc,
                "transport": self,
                "protocol": self._protocol,
            })
        self._force_close(exc)

    def _force_close(self, exc: BaseException | None) -> None:
        core = self._core
        if core.conn_lost:
            return
        core.conn_lost += 1
        core.abort()
        self._schedule_connection_lost(exc)

    def _mt_eof(self) -> None:
        if self._lost_scheduled:
            return
        if self._loop.get_debug():
            logger.debug("%r received EOF", self)
        try:
            keep_open = self._protocol.eof_received()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
            return
        if not keep_open:
            self.close()

    def _mt_read_error(self, err: int) -> None:
        if self._lost_scheduled:
            return  # in flight when the transport was aborted
        self._fatal_error(OSError(err, os.strerror(err)),
                          "Fatal read error on socket transport")

    def _mt_write_error(self, err: int) -> None:
        if self._lost_scheduled:
            return  # in flight when the transport was aborted
        self._fatal_error(OSError(err, os.strerror(err)),
                          "Fatal write error on socket transport")

    def _schedule_connection_lost(self, exc: BaseException | None) -> None:
        if not self._lost_scheduled:
            self._lost_scheduled = True
            self._loop.call_soon(self._call_connection_lost, exc)

    def _mt_closed(self, err: int) -> None:
        """The I/O thread let go of the socket after flushing the output
        (close() with data queued) or after the pool stopped."""
        if not self._lost_scheduled:
            exc = OSError(err, os.strerror(err)) if err else None
            self._schedule_connection_lost(exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        try:
            protocol = self._core.protocol
            if protocol is not None:
                protocol.connection_lost(exc)
        finally:
            sock, self._sock = self._sock, None
            if sock is not None:
                if "socket" not in self._extra:
                    self._extra["socket"] = trsock.TransportSocket(sock)
                if self._core.closed:
                    sock.close()
                else:
                    # The I/O thread may still be finishing: it closes the
                    # fd once it has let go of it.
                    sock.detach()
                    self._core.give_fd()
            self._core.set_protocol(None)
            self._loop = None
            if self._server is not None:
                self._detach_server()

    def _detach_server(self) -> None:
        server, self._server = self._server, None
        if _ATTACH_TAKES_TRANSPORT:
            server._detach(self)
        else:
            server._detach()

    # ---- sendfile on the I/O thread ----------------------------------------

    async def _mt_sendfile(self, file: Any, offset: int, count: int | None) -> int:
        fileno, fsize = sendfile_source(file)
        blocksize = count if count else fsize
        if not blocksize or offset >= fsize:
            return 0
        blocksize = min(blocksize, fsize - offset)
        resume_reading = self.is_reading()
        self.pause_reading()
        waiter = self._loop.create_future()
        self._core.sendfile(fileno, offset, blocksize, waiter)
        try:
            sent, err = await waiter
        finally:
            if resume_reading:
                self.resume_reading()
        if sent > 0:
            os.lseek(fileno, offset + sent, os.SEEK_SET)
        if err:
            exc = OSError(err, os.strerror(err))
            if sent == 0:
                raise exceptions.SendfileNotAvailableError("os.sendfile call failed") from exc
            raise exc
        return sent

    def _mt_sendfile_done(self, waiter: Any, err: int, sent: int) -> None:
        if not waiter.done():
            waiter.set_result((sent, err))
