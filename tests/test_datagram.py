"""Datagram endpoints: loop.create_datagram_endpoint() and its transport, on
the stock loop, uvloop and mtloop.

IPv4, IPv6 and Unix datagram sockets, connected and not; the argument
errors asyncio raises; ICMP errors as error_received(); datagrams checked
one by one (sequence number and checksum: never merged, split, corrupted
or reordered on loopback).
"""

import asyncio
import hashlib
import os
import socket
import struct

import pytest

from netutil import HAS_IPV6


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


def test_datagrams_arrive_whole_and_in_order(loop, run):
    # 10,000 datagrams of 20 bytes to 8 KiB, each carrying its sequence
    # number and a digest of its payload, in windows of 8 (so the receive
    # buffer never overflows and nothing is legitimately lost).
    rng = __import__("random").Random(12)
    sizes = [rng.choice((0, 1, 100, 1000, 1472, 4000, 8192 - 40)) for _ in range(10_000)]

    def datagram(seq, n):
        payload = os.urandom(n)
        return struct.pack("!I", seq) + hashlib.sha256(payload).digest()[:16] + payload

    async def main():
        server, proto = await loop.create_datagram_endpoint(lambda: Recorder(loop),
                                                            local_addr=("127.0.0.1", 0))
        client, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=server.get_extra_info("sockname"))
        for start in range(0, len(sizes), 8):
            for seq in range(start, min(start + 8, len(sizes))):
                client.sendto(datagram(seq, sizes[seq]))
            await proto.wait_for(min(start + 8, len(sizes)), timeout=10)
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
