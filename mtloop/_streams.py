"""The stream half of mtloop.Loop: asyncio's transport hooks, served by the
I/O threads.

asyncio.BaseEventLoop already implements create_connection, create_server,
connect_accepted_socket, start_tls and sendfile on top of a few hooks
(_make_socket_transport, _make_ssl_transport, _start_serving, _stop_serving,
_sendfile_native); this mixin provides those hooks with mtloop's transports
and listeners.  TLS runs natively on the I/O threads where the context
allows it (mtloop._tls), else asyncio's own SSL protocol (asyncio.sslproto)
over an mtloop transport, on the loop thread, exactly as on the stock loop.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import weakref
from asyncio import base_events, constants, exceptions, sslproto, trsock
from typing import Any, Callable

from . import _mtloop, _tls
from ._transports import SocketTransport, socket_names

__all__ = ["StreamMethods"]

_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


# Sockets a loop made for its own connections (create_connection's, and
# create_unix_connection's with a path): nobody else holds them, so their
# transport takes the descriptor itself instead of a copy.  A socket the
# caller gave (sock=) keeps working as the caller's object, so its transport
# works on a dup() and the connection holds two descriptors, as it must:
# the I/O thread may not use a number that Python code could close.
_LOOP_MADE: weakref.WeakSet[socket.socket] = weakref.WeakSet()


def mark_loop_made(sock: socket.socket) -> socket.socket:
    _LOOP_MADE.add(sock)
    return sock


def adopt(sock: socket.socket, extra: dict | None
          ) -> tuple[socket.socket | None, int, tuple[int, int, int] | None, dict | None]:
    """SocketTransport's (sock, fd, sockinfo, extra) for `sock`: as it is,
    or for a socket the loop made, its descriptor detached from the object,
    with its (family, type, proto) and names.  Without it every client
    connection held a second descriptor: 10,000 of them ran out of a limit
    of 20,000 (the --stress echo)."""
    if sock not in _LOOP_MADE:
        return sock, -1, None, extra
    _LOOP_MADE.discard(sock)
    extra = dict(extra) if extra else {}
    socket_names(extra, sock)
    base_events._set_nodelay(sock)
    sockinfo = (int(sock.family), int(sock.type), sock.proto)
    return None, sock.detach(), sockinfo, extra


class StreamMethods:
    """Mixin for mtloop.Loop (needs the LoopCore base and BaseEventLoop)."""

    _mt_listeners: dict[int, Any]

    async def _connect_sock(self, *args: Any, **kwargs: Any) -> socket.socket:
        # create_connection()'s own socket, connected (BaseEventLoop).
        return mark_loop_made(await super()._connect_sock(*args, **kwargs))  # type: ignore[misc]

    def _make_socket_transport(self, sock: socket.socket, protocol: Any, waiter: Any = None,
                               *, extra: dict | None = None, server: Any = None) -> Any:
        own, fd, sockinfo, extra = adopt(sock, extra)
        return SocketTransport(self, own, protocol, waiter, extra, server, fd=fd,
                               sockinfo=sockinfo)

    def _make_ssl_transport(
            self, rawsock: socket.socket, protocol: Any, sslcontext: Any, waiter: Any = None,
            *, server_side: bool = False, server_hostname: str | None = None,
            extra: dict | None = None, server: Any = None,
            ssl_handshake_timeout: float | None = constants.SSL_HANDSHAKE_TIMEOUT,
            ssl_shutdown_timeout: float | None = constants.SSL_SHUTDOWN_TIMEOUT) -> Any:
        reason = _tls.fallback_reason(self, sslcontext)
        _tls.count(reason)
        sock, fd, sockinfo, extra = adopt(rawsock, extra)
        if reason is None:
            session = _tls.new_session(sslcontext, server_side, server_hostname)
            return _tls.NativeSSLTransport(self, sock, protocol, sslcontext, waiter, server_side,
                                     None if server_side else server_hostname or None,
                                     extra, server, ssl_handshake_timeout,
                                     ssl_shutdown_timeout, session=session, fd=fd,
                                     sockinfo=sockinfo)
        ssl_protocol = sslproto.SSLProtocol(
            self, protocol, sslcontext, waiter, server_side, server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout)
        SocketTransport(self, sock, ssl_protocol, extra=extra, server=server, fd=fd,
                        sockinfo=sockinfo)
        return ssl_protocol._app_transport

    # ---- start_tls ----------------------------------------------------------

    async def start_tls(self, transport: Any, protocol: Any, sslcontext: Any, *,
                        server_side: bool = False, server_hostname: str | None = None,
                        ssl_handshake_timeout: float | None = None,
                        ssl_shutdown_timeout: float | None = None) -> Any:
        """asyncio's start_tls(); on an mtloop socket transport whose context
        the native path honours, the TLS goes on in a native TLS flow on the
        same connection (the plain flow is handed over: its output sent
        first, what it read past the upgrade fed to the SSL first), else in
        asyncio's SSL protocol, as on the stock loop."""
        if not self._mt_start_tls_natively(transport, sslcontext):
            return await super().start_tls(  # type: ignore[misc]
                transport, protocol, sslcontext, server_side=server_side,
                server_hostname=server_hostname, ssl_handshake_timeout=ssl_handshake_timeout,
                ssl_shutdown_timeout=ssl_shutdown_timeout)
        handshake_timeout, shutdown_timeout = _tls.check_timeouts(ssl_handshake_timeout,
                                                                  ssl_shutdown_timeout)
        session = _tls.new_session(sslcontext, server_side, server_hostname)
        _tls.count(None)
        deadline = self.time() + handshake_timeout
        released = self.create_future()

        def timed_out() -> None:
            if not released.done():
                released.set_result(-1)

        timer = self.call_at(deadline, timed_out)
        transport._mt_hand_over(released)
        try:
            err = await released
        except BaseException:
            transport._mt_retire(abort=True)
            raise
        finally:
            timer.cancel()
        if err:
            transport._mt_retire(abort=True)
            if err < 0:
                raise ConnectionAbortedError(
                    f"SSL handshake is taking longer than {handshake_timeout} seconds: "
                    f"aborting the connection")
            raise OSError(err, os.strerror(err))
        held = transport._core.take_held()
        if held:
            _mtloop.tls_session_prefix(session, held)
        waiter = self.create_future()
        sock, fd, extra = transport._mt_successor()
        try:
            tls = _tls.NativeSSLTransport(
                self, sock, protocol, sslcontext, waiter, server_side,
                None if server_side else server_hostname or None, extra, transport._server,
                max(deadline - self.time(), 1e-3), shutdown_timeout, session=session, fd=fd,
                sockinfo=transport._sockinfo, upgrade=True)
        except BaseException:
            if sock is not None:
                sock.close()  # it left the plain transport (a copy of fd is closed for us)
            raise
        finally:
            transport._mt_retire(abort=False)
        try:
            await waiter
        except BaseException:
            tls.close()
            raise
        return tls

    def _mt_start_tls_natively(self, transport: Any, sslcontext: Any) -> bool:
        """Whether start_tls() on `transport` with `sslcontext` runs on the
        I/O thread (a fallback is counted in mtloop.tls_stats() here).  Anything else goes to
        the stock implementation: its argument errors, TLS over TLS, a
        transport of another kind or already closing, a context the native
        path cannot honour."""
        if (type(transport) is not SocketTransport or not isinstance(sslcontext, ssl.SSLContext)
                or transport.is_closing()):
            return False
        reason = _tls.fallback_reason(self, sslcontext)
        if reason is not None:
            _tls.count(reason)
        return reason is None

    # ---- servers ------------------------------------------------------------

    def _start_serving(self, protocol_factory: Callable[[], Any], sock: socket.socket,
                       sslcontext: Any = None, server: Any = None, backlog: int = 100,
                       ssl_handshake_timeout: float | None = constants.SSL_HANDSHAKE_TIMEOUT,
                       ssl_shutdown_timeout: float | None = constants.SSL_SHUTDOWN_TIMEOUT
                       ) -> None:
        fd = sock.fileno()
        old = self._mt_listeners.pop(fd, None)
        if old is not None:
            old.close()
        sockinfo = (sock.family, sock.type, sock.proto)
        try:
            # One tuple for every connection: each costs ~150 bytes.
            sockname = sock.getsockname()
        except OSError:
            sockname = None

        def on_accept(conn_fd: int, addr: Any) -> None:
            extra = {"peername": addr, "sockname": sockname}
            if sslcontext:
                self.create_task(self._mt_accept_tls(
                    protocol_factory, server, sockinfo, extra, conn_fd, sslcontext,
                    ssl_handshake_timeout, ssl_shutdown_timeout))
            else:
                self._mt_accept(protocol_factory, server, sockinfo, extra, conn_fd)

        def on_error(err: int) -> None:
            exc = OSError(err, os.strerror(err))
            if err in _OUT_OF_RESOURCES:
                # The I/O thread stops accepting for ACCEPT_RETRY_DELAY.
                message = "socket.accept() out of system resource"
            else:
                message = "Error accepting a connection"
            self.call_exception_handler({
                "message": message,
                "exception": exc,
                "socket": trsock.TransportSocket(sock),
            })

        # TCP_NODELAY is set on the I/O thread right after accept4(), as
        # asyncio sets it on every TCP transport.
        nodelay = sock.family in (socket.AF_INET, socket.AF_INET6)
        self._mt_listeners[fd] = _mtloop.Listener(self, fd, backlog, on_accept, on_error,
                                                  nodelay)

    def _stop_serving(self, sock: socket.socket) -> None:
        listener = self._mt_listeners.pop(sock.fileno(), None)
        if listener is not None:
            listener.close()
            # The I/O thread accepts on its own dup of the socket, which
            # lives until the signal reaches it.  Shutting the socket down
            # stops the listening at once for both fds, so a client that
            # connects after close() is refused, as with the stock loop.
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        sock.close()

    def _mt_accept(self, protocol_factory: Callable[[], Any], server: Any,
                   sockinfo: tuple[int, int, int], extra: dict, fd: int) -> None:
        """An accepted connection: `fd` is ours.  No Python socket object is
        made; the transport's record owns the descriptor."""
        protocol = None
        try:
            protocol = self._mt_accepted_protocol(protocol_factory, fd)
            SocketTransport(self, None, protocol, extra=extra, server=server, fd=fd,
                            sockinfo=sockinfo)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._mt_accept_failed(exc, protocol, None)

    async def _mt_accept_tls(self, protocol_factory: Callable[[], Any], server: Any,
                             sockinfo: tuple[int, int, int], extra: dict, fd: int,
                             sslcontext: Any, ssl_handshake_timeout: float | None,
                             ssl_shutdown_timeout: float | None) -> None:
        """An accepted connection to a TLS server: asyncio's SSL protocol
        over an mtloop transport, then the handshake, as the stock loop's
        _accept_connection2() does it."""
        protocol = transport = None
        try:
            protocol = self._mt_accepted_protocol(protocol_factory, fd)
            waiter = self.create_future()
            reason = _tls.fallback_reason(self, sslcontext)
            _tls.count(reason)
            if reason is None:
                try:
                    session = _tls.new_session(sslcontext, True, None)
                except BaseException:
                    os.close(fd)
                    raise
                transport = _tls.NativeSSLTransport(
                    self, None, protocol, sslcontext, waiter, True, None, extra, server,
                    ssl_handshake_timeout, ssl_shutdown_timeout, session=session, fd=fd,
                    sockinfo=sockinfo)
            else:
                ssl_protocol = sslproto.SSLProtocol(
                    self, protocol, sslcontext, waiter, True, None,
                    ssl_handshake_timeout=ssl_handshake_timeout,
                    ssl_shutdown_timeout=ssl_shutdown_timeout)
                SocketTransport(self, None, ssl_protocol, extra=extra, server=server, fd=fd,
                                sockinfo=sockinfo)
                transport = ssl_protocol._app_transport
            try:
                await waiter
            except BaseException:
                transport.close()
                raise
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._mt_accept_failed(exc, protocol, transport)

    @staticmethod
    def _mt_accepted_protocol(protocol_factory: Callable[[], Any], fd: int) -> Any:
        try:
            return protocol_factory()
        except BaseException:
            os.close(fd)  # no transport took it
            raise

    def _mt_accept_failed(self, exc: BaseException, protocol: Any, transport: Any) -> None:
        if self.get_debug():
            context = {
                "message": "Error on transport creation for incoming connection",
                "exception": exc,
            }
            if protocol is not None:
                context["protocol"] = protocol
            if transport is not None:
                context["transport"] = transport
            self.call_exception_handler(context)

    # ---- sendfile -------------------------------------------------------------

    async def _sendfile_native(self, transp: Any, file: Any, offset: int,
                               count: int | None) -> int:
        if not isinstance(transp, SocketTransport):
            raise exceptions.SendfileNotAvailableError(
                f"{transp!r} is not an mtloop socket transport")
        # The stock loop's native path goes through sock_sendfile(), whose
        # checks (binary mode, offset, count) come first.
        self._check_sendfile_params(transp._socket_like(), file, offset, count)
        return await transp._mt_sendfile(file, offset, count)

