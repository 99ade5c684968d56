"""TLS over the loop's transports, against asyncio (the reference), uvloop
and mtloop: every entry point that takes ssl=, start_tls() on the loop and
on a StreamWriter, asyncio's argument errors, verification failures, ALPN,
SNI, client certificates, sendfile and BufferedProtocol over TLS, the
extra info, the handshake and shutdown timeouts, peers that send garbage or
reset mid-handshake, and load (100 concurrent connections and 32 MiB each
way; 1,000 and 1 GiB with --stress).

Certificates are made for the session by trustme (a throwaway CA); no key
is committed.  Servers bind to 127.0.0.1 or a Unix path under tmp_path.
"""

import asyncio
import hashlib
import os
import socket
import ssl
import struct
import threading

import pytest

from netutil import pattern
from tlsutil import (HOST, PAYLOAD, Collect, Echo, certs, close_both, echo_through,  # noqa: F401
                     loop_factory, tls_server)

# ---- every entry point that takes ssl= ---------------------------------------


def test_tcp_client_and_server(loop, run, certs):
    async def main():
        sctx, cctx = certs.server(), certs.client()
        server, port, server_protos = await tls_server(loop, sctx)
        t, p = await loop.create_connection(lambda: Collect(loop), "127.0.0.1", port,
                                            ssl=cctx, server_hostname=HOST)
        await echo_through(t, p)
        # Extra info: TLS's own, and the TCP transport's beneath.
        assert t.get_extra_info("sslcontext") is cctx
        sslobj = t.get_extra_info("ssl_object")
        assert sslobj.version() in ("TLSv1.2", "TLSv1.3")
        assert sslobj.server_hostname == HOST
        assert ("DNS", HOST) in t.get_extra_info("peercert")["subjectAltName"]
        cipher = t.get_extra_info("cipher")
        assert isinstance(cipher, tuple) and len(cipher) == 3
        assert t.get_extra_info("compression") is None
        assert t.get_extra_info("peername") == ("127.0.0.1", port)
        assert t.get_extra_info("sockname")[0] == "127.0.0.1"
        assert t.get_extra_info("socket").fileno() >= 0
        st = server_protos[0].transport
        assert st.get_extra_info("sslcontext") is sctx
        assert st.get_extra_info("ssl_object").server_side
        assert st.get_extra_info("peername") == t.get_extra_info("sockname")
        await close_both(t, p, server)

    run(main())


def test_unix_client_and_server(loop, run, certs, tmp_path):
    path = str(tmp_path / "tls.sock")

    async def main():
        server = await loop.create_unix_server(lambda: Echo(loop), path, ssl=certs.server())
        t, p = await loop.create_unix_connection(lambda: Collect(loop), path,
                                                 ssl=certs.client(), server_hostname=HOST)
        await echo_through(t, p)
        assert t.get_extra_info("ssl_object") is not None
        await close_both(t, p, server)

    run(main())


def test_streams(loop, run, certs):
    async def main():
        async def handle(reader, writer):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=certs.server())
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=certs.client(),
                                                       server_hostname=HOST)
        writer.write(PAYLOAD)
        await writer.drain()
        assert await reader.readexactly(len(PAYLOAD)) == PAYLOAD
        assert writer.get_extra_info("peercert") is not None
        writer.write_eof() if writer.can_write_eof() else None
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    run(main())


def test_connect_accepted_socket(loop, run, certs):
    async def main():
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        lsock.setblocking(False)
        try:
            connecting = asyncio.ensure_future(loop.create_connection(
                lambda: Collect(loop), *lsock.getsockname(), ssl=certs.client(),
                server_hostname=HOST))
            conn, _ = await loop.sock_accept(lsock)
            echo = Echo(loop)
            st, _ = await loop.connect_accepted_socket(lambda: echo, conn, ssl=certs.server())
            t, p = await connecting
            await echo_through(t, p)
            assert st.get_extra_info("ssl_object").server_side
            await close_both(t, p)
            await asyncio.wait_for(echo.lost, 10)
        finally:
            lsock.close()

    run(main())


