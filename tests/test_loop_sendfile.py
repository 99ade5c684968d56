"""loop.sendfile(transport, file, offset, count, fallback=...) on stream
transports (TCP and Unix, client and server side).

asyncio sends a regular file with os.sendfile ("native") and anything else
(BytesIO, ...) by reading and writing it ("fallback").  The file position is
left at offset + bytes sent.  uvloop does not implement loop.sendfile().
"""

import asyncio
import io

import pytest

from netutil import (
    Endpoint,
    pattern,
    recv_exactly,
    settle,
)

pytestmark = pytest.mark.uvloop_xfail("uvloop does not implement loop.sendfile() "
                                      "(NotImplementedError)", run=False)

SIZE = 3 * 1024 * 1024 + 123


@pytest.fixture(scope="module")
def content():
    return pattern(SIZE, seed=b"sendfile")


@pytest.fixture
def datafile(tmp_path, content):
    path = tmp_path / "payload.bin"
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("fallback", [True, False], ids=["fallback", "nofallback"])
def test_sendfile_whole_file(loop, run, endpoint_kind, tmp_path, datafile, content, fallback):
    """A whole regular file: the return value is its size, the peer receives
    it intact, the file position ends at its size; works with
    fallback=False too (a regular file needs no fallback)."""

    async def main():
        async with Endpoint(loop, endpoint_kind, tmp_path) as ep:
            with open(datafile, "rb") as f:
                reader = asyncio.ensure_future(recv_exactly(loop, ep.peer, SIZE))
                n = await loop.sendfile(ep.transport, f, fallback=fallback)
                assert n == SIZE
                assert f.tell() == SIZE
                assert await reader == content
            # the transport is usable afterwards, both ways
            ep.transport.write(b"after")
            assert await recv_exactly(loop, ep.peer, 5) == b"after"
            await loop.sock_sendall(ep.peer, b"reply")
            assert await ep.protocol.wait_bytes(5) == b"reply"

    run(main(), timeout=30)


@pytest.mark.parametrize(
    "offset, count",
    [(1000, 500_000), (0, 1), (SIZE - 100, None), (SIZE - 100, 1_000_000), (12345, None)],
)
def test_sendfile_offset_and_count(loop, run, tmp_path, datafile, content, offset, count):
    """offset/count select the bytes sent (count past the end stops at EOF);
    the return value is the number sent and the file position ends at
    offset + that number."""
    end = SIZE if count is None else min(SIZE, offset + count)
    expected = content[offset:end]

    async def main():
        async with Endpoint(loop, "tcp-client", tmp_path) as ep:
            with open(datafile, "rb") as f:
                reader = asyncio.ensure_future(recv_exactly(loop, ep.peer, len(expected)))
                n = await loop.sendfile(ep.transport, f, offset, count)
                assert n == len(expected)
                assert f.tell() == offset + n
                assert await reader == expected
            await settle(2)
            try:
                extra = ep.peer.recv(100)
            except BlockingIOError:
                extra = None
            assert extra is None, "more bytes than asked for were sent"

    run(main(), timeout=30)


def test_sendfile_empty_file(loop, run, tmp_path):
    """An empty file sends nothing and returns 0."""

    async def main():
        path = tmp_path / "empty.bin"
        path.write_bytes(b"")
        async with Endpoint(loop, "tcp-client", tmp_path) as ep:
            with open(path, "rb") as f:
                assert await loop.sendfile(ep.transport, f) == 0
            ep.transport.write(b"next")
            assert await recv_exactly(loop, ep.peer, 4) == b"next"

    run(main())


