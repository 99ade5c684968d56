"""Pipe transports: loop.connect_read_pipe() and loop.connect_write_pipe().

Each test runs on the stock loop, uvloop and mtloop; what the protocol sees
(the order of its callbacks, the exception connection_lost() gets, the
pipe object's state) must be what the stock loop gives.  Pipes, FIFOs,
socket pairs and ptys are made by the tests; subprocesses are in
test_subprocess.py.
"""

import asyncio
import errno
import hashlib
import os
import pty
import socket
import threading

import pytest

from procutil import open_fds, run_on_new_thread

# Bigger than a pipe's default capacity (64 KiB), so writes queue.
BIG = 1024 * 1024


class Recorder(asyncio.Protocol):
    """Records what a pipe protocol is told, in order."""

    def __init__(self, loop):
        self.events = []
        self.data = bytearray()
        self.lost = loop.create_future()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.events.append("made")

    def data_received(self, data):
        if not self.events or self.events[-1] != "data":
            self.events.append("data")
        self.data += data

    def eof_received(self):
        self.events.append("eof")

    def pause_writing(self):
        self.events.append("pause")

    def resume_writing(self):
        self.events.append("resume")

    def connection_lost(self, exc):
        self.events.append(("lost", type(exc).__name__ if exc else None))
        if not self.lost.done():
            self.lost.set_result(exc)


def make_pipe():
    r, w = os.pipe()
    return open(r, "rb", buffering=0), open(w, "wb", buffering=0)


async def read_all(fd, loop, n=None):
    """Reads `fd` (blocking, in a thread) until EOF, or until n bytes."""
    def reader():
        out = bytearray()
        while n is None or len(out) < n:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            out += chunk
        return bytes(out)
    return await loop.run_in_executor(None, reader)


# ---- read pipes -------------------------------------------------------------


def test_read_pipe_data_then_eof(loop, run):
    rpipe, wpipe = make_pipe()

    async def main():
        proto = Recorder(loop)
        transport, p = await loop.connect_read_pipe(lambda: proto, rpipe)
        assert p is proto and proto.transport is transport
        assert transport.get_extra_info("pipe") is rpipe
        assert transport.is_reading() and not transport.is_closing()
        wpipe.write(b"one ")
        wpipe.write(b"two")
        wpipe.close()
        await proto.lost
        return transport, proto

    transport, proto = run(main())
    assert bytes(proto.data) == b"one two"
    assert proto.events == ["made", "data", "eof", ("lost", None)]
    assert transport.is_closing()
    assert rpipe.closed  # closed by the transport, once


@pytest.mark.uvloop_xfail("uvloop keeps a read pipe open when eof_received() returns True")
def test_read_pipe_eof_received_true_still_closes(loop, run):
    # The stock read pipe ignores eof_received()'s answer.
    rpipe, wpipe = make_pipe()

    class KeepOpen(Recorder):
        def eof_received(self):
            super().eof_received()
            return True

    async def main():
        proto = KeepOpen(loop)
        await loop.connect_read_pipe(lambda: proto, rpipe)
        wpipe.close()
        await asyncio.wait_for(proto.lost, 5)
        return proto

    proto = run(main())
    assert proto.events == ["made", "eof", ("lost", None)]


def test_read_pipe_close_and_abort_by_the_protocol(loop, run):
    rpipe, wpipe = make_pipe()

    async def main():
        proto = Recorder(loop)
        transport, _ = await loop.connect_read_pipe(lambda: proto, rpipe)
        transport.close()
        assert transport.is_closing() and not transport.is_reading()
        transport.close()  # twice is harmless
        await proto.lost
        return proto

    proto = run(main())
    wpipe.close()
    assert proto.events == ["made", ("lost", None)]
    assert rpipe.closed


def test_read_pipe_is_closed_once_connection_lost_ran(loop, run):
    # The writer sees the pipe closed (EPIPE) by the time the protocol
    # heard of the close, as with the stock loop.
    async def main():
        for _ in range(20):  # a race would show in some rounds
            r, w = make_pipe()
            proto = Recorder(loop)
            transport, _ = await loop.connect_read_pipe(lambda: proto, r)
            transport.close()
            await proto.lost
            with pytest.raises(BrokenPipeError):
                w.write(b"x")
            w.close()

    run(main())


