"""Datagram endpoints (UDP and Unix datagram sockets) on mtloop's I/O threads.

BaseEventLoop.create_datagram_endpoint() does the argument checks, address
resolution and socket setup as on the stock loop, then calls
_make_datagram_transport() here.  The transport's C core
(mtloop._mtloop.DatagramCore) hands each sendto() to an I/O thread, which
sends in batches (sendmmsg) and receives in batches (recvmmsg) while the
loop keeps up; each datagram comes back as one datagram_received() call.
Datagrams are never merged, split or reordered.

What stays in Python is cold: addresses that are not numeric (resolved
here, as socket.sendto() would resolve them, or failed as it fails), the
lifecycle (mtloop._transports.CoreTransport) and the socket's extra info.
"""

from __future__ import annotations

import contextvars
import inspect
import os
import socket
import sys
import warnings
from asyncio import selector_events, transports, trsock
from typing import Any

from . import _mtloop
from ._transports import CoreTransport, socket_names
from ._trsock import PseudoSocket

__all__ = ["DatagramMethods", "DatagramTransport"]

_FAMILY_NAMES = {socket.AF_INET: "AF_INET", socket.AF_INET6: "AF_INET6"}


def _stock_sendto_rules() -> tuple[bool, int]:
    """What the stock datagram transport of this Python does, which changed
    within 3.12's and 3.13's releases: whether sendto(b"") sends an empty
    datagram, and the bytes of header it counts per queued datagram in the
    write-buffer size.  Read from its source; by version without one."""
    try:
        source = inspect.getsource(selector_events._SelectorDatagramTransport.sendto)
    except (OSError, TypeError):
        return sys.version_info >= (3, 13), 8 if sys.version_info >= (3, 13) else 0
    sends_empty = "if not data" not in source
    header = 8 if ("+ 8" in source or "_header_size" in source) else 0
    return sends_empty, header


_SENDS_EMPTY, _HEADER_SIZE = _stock_sendto_rules()


def _numeric_address(family: int, addr: Any) -> Any:
    """`addr` for a socket of `family` with its host made numeric, as
    socket.sendto() would take it (resolving a name blocks, as it does
    there); raises what sendto() raises for a bad one.  None for a family
    the C core does not parse."""
    if family in _FAMILY_NAMES:
        name = _FAMILY_NAMES[family]
        if not isinstance(addr, tuple):
            raise TypeError(f"{name} address must be tuple, not {type(addr).__name__}")
        if family == socket.AF_INET and len(addr) != 2:
            raise TypeError("AF_INET address must be a pair (host, port)")
        if family == socket.AF_INET6 and not 2 <= len(addr) <= 4:
            raise TypeError("AF_INET6 address must be a tuple (host, port[, flowinfo[, scopeid]])")
        host, port = addr[0], addr[1]
        if not isinstance(port, int):
            raise TypeError(f"'{type(port).__name__}' object cannot be interpreted as an integer")
        if not 0 <= port <= 65535:
            raise OverflowError("sendto(): port must be 0-65535.")
        rest = tuple(addr[2:])
        if host == "" or host == b"":
            host = "0.0.0.0" if family == socket.AF_INET else "::"
        elif host in ("<broadcast>", b"<broadcast>") and family == socket.AF_INET:
            host = "255.255.255.255"
        else:
            sockaddr = socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM)[0][4]
            host = sockaddr[0]
            if family == socket.AF_INET6 and len(rest) < 2 and sockaddr[3]:
                rest = (rest[0] if rest else 0, sockaddr[3])  # the scope of "host%iface"
        return (host, port) + rest
    if family == socket.AF_UNIX:
        path = os.fsencode(addr)
        if len(path) >= 108 + (path[:1] == b"\0"):
            raise OSError("AF_UNIX path too long")
        return path
    return None