def test_ssl_true_verifies_against_the_system_store(loop, run, certs):
    """ssl=True: a default client context, which does not know the test CA."""

    async def main():
        server, port, _ = await tls_server(loop, certs.server())
        with pytest.raises(ssl.SSLCertVerificationError):
            await loop.create_connection(asyncio.Protocol, "127.0.0.1", port, ssl=True,
                                         server_hostname=HOST)
        server.close()
        await server.wait_closed()

    run(main())


# ---- verification ------------------------------------------------------------


@pytest.mark.parametrize("case", ["untrusted", "wrong-hostname"])
def test_verification_failure(loop, run, certs, case):
    async def main():
        server, port, _ = await tls_server(loop, certs.server())
        cctx = certs.client(trust=case != "untrusted")
        hostname = "other.example" if case == "wrong-hostname" else HOST
        with pytest.raises(ssl.SSLCertVerificationError):
            await loop.create_connection(asyncio.Protocol, "127.0.0.1", port, ssl=cctx,
                                         server_hostname=hostname)
        server.close()
        await server.wait_closed()

    run(main())


def test_client_certificates(loop, run, certs):
    async def main():
        server, port, server_protos = await tls_server(
            loop, certs.server(require_client_cert=True))
        t, p = await loop.create_connection(lambda: Collect(loop), "127.0.0.1", port,
                                            ssl=certs.client(cert=True), server_hostname=HOST)
        await echo_through(t, p)
        peer = server_protos[0].transport.get_extra_info("peercert")
        assert ("DNS", "client.example") in peer["subjectAltName"]
        await close_both(t, p)
        # Without a certificate the server refuses the handshake: the client
        # learns it at the latest when it reads.
        t, p = await loop.create_connection(lambda: Collect(loop), "127.0.0.1", port,
                                            ssl=certs.client(), server_hostname=HOST)
        t.write(b"x")
        exc = await asyncio.wait_for(p.lost, 10)
        assert exc is None or isinstance(exc, (ssl.SSLError, ConnectionError))
        server.close()
        await server.wait_closed()

    run(main())


# ---- ALPN and SNI ------------------------------------------------------------


def test_alpn(loop, run, certs):
    async def main():
        server, port, server_protos = await tls_server(
            loop, certs.server(alpn=["h2", "http/1.1"]))
        t, p = await loop.create_connection(lambda: Collect(loop, 1), "127.0.0.1", port,
                                            ssl=certs.client(alpn=["http/1.1"]),
                                            server_hostname=HOST)
        t.write(b"x")
        await asyncio.wait_for(p.done, 10)
        assert t.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
        st = server_protos[0].transport
        assert st.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
        await close_both(t, p, server)

    run(main())


def test_sni(loop, run, certs):
    async def main():
        names = []
        sctx = certs.server()
        sctx.sni_callback = lambda sslobj, name, ctx: names.append(name)
        server, port, _ = await tls_server(loop, sctx)
        t, p = await loop.create_connection(lambda: Collect(loop, 1), "127.0.0.1", port,
                                            ssl=certs.client(), server_hostname=HOST)
        t.write(b"x")
        await asyncio.wait_for(p.done, 10)
        assert names == [HOST]
        await close_both(t, p, server)

    run(main())


# ---- start_tls ---------------------------------------------------------------


