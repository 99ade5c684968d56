"""UNIX domain stream sockets: loop.create_unix_connection() and
loop.create_unix_server().

They are built on the loop's generic transport hooks (_make_socket_transport
and _make_ssl_transport through BaseEventLoop._create_connection_transport,
and _start_serving / _stop_serving through asyncio's Server), so they behave
like the stock loop's versions in asyncio.unix_events for Python 3.11 to
3.13: same signatures, same checks in the same order, same exceptions, TLS
included.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import sys
from asyncio import base_events, tasks
from asyncio.log import logger
from typing import Any, Callable

from ._streams import mark_loop_made

__all__ = ["UnixSocketMethods"]

# Python 3.13 added create_unix_server(cleanup_socket=True): Server.close()
# then removes the socket file the server was listening on.
_HAS_CLEANUP = sys.version_info >= (3, 13)


def _is_abstract(path: str | bytes) -> bool:
    """Whether path names a Linux abstract socket (a leading NUL byte).

    An empty path raises IndexError, as it does on the stock loop.
    """
    # str and bytes are both accepted: path[0] is '\0' or 0 respectively.
    return path[0] in (0, "\0")


def _check_unix_stream(sock: socket.socket) -> None:
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ValueError(
            f"A UNIX Domain Stream Socket was expected, got {sock!r}")


def _bind_unix(path: str | bytes) -> socket.socket:
    """A new AF_UNIX stream socket bound to path, replacing a stale socket file."""
    abstract = _is_abstract(path)  # before the socket exists, so nothing leaks
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if not abstract:
            _remove_stale_socket(path)
        sock.bind(path)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            # The bare errno message does not say which address.
            raise OSError(errno.EADDRINUSE,
                          f"Address {path!r} is already in use") from None
        raise
    except BaseException:
        # e.g. ValueError for a NUL byte inside a file-system path.
        sock.close()
        raise
    return sock


def _remove_stale_socket(path: str | bytes) -> None:
    """Remove a socket file left by an earlier server at path.

    It would make bind() fail with EADDRINUSE; files of other kinds are
    left alone (bind() then fails).
    """
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        # The directory may allow creating the socket but not this check;
        # bind() has the last word.
        logger.error("Unable to check or remove stale UNIX socket %r: %r",
                     path, err)


def _socket_file(sock: socket.socket) -> tuple[str, int] | None:
    """The file-system name and inode of the socket file sock is bound to,
    or None for an abstract name or a file that is already gone."""
    # The name the socket is bound to, not the path argument, so that a
    # sock passed in is cleaned up too.  An unbound sock has the name ''
    # and raises IndexError here, as on the stock 3.13 loop.
    name = sock.getsockname()
    if _is_abstract(name):
        return None
    try:
        # At close time the inode tells whether the file is still ours or
        # was replaced by another server's socket.
        return name, os.stat(name).st_ino
    except FileNotFoundError:
        return None


class _CleanupServer(base_events.Server):
    """A Server that removes its socket file when closed: 3.13's
    create_unix_server(cleanup_socket=True).

    The stock loop does this in its _stop_serving; doing it here keeps the
    behaviour independent of where the loop's _stop_serving sits in the MRO.
    """

    def __init__(self, loop: Any, sock: socket.socket,
                 protocol_factory: Callable[[], Any], ssl: Any, backlog: int,
                 ssl_handshake_timeout: float | None, ssl_shutdown_timeout: float | None,
                 socket_file: tuple[str, int]) -> None:
        super().__init__(loop, [sock], protocol_factory, ssl, backlog,
                         ssl_handshake_timeout, ssl_shutdown_timeout)
        self._mt_socket_file: tuple[str, int] | None = socket_file

    def close(self) -> None:
        if self._sockets is None:
            return  # already closed
        super().close()  # the loop's _stop_serving closes the socket
        if self._mt_socket_file is None:
            return
        name, ino = self._mt_socket_file
        self._mt_socket_file = None
        try:
            if os.stat(name).st_ino == ino:
                os.unlink(name)
        except FileNotFoundError:
            pass
        except OSError as err:
            logger.error("Unable to clean up listening UNIX socket %r: %r",
                         name, err)


# repr() shows "<Server sockets=...>" as on the stock loop.
_CleanupServer.__name__ = _CleanupServer.__qualname__ = "Server"


class UnixSocketMethods:
    """Mixin for mtloop.Loop: the UNIX-socket half of asyncio's loop API.

    Relies on sock_connect, _create_connection_transport and the
    _start_serving/_stop_serving hooks (through asyncio's Server).
    """

    sock_connect: Callable[..., Any]
    _create_connection_transport: Callable[..., Any]

    async def create_unix_connection(
            self, protocol_factory: Callable[[], Any], path: Any = None, *,
            ssl: Any = None, sock: socket.socket | None = None,
            server_hostname: str | None = None,
            ssl_handshake_timeout: float | None = None,
            ssl_shutdown_timeout: float | None = None) -> tuple[Any, Any]:
        """Connect to a UNIX stream socket at path, or wrap a connected sock."""
        assert server_hostname is None or isinstance(server_hostname, str)
        # The stock loop's checks, in its order.
        if ssl:
            if server_hostname is None:
                raise ValueError("you have to pass server_hostname when using ssl")
        else:
            if server_hostname is not None:
                raise ValueError("server_hostname is only meaningful with ssl")
            if ssl_handshake_timeout is not None:
                raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
            if ssl_shutdown_timeout is not None:
                raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")

        if path is not None:
            if sock is not None:
                raise ValueError(
                    "path and sock can not be specified at the same time")
            path = os.fspath(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0)
            try:
                sock.setblocking(False)
                await self.sock_connect(sock, path)
            except BaseException:
                # Including cancellation: the caller never sees this socket.
                sock.close()
                raise
            mark_loop_made(sock)  # its transport takes the descriptor itself
        else:
            if sock is None:
                raise ValueError("no path and sock were specified")
            _check_unix_stream(sock)
            sock.setblocking(False)

        return await self._create_connection_transport(
            sock, protocol_factory, ssl, server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout)

    if _HAS_CLEANUP:
        async def create_unix_server(
                self, protocol_factory: Callable[[], Any], path: Any = None, *,
                sock: socket.socket | None = None, backlog: int = 100,
                ssl: Any = None,
                ssl_handshake_timeout: float | None = None,
                ssl_shutdown_timeout: float | None = None,
                start_serving: bool = True,
                cleanup_socket: bool = True) -> base_events.Server:
            """Listen on a UNIX stream socket at path, or on a bound sock."""
            return await self._mt_unix_server(
                protocol_factory, path, sock, backlog, ssl,
                ssl_handshake_timeout, ssl_shutdown_timeout, start_serving,
                cleanup_socket)
    else:
        async def create_unix_server(  # type: ignore[misc]
                self, protocol_factory: Callable[[], Any], path: Any = None, *,
                sock: socket.socket | None = None, backlog: int = 100,
                ssl: Any = None,
                ssl_handshake_timeout: float | None = None,
                ssl_shutdown_timeout: float | None = None,
                start_serving: bool = True) -> base_events.Server:
            """Listen on a UNIX stream socket at path, or on a bound sock."""
            # Before 3.13 the socket file stays behind after Server.close().
            return await self._mt_unix_server(
                protocol_factory, path, sock, backlog, ssl,
                ssl_handshake_timeout, ssl_shutdown_timeout, start_serving,
                False)

    async def _mt_unix_server(
            self, protocol_factory: Callable[[], Any], path: Any,
            sock: socket.socket | None, backlog: int, ssl: Any,
            ssl_handshake_timeout: float | None,
            ssl_shutdown_timeout: float | None, start_serving: bool,
            cleanup_socket: bool) -> base_events.Server:
        if isinstance(ssl, bool):
            raise TypeError("ssl argument must be an SSLContext or None")
        if ssl_handshake_timeout is not None and not ssl:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        if ssl_shutdown_timeout is not None and not ssl:
            raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")

        if path is not None:
            if sock is not None:
                raise ValueError(
                    "path and sock can not be specified at the same time")
            sock = _bind_unix(os.fspath(path))
        else:
            if sock is None:
                raise ValueError("path was not specified, and no sock specified")
            _check_unix_stream(sock)

        socket_file = _socket_file(sock) if cleanup_socket else None

        sock.setblocking(False)
        server: base_events.Server
        if socket_file is not None:
            server = _CleanupServer(self, sock, protocol_factory, ssl, backlog,
                                    ssl_handshake_timeout, ssl_shutdown_timeout,
                                    socket_file)
        else:
            server = base_events.Server(self, [sock], protocol_factory, ssl, backlog,
                                        ssl_handshake_timeout, ssl_shutdown_timeout)
        if start_serving:
            server._start_serving()
            # One loop iteration lets the listener's registration take
            # effect before the caller starts connecting.
            await tasks.sleep(0)
        return server
