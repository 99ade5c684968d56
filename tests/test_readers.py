"""add_reader / add_writer / remove_reader / remove_writer."""

import asyncio
import os
import socket

import pytest

from conftest import HANG_TIMEOUT


def run_one_iteration(loop):
    loop.stop()
    loop.run_forever()


def wait_for(loop, fut, timeout=HANG_TIMEOUT):
    return loop.run_until_complete(asyncio.wait_for(fut, timeout))


@pytest.fixture
def pipe():
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    fds = [r, w]
    yield fds
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def fill_socket(sock):
    """Write until the socket buffer is full; return the number of bytes."""
    total = 0
    chunk = b"x" * 65536
    while True:
        try:
            total += sock.send(chunk)
        except BlockingIOError:
            return total


def drain_socket(sock):
    total = 0
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return total
        if not data:
            return total
        total += len(data)


def closed_fd():
    """An fd number that is certainly not open."""
    for fd in range(1000, 4000):
        try:
            os.fstat(fd)
        except OSError:
            return fd
    raise RuntimeError("no free fd number found")


# --------------------------------------------------------------------------
# readers


def test_reader_not_called_until_readable(loop, sockpair):
    a, b = sockpair
    calls = []
    loop.add_reader(a.fileno(), calls.append, "readable")
    for _ in range(3):
        run_one_iteration(loop)
    assert calls == []
    fut = loop.create_future()
    loop.remove_reader(a.fileno())

    def on_read():
        fut.set_result(a.recv(100))
        loop.remove_reader(a)

    loop.add_reader(a.fileno(), on_read)
    b.send(b"hello")
    assert wait_for(loop, fut) == b"hello"


def test_reader_with_fileno_object(loop, sockpair):
    a, b = sockpair
    fut = loop.create_future()

    def on_read(arg1, arg2):
        loop.remove_reader(a)
        fut.set_result((arg1, arg2, a.recv(100)))

    loop.add_reader(a, on_read, 1, "two")
    b.send(b"data")
    assert wait_for(loop, fut) == (1, "two", b"data")


def test_reader_on_pipe(loop, pipe):
    r, w = pipe
    fut = loop.create_future()

    def on_read():
        loop.remove_reader(r)
        fut.set_result(os.read(r, 100))

    loop.add_reader(r, on_read)
    run_one_iteration(loop)
    assert not fut.done()
    os.write(w, b"through the pipe")
    assert wait_for(loop, fut) == b"through the pipe"


def test_reader_pipe_eof(loop, pipe):
    r, w = pipe
    fut = loop.create_future()

    def on_read():
        loop.remove_reader(r)
        fut.set_result(os.read(r, 100))

    loop.add_reader(r, on_read)
    os.close(w)
    pipe.remove(w)
    assert wait_for(loop, fut) == b""


def test_reader_called_on_peer_close(loop, sockpair):
    a, b = sockpair
    fut = loop.create_future()

    def on_read():
        loop.remove_reader(a)
        fut.set_result(a.recv(100))

    loop.add_reader(a, on_read)
    b.close()
    assert wait_for(loop, fut) == b""


def test_replace_reader_callback(loop, sockpair):
    a, b = sockpair
    calls = []
    fut = loop.create_future()

    def second():
        calls.append("second")
        loop.remove_reader(a)
        fut.set_result(None)

    loop.add_reader(a, calls.append, "first")
    loop.add_reader(a, second)
    b.send(b"x")
    wait_for(loop, fut)
    assert calls == ["second"]


@pytest.mark.uvloop_xfail("uvloop's remove_reader()/remove_writer() return None "
                          "instead of True/False")
def test_remove_reader_return_values(loop, sockpair):
    a, _ = sockpair
    assert loop.remove_reader(a) is False
    loop.add_reader(a, lambda: None)
    assert loop.remove_reader(a) is True
    assert loop.remove_reader(a) is False
    assert loop.remove_reader(a.fileno()) is False


def test_remove_reader_stops_callbacks(loop, sockpair):
    a, b = sockpair
    calls = []
    loop.add_reader(a, calls.append, 1)
    loop.remove_reader(a)
    b.send(b"x")
    for _ in range(3):
        run_one_iteration(loop)
    assert calls == []


