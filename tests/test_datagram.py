"""Datagram endpoints: loop.create_datagram_endpoint() and its transport, on
the stock loop, uvloop and mtloop.

IPv4, IPv6 and Unix datagram sockets, connected and not; the argument
errors asyncio raises; ICMP errors as error_received(); datagrams checked
one by one (sequence number and checksum: never merged, split, corrupted
or reordered on loopback).
"""

import asyncio
import errno
import hashlib
import os
import socket
import struct

import pytest

from netutil import HAS_IPV6


def stock_sends_empty_datagrams():
    """Whether this Python's asyncio sends sendto(b"") (later releases) or
    drops it, read from its source as mtloop reads it; the asyncio run of
    the test checks the reading against the stock loop itself."""
    import inspect
    from asyncio import selector_events
    return "if not data" not in inspect.getsource(
        selector_events._SelectorDatagramTransport.sendto)


class Recorder(asyncio.DatagramProtocol):
    def __init__(self, loop):
        self.transport = None
        self.datagrams = []
        self.errors = []
        self.lost = loop.create_future()
        self.arrived = asyncio.Event()

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.datagrams.append((data, addr))
        self.arrived.set()

    def error_received(self, exc):
        self.errors.append(exc)
        self.arrived.set()

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)

    async def wait_for(self, n, timeout=5):
        async def enough():
            while len(self.datagrams) < n:
                self.arrived.clear()
                await self.arrived.wait()
        await asyncio.wait_for(enough(), timeout)


class Echo(Recorder):
    def datagram_received(self, data, addr):
        super().datagram_received(data, addr)
        self.transport.sendto(data, addr)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_echo_unconnected_and_connected(loop, run, host):
    if host == "::1" and not HAS_IPV6:
        pytest.skip("no IPv6 loopback here")

    async def main():
        server, echo = await loop.create_datagram_endpoint(lambda: Echo(loop), local_addr=(host, 0))
        addr = server.get_extra_info("sockname")[:2]
        assert server.get_extra_info("peername") is None
        assert server.get_extra_info("socket").type == socket.SOCK_DGRAM
        # Unconnected: each sendto names the peer.
        free, free_proto = await loop.create_datagram_endpoint(lambda: Recorder(loop),
                                                               local_addr=(host, 0))
        for i in range(5):
            free.sendto(b"free %d" % i, addr)
        await free_proto.wait_for(5)
        # Connected: sendto() without an address, or with the same one.
        conn, conn_proto = await loop.create_datagram_endpoint(lambda: Recorder(loop),
                                                               remote_addr=addr)
        assert conn.get_extra_info("peername")[:2] == addr[:2]
        conn.sendto(b"connected")
        conn.sendto(b"same address", conn.get_extra_info("peername"))
        await conn_proto.wait_for(2)
        for t in (server, free, conn):
            t.close()
            assert t.is_closing()
        await asyncio.wait_for(asyncio.gather(echo.lost, free_proto.lost, conn_proto.lost), 5)
        return free_proto.datagrams, conn_proto.datagrams, echo.lost.result()

    free_got, conn_got, lost_exc = run(main())
    assert [d for d, _ in free_got] == [b"free %d" % i for i in range(5)]
    assert [d for d, _ in conn_got] == [b"connected", b"same address"]
    assert lost_exc is None


@pytest.mark.uvloop_xfail("uvloop rejects a path as local_addr for AF_UNIX (TypeError)")
def test_unix_datagram(loop, run, tmp_path):
    server_path = str(tmp_path / "server.sock")
    client_path = str(tmp_path / "client.sock")

    async def main():
        server, echo = await loop.create_datagram_endpoint(
            lambda: Echo(loop), local_addr=server_path, family=socket.AF_UNIX)
        client, proto = await loop.create_datagram_endpoint(
            lambda: Recorder(loop), local_addr=client_path, remote_addr=server_path,
            family=socket.AF_UNIX)
        client.sendto(b"over a unix datagram socket")
        await proto.wait_for(1)
        client.close()
        server.close()
        return proto.datagrams

    got = run(main())
    assert got == [(b"over a unix datagram socket", server_path)]


