"""Transports whose I/O runs on mtloop's I/O threads.

`CoreTransport` is the lifecycle every transport around a C core shares
(closing, aborting, errors, connection_lost exactly once, after the last
delivery); `FlowTransport` adds what byte streams share, around their C
core (`mtloop._mtloop.StreamCore`): writes, reading,
read credit and the dispatch of received data to the protocol are in C;
the state machine of closing, errors and flow-control callbacks follows
the stock selector transport here, in Python, where it is cold.  A kind
adds what is its own: `SocketTransport` the socket's extra info, servers
and sendfile.

The C record owns the transport's file descriptor (a copy of a socket
object's, or an accepted one) and closes it once the I/O thread and the
loop have both let go of it; no Python object owns it.  A socket object
the transport was made from keeps its own descriptor and is closed when
the connection is lost, as the stock loop closes it.
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
from ._trsock import PseudoSocket

__all__ = ["CoreTransport", "FlowTransport", "SocketTransport", "socket_names"]

_ATTACH_TAKES_TRANSPORT = sys.version_info >= (3, 13)


def _core_flag(name: str, doc: str) -> property:
    def get(self: "CoreTransport") -> Any:
        return getattr(self._core, name)

    def set(self: "CoreTransport", value: Any) -> None:
        setattr(self._core, name, value)

    return property(get, set, doc=doc)


def socket_names(extra: dict, sock: socket.socket) -> None:
    """The "sockname" and "peername" extra info of a transport around
    `sock`, as the stock selector transports set them (None where the
    socket has none; a "peername" given already stays)."""
    try:
        extra["sockname"] = sock.getsockname()
    except OSError:
        extra["sockname"] = None
    if "peername" not in extra:
        try:
            extra["peername"] = sock.getpeername()
        except OSError:
            extra["peername"] = None


class CoreTransport(transports._FlowControlMixin, transports.Transport):
    """What every mtloop transport around a C core shares, byte stream or
    not: the lifecycle (closing, aborting, fatal errors, connection_lost
    exactly once, after the last delivery) and write flow control, with
    asyncio's state kept in the core.  A subclass makes `_core` and sets
    `_lost_scheduled` before calling this class's __init__ (the
    _FlowControlMixin's, which stores the marks in the core)."""

    __slots__ = ("_core", "_lost_scheduled", "__weakref__")

    # asyncio's attribute names, kept in the C core so both halves agree.
    _closing = _core_flag("closing", "close() or abort() was called.")
    _conn_lost = _core_flag("conn_lost", "Writes attempted after the connection was lost.")
    _protocol_paused = _core_flag("protocol_paused", "pause_writing() is in effect.")
    _high_water = _core_flag("high_water", "High-water mark of the write buffer.")
    _low_water = _core_flag("low_water", "Low-water mark of the write buffer.")

    def _mt_undo(self) -> None:
        """__init__ failed after the core was made: let go of the connection
        now, rather than leave it open on the I/O thread until the loop
        closes."""
        core = getattr(self, "_core", None)
        if core is not None:
            self._lost_scheduled = True
            core.abort()
            core.release()

    def _mt_start(self, protocol: Any, waiter: Any, read: bool = True) -> None:
        self._loop.call_soon(protocol.connection_made, self)
        # Reading starts only after connection_made(), as asyncio orders it.
        if read:
            self._loop.call_soon(self._core.start_reading)
        if waiter is not None:
            self._loop.call_soon(futures._set_result_unless_cancelled, waiter, None)

    # ---- asyncio.BaseTransport ------------------------------------------

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

    # ---- asyncio.WriteTransport ----------------------------------------

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

    def _schedule_connection_lost(self, exc: BaseException | None) -> None:
        if not self._lost_scheduled:
            self._lost_scheduled = True
            self._loop.call_soon(self._call_connection_lost, exc)

    def _mt_closed(self, err: int) -> None:
        """The I/O thread let go of the descriptor after flushing the output
        (close() with data queued), after a failure, or because the pool
        stopped."""
        if not self._lost_scheduled:
            exc = OSError(err, os.strerror(err)) if err else None
            self._schedule_connection_lost(exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        try:
            protocol = self._core.protocol
            if protocol is not None:
                self._mt_notify_lost(protocol, exc)
        finally:
            self._mt_let_go()

    def _mt_let_go(self) -> None:
        """Lets go of the connection for good, with no word to the
        protocol (that is _call_connection_lost's, or nobody's)."""
        self._mt_lost()
        self._core.set_protocol(None)
        self._core.release()
        self._loop = None

    def _mt_notify_lost(self, protocol: Any, exc: BaseException | None) -> None:
        """Tells the protocol that the connection is over."""
        protocol.connection_lost(exc)

    def _mt_lost(self) -> None:
        """The connection is over: let go of what the kind holds."""

    def _mt_loop_closed(self) -> None:
        """The loop closed with this transport open: the C record closed the
        descriptor; close what else holds the connection open."""


class FlowTransport(CoreTransport):
    """What every mtloop byte-stream transport shares: the C core
    (mtloop._mtloop.StreamCore), reading, and the way a stream ends.
    Subclasses call _mt_open() first in their __init__ and may extend
    _mt_lost()."""

    __slots__ = ()

    _sock_fd = property(lambda self: self._core.fd, doc="The transport's file descriptor.")
    _eof = _core_flag("eof", "write_eof() was called.")

    def _mt_open(self, loop: Any, fd: int, protocol: Any, dup: bool,
                 extra: dict | None, tls: Any = None, kind: str = "socket") -> None:
        """Makes the C core (from here on the record owns `fd`, or a copy
        of it when `dup`) and the asyncio base.  `tls`: a session from
        mtloop._tls.new_session() makes the flow a native TLS one.  `kind`:
        the fd operations, "socket", "read-pipe" or "write-pipe"."""
        self._lost_scheduled = False
        if tls is None:
            self._core = _mtloop.StreamCore(loop, fd, self, protocol, dup, kind=kind)
        else:
            self._core = _mtloop.StreamCore(loop, fd, self, protocol, dup, tls)
        super().__init__(extra, loop)

    def __repr__(self) -> str:
        info = [self.__class__.__name__]
        fd = self._core.fd
        if fd < 0:
            info.append("closed")
        elif self._closing:
            info.append("closing")
        info.append(f"fd={fd}")
        if fd >= 0 and not self._closing:
            info.append("read=" + ("polling" if self.is_reading() else "idle"))
            try:
                info.append(f"write=<bufsize={self.get_write_buffer_size()}>")
            except RuntimeError:
                pass  # a forked child
        return "<{}>".format(" ".join(info))

    def __del__(self, _warn: Any = warnings.warn) -> None:
        core = getattr(self, "_core", None)
        if core is not None and core.fd >= 0 and not self._lost_scheduled:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            # The core aborts the connection when it goes.
            self._mt_lost()

    # ---- asyncio.ReadTransport -----------------------------------------

    def is_reading(self) -> bool:
        return not self._core.reading_paused and not self._core.closing

    def pause_reading(self) -> None:
        if self._core.pause_reading() and self._loop.get_debug():
            logger.debug("%r pauses reading", self)

    def resume_reading(self) -> None:
        if self._core.resume_reading() and self._loop.get_debug():
            logger.debug("%r resumes reading", self)

    # ---- the end of the stream --------------------------------------------

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
        self._mt_after_eof(keep_open)

    def _mt_after_eof(self, keep_open: Any) -> None:
        """eof_received() returned `keep_open`."""
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

class SocketTransport(_mtloop.StreamWriteMethods, FlowTransport):
    """A TCP or Unix stream transport driven by an mtloop I/O thread."""

    # write() and writelines() come from StreamWriteMethods, in C: a
    # protocol's transport.write(data) runs no Python frame.
    __slots__ = ("_sock", "_server", "_sockinfo", "_handover")

    _sendfile_compatible = constants._SendfileMode.TRY_NATIVE
    _start_tls_compatible = True

    def __init__(self, loop: Any, sock: socket.socket | None, protocol: Any,
                 waiter: Any = None, extra: dict | None = None, server: Any = None, *,
                 fd: int = -1, sockinfo: tuple[int, int, int] | None = None,
                 tls: Any = None) -> None:
        """Around `sock` (the transport uses a copy of its descriptor and
        closes `sock` when the connection is lost), or around an accepted
        `fd` of the family, type and proto in `sockinfo`, which it takes
        over even when it raises.  `tls`: see FlowTransport._mt_open()."""
        self._sock = None
        self._server = None
        self._sockinfo = sockinfo
        self._handover = None
        if sock is not None:
            self._mt_open(loop, sock.fileno(), protocol, True, extra, tls)
        else:
            try:
                self._mt_open(loop, fd, protocol, False, extra, tls)
            except BaseException:
                os.close(fd)  # the fd was handed over: nobody else closes it
                raise
        try:
            if sock is not None:
                self._sock = sock
                self._sockinfo = (sock.family, sock.type, sock.proto)
                socket_names(self._extra, sock)
                base_events._set_nodelay(sock)
            if server is not None:
                if _ATTACH_TAKES_TRANSPORT:
                    server._attach(self)
                else:
                    server._attach()
                self._server = server
            self._mt_start(protocol, waiter)
        except BaseException:
            self._mt_undo()
            raise

    # ---- asyncio.BaseTransport ------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        # The "socket" entry is made on first use (or when the connection
        # is lost): an idle connection need not carry its TransportSocket.
        if name == "socket" and "socket" not in self._extra:
            self._extra["socket"] = trsock.TransportSocket(self._socket_like())
        return self._extra.get(name, default)

    def _socket_like(self) -> Any:
        if self._sock is not None:
            return self._sock
        family, type_, proto = self._sockinfo or (socket.AF_INET, socket.SOCK_STREAM, 0)
        return PseudoSocket(self._core, family, type_, proto)

    # ---- asyncio.WriteTransport ----------------------------------------

    def write_eof(self) -> None:
        core = self._core
        if core.closing or core.eof:
            return
        core.shutdown_write()

    def can_write_eof(self) -> bool:
        return True

    # ---- the end of the connection --------------------------------------

    def _mt_lost(self) -> None:
        if "socket" not in self._extra:
            self._extra["socket"] = trsock.TransportSocket(self._socket_like())
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        if self._server is not None:
            server, self._server = self._server, None
            if _ATTACH_TAKES_TRANSPORT:
                server._detach(self)
            else:
                server._detach()

    def _mt_loop_closed(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # ---- start_tls() on the I/O thread (mtloop/_streams.py) -----------------

    def _mt_hand_over(self, released: Any) -> None:
        """Ends this transport's flow, its output sent first, so that a TLS
        flow can go on with the connection: `released` gets the errno of the
        end (0: clean) once the I/O thread has let go of it; what it read
        and did not deliver is then in _core.take_held()."""
        self._handover = released
        self._core.hand_over()

    def _mt_closed(self, err: int) -> None:
        released, self._handover = self._handover, None
        if released is not None:
            if not released.done():
                released.set_result(err)
            return
        super()._mt_closed(err)

    def _mt_successor(self) -> tuple[Any, int, dict]:
        """(socket object, fd, extra) for the transport that goes on with
        this connection: the socket object if there is one (it moves to the
        successor), else a copy of the descriptor."""
        extra = {k: v for k, v in self._extra.items() if k != "socket"}
        sock, self._sock = self._sock, None
        if sock is not None:
            return sock, -1, extra
        return None, os.dup(self._core.fd), extra

    def _mt_retire(self, abort: bool) -> None:
        """Ends this transport without a word to its protocol: the
        connection went on in another one (start_tls), or the upgrade
        failed (`abort`), as asyncio's SSL protocol tells the application
        nothing of a handshake that never finished."""
        if self._lost_scheduled:
            return
        self._lost_scheduled = True
        self._handover = None
        if abort:
            self._core.abort()
        self._mt_let_go()

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
        # The I/O thread sends from its own copy of the descriptor.
        self._core.sendfile(fileno, offset, blocksize, waiter)
        try:
            sent, err = await waiter
        except BaseException:
            # Abandoned (cancelled): the I/O thread stops sending the file.
            self._core.sendfile_cancel()
            raise
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