def test_reader_is_level_triggered(loop, sockpair):
    a, b = sockpair
    calls = []
    fut = loop.create_future()

    def on_read():
        calls.append(1)  # never reads: data stays pending
        if len(calls) == 5:
            loop.remove_reader(a)
            fut.set_result(None)

    loop.add_reader(a, on_read)
    b.send(b"unread")
    wait_for(loop, fut)
    assert len(calls) == 5
    assert a.recv(100) == b"unread"


def test_reader_and_writer_same_fd(loop, sockpair):
    a, b = sockpair
    got = {}
    fut = loop.create_future()

    def check():
        if len(got) == 2 and not fut.done():
            fut.set_result(None)

    def on_read():
        loop.remove_reader(a)
        got["read"] = a.recv(10)
        check()

    def on_write():
        loop.remove_writer(a)
        got["write"] = True
        check()

    loop.add_reader(a, on_read)
    loop.add_writer(a, on_write)
    b.send(b"r")
    wait_for(loop, fut)
    assert got == {"read": b"r", "write": True}
    # removing one kind does not remove the other
    calls = []
    loop.add_reader(a, calls.append, "r")
    loop.add_writer(a, lambda: None)
    loop.remove_writer(a)
    b.send(b"again")
    fut2 = loop.create_future()
    loop.add_reader(a, lambda: (calls.append("r2"), loop.remove_reader(a), fut2.set_result(None)))
    wait_for(loop, fut2)
    assert calls == ["r2"]


def test_reader_exception_goes_to_exception_handler(loop, sockpair):
    a, b = sockpair
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))

    def on_read():
        loop.remove_reader(a)
        raise ValueError("reader failed")

    loop.add_reader(a, on_read)
    b.send(b"x")
    fut = loop.create_future()
    loop.call_later(0.05, fut.set_result, None)
    wait_for(loop, fut)
    assert len(contexts) == 1
    assert contexts[0]["message"].startswith("Exception in callback")
    assert isinstance(contexts[0]["exception"], ValueError)


def test_many_readers(loop):
    pairs = [socket.socketpair() for _ in range(50)]
    try:
        got = []
        fut = loop.create_future()
        for i, (a, b) in enumerate(pairs):
            a.setblocking(False)

            def on_read(a=a, i=i):
                loop.remove_reader(a)
                got.append((i, a.recv(10)))
                if len(got) == len(pairs):
                    fut.set_result(None)

            loop.add_reader(a, on_read)
        for i, (a, b) in enumerate(pairs):
            b.send(str(i).encode())
        wait_for(loop, fut)
        assert sorted(got) == sorted((i, str(i).encode()) for i in range(len(pairs)))
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_reader_fd_closed_and_reused(loop):
    """Removing the reader of a closed socket, then watching a new fd works."""
    a, b = socket.socketpair()
    loop.add_reader(a, lambda: None)
    loop.remove_reader(a)
    a.close()
    b.close()
    c, d = socket.socketpair()
    try:
        c.setblocking(False)
        fut = loop.create_future()
        loop.add_reader(c, lambda: (loop.remove_reader(c), fut.set_result(c.recv(5))))
        d.send(b"reuse")
        assert wait_for(loop, fut) == b"reuse"
    finally:
        c.close()
        d.close()


def test_remove_reader_from_other_callback_same_iteration(loop):
    """Both fds ready in one iteration: removing B's reader from A's callback
    means B's callback does not run (asyncio cancels its handle)."""
    p1 = socket.socketpair()
    p2 = socket.socketpair()
    try:
        a1, b1 = p1
        a2, b2 = p2
        calls = []

        def on_a1():
            calls.append("a1")
            loop.remove_reader(a1)
            loop.remove_reader(a2)

        def on_a2():
            calls.append("a2")
            loop.remove_reader(a2)
            loop.remove_reader(a1)

        b1.send(b"x")
        b2.send(b"y")
        loop.add_reader(a1, on_a1)
        loop.add_reader(a2, on_a2)
        fut = loop.create_future()
        loop.call_later(0.05, fut.set_result, None)
        wait_for(loop, fut)
        # exactly one of them ran: whichever ran first removed the other
        assert calls in (["a1"], ["a2"])
    finally:
        for s in p1 + p2:
            s.close()


