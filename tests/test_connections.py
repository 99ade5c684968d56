"""loop.create_connection() and loop.connect_accepted_socket() (TCP, and a
Unix socketpair for connect_accepted_socket).

The server side is a plain listening socket accepted through
loop.sock_accept(), so what is checked is the client transport alone.
TLS is out of scope (ssl=None only).
"""

import asyncio
import errno
import functools
import os
import socket
import sys

import pytest

from netutil import HAS_IPV6, Recorder, recv_exactly, recv_until_eof

PY312 = sys.version_info >= (3, 12)


needs_ipv6 = pytest.mark.skipif(not HAS_IPV6,
                                reason="IPv6 loopback (::1) is not available")


@pytest.fixture
def listener():
    """A listening non-blocking TCP socket on 127.0.0.1."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    s.setblocking(False)
    yield s
    s.close()


@pytest.fixture
def listener6():
    s = socket.socket(socket.AF_INET6)
    s.bind(("::1", 0))
    s.listen(16)
    s.setblocking(False)
    yield s
    s.close()


def closed_port():
    """A loopback port with nothing listening (bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def check_connected(loop, t, p, listener):
    """Accept the peer, check addresses, exchange data both ways, close."""
    peer, addr = await loop.sock_accept(listener)
    peer.setblocking(False)
    try:
        assert t.get_extra_info("peername")[:2] == listener.getsockname()[:2]
        assert t.get_extra_info("sockname")[:2] == addr[:2]
        t.write(b"ping")
        assert await recv_exactly(loop, peer, 4) == b"ping"
        await loop.sock_sendall(peer, b"pong")
        assert await p.wait_bytes(4) == b"pong"
        t.close()
        assert await asyncio.wait_for(p.lost, 5) is None
        assert await recv_until_eof(loop, peer) == b""
    finally:
        peer.close()


# --------------------------------------------------------------------------
# success paths


def test_create_connection_host_port(loop, run, listener):
    """create_connection(factory, host, port) returns (transport, protocol)
    once connection_made has run; the transport carries data both ways."""

    async def main():
        t, p = await loop.create_connection(lambda: Recorder(loop), *listener.getsockname())
        assert isinstance(p, Recorder)
        assert p.made.done() and p.transport is t, "connection_made must run before it returns"
        assert p.kinds() == ["made"]
        await check_connected(loop, t, p, listener)

    run(main())


def test_create_connection_hostname(loop, run, listener):
    """A host name ('localhost') is resolved; family=AF_INET restricts it."""

    async def main():
        port = listener.getsockname()[1]
        t, p = await loop.create_connection(lambda: Recorder(loop), "localhost", port,
                                            family=socket.AF_INET)
        await check_connected(loop, t, p, listener)

    run(main())


def test_create_connection_port_as_string(loop, run, listener):
    """The port may be given as a string (getaddrinfo accepts service names)."""

    async def main():
        t, p = await loop.create_connection(lambda: Recorder(loop), "127.0.0.1",
                                            str(listener.getsockname()[1]))
        await check_connected(loop, t, p, listener)

    run(main())


@needs_ipv6
def test_create_connection_ipv6(loop, run, listener6):
    """create_connection to '::1' makes an AF_INET6 transport."""

    async def main():
        t, p = await loop.create_connection(lambda: Recorder(loop), "::1",
                                            listener6.getsockname()[1])
        assert t.get_extra_info("socket").family == socket.AF_INET6
        await check_connected(loop, t, p, listener6)

    run(main())


def test_create_connection_ssl_none(loop, run, listener):
    """ssl=None is a plain connection: no 'sslcontext'/'ssl_object' extra."""

    async def main():
        t, p = await loop.create_connection(lambda: Recorder(loop), *listener.getsockname(),
                                            ssl=None)
        assert t.get_extra_info("sslcontext") is None
        assert t.get_extra_info("ssl_object") is None
        await check_connected(loop, t, p, listener)

    run(main())


def test_create_connection_sock(loop, run, listener):
    """create_connection(sock=) wraps an already connected socket."""

    async def main():
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, listener.getsockname())
        t, p = await loop.create_connection(lambda: Recorder(loop), sock=sock)
        assert p.made.done()
        assert t.get_extra_info("peername") == listener.getsockname()
        await check_connected(loop, t, p, listener)

    run(main())


