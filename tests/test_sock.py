"""loop.sock_* low-level socket operations (local sockets only)."""

import asyncio
import hashlib
import io
import os
import socket

import pytest

from netutil import recv_exactly
from netutil import recv_until_eof as recv_all



@pytest.fixture
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.setblocking(False)
    yield srv
    srv.close()


@pytest.fixture
def closing():
    """Register sockets to close at teardown."""
    socks = []
    yield socks.append
    for s in socks:
        s.close()


def nb_socket(family=socket.AF_INET, type_=socket.SOCK_STREAM):
    s = socket.socket(family, type_)
    s.setblocking(False)
    return s


async def tcp_pair(loop, listener, closing):
    """A connected (client, server-side) pair of non-blocking TCP sockets."""
    client = nb_socket()
    closing(client)
    accept = asyncio.ensure_future(loop.sock_accept(listener))
    await loop.sock_connect(client, listener.getsockname())
    conn, _addr = await accept
    closing(conn)
    conn.setblocking(False)
    return client, conn


def payload(n):
    block = hashlib.sha256(b"mtloop").digest() * 2048  # 64 KiB, not all-equal bytes
    return (block * (n // len(block) + 1))[:n]


# --------------------------------------------------------------------------
# recv / recv_into / sendall


def test_sock_recv_waits_for_data(loop, run, sockpair):
    a, b = sockpair

    async def main():
        task = asyncio.ensure_future(loop.sock_recv(a, 100))
        for _ in range(3):
            await asyncio.sleep(0)
        assert not task.done()
        b.send(b"hello")
        return await task

    assert run(main()) == b"hello"


def test_sock_recv_data_already_available(loop, run, sockpair):
    a, b = sockpair
    b.send(b"ready")
    assert run(loop.sock_recv(a, 100)) == b"ready"


def test_sock_recv_respects_nbytes(loop, run, sockpair):
    a, b = sockpair
    b.send(b"0123456789")
    assert run(loop.sock_recv(a, 4)) == b"0123"
    assert run(loop.sock_recv(a, 100)) == b"456789"


def test_sock_recv_eof(loop, run, sockpair):
    a, b = sockpair
    b.shutdown(socket.SHUT_WR)
    assert run(loop.sock_recv(a, 100)) == b""


def test_sock_recv_into(loop, run, sockpair):
    a, b = sockpair
    buf = bytearray(10)

    async def main():
        task = asyncio.ensure_future(loop.sock_recv_into(a, buf))
        await asyncio.sleep(0)
        b.send(b"abc")
        return await task

    assert run(main()) == 3
    assert buf[:3] == b"abc"
    view = memoryview(buf)[5:]
    b.send(b"0123456789")
    assert run(loop.sock_recv_into(a, view)) == 5
    assert bytes(buf) == b"abc\x00\x0001234"


def test_sock_sendall_small(loop, run, sockpair):
    a, b = sockpair
    assert run(loop.sock_sendall(a, b"small")) is None
    assert b.recv(100) == b"small"


def test_sock_sendall_bytearray_and_memoryview(loop, run, sockpair):
    a, b = sockpair
    run(loop.sock_sendall(a, bytearray(b"ba")))
    run(loop.sock_sendall(a, memoryview(b"--mv--")[2:4]))
    assert run(recv_exactly(loop, b, 4)) == b"bamv"


def test_sock_sendall_empty(loop, run, sockpair):
    a, _ = sockpair
    assert run(loop.sock_sendall(a, b"")) is None


def test_sock_sendall_large_socketpair(loop, run, sockpair):
    a, b = sockpair
    data = payload(8 * 1024 * 1024)
    assert len(data) > a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) * 4

    async def main():
        reader = asyncio.ensure_future(recv_exactly(loop, b, len(data)))
        await loop.sock_sendall(a, data)
        return await reader

    got = run(main(), timeout=30)
    assert len(got) == len(data)
    assert got == data


def test_sock_sendall_large_tcp(loop, run, listener, closing):
    data = payload(8 * 1024 * 1024)

    async def main():
        client, conn = await tcp_pair(loop, listener, closing)
        reader = asyncio.ensure_future(recv_all(loop, conn))
        await loop.sock_sendall(client, data)
        client.shutdown(socket.SHUT_WR)
        return await reader

    got = run(main(), timeout=30)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()


def test_sock_sendall_to_closed_peer(loop, run, sockpair):
    a, b = sockpair
    b.close()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        run(loop.sock_sendall(a, payload(4 * 1024 * 1024)))


def test_sock_recv_cancel_removes_reader(loop, run, sockpair):
    a, b = sockpair

    async def main():
        task = asyncio.ensure_future(loop.sock_recv(a, 100))
        for _ in range(3):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the fd is free again: a plain reader can be added and fires
        fut = loop.create_future()

        def on_read():
            loop.remove_reader(a)
            fut.set_result(a.recv(100))

        loop.add_reader(a, on_read)
        b.send(b"after cancel")
        return await fut

    assert run(main()) == b"after cancel"


def test_sock_recv_cancel_then_recv_again(loop, run, sockpair):
    a, b = sockpair

    async def main():
        task = asyncio.ensure_future(loop.sock_recv(a, 100))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        b.send(b"data")
        # the cancelled recv did not consume the data
        return await loop.sock_recv(a, 100)

    assert run(main()) == b"data"


def test_sock_sendall_cancel(loop, run, sockpair):
    a, b = sockpair

    async def main():
        task = asyncio.ensure_future(loop.sock_sendall(a, payload(16 * 1024 * 1024)))
        for _ in range(3):
            await asyncio.sleep(0)
        assert not task.done()  # the peer reads nothing: stuck on a full buffer
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # a writer can be registered again
        fut = loop.create_future()
        loop.add_writer(a, lambda: (loop.remove_writer(a), fut.set_result(True)))
        while True:  # make room
            try:
                if not b.recv(1 << 20):
                    break
            except BlockingIOError:
                break
        return await fut

    assert run(main()) is True


def test_sock_wait_for_timeout_recv(loop, run, sockpair):
    a, b = sockpair

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(loop.sock_recv(a, 10), 0.01)
        b.send(b"x")
        return await loop.sock_recv(a, 10)

    assert run(main()) == b"x"


# --------------------------------------------------------------------------
# connect / accept


def test_sock_connect_and_accept(loop, run, listener, closing):
    async def main():
        client = nb_socket()
        closing(client)
        accept = asyncio.ensure_future(loop.sock_accept(listener))
        assert await loop.sock_connect(client, listener.getsockname()) is None
        conn, addr = await accept
        closing(conn)
        assert addr == client.getsockname()
        assert conn.getpeername() == client.getsockname()
        conn.setblocking(False)
        await loop.sock_sendall(client, b"ping")
        assert await loop.sock_recv(conn, 10) == b"ping"
        await loop.sock_sendall(conn, b"pong")
        return await loop.sock_recv(client, 10)

    assert run(main()) == b"pong"


def test_sock_accept_returns_nonblocking_socket(loop, run, listener, closing):
    async def main():
        client = nb_socket()
        closing(client)
        accept = asyncio.ensure_future(loop.sock_accept(listener))
        await loop.sock_connect(client, listener.getsockname())
        conn, _ = await accept
        closing(conn)
        return conn

    conn = run(main())
    assert conn.gettimeout() == 0.0


def test_sock_accept_waits(loop, run, listener, closing):
    async def main():
        accept = asyncio.ensure_future(loop.sock_accept(listener))
        for _ in range(3):
            await asyncio.sleep(0)
        assert not accept.done()
        client = nb_socket()
        closing(client)
        await loop.sock_connect(client, listener.getsockname())
        conn, _ = await accept
        closing(conn)
        return True

    assert run(main())


def test_sock_accept_cancel(loop, run, listener, closing):
    async def main():
        accept = asyncio.ensure_future(loop.sock_accept(listener))
        await asyncio.sleep(0)
        accept.cancel()
        with pytest.raises(asyncio.CancelledError):
            await accept
        client, conn = await tcp_pair(loop, listener, closing)
        return True

    assert run(main())


def test_sock_connect_localhost_name(loop, run, listener, closing):
    port = listener.getsockname()[1]

    async def main():
        client = nb_socket(socket.AF_INET)
        closing(client)
        accept = asyncio.ensure_future(loop.sock_accept(listener))
        await loop.sock_connect(client, ("localhost", port))
        conn, _ = await accept
        closing(conn)
        return client.getpeername()

    assert run(main()) == ("127.0.0.1", port)


def test_sock_connect_refused(loop, run, closing):
    # A bound but not listening socket reserves the port and refuses connections.
    placeholder = socket.socket()
    closing(placeholder)
    placeholder.bind(("127.0.0.1", 0))
    client = nb_socket()
    closing(client)
    with pytest.raises(ConnectionRefusedError):
        run(loop.sock_connect(client, placeholder.getsockname()))


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_sock_connect_ipv6(loop, run, closing):
    srv = socket.socket(socket.AF_INET6)
    closing(srv)
    try:
        srv.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    srv.listen(1)
    srv.setblocking(False)

    async def main():
        client = nb_socket(socket.AF_INET6)
        closing(client)
        accept = asyncio.ensure_future(loop.sock_accept(srv))
        await loop.sock_connect(client, srv.getsockname()[:2])
        conn, _ = await accept
        closing(conn)
        return client.getpeername()[:2]

    assert run(main()) == srv.getsockname()[:2]


def test_sock_connect_unix(loop, run, tmp_path, closing):
    path = str(tmp_path / "sock")
    srv = socket.socket(socket.AF_UNIX)
    closing(srv)
    srv.bind(path)
    srv.listen(1)
    srv.setblocking(False)

    async def main():
        client = nb_socket(socket.AF_UNIX)
        closing(client)
        accept = asyncio.ensure_future(loop.sock_accept(srv))
        await loop.sock_connect(client, path)
        conn, _ = await accept
        closing(conn)
        conn.setblocking(False)
        await loop.sock_sendall(client, b"unix")
        return await loop.sock_recv(conn, 10)

    assert run(main()) == b"unix"


# --------------------------------------------------------------------------
# UDP


@pytest.fixture
def udp_pair(closing):
    a = nb_socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = nb_socket(socket.AF_INET, socket.SOCK_DGRAM)
    closing(a)
    closing(b)
    a.bind(("127.0.0.1", 0))
    b.bind(("127.0.0.1", 0))
    return a, b


@pytest.mark.uvloop_xfail("uvloop does not implement sock_sendto/sock_recvfrom/"
                          "sock_recvfrom_into (NotImplementedError)")
def test_sock_sendto_recvfrom(loop, run, udp_pair):
    a, b = udp_pair

    async def main():
        task = asyncio.ensure_future(loop.sock_recvfrom(b, 100))
        await asyncio.sleep(0)
        assert not task.done()
        sent = await loop.sock_sendto(a, b"datagram", b.getsockname())
        assert sent == len(b"datagram")
        return await task

    data, addr = run(main())
    assert data == b"datagram"
    assert addr == a.getsockname()


@pytest.mark.uvloop_xfail("uvloop does not implement sock_sendto/sock_recvfrom/"
                          "sock_recvfrom_into (NotImplementedError)")
def test_sock_recvfrom_into(loop, run, udp_pair):
    a, b = udp_pair
    buf = bytearray(100)

    async def main():
        task = asyncio.ensure_future(loop.sock_recvfrom_into(b, buf))
        await asyncio.sleep(0)
        await loop.sock_sendto(a, b"into", b.getsockname())
        return await task

    nbytes, addr = run(main())
    assert nbytes == 4
    assert buf[:4] == b"into"
    assert addr == a.getsockname()


@pytest.mark.uvloop_xfail("uvloop does not implement sock_sendto/sock_recvfrom/"
                          "sock_recvfrom_into (NotImplementedError)")
def test_sock_recvfrom_into_nbytes(loop, run, udp_pair):
    a, b = udp_pair
    buf = bytearray(100)
    a.sendto(b"0123456789", b.getsockname())
    nbytes, addr = run(loop.sock_recvfrom_into(b, buf, 4))
    assert nbytes == 4
    assert buf[:4] == b"0123"


@pytest.mark.uvloop_xfail("uvloop does not implement sock_sendto/sock_recvfrom/"
                          "sock_recvfrom_into (NotImplementedError)")
def test_sock_recvfrom_truncates_to_bufsize(loop, run, udp_pair):
    a, b = udp_pair
    a.sendto(b"0123456789", b.getsockname())
    data, _ = run(loop.sock_recvfrom(b, 4))
    assert data == b"0123"


@pytest.mark.uvloop_xfail("uvloop does not implement sock_sendto/sock_recvfrom/"
                          "sock_recvfrom_into (NotImplementedError)")
def test_udp_many_datagrams(loop, run, udp_pair):
    a, b = udp_pair

    async def main():
        for i in range(100):
            await loop.sock_sendto(a, str(i).encode(), b.getsockname())
        got = []
        for _ in range(100):
            data, _ = await loop.sock_recvfrom(b, 100)
            got.append(int(data))
        return got

    assert run(main()) == list(range(100))


def test_sock_recv_on_connected_udp(loop, run, udp_pair):
    a, b = udp_pair
    a.connect(b.getsockname())
    b.connect(a.getsockname())

    async def main():
        await loop.sock_sendall(a, b"connected")
        return await loop.sock_recv(b, 100)

    assert run(main()) == b"connected"


# --------------------------------------------------------------------------
# sendfile


@pytest.fixture
def data_file(tmp_path):
    data = payload(3 * 1024 * 1024 + 123)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    with open(path, "rb") as f:
        yield f, data


@pytest.mark.uvloop_xfail("uvloop does not implement sock_sendfile "
                          "(AbstractEventLoop's NotImplementedError)")
def test_sock_sendfile_regular_file(loop, run, listener, closing, data_file):
    f, data = data_file

    async def main():
        client, conn = await tcp_pair(loop, listener, closing)
        reader = asyncio.ensure_future(recv_all(loop, conn))
        sent = await loop.sock_sendfile(client, f)
        client.shutdown(socket.SHUT_WR)
        return sent, await reader

    sent, got = run(main(), timeout=30)
    assert sent == len(data)
    assert got == data
    # the file position is left after the sent data
    assert f.tell() == len(data)


@pytest.mark.uvloop_xfail("uvloop does not implement sock_sendfile "
                          "(AbstractEventLoop's NotImplementedError)")
def test_sock_sendfile_offset_and_count(loop, run, listener, closing, data_file):
    f, data = data_file

    async def main():
        client, conn = await tcp_pair(loop, listener, closing)
        reader = asyncio.ensure_future(recv_all(loop, conn))
        sent = await loop.sock_sendfile(client, f, 1000, 50000)
        client.shutdown(socket.SHUT_WR)
        return sent, await reader

    sent, got = run(main(), timeout=30)
    assert sent == 50000
    assert got == data[1000:51000]
    assert f.tell() == 51000


@pytest.mark.uvloop_xfail("uvloop does not implement sock_sendfile "
                          "(AbstractEventLoop's NotImplementedError)")
def test_sock_sendfile_native_on_unix_socketpair(loop, run, sockpair, data_file):
    """Native sendfile works on a connected AF_UNIX stream socket too."""
    f, data = data_file
    a, b = sockpair

    async def main():
        reader = asyncio.ensure_future(recv_exactly(loop, b, len(data)))
        sent = await loop.sock_sendfile(a, f, fallback=False)
        return sent, await reader

    sent, got = run(main(), timeout=30)
    assert sent == len(data)
    assert got == data
    assert f.tell() == len(data)


@pytest.mark.uvloop_xfail("uvloop does not implement sock_sendfile "
                          "(AbstractEventLoop's NotImplementedError)")
def test_sock_sendfile_fallback_for_non_regular_file(loop, run, listener, closing):
    data = payload(200_000)
    f = io.BytesIO(data)

    async def main():
        client, conn = await tcp_pair(loop, listener, closing)
        reader = asyncio.ensure_future(recv_all(loop, conn))
        sent = await loop.sock_sendfile(client, f)  # fallback=True: read()+sendall
        client.shutdown(socket.SHUT_WR)
        return sent, await reader

    sent, got = run(main(), timeout=30)
    assert sent == len(data)
    assert got == data


@pytest.mark.uvloop_xfail("uvloop does not implement sock_sendfile "
                          "(AbstractEventLoop's NotImplementedError)")
def test_sock_sendfile_no_fallback_not_available(loop, run, listener, closing):
    """Native sendfile is unavailable for a file without fileno()."""
    f = io.BytesIO(b"not a regular file")

    async def main():
        client, conn = await tcp_pair(loop, listener, closing)
        with pytest.raises(asyncio.SendfileNotAvailableError):
            await loop.sock_sendfile(client, f, fallback=False)
        return True

    assert run(main())
    assert issubclass(asyncio.SendfileNotAvailableError, RuntimeError)
    assert f.tell() == 0


@pytest.mark.uvloop_xfail("uvloop does not implement sock_sendfile "
                          "(AbstractEventLoop's NotImplementedError)")
def test_sock_sendfile_empty_file(loop, run, listener, closing, tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")

    async def main():
        client, conn = await tcp_pair(loop, listener, closing)
        with open(path, "rb") as f:
            return await loop.sock_sendfile(client, f)

    assert run(main()) == 0


@pytest.mark.uvloop_xfail("uvloop does not implement sock_sendfile "
                          "(AbstractEventLoop's NotImplementedError)")
def test_sock_sendfile_text_mode_file(loop, run, listener, closing, tmp_path):
    path = tmp_path / "text"
    path.write_text("text")

    async def main():
        client, conn = await tcp_pair(loop, listener, closing)
        with open(path, "r") as f:
            with pytest.raises(ValueError, match="binary mode"):
                await loop.sock_sendfile(client, f)
        return True

    assert run(main())


@pytest.mark.uvloop_xfail("uvloop does not implement sock_sendfile "
                          "(AbstractEventLoop's NotImplementedError)")
def test_sock_sendfile_udp_socket(loop, run, udp_pair, data_file):
    f, _ = data_file
    a, _ = udp_pair
    with pytest.raises(ValueError, match="only SOCK_STREAM type sockets are supported"):
        run(loop.sock_sendfile(a, f))


@pytest.mark.uvloop_xfail("uvloop does not implement sock_sendfile "
                          "(AbstractEventLoop's NotImplementedError)")
@pytest.mark.parametrize("offset,count,exc", [
    (-1, None, ValueError),
    (0, 0, ValueError),
    (0, -1, ValueError),
    ("0", None, TypeError),
    (0, "1", TypeError),
])
def test_sock_sendfile_bad_params(loop, run, listener, closing, data_file, offset, count, exc):
    f, _ = data_file

    async def main():
        client, conn = await tcp_pair(loop, listener, closing)
        with pytest.raises(exc):
            await loop.sock_sendfile(client, f, offset, count)
        return True

    assert run(main())


# --------------------------------------------------------------------------
# blocking sockets in debug mode


def _blocking_calls(loop, sock, peer_addr):
    buf = bytearray(10)
    return {
        "sock_recv": lambda: loop.sock_recv(sock, 10),
        "sock_recv_into": lambda: loop.sock_recv_into(sock, buf),
        "sock_sendall": lambda: loop.sock_sendall(sock, b"x"),
        "sock_connect": lambda: loop.sock_connect(sock, peer_addr),
        "sock_accept": lambda: loop.sock_accept(sock),
    }


@pytest.mark.parametrize("method", ["sock_recv", "sock_recv_into", "sock_sendall",
                                    "sock_connect", "sock_accept"])
def test_blocking_socket_in_debug_mode(loop, run, method, closing):
    loop.set_debug(True)
    sock = socket.socket()
    closing(sock)
    assert sock.gettimeout() is None  # blocking
    call = _blocking_calls(loop, sock, ("127.0.0.1", 9))[method]
    with pytest.raises(ValueError, match="the socket must be non-blocking"):
        run(call())


@pytest.mark.uvloop_xfail("uvloop does not implement sock_sendto/sock_recvfrom/"
                          "sock_recvfrom_into (NotImplementedError)")
@pytest.mark.parametrize("method", ["sock_sendto", "sock_recvfrom", "sock_recvfrom_into"])
def test_blocking_udp_socket_in_debug_mode(loop, run, method, closing):
    loop.set_debug(True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closing(sock)
    call = {
        "sock_sendto": lambda: loop.sock_sendto(sock, b"x", ("127.0.0.1", 9)),
        "sock_recvfrom": lambda: loop.sock_recvfrom(sock, 10),
        "sock_recvfrom_into": lambda: loop.sock_recvfrom_into(sock, bytearray(10)),
    }[method]
    with pytest.raises(ValueError, match="the socket must be non-blocking"):
        run(call())


@pytest.mark.uvloop_xfail("uvloop does not implement sock_sendfile "
                          "(AbstractEventLoop's NotImplementedError)")
def test_blocking_socket_sendfile_in_debug_mode(loop, run, closing, data_file):
    loop.set_debug(True)
    f, _ = data_file
    sock = socket.socket()
    closing(sock)
    with pytest.raises(ValueError, match="the socket must be non-blocking"):
        run(loop.sock_sendfile(sock, f))


def test_sock_ops_work_with_blocking_flag_off(loop, run, sockpair):
    """Sanity: non-blocking sockets are fine in debug mode."""
    loop.set_debug(True)
    a, b = sockpair
    b.send(b"ok")
    assert run(loop.sock_recv(a, 10)) == b"ok"


@pytest.mark.uvloop_xfail("uvloop's sock_* methods accept an ssl.SSLSocket instead of "
                          "raising TypeError('Socket cannot be of type SSLSocket')")
def test_sock_ssl_socket_rejected(loop, run, closing):
    ssl = pytest.importorskip("ssl")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    raw = nb_socket()
    closing(raw)
    sslsock = ctx.wrap_socket(raw, do_handshake_on_connect=False, server_hostname="localhost")
    closing(sslsock)
    with pytest.raises(TypeError, match="Socket cannot be of type SSLSocket"):
        run(loop.sock_recv(sslsock, 10))


@pytest.mark.stress
def test_sock_many_concurrent_connections(loop, run, listener, closing):
    async def transfer(client, conn, i):
        msg = payload(10000 + 997 * i)
        reader = asyncio.ensure_future(recv_all(loop, conn))
        await loop.sock_sendall(client, msg)
        client.shutdown(socket.SHUT_WR)
        return await reader == msg

    async def main():
        results = []
        for start in range(0, 500, 50):
            # pairs are made one at a time: concurrent sock_accept() calls on
            # one listening socket replace each other's reader in asyncio
            pairs = [await tcp_pair(loop, listener, closing) for _ in range(50)]
            results += await asyncio.gather(
                *(transfer(c, s, start + i) for i, (c, s) in enumerate(pairs)))
            for c, s in pairs:
                c.close()
                s.close()
        return results

    results = run(main(), timeout=60)
    assert len(results) == 500 and all(results)


def test_no_fd_leak_in_sock_ops(loop, run, sockpair):
    """Repeated recv/sendall do not accumulate readers/writers or fds."""
    a, b = sockpair
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None

    async def main():
        for i in range(200):
            await loop.sock_sendall(a, b"%d;" % i)
            await loop.sock_recv(b, 100)

    run(main())
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) <= before + 2
