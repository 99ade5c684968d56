"""Large transfers through stream transports, checked by SHA-256.

Default run: about 200 MB one way through Protocols (TCP and Unix), 200 MB
through streams, and 64 MB echoed both ways at once.  With --stress: 2 GB
one way through Protocols and streams.

Every chunk starts with its own sequence number, so loss, duplication or
reordering of chunks changes the digest.
"""

import asyncio
import hashlib
import random

import pytest

from netutil import TrackedHandler

CHUNK = 1024 * 1024
_BASE = random.Random(20240601).randbytes(CHUNK)


def chunk(i, size=CHUNK):
    """The i-th chunk of the stream: an 8-byte sequence number + random bytes."""
    return (i.to_bytes(8, "big") + _BASE[8:])[:size]


_DIGESTS = {}


def expected_digest(total):
    """SHA-256 of the first ``total`` bytes of the chunk stream."""
    if total not in _DIGESTS:
        h = hashlib.sha256()
        i = 0
        left = total
        while left:
            c = chunk(i, min(CHUNK, left))
            h.update(c)
            left -= len(c)
            i += 1
        _DIGESTS[total] = h.hexdigest()
    return _DIGESTS[total]


class Sink(asyncio.Protocol):
    """Hashes everything received; done resolves with (nbytes, digest) at EOF."""

    def __init__(self, loop):
        self.h = hashlib.sha256()
        self.n = 0
        self.done = loop.create_future()
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.h.update(data)
        self.n += len(data)

    def eof_received(self):
        if not self.done.done():
            self.done.set_result((self.n, self.h.hexdigest()))
        return False

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_exception(AssertionError(f"lost before EOF: {exc!r} after {self.n}"))
        if not self.lost.done():
            self.lost.set_result(exc)


class Source(asyncio.Protocol):
    """Writes ``total`` bytes of the chunk stream honouring pause/resume
    writing, then write_eof()."""

    def __init__(self, loop, total):
        self.loop = loop
        self.total = total
        self.sent = 0
        self.i = 0
        self.paused = False
        self.pauses = 0
        self.finished = loop.create_future()
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.loop.call_soon(self.pump)

    def pump(self):
        t = self.transport
        while not self.paused and self.sent < self.total:
            c = chunk(self.i, min(CHUNK, self.total - self.sent))
            self.i += 1
            self.sent += len(c)
            t.write(c)
        if self.sent >= self.total and not self.finished.done():
            t.write_eof()
            self.finished.set_result(self.sent)

    def pause_writing(self):
        self.paused = True
        self.pauses += 1

    def resume_writing(self):
        self.paused = False
        self.loop.call_soon(self.pump)

    def data_received(self, data):
        pass

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)


async def protocol_transfer(loop, family, tmp_path, total):
    sink = None

    def sink_factory():
        nonlocal sink
        sink = Sink(loop)
        return sink

    if family == "tcp":
        server = await loop.create_server(sink_factory, "127.0.0.1", 0)
        t, src = await loop.create_connection(
            lambda: Source(loop, total), *server.sockets[0].getsockname())
    else:
        path = str(tmp_path / "big.sock")
        server = await loop.create_unix_server(sink_factory, path)
        t, src = await loop.create_unix_connection(lambda: Source(loop, total), path)
    try:
        assert await src.finished == total
        n, digest = await sink.done
        assert n == total
        assert digest == expected_digest(total)
        assert src.pauses > 0, "a transfer this size must have hit the high-water mark"
        await asyncio.wait_for(sink.lost, 10)
        assert await asyncio.wait_for(src.lost, 10) is None
    finally:
        t.abort()
        server.close()
        await server.wait_closed()


async def stream_transfer(total):
    result = None

    async def handle(reader, writer):
        h = hashlib.sha256()
        n = 0
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            h.update(data)
            n += len(data)
        writer.write(b"%d %s\n" % (n, h.hexdigest().encode()))
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    tracked = TrackedHandler(handle)
    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
        sent = 0
        i = 0
        while sent < total:
            c = chunk(i, min(CHUNK, total - sent))
            i += 1
            sent += len(c)
            writer.write(c)
            await writer.drain()
        writer.write_eof()
        result = await reader.readline()
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
        await tracked.wait()
    n, digest = result.split()
    assert int(n) == total
    assert digest.decode() == expected_digest(total)


# --------------------------------------------------------------------------
# default run


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_protocol_transfer_200mb(loop, run, tmp_path, family):
    """200 MB one way, Protocol to Protocol with pause/resume_writing, arrive
    complete and in order (SHA-256), then EOF and connection_lost(None)."""
    run(protocol_transfer(loop, family, tmp_path, 200 * CHUNK + 12345), timeout=40)


def test_stream_transfer_200mb(loop, run):
    """200 MB one way through StreamWriter.write/drain and StreamReader.read,
    checked by SHA-256 on the receiving side."""
    run(stream_transfer(200 * CHUNK + 777), timeout=40)


def test_bidirectional_echo_64mb(loop, run):
    """64 MB sent by the client while an echo server sends it back at the same
    time: both directions under flow control at once; the echo matches."""
    total = 64 * CHUNK

    class EchoBack(asyncio.Protocol):
        """Echo with flow control: stop reading while our writes are paused."""

        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(data)

        def pause_writing(self):
            self.transport.pause_reading()

        def resume_writing(self):
            self.transport.resume_reading()

        def eof_received(self):
            # close() flushes the queued echo first, then the client sees EOF
            return False

    async def main():
        server = await loop.create_server(EchoBack, "127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())

            async def send():
                for i in range(total // CHUNK):
                    writer.write(chunk(i))
                    await writer.drain()
                writer.write_eof()

            async def receive():
                h = hashlib.sha256()
                n = 0
                while True:
                    data = await reader.read(CHUNK)
                    if not data:
                        return n, h.hexdigest()
                    h.update(data)
                    n += len(data)

            _, (n, digest) = await asyncio.gather(send(), receive())
            assert n == total
            assert digest == expected_digest(total)
            writer.close()
            await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()

    run(main(), timeout=40)


# --------------------------------------------------------------------------
# --stress


@pytest.mark.stress
@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_protocol_transfer_2gb(loop, run, tmp_path, family):
    """--stress: 2 GB one way, Protocol to Protocol, SHA-256 checked."""
    run(protocol_transfer(loop, family, tmp_path, 2048 * CHUNK + 1), timeout=300)


@pytest.mark.stress
def test_stream_transfer_2gb(loop, run):
    """--stress: 2 GB one way through streams, SHA-256 checked."""
    run(stream_transfer(2048 * CHUNK + 1), timeout=300)
