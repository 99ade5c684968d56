"""Several mtloop loops in several threads share the one I/O runtime correctly.

A process has one pool of I/O threads and every mtloop loop hands its sockets
to it, so loops in different threads meet on the same I/O threads (with
``io_threads=1`` all of them on thread 0).  These tests check that the
runtime keeps the loops apart: every byte reaches the right loop, intact and
in order; closing one loop drops its own transports and listeners and no
others; the loops still running keep being served; and nothing hangs.

``test_loops_share_runtime[seed, io_threads]`` (three seeds; every loop with
``io_threads`` 1, or 2, or "mixed": the four loops with 1, 0 (inline: its
transports on its own thread, not in runtime_stats()), 3 and 2)

1. Four threads each run a loop made by ``mtloop.new_event_loop(io_threads=N)``
   under ``asyncio.Runner``.  Each loop serves an echo ``Protocol``
   (``create_server`` on 127.0.0.1, port 0; it pauses reading while its own
   writes are paused).
2. Each loop connects ``CONNS_PER_PAIR`` times to every server (the three
   others and its own): one ``asyncio.Protocol`` client, one
   ``asyncio.BufferedProtocol`` client (with receive buffers from 1 byte to
   256 KiB) and one streams client (``asyncio.open_connection``, with a 4 KiB
   reader limit) per ordered pair of loops; the protocol clients stop reading
   for a few milliseconds now and then, so that the echo backs up and both
   sides' flow control (pause/resume reading and writing) runs; one
   connection in three (every style in turn) has 4 KiB kernel socket buffers
   (set before ``loop.sock_connect()``; the transport takes the socket; the
   server shrinks its side's SO_SNDBUF when the header asks), so that little
   of the echo fits in the kernel.  Each connection sends a 16-byte header and a seeded
   pseudo-random stream of 1-2 MiB in chunks of 1 byte .. 64 KiB (log-uniform),
   passed as ``bytes``, ``bytearray`` or ``memoryview``; mutable buffers are
   scribbled over right after ``write()``.  The echo is checked byte for byte.
3. ``runtime_stats()`` then counts exactly the open transports and the four
   listeners.
4. The loops close one at a time, in a seeded random order (printed), while
   the loops still running stay connected to them.  The closing thread lets
   its main coroutine return with every transport open, ``Runner`` closes the
   loop, and the thread drops its objects and runs ``gc.collect()``: as with
   asyncio's own loop, ``loop.close()`` does not close open transports, their
   sockets close when the transports are collected.  Then, within
   ``LOST_TIMEOUT``, every endpoint in a surviving loop connected to the
   closed one must see EOF or a reset (``connection_lost`` for protocols,
   ``b""``/``ConnectionError`` from ``read()`` for streams); the survivors
   exchange another checked burst on every connection among themselves (the
   shared I/O threads still serve them correctly); and ``runtime_stats()``
   counts exactly the transports and listeners left.
5. At the end every I/O thread owns 0 transports and 0 listeners (as many as
   before the test, which is 0 when the file runs alone), polled with a
   bounded wait; no loop's exception handler was called except for a
   connection reset; no thread raised (a thread's exception fails the test
   with its traceback).

``test_loops_created_and_closed_repeatedly[io_threads]`` (same ``io_threads``)

``CHURN_ROUNDS`` rounds of four threads, each making a loop, serving an echo,
doing a short checked echo with its own server and its neighbour's (a
Protocol and a streams client each), then sending a burst without waiting for
it and closing its loop a few milliseconds later, while the I/O threads are
still moving that loop's bytes and the neighbours are closing theirs.  Each
round must finish in bounded time with no thread error, no exception handler
call other than a reset, and the I/O threads back to owning nothing.  This
variant uses ``loop.run_until_complete``.

All data is seeded and every wait is bounded; with the sanitizers preloaded
(``tools/sanitize.sh``) the bounds are multiplied by ``SLOW_FACTOR``.
"""

import asyncio
import concurrent.futures
import faulthandler
import gc
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
import traceback

import pytest

try:
    import mtloop
except BaseException:  # a broken import fails the tests, it does not skip them
    _IMPORT_ERROR = traceback.format_exc()
    mtloop = None
else:
    _IMPORT_ERROR = None

