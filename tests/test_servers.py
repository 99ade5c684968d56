"""loop.create_server() and the Server object it returns (TCP).

Covers host forms (string, list, duplicates, IPv6), port 0, family, flags,
sock=, backlog, reuse_address, reuse_port, start_serving=False with
start_serving()/serve_forever(), is_serving, sockets, get_loop, async with,
close + wait_closed (3.12.1+ semantics), keep_alive, close_clients and
abort_clients (3.13), a failing protocol factory, and accept() failing with
EMFILE.  Unix servers are in test_unix_sockets.py.
"""

import asyncio
import errno
import os
import resource
import socket
import struct
import sys
import time

import pytest

from netutil import HAS_IPV6, Recorder, recv_exactly, recv_until_eof, settle, until

PY312_1 = sys.version_info >= (3, 12, 1)
PY313 = sys.version_info >= (3, 13)

needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="IPv6 loopback (::1) is not available")


class Echo(asyncio.Protocol):
    """Echoes everything; records instances and connection_lost."""

    instances = None  # set per test to a list

    def __init__(self, registry=None):
        self.transport = None
        self.lost = None
        if registry is not None:
            registry.append(self)

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def connection_lost(self, exc):
        self.lost = ("lost", exc)


async def echo_roundtrip(loop, addr, payload=b"hello server", family=None):
    """Connect a raw socket to ``addr``, send ``payload`` and expect it back."""
    if family is None:
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        await loop.sock_connect(s, addr)
        await loop.sock_sendall(s, payload)
        return await recv_exactly(loop, s, len(payload))
    finally:
        s.close()


async def connect_refused(loop, addr):
    """True if a TCP connect to ``addr`` is refused."""
    s = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET)
    s.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(s, addr), 5)
    except ConnectionRefusedError:
        return True
    finally:
        s.close()
    return False


