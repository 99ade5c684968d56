"""Helpers shared by the transport, server and stream tests: endpoints built
on each loop, recording protocols, and peer-side socket helpers."""

import asyncio
import hashlib
import socket



def _ipv6_loopback_available():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HAS_IPV6 = _ipv6_loopback_available()


ENDPOINTS = ("tcp-client", "tcp-server", "unix-client", "unix-server")

BIG = 16 * 1024 * 1024  # more than the kernel buffers of a loopback pair hold
# ... once the peer's receive buffer is fixed: with autotuning (tcp_rmem's
# maximum is 32 MiB on some machines) a loopback pair can absorb all of BIG.
PEER_RCVBUF = 1024 * 1024


def pattern(n, seed=b"mtloop"):
    """``n`` bytes, not all equal, so that reordering or loss shows."""
    block = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(2048))
    return (block * (n // len(block) + 1))[:n]


class Recorder(asyncio.Protocol):
    """A protocol that records every callback, in order.

    ``events`` holds ``"made"``, ``("data", bytes)``, ``"eof"`` and
    ``("lost", exc)`` in call order; ``data`` accumulates the bytes.
    """

    def __init__(self, loop, eof_result=None):
        self.loop = loop
        self.eof_result = eof_result
        self.events = []
        self.transport = None
        self.data = bytearray()
        self.made = loop.create_future()
        self.lost = loop.create_future()
        self.eof = loop.create_future()
        self.paused = []  # "pause"/"resume" in call order
        self._waiters = []

    def connection_made(self, transport):
        self.events.append("made")
        self.transport = transport
        if not self.made.done():
            self.made.set_result(transport)

    def data_received(self, data):
        self.events.append(("data", data))
        self.data += data
        self._wake()

    def eof_received(self):
        self.events.append("eof")
        if not self.eof.done():
            self.eof.set_result(None)
        self._wake()
        return self.eof_result

    def connection_lost(self, exc):
        self.events.append(("lost", exc))
        if not self.lost.done():
            self.lost.set_result(exc)
        self._wake()

    def pause_writing(self):
        self.paused.append("pause")

    def resume_writing(self):
        self.paused.append("resume")

    def _wake(self):
        for n, fut in list(self._waiters):
            if len(self.data) >= n and not fut.done():
                fut.set_result(None)

    async def wait_bytes(self, n):
        """Wait until at least ``n`` bytes arrived (fails on connection_lost first)."""
        while len(self.data) < n:
            if self.lost.done():
                raise AssertionError(
                    f"connection lost after {len(self.data)} of {n} bytes: {self.lost.result()!r}"
                )
            fut = self.loop.create_future()
            self._waiters.append((n, fut))
            try:
                await asyncio.wait([fut, self.lost], return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._waiters.remove((n, fut))
        return bytes(self.data)

    def kinds(self):
        """The event kinds only: "made", "data", "eof", "lost"."""
        return [e if isinstance(e, str) else e[0] for e in self.events]


class Endpoint:
    """One end of a stream connection made by the loop, the other a raw socket.

    ``async with Endpoint(loop, kind, tmp_path, factory) as ep`` gives
    ``ep.transport``, ``ep.protocol`` and ``ep.peer`` (non-blocking socket).
    On exit the transport is aborted if still open, ``connection_lost`` is
    awaited, the server (if any) is closed and the peer socket closed.
    """

    def __init__(self, loop, kind, tmp_path, factory=None):
        self.loop = loop
        self.kind = kind
        self.tmp_path = tmp_path
        self.factory = factory or (lambda: Recorder(loop))
        self.server = None
        self.peer = None
        self.transport = None
        self.protocol = None
        self._listener = None

    @property
    def family(self):
        return socket.AF_INET if self.kind.startswith("tcp") else socket.AF_UNIX

    async def __aenter__(self):
        loop = self.loop
        path = str(self.tmp_path / "ep.sock")
        if self.kind.endswith("client"):
            lsock = socket.socket(self.family, socket.SOCK_STREAM)
            self._listener = lsock
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PEER_RCVBUF)  # inherited
            lsock.bind(("127.0.0.1", 0) if self.family == socket.AF_INET else path)
            lsock.listen(8)
            lsock.setblocking(False)
            if self.family == socket.AF_INET:
                t, p = await loop.create_connection(self.factory, *lsock.getsockname())
            else:
                t, p = await loop.create_unix_connection(self.factory, path)
            self.peer, _ = await loop.sock_accept(lsock)
            self.peer.setblocking(False)
            lsock.close()
            self._listener = None
        else:
            made = loop.create_future()

            def factory():
                proto = self.factory()
                if not made.done():
                    made.set_result(proto)
                return proto

            if self.family == socket.AF_INET:
                self.server = await loop.create_server(factory, "127.0.0.1", 0)
                addr = self.server.sockets[0].getsockname()
            else:
                self.server = await loop.create_unix_server(factory, path)
                addr = path
            self.peer = socket.socket(self.family, socket.SOCK_STREAM)
            self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PEER_RCVBUF)
            self.peer.setblocking(False)
            await loop.sock_connect(self.peer, addr)
            p = await made
            t = await _made_future(p)
        self.transport, self.protocol = t, p
        return self

    async def __aexit__(self, *exc_info):
        try:
            t = self.transport
            if t is not None and not t.is_closing():
                t.abort()
            lost = getattr(self.protocol, "lost", None)
            if lost is not None and t is not None:
                await asyncio.wait_for(asyncio.shield(lost), 5)
            if self.server is not None:
                self.server.close()
                await asyncio.wait_for(self.server.wait_closed(), 5)
        finally:
            if self.peer is not None:
                self.peer.close()
            if self._listener is not None:
                self._listener.close()


async def _made_future(proto):
    made = getattr(proto, "made", None)
    if made is not None:
        return await made
    raise AssertionError("protocol has no 'made' future")


async def recv_exactly(loop, sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, min(n - len(buf), 1 << 20))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


async def recv_until_eof(loop, sock):
    buf = bytearray()
    while True:
        chunk = await loop.sock_recv(sock, 1 << 20)
        if not chunk:
            return bytes(buf)
        buf += chunk


async def until(predicate, what="condition", timeout=5.0, interval=0.005):
    """Poll ``predicate`` until true; fail (not hang) after ``timeout``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


async def settle(n=5, delay=0.01):
    """Let the loop (and any I/O threads) run for a short while."""
    for _ in range(n):
        await asyncio.sleep(delay)


def peer_recv_nowait(sock):
    """Non-blocking recv: bytes, b'' at EOF, None if nothing is there yet."""
    try:
        return sock.recv(1 << 20)
    except BlockingIOError:
        return None


class TrackedHandler:
    """Wraps a start_server() client_connected_cb so that a test can wait for
    every handler task to finish (before 3.12.1, Server.wait_closed() does
    not wait for them, and a handler left pending at loop close is garbage
    collected later with a 'coroutine ignored GeneratorExit' error)."""

    def __init__(self, handler):
        self.handler = handler
        self.tasks = []

    async def __call__(self, reader, writer):
        self.tasks.append(asyncio.current_task())
        return await self.handler(reader, writer)

    async def wait(self, timeout=10):
        if self.tasks:
            await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), timeout)


def collect_handler_calls(loop):
    calls = []
    loop.set_exception_handler(lambda lp, ctx: calls.append(ctx))
    return calls


class BufRecorder(asyncio.BufferedProtocol):
    """A BufferedProtocol handing out a buffer of ``size`` bytes each time."""

    def __init__(self, loop, size=1000):
        self.loop = loop
        self.size = size
        self.buf = bytearray(size)
        self.data = bytearray()
        self.events = []
        self.hints = []
        self.transport = None
        self.made = loop.create_future()
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.events.append("made")
        self.made.set_result(transport)

    def get_buffer(self, sizehint):
        self.hints.append(sizehint)
        self.events.append("get_buffer")
        return memoryview(self.buf)

    def buffer_updated(self, nbytes):
        assert 0 < nbytes <= self.size
        self.events.append("buffer_updated")
        self.data += self.buf[:nbytes]

    def eof_received(self):
        self.events.append("eof")

    def connection_lost(self, exc):
        self.events.append(("lost", exc))
        if not self.lost.done():
            self.lost.set_result(exc)