def test_loop_start_tls_both_sides(loop, run, certs):
    """A plain connection upgraded mid-stream by loop.start_tls() on both ends
    (STARTTLS: the client asks, the server answers GO and upgrades, the
    client upgrades once it has the answer)."""

    async def main():
        upgraded = loop.create_future()

        class PlainServer(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport

            def data_received(self, data):
                assert data == b"STARTTLS\n"
                self.transport.pause_reading()  # the ClientHello waits for TLS
                self.transport.write(b"GO\n")
                loop.create_task(self.upgrade())

            async def upgrade(self):
                echo = Echo(loop)
                tls = await loop.start_tls(self.transport, echo, certs.server(),
                                           server_side=True)
                echo.connection_made(tls)
                upgraded.set_result(tls)

        class PlainClient(asyncio.Protocol):
            def __init__(self):
                self.go = loop.create_future()

            def data_received(self, data):
                assert data == b"GO\n"
                self.go.set_result(None)

        server = await loop.create_server(PlainServer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        t, plain = await loop.create_connection(PlainClient, "127.0.0.1", port)
        t.write(b"STARTTLS\n")
        await asyncio.wait_for(plain.go, 10)
        collect = Collect(loop)
        tls = await loop.start_tls(t, collect, certs.client(), server_hostname=HOST)
        collect.transport = tls
        await asyncio.wait_for(upgraded, 10)
        await echo_through(tls, collect)
        assert tls.get_extra_info("ssl_object") is not None
        tls.close()
        await asyncio.wait_for(collect.lost, 10)
        server.close()
        await server.wait_closed()

    run(main())


def test_stream_writer_start_tls(loop, run, certs):
    async def main():
        async def handle(reader, writer):
            assert await reader.readline() == b"STARTTLS\n"
            writer.write(b"GO\n")
            await writer.drain()
            await writer.start_tls(certs.server())
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"STARTTLS\n")
        assert await reader.readline() == b"GO\n"
        await writer.start_tls(certs.client(), server_hostname=HOST)
        writer.write(PAYLOAD)
        await writer.drain()
        assert await reader.readexactly(len(PAYLOAD)) == PAYLOAD
        assert writer.get_extra_info("ssl_object") is not None
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    run(main())


# ---- argument errors, in asyncio's order --------------------------------------


def test_argument_errors(loop, run, certs, tmp_path):
    async def main():
        cctx = certs.client()
        with pytest.raises(ValueError, match="server_hostname is only meaningful with ssl"):
            await loop.create_connection(asyncio.Protocol, "127.0.0.1", 1,
                                         server_hostname=HOST)
        with pytest.raises(ValueError, match="ssl_handshake_timeout is only meaningful"):
            await loop.create_connection(asyncio.Protocol, "127.0.0.1", 1,
                                         ssl_handshake_timeout=1)
        with pytest.raises(ValueError, match="ssl_shutdown_timeout is only meaningful"):
            await loop.create_connection(asyncio.Protocol, "127.0.0.1", 1,
                                         ssl_shutdown_timeout=1)
        with pytest.raises(ValueError, match="You must set server_hostname when using ssl"):
            await loop.create_connection(asyncio.Protocol, sock=socket.socket(), ssl=cctx)
        with pytest.raises(TypeError, match="ssl argument must be an SSLContext or None"):
            await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, ssl=True)
        with pytest.raises(TypeError, match="ssl argument must be an SSLContext or None"):
            await loop.create_unix_server(asyncio.Protocol, str(tmp_path / "y"), ssl=True)
        with pytest.raises(ValueError, match="ssl_handshake_timeout is only meaningful"):
            await loop.create_unix_server(asyncio.Protocol, str(tmp_path / "z"),
                                          ssl_handshake_timeout=1)
        r, w = socket.socketpair()
        try:
            t, _ = await loop.create_connection(asyncio.Protocol, sock=r)
            with pytest.raises(TypeError, match="expected to be an instance of ssl.SSLContext"):
                await loop.start_tls(t, asyncio.Protocol(), object())
            t.close()
        finally:
            w.close()

    run(main())


@pytest.mark.uvloop_xfail("uvloop's message is 'You must set server_hostname when using "
                          "ssl without a host'")
def test_unix_connection_needs_server_hostname(loop, run, certs, tmp_path):
    async def main():
        with pytest.raises(ValueError, match="you have to pass server_hostname when using ssl"):
            await loop.create_unix_connection(asyncio.Protocol, str(tmp_path / "x"),
                                              ssl=certs.client())

    run(main())


# ---- sendfile, BufferedProtocol, flow control over TLS ------------------------


@pytest.mark.uvloop_xfail("uvloop does not implement loop.sendfile() (NotImplementedError)")
def test_sendfile_falls_back(loop, run, certs, tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(PAYLOAD)

    async def main():
        server, port, server_protos = await tls_server(loop, certs.server(), Collect)
        t, p = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port,
                                            ssl=certs.client(), server_hostname=HOST)
        with open(path, "rb") as f:
            sent = await loop.sendfile(t, f)
            assert f.tell() == len(PAYLOAD)
        assert sent == len(PAYLOAD)
        assert await asyncio.wait_for(server_protos[0].done, 10) == PAYLOAD
        t.close()
        server.close()
        await server.wait_closed()

    run(main())


