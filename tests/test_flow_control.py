"""Flow control on stream transports, both ways.

Writing: a peer that does not read makes the writer's protocol get
pause_writing() once its buffer passes the high-water mark, and
resume_writing() once the peer has drained it below the low-water mark.

Reading: a transport whose reading is paused, or whose loop thread is busy,
must not keep taking bytes off the socket without bound: the sender is
eventually blocked by the kernel, and every byte arrives after resuming.

Helpers (Endpoint, Recorder, ...) are shared with test_transports.py.
"""

import asyncio
import select
import socket
import threading

import pytest

from netutil import (
    BufRecorder,
    Endpoint,
    Recorder,
    pattern,
    recv_exactly,
    settle,
    until,
)

# A generous bound on what may sit in kernel buffers and loop-side buffers
# for one connection whose reader is paused or busy.  An implementation
# that keeps reading regardless reaches it within a second on loopback.
MEMORY_BOUND = 64 * 1024 * 1024


class FlowRecorder(Recorder):
    """Recorder that also notes the write buffer size at each pause/resume."""

    def __init__(self, loop, eof_result=None):
        super().__init__(loop, eof_result)
        self.sizes = []
        self.resumed = loop.create_future()

    def pause_writing(self):
        super().pause_writing()
        self.sizes.append(("pause", self.transport.get_write_buffer_size()))

    def resume_writing(self):
        super().resume_writing()
        self.sizes.append(("resume", self.transport.get_write_buffer_size()))
        if not self.resumed.done():
            self.resumed.set_result(None)


def assert_alternating(calls):
    """pause/resume strictly alternate, starting with a pause."""
    for i, c in enumerate(calls):
        assert c == ("pause" if i % 2 == 0 else "resume"), f"call {i} of {calls}"


# --------------------------------------------------------------------------
# writer side


async def fill_until_stuck(t, p, chunk):
    """Write ``chunk`` until the protocol is paused and stays paused with the
    buffer above the high-water mark, i.e. the kernel buffers are full too
    (an implementation that sends from another thread may pause and resume
    a few times while the kernel still takes data; and a kernel may take more
    once, about 90 ms after the first burst, with the peer still not reading,
    so stuck means 150 ms without a resume).  Returns bytes written."""
    high = t.get_write_buffer_limits()[1]
    written = 0
    while True:
        assert written < MEMORY_BOUND, f"still not stuck after writing {written} bytes"
        t.write(chunk)
        written += len(chunk)
        await asyncio.sleep(0)
        if p.paused and p.paused[-1] == "pause":
            await settle(15)
            if p.paused[-1] == "pause" and t.get_write_buffer_size() > high:
                return written