def test_read_pipe_pause_and_resume(loop, run):
    rpipe, wpipe = make_pipe()

    async def main():
        proto = Recorder(loop)
        transport, _ = await loop.connect_read_pipe(lambda: proto, rpipe)
        transport.pause_reading()
        assert not transport.is_reading()
        wpipe.write(b"while paused")
        await asyncio.sleep(0.05)
        seen_while_paused = bytes(proto.data)
        transport.resume_reading()
        assert transport.is_reading()
        while len(proto.data) < len(b"while paused"):
            await asyncio.sleep(0.005)
        wpipe.close()
        await proto.lost
        return seen_while_paused, proto

    seen_while_paused, proto = run(main())
    assert seen_while_paused == b""
    assert bytes(proto.data) == b"while paused"


def test_read_pipe_large_stream_checksum(loop, run):
    rpipe, wpipe = make_pipe()
    payload = os.urandom(8 * BIG + 12345)

    async def main():
        proto = Recorder(loop)
        await loop.connect_read_pipe(lambda: proto, rpipe)

        def writer():
            with wpipe:
                wpipe.write(payload)
        t = threading.Thread(target=writer)
        t.start()
        await asyncio.wait_for(proto.lost, 20)
        t.join()
        return proto

    proto = run(main(), timeout=30)
    assert hashlib.sha256(proto.data).digest() == hashlib.sha256(payload).digest()


def test_read_pipe_from_socket_and_fifo(loop, run, tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    a, b = socket.socketpair()

    async def main():
        results = []
        # A FIFO's read end opens without a writer when non-blocking.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        fifo = open(fd, "rb", buffering=0)
        wfd = os.open(path, os.O_WRONLY)
        for pipe, send, end in ((fifo, lambda d: os.write(wfd, d), lambda: os.close(wfd)),
                                (a, b.sendall, b.close)):
            proto = Recorder(loop)
            await loop.connect_read_pipe(lambda: proto, pipe)
            send(b"through")
            end()
            await asyncio.wait_for(proto.lost, 5)
            results.append((bytes(proto.data), proto.events))
        return results

    for data, events in run(main()):
        assert data == b"through"
        assert events == ["made", "data", "eof", ("lost", None)]
    assert a.fileno() == -1  # the socket object was closed by the transport


@pytest.mark.uvloop_xfail("uvloop aborts the process (libuv assertion) on a regular file", run=False)
def test_read_pipe_rejects_a_regular_file(loop, run, tmp_path):
    path = tmp_path / "plain"
    path.write_bytes(b"x")

    async def main():
        with open(path, "rb") as f:
            with pytest.raises(ValueError, match="Pipe transport is for pipes/sockets only"):
                await loop.connect_read_pipe(asyncio.Protocol, f)
            assert not f.closed

    run(main())


def test_read_pty_until_the_other_side_closes(loop, run):
    # A pty's master reads EIO once the slave side is closed; asyncio ends
    # the transport then, without calling the exception handler.
    master, slave = pty.openpty()
    errors = []

    async def main():
        loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))
        proto = Recorder(loop)
        mpipe = open(master, "rb", buffering=0)
        await loop.connect_read_pipe(lambda: proto, mpipe)
        os.write(slave, b"from the slave\n")
        while b"slave" not in proto.data:
            await asyncio.sleep(0.005)
        os.close(slave)
        exc = await asyncio.wait_for(proto.lost, 5)
        return proto, exc

    proto, exc = run(main())
    assert b"from the slave" in proto.data
    assert isinstance(exc, OSError) and exc.errno == errno.EIO
    assert proto.events == ["made", "data", ("lost", "OSError")]
    assert errors == []


# ---- write pipes ------------------------------------------------------------


