"""asyncio streams (start_server / open_connection, StreamReader /
StreamWriter) unchanged on top of the loop's TCP transports.

The stream classes are asyncio's own; what these tests exercise is that the
loop's transports give them what they rely on: connection_made before data,
pause_reading/resume_reading for the reader's limit, pause_writing/
resume_writing for drain(), is_closing() and connection_lost for close and
errors, get_extra_info('sslcontext') None for plain TCP, write_eof.
"""

import asyncio
import socket
import sys

import pytest

from netutil import TrackedHandler, pattern, settle

PY312 = sys.version_info >= (3, 12)


async def start_echo_server(**kwargs):
    """A line/bulk echo server: echoes whatever it reads until EOF, then
    half-closes with write_eof and closes."""

    async def handle(reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        finally:
            writer.close()
            await writer.wait_closed()

    handle = TrackedHandler(handle)
    server = await asyncio.start_server(handle, "127.0.0.1", 0, **kwargs)
    return server, server.sockets[0].getsockname(), handle


def test_open_connection_echo(loop, run):
    """open_connection() to start_server(): readline, readexactly, read(n),
    readuntil; peername through writer.get_extra_info; then write_eof, the
    echo server's EOF makes read() return b'' and at_eof() True."""

    async def main():
        server, addr, handle = await start_echo_server()
        try:
            reader, writer = await asyncio.open_connection(*addr)
            assert writer.get_extra_info("peername") == addr
            assert writer.get_extra_info("sslcontext") is None
            assert writer.transport.get_extra_info("sockname") == writer.get_extra_info("sockname")
            writer.write(b"line one\nline two\n")
            assert await reader.readline() == b"line one\n"
            assert await reader.readline() == b"line two\n"
            writer.writelines([b"0123", b"456789"])
            assert await reader.readexactly(4) == b"0123"
            assert await reader.read(6) == b"456789"
            writer.write(b"abc|def|")
            await writer.drain()
            assert await reader.readuntil(b"|") == b"abc|"
            assert await reader.readuntil(b"|") == b"def|"
            assert not reader.at_eof()
            writer.write_eof()
            assert await reader.read() == b""
            assert reader.at_eof()
            writer.close()
            assert writer.is_closing()
            await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()
            await handle.wait()

    run(main())


def test_readexactly_incomplete(loop, run):
    """readexactly() hitting EOF early raises IncompleteReadError with the
    partial bytes and the expected count."""

    async def handle(reader, writer):
        writer.write(b"only five")
        writer.close()
        await writer.wait_closed()

    async def main():
        tracked = TrackedHandler(handle)
        server = await asyncio.start_server(tracked, "127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
            with pytest.raises(asyncio.IncompleteReadError) as info:
                await reader.readexactly(100)
            assert info.value.partial == b"only five"
            assert info.value.expected == 100
            assert reader.at_eof()
            writer.close()
            await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()
            await tracked.wait()

    run(main())


def test_readline_limit(loop, run):
    """A line longer than the reader's limit: readline() raises ValueError;
    small limits still let the stream work (the reader pauses the
    transport at 2 * limit and resumes it as it is drained)."""

    async def main():
        server, addr, handle = await start_echo_server()
        try:
            reader, writer = await asyncio.open_connection(*addr, limit=1024)
            writer.write(b"x" * 5000 + b"\n")
            with pytest.raises(ValueError):
                await reader.readline()
            writer.close()
            await writer.wait_closed()

            reader, writer = await asyncio.open_connection(*addr, limit=1024)
            data = pattern(1_000_000)
            writer.write(data)
            got = await reader.readexactly(len(data))
            assert got == data
            writer.close()
            await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()
            await handle.wait()

    run(main(), timeout=20)


def test_drain_waits_for_a_slow_reader(loop, run):
    """The server reads nothing for a while: the client's drain() after a
    large write stays pending; once the server reads, drain() returns and
    every byte arrives."""
    data = pattern(24 * 1024 * 1024)
    go = None
    received = None

    async def handle(reader, writer):
        await go.wait()
        received.set_result(await reader.readexactly(len(data)))
        writer.close()
        await writer.wait_closed()

    async def main():
        nonlocal go, received
        go = asyncio.Event()
        received = loop.create_future()
        tracked = TrackedHandler(handle)
        server = await asyncio.start_server(tracked, "127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
            writer.write(data)
            drain = asyncio.ensure_future(writer.drain())
            await settle(5)
            assert not drain.done(), "drain() returned while the peer was not reading"
            assert writer.transport.get_write_buffer_size() > 0
            go.set()
            await asyncio.wait_for(drain, 10)
            got = await asyncio.wait_for(received, 10)
            assert got == data
            writer.close()
            await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()
            await tracked.wait()

    run(main(), timeout=30)


def test_close_and_wait_closed(loop, run):
    """writer.close() + wait_closed(): the server side reads everything
    written before, then EOF; the closed writer's transport is closing."""
    got = None

    async def handle(reader, writer):
        got.set_result(await reader.read())
        writer.close()
        await writer.wait_closed()

    async def main():
        nonlocal got
        got = loop.create_future()
        tracked = TrackedHandler(handle)
        server = await asyncio.start_server(tracked, "127.0.0.1", 0)
        try:
            _, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
            writer.write(b"last message")
            writer.close()
            assert writer.is_closing()
            await asyncio.wait_for(writer.wait_closed(), 5)
            assert await asyncio.wait_for(got, 5) == b"last message"
            assert writer.transport.is_closing()
        finally:
            server.close()
            await server.wait_closed()
            await tracked.wait()

    run(main())


def test_half_close_write_eof(loop, run):
    """Client write_eof(): the server's read() returns the request then EOF;
    the server can still answer and the client reads the answer and EOF."""

    async def handle(reader, writer):
        request = await reader.read()
        writer.write(b"got %d bytes" % len(request))
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def main():
        tracked = TrackedHandler(handle)
        server = await asyncio.start_server(tracked, "127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
            writer.write(b"x" * 12345)
            assert writer.can_write_eof()
            writer.write_eof()
            assert await reader.read() == b"got 12345 bytes"
            assert reader.at_eof()
            writer.close()
            await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()
            await tracked.wait()

    run(main())


def test_writing_to_a_closed_peer_raises(loop, run):
    """The peer has closed; the client read its EOF (the stream keeps the
    transport half-open).  write() itself never raises, but the writes that
    hit the reset connection end it, and drain() then raises the connection
    error (BrokenPipeError or ConnectionResetError)."""

    async def handle(reader, writer):
        writer.close()
        await writer.wait_closed()

    async def main():
        tracked = TrackedHandler(handle)
        server = await asyncio.start_server(tracked, "127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
            assert await reader.read() == b""
            assert not writer.transport.is_closing(), "EOF must leave the stream half-open"
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                for _ in range(200):
                    writer.write(b"into the void")
                    await writer.drain()
                    await asyncio.sleep(0.005)
            assert writer.transport.is_closing()
            writer.close()
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()
            await tracked.wait()

    run(main())


def test_reader_sees_reset(loop, run):
    """The peer resets the connection (SO_LINGER 0): a pending read() raises
    ConnectionResetError."""
    import struct

    async def main():
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        lsock.setblocking(False)
        try:
            reader, writer = await asyncio.open_connection(*lsock.getsockname())
            peer, _ = await loop.sock_accept(lsock)
            pending = asyncio.ensure_future(reader.read(100))
            await settle(2)
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(pending, 5)
            writer.close()
            with pytest.raises(ConnectionResetError):
                await writer.wait_closed()
        finally:
            lsock.close()

    run(main())


def test_many_stream_clients(loop, run):
    """100 concurrent stream clients against one start_server each get their
    own bytes back."""

    async def client(addr, i):
        reader, writer = await asyncio.open_connection(*addr)
        msg = (b"stream client %03d;" % i) * 50
        writer.write(msg)
        writer.write_eof()
        got = await reader.read()
        writer.close()
        await writer.wait_closed()
        return got == msg

    async def main():
        server, addr, handle = await start_echo_server(backlog=256)
        try:
            results = await asyncio.gather(*(client(addr, i) for i in range(100)))
            assert all(results)
        finally:
            server.close()
            await server.wait_closed()
            await handle.wait()

    run(main(), timeout=30)


@pytest.mark.skipif(not PY312, reason="3.12+ reports exceptions of client_connected_cb")
def test_handler_exception_closes_connection(loop, run):
    """3.12+: a start_server handler raising is reported to the exception
    handler ('Unhandled exception in client_connected_cb') and its transport
    is closed: the client reads EOF."""

    class Boom(Exception):
        pass

    async def handle(reader, writer):
        await reader.readline()
        raise Boom("handler failed")

    async def main():
        calls = []
        loop.set_exception_handler(lambda lp, ctx: calls.append(ctx))
        tracked = TrackedHandler(handle)
        server = await asyncio.start_server(tracked, "127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
            writer.write(b"trigger\n")
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()
            await tracked.wait()
        boom = [c for c in calls if isinstance(c.get("exception"), Boom)]
        assert len(boom) == 1
        assert boom[0]["message"] == "Unhandled exception in client_connected_cb"

    run(main())


def test_start_server_serve_forever(loop, run):
    """start_server(start_serving=False) + serve_forever() in a task serves
    open_connection clients; cancelling it closes the server."""

    async def handle(reader, writer):
        writer.write((await reader.readline()).upper())
        writer.close()
        await writer.wait_closed()

    async def main():
        tracked = TrackedHandler(handle)
        server = await asyncio.start_server(tracked, "127.0.0.1", 0, start_serving=False)
        addr = server.sockets[0].getsockname()
        task = asyncio.ensure_future(server.serve_forever())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert server.is_serving()
        reader, writer = await asyncio.open_connection(*addr)
        writer.write(b"shout\n")
        assert await reader.read() == b"SHOUT\n"
        writer.close()
        await writer.wait_closed()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not server.is_serving()
        await tracked.wait()

    run(main())