N_LOOPS = 4
CONNS_PER_PAIR = 3
STYLES = ("protocol", "buffered", "streams")
SEEDS = (1, 2, 3)
IO_THREADS = (1, 2, "mixed")  # "mixed": the four loops use MIXED_IO_THREADS
MIXED_IO_THREADS = (1, 0, 3, 2)  # 0: inline, the loop runs its own I/O
STREAM_MIN, STREAM_MAX = 1 << 20, 2 << 20  # bytes per connection (header excluded)
RECHECK_MIN, RECHECK_MAX = 16 << 10, 96 << 10  # survivors' burst after each close
MAX_CHUNK = 64 << 10
SMALL_SOCKET_BUFFER = 4096  # SO_RCVBUF/SO_SNDBUF of one connection in three
CHURN_ROUNDS = 20

_preload = os.environ.get("LD_PRELOAD", "")
SLOW_FACTOR = 4 if ("tsan" in _preload or "asan" in _preload) else 1
TRAFFIC_TIMEOUT = 20.0 * SLOW_FACTOR  # connect + echo phase of one loop
LOST_TIMEOUT = 5.0 * SLOW_FACTOR  # a closed loop's peers must see EOF/reset by then
STEP_TIMEOUT = 10.0 * SLOW_FACTOR  # any other single phase
STATS_TIMEOUT = 5.0 * SLOW_FACTOR  # runtime_stats() settling
HARD_LIMIT = 120 * SLOW_FACTOR  # last resort: dump every thread's stack and die

HEADER = struct.Struct("!8sBBBBI")  # magic, src loop, dst loop, k, flags, payload length
SMALL_BUFFERS = 1  # flag: the server shrinks its SO_SNDBUF too
MAGIC = b"MTMULTIL"
_JUNK = b"\xa5" * MAX_CHUNK
_RESET_ERRORS = (ConnectionResetError, BrokenPipeError)


class MultiloopHung(SystemExit):
    """Raised by the guard; a SystemExit, so that no loop internals swallow it."""

    __test__ = False


def _on_alarm(signum, frame):
    dump_threads(f"test still running after {HARD_LIMIT} s")
    # A second alarm, if even failing the test does not end it, ends the process.
    signal.signal(signal.SIGALRM, lambda *a: (dump_threads("still stuck"), os._exit(70)))
    signal.setitimer(signal.ITIMER_REAL, 30 * SLOW_FACTOR)
    raise MultiloopHung(f"test still running after {HARD_LIMIT} s")


@pytest.fixture(autouse=True)
def _guard():
    """Last resort, for a wedge the bounded waits miss: after HARD_LIMIT s a
    SIGALRM dumps every thread's stack and fails the test (the test thread
    only ever waits in interruptible, bounded waits).

    Not faulthandler.dump_traceback_later(): its watchdog thread, exiting at
    the end of each test, makes glibc free the cached stacks of the loop
    threads that exited before it, with their dynamic TLS (mtloop's buffer
    pool caches); glibc orders that through its own lock, which
    ThreadSanitizer does not see, so it reports a race in _dl_deallocate_tls.
    A timer signal needs no thread."""
    if mtloop is None:
        pytest.fail("import mtloop failed:\n" + _IMPORT_ERROR, pytrace=False)
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        yield
        return
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, HARD_LIMIT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------
# seeded data


def log_uniform_size(rng, top=MAX_CHUNK):
    """1 .. top bytes, log-uniform: as many tiny chunks as large ones."""
    return max(1, min(top, int(2 ** rng.uniform(0, top.bit_length() - 1))))


def make_plan(tag, lo, hi, header=None):
    """(stream, chunks, rng) for the connection named by ``tag``: a seeded
    pseudo-random stream of lo..hi bytes (after ``header``), cut into chunks of
    1 B .. 64 KiB, each sent as bytes, bytearray or memoryview."""
    rng = random.Random(f"mtloop-multiloop/{tag}")
    body = rng.randbytes(rng.randint(lo, hi))
    stream = (header or b"") + body
    chunks = []
    pos = 0
    while pos < len(stream):
        n = min(len(stream) - pos, log_uniform_size(rng))
        chunks.append((pos, n, rng.choice(("bytes", "bytearray", "memoryview"))))
        pos += n
    return stream, chunks, rng


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def write_chunk(write, stream, pos, n, kind):
    """write() one chunk; a mutable buffer is scribbled over afterwards, so a
    loop that kept it instead of copying it sends the wrong bytes."""
    piece = stream[pos:pos + n]
    if kind == "bytes":
        write(piece)
        return
    scratch = bytearray(piece)
    write(scratch if kind == "bytearray" else memoryview(scratch))
    scratch[:] = _JUNK[:n]


# --------------------------------------------------------------------------
# endpoints


