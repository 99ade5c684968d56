"""Unix stream sockets: create_unix_server, create_unix_connection,
start_unix_server and open_unix_connection.

Socket files live in pytest's tmp_path.  Transport behaviour common to TCP
and Unix (write, close, pause, ...) is in test_transports.py.
"""

import asyncio
import errno
import os
import socket
import stat
import sys
import uuid

import pytest

from netutil import Recorder, TrackedHandler, recv_exactly

PY313 = sys.version_info >= (3, 13)


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


async def unix_roundtrip(loop, path, payload=b"over unix"):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        await loop.sock_connect(s, path)
        await loop.sock_sendall(s, payload)
        return await recv_exactly(loop, s, len(payload))
    finally:
        s.close()


def is_socket_file(path):
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------
# server + connection


@pytest.mark.parametrize("as_path", [False, True], ids=["str", "pathlib"])
def test_unix_server_and_connection(loop, run, tmp_path, as_path):
    """create_unix_server(path) listens on a socket file (str or Path);
    create_unix_connection(path) reaches it; data is echoed; the server
    socket is AF_UNIX with the path as its name."""

    async def main():
        path = tmp_path / "srv.sock"
        arg = path if as_path else str(path)
        server = await loop.create_unix_server(Echo, arg)
        try:
            assert server.is_serving()
            (s,) = server.sockets
            assert s.family == socket.AF_UNIX
            assert s.getsockname() == str(path)
            assert is_socket_file(path)
            t, p = await loop.create_unix_connection(lambda: Recorder(loop), arg)
            t.write(b"hello unix")
            assert await p.wait_bytes(10) == b"hello unix"
            t.close()
            assert await asyncio.wait_for(p.lost, 5) is None
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_unix_extra_info(loop, run, tmp_path):
    """Unix transports: 'sockname'/'peername' are the path on the bound side
    and '' on the unbound client side; 'socket' is AF_UNIX; 'peercert' None."""

    async def main():
        path = str(tmp_path / "x.sock")
        made = loop.create_future()

        def factory():
            p = Recorder(loop)
            made.set_result(p)
            return p

        server = await loop.create_unix_server(factory, path)
        try:
            ct, cp = await loop.create_unix_connection(lambda: Recorder(loop), path)
            sp = await made
            st = await sp.made
            assert ct.get_extra_info("peername") == path
            assert ct.get_extra_info("sockname") == ""
            assert st.get_extra_info("sockname") == path
            assert st.get_extra_info("peername") == ""
            for t in (ct, st):
                assert t.get_extra_info("socket").family == socket.AF_UNIX
                assert t.get_extra_info("peercert") is None
                assert t.can_write_eof()
            ct.close()
            await asyncio.wait_for(sp.lost, 5)
            await asyncio.wait_for(cp.lost, 5)
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_unix_server_with_sock(loop, run, tmp_path):
    """create_unix_server(sock=) serves on a bound AF_UNIX socket."""

    async def main():
        path = str(tmp_path / "given.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        server = await loop.create_unix_server(Echo, sock=sock)
        try:
            assert server.sockets[0].getsockname() == path
            assert await unix_roundtrip(loop, path, b"given") == b"given"
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_unix_connection_with_sock(loop, run, tmp_path):
    """create_unix_connection(sock=) wraps a connected AF_UNIX socket."""

    async def main():
        path = str(tmp_path / "c.sock")
        server = await loop.create_unix_server(Echo, path)
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            t, p = await loop.create_unix_connection(lambda: Recorder(loop), sock=sock)
            assert t.get_extra_info("peername") == path
            t.write(b"via sock")
            assert await p.wait_bytes(8) == b"via sock"
            t.close()
            await asyncio.wait_for(p.lost, 5)
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_unix_socketpair_transport(loop, run):
    """create_unix_connection(sock=) accepts one end of a socketpair."""

    async def main():
        a, b = socket.socketpair()
        b.setblocking(False)
        try:
            t, p = await loop.create_unix_connection(lambda: Recorder(loop), sock=a)
            t.write(b"pair")
            assert await recv_exactly(loop, b, 4) == b"pair"
            b.close()
            exc = await asyncio.wait_for(p.lost, 5)
            assert exc is None
        finally:
            b.close()

    run(main())


@pytest.mark.uvloop_xfail("uvloop's create_unix_connection() fails with EINVAL for an "
                          "abstract-namespace name")
def test_unix_abstract_namespace(loop, run):
    """A Linux abstract-namespace address ('\\0name') works for server and
    connection and creates no file."""

    async def main():
        name = "\0mtloop-test-" + uuid.uuid4().hex
        server = await loop.create_unix_server(Echo, name)
        try:
            t, p = await loop.create_unix_connection(lambda: Recorder(loop), name)
            t.write(b"abstract")
            assert await p.wait_bytes(8) == b"abstract"
            t.close()
            await asyncio.wait_for(p.lost, 5)
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_unix_start_serving_false(loop, run, tmp_path):
    """start_serving=False binds (the file exists) but does not listen
    (connect refused) until start_serving()."""

    async def main():
        path = str(tmp_path / "late.sock")
        server = await loop.create_unix_server(Echo, path, start_serving=False)
        try:
            assert not server.is_serving()
            assert is_socket_file(path)
            with pytest.raises(ConnectionRefusedError):
                await unix_roundtrip(loop, path)
            await server.start_serving()
            assert server.is_serving()
            assert await unix_roundtrip(loop, path, b"now") == b"now"
        finally:
            server.close()
            await server.wait_closed()

    run(main())


# --------------------------------------------------------------------------
# the socket file


def test_unix_stale_socket_file_is_replaced(loop, run, tmp_path):
    """A socket file left behind by a dead server is removed and rebound."""

    async def main():
        path = str(tmp_path / "stale.sock")
        old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old.bind(path)
        old.close()
        assert is_socket_file(path)
        server = await loop.create_unix_server(Echo, path)
        try:
            assert await unix_roundtrip(loop, path, b"fresh") == b"fresh"
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_unix_path_used_by_regular_file(loop, run, tmp_path):
    """A regular file at the path is not removed: OSError with errno
    EADDRINUSE and the text "Address '<path>' is already in use"."""

    async def main():
        path = str(tmp_path / "file.sock")
        with open(path, "w") as f:
            f.write("not a socket")
        with pytest.raises(OSError) as info:
            await loop.create_unix_server(Echo, path)
        assert info.value.errno == errno.EADDRINUSE
        assert str(info.value) == f"[Errno {errno.EADDRINUSE}] Address {path!r} is already in use"
        with open(path) as f:
            assert f.read() == "not a socket"

    run(main())


def test_unix_path_in_missing_directory(loop, run, tmp_path):
    """A path in a directory that does not exist raises FileNotFoundError."""

    async def main():
        with pytest.raises(FileNotFoundError):
            await loop.create_unix_server(Echo, str(tmp_path / "nodir" / "s.sock"))

    run(main())


def test_unix_socket_file_after_close(loop, run, tmp_path):
    """Closing the server removes its socket file on 3.13+ (cleanup_socket
    defaults to True); before 3.13 the file stays."""

    async def main():
        path = str(tmp_path / "gone.sock")
        server = await loop.create_unix_server(Echo, path)
        assert is_socket_file(path)
        server.close()
        await server.wait_closed()
        if PY313:
            assert not os.path.exists(path)
        else:
            assert is_socket_file(path)

    run(main())


@pytest.mark.skipif(not PY313, reason="cleanup_socket= is new in Python 3.13")
def test_unix_cleanup_socket_false(loop, run, tmp_path):
    """cleanup_socket=False (3.13) leaves the socket file after close()."""

    async def main():
        path = str(tmp_path / "kept.sock")
        server = await loop.create_unix_server(Echo, path, cleanup_socket=False)
        server.close()
        await server.wait_closed()
        assert is_socket_file(path)

    run(main())


@pytest.mark.skipif(not PY313, reason="the socket file is cleaned up from Python 3.13 on")
def test_unix_cleanup_spares_a_replaced_file(loop, run, tmp_path):
    """3.13: cleanup removes the file only if it is still the server's
    (same inode): a file put in its place meanwhile is left alone; and a
    server on a given sock= has its file removed too."""

    async def main():
        path = str(tmp_path / "replaced.sock")
        server = await loop.create_unix_server(Echo, path)
        os.unlink(path)
        with open(path, "w") as f:
            f.write("someone else's")
        server.close()
        await server.wait_closed()
        assert os.path.exists(path)

        path2 = str(tmp_path / "given.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path2)
        server = await loop.create_unix_server(Echo, sock=sock)
        server.close()
        await server.wait_closed()
        assert not os.path.exists(path2)

    run(main())


# --------------------------------------------------------------------------
# errors


def test_unix_argument_errors(loop, run, tmp_path):
    """path and sock together, neither, or a non-AF_UNIX sock raise ValueError
    (asyncio's messages), for the server and the connection."""

    async def main():
        usock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        path = str(tmp_path / "e.sock")
        try:
            with pytest.raises(ValueError,
                               match="path and sock can not be specified at the same time"):
                await loop.create_unix_server(Echo, path, sock=usock)
            with pytest.raises(ValueError, match="path was not specified, and no sock specified"):
                await loop.create_unix_server(Echo)
            with pytest.raises(ValueError, match="A UNIX Domain Stream Socket was expected"):
                await loop.create_unix_server(Echo, sock=tsock)
            with pytest.raises(ValueError,
                               match="path and sock can not be specified at the same time"):
                await loop.create_unix_connection(Echo, path, sock=usock)
            with pytest.raises(ValueError, match="no path and sock were specified"):
                await loop.create_unix_connection(Echo)
            with pytest.raises(ValueError, match="A UNIX Domain Stream Socket was expected"):
                await loop.create_unix_connection(Echo, sock=tsock)
        finally:
            usock.close()
            tsock.close()

    run(main())


def test_unix_connection_errors(loop, run, tmp_path):
    """Connecting to a missing path raises FileNotFoundError; to a socket
    file nobody listens on, ConnectionRefusedError."""

    async def main():
        with pytest.raises(FileNotFoundError):
            await loop.create_unix_connection(Echo, str(tmp_path / "missing.sock"))
        path = str(tmp_path / "dead.sock")
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(path)
        dead.close()
        with pytest.raises(ConnectionRefusedError):
            await loop.create_unix_connection(Echo, path)

    run(main())


# --------------------------------------------------------------------------
# streams over Unix sockets


def test_start_unix_server_open_unix_connection(loop, run, tmp_path):
    """asyncio.start_unix_server / open_unix_connection: line echo with
    readline, half-close with write_eof, and wait_closed."""

    async def handle(reader, writer):
        while True:
            line = await reader.readline()
            if not line:
                break
            writer.write(line.upper())
            await writer.drain()
        writer.write(b"BYE\n")
        writer.close()
        await writer.wait_closed()

    async def main():
        path = str(tmp_path / "streams.sock")
        tracked = TrackedHandler(handle)
        server = await asyncio.start_unix_server(tracked, path)
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            for word in (b"alpha\n", b"beta\n", b"gamma\n"):
                writer.write(word)
                assert await reader.readline() == word.upper()
            assert writer.can_write_eof()
            writer.write_eof()
            assert await reader.readline() == b"BYE\n"
            assert await reader.read() == b""
            assert reader.at_eof()
            writer.close()
            await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()
            await tracked.wait()

    run(main())


def test_unix_many_clients(loop, run, tmp_path):
    """100 concurrent Unix clients all get their own bytes back."""

    async def main():
        path = str(tmp_path / "many.sock")
        server = await loop.create_unix_server(Echo, path, backlog=256)
        try:
            payloads = [b"unix client %03d|" % i * 20 for i in range(100)]
            got = await asyncio.gather(*(unix_roundtrip(loop, path, p) for p in payloads))
            assert got == payloads
        finally:
            server.close()
            await server.wait_closed()

    run(main(), timeout=30)


def test_unix_connection_eof_from_server(loop, run, tmp_path):
    """The server closes right after accepting: the client protocol gets
    eof_received then connection_lost(None)."""

    class Closer(asyncio.Protocol):
        def connection_made(self, transport):
            transport.write(b"short-lived")
            transport.close()

    async def main():
        path = str(tmp_path / "closer.sock")
        server = await loop.create_unix_server(Closer, path)
        try:
            t, p = await loop.create_unix_connection(lambda: Recorder(loop), path)
            assert await asyncio.wait_for(p.lost, 5) is None
            assert bytes(p.data) == b"short-lived"
            assert p.kinds()[0] == "made" and p.kinds()[-2:] == ["eof", "lost"]
        finally:
            server.close()
            await server.wait_closed()

    run(main())