def test_replace_reader_from_other_callback_same_iteration(loop):
    p1 = socket.socketpair()
    p2 = socket.socketpair()
    try:
        a1, b1 = p1
        a2, b2 = p2
        calls = []
        fut = loop.create_future()

        def replacement(name, sock):
            calls.append(name)
            sock.recv(10)
            loop.remove_reader(sock)
            fut.set_result(None)

        def on_a1():
            calls.append("a1")
            a1.recv(10)
            loop.remove_reader(a1)
            loop.add_reader(a2, replacement, "a2-replaced", a2)

        def on_a2():
            calls.append("a2")
            a2.recv(10)
            loop.remove_reader(a2)
            loop.add_reader(a1, replacement, "a1-replaced", a1)

        b1.send(b"x")
        b2.send(b"y")
        loop.add_reader(a1, on_a1)
        loop.add_reader(a2, on_a2)
        wait_for(loop, fut)
        # the old callback of the replaced reader never runs after replacement
        assert calls in (["a1", "a2-replaced"], ["a2", "a1-replaced"])
    finally:
        for s in p1 + p2:
            s.close()


def test_call_soon_chain_does_not_starve_io(loop, sockpair):
    a, b = sockpair
    spins = [0]

    def spin():
        spins[0] += 1
        if not fut.done():
            loop.call_soon(spin)

    fut = loop.create_future()

    def on_read():
        loop.remove_reader(a)
        fut.set_result(a.recv(10))

    loop.add_reader(a, on_read)
    loop.call_soon(spin)
    loop.call_soon(b.send, b"io")
    assert wait_for(loop, fut) == b"io"
    assert spins[0] >= 1


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_in_reader_propagates(loop, sockpair, exc_type):
    a, b = sockpair

    def on_read():
        loop.remove_reader(a)
        raise exc_type()

    loop.add_reader(a, on_read)
    b.send(b"x")
    loop.call_later(HANG_TIMEOUT, loop.stop)
    with pytest.raises(exc_type):
        loop.run_forever()
    assert not loop.is_running()
    fut = loop.create_future()
    loop.add_reader(a, lambda: (loop.remove_reader(a), fut.set_result(a.recv(10))))
    assert wait_for(loop, fut) == b"x"


# --------------------------------------------------------------------------
# writers


def test_writer_called_when_writable(loop, sockpair):
    a, _ = sockpair
    fut = loop.create_future()

    def on_write(arg):
        loop.remove_writer(a)
        fut.set_result(arg)

    loop.add_writer(a.fileno(), on_write, "w")
    assert wait_for(loop, fut) == "w"


def test_writer_not_called_until_writable(loop, sockpair):
    a, b = sockpair
    fill_socket(a)
    calls = []
    fut = loop.create_future()

    def on_write():
        calls.append(1)
        loop.remove_writer(a)
        fut.set_result(None)

    loop.add_writer(a, on_write)
    for _ in range(3):
        run_one_iteration(loop)
    assert calls == []
    drain_socket(b)
    wait_for(loop, fut)
    assert calls == [1]


def test_writer_on_pipe(loop, pipe):
    r, w = pipe
    fut = loop.create_future()

    def on_write():
        loop.remove_writer(w)
        os.write(w, b"ok")
        fut.set_result(None)

    loop.add_writer(w, on_write)
    wait_for(loop, fut)
    assert os.read(r, 10) == b"ok"


def test_replace_writer_callback(loop, sockpair):
    a, _ = sockpair
    calls = []
    fut = loop.create_future()

    def second():
        calls.append("second")
        loop.remove_writer(a)
        fut.set_result(None)

    loop.add_writer(a, calls.append, "first")
    loop.add_writer(a, second)
    wait_for(loop, fut)
    assert calls == ["second"]


@pytest.mark.uvloop_xfail("uvloop's remove_reader()/remove_writer() return None "
                          "instead of True/False")
def test_remove_writer_return_values(loop, sockpair):
    a, _ = sockpair
    assert loop.remove_writer(a) is False
    loop.add_writer(a, lambda: None)
    assert loop.remove_writer(a.fileno()) is True
    assert loop.remove_writer(a) is False