class DatagramTransport(_mtloop.DatagramSendMethods, CoreTransport, transports.DatagramTransport):
    """asyncio's DatagramTransport on an mtloop I/O thread."""

    # sendto() comes from DatagramSendMethods, in C.
    __slots__ = ("_sock", "_sock_fd", "_address", "_family", "_open")

    max_size = 256 * 1024  # the stock transport's read size (Unix sockets)

    def __init__(self, loop: Any, sock: socket.socket | None, protocol: Any, address: Any = None,
                 waiter: Any = None, extra: dict | None = None, *, fd: int = -1,
                 sockinfo: tuple[int, int, int] | None = None) -> None:
        """Around `sock`, the caller's socket object (the core works on a
        copy of its descriptor, and `sock` is closed when the connection is
        lost, as the stock loop closes it), or around `fd`, a socket of the
        family, type and proto in `sockinfo` that the loop made, which the
        core takes over even when this raises (names in `extra`)."""
        self._sock = None
        self._open = False
        self._address = address
        self._lost_scheduled = False
        if sock is not None:
            self._sock_fd = sock.fileno()
            self._family = sock.family
            self._core = _mtloop.DatagramCore(loop, self._sock_fd, self, protocol, sock.family,
                                              address, _SENDS_EMPTY, _HEADER_SIZE)
        else:
            assert sockinfo is not None
            self._sock_fd = fd
            self._family = sockinfo[0]
            try:
                self._core = _mtloop.DatagramCore(loop, fd, self, protocol, sockinfo[0], address,
                                                  _SENDS_EMPTY, _HEADER_SIZE, False)
            except BaseException:
                os.close(fd)  # handed over: nobody else closes it
                raise
        super().__init__(extra, loop)
        try:
            self._open = True
            if sock is not None:
                self._sock = sock
                self._extra["socket"] = trsock.TransportSocket(sock)
                socket_names(self._extra, sock)
            else:
                self._extra["socket"] = trsock.TransportSocket(PseudoSocket(self._core, *sockinfo))
            self._mt_start(protocol, waiter)
        except BaseException:
            self._mt_undo()
            raise

    def __repr__(self) -> str:
        info = [self.__class__.__name__]
        if not self._open:
            info.append("closed")
        elif self._closing:
            info.append("closing")
        info.append(f"fd={self._sock_fd}")
        if self._open and not self._closing:
            try:
                info.append(f"bufsize={self.get_write_buffer_size()}")
            except RuntimeError:
                pass  # a forked child
        return "<{}>".format(" ".join(info))

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_open", False) and not self._lost_scheduled:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            # The core aborts the endpoint when it goes.
            self._mt_lost()

    # ---- the cold paths of sendto() ----------------------------------------

    def _mt_sendto_slow(self, data: Any, addr: Any) -> None:
        """sendto() to an address the core does not parse: resolved here,
        or reported as the stock transport reports socket.sendto()'s
        failure (OSError to error_received(), anything else fatal)."""
        try:
            target = _numeric_address(self._family, addr)
            if target is None:
                # A family the core has no parser for: sent from here.
                if self._sock is not None:
                    self._sock.sendto(data, addr)
                else:
                    PseudoSocket(self._core, self._family, socket.SOCK_DGRAM, 0)._call(
                        "sendto", data, addr)
                return
        except (BlockingIOError, InterruptedError):
            return  # the socket is full: dropped, as the kernel drops
        except OSError as exc:
            self._protocol.error_received(exc)
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal write error on datagram transport")
            return
        self._core.sendto_resolved(data, target)

    def _mt_callback_error(self, exc: BaseException) -> None:
        """datagram_received() or error_received() raised: reported as the
        stock loop reports an exception in its read callback; the endpoint
        stays open."""
        self._loop.call_exception_handler({
            "message": "Exception in callback of datagram protocol "
                       f"{self._protocol!r}",
            "exception": exc,
            "transport": self,
            "protocol": self._protocol,
        })

    # ---- the end of the endpoint -------------------------------------------------

    def _mt_lost(self) -> None:
        self._open = False
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _mt_loop_closed(self) -> None:
        self._mt_lost()


# Set while create_datagram_endpoint() makes its own socket (no sock=):
# the transport then takes that socket's descriptor over instead of a
# dup(), so an endpoint holds one descriptor, as with the stock loop.  A
# context variable, so that endpoints made concurrently by other tasks (or
# a direct call of the hook) are told apart.
_LOOP_MAKES_SOCKET: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "mtloop_datagram_socket_is_loop_made", default=False)


class DatagramMethods:
    """Mixin for mtloop.Loop: the hooks of BaseEventLoop.create_datagram_endpoint()."""

    async def create_datagram_endpoint(self, protocol_factory: Any, local_addr: Any = None,
                                       remote_addr: Any = None, **kwargs: Any) -> Any:
        token = _LOOP_MAKES_SOCKET.set(kwargs.get("sock") is None)
        try:
            return await super().create_datagram_endpoint(  # type: ignore[misc]
                protocol_factory, local_addr, remote_addr, **kwargs)
        finally:
            _LOOP_MAKES_SOCKET.reset(token)

    def _make_datagram_transport(self, sock: socket.socket, protocol: Any, address: Any = None,
                                 waiter: Any = None, extra: dict | None = None) -> Any:
        if not _LOOP_MAKES_SOCKET.get():
            return DatagramTransport(self, sock, protocol, address, waiter, extra)
        extra = dict(extra) if extra else {}
        socket_names(extra, sock)
        sockinfo = (int(sock.family), int(sock.type), sock.proto)
        return DatagramTransport(self, None, protocol, address, waiter, extra,
                                 fd=sock.detach(), sockinfo=sockinfo)