def listen_backlog(sock):
    """The listen() backlog of a listening TCP socket, from TCP_INFO
    (tcpi_sacked holds sk_max_ack_backlog for a socket in LISTEN)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    state = info[0]
    if state != 10:  # TCP_LISTEN
        return None
    return struct.unpack_from("6I", info, 8)[5]


# --------------------------------------------------------------------------
# basics


def test_create_server_serves(loop, run):
    """create_server('127.0.0.1', 0) binds an ephemeral port, serves at
    once (is_serving), and each accepted connection gets its own protocol
    instance whose transport echoes data."""

    async def main():
        protos = []
        server = await loop.create_server(lambda: Echo(protos), "127.0.0.1", 0)
        try:
            assert server.is_serving()
            addr = server.sockets[0].getsockname()
            assert addr[0] == "127.0.0.1" and addr[1] != 0
            assert await echo_roundtrip(loop, addr, b"one") == b"one"
            assert await echo_roundtrip(loop, addr, b"two") == b"two"
            assert len(protos) == 2 and protos[0] is not protos[1]
        finally:
            server.close()
            await server.wait_closed()

    run(main())


@pytest.mark.uvloop_xfail("uvloop's Server is not an asyncio.AbstractServer and its "
                          "sockets property is a list, not a tuple")
def test_server_object(loop, run):
    """The Server is an asyncio.AbstractServer; get_loop() is the loop;
    sockets is a tuple of socket-like objects (fileno, family, type,
    getsockname, getsockopt) and () once closed."""

    async def main():
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        try:
            assert isinstance(server, asyncio.AbstractServer)
            assert server.get_loop() is loop
            socks = server.sockets
            assert isinstance(socks, tuple) and len(socks) == 1
            s = socks[0]
            assert s.fileno() >= 0
            assert s.family == socket.AF_INET and s.type == socket.SOCK_STREAM
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            assert s.getsockname()[0] == "127.0.0.1"
        finally:
            server.close()
        assert server.sockets == ()
        assert not server.is_serving()
        await server.wait_closed()

    run(main())


def test_server_get_loop_and_sockets_after_close(loop, run):
    """get_loop() returns the loop; after close() sockets is empty, the port
    refuses connections and is_serving() is False."""

    async def main():
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()
        assert server.get_loop() is loop
        server.close()
        assert len(server.sockets) == 0
        assert not server.is_serving()
        await server.wait_closed()
        assert await connect_refused(loop, addr)

    run(main())


@needs_ipv6
def test_server_host_list(loop, run):
    """A list of hosts binds one socket per address, each on its own
    ephemeral port for port 0, and every one of them serves."""

    async def main():
        server = await loop.create_server(Echo, ["127.0.0.1", "::1"], 0)
        try:
            families = sorted(s.family for s in server.sockets)
            assert families == sorted([socket.AF_INET, socket.AF_INET6])
            for s in server.sockets:
                addr = s.getsockname()
                assert await echo_roundtrip(loop, addr[:2], b"via %s" % addr[0].encode()) == (
                    b"via %s" % addr[0].encode())
        finally:
            server.close()
            await server.wait_closed()

    run(main())


@pytest.mark.uvloop_xfail("uvloop binds a host listed twice twice (two sockets, two ports)")
def test_server_duplicate_hosts_bound_once(loop, run):
    """A host that appears twice in the list is bound only once."""

    async def main():
        server = await loop.create_server(asyncio.Protocol, ["127.0.0.1", "127.0.0.1"], 0)
        try:
            assert len(server.sockets) == 1
        finally:
            server.close()
            await server.wait_closed()

    run(main())


@needs_ipv6
def test_server_ipv6_only_socket(loop, run):
    """Binding '::1' makes an AF_INET6 socket with IPV6_V6ONLY set; it serves
    clients over ::1."""

    async def main():
        server = await loop.create_server(Echo, "::1", 0)
        try:
            (s,) = server.sockets
            assert s.family == socket.AF_INET6
            assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
            assert await echo_roundtrip(loop, s.getsockname()[:2], b"six") == b"six"
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_server_family_filter(loop, run):
    """family=AF_INET with host 'localhost' yields only AF_INET sockets."""

    async def main():
        server = await loop.create_server(asyncio.Protocol, "localhost", 0, family=socket.AF_INET)
        try:
            assert len(server.sockets) >= 1
            assert all(s.family == socket.AF_INET for s in server.sockets)
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_server_flags_passed_to_getaddrinfo(loop, run):
    """flags reach getaddrinfo(): AI_NUMERICHOST with a host name fails with
    socket.gaierror; with a numeric host it works."""

    async def main():
        with pytest.raises(socket.gaierror):
            await loop.create_server(asyncio.Protocol, "localhost", 0,
                                     flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST)
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0,
                                          flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST)
        server.close()
        await server.wait_closed()

    run(main())


def test_server_bind_error(loop, run):
    """Binding a port that another socket listens on raises OSError with
    errno EADDRINUSE and a message starting 'error while attempting to bind
    on address ('127.0.0.1', <port>)'; nothing is left open."""

    async def main():
        first = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = first.sockets[0].getsockname()[1]
        try:
            with pytest.raises(OSError) as info:
                await loop.create_server(asyncio.Protocol, "127.0.0.1", port)
            assert info.value.errno == errno.EADDRINUSE
            assert str(info.value).startswith(
                f"[Errno {errno.EADDRINUSE}] error while attempting to bind on address "
                f"('127.0.0.1', {port})")
            assert "address already in use" in str(info.value)
        finally:
            first.close()
            await first.wait_closed()

    run(main())


# --------------------------------------------------------------------------
# sock=, backlog, socket options


def test_server_with_sock(loop, run):
    """create_server(sock=) serves on the given bound socket; the server's
    socket has the same address."""

    async def main():
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        addr = sock.getsockname()
        server = await loop.create_server(Echo, sock=sock)
        try:
            assert server.sockets[0].getsockname() == addr
            assert server.is_serving()
            assert await echo_roundtrip(loop, addr, b"given socket") == b"given socket"
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_server_argument_errors(loop, run):
    """host/port together with sock, neither of them, a datagram sock, and
    ssl_handshake_timeout without ssl raise ValueError (asyncio's messages)."""

    async def main():
        sock = socket.socket()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            with pytest.raises(ValueError,
                               match="host/port and sock can not be specified at the same time"):
                await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, sock=sock)
            with pytest.raises(ValueError, match="Neither host/port nor sock were specified"):
                await loop.create_server(asyncio.Protocol)
            with pytest.raises(ValueError, match="A Stream Socket was expected"):
                await loop.create_server(asyncio.Protocol, sock=udp)
            with pytest.raises(ValueError,
                               match="ssl_handshake_timeout is only meaningful with ssl"):
                await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, ssl_handshake_timeout=1)
        finally:
            sock.close()
            udp.close()

    run(main())