class Endpoint:
    """One end of a connection, in the loop that owns it, as its survivors
    see it: ``lost`` completes when that end is finished (connection_lost,
    or EOF/error seen by a streams reader and the writer closed)."""

    def __init__(self, loop, owner, peer, name):
        self.owner = owner
        self.peer = peer
        self.name = name
        self.lost = loop.create_future()
        self.lost_at = None
        self.how = None

    def mark_lost(self, how):
        if not self.lost.done():
            self.lost_at = time.monotonic()
            self.how = how
            self.lost.set_result(how)


class Checker:
    """Checks received bytes against the expected stream, in order."""

    def __init__(self, loop, expected, name):
        self.expected = expected
        self.name = name
        self.pos = 0
        self.done = loop.create_future()

    def feed(self, data):
        if self.done.done():
            return
        end = self.pos + len(data)
        want = self.expected[self.pos:end]
        if want != data:
            at = self.pos + first_difference(want, data)
            self.fail(f"echo differs from what was sent at byte {at} of {len(self.expected)} "
                      f"(a read of {len(data)} bytes at {self.pos})")
            return
        self.pos = end
        if end == len(self.expected):
            self.done.set_result(end)

    def fail(self, why):
        if not self.done.done():
            self.done.set_exception(AssertionError(f"{self.name}: {why}"))


class ClientConn:
    """Client side of one checked echo connection (any style)."""

    style = None

    def __init__(self, worker, peer, k):
        self.worker = worker
        self.loop = worker.loop
        self.peer = peer
        self.k = k
        self.name = f"loop {worker.index} -> loop {peer} #{k} ({self.style})"
        self.ep = Endpoint(self.loop, worker.index, peer, self.name)
        self.checker = None
        self.saw_eof = False

    def expect(self, stream):
        assert self.checker is None or self.checker.done.done(), self.name
        self.checker = Checker(self.loop, stream, self.name)
        return self.checker.done

    def on_data(self, data):
        if self.checker is None or self.checker.done.done():
            self.worker.errors.append(f"{self.name}: {len(data)} bytes nobody sent arrived")
            return
        self.checker.feed(data)

    def on_eof(self):
        self.saw_eof = True
        if self.checker is not None:
            self.checker.fail(f"EOF after {self.checker.pos} of {len(self.checker.expected)} "
                              "bytes")

    def on_lost(self, exc):
        if self.checker is not None:
            self.checker.fail(f"connection lost ({exc!r}) after {self.checker.pos} bytes")
        self.ep.mark_lost("eof" if exc is None and self.saw_eof else repr(exc))

    async def exchange(self, stream, chunks, rng):
        """Send ``stream`` in ``chunks``, yielding now and then, and wait
        until its echo has come back intact."""
        done = self.expect(stream)
        for pos, n, kind in chunks:
            write_chunk(self.write, stream, pos, n, kind)
            if rng.random() < 0.02:
                self.stall(rng.uniform(0.001, 0.01))
            if self.must_drain() or rng.random() < 0.2:
                await self.drain()  # wait while paused (streams: drain())
                await asyncio.sleep(0)  # let the echo in meanwhile
        await done


class TransportConn(ClientConn):
    """A Protocol or BufferedProtocol client, honouring pause_writing()."""

    def __init__(self, worker, peer, k):
        super().__init__(worker, peer, k)
        self.transport = None
        self.resume = None
        self.stalled = False

    def stall(self, seconds):
        """Stop reading for a moment: the echo backs up into the server,
        which pauses reading in turn, and this client's writes pause."""
        if self.stalled or self.transport.is_closing():
            return
        self.stalled = True
        self.transport.pause_reading()
        self.loop.call_later(seconds, self._unstall)

    def _unstall(self):
        self.stalled = False
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def write(self, data):
        self.transport.write(data)

    def must_drain(self):
        return self.resume is not None

    async def drain(self):
        if self.resume is not None:
            await self.resume

    def on_pause(self):
        if self.resume is None:
            self.resume = self.loop.create_future()

    def on_resume(self):
        if self.resume is not None:
            self.resume.set_result(None)
            self.resume = None

    def on_lost(self, exc):
        self.on_resume()
        super().on_lost(exc)


class ProtocolConn(TransportConn):
    style = "protocol"

    def protocol(self):
        return _ClientProtocol(self)


class BufferedConn(TransportConn):
    style = "buffered"

    def protocol(self):
        return _ClientBufferedProtocol(self)


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, conn):
        self.conn = conn

    def connection_made(self, transport):
        self.conn.transport = transport

    def data_received(self, data):
        self.conn.on_data(data)

    def eof_received(self):
        self.conn.on_eof()  # returning None lets the transport close itself

    def connection_lost(self, exc):
        self.conn.on_lost(exc)

    def pause_writing(self):
        self.conn.on_pause()

    def resume_writing(self):
        self.conn.on_resume()


