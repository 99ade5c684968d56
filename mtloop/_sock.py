"""The loop's low-level socket methods (sock_recv and friends).

They follow asyncio's contract: try the call at once, and when the socket
would block, wait for readiness through add_reader/add_writer on the loop
thread and try again.  Cancelling the awaiting task removes the watcher.
"""

from __future__ import annotations

import errno
import io
import os
import socket
from asyncio import base_events, exceptions
from typing import Any, Callable

_READ, _WRITE = 0, 1
_RETRY = (BlockingIOError, InterruptedError)


def sendfile_source(file: Any) -> tuple[int, int]:
    """(fileno, size) of a file os.sendfile() can read, or
    SendfileNotAvailableError so that the caller falls back to read/write."""
    try:
        fileno = file.fileno()
    except (AttributeError, io.UnsupportedOperation) as err:
        raise exceptions.SendfileNotAvailableError("not a regular file") from err
    try:
        fsize = os.fstat(fileno).st_size
    except OSError as err:
        raise exceptions.SendfileNotAvailableError("not a regular file") from err
    return fileno, fsize


class SocketMethods:
    """Mixin for mtloop.Loop; relies on the C core's _add_reader/_add_writer."""

    def _mt_check_sock(self, sock: socket.socket) -> None:
        base_events._check_ssl_socket(sock)
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")

    async def _mt_when_ready(self, sock: socket.socket, direction: int,
                             attempt: Callable[[], Any]) -> Any:
        """Calls attempt() each time sock is ready until it stops raising
        BlockingIOError; returns its result."""
        fut = self.create_future()
        fd = sock.fileno()
        add = self._add_reader if direction == _READ else self._add_writer
        remove = self._remove_reader if direction == _READ else self._remove_writer

        def on_ready() -> None:
            if fut.done():
                return
            try:
                result = attempt()
            except _RETRY:
                return
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        handle = add(fd, on_ready)

        def on_done(_: Any) -> None:
            # A later watcher on the same fd replaced (and cancelled) ours:
            # leave it in place.
            if not handle.cancelled():
                remove(fd)

        fut.add_done_callback(on_done)
        try:
            return await fut
        finally:
            fut = None  # break the cycle through the traceback

    async def sock_recv(self, sock: socket.socket, n: int) -> bytes:
        self._mt_check_sock(sock)
        try:
            return sock.recv(n)
        except _RETRY:
            pass
        return await self._mt_when_ready(sock, _READ, lambda: sock.recv(n))

    async def sock_recv_into(self, sock: socket.socket, buf: Any) -> int:
        self._mt_check_sock(sock)
        try:
            return sock.recv_into(buf)
        except _RETRY:
            pass
        return await self._mt_when_ready(sock, _READ, lambda: sock.recv_into(buf))

    async def sock_recvfrom(self, sock: socket.socket, bufsize: int) -> tuple[bytes, Any]:
        self._mt_check_sock(sock)
        try:
            return sock.recvfrom(bufsize)
        except _RETRY:
            pass
        return await self._mt_when_ready(sock, _READ, lambda: sock.recvfrom(bufsize))

    async def sock_recvfrom_into(self, sock: socket.socket, buf: Any,
                                 nbytes: int = 0) -> tuple[int, Any]:
        self._mt_check_sock(sock)
        if not nbytes:
            nbytes = len(buf)
        try:
            return sock.recvfrom_into(buf, nbytes)
        except _RETRY:
            pass
        return await self._mt_when_ready(sock, _READ,
                                         lambda: sock.recvfrom_into(buf, nbytes))

    async def sock_sendto(self, sock: socket.socket, data: Any, address: Any) -> int:
        self._mt_check_sock(sock)
        try:
            return sock.sendto(data, address)
        except _RETRY:
            pass
        return await self._mt_when_ready(sock, _WRITE, lambda: sock.sendto(data, address))

    async def sock_sendall(self, sock: socket.socket, data: Any) -> None:
        self._mt_check_sock(sock)
        try:
            sent = sock.send(data)
        except _RETRY:
            sent = 0
        view = memoryview(data).cast("B")
        if sent == len(view):
            return
        pos = [sent]

        def send_more() -> None:
            pos[0] += sock.send(view[pos[0]:])
            if pos[0] < len(view):
                raise BlockingIOError  # keep waiting for writability

        await self._mt_when_ready(sock, _WRITE, send_more)

    async def sock_connect(self, sock: socket.socket, address: Any) -> None:
        self._mt_check_sock(sock)
        if sock.family == socket.AF_INET or (
                base_events._HAS_IPv6 and sock.family == socket.AF_INET6):
            resolved = await self._ensure_resolved(
                address, family=sock.family, type=sock.type, proto=sock.proto, loop=self)
            _, _, _, _, address = resolved[0]
        try:
            sock.connect(address)
            return
        except _RETRY:
            pass

        def check_connected() -> None:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err != 0:
                raise OSError(err, f"Connect call failed {address}")

        await self._mt_when_ready(sock, _WRITE, check_connected)

    async def sock_accept(self, sock: socket.socket) -> tuple[socket.socket, Any]:
        self._mt_check_sock(sock)

        def accept() -> tuple[socket.socket, Any]:
            conn, address = sock.accept()
            conn.setblocking(False)
            return conn, address

        try:
            return accept()
        except _RETRY:
            pass
        return await self._mt_when_ready(sock, _READ, accept)

    async def _sock_sendfile_native(self, sock: socket.socket, file: Any,
                                    offset: int, count: int | None) -> int:
        fileno, fsize = sendfile_source(file)
        blocksize = count if count else fsize
        if not blocksize:
            return 0
        total = 0

        def send_block() -> int:
            size = blocksize if not count else min(blocksize, count - total)
            return os.sendfile(sock.fileno(), fileno, offset + total, size)

        try:
            while not count or total < count:
                try:
                    sent = send_block()
                except _RETRY:
                    sent = await self._mt_when_ready(sock, _WRITE, send_block)
                except OSError as exc:
                    if total == 0:
                        raise exceptions.SendfileNotAvailableError(
                            "os.sendfile call failed") from exc
                    if exc.errno == errno.ENOTCONN and type(exc) is not ConnectionError:
                        raise ConnectionError(errno.ENOTCONN,
                                              "socket is not connected") from exc
                    raise
                if sent == 0:
                    break  # end of file
                total += sent
            return total
        finally:
            if total > 0:
                os.lseek(fileno, offset + total, os.SEEK_SET)