def test_sendfile_bytesio_fallback(loop, run, endpoint_kind, tmp_path, content):
    """A file object that is not a regular file (io.BytesIO) goes through the
    fallback: same bytes, same return value, position at offset + sent."""

    async def main():
        async with Endpoint(loop, endpoint_kind, tmp_path) as ep:
            buf = io.BytesIO(content)
            reader = asyncio.ensure_future(recv_exactly(loop, ep.peer, SIZE))
            assert await loop.sendfile(ep.transport, buf) == SIZE
            assert buf.tell() == SIZE
            assert await reader == content
            buf = io.BytesIO(content)
            reader = asyncio.ensure_future(recv_exactly(loop, ep.peer, 70_000))
            assert await loop.sendfile(ep.transport, buf, 5, 70_000) == 70_000
            assert buf.tell() == 70_005
            assert await reader == content[5:70_005]

    run(main(), timeout=30)


def test_sendfile_bytesio_without_fallback(loop, run, tmp_path):
    """fallback=False with a non-regular file raises
    asyncio.SendfileNotAvailableError (a RuntimeError); nothing is sent and
    the transport still works."""

    async def main():
        async with Endpoint(loop, "tcp-client", tmp_path) as ep:
            with pytest.raises(asyncio.SendfileNotAvailableError):
                await loop.sendfile(ep.transport, io.BytesIO(b"abc"), fallback=False)
            assert issubclass(asyncio.SendfileNotAvailableError, RuntimeError)
            assert not ep.transport.is_closing()
            ep.transport.write(b"still fine")
            assert await recv_exactly(loop, ep.peer, 10) == b"still fine"

    run(main())


def test_sendfile_errors(loop, run, tmp_path, datafile):
    """A text-mode file raises ValueError ('file should be opened in binary
    mode'); a bad offset/count raises ValueError; a closing transport raises
    RuntimeError('Transport is closing')."""

    async def main():
        async with Endpoint(loop, "tcp-client", tmp_path) as ep:
            with open(datafile, "r", encoding="latin-1") as f:
                with pytest.raises(ValueError, match="file should be opened in binary mode"):
                    await loop.sendfile(ep.transport, f)
            with open(datafile, "rb") as f:
                with pytest.raises(ValueError, match="offset must be a non-negative integer"):
                    await loop.sendfile(ep.transport, f, -1)
                with pytest.raises(ValueError, match="count must be a positive integer"):
                    await loop.sendfile(ep.transport, f, 0, 0)
                ep.transport.close()
                with pytest.raises(RuntimeError, match="Transport is closing"):
                    await loop.sendfile(ep.transport, f)

    run(main())


def test_write_during_sendfile_raises(loop, run, tmp_path):
    """While a native sendfile is in progress, transport.write() raises
    RuntimeError('unable to write; sendfile is in progress'); after it
    completes, writes work again."""
    big = pattern(32 * 1024 * 1024, seed=b"big")

    async def main():
        path = tmp_path / "big.bin"
        path.write_bytes(big)
        async with Endpoint(loop, "tcp-client", tmp_path) as ep:
            with open(path, "rb") as f:
                task = asyncio.ensure_future(loop.sendfile(ep.transport, f))
                await settle(3)
                assert not task.done(), "precondition: the peer has not read yet"
                with pytest.raises(RuntimeError, match="sendfile is in progress"):
                    ep.transport.write(b"interleaved")
                got = await recv_exactly(loop, ep.peer, len(big))
                assert await task == len(big)
                assert got == big
            ep.transport.write(b"now ok")
            assert await recv_exactly(loop, ep.peer, 6) == b"now ok"

    run(main(), timeout=30)


def test_data_received_after_sendfile(loop, run, tmp_path, datafile, content):
    """Bytes the peer sends while a sendfile runs are delivered to the
    protocol (reading resumes after the sendfile), nothing lost."""

    async def main():
        async with Endpoint(loop, "tcp-server", tmp_path) as ep:
            await loop.sock_sendall(ep.peer, b"early")
            with open(datafile, "rb") as f:
                reader = asyncio.ensure_future(recv_exactly(loop, ep.peer, SIZE))
                await loop.sock_sendall(ep.peer, b" and during")
                assert await loop.sendfile(ep.transport, f) == SIZE
                assert await reader == content
            assert await ep.protocol.wait_bytes(16) == b"early and during"

    run(main(), timeout=30)