def test_connected_endpoint_reports_refused_as_error_received(loop, run):
    async def main():
        # A port nobody listens on: the ICMP error comes back as ECONNREFUSED.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()
        transport, proto = await loop.create_datagram_endpoint(lambda: Recorder(loop),
                                                               remote_addr=dead)
        for _ in range(3):
            transport.sendto(b"anyone?")
            await asyncio.sleep(0.05)
        transport.close()
        await proto.lost
        return proto.errors, proto.lost.result()

    errors, lost_exc = run(main())
    assert errors and all(isinstance(e, ConnectionRefusedError) for e in errors)
    assert lost_exc is None


def test_sendto_errors(loop, run):
    async def main():
        transport, _ = await loop.create_datagram_endpoint(lambda: Recorder(loop),
                                                           remote_addr=("127.0.0.1", 9))
        with pytest.raises(TypeError):
            transport.sendto("text")
        with pytest.raises(ValueError):
            transport.sendto(b"x", ("127.0.0.1", 10))  # not the connected address
        transport.close()
        transport.sendto(b"after close")  # dropped, as on the stock loop

    run(main())


def test_a_failed_send_is_reported_and_the_next_goes_out(loop, run):
    """A datagram the kernel refuses (too large for IPv4) goes to
    error_received() as the OSError that sendto() raised, is dropped, and the
    endpoint sends the next one; whether the loop sent it itself or queued
    it first."""
    async def main():
        server, proto = await loop.create_datagram_endpoint(lambda: Recorder(loop),
                                                            local_addr=("127.0.0.1", 0))
        client, client_proto = await loop.create_datagram_endpoint(
            lambda: Recorder(loop), local_addr=("127.0.0.1", 0))
        addr = server.get_extra_info("sockname")
        for i in range(3):
            client.sendto(b"x" * 70_000, addr)
            client.sendto(b"fits %d" % i, addr)
            await proto.wait_for(i + 1)
        while len(client_proto.errors) < 3:
            client_proto.arrived.clear()
            await asyncio.wait_for(client_proto.arrived.wait(), 5)
        client.close()
        server.close()
        return [d for d, _ in proto.datagrams], client_proto.errors

    got, errors = run(main())
    assert got == [b"fits 0", b"fits 1", b"fits 2"]
    assert [e.errno for e in errors] == [errno.EMSGSIZE] * 3
    assert all(type(e) is OSError for e in errors)


def test_argument_errors(loop, run):
    async def main():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            with pytest.raises(ValueError):
                await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=sock,
                                                    local_addr=("127.0.0.1", 0))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            with pytest.raises(ValueError):
                await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=sock)
        with pytest.raises(ValueError):
            await loop.create_datagram_endpoint(asyncio.DatagramProtocol)  # nothing to bind to

    run(main())


@pytest.mark.uvloop_xfail("uvloop still takes reuse_address and raises ValueError for it")
def test_reuse_address_is_gone(loop, run):
    async def main():
        with pytest.raises(TypeError):  # removed in 3.11, after a deprecation
            await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                local_addr=("127.0.0.1", 0), reuse_address=True)

    run(main())


def test_allow_broadcast_and_reuse_port(loop, run):
    async def main():
        t, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                   local_addr=("127.0.0.1", 0),
                                                   allow_broadcast=True)
        broadcast = t.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST)
        t.close()
        a, pa = await loop.create_datagram_endpoint(lambda: Recorder(loop),
                                                    local_addr=("127.0.0.1", 0), reuse_port=True)
        port = a.get_extra_info("sockname")[1]
        b, pb = await loop.create_datagram_endpoint(lambda: Recorder(loop),
                                                    local_addr=("127.0.0.1", port),
                                                    reuse_port=True)
        a.close()
        b.close()
        return broadcast

    assert run(main()) != 0


def test_existing_socket(loop, run):
    async def main():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        transport, proto = await loop.create_datagram_endpoint(lambda: Echo(loop), sock=sock)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.settimeout(5)
            peer.sendto(b"ping", sock.getsockname())
            reply = await loop.run_in_executor(None, peer.recvfrom, 100)
        transport.close()
        await proto.lost
        return reply[0], sock.fileno()

    reply, fileno = run(main())
    assert reply == b"ping"
    assert fileno == -1  # closed with the transport