class _ClientBufferedProtocol(asyncio.BufferedProtocol, _ClientProtocol):
    SIZES = (1, 7, 1000, 4096, 65536, 256 << 10)

    def __init__(self, conn):
        super().__init__(conn)
        self.buf = bytearray(max(self.SIZES))
        self.view = memoryview(self.buf)
        self.turn = 0

    def get_buffer(self, sizehint):
        self.turn += 1
        return self.view[:self.SIZES[self.turn % len(self.SIZES)]]

    def buffer_updated(self, nbytes):
        self.conn.on_data(bytes(self.view[:nbytes]))

    def eof_received(self):  # asyncio.BufferedProtocol's would come first
        return _ClientProtocol.eof_received(self)


class StreamsConn(ClientConn):
    """A streams client: one reader task for the life of the connection."""

    style = "streams"

    def __init__(self, worker, peer, k, reader, writer):
        super().__init__(worker, peer, k)
        self.reader = reader
        self.writer = writer
        self.task = self.loop.create_task(self._read_all())

    def write(self, data):
        self.writer.write(data)

    def stall(self, seconds):
        pass  # the small reader limit makes the streams pause reading often

    def must_drain(self):
        return False

    async def drain(self):
        await self.writer.drain()

    async def _read_all(self):
        exc = None
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    self.on_eof()
                    break
                self.on_data(data)
        except ConnectionError as e:
            exc = e
        # A CancelledError (the loop's own close) leaves the connection open.
        self.writer.close()
        try:
            async with asyncio.timeout(LOST_TIMEOUT):
                await self.writer.wait_closed()
        except ConnectionError:
            pass
        except TimeoutError:
            self.worker.errors.append(f"{self.name}: wait_closed() did not return")
        self.on_lost(exc)


async def open_client(worker, style, peer, k, port, small_buffers=False):
    """Connect a client of ``style``.  With ``small_buffers`` the socket's
    kernel buffers are a few KiB (set before connecting, through
    loop.sock_connect()), so that the kernel holds little and the echo backs
    up into both sides' flow control."""
    loop = worker.loop
    where = {"host": "127.0.0.1", "port": port}
    if small_buffers:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_SOCKET_BUFFER)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        where = {"sock": sock}
    if style == "streams":
        # A small limit: the stream pauses and resumes reading all the time.
        reader, writer = await asyncio.open_connection(limit=4096, **where)
        return StreamsConn(worker, peer, k, reader, writer)
    conn = (ProtocolConn if style == "protocol" else BufferedConn)(worker, peer, k)
    await loop.create_connection(conn.protocol, **where)
    return conn


class EchoServer(asyncio.Protocol):
    """Echoes everything; reads the header to learn which loop the client is
    in; stops reading while its own writes are paused."""

    def __init__(self, worker):
        self.worker = worker
        self.transport = None
        self.head = b""
        self.ep = None

    def connection_made(self, transport):
        self.transport = transport
        self.worker.server_conns.append(self)

    def data_received(self, data):
        self.transport.write(data)
        if self.ep is None:
            self.head += data[:HEADER.size - len(self.head)]
            if len(self.head) == HEADER.size:
                magic, src, dst, k, flags, _ = HEADER.unpack(self.head)
                if magic != MAGIC or dst != self.worker.index:
                    self.worker.errors.append(f"loop {self.worker.index}'s server got the "
                                              f"header {self.head!r}")
                    return
                if flags & SMALL_BUFFERS:
                    self.transport.get_extra_info("socket").setsockopt(
                        socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_SOCKET_BUFFER)
                name = f"loop {self.worker.index} <- loop {src} #{k} (server)"
                self.ep = Endpoint(self.worker.loop, self.worker.index, src, name)
                self.worker.endpoints.append(self.ep)

    def eof_received(self):
        return False  # close

    def connection_lost(self, exc):
        if self.ep is not None:
            self.ep.mark_lost("eof" if exc is None else repr(exc))

    def pause_writing(self):
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self):
        if not self.transport.is_closing():
            self.transport.resume_reading()


# --------------------------------------------------------------------------
# one loop in one thread