def test_writer_is_level_triggered(loop, sockpair):
    a, _ = sockpair
    calls = []
    fut = loop.create_future()

    def on_write():
        calls.append(1)
        if len(calls) == 5:
            loop.remove_writer(a)
            fut.set_result(None)

    loop.add_writer(a, on_write)
    wait_for(loop, fut)
    assert len(calls) == 5


@pytest.mark.uvloop_xfail("uvloop's remove_reader()/remove_writer() return None "
                          "instead of True/False")
@pytest.mark.parametrize("kind", ["reader", "writer"])
def test_remove_after_fd_closed(loop, kind):
    """Removing the watcher of an fd that was closed meanwhile succeeds quietly."""
    r, w = os.pipe()
    fd = r if kind == "reader" else w
    other = w if kind == "reader" else r
    getattr(loop, "add_" + kind)(fd, lambda: None)
    os.close(fd)
    try:
        assert getattr(loop, "remove_" + kind)(fd) is True
        assert getattr(loop, "remove_" + kind)(fd) is False
        # and the loop still runs
        loop.call_soon(loop.stop)
        loop.run_forever()
    finally:
        os.close(other)


@pytest.mark.parametrize("kind", ["reader", "writer"])
def test_remove_after_fd_closed_does_not_raise(loop, kind):
    r, w = os.pipe()
    fd = r if kind == "reader" else w
    other = w if kind == "reader" else r
    getattr(loop, "add_" + kind)(fd, lambda: None)
    os.close(fd)
    try:
        getattr(loop, "remove_" + kind)(fd)
        loop.call_soon(loop.stop)
        loop.run_forever()
    finally:
        os.close(other)


# --------------------------------------------------------------------------
# misuse


@pytest.mark.parametrize("method", ["add_reader", "add_writer"])
def test_add_negative_fd(loop, method):
    with pytest.raises(ValueError):
        getattr(loop, method)(-1, lambda: None)


@pytest.mark.parametrize("method", ["remove_reader", "remove_writer"])
def test_remove_negative_fd(loop, method):
    with pytest.raises(ValueError):
        getattr(loop, method)(-1)


@pytest.mark.parametrize("method", ["add_reader", "add_writer"])
@pytest.mark.parametrize("bad", [object(), "not a file", 1.5, None])
def test_add_invalid_file_object(loop, method, bad):
    with pytest.raises(ValueError, match="Invalid file object"):
        getattr(loop, method)(bad, lambda: None)


@pytest.mark.parametrize("method", ["remove_reader", "remove_writer"])
def test_remove_invalid_file_object(loop, method):
    with pytest.raises(ValueError, match="Invalid file object"):
        getattr(loop, method)(object())


@pytest.mark.parametrize("method", ["add_reader", "add_writer"])
def test_add_fileno_raising(loop, method):
    class BadFile:
        def fileno(self):
            raise ValueError("I/O operation on closed file")

    with pytest.raises(ValueError):
        getattr(loop, method)(BadFile(), lambda: None)


@pytest.mark.parametrize("method", ["add_reader", "add_writer"])
def test_add_closed_fd(loop, method):
    fd = closed_fd()
    with pytest.raises(OSError):
        getattr(loop, method)(fd, lambda: None)
    # nothing was registered
    remove = method.replace("add", "remove")
    assert not getattr(loop, remove)(fd)


@pytest.mark.parametrize("method", ["add_reader", "add_writer"])
def test_add_closed_socket_object(loop, method):
    s = socket.socket()
    s.close()
    # a closed socket's fileno() is -1
    with pytest.raises(ValueError):
        getattr(loop, method)(s, lambda: None)


@pytest.mark.parametrize("method", ["add_reader", "add_writer"])
def test_add_on_closed_loop(loop, method, sockpair):
    loop.close()
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        getattr(loop, method)(sockpair[0], lambda: None)


@pytest.mark.parametrize("method", ["remove_reader", "remove_writer"])
@pytest.mark.uvloop_xfail("uvloop's remove_reader()/remove_writer() return None "
                          "instead of True/False")
def test_remove_on_closed_loop(loop, method, sockpair):
    add = method.replace("remove", "add")
    getattr(loop, add)(sockpair[0], lambda: None)
    loop.close()
    assert getattr(loop, method)(sockpair[0]) is False