def open_descriptors():
    return len(os.listdir("/proc/self/fd"))


def test_an_endpoint_holds_one_descriptor(loop, run):
    """An endpoint whose socket the loop made holds one descriptor, as with
    the stock loop (mtloop's used to hold a copy as well), and gives it back
    on close; one made from a caller's socket (sock=), even concurrently
    with the others, keeps that socket object working until it is closed.
    get_extra_info('socket') answers for both."""
    n = 40

    async def main():
        # One endpoint first: an I/O thread's own descriptors are made then.
        first, first_proto = await loop.create_datagram_endpoint(lambda: Recorder(loop),
                                                                 local_addr=("127.0.0.1", 0))
        # What an endpoint on a caller's socket costs on this loop (mtloop
        # works on a copy, so that Python code cannot close its descriptor
        # under the I/O thread).
        alone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        alone.bind(("127.0.0.1", 0))
        start = open_descriptors()
        alone_transport, alone_proto = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, sock=alone)
        given_cost = open_descriptors() - start
        alone_transport.close()
        while alone.fileno() >= 0:
            await asyncio.sleep(0.001)
        given = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        given.bind(("127.0.0.1", 0))
        before = open_descriptors()
        made = [loop.create_datagram_endpoint(lambda: Echo(loop), local_addr=("127.0.0.1", 0))
                for _ in range(n)]
        endpoints = await asyncio.gather(
            *made[:n // 2], loop.create_datagram_endpoint(lambda: Echo(loop), sock=given),
            *made[n // 2:])
        during = open_descriptors() - given_cost
        assert given.fileno() >= 0
        for transport, _ in endpoints:
            sock = transport.get_extra_info("socket")
            assert sock.getsockname() == transport.get_extra_info("sockname")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST) == 1
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.settimeout(5)
            for transport, _ in endpoints[::8]:
                peer.sendto(b"ping", transport.get_extra_info("sockname"))
                reply = await loop.run_in_executor(None, peer.recvfrom, 100)
                assert reply == (b"ping", transport.get_extra_info("sockname"))
        for transport, proto in endpoints:
            transport.close()
            await proto.lost
        first.close()
        await first_proto.lost
        deadline = loop.time() + 5
        while open_descriptors() > before - 2 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return before, during, open_descriptors(), given.fileno()

    before, during, after, given_fileno = run(main())
    # n made by the loop; the caller's socket is counted in `before`.
    assert during - before == n, (before, during)
    assert after == before - 2, (before, during, after)  # also the caller's and `first`'s
    assert given_fileno == -1  # closed with its transport, as the stock loop closes it


def test_datagrams_arrive_whole_and_in_order(loop, run):
    # 100,000 datagrams of 20 bytes to 8 KiB, each carrying its sequence
    # number and a digest of its payload, in windows of 16 (so the receive
    # buffer never overflows and nothing is legitimately lost).
    rng = __import__("random").Random(12)
    sizes = [rng.choice((0, 1, 100, 1000, 1472, 4000)) if i % 50 else 8192 - 40
             for i in range(100_000)]

    def datagram(seq, n):
        payload = os.urandom(n)
        return struct.pack("!I", seq) + hashlib.sha256(payload).digest()[:16] + payload

    async def main():
        server, proto = await loop.create_datagram_endpoint(lambda: Recorder(loop),
                                                            local_addr=("127.0.0.1", 0))
        client, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=server.get_extra_info("sockname"))
        for start in range(0, len(sizes), 16):
            for seq in range(start, min(start + 16, len(sizes))):
                client.sendto(datagram(seq, sizes[seq]))
            await proto.wait_for(min(start + 16, len(sizes)), timeout=10)
        client.close()
        server.close()
        return [d for d, _ in proto.datagrams]

    got = run(main(), timeout=60)
    assert len(got) == len(sizes)
    for seq, data in enumerate(got):
        assert struct.unpack("!I", data[:4])[0] == seq
        assert len(data) == 20 + sizes[seq]
        assert hashlib.sha256(data[20:]).digest()[:16] == data[4:20]


def test_many_endpoints(loop, run):
    async def main():
        pairs = []
        for _ in range(100):
            t, p = await loop.create_datagram_endpoint(lambda: Echo(loop),
                                                       local_addr=("127.0.0.1", 0))
            c, cp = await loop.create_datagram_endpoint(
                lambda: Recorder(loop), remote_addr=t.get_extra_info("sockname"))
            pairs.append((t, c, cp))
        for i, (_, c, _) in enumerate(pairs):
            c.sendto(b"%d" % i)
        for _, _, cp in pairs:
            await cp.wait_for(1)
        got = [cp.datagrams[0][0] for _, _, cp in pairs]
        for t, c, _ in pairs:
            t.close()
            c.close()
        return got

    assert run(main(), timeout=30) == [b"%d" % i for i in range(100)]


def test_close_sends_queued_datagrams_first(loop, run):
    # close() right after a burst: every datagram still goes out, in order,
    # before connection_lost(None), which comes once.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", 0))
        peer.settimeout(5)

        async def main():
            lost = []
            transport, proto = await loop.create_datagram_endpoint(
                lambda: Recorder(loop), remote_addr=peer.getsockname())
            proto.connection_lost = lambda exc: (lost.append(exc), proto.lost.set_result(exc))
            for i in range(200):
                transport.sendto(b"%05d" % i)
            transport.close()
            assert transport.is_closing()
            transport.close()  # a second close does nothing
            await asyncio.wait_for(proto.lost, 5)
            await asyncio.sleep(0.01)
            return lost

        lost = run(main())
        got = [peer.recv(100) for _ in range(200)]
    assert got == [b"%05d" % i for i in range(200)]
    assert lost == [None]


@pytest.mark.uvloop_xfail("uvloop rejects a path as remote_addr for AF_UNIX (TypeError)")
def test_unix_datagram_flow_control(loop, run, tmp_path):
    # A Unix datagram peer that does not read makes the socket refuse
    # output: the write buffer grows, pause_writing() comes; once the peer
    # reads, resume_writing() comes and every datagram arrives in order.
    path = str(tmp_path / "peer.sock")
    b = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.bind(path)
    b.setblocking(False)

    class Writer(Recorder):
        def __init__(self, loop):
            super().__init__(loop)
            self.calls = []

        def pause_writing(self):
            self.calls.append("pause")

        def resume_writing(self):
            self.calls.append("resume")

    async def main():
        transport, proto = await loop.create_datagram_endpoint(
            lambda: Writer(loop), remote_addr=path, family=socket.AF_UNIX)
        transport.set_write_buffer_limits(high=16 * 1024)
        sent = 0
        while "pause" not in proto.calls:
            assert sent < 20_000, "never paused"
            transport.sendto(b"%06d" % sent + b"x" * 1000)
            sent += 1
            if sent % 8 == 0:
                await asyncio.sleep(0)
        assert transport.get_write_buffer_size() > 16 * 1024
        got = []
        while len(got) < sent:
            got.append(await loop.sock_recv(b, 2000))
        for _ in range(100):
            if "resume" in proto.calls:
                break
            await asyncio.sleep(0.01)
        size = transport.get_write_buffer_size()
        transport.close()
        await proto.lost
        return sent, got, proto.calls, size

    try:
        sent, got, calls, size = run(main())
    finally:
        b.close()
    assert calls == ["pause", "resume"]
    # Empty, but for the stock loop of 3.13, which counts 8 bytes of header
    # per datagram queued and takes off none when it sends one.
    assert size < 16 * 1024 // 4
    assert [d[:6] for d in got] == [b"%06d" % i for i in range(sent)]
    assert all(len(d) == 1006 for d in got)


def test_protocol_exception_is_reported_and_endpoint_stays(loop, run):
    # datagram_received() raising goes to the exception handler, as an
    # exception in a read callback does on the stock loop; the next
    # datagram is delivered.
    contexts = []

    class Fussy(Recorder):
        def datagram_received(self, data, addr):
            super().datagram_received(data, addr)
            if data == b"boom":
                raise ZeroDivisionError("bad datagram")

    async def main():
        loop.set_exception_handler(lambda _, ctx: contexts.append(ctx))
        server, proto = await loop.create_datagram_endpoint(lambda: Fussy(loop),
                                                            local_addr=("127.0.0.1", 0))
        client, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=server.get_extra_info("sockname"))
        client.sendto(b"boom")
        await proto.wait_for(1)
        client.sendto(b"fine")
        await proto.wait_for(2)
        closing = server.is_closing()
        client.close()
        server.close()
        await proto.lost
        return [d for d, _ in proto.datagrams], closing

    got, closing = run(main())
    assert got == [b"boom", b"fine"]
    assert not closing
    assert len(contexts) == 1 and isinstance(contexts[0]["exception"], ZeroDivisionError)