@pytest.mark.parametrize("backlog", [None, 7])
def test_server_backlog(loop, run, backlog):
    """The backlog given (default 100) is what listen() got: read back from
    TCP_INFO of the listening socket."""

    async def main():
        kwargs = {} if backlog is None else {"backlog": backlog}
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, **kwargs)
        try:
            got = listen_backlog(server.sockets[0])
            if got is None:
                pytest.skip("TCP_INFO does not report the listen backlog here")
            assert got == (100 if backlog is None else backlog)
        finally:
            server.close()
            await server.wait_closed()

    run(main())


@pytest.mark.parametrize("reuse", [None, True, False])
def test_server_reuse_address(loop, run, reuse):
    """SO_REUSEADDR is set by default on Linux and with reuse_address=True,
    and not with reuse_address=False."""

    async def main():
        kwargs = {} if reuse is None else {"reuse_address": reuse}
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, **kwargs)
        try:
            val = server.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
            assert bool(val) == (reuse is not False)
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_server_reuse_port(loop, run):
    """reuse_port=True sets SO_REUSEPORT; two such servers share one port
    and both accept; without it the second bind fails with EADDRINUSE."""

    async def main():
        a = await loop.create_server(Echo, "127.0.0.1", 0, reuse_port=True)
        port = a.sockets[0].getsockname()[1]
        b = await loop.create_server(Echo, "127.0.0.1", port, reuse_port=True)
        try:
            for s in list(a.sockets) + list(b.sockets):
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            assert b.sockets[0].getsockname()[1] == port
            for i in range(10):
                assert await echo_roundtrip(loop, ("127.0.0.1", port), b"%d" % i) == b"%d" % i
            with pytest.raises(OSError) as info:
                await loop.create_server(Echo, "127.0.0.1", port)
            assert info.value.errno == errno.EADDRINUSE
        finally:
            a.close()
            b.close()
            await a.wait_closed()
            await b.wait_closed()

    run(main())


@pytest.mark.skipif(not PY313, reason="keep_alive= is new in Python 3.13")
@pytest.mark.uvloop_xfail("uvloop 0.23's create_server() has no keep_alive parameter",
                          condition=PY313)