def test_pause_and_resume_writing(loop, run, endpoint_kind, tmp_path):
    """A peer that does not read: write() makes the protocol's pause_writing()
    run (buffer above the high-water mark at that time) and it stays paused;
    further writes grow get_write_buffer_size() by exactly their length and
    call nothing; resume_writing() runs only once the peer reads, with the
    buffer at or below the low-water mark; pause/resume alternate; all bytes
    arrive in order."""
    chunk = pattern(256 * 1024)

    async def main():
        async with Endpoint(loop, endpoint_kind, tmp_path, lambda: FlowRecorder(loop)) as ep:
            t, p = ep.transport, ep.protocol
            low, high = t.get_write_buffer_limits()
            written = await fill_until_stuck(t, p, chunk)
            size = t.get_write_buffer_size()
            assert size > high
            calls = len(p.paused)
            t.write(b"tail")
            written += 4
            assert t.get_write_buffer_size() == size + 4
            assert len(p.paused) == calls, "a write while paused called the protocol"
            await settle(5)
            assert len(p.paused) == calls, "resumed although the peer reads nothing"
            got = await recv_exactly(loop, ep.peer, written)
            assert got == chunk * ((written - 4) // len(chunk)) + b"tail"
            await until(lambda: t.get_write_buffer_size() == 0, "empty buffer")
            await until(lambda: p.paused[-1] == "resume", "the final resume_writing()")
            assert_alternating(p.paused)
            for kind, sz in p.sizes:
                if kind == "resume":
                    assert sz <= low
                else:
                    assert sz > high

    run(main(), timeout=30)


@pytest.mark.parametrize("limits", [None, (4096, 1024)], ids=["default-limits", "small-limits"])
def test_paused_protocol_implies_buffer_above_low_water(loop, run, endpoint_kind, tmp_path,
                                                        limits):
    """asyncio calls resume_writing() in the same step in which the buffer
    drops to the low-water mark, so no other callback ever sees a paused
    protocol with get_write_buffer_size() <= low.  Checked by sampling from
    a callback every loop iteration while a stuck writer drains."""
    chunk = pattern(256 * 1024)

    async def main():
        async with Endpoint(loop, endpoint_kind, tmp_path, lambda: FlowRecorder(loop)) as ep:
            t, p = ep.transport, ep.protocol
            if limits is not None:
                t.set_write_buffer_limits(*limits)
            low = t.get_write_buffer_limits()[0]
            written = await fill_until_stuck(t, p, chunk)
            bad = []
            stop = False

            def sample():
                if stop:
                    return
                if p.paused[-1] == "pause" and t.get_write_buffer_size() <= low:
                    bad.append((t.get_write_buffer_size(), list(p.paused)))
                loop.call_soon(sample)

            loop.call_soon(sample)
            await recv_exactly(loop, ep.peer, written)
            await until(lambda: t.get_write_buffer_size() == 0, "empty buffer")
            await until(lambda: p.paused[-1] == "resume", "the final resume_writing()")
            stop = True
            assert bad == [], f"protocol still paused at buffer sizes <= low ({low}): {bad[:3]}"

    run(main(), timeout=30)


def test_set_write_buffer_limits_pauses_immediately(loop, run, endpoint_kind, tmp_path):
    """Lowering the high-water mark below the current buffer size calls
    pause_writing() synchronously inside set_write_buffer_limits(); raising
    the limits back does not resume by itself, draining does."""

    async def main():
        async with Endpoint(loop, endpoint_kind, tmp_path, lambda: FlowRecorder(loop)) as ep:
            t, p = ep.transport, ep.protocol
            t.set_write_buffer_limits(high=256 * 1024 * 1024)
            data = pattern(16 * 1024 * 1024)
            t.write(data)
            await settle(3)
            assert t.get_write_buffer_size() > 1024, "precondition: output must be queued"
            assert p.paused == []
            t.set_write_buffer_limits(high=1024)
            assert p.paused == ["pause"]
            t.set_write_buffer_limits(high=256 * 1024 * 1024)
            assert p.paused == ["pause"]
            got = await recv_exactly(loop, ep.peer, len(data))
            assert got == data
            await asyncio.wait_for(p.resumed, 5)
            assert p.paused == ["pause", "resume"]

    run(main(), timeout=30)


def test_small_high_water_mark_alternates(loop, run, endpoint_kind, tmp_path):
    """With set_write_buffer_limits(high=4096, low=1024) and a writer that
    stops at pause_writing() and continues at resume_writing(), 8 MB go
    through; pause/resume strictly alternate.  As in asyncio, a write()
    that leaves the protocol paused leaves more than the low-water mark
    buffered (pause_writing is decided on what could not be sent at once),
    and once the buffer is seen empty the protocol has been resumed."""
    data = pattern(8 * 1024 * 1024)

    class Pump(FlowRecorder):
        def __init__(self, loop):
            super().__init__(loop)
            self.offset = 0
            self.done = loop.create_future()
            self.bad = []

        def pump(self):
            t = self.transport
            while self.offset < len(data) and not (self.paused and self.paused[-1] == "pause"):
                t.write(data[self.offset:self.offset + 65536])
                self.offset += 65536
                low = t.get_write_buffer_limits()[0]
                if self.paused and self.paused[-1] == "pause" and t.get_write_buffer_size() <= low:
                    self.bad.append((self.offset, t.get_write_buffer_size()))
            if self.offset >= len(data) and not self.done.done():
                self.done.set_result(None)

        def resume_writing(self):
            super().resume_writing()
            self.loop.call_soon(self.pump)

    async def main():
        async with Endpoint(loop, endpoint_kind, tmp_path, lambda: Pump(loop)) as ep:
            t, p = ep.transport, ep.protocol
            t.set_write_buffer_limits(high=4096, low=1024)
            reader = asyncio.ensure_future(recv_exactly(loop, ep.peer, len(data)))
            p.pump()
            await asyncio.wait_for(p.done, 20)
            got = await reader
            assert got == data
            await until(lambda: t.get_write_buffer_size() == 0, "empty buffer")
            assert p.paused[-1] == "resume", (
                "the write buffer is empty but the protocol is still paused")
            assert "pause" in p.paused
            assert_alternating(p.paused)
            assert p.bad == [], (
                f"write() left the protocol paused with <= low buffered "
                f"(offset, size): {p.bad[:5]} ({len(p.bad)} times)")

    run(main(), timeout=30)


@pytest.mark.parametrize("which", ["pause_writing", "resume_writing"])
def test_flow_control_callback_raising(loop, run, endpoint_kind, tmp_path, which):
    """An exception from pause_writing()/resume_writing() goes to the loop's
    exception handler as 'protocol.pause_writing() failed' /
    'protocol.resume_writing() failed' (with 'exception', 'transport',
    'protocol'); the transport stays open and all data still arrives."""
    data = pattern(16 * 1024 * 1024)

    class Boom(Exception):
        pass

    class Raising(FlowRecorder):
        def pause_writing(self):
            super().pause_writing()
            if which == "pause_writing":
                raise Boom(which)

        def resume_writing(self):
            super().resume_writing()
            if which == "resume_writing":
                raise Boom(which)

    async def main():
        calls = []
        loop.set_exception_handler(lambda lp, ctx: calls.append(ctx))
        async with Endpoint(loop, endpoint_kind, tmp_path, lambda: Raising(loop)) as ep:
            t, p = ep.transport, ep.protocol
            t.write(data)
            got = await recv_exactly(loop, ep.peer, len(data))
            assert got == data
            await until(lambda: "resume" in p.paused, "resume_writing()")
            assert not t.is_closing()
            relevant = [c for c in calls if isinstance(c.get("exception"), Boom)]
            assert relevant, "the exception handler was not called"
            ctx = relevant[0]
            assert ctx["message"] == f"protocol.{which}() failed"
            assert ctx["transport"] is t
            assert ctx["protocol"] is p
            t.write(b"still open")
            assert await recv_exactly(loop, ep.peer, 10) == b"still open"

    run(main(), timeout=30)


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_paused_transport_reader_pauses_transport_writer(loop, run, tmp_path, family):
    """Both ends on the loop: the server-side transport pauses reading; the
    client transport's protocol gets pause_writing(); after resume_reading()
    the client gets resume_writing() and the server receives every byte."""
    data = pattern(24 * 1024 * 1024)

    async def main():
        server_proto = loop.create_future()

        def factory():
            p = Recorder(loop)
            server_proto.set_result(p)
            return p

        path = str(tmp_path / "fc.sock")
        if family == "tcp":
            server = await loop.create_server(factory, "127.0.0.1", 0)
            ct, cp = await loop.create_connection(
                lambda: FlowRecorder(loop), *server.sockets[0].getsockname())
        else:
            server = await loop.create_unix_server(factory, path)
            ct, cp = await loop.create_unix_connection(lambda: FlowRecorder(loop), path)
        try:
            sp = await server_proto
            st = await sp.made
            st.pause_reading()
            written = 0
            chunk = 1024 * 1024
            high = ct.get_write_buffer_limits()[1]
            while True:
                assert written < len(data), "the writer never stayed paused"
                ct.write(data[written:written + chunk])
                written += chunk
                await asyncio.sleep(0.001)
                if cp.paused and cp.paused[-1] == "pause":
                    await settle(3)
                    if cp.paused[-1] == "pause" and ct.get_write_buffer_size() > high:
                        break
            calls = len(cp.paused)
            await settle(5)
            assert sp.kinds() == ["made"]
            assert len(cp.paused) == calls and cp.paused[-1] == "pause"
            st.resume_reading()
            ct.write(data[written:])
            got = await sp.wait_bytes(len(data))
            assert got == data
            await asyncio.wait_for(cp.resumed, 5)
            await until(lambda: cp.paused[-1] == "resume", "the final resume_writing()")
            assert_alternating(cp.paused)
        finally:
            ct.close()
            await asyncio.wait_for(cp.lost, 5)
            server.close()
            await server.wait_closed()

    run(main(), timeout=30)


# --------------------------------------------------------------------------
# reader side: bounded memory


async def flood_until_blocked(peer, chunk):
    """Sends `chunk` over and over from the non-blocking socket `peer` until
    it stays blocked (20 EAGAINs 10 ms apart); the bytes that went.  Fails
    the test past MEMORY_BOUND: the reader is not really paused."""
    sent = bytearray()
    stalls = 0
    while stalls < 20:
        if len(sent) >= MEMORY_BOUND:
            pytest.fail(f"the peer could send {len(sent)} bytes to a paused transport: "
                        "reading is not really paused (unbounded buffering)")
        try:
            n = peer.send(chunk)
        except BlockingIOError:
            stalls += 1
            await asyncio.sleep(0.01)
            continue
        stalls = 0
        sent += chunk[:n]
    return sent


def test_paused_reader_bounds_what_the_sender_can_send(loop, run, endpoint_kind, tmp_path):
    """A transport paused with pause_reading() stops taking bytes off the
    socket: a raw peer sending non-blocking is blocked (EAGAIN for good)
    after a bounded amount (kernel buffers plus whatever the transport
    buffered, far below 64 MB); no data_received arrives while paused, and
    after resume_reading() every accepted byte arrives intact."""
    chunk = pattern(1024 * 1024)

    async def main():
        async with Endpoint(loop, endpoint_kind, tmp_path) as ep:
            t, p = ep.transport, ep.protocol
            t.pause_reading()
            sent = await flood_until_blocked(ep.peer, chunk)
            assert p.kinds() == ["made"], "data_received while paused"
            t.resume_reading()
            got = await p.wait_bytes(len(sent))
            assert got == sent

    run(main(), timeout=30)


def test_paused_mid_stream_bounds_what_the_sender_can_send(loop, run, endpoint_kind, tmp_path):
    """pause_reading() from inside data_received while a raw peer floods:
    the bytes delivered before the pause plus what the sender can still push
    stay bounded; after resume_reading() all bytes arrive in order."""
    chunk = pattern(1024 * 1024)

    class Pauser(Recorder):
        def data_received(self, data):
            super().data_received(data)
            if self.transport.is_reading():
                self.transport.pause_reading()

    async def main():
        async with Endpoint(loop, endpoint_kind, tmp_path, lambda: Pauser(loop)) as ep:
            t, p = ep.transport, ep.protocol
            sent = await flood_until_blocked(ep.peer, chunk)
            assert not t.is_reading()
            delivered = len(p.data)
            assert 0 < delivered <= len(sent)
            assert p.kinds().count("data") == 1
            # now let it flow: re-pausing happens on every chunk, so keep resuming
            while len(p.data) < len(sent):
                t.resume_reading()
                await asyncio.sleep(0.001)
                assert not p.lost.done()
            assert bytes(p.data) == sent

    run(main(), timeout=30)


def test_buffered_protocol_paused_mid_stream(loop, run, endpoint_kind, tmp_path):
    """A BufferedProtocol that calls pause_reading() inside buffer_updated()
    while a raw peer floods gets no more buffer_updated() until it resumes,
    what the sender can push stays bounded, and after resume_reading() every
    byte arrives in order (with inline I/O the loop reads into the
    protocol's buffer itself: the pause must stop that read)."""
    chunk = pattern(1024 * 1024)

    class Pauser(BufRecorder):
        def buffer_updated(self, nbytes):
            super().buffer_updated(nbytes)
            if self.transport.is_reading():
                self.transport.pause_reading()

    async def main():
        async with Endpoint(loop, endpoint_kind, tmp_path, lambda: Pauser(loop, 65536)) as ep:
            t, p = ep.transport, ep.protocol
            sent = await flood_until_blocked(ep.peer, chunk)
            assert not t.is_reading()
            assert p.events.count("buffer_updated") == 1
            assert 0 < len(p.data) <= 65536
            while len(p.data) < len(sent):
                t.resume_reading()
                await asyncio.sleep(0.001)
                assert not p.lost.done()
            assert bytes(p.data) == sent

    run(main(), timeout=30)


@pytest.mark.parametrize("side", ["tcp-server", "unix-client"])
def test_busy_loop_bounds_buffering(loop, run, tmp_path, side):
    """While the loop thread is blocked inside data_received (the protocol is
    busy), a sender flooding the connection from another thread is
    eventually blocked by the kernel: the transport does not buffer without
    bound behind a busy loop.  Afterwards every byte arrives intact."""
    chunk = pattern(1024 * 1024)
    stalled = threading.Event()
    result = {}

    class Busy(Recorder):
        first = True

        def data_received(self, data):
            super().data_received(data)
            if self.first:
                self.first = False
                stalled.wait(20)  # block the loop thread until the sender stalls

    def sender(sock):
        sent = bytearray()
        try:
            while len(sent) < MEMORY_BOUND:
                _, w, _ = select.select([], [sock], [], 0.3)
                if not w:
                    break
                try:
                    n = sock.send(chunk)
                except BlockingIOError:
                    continue
                sent += chunk[:n]
        finally:
            result["sent"] = bytes(sent)
            stalled.set()

    async def main():
        async with Endpoint(loop, side, tmp_path, lambda: Busy(loop)) as ep:
            p = ep.protocol
            th = threading.Thread(target=sender, args=(ep.peer,))
            th.start()
            try:
                await until(lambda: stalled.is_set(), "sender to stop", timeout=25)
            finally:
                stalled.set()
                th.join(25)
            sent = result["sent"]
            assert len(sent) < MEMORY_BOUND, (
                f"the sender pushed {len(sent)} bytes while the loop was blocked: "
                "reads are not bounded by what the loop has consumed")
            got = await p.wait_bytes(len(sent))
            assert got == sent

    run(main(), timeout=40)


def test_peer_not_reading_blocks_only_the_writer(loop, run, tmp_path):
    """Two connections on one loop: one whose peer does not read (writer
    paused), one echoing normally.  The stuck one does not hold the other up."""

    async def main():
        async with Endpoint(loop, "tcp-server", tmp_path, lambda: FlowRecorder(loop)) as stuck, \
                Endpoint(loop, "tcp-client", tmp_path) as live:
            await fill_until_stuck(stuck.transport, stuck.protocol, pattern(1024 * 1024))
            calls = len(stuck.protocol.paused)
            for i in range(20):
                live.transport.write(b"ping %d\n" % i)
                got = await recv_exactly(loop, live.peer, len(b"ping %d\n" % i))
                assert got == b"ping %d\n" % i
                await loop.sock_sendall(live.peer, b"pong")
                await live.protocol.wait_bytes(4 * (i + 1))
            assert len(stuck.protocol.paused) == calls
            assert stuck.protocol.paused[-1] == "pause"

    run(main(), timeout=30)


def test_socket_send_buffer_is_not_the_limit(loop, run, endpoint_kind, tmp_path):
    """A single write() far larger than any kernel buffer is accepted whole
    (write never blocks and never raises), is reflected in
    get_write_buffer_size(), and reaches the peer intact."""
    data = pattern(48 * 1024 * 1024)

    async def main():
        async with Endpoint(loop, endpoint_kind, tmp_path, lambda: FlowRecorder(loop)) as ep:
            t, p = ep.transport, ep.protocol
            sock = t.get_extra_info("socket")
            assert len(data) > 4 * sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            t.write(data)
            assert t.get_write_buffer_size() > 0
            assert p.paused == ["pause"]
            got = await recv_exactly(loop, ep.peer, len(data))
            assert got == data
            await asyncio.wait_for(p.resumed, 5)

    run(main(), timeout=30)