@pytest.mark.uvloop_xfail("uvloop's sendto() raises ValueError for an address that needs a "
                         "DNS lookup")
def test_sendto_resolves_names_and_fails_bad_addresses(loop, run):
    # An unconnected endpoint resolves a host name as socket.sendto() does;
    # an address of the wrong shape is a fatal error of the transport (the
    # stock loop's _fatal_error: exception handler, connection_lost(exc)).
    contexts = []

    async def main():
        loop.set_exception_handler(lambda _, ctx: contexts.append(ctx))
        server, proto = await loop.create_datagram_endpoint(lambda: Recorder(loop),
                                                            local_addr=("127.0.0.1", 0))
        port = server.get_extra_info("sockname")[1]
        client, cproto = await loop.create_datagram_endpoint(lambda: Recorder(loop),
                                                             local_addr=("127.0.0.1", 0))
        client.sendto(b"by name", ("localhost", port))
        client.sendto(b"by number", ("127.0.0.1", port))
        await proto.wait_for(2)
        client.sendto(b"nowhere", "not an address")
        lost = await asyncio.wait_for(cproto.lost, 5)
        server.close()
        return sorted(d for d, _ in proto.datagrams), lost

    got, lost = run(main())
    assert got == [b"by name", b"by number"]
    assert isinstance(lost, TypeError)
    assert [type(c.get("exception")) for c in contexts] == [TypeError]