class BufferedCollect(asyncio.BufferedProtocol):
    def __init__(self, loop):
        self.buf = bytearray(1000)
        self.data = bytearray()
        self.done = loop.create_future()
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        # A memoryview: asyncio's SSL protocol fills the rest of the buffer
        # through a slice of it (a bytearray's slice would be a copy).
        return memoryview(self.buf)

    def buffer_updated(self, nbytes):
        self.data += self.buf[:nbytes]
        if len(self.data) >= len(PAYLOAD) and not self.done.done():
            self.done.set_result(bytes(self.data))

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)


def test_buffered_protocol(loop, run, certs):
    async def main():
        server, port, _ = await tls_server(loop, certs.server())
        t, p = await loop.create_connection(lambda: BufferedCollect(loop), "127.0.0.1", port,
                                            ssl=certs.client(), server_hostname=HOST)
        await echo_through(t, p)
        await close_both(t, p, server)

    run(main())


def test_pause_and_resume_reading(loop, run, certs):
    """A client that pauses reading: the echo server's writes back up and it is
    paused in turn; resuming lets everything through, intact."""

    async def main():
        server, port, _ = await tls_server(loop, certs.server())
        t, p = await loop.create_connection(lambda: Collect(loop), "127.0.0.1", port,
                                            ssl=certs.client(), server_hostname=HOST)
        t.pause_reading()
        assert not t.is_reading()
        t.write(PAYLOAD)
        await asyncio.sleep(0.2)
        assert len(p.data) < len(PAYLOAD)
        t.resume_reading()
        assert await asyncio.wait_for(p.done, 10) == PAYLOAD
        await close_both(t, p, server)

    run(main())


# ---- timeouts ----------------------------------------------------------------


def test_handshake_timeout(loop, run):
    """A server that accepts the TCP connection and never answers the
    ClientHello: the handshake gives up after ssl_handshake_timeout."""

    async def main():
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        try:
            t0 = loop.time()
            with pytest.raises(ConnectionAbortedError, match="SSL handshake is taking longer"):
                await loop.create_connection(asyncio.Protocol, *lsock.getsockname(),
                                             ssl=ssl.create_default_context(),
                                             server_hostname=HOST, ssl_handshake_timeout=0.3)
            assert loop.time() - t0 < 5
        finally:
            lsock.close()

    run(main())


def test_shutdown_timeout(loop, run, certs):
    """A peer that completes the handshake and then never reads: close() sends
    close_notify, gets no answer, and the connection ends after
    ssl_shutdown_timeout."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    handshaken = threading.Event()
    finished = threading.Event()

    def peer():
        conn, _ = lsock.accept()
        with certs.server().wrap_socket(conn, server_side=True) as tls:
            handshaken.set()
            finished.wait(15)

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()

    async def main():
        p = Collect(loop)
        t, _ = await loop.create_connection(lambda: p, *lsock.getsockname(),
                                            ssl=certs.client(), server_hostname=HOST,
                                            ssl_shutdown_timeout=0.3)
        assert await loop.run_in_executor(None, handshaken.wait, 5)
        t0 = loop.time()
        t.close()
        await asyncio.wait_for(p.lost, 10)
        assert loop.time() - t0 < 5

    try:
        run(main())
    finally:
        finished.set()
        thread.join(5)
        lsock.close()


# ---- what the peer does ------------------------------------------------------


def _tls_peer_thread(certs, lsock, body):
    """Accept one connection on `lsock` in a thread, complete the TLS
    handshake as the server, and run body(tls_socket)."""
    errors = []

    def main():
        try:
            conn, _ = lsock.accept()
            with certs.server().wrap_socket(conn, server_side=True) as tls:
                body(tls)
        except Exception as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    return thread, errors


def test_getpeercert_as_the_ssl_module_gives_it(loop, run, certs):
    """The peer certificate, as a dict and in binary form, is what a plain
    ssl.SSLSocket gets from the same server."""
    expected = {}

    async def main():
        server, port, _ = await tls_server(loop, certs.server())

        def blocking_client():
            with socket.create_connection(("127.0.0.1", port)) as raw:
                with certs.client().wrap_socket(raw, server_hostname=HOST) as tls:
                    expected["dict"] = tls.getpeercert()
                    expected["der"] = tls.getpeercert(binary_form=True)

        await loop.run_in_executor(None, blocking_client)
        t, p = await loop.create_connection(lambda: Collect(loop), "127.0.0.1", port,
                                            ssl=certs.client(), server_hostname=HOST)
        assert t.get_extra_info("peercert") == expected["dict"]
        assert t.get_extra_info("ssl_object").getpeercert(binary_form=True) == expected["der"]
        await close_both(t, p, server)

    run(main())


def test_peer_sends_garbage_mid_stream(loop, run, certs):
    """After some application data the peer writes bytes that are no TLS
    record: the data before them arrives, then the connection is lost with
    an SSL error."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)

    def body(tls):
        tls.sendall(b"hello")
        tls.recv(1)  # the client has the hello (a bad record in the same read
        # would make the SSL protocol drop the data read with it)
        # A record header announcing application data, then noise.
        socket.socket(fileno=os.dup(tls.fileno())).sendall(b"\x17\x03\x03\x00\x20" + b"!" * 32)
        try:
            tls.recv(1)  # until the client goes
        except OSError:
            pass

    thread, errors = _tls_peer_thread(certs, lsock, body)

    async def main():
        p = Collect(loop, 5)
        t, _ = await loop.create_connection(lambda: p, *lsock.getsockname(),
                                            ssl=certs.client(), server_hostname=HOST)
        assert await asyncio.wait_for(p.done, 10) == b"hello"
        t.write(b"!")
        exc = await asyncio.wait_for(p.lost, 10)
        assert isinstance(exc, ssl.SSLError), exc
        assert not errors, errors

    try:
        run(main())
    finally:
        thread.join(5)
        lsock.close()


