"""mtloop's opt-in spin before a wait (mtloop only: new_event_loop(spin_us=...)).

While the loop thread spins, everything a loop serves still arrives: I/O
thread completions (the spin's purpose), call_soon_threadsafe() from other
threads, add_reader() fds and timers (after the spin, which never outlasts
the next timer).  A loop that catches nothing in its spins stops spinning
for a while, so an idle loop sleeps; the counters in _mt_spin_stats() tell
(spins, spins that caught work, waits that skipped spinning).  Bad values
are refused as new_event_loop()'s other arguments are.  Nothing is timed.
"""

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import mtloop


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


def test_spinning_loop_serves_everything():
    loop = mtloop.new_event_loop(spin_us=200)

    async def main():
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
        for i in range(300):  # ping-pong: the answer comes while the loop spins
            writer.write(b"%05d" % i)
            assert await reader.readexactly(5) == b"%05d" % i
        # A call from another thread, an fd watched with add_reader(), a timer.
        got = loop.create_future()
        threading.Thread(target=loop.call_soon_threadsafe,
                         args=(got.set_result, "threadsafe")).start()
        assert await asyncio.wait_for(got, 5) == "threadsafe"
        a, b = socket.socketpair()
        readable = loop.create_future()
        loop.add_reader(a, lambda: readable.done() or readable.set_result(a.recv(10)))
        b.send(b"fd")
        assert await asyncio.wait_for(readable, 5) == b"fd"
        loop.remove_reader(a)
        a.close()
        b.close()
        await asyncio.sleep(0.01)
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    try:
        loop.run_until_complete(asyncio.wait_for(main(), 30))
    finally:
        loop.close()


def test_spin_catches_work_from_another_thread():
    """A thread hands the loop 300 callbacks, 0.2 ms apart: the loop, waiting
    with nothing else to do, spins (up to 2 ms) and catches them."""
    loop = mtloop.new_event_loop(io_threads=1, spin_us=2000)
    done = loop.create_future()
    got = []

    def producer():
        for i in range(300):
            time.sleep(0.0002)
            loop.call_soon_threadsafe(got.append, i)
        loop.call_soon_threadsafe(done.set_result, None)

    thread = threading.Thread(target=producer)
    try:
        thread.start()
        loop.run_until_complete(asyncio.wait_for(done, 30))
        spins, caught, skipped = loop._mt_spin_stats()
    finally:
        thread.join()
        loop.close()
    assert got == list(range(300))
    assert 0 < caught <= spins


def test_idle_loop_stops_spinning():
    """300 waits for timers, no I/O: after 8 spins in a row that catch
    nothing the loop skips 64 waits, then 128, ...: at most 24 spins."""
    loop = mtloop.new_event_loop(io_threads=1, spin_us=100)

    async def main():
        for _ in range(300):
            await asyncio.sleep(0.0002)

    try:
        loop.run_until_complete(main())
        spins, caught, skipped = loop._mt_spin_stats()
    finally:
        loop.close()
    assert spins <= 24 and skipped >= 300 - 24 - caught


def test_no_spin_by_default():
    loop = mtloop.new_event_loop()
    try:
        loop.run_until_complete(asyncio.sleep(0.001))
        assert loop._mt_spin_stats() == (0, 0, 0)
    finally:
        loop.close()


def test_inline_loop_does_not_spin():
    """With io_threads=0 the loop's I/O shows only in its own wait: a spin
    could catch only call_soon_threadsafe(), so the loop never spins."""
    loop = mtloop.new_event_loop(io_threads=0, spin_us=2000)

    async def main():
        for _ in range(50):
            await asyncio.sleep(0.0002)

    try:
        loop.run_until_complete(main())
        assert loop._mt_spin_stats() == (0, 0, 0)
    finally:
        loop.close()


@pytest.mark.parametrize("value,exc", [(-1, ValueError), (2e6, ValueError),
                                       (float("nan"), ValueError), ("10", TypeError),
                                       (True, TypeError)])
def test_bad_spin_us(value, exc):
    with pytest.raises(exc, match="spin_us"):
        mtloop.new_event_loop(spin_us=value)


def test_spin_from_environment(tmp_path):
    """$MTLOOP_SPIN_US sets the default; a value that is not a number from 0
    to 1,000,000 is ignored."""
    code = ("import asyncio, mtloop\n"
            "loop = mtloop.new_event_loop()\n"
            "async def main():\n"
            "    for _ in range(20):\n"
            "        await asyncio.sleep(0.0002)\n"
            "loop.run_until_complete(main())\n"
            "print(loop._mt_spin_stats()[0] > 0)\n"
            "loop.close()\n")
    for value, spins in (("50", "True"), ("bogus", "False"), ("-3", "False")):
        env = dict(os.environ, MTLOOP_SPIN_US=value, MTLOOP_IO_THREADS="1")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=60, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == spins, (value, out.stdout, out.stderr)