@pytest.mark.uvloop_xfail("uvloop's write pipe is not closing after write_eof()")
def test_write_pipe_write_then_write_eof(loop, run):
    rpipe, wpipe = make_pipe()

    async def main():
        proto = Recorder(loop)
        transport, _ = await loop.connect_write_pipe(lambda: proto, wpipe)
        assert transport.get_extra_info("pipe") is wpipe
        assert transport.can_write_eof()
        transport.write(b"a")
        transport.write(bytearray(b"b"))
        transport.write(memoryview(b"xcx")[1:2])
        transport.writelines([b"d", b"e"])
        transport.write(b"")
        transport.write_eof()
        assert transport.is_closing()
        transport.write(b"dropped after write_eof")  # no exception, as on the stock pipe
        data = await read_all(rpipe.fileno(), loop)
        await asyncio.wait_for(proto.lost, 5)
        return data, proto, transport

    data, proto, transport = run(main())
    rpipe.close()
    assert data == b"abcde"
    assert proto.events == ["made", ("lost", None)]
    assert wpipe.closed


def test_write_pipe_rejects_non_bytes(loop, run):
    rpipe, wpipe = make_pipe()

    async def main():
        transport, _ = await loop.connect_write_pipe(asyncio.Protocol, wpipe)
        # The stock transport asserts; any of these is an error, never data.
        with pytest.raises((TypeError, AssertionError)):
            transport.write("text")
        transport.close()
        return await read_all(rpipe.fileno(), loop)

    assert run(main()) == b""
    rpipe.close()


def test_write_pipe_large_with_flow_control(loop, run):
    rpipe, wpipe = make_pipe()
    payload = os.urandom(4 * BIG + 7)

    async def main():
        proto = Recorder(loop)
        transport, _ = await loop.connect_write_pipe(lambda: proto, wpipe)
        transport.set_write_buffer_limits(high=64 * 1024)
        for i in range(0, len(payload), 64 * 1024):
            transport.write(payload[i:i + 64 * 1024])
        assert transport.get_write_buffer_size() > 0  # nobody reads yet
        reading = asyncio.ensure_future(read_all(rpipe.fileno(), loop))
        transport.close()
        data = await asyncio.wait_for(reading, 20)
        await asyncio.wait_for(proto.lost, 5)
        return data, proto

    data, proto = run(main(), timeout=30)
    rpipe.close()
    assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()
    assert proto.events[0] == "made" and proto.events[-1] == ("lost", None)
    assert "pause" in proto.events
    assert proto.events.index("pause") < proto.events.index("resume")


@pytest.mark.uvloop_xfail("uvloop calls eof_received() on a write pipe whose reader closed")
def test_write_pipe_reader_closes_while_idle(loop, run):
    # The stock loop watches a pipe's write end for the read end going away.
    rpipe, wpipe = make_pipe()

    async def main():
        proto = Recorder(loop)
        await loop.connect_write_pipe(lambda: proto, wpipe)
        rpipe.close()
        return await asyncio.wait_for(proto.lost, 5), proto

    exc, proto = run(main())
    assert exc is None
    assert proto.events == ["made", ("lost", None)]
    assert wpipe.closed


def test_write_pipe_reader_closes_with_output_queued(loop, run):
    rpipe, wpipe = make_pipe()

    async def main():
        proto = Recorder(loop)
        transport, _ = await loop.connect_write_pipe(lambda: proto, wpipe)
        transport.write(b"x" * BIG)  # more than the pipe holds
        await asyncio.sleep(0.05)
        assert transport.get_write_buffer_size() > 0
        rpipe.close()
        return await asyncio.wait_for(proto.lost, 5)

    exc = run(main())
    assert isinstance(exc, BrokenPipeError)


@pytest.mark.uvloop_xfail("uvloop raises RuntimeError on a write after the pipe was lost")
def test_write_pipe_write_after_reader_closed(loop, run):
    rpipe, wpipe = make_pipe()
    rpipe.close()

    async def main():
        proto = Recorder(loop)
        transport, _ = await loop.connect_write_pipe(lambda: proto, wpipe)
        transport.write(b"into a broken pipe")
        exc = await asyncio.wait_for(proto.lost, 5)
        transport.write(b"after the loss")  # dropped, no exception
        return exc, proto

    exc, proto = run(main())
    # Whether the write or the read-side watch sees it first, the stock loop
    # reports a broken pipe or a plain close; either way the pipe is closed.
    assert exc is None or isinstance(exc, BrokenPipeError)
    assert proto.events[-1][0] == "lost"
    assert wpipe.closed