@pytest.mark.uvloop_xfail("uvloop drops empty datagrams on every Python",
                         condition=stock_sends_empty_datagrams())
def test_empty_datagrams_as_the_stock_loop(loop, run):
    # asyncio drops sendto(b"") in 3.11 and early 3.12 releases and sends an
    # empty datagram in later ones; mtloop follows the asyncio it runs on.
    async def main():
        server, proto = await loop.create_datagram_endpoint(lambda: Recorder(loop),
                                                            local_addr=("127.0.0.1", 0))
        client, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=server.get_extra_info("sockname"))
        client.sendto(b"")
        client.sendto(b"last")
        await proto.wait_for(1)
        await asyncio.sleep(0.05)
        client.close()
        server.close()
        return [d for d, _ in proto.datagrams]

    expected = [b"", b"last"] if stock_sends_empty_datagrams() else [b"last"]
    assert run(main()) == expected


@pytest.mark.uvloop_xfail("uvloop rejects a path as local_addr for AF_UNIX (TypeError)")
def test_unix_datagram_from_an_unbound_sender(loop, run, tmp_path):
    # An unbound Unix socket's datagrams carry an empty address: the
    # protocol gets what recvfrom() gives, as on the stock loop.
    path = str(tmp_path / "server.sock")

    async def main():
        server, proto = await loop.create_datagram_endpoint(
            lambda: Recorder(loop), local_addr=path, family=socket.AF_UNIX)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"anonymous", path)
            await proto.wait_for(1)
        server.close()
        return proto.datagrams

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as a, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as b:
        b.bind(str(tmp_path / "probe.sock"))
        a.sendto(b"x", str(tmp_path / "probe.sock"))
        expected_addr = b.recvfrom(10)[1]
    assert run(main()) == [(b"anonymous", expected_addr)]