def test_peer_resets_mid_handshake(loop, run):
    """The server reads the ClientHello and resets the connection: the
    connect fails with a connection error (no hang, no half-made transport)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)

    def server():
        conn, _ = lsock.accept()
        conn.recv(1024)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    thread = threading.Thread(target=server, daemon=True)
    thread.start()

    async def main():
        with pytest.raises((ConnectionError, ssl.SSLError)):
            await loop.create_connection(asyncio.Protocol, *lsock.getsockname(),
                                         ssl=ssl.create_default_context(),
                                         server_hostname=HOST)

    try:
        run(main())
    finally:
        thread.join(5)
        lsock.close()


# ---- load --------------------------------------------------------------------


@pytest.mark.parametrize("n", [
    100, pytest.param(1000, marks=pytest.mark.stress)])
def test_many_concurrent_connections(loop, run, certs, n):
    """n TLS connections open at once, each echoing its own checked data."""

    async def main():
        server, port, _ = await tls_server(loop, certs.server(), backlog=n)
        cctx = certs.client()

        async def one(i):
            data = pattern(4096 + i, seed=b"conn%d" % i)
            p = Collect(loop, len(data))
            t, _ = await loop.create_connection(lambda: p, "127.0.0.1", port, ssl=cctx,
                                                server_hostname=HOST)
            t.write(data)
            assert await asyncio.wait_for(p.done, 30) == data
            return t, p

        pairs = await asyncio.gather(*(one(i) for i in range(n)))
        for t, p in pairs:
            t.close()
        await asyncio.gather(*(asyncio.wait_for(p.lost, 30) for _, p in pairs))
        server.close()
        await server.wait_closed()

    run(main(), timeout=120)


@pytest.mark.parametrize("size", [
    32 * 1024 * 1024, pytest.param(1024 * 1024 * 1024, marks=pytest.mark.stress)])
def test_large_transfer_each_way(loop, run, certs, size):
    """size bytes each way through a TLS echo, checked by digest."""

    async def main():
        async def handle(reader, writer):
            while data := await reader.read(256 * 1024):
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=certs.server())
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=certs.client(),
                                                       server_hostname=HOST)
        block = pattern(1024 * 1024)
        sent, got = hashlib.sha256(), hashlib.sha256()

        async def send():
            for i in range(size // len(block)):
                chunk = block[i % 7:] + block[:i % 7]
                sent.update(chunk)
                writer.write(chunk)
                await writer.drain()

        async def receive():
            n = 0
            while n < size:
                data = await reader.read(1024 * 1024)
                assert data, "EOF before all the data came back"
                got.update(data)
                n += len(data)

        await asyncio.gather(send(), receive())
        assert got.digest() == sent.digest()
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    run(main(), timeout=600 if size > 100 * 1024 * 1024 else 60)