def test_create_connection_sock_blocking_socket(loop, run, listener):
    """A blocking connected socket given as sock= works too (the transport
    does not block the loop)."""

    async def main():
        sock = socket.create_connection(listener.getsockname())
        assert sock.getblocking()
        t, p = await loop.create_connection(lambda: Recorder(loop), sock=sock)
        await check_connected(loop, t, p, listener)

    run(main())


def test_create_connection_local_addr(loop, run, listener):
    """local_addr binds the client socket before connecting: the transport's
    sockname and the server's view of the peer are that address."""

    async def main():
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        t, p = await loop.create_connection(lambda: Recorder(loop), *listener.getsockname(),
                                            local_addr=("127.0.0.1", port))
        assert t.get_extra_info("sockname") == ("127.0.0.1", port)
        await check_connected(loop, t, p, listener)

    run(main())


@pytest.mark.uvloop_xfail("uvloop raises the bare OSError(98, 'Address already in use') "
                          "without asyncio's 'error while attempting to bind on address' text")
def test_create_connection_local_addr_in_use(loop, run, listener):
    """A local_addr that cannot be bound raises OSError (EADDRINUSE) with
    asyncio's 'error while attempting to bind on address ...' message."""

    async def main():
        taken = listener.getsockname()
        with pytest.raises(OSError) as info:
            await loop.create_connection(asyncio.Protocol, *taken, local_addr=taken)
        assert info.value.errno == errno.EADDRINUSE
        assert f"error while attempting to bind on address {taken!r}" in str(info.value)

    run(main())


@pytest.mark.uvloop_xfail("uvloop 0.23's create_connection() has no happy_eyeballs_delay parameter")
@pytest.mark.parametrize("delay", [0.05, 0.25])
def test_create_connection_happy_eyeballs(loop, run, listener, delay):
    """happy_eyeballs_delay (and its implied interleave=1) still connects."""

    async def main():
        t, p = await loop.create_connection(lambda: Recorder(loop), "localhost",
                                            listener.getsockname()[1],
                                            happy_eyeballs_delay=delay)
        await check_connected(loop, t, p, listener)

    run(main())


@pytest.mark.uvloop_xfail("uvloop 0.23's create_connection() has no interleave parameter")
def test_create_connection_interleave(loop, run, listener):
    """interleave=2 without happy eyeballs connects."""

    async def main():
        t, p = await loop.create_connection(lambda: Recorder(loop), "localhost",
                                            listener.getsockname()[1], interleave=2)
        await check_connected(loop, t, p, listener)

    run(main())


def test_peer_closes_right_after_accept(loop, run, listener):
    """The server accepts and closes at once: the client protocol gets
    connection_made, eof_received, connection_lost(None)."""

    async def main():
        t, p = await loop.create_connection(lambda: Recorder(loop), *listener.getsockname())
        peer, _ = await loop.sock_accept(listener)
        peer.close()
        assert await asyncio.wait_for(p.lost, 5) is None
        assert p.kinds() == ["made", "eof", "lost"]

    run(main())


# --------------------------------------------------------------------------
# errors


def test_connection_refused(loop, run):
    """Nothing listening: ConnectionRefusedError (an OSError, errno
    ECONNREFUSED)."""
    port = closed_port()

    async def main():
        with pytest.raises(ConnectionRefusedError) as info:
            await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        assert isinstance(info.value, OSError)
        assert info.value.errno == errno.ECONNREFUSED

    run(main())


@pytest.mark.uvloop_xfail("uvloop's message is '[Errno 111] Connection refused'")
def test_connection_refused_message(loop, run):
    """The refusal carries asyncio's text: "[Errno 111] Connect call failed
    ('127.0.0.1', port)"."""
    port = closed_port()

    async def main():
        with pytest.raises(ConnectionRefusedError) as info:
            await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        assert str(info.value) == (
            f"[Errno {errno.ECONNREFUSED}] Connect call failed ('127.0.0.1', {port})")

    run(main())


@pytest.mark.uvloop_xfail("uvloop 0.23's create_connection() has no happy_eyeballs_delay parameter")
def test_connection_refused_happy_eyeballs(loop, run):
    """With happy_eyeballs_delay the single refusal is raised as such:
    ConnectionRefusedError with asyncio's text."""
    port = closed_port()

    async def main():
        with pytest.raises(ConnectionRefusedError) as info:
            await loop.create_connection(asyncio.Protocol, "127.0.0.1", port,
                                         happy_eyeballs_delay=0.1)
        assert info.value.errno == errno.ECONNREFUSED
        assert str(info.value) == (
            f"[Errno {errno.ECONNREFUSED}] Connect call failed ('127.0.0.1', {port})")

    run(main())


