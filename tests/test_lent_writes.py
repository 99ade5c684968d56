"""Large writes of bytes objects are lent to the I/O thread (mtloop only).

A ``transport.write()`` of a ``bytes`` object of 16 KiB or more is not
copied: the I/O thread sends straight from the object, which the transport
keeps referenced until the bytes are out (or dropped by abort(), an error
or the loop's close()) and then releases on the loop thread.  Mutable
buffers are still copied.  These tests hold the reference counting to
that: the object is held while its bytes are pending, released exactly
once afterwards, and the peer gets every byte.
"""

import asyncio
import os
import socket
import sys

import pytest

mtloop = pytest.importorskip("mtloop")

BIG = 8 * 1024 * 1024  # far more than a small receive buffer holds


@pytest.fixture
def loop():
    lp = mtloop.new_event_loop()
    yield lp
    if not lp.is_closed():
        lp.close()


def recv_exact(sock, n):
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(1 << 20, n - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


async def connected_pair(loop):
    """A server-side mtloop transport and a blocking peer socket that
    reads nothing until told to (small receive buffer)."""
    made = loop.create_future()

    class Keep(asyncio.Protocol):
        def connection_made(self, transport):
            made.set_result(transport)

        def connection_lost(self, exc):
            pass

    server = await loop.create_server(Keep, "127.0.0.1", 0)
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.connect(server.sockets[0].getsockname())
    transport = await asyncio.wait_for(made, 10)
    server.close()
    return transport, peer


async def settle(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_lent_bytes_are_held_while_pending_and_released_after(loop):
    data = os.urandom(BIG)
    base = sys.getrefcount(data)

    async def main():
        transport, peer = await connected_pair(loop)
        with peer:
            transport.write(data)
            await asyncio.sleep(0.1)
            assert transport.get_write_buffer_size() > 0  # the peer reads nothing yet
            held = sys.getrefcount(data) - base
            received = await loop.run_in_executor(None, recv_exact, peer, BIG)
            await settle(lambda: sys.getrefcount(data) == base)
            transport.close()
        return held, received

    held, received = loop.run_until_complete(main())
    assert held >= 1, "a pending 8 MiB bytes write should hold its object"
    assert received == data
    assert sys.getrefcount(data) == base


def test_lent_bytes_are_released_on_abort(loop):
    data = os.urandom(BIG)
    base = sys.getrefcount(data)

    async def main():
        transport, peer = await connected_pair(loop)
        with peer:
            for _ in range(3):
                transport.write(data)
            await asyncio.sleep(0.1)
            assert sys.getrefcount(data) > base
            transport.abort()
            await settle(lambda: sys.getrefcount(data) == base)

    loop.run_until_complete(main())
    assert sys.getrefcount(data) == base


def test_lent_bytes_are_released_when_the_loop_closes(loop):
    data = os.urandom(BIG)
    base = sys.getrefcount(data)

    async def main():
        transport, peer = await connected_pair(loop)
        transport.write(data)
        await asyncio.sleep(0.1)
        return transport, peer

    transport, peer = loop.run_until_complete(main())
    assert sys.getrefcount(data) > base
    loop.close()  # drops the unsent output with the loop's transports
    peer.close()
    del transport
    assert sys.getrefcount(data) == base


def test_many_medium_writes_arrive_in_order(loop):
    """Lent (>= 16 KiB) and copied (smaller) writes interleave in order."""
    pieces = [os.urandom(n) for n in (100, 20_000, 16 * 1024, 5, 70_000, 16 * 1024 - 1)] * 20
    expected = b"".join(pieces)

    async def main():
        transport, peer = await connected_pair(loop)
        with peer:
            for piece in pieces:
                transport.write(piece)
            received = await loop.run_in_executor(None, recv_exact, peer, len(expected))
            transport.close()
        return received

    assert loop.run_until_complete(main()) == expected


def test_mutable_buffers_are_copied(loop):
    """A bytearray (or memoryview) may change after write(): what was
    passed is what is sent."""
    buf = bytearray(os.urandom(BIG // 4))
    original = bytes(buf)

    async def main():
        transport, peer = await connected_pair(loop)
        with peer:
            transport.write(buf)
            transport.write(memoryview(buf))
            buf[:] = bytes(len(buf))  # zero it while the writes are pending
            received = await loop.run_in_executor(None, recv_exact, peer, 2 * len(original))
            transport.close()
        return received

    assert loop.run_until_complete(main()) == original + original