class Worker:
    """A thread running one mtloop loop under asyncio.Runner until told to
    stop; the test drives it with coroutines sent by
    run_coroutine_threadsafe()."""

    def __init__(self, index, io_threads, seed):
        self.index = index
        self.io_threads = io_threads if io_threads != "mixed" else MIXED_IO_THREADS[index]
        self.seed = seed
        self.loop = None
        self.stop = None
        self.started = threading.Event()
        self.finished = threading.Event()
        self.error = None
        self.handler_calls = []  # (loop, message, exception repr, exception type)
        self.errors = []  # protocol-level surprises
        self.clients = []
        self.endpoints = []  # every Endpoint of this loop: clients' and server's
        self.server_conns = []
        self.server = None
        self.closed_at = None  # loop.close() returned
        self.released_at = None  # objects dropped and collected
        self.thread = threading.Thread(target=self._thread_main, daemon=True,
                                       name=f"multiloop-{index}")

    # -- thread

    def _thread_main(self):
        try:
            loop = mtloop.new_event_loop(io_threads=self.io_threads)
            assert loop.io_threads == self.io_threads
            loop.set_exception_handler(self._on_exception)
            with asyncio.Runner(loop_factory=lambda: loop) as runner:
                runner.run(self._main())
            self.closed_at = time.monotonic()
            del runner, loop
            self._release()
            self.released_at = time.monotonic()
        except BaseException:
            self.error = traceback.format_exc()
        finally:
            self.finished.set()

    async def _main(self):
        self.loop = asyncio.get_running_loop()
        self.stop = self.loop.create_future()
        self.started.set()
        # Bounded: a test that never says stop still ends this thread.
        async with asyncio.timeout(HARD_LIMIT / 2):
            await self.stop
        # Returning leaves every transport and the server open: Runner
        # closes the loop under them.

    def _release(self):
        """Drop every object of the closed loop; their sockets close as the
        transports are collected."""
        self.clients.clear()
        self.endpoints.clear()
        self.server_conns.clear()
        self.server = None
        self.stop = None
        gc.collect()

    def _on_exception(self, loop, context):
        # Only text: keeping the exception would keep its frames, and the
        # transports in them, alive.
        exc = context.get("exception")
        self.handler_calls.append((self.index, str(context.get("message")), repr(exc),
                                   type(exc)))

    def request_stop(self):
        def stop():
            if self.stop is not None and not self.stop.done():
                self.stop.set_result(None)

        try:
            self.loop.call_soon_threadsafe(stop)
        except (RuntimeError, AttributeError):  # closed already / never started
            pass

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    # -- coroutines run on this worker's loop

    async def start_server(self):
        self.server = await self.loop.create_server(lambda: EchoServer(self), "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def connect_and_echo(self, ports):
        async def one(peer, k):
            style = STYLES[(self.index + peer + k) % len(STYLES)]
            small = k == 0
            conn = await open_client(self, style, peer, k, ports[peer], small_buffers=small)
            self.clients.append(conn)
            self.endpoints.append(conn.ep)
            body_tag = f"{self.seed}/{self.index}/{peer}/{k}"
            rng = random.Random(f"mtloop-multiloop/len/{body_tag}")
            n = rng.randint(STREAM_MIN, STREAM_MAX)
            stream, chunks, rng = make_plan(
                body_tag, n, n,
                HEADER.pack(MAGIC, self.index, peer, k, SMALL_BUFFERS if small else 0, n))
            await conn.exchange(stream, chunks, rng)
            return len(stream)

        async with asyncio.timeout(TRAFFIC_TIMEOUT):
            sizes = await asyncio.gather(*(one(peer, k) for peer in range(N_LOOPS)
                                           for k in range(CONNS_PER_PAIR)))
        return sum(sizes)

    async def inventory(self):
        """{peer: (clients, server endpoints)} of the connections still open."""
        out = {}
        for ep in self.endpoints:
            if not ep.lost.done():
                c, s = out.get(ep.peer, (0, 0))
                out[ep.peer] = (c + 1, s) if "(server)" not in ep.name else (c, s + 1)
        return out

    async def wait_peer_gone(self, peer):
        """Every endpoint of this loop connected to ``peer`` (just closed)
        must see EOF or a reset within LOST_TIMEOUT."""
        eps = [ep for ep in self.endpoints if ep.peer == peer]
        if len(eps) != 2 * CONNS_PER_PAIR:
            raise AssertionError(f"loop {self.index} has {len(eps)} endpoints with loop {peer}, "
                                 f"expected {2 * CONNS_PER_PAIR}")
        _, pending = await asyncio.wait([ep.lost for ep in eps], timeout=LOST_TIMEOUT)
        if pending:
            stuck = [ep.name for ep in eps if not ep.lost.done()]
            raise AssertionError(f"loop {peer} was closed, but {len(stuck)} of its peers in "
                                 f"loop {self.index} saw neither EOF nor a reset within "
                                 f"{LOST_TIMEOUT} s: {stuck}")
        return [(ep.name, ep.how, ep.lost_at) for ep in eps]

    async def recheck(self, survivors, step):
        """Another checked burst on every client connection to a survivor."""

        async def one(conn):
            stream, chunks, rng = make_plan(
                f"recheck/{self.seed}/{step}/{self.index}/{conn.peer}/{conn.k}",
                RECHECK_MIN, RECHECK_MAX)
            await conn.exchange(stream, chunks, rng)
            return len(stream)

        conns = [c for c in self.clients if c.peer in survivors]
        async with asyncio.timeout(STEP_TIMEOUT):
            return sum(await asyncio.gather(*(one(c) for c in conns)))


# --------------------------------------------------------------------------
# helpers for the test thread


def dump_threads(why):
    print(f"--- {why}: stacks of every thread ---", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


def results(pending, timeout, what):
    """Wait for the (worker, concurrent future) pairs, all within ``timeout``."""
    deadline = time.monotonic() + timeout
    out = []
    for w, fut in pending:
        try:
            out.append(fut.result(max(0.0, deadline - time.monotonic())))
        except concurrent.futures.TimeoutError:
            for _, f in pending:
                f.cancel()
            dump_threads(what)
            pytest.fail(f"{what}: loop {w.index} did not finish within {timeout} s")
    return out


def check_worker(w):
    if w.error is not None:
        pytest.fail(f"the thread of loop {w.index} raised:\n{w.error}", pytrace=False)
    if w.errors:
        pytest.fail(f"loop {w.index}: " + "; ".join(w.errors), pytrace=False)


def stat_counts():
    return {d["thread"]: (d["transports"], d["listeners"]) for d in mtloop.runtime_stats()}


def totals(counts):
    return (sum(t for t, _ in counts.values()), sum(l for _, l in counts.values()))


def wait_stats(want, timeout, what):
    """Poll runtime_stats() until ``want(counts)`` holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        counts = stat_counts()
        if want(counts):
            return counts
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: runtime_stats() (thread: (transports, listeners)) still "
                        f"{counts} after {timeout} s")
        time.sleep(0.01)


def back_to(baseline):
    """A predicate: every I/O thread owns what it owned before the test (0
    transports and 0 listeners when the file runs alone)."""
    def want(counts):
        return all(counts.get(t, (0, 0)) == baseline.get(t, (0, 0))
                   for t in set(counts) | set(baseline))
    return want


def check_handler_calls(calls):
    unexpected = [c for c in calls if not (isinstance(c[3], type)
                                           and issubclass(c[3], _RESET_ERRORS))]
    assert not unexpected, (
        "exception handler calls other than connection resets: "
        + "; ".join(f"loop {i}: {msg} ({exc})" for i, msg, exc, _ in unexpected))


def stop_all(workers):
    for w in workers:
        w.request_stop()
    stuck = []
    for w in workers:
        w.finished.wait(STEP_TIMEOUT)
        if w.thread.is_alive() and not w.finished.is_set():
            stuck.append(w.index)
    if stuck:
        dump_threads("threads that did not stop")
    return stuck


# --------------------------------------------------------------------------
# the tests


@pytest.mark.filterwarnings("ignore:unclosed transport:ResourceWarning")
@pytest.mark.filterwarnings("ignore:loop is closed:ResourceWarning")
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
@pytest.mark.parametrize("io_threads", IO_THREADS, ids=lambda n: f"io{n}")
@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_loops_share_runtime(seed, io_threads):
    t_start = time.monotonic()
    baseline = stat_counts()
    workers = [Worker(i, io_threads, seed) for i in range(N_LOOPS)]
    failed = True
    try:
        for w in workers:
            w.thread.start()
        for w in workers:
            if not w.started.wait(STEP_TIMEOUT):
                check_worker(w)
                pytest.fail(f"loop {w.index} did not start")

        ports = results([(w, w.submit(w.start_server())) for w in workers], STEP_TIMEOUT,
                        "create_server")
        sent = results([(w, w.submit(w.connect_and_echo(ports))) for w in workers],
                       TRAFFIC_TIMEOUT + STEP_TIMEOUT, "connect and echo")
        t_traffic = time.monotonic()
        for w in workers:
            check_worker(w)

        # Every connection is open: 2 transports each, one listener per loop;
        # the pool counts those of the loops with I/O threads.
        n_conns = N_LOOPS * N_LOOPS * CONNS_PER_PAIR
        base_t, base_l = totals(baseline)
        pooled = sum(1 for w in workers if w.io_threads)
        counts = wait_stats(
            lambda c: totals(c) == (base_t + 2 * CONNS_PER_PAIR * N_LOOPS * pooled,
                                    base_l + pooled),
            STATS_TIMEOUT, f"{n_conns} connections and {N_LOOPS} servers open")
        print(f"seed={seed} io_threads={io_threads}: {sum(sent)} bytes echoed on "
              f"{n_conns} connections in {t_traffic - t_start:.2f} s; runtime {counts}")
        for w, inv in zip(workers, results([(w, w.submit(w.inventory())) for w in workers],
                                           STEP_TIMEOUT, "inventory")):
            assert inv == {p: (CONNS_PER_PAIR, CONNS_PER_PAIR) for p in range(N_LOOPS)}, (
                f"loop {w.index}: open connections per peer (clients, server side): {inv}")

        order = random.Random(f"mtloop-multiloop/order/{seed}").sample(range(N_LOOPS), N_LOOPS)
        print(f"seed={seed}: loops close in the order {order}")
        alive = list(range(N_LOOPS))
        for step, victim in enumerate(order):
            w = workers[victim]
            alive.remove(victim)
            t0 = time.monotonic()
            w.request_stop()
            if not w.finished.wait(STEP_TIMEOUT):
                dump_threads(f"closing loop {victim}")
                pytest.fail(f"loop {victim} did not close within {STEP_TIMEOUT} s")
            w.thread.join(STEP_TIMEOUT)
            check_worker(w)
            gone = results([(workers[i], workers[i].submit(workers[i].wait_peer_gone(victim)))
                            for i in alive], LOST_TIMEOUT + STEP_TIMEOUT,
                           f"peers of closed loop {victim}")
            ends = [e for per_loop in gone for e in per_loop]
            hows = {}
            for _, how, _ in ends:
                hows[how] = hows.get(how, 0) + 1
            latest = max((at for _, _, at in ends), default=w.released_at)
            print(f"  step {step}: loop {victim} closed in {w.closed_at - t0:.3f} s, released "
                  f"in {w.released_at - w.closed_at:.3f} s; its {len(ends)} peers were done "
                  f"{latest - t0:.3f} s after the close began ({hows})")

            if alive:
                rechecked = results(
                    [(workers[i], workers[i].submit(workers[i].recheck(set(alive), step)))
                     for i in alive], 2 * STEP_TIMEOUT, f"survivors' echo after step {step}")
                for i in alive:
                    check_worker(workers[i])
                n = len(alive)
                pooled = sum(1 for i in alive if workers[i].io_threads)
                want = (base_t + 2 * CONNS_PER_PAIR * n * pooled, base_l + pooled)
                counts = wait_stats(lambda c: totals(c) == want, STATS_TIMEOUT,
                                    f"after loop {victim} closed, {n} loops left")
                print(f"    survivors {alive} re-echoed {sum(rechecked)} bytes; runtime {counts}")

        counts = wait_stats(back_to(baseline), STATS_TIMEOUT, "after every loop closed")
        print(f"  all closed; runtime {counts}; whole test {time.monotonic() - t_start:.2f} s")
        for w in workers:
            check_worker(w)
        check_handler_calls([c for w in workers for c in w.handler_calls])
        resets = sum(len(w.handler_calls) for w in workers)
        if resets:
            print(f"  exception handler: {resets} connection reset(s)")
        failed = False
    finally:
        stuck = stop_all(workers)
        if stuck and not failed:
            pytest.fail(f"threads of loops {stuck} did not finish")


class ChurnRound:
    """Shared state of one round of the churn test."""

    def __init__(self, n):
        self.n = n
        self.lock = threading.Lock()
        self.ports = [None] * n
        self.n_ports = 0
        self.n_echoed = 0
        self.ports_ready = threading.Event()
        self.echoed = threading.Event()
        self.abort = threading.Event()
        self.errors = []
        self.handler_calls = []

    def publish_port(self, i, port):
        with self.lock:
            self.ports[i] = port
            self.n_ports += 1
            if self.n_ports == self.n:
                self.ports_ready.set()

    def mark_echoed(self):
        with self.lock:
            self.n_echoed += 1
            if self.n_echoed == self.n:
                self.echoed.set()


async def wait_threading_event(ev, state, what):
    """Wait for a threading.Event without blocking the loop (the other loops
    need this one's server meanwhile)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STEP_TIMEOUT
    while not ev.is_set():
        if state.abort.is_set():
            raise RuntimeError(f"{what}: another thread of the round failed")
        if loop.time() > deadline:
            raise TimeoutError(f"{what}: not within {STEP_TIMEOUT} s")
        await asyncio.sleep(0.002)


class ChurnWorker:
    def __init__(self, index):
        self.index = index
        self.loop = None
        self.errors = []
        self.endpoints = []
        self.server_conns = []


async def churn_main(cw, state, seed, rnd):
    loop = cw.loop
    rng = random.Random(f"mtloop-multiloop/churn/{seed}/{rnd}/{cw.index}")
    server = await loop.create_server(lambda: EchoServer(cw), "127.0.0.1", 0)
    state.publish_port(cw.index, server.sockets[0].getsockname()[1])
    await wait_threading_event(state.ports_ready, state, "ports")

    conns = []
    for peer in (cw.index, (cw.index + 1) % state.n):
        for k, style in enumerate(("protocol", "streams")):
            conn = await open_client(cw, style, peer, k, state.ports[peer])
            conns.append(conn)
            n = log_uniform_size(rng, 256 << 10)
            stream, chunks, crng = make_plan(f"churn/{seed}/{rnd}/{cw.index}/{peer}/{k}", n, n,
                                             HEADER.pack(MAGIC, cw.index, peer, k, 0, n))
            await conn.exchange(stream, chunks, crng)
    state.mark_echoed()
    await wait_threading_event(state.echoed, state, "echo phase")

    # Close with bytes in flight both ways: bursts nobody waits for, then
    # the loop closes after a few milliseconds at most.
    for conn in conns:
        conn.checker = None
        conn.on_data = lambda data: None
        conn.write(rng.randbytes(log_uniform_size(rng, 512 << 10)))
    # The streams readers stop here (a task left pending would be reported
    # as destroyed); their connections stay open.
    tasks = [conn.task for conn in conns if conn.style == "streams"]
    for task in tasks:
        task.cancel()
    await asyncio.sleep(rng.choice((0, 0, 0.001, 0.003, 0.01)))
    await asyncio.gather(*tasks, return_exceptions=True)
    return server, conns  # kept alive until the loop is closed


def churn_thread(state, i, seed, rnd, io_threads):
    cw = ChurnWorker(i)
    try:
        n = io_threads if io_threads != "mixed" else MIXED_IO_THREADS[i]
        loop = mtloop.new_event_loop(io_threads=n)
        cw.loop = loop

        def on_exception(loop, context):
            exc = context.get("exception")
            state.handler_calls.append((i, str(context.get("message")), repr(exc), type(exc)))

        loop.set_exception_handler(on_exception)
        try:
            kept = loop.run_until_complete(
                asyncio.wait_for(churn_main(cw, state, seed, rnd), STEP_TIMEOUT * 2))
        finally:
            loop.close()
        del kept, loop
        cw.loop = None
        cw.endpoints.clear()
        cw.server_conns.clear()
        gc.collect()
        state.errors.extend(cw.errors)
    except BaseException:
        state.errors.append(f"thread {i}:\n{traceback.format_exc()}")
        state.abort.set()


@pytest.mark.filterwarnings("ignore:unclosed transport:ResourceWarning")
@pytest.mark.filterwarnings("ignore:loop is closed:ResourceWarning")
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
@pytest.mark.parametrize("io_threads", IO_THREADS, ids=lambda n: f"io{n}")
def test_loops_created_and_closed_repeatedly(io_threads):
    seed = 7
    t_start = time.monotonic()
    baseline = stat_counts()
    calls = []
    for rnd in range(CHURN_ROUNDS):
        state = ChurnRound(N_LOOPS)
        threads = [threading.Thread(target=churn_thread, daemon=True,
                                    args=(state, i, seed, rnd, io_threads),
                                    name=f"churn-{rnd}-{i}")
                   for i in range(N_LOOPS)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 3 * STEP_TIMEOUT
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            dump_threads(f"churn round {rnd}")
            pytest.fail(f"round {rnd}: threads {alive} did not finish")
        assert not state.errors, f"round {rnd}: " + "\n".join(state.errors)
        calls += state.handler_calls
        # Every loop of the round is closed: the I/O threads own nothing of it.
        wait_stats(back_to(baseline), STATS_TIMEOUT, f"after churn round {rnd}")
    check_handler_calls(calls)
    print(f"io_threads={io_threads}: {CHURN_ROUNDS} rounds in {time.monotonic() - t_start:.2f} s,"
          f" {len(calls)} connection reset(s) reported")