@pytest.mark.skipif(not PY312, reason="all_errors= is new in Python 3.12")
@pytest.mark.uvloop_xfail("uvloop 0.23's create_connection() has no all_errors parameter",
                          condition=PY312)
@pytest.mark.parametrize("eyeballs", [False, True], ids=["plain", "happy-eyeballs"])
def test_connection_refused_all_errors(loop, run, eyeballs):
    """all_errors=True (3.12+): the failure is an ExceptionGroup
    'create_connection failed' holding the ConnectionRefusedError."""
    port = closed_port()

    async def main():
        kwargs = {"happy_eyeballs_delay": 0.1} if eyeballs else {}
        with pytest.raises(ExceptionGroup) as info:  # noqa: F821 (3.11+ builtin)
            await loop.create_connection(asyncio.Protocol, "127.0.0.1", port,
                                         all_errors=True, **kwargs)
        group = info.value
        assert group.message == "create_connection failed"
        assert len(group.exceptions) == 1
        assert isinstance(group.exceptions[0], ConnectionRefusedError)

    run(main())


def test_create_connection_unresolvable(loop, run):
    """A host that getaddrinfo cannot resolve (flags=AI_NUMERICHOST with a
    name) raises socket.gaierror."""

    async def main():
        with pytest.raises(socket.gaierror):
            await loop.create_connection(asyncio.Protocol, "localhost", 80,
                                         flags=socket.AI_NUMERICHOST)

    run(main())


def test_create_connection_argument_errors(loop, run, listener):
    """host/port with sock, none of them, a datagram sock, and TLS-only
    arguments without ssl raise ValueError with asyncio's messages."""

    async def main():
        sock = socket.socket()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            with pytest.raises(ValueError,
                               match="host/port and sock can not be specified at the same time"):
                await loop.create_connection(asyncio.Protocol, "127.0.0.1", 1, sock=sock)
            with pytest.raises(ValueError,
                               match="host and port was not specified and no sock specified"):
                await loop.create_connection(asyncio.Protocol)
            with pytest.raises(ValueError, match="A Stream Socket was expected"):
                await loop.create_connection(asyncio.Protocol, sock=udp)
            with pytest.raises(ValueError, match="server_hostname is only meaningful with ssl"):
                await loop.create_connection(asyncio.Protocol, *listener.getsockname(),
                                             server_hostname="example.org")
            with pytest.raises(ValueError,
                               match="ssl_handshake_timeout is only meaningful with ssl"):
                await loop.create_connection(asyncio.Protocol, *listener.getsockname(),
                                             ssl_handshake_timeout=1.0)
        finally:
            sock.close()
            udp.close()

    run(main())


def test_create_connection_factory_raises(loop, run, listener):
    """An exception from the protocol factory propagates out of
    create_connection()."""

    class Boom(Exception):
        pass

    def factory():
        raise Boom("no protocol")

    async def main():
        with pytest.raises(Boom):
            await loop.create_connection(factory, *listener.getsockname())

    run(main())


# --------------------------------------------------------------------------
# connect_accepted_socket


def test_connect_accepted_socket(loop, run, listener):
    """connect_accepted_socket() wraps a socket accepted elsewhere: returns
    (transport, protocol) after connection_made; data flows both ways and
    close() ends it with EOF for the peer."""

    async def main():
        client = socket.socket()
        client.setblocking(False)
        try:
            await loop.sock_connect(client, listener.getsockname())
            conn, _ = await loop.sock_accept(listener)
            t, p = await loop.connect_accepted_socket(lambda: Recorder(loop), conn)
            assert p.made.done() and p.transport is t
            assert t.get_extra_info("peername") == client.getsockname()
            await loop.sock_sendall(client, b"to server")
            assert await p.wait_bytes(9) == b"to server"
            t.write(b"to client")
            assert await recv_exactly(loop, client, 9) == b"to client"
            t.close()
            assert await asyncio.wait_for(p.lost, 5) is None
            assert await recv_until_eof(loop, client) == b""
        finally:
            client.close()

    run(main())


def test_connect_accepted_socket_socketpair(loop, run):
    """connect_accepted_socket() on one end of an AF_UNIX socketpair; the
    other end, a plain socket, sees the data and the EOF."""

    async def main():
        a, b = socket.socketpair()
        b.setblocking(False)
        try:
            t, p = await loop.connect_accepted_socket(lambda: Recorder(loop), a)
            t.write(b"over the pair")
            assert await recv_exactly(loop, b, 13) == b"over the pair"
            await loop.sock_sendall(b, b"back")
            assert await p.wait_bytes(4) == b"back"
            b.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(p.lost, 5) is None
            assert p.kinds()[-2:] == ["eof", "lost"]
        finally:
            b.close()

    run(main())