def test_server_keep_alive(loop, run):
    """create_server(keep_alive=True) (3.13): accepted connections have
    SO_KEEPALIVE set; without it they do not."""

    async def main():
        results = {}
        for keep in (True, None):
            made = loop.create_future()

            def factory():
                p = Recorder(loop)
                made.set_result(p)
                return p

            kwargs = {} if keep is None else {"keep_alive": keep}
            server = await loop.create_server(factory, "127.0.0.1", 0, **kwargs)
            c = socket.socket()
            c.setblocking(False)
            try:
                await loop.sock_connect(c, server.sockets[0].getsockname())
                p = await made
                t = await p.made
                results[keep] = t.get_extra_info("socket").getsockopt(
                    socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                t.close()
                await p.lost
            finally:
                c.close()
                server.close()
                await server.wait_closed()
        assert results[True] != 0
        assert results[None] == 0

    run(main())


# --------------------------------------------------------------------------
# start_serving / serve_forever / async with


def test_start_serving_false(loop, run):
    """start_serving=False: the socket is bound but not listening (connects
    are refused, SO_ACCEPTCONN 0, is_serving() False); start_serving() makes
    it listen and serve; a second start_serving() is harmless."""

    async def main():
        server = await loop.create_server(Echo, "127.0.0.1", 0, start_serving=False)
        try:
            addr = server.sockets[0].getsockname()
            assert not server.is_serving()
            assert server.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
            assert await connect_refused(loop, addr)
            await server.start_serving()
            assert server.is_serving()
            await server.start_serving()
            assert server.is_serving()
            assert await echo_roundtrip(loop, addr, b"late start") == b"late start"
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_serve_forever(loop, run):
    """serve_forever() starts serving a start_serving=False server and runs
    until cancelled; a second concurrent serve_forever() raises RuntimeError
    ('... is already being awaited on serve_forever()'); cancelling it raises
    CancelledError and closes the server; serve_forever() on a closed server
    raises RuntimeError ('... is closed')."""

    async def main():
        server = await loop.create_server(Echo, "127.0.0.1", 0, start_serving=False)
        addr = server.sockets[0].getsockname()
        task = asyncio.ensure_future(server.serve_forever())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert server.is_serving()
        assert await echo_roundtrip(loop, addr, b"forever") == b"forever"
        with pytest.raises(RuntimeError, match="is already being awaited on serve_forever"):
            await server.serve_forever()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not server.is_serving()
        assert len(server.sockets) == 0
        assert await connect_refused(loop, addr)
        with pytest.raises(RuntimeError, match="is closed"):
            await server.serve_forever()

    run(main())


def test_serve_forever_cancel_closes_server(loop, run):
    """Cancelling serve_forever() closes the server: the port refuses new
    connections afterwards."""

    async def main():
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()
        task = asyncio.ensure_future(server.serve_forever())
        assert await echo_roundtrip(loop, addr, b"x") == b"x"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not server.is_serving()
        assert await connect_refused(loop, addr)

    run(main())


def test_server_async_with(loop, run):
    """async with server: serving inside; closed on exit (port refuses)."""

    async def main():
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()
        async with server as entered:
            assert entered is server
            assert server.is_serving()
            assert await echo_roundtrip(loop, addr, b"with") == b"with"
        assert not server.is_serving()
        assert await connect_refused(loop, addr)

    run(main())


# --------------------------------------------------------------------------
# close / wait_closed


def test_close_keeps_existing_connections(loop, run):
    """Server.close() stops listening but leaves accepted connections open:
    an existing connection still echoes after close()."""

    async def main():
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()
        c = socket.socket()
        c.setblocking(False)
        try:
            await loop.sock_connect(c, addr)
            await loop.sock_sendall(c, b"before")
            assert await recv_exactly(loop, c, 6) == b"before"
            server.close()
            assert await connect_refused(loop, addr)
            await loop.sock_sendall(c, b"after")
            assert await recv_exactly(loop, c, 5) == b"after"
        finally:
            c.close()
        await asyncio.wait_for(server.wait_closed(), 5)

    run(main())


@pytest.mark.skipif(not PY312_1, reason="wait_closed() waits for connections from 3.12.1 on")
@pytest.mark.uvloop_xfail("uvloop's wait_closed() returns once the listening sockets are "
                          "closed, without waiting for the accepted connections",
                          condition=PY312_1)
def test_wait_closed_waits_for_connections(loop, run):
    """3.12.1+: wait_closed() returns only once the server is closed AND all
    its connections are gone, in either order."""

    async def main():
        protos = []
        server = await loop.create_server(lambda: Echo(protos), "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()
        c = socket.socket()
        c.setblocking(False)
        try:
            await loop.sock_connect(c, addr)
            await loop.sock_sendall(c, b"hi")
            await recv_exactly(loop, c, 2)
            early = asyncio.ensure_future(server.wait_closed())
            await settle(3)
            assert not early.done(), "wait_closed() returned while still serving"
            server.close()
            late = asyncio.ensure_future(server.wait_closed())
            await settle(3)
            assert not early.done() and not late.done(), (
                "wait_closed() returned while a connection is still open")
        finally:
            c.close()
        await asyncio.wait_for(asyncio.gather(early, late), 5)
        assert protos[0].lost == ("lost", None)

    run(main())


def test_wait_closed_without_connections(loop, run):
    """close() then wait_closed() with no connection returns promptly; so
    does a second wait_closed()."""

    async def main():
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)
        await asyncio.wait_for(server.wait_closed(), 5)
        server.close()

    run(main())


@pytest.mark.skipif(not PY313, reason="Server.close_clients() is new in Python 3.13")
@pytest.mark.uvloop_xfail("uvloop 0.23's Server has no close_clients()", condition=PY313)
def test_close_clients(loop, run):
    """close_clients() (3.13) closes every accepted transport gracefully: each
    peer receives the data queued before, then EOF; connection_lost(None)."""

    async def main():
        protos = []

        def factory():
            p = Recorder(loop)
            protos.append(p)
            return p

        server = await loop.create_server(factory, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()
        clients = []
        try:
            for _ in range(3):
                c = socket.socket()
                c.setblocking(False)
                clients.append(c)
                await loop.sock_connect(c, addr)
            await until(lambda: len(protos) == 3 and all(p.made.done() for p in protos), "accepts")
            for i, p in enumerate(protos):
                p.transport.write(b"goodbye %d" % i)
            server.close()
            server.close_clients()
            for p in protos:
                assert await asyncio.wait_for(p.lost, 5) is None
            got = sorted([await recv_until_eof(loop, c) for c in clients])
            assert got == [b"goodbye 0", b"goodbye 1", b"goodbye 2"]
            await asyncio.wait_for(server.wait_closed(), 5)
        finally:
            for c in clients:
                c.close()

    run(main())


@pytest.mark.skipif(not PY313, reason="Server.abort_clients() is new in Python 3.13")
@pytest.mark.uvloop_xfail("uvloop 0.23's Server has no abort_clients()", condition=PY313)
def test_abort_clients(loop, run):
    """abort_clients() (3.13) aborts every accepted transport: queued output
    is dropped (the peer gets less than was written), connection_lost(None)
    runs without the peers reading."""
    big = b"z" * (16 * 1024 * 1024)

    async def main():
        protos = []

        def factory():
            p = Recorder(loop)
            protos.append(p)
            return p

        server = await loop.create_server(factory, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()
        clients = []
        try:
            for _ in range(2):
                c = socket.socket()
                c.setblocking(False)
                clients.append(c)
                await loop.sock_connect(c, addr)
            await until(lambda: len(protos) == 2 and all(p.made.done() for p in protos), "accepts")
            for p in protos:
                p.transport.write(big)
            await settle(2)
            server.close()
            server.abort_clients()
            for p in protos:
                assert await asyncio.wait_for(p.lost, 5) is None
            await asyncio.wait_for(server.wait_closed(), 5)
            for c in clients:
                got = b""
                try:
                    got = await recv_until_eof(loop, c)
                except ConnectionResetError:
                    pass
                assert len(got) < len(big)
        finally:
            for c in clients:
                c.close()

    run(main(), timeout=20)


# --------------------------------------------------------------------------
# accepting


def test_burst_of_connections_all_served(loop, run):
    """200 clients connecting at once are all accepted (one protocol each)
    and each gets its own data echoed."""

    async def main():
        protos = []
        server = await loop.create_server(lambda: Echo(protos), "127.0.0.1", 0, backlog=1024)
        addr = server.sockets[0].getsockname()
        try:
            payloads = [b"client %04d " % i * 10 for i in range(200)]
            got = await asyncio.gather(*(echo_roundtrip(loop, addr, p) for p in payloads))
            assert got == payloads
            assert len(protos) == 200
        finally:
            server.close()
            await server.wait_closed()

    run(main(), timeout=30)


def test_peername_of_accepted_transport(loop, run):
    """The accepted transport's 'peername' is the client's address and
    'sockname' the server's."""

    async def main():
        made = loop.create_future()

        def factory():
            p = Recorder(loop)
            made.set_result(p)
            return p

        server = await loop.create_server(factory, "127.0.0.1", 0)
        c = socket.socket()
        c.setblocking(False)
        try:
            await loop.sock_connect(c, server.sockets[0].getsockname())
            p = await made
            t = await p.made
            assert t.get_extra_info("peername") == c.getsockname()
            assert t.get_extra_info("sockname") == c.getpeername()
            t.close()
            await p.lost
        finally:
            c.close()
            server.close()
            await server.wait_closed()

    run(main())


@pytest.mark.parametrize("debug", [False, True], ids=["nodebug", "debug"])
@pytest.mark.uvloop_xfail("after the protocol factory raises, uvloop stops accepting (later "
                          "connections are never served) and reports the error to the exception "
                          "handler without a message even outside debug mode", run=False)
def test_protocol_factory_raising(loop, run, debug):
    """A protocol factory that raises for one connection: that connection is
    not served (nothing echoed), the server keeps serving the next ones.  The exception handler
    sees it only in debug mode, as 'Error on transport creation for incoming
    connection' with the exception."""

    class Boom(Exception):
        pass

    async def main():
        loop.set_debug(debug)
        calls = []
        loop.set_exception_handler(lambda lp, ctx: calls.append(ctx))
        count = 0

        def factory():
            nonlocal count
            count += 1
            if count == 1:
                raise Boom("factory failed")
            return Echo()

        server = await loop.create_server(factory, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()
        c = socket.socket()
        c.setblocking(False)
        try:
            await loop.sock_connect(c, addr)
            await loop.sock_sendall(c, b"first")
            await until(lambda: count >= 1, "the factory call")
            assert await echo_roundtrip(loop, addr, b"second") == b"second"
            await settle(3)
            try:
                leftover = c.recv(100)
            except BlockingIOError:
                leftover = None
            except ConnectionResetError:
                leftover = b""
            # never served: nothing echoed (asyncio does not close the socket
            # explicitly; it goes when garbage collected)
            assert leftover in (None, b"")
        finally:
            c.close()
            server.close()
            await server.wait_closed()
        relevant = [ctx for ctx in calls if isinstance(ctx.get("exception"), Boom)]
        if debug:
            assert len(relevant) == 1
            assert relevant[0]["message"] == "Error on transport creation for incoming connection"
        else:
            assert relevant == []

    try:
        run(main())
    finally:
        loop.set_debug(False)


# --------------------------------------------------------------------------
# accept() out of file descriptors


def _fill_fd_table():
    """Open /dev/null until every fd number up to the current highest one is
    taken; returns (fillers, limit) where limit = highest + 1."""
    top = max(int(x) for x in os.listdir("/proc/self/fd"))
    fillers = []
    while True:
        fd = os.open(os.devnull, os.O_RDONLY)
        if fd > top:
            os.close(fd)
            return fillers, top + 1
        fillers.append(fd)


@pytest.mark.uvloop_xfail("libuv handles EMFILE with its reserve-fd trick: it accepts and "
                          "drops the pending connection (the client sees EOF) and calls no "
                          "exception handler", run=False)
def test_accept_emfile(loop, run):
    """accept() failing with EMFILE (RLIMIT_NOFILE lowered so that no fd
    number is free): the loop's exception handler gets 'socket.accept() out
    of system resource' with the OSError (errno EMFILE) and the 'socket'; the
    server does not busy-loop meanwhile (process CPU time over a wait window
    stays well below wall time: a spin detector, not a speed measure); once
    fds are available again the pending connection is accepted and served."""

    async def main():
        calls = []
        loop.set_exception_handler(lambda lp, ctx: calls.append(ctx))
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()
        client = socket.socket()
        client.setblocking(False)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        fillers = []
        restored = False
        try:
            fillers, limit = _fill_fd_table()
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
            try:
                await loop.sock_connect(client, addr)
                await loop.sock_sendall(client, b"patience")
                await until(lambda: calls, "the exception handler call", timeout=5)
                wall0, cpu0 = time.monotonic(), time.process_time()
                await asyncio.sleep(0.5)
                wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                for fd in fillers:
                    os.close(fd)
                restored = True
            assert cpu < 0.5 * wall, f"{cpu:.3f} s CPU in {wall:.3f} s: the accept loop spins"
            ctx = calls[0]
            assert ctx["message"] == "socket.accept() out of system resource"
            assert isinstance(ctx["exception"], OSError)
            assert ctx["exception"].errno == errno.EMFILE
            assert ctx["socket"].getsockname() == addr
            assert all(c["message"] == "socket.accept() out of system resource" for c in calls)
            # the pending connection is served once fds are back
            assert await asyncio.wait_for(recv_exactly(loop, client, 8), 5) == b"patience"
            assert server.is_serving()
            assert await echo_roundtrip(loop, addr, b"next") == b"next"
        finally:
            if not restored:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                for fd in fillers:
                    os.close(fd)
            client.close()
            server.close()
            await server.wait_closed()

    run(main(), timeout=20)