def test_write_pipe_abort_drops_output(loop, run):
    rpipe, wpipe = make_pipe()

    async def main():
        proto = Recorder(loop)
        transport, _ = await loop.connect_write_pipe(lambda: proto, wpipe)
        transport.write(b"y" * BIG)
        transport.abort()
        assert transport.is_closing()
        exc = await asyncio.wait_for(proto.lost, 5)
        data = await read_all(rpipe.fileno(), loop)
        return exc, data

    exc, data = run(main())
    rpipe.close()
    assert exc is None
    assert len(data) < BIG


def test_write_pipe_to_a_pty(loop, run):
    master, slave = pty.openpty()
    os.set_blocking(master, True)

    async def main():
        proto = Recorder(loop)
        spipe = open(slave, "wb", buffering=0)
        transport, _ = await loop.connect_write_pipe(lambda: proto, spipe)
        transport.write(b"to the master\n")
        data = await loop.run_in_executor(None, os.read, master, 1024)
        transport.close()
        await asyncio.wait_for(proto.lost, 5)
        return data, proto

    data, proto = run(main())
    os.close(master)
    assert b"to the master" in data
    assert proto.events == ["made", ("lost", None)]


@pytest.mark.uvloop_xfail("uvloop aborts the process (libuv assertion) on a regular file", run=False)
def test_write_pipe_rejects_a_regular_file(loop, run, tmp_path):
    path = tmp_path / "plain"

    async def main():
        with open(path, "wb") as f:
            with pytest.raises(ValueError, match="only for pipes, sockets and character devices"):
                await loop.connect_write_pipe(asyncio.Protocol, f)

    run(main())


# ---- both ends, streams, threads, descriptors -------------------------------


def test_pipe_pair_with_streams(loop, run):
    rpipe, wpipe = make_pipe()

    async def main():
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), rpipe)
        wtransport, wproto = await loop.connect_write_pipe(
            lambda: asyncio.streams.FlowControlMixin(loop=loop), wpipe)
        writer = asyncio.StreamWriter(wtransport, wproto, None, loop)
        lines = [f"line {i}\n".encode() for i in range(1000)]
        for line in lines:
            writer.write(line)
        await writer.drain()
        writer.close()
        got = [await reader.readline() for _ in lines]
        assert await reader.read() == b""
        return got == lines

    assert run(main())


def test_pipes_on_a_loop_in_another_thread(loop_factory):
    async def main():
        rpipe, wpipe = make_pipe()
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), rpipe)
        wt, _ = await loop.connect_write_pipe(asyncio.Protocol, wpipe)
        wt.write(b"from a thread")
        wt.close()
        return await reader.read()

    assert run_on_new_thread(loop_factory, main) == b"from a thread"


def test_pipe_transports_leak_no_fd(loop, run):
    async def main():
        for _ in range(20):
            rpipe, wpipe = make_pipe()
            proto = Recorder(loop)
            await loop.connect_read_pipe(lambda: proto, rpipe)
            wt, wp = await loop.connect_write_pipe(asyncio.Protocol, wpipe)
            wt.write(b"x")
            wt.close()
            await asyncio.wait_for(proto.lost, 5)
        await asyncio.sleep(0.05)  # the I/O threads let go of their copies

    run(main())  # the first round may open the loop's own descriptors
    before = open_fds()
    run(main())
    assert open_fds() == before


@pytest.mark.uvloop_xfail("uvloop's transports have no __del__ that warns")
def test_unclosed_pipe_transport_warns_and_closes_the_pipe(loop, run):
    rpipe, wpipe = make_pipe()

    async def main():
        transport, _ = await loop.connect_read_pipe(asyncio.Protocol, rpipe)
        return transport

    transport = run(main())
    with pytest.warns(ResourceWarning, match="unclosed transport"):
        transport.__del__()
    assert rpipe.closed
    wpipe.close()