def test_connect_accepted_socket_rejects_datagram(loop, run):
    """A datagram socket is refused with ValueError('A Stream Socket was
    expected, got ...')."""

    async def main():
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            with pytest.raises(ValueError, match="A Stream Socket was expected"):
                await loop.connect_accepted_socket(asyncio.Protocol, udp)
        finally:
            udp.close()

    run(main())



async def _resume_then_data(loop, connect):
    """The order in which the task awaiting `connect(P)` resumes and P gets
    the data its peer sent at once."""
    events = []
    got = loop.create_future()

    class P(asyncio.Protocol):
        def data_received(self, data):
            events.append(("data", data))
            if not got.done():
                got.set_result(None)

    tr = await connect(P)
    events.append("resumed")
    await asyncio.wait_for(got, 5)
    tr.close()
    return events


@pytest.mark.uvloop_xfail("uvloop reads a socket passed as sock= before create_connection()'s "
                          "caller resumes")
def test_task_resumes_before_data_already_waiting(loop, run):
    """Data already waiting on a socket given to create_connection(sock=)
    reaches the protocol after the awaiting task resumes: the task's wakeup
    was ready before the poll that reads the data, and asyncio runs what was
    ready first (CPython's test_buffered_proto relies on it)."""
    a, b = socket.socketpair()
    with b:
        b.sendall(b"early")

        async def connect(proto):
            return (await loop.create_connection(proto, sock=a))[0]

        assert run(_resume_then_data(loop, connect)) == ["resumed", ("data", b"early")]


def test_task_resumes_before_data_sent_on_accept(loop, run):
    """The same with a server of the same loop that writes as soon as it
    accepts."""

    async def main():
        async def greet(reader, writer):
            writer.write(b"early")
            writer.close()

        srv = await asyncio.start_server(greet, "127.0.0.1", 0)

        async def connect(proto):
            return (await loop.create_connection(proto, *srv.sockets[0].getsockname()))[0]

        try:
            return await _resume_then_data(loop, connect)
        finally:
            srv.close()
            await srv.wait_closed()

    assert run(main()) == ["resumed", ("data", b"early")]


def open_descriptors():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_a_client_connection_holds_one_descriptor(loop, run, tmp_path, kind):
    """create_connection() and create_unix_connection(path) make their own
    socket, so, as with the stock loop, a connection's client side holds
    one descriptor: 40 connected pairs in one process add 80 (mtloop's
    transports used to work on a copy, 120, and 10,000 connections ran out
    of a 20,000 limit).  get_extra_info('socket') still answers for it, and
    closing the connections gives the descriptors back."""
    n = 40
    accepted = []

    class Server(asyncio.Protocol):
        def connection_made(self, transport):
            accepted.append(transport)

    async def main():
        if kind == "tcp":
            server = await loop.create_server(Server, "127.0.0.1", 0)
            connect = functools.partial(loop.create_connection, asyncio.Protocol,
                                        *server.sockets[0].getsockname())
        else:
            path = str(tmp_path / "s.sock")
            server = await loop.create_unix_server(Server, path)
            connect = functools.partial(loop.create_unix_connection, asyncio.Protocol, path)
        # One connection first: an I/O thread's own descriptors are made then.
        first, _ = await connect()
        while len(accepted) < 1:
            await asyncio.sleep(0.001)
        before = open_descriptors()
        pairs = [await connect() for _ in range(n)]
        while len(accepted) < n + 1:
            await asyncio.sleep(0.001)
        during = open_descriptors()
        for transport, _ in pairs:
            sock = transport.get_extra_info("socket")
            assert sock.fileno() >= 0
            assert sock.getsockname() == transport.get_extra_info("sockname")
            assert sock.getpeername() == transport.get_extra_info("peername")
        for transport, _ in pairs:
            transport.close()
        for transport in accepted:
            transport.close()
        first.close()
        server.close()
        await server.wait_closed()
        deadline = loop.time() + 5
        while open_descriptors() > before - 2 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return before, during, open_descriptors()

    before, during, after = run(main())
    assert during - before == 2 * n, (before, during)
    assert after <= before - 2, (before, during, after)
