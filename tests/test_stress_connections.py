"""Many concurrent connections, each echoing its own checked data.

Default run: 2,000 concurrent Protocol connections (client and server on the
loop under test) and 1,000 concurrent stream connections.  --stress: 10,000
concurrent connections served by the loop under test, the clients running
in a child process on the stock asyncio loop (so that neither process needs
more than ~10,000 file descriptors).

The soft RLIMIT_NOFILE is raised (up to the hard limit) for the test and
restored afterwards; the test is skipped, with the reason, if the hard limit
is too low.
"""

import asyncio
import os
import resource
import subprocess
import sys
import textwrap

import pytest

from netutil import TrackedHandler

DEFAULT_CONNECTIONS = 2000
STREAM_CONNECTIONS = 1000
STRESS_CONNECTIONS = 10_000


@pytest.fixture
def fd_limit():
    """fd_limit(n): make sure the soft RLIMIT_NOFILE allows n descriptors
    (skip if the hard limit does not); restored at teardown."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def ensure(n):
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.skip(f"needs {n} file descriptors, the hard RLIMIT_NOFILE is {hard}")
        if soft != resource.RLIM_INFINITY and soft < n:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))

    yield ensure
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def message(i):
    """The bytes client ``i`` sends: unique per client, 1-4 KiB long."""
    head = b"<client %06d>" % i
    return head * (1 + (i * 7919) % 256)


class EchoServerProtocol(asyncio.Protocol):
    def __init__(self, stats):
        self.stats = stats

    def connection_made(self, transport):
        self.transport = transport
        self.stats["made"] += 1
        self.stats["open"] += 1
        self.stats["peak"] = max(self.stats["peak"], self.stats["open"])

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        return False  # close once the client is done (after flushing the echo)

    def connection_lost(self, exc):
        self.stats["open"] -= 1
        self.stats["lost"].append(exc)


class GreetingEchoServerProtocol(EchoServerProtocol):
    """Says b"!" on connection_made, so a client knows it was accepted."""

    def connection_made(self, transport):
        super().connection_made(transport)
        transport.write(b"!")


class Client(asyncio.Protocol):
    def __init__(self, loop, msg):
        self.msg = msg
        self.buf = bytearray()
        self.echoed = loop.create_future()
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        if len(self.buf) >= len(self.msg) and not self.echoed.done():
            self.echoed.set_result(bytes(self.buf))

    def connection_lost(self, exc):
        if not self.echoed.done():
            self.echoed.set_exception(AssertionError(f"lost before the echo: {exc!r}"))
        self.lost.set_result(exc)


def new_stats():
    return {"made": 0, "open": 0, "peak": 0, "lost": []}


async def protocol_echo_many(loop, n):
    stats = new_stats()
    server = await loop.create_server(lambda: EchoServerProtocol(stats), "127.0.0.1", 0,
                                      backlog=4096)
    addr = server.sockets[0].getsockname()
    clients = []
    try:
        # open them all, in waves of at most 500 pending connects
        sem = asyncio.Semaphore(500)

        async def connect(i):
            async with sem:
                return await loop.create_connection(lambda: Client(loop, message(i)), *addr)

        pairs = await asyncio.gather(*(connect(i) for i in range(n)))
        clients = [p for _, p in pairs]
        # every connection is open at the same time
        await _until(lambda: stats["made"] == n, "all accepts")
        assert stats["open"] == n
        for i, (t, _) in enumerate(pairs):
            t.write(message(i))
        echoes = await asyncio.gather(*(c.echoed for c in clients))
        for i, got in enumerate(echoes):
            assert got == message(i), f"client {i} got someone else's or damaged data"
        for t, _ in pairs:
            t.write_eof()
        results = await asyncio.gather(*(c.lost for c in clients))
        assert all(r is None for r in results)
        await _until(lambda: len(stats["lost"]) == n, "server-side connection_lost")
        assert all(r is None for r in stats["lost"])
        assert stats["peak"] == n
    finally:
        for c in clients:
            if not c.lost.done():
                c.transport.abort()
        server.close()
        await server.wait_closed()


async def _until(pred, what, timeout=30):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_many_concurrent_protocol_connections(loop, run, fd_limit):
    """2,000 connections open at once on one loop (4,000 transports); each
    client's distinct 1-4 KiB message is echoed back exactly; all close
    cleanly (connection_lost(None) on both sides, nothing lost)."""
    fd_limit(2 * DEFAULT_CONNECTIONS + 256)
    run(protocol_echo_many(loop, DEFAULT_CONNECTIONS), timeout=40)


def test_many_concurrent_stream_connections(loop, run, fd_limit):
    """1,000 open_connection clients against start_server at once, each
    echoed its own message exactly."""
    n = STREAM_CONNECTIONS
    fd_limit(2 * n + 256)

    async def handle(reader, writer):
        data = await reader.read()
        writer.write(data)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def main():
        tracked = TrackedHandler(handle)
        server = await asyncio.start_server(tracked, "127.0.0.1", 0, backlog=4096)
        addr = server.sockets[0].getsockname()
        opened = asyncio.Event()
        count = 0

        async def client(i):
            nonlocal count
            reader, writer = await asyncio.open_connection(*addr)
            count += 1
            if count == n:
                opened.set()
            await opened.wait()  # all open at once before anyone talks
            writer.write(message(i))
            writer.write_eof()
            got = await reader.read()
            writer.close()
            await writer.wait_closed()
            return got == message(i)

        try:
            results = await asyncio.gather(*(client(i) for i in range(n)))
            assert all(results), f"{results.count(False)} clients got wrong data"
        finally:
            server.close()
            await server.wait_closed()
            await tracked.wait()

    run(main(), timeout=40)


CLIENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, resource, sys
    n, port = int(sys.argv[1]), int(sys.argv[2])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 512), hard))

    def message(i):
        head = b"<client %06d>" % i
        return head * (1 + (i * 7919) % 256)

    async def main():
        opened = asyncio.Event()
        sem = asyncio.Semaphore(500)
        count = 0

        async def client(i):
            nonlocal count
            async with sem:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert await reader.readexactly(1) == b"!"  # accepted
            count += 1
            if count == n:
                opened.set()
            await opened.wait()
            writer.write(message(i))
            writer.write_eof()
            got = await reader.read()
            writer.close()
            return got == message(i)

        results = await asyncio.gather(*(client(i) for i in range(n)))
        bad = results.count(False)
        print("OK" if not bad else f"BAD {bad}", flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.stress
def test_ten_thousand_connections(loop, run, fd_limit):
    """--stress: 10,000 concurrent connections served by the loop under test
    (clients in a child process on the stock loop): every one is accepted,
    all are open at the same time, each echo is exact, all close cleanly."""
    n = STRESS_CONNECTIONS
    fd_limit(n + 512)

    async def main():
        stats = new_stats()
        server = await loop.create_server(lambda: GreetingEchoServerProtocol(stats),
                                          "127.0.0.1", 0, backlog=4096)
        port = server.sockets[0].getsockname()[1]
        try:
            proc = await loop.run_in_executor(None, lambda: subprocess.run(
                [sys.executable, "-c", CLIENT_SCRIPT, str(n), str(port)],
                capture_output=True, timeout=240, env=dict(os.environ)))
            assert proc.returncode == 0, proc.stderr.decode()[-3000:]
            assert proc.stdout.decode().strip() == "OK", proc.stdout.decode()
            await _until(lambda: len(stats["lost"]) == n, "server-side connection_lost", 60)
            assert stats["made"] == n
            assert stats["peak"] == n
            assert all(r is None for r in stats["lost"])
        finally:
            server.close()
            await server.wait_closed()

    run(main(), timeout=280)


@pytest.mark.stress
def test_many_concurrent_protocol_connections_stress(loop, run, fd_limit):
    """--stress: the in-process protocol echo with as many connections as the
    fd limit allows, up to 10,000 (2 descriptors each)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = STRESS_CONNECTIONS if hard == resource.RLIM_INFINITY else min(
        STRESS_CONNECTIONS, (hard - 512) // 2)
    if n < 2 * DEFAULT_CONNECTIONS:
        pytest.skip(f"the hard RLIMIT_NOFILE ({hard}) allows only {n} in-process connections")
    fd_limit(2 * n + 256)
    run(protocol_echo_many(loop, n), timeout=280)
