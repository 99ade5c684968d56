"""Transport writes across mtloop's write paths, against the reference loops.

mtloop sends a write in one of three ways: a small write on an idle
connection goes out from the loop thread at once (the I/O thread sleeps,
nothing earlier is pending); a large bytes object is sent by the
transport's I/O thread from the object itself, held until it is sent or
dropped; anything else is copied into commands for the I/O thread.  These tests mix the two and hold the result
to what asyncio does: every byte arrives, in order, mutable buffers are
copied at write() time, and a write to a reset connection ends in
connection_lost() with an OSError.  Parametrized over asyncio, uvloop and
mtloop.
"""

import asyncio
import os
import socket
import sys

import pytest

from netutil import recv_exactly


class Keep(asyncio.Protocol):
    def __init__(self, loop):
        self.made = loop.create_future()
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.made.set_result(transport)

    def connection_lost(self, exc):
        self.lost.set_result(exc)


async def server_side(loop, rcvbuf=None):
    """(transport, protocol, peer): a server transport on `loop` and a
    peer socket that reads only when told to."""
    proto = Keep(loop)
    server = await loop.create_server(lambda: proto, "127.0.0.1", 0)
    peer = socket.socket()
    if rcvbuf:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    peer.connect(server.sockets[0].getsockname())
    peer.setblocking(False)
    transport = await asyncio.wait_for(proto.made, 10)
    server.close()
    return transport, proto, peer


def test_mixed_sizes_arrive_in_order(loop, run):
    """Writes below, at and above the 4 KiB and 16 KiB boundaries, bytes and
    bytearray, back to back: the peer gets their concatenation."""
    sizes = (1, 100, 4096, 4097, 16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1, 70_000, 5)
    pieces = [os.urandom(n) for n in sizes] * 10
    pieces[3::7] = [bytearray(p) for p in pieces[3::7]]
    expected = b"".join(pieces)

    async def main():
        transport, _, peer = await server_side(loop)
        with peer:
            for piece in pieces:
                transport.write(piece)
            got = await recv_exactly(loop, peer, len(expected))
            transport.close()
        return got

    assert run(main()) == expected


@pytest.mark.parametrize("size", [5, 200_000])
def test_write_leaves_before_the_loop_runs_again(loop, run, size):
    """write() on an idle connection sends at once, as asyncio's does: the
    peer receives the first bytes while the loop thread is blocked in a
    recv() right after it, before the loop runs again (an inline mtloop must
    not wait for its next iteration; a threaded one's I/O thread sends)."""
    data = os.urandom(size)

    async def main():
        transport, _, peer = await server_side(loop)
        with peer:
            peer.settimeout(5)
            transport.write(data)
            got = peer.recv(1024)  # blocks the loop thread
            transport.close()
        return got

    assert run(main()) == data[:1024]


def test_idle_and_busy_writes_keep_order(loop, run):
    """A small write on an idle connection, then a large one the peer cannot
    take yet, then small ones while it is pending, then small ones on an
    idle connection again: one ordered stream."""
    small = [os.urandom(300) for _ in range(6)]
    large = os.urandom(4 * 1024 * 1024)
    expected = small[0] + large + small[1] + small[2] + small[3] + small[4] + small[5]

    async def main():
        transport, _, peer = await server_side(loop, rcvbuf=4096)
        with peer:
            transport.write(small[0])
            await asyncio.sleep(0.05)            # idle again
            transport.write(large)               # more than the socket takes
            transport.write(small[1])            # behind the pending output
            await asyncio.sleep(0.05)
            transport.write(small[2])
            got = await recv_exactly(loop, peer, len(small[0]) + len(large) + 2 * 300)
            await asyncio.sleep(0.05)            # drained and idle
            transport.write(small[3])
            transport.write(small[4])
            await asyncio.sleep(0)
            transport.write(small[5])
            got += await recv_exactly(loop, peer, 3 * 300)
            transport.close()
        return got

    assert run(main()) == expected


def test_mutable_buffers_are_copied_at_write(loop, run):
    """A bytearray or memoryview may change after write(): what was passed
    is what is sent, on the idle path and behind pending output alike."""
    small = bytearray(os.urandom(512))
    big = bytearray(os.urandom(2 * 1024 * 1024))
    expected = bytes(small) + bytes(big) + bytes(small)

    async def main():
        transport, _, peer = await server_side(loop, rcvbuf=4096)
        with peer:
            transport.write(small)                # idle connection
            transport.write(memoryview(big))      # pending
            transport.write(small)                # behind it
            small[:] = bytes(len(small))
            big[:] = bytes(len(big))
            got = await recv_exactly(loop, peer, len(expected))
            transport.close()
        return got

    assert run(main()) == expected


def test_large_bytes_writes_arrive_and_let_go_of_their_objects(loop, run):
    """Big bytes objects (mtloop sends them from the object itself) arrive
    intact although the writer keeps no reference, and the transport lets
    go of them once they are sent, or dropped by abort()."""
    sizes = (64 * 1024, 200 * 1024, 1024 * 1024 + 3)
    expected = b"".join(os.urandom(n) for n in sizes)
    probe = os.urandom(300 * 1024)  # referenced here too, to count references

    async def main():
        transport, proto, peer = await server_side(loop, rcvbuf=4096)
        with peer:
            base = sys.getrefcount(probe)
            offset = 0
            for n in sizes:  # each a fresh bytes object only the transport holds
                transport.write(expected[offset:offset + n])
                offset += n
            transport.write(probe)
            got = await recv_exactly(loop, peer, len(expected) + len(probe))
            while transport.get_write_buffer_size():
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            after_send = sys.getrefcount(probe)
            for _ in range(20):  # more than the kernel takes while nobody reads
                transport.write(probe)
            transport.abort()
            await asyncio.wait_for(proto.lost, 10)
            await asyncio.sleep(0.05)
            after_abort = sys.getrefcount(probe)
        return got, base, after_send, after_abort

    got, base, after_send, after_abort = run(main())
    assert got == expected + probe
    assert (after_send, after_abort) == (base, base)


def test_small_writes_to_a_reset_peer_end_in_connection_lost(loop, run):
    """The peer resets the connection; the server keeps writing small
    chunks (the idle path): connection_lost() gets an OSError, once."""

    async def main():
        transport, proto, peer = await server_side(loop)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer.close()  # RST
        for _ in range(200):
            if proto.lost.done():
                break
            transport.write(b"x" * 100)
            await asyncio.sleep(0.005)
        return await asyncio.wait_for(proto.lost, 10)

    exc = run(main())
    assert isinstance(exc, OSError), exc
