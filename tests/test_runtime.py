"""mtloop's I/O-thread runtime (mtloop only: runtime introspection).

API under test:

* ``mtloop.runtime_stats()`` -> one dict per I/O thread with the keys
  'thread', 'transports', 'listeners', 'bytes_read', 'bytes_written',
  'accepts', 'commands', 'completions', 'wakeups_sent', 'wakeups_received',
  'cpu_ns', 'wait_ns' (cumulative; 'transports'/'listeners' are current
  counts).
* ``mtloop.new_event_loop(io_threads=N)``: the loop spreads its connections
  over N I/O threads (the pool grows to at least N); ``loop.io_threads`` is
  a read-only int; the default comes from $MTLOOP_IO_THREADS or the CPU
  count; 0 or negative -> ValueError, non-int -> TypeError.
* ``mtloop.shutdown_runtime()`` stops the I/O threads; the next use starts
  a fresh pool.
* after fork(), a new loop works in the child, a loop made before the fork
  raises RuntimeError (mentioning fork) when run there, and so does every
  method of a transport made before the fork; the parent is never touched.
* accepts take credit: a loop that does not handle them leaves connections
  in the kernel's backlog; the pool does not start again after the
  interpreter-exit shutdown; a loop collected with open transports.

Tests that need a clean process (environment variables, thread counts,
interpreter exit) run a child Python.
"""

import asyncio
import ctypes
import faulthandler
import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import warnings
import zlib

import pytest

try:
    import mtloop
except BaseException:  # a broken import is a failure of every test, not a skip
    _IMPORT_ERROR = traceback.format_exc()
    mtloop = None
else:
    _IMPORT_ERROR = None

STAT_KEYS = {
    "thread", "transports", "listeners", "bytes_read", "bytes_written", "accepts",
    "commands", "completions", "wakeups_sent", "wakeups_received", "cpu_ns", "wait_ns",
}
CUMULATIVE = ("bytes_read", "bytes_written", "accepts", "commands", "completions",
              "wakeups_sent", "wakeups_received", "cpu_ns", "wait_ns")
GUARD_SECONDS = 60


class RuntimeTestHung(SystemExit):
    __test__ = False


@pytest.fixture(autouse=True)
def _guard():
    """Fail instead of hanging: SIGALRM after GUARD_SECONDS, then a traceback
    dump and exit after twice that."""
    if mtloop is None:
        pytest.fail("import mtloop failed:\n" + _IMPORT_ERROR, pytrace=False)

    def on_alarm(signum, frame):
        raise RuntimeTestHung(f"test still running after {GUARD_SECONDS} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, GUARD_SECONDS)
    faulthandler.dump_traceback_later(2 * GUARD_SECONDS, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def new_loop():
    """new_loop(**kwargs) -> an mtloop loop, closed at teardown; with at
    least one I/O thread unless io_threads= says otherwise (these tests are
    about the pool, and $MTLOOP_IO_THREADS=0 runs the suite inline)."""
    loops = []

    def make(**kwargs):
        kwargs.setdefault("io_threads", max(1, mtloop.default_io_threads()))
        lp = mtloop.new_event_loop(**kwargs)
        loops.append(lp)
        return lp

    yield make
    for lp in loops:
        if not lp.is_closed():
            lp.close()


def run_on(loop, coro, timeout=30):
    async def guarded():
        return await asyncio.wait_for(coro, timeout)

    return loop.run_until_complete(guarded())


def stats():
    s = mtloop.runtime_stats()
    assert isinstance(s, list)
    return s


async def quiet_stats(timeout=3.0):
    """runtime_stats() once the current counts ('transports', 'listeners')
    have stopped changing for a few loop iterations: closed transports are
    released by their I/O thread asynchronously (and the loop must run for
    that to happen)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    prev = None
    same = 0
    while True:
        snap = stats()
        key = [(d["thread"], d["transports"], d["listeners"]) for d in snap]
        if key == prev:
            same += 1
        else:
            same = 0
        prev = key
        if same >= 3 or loop.time() > deadline:
            return snap
        await asyncio.sleep(0.02)


def total(snapshot, key):
    return sum(d[key] for d in snapshot)


def by_thread(snapshot):
    return {d["thread"]: d for d in snapshot}


# --------------------------------------------------------------------------
# traffic helpers (Protocols on the loop under test)


class EchoServer(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        return False


class Collect(asyncio.Protocol):
    def __init__(self, loop, expect):
        self.expect = expect
        self.buf = bytearray()
        self.done = loop.create_future()
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        if len(self.buf) >= self.expect and not self.done.done():
            self.done.set_result(bytes(self.buf))

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_exception(AssertionError(f"lost early: {exc!r}"))
        if not self.lost.done():
            self.lost.set_result(exc)


async def echo_through(loop, payload):
    """Send ``payload`` over a TCP connection to an echo server on ``loop``
    (both ends are loop transports) and return what came back."""
    server = await loop.create_server(EchoServer, "127.0.0.1", 0)
    try:
        t, p = await loop.create_connection(lambda: Collect(loop, len(payload)),
                                            *server.sockets[0].getsockname())
        t.write(payload)
        got = await p.done
        t.close()
        await p.lost
        return got
    finally:
        server.close()
        await server.wait_closed()


def payload(n):
    block = bytes(range(256)) * 256
    return (block * (n // len(block) + 1))[:n]


class Counter(asyncio.Protocol):
    def __init__(self, loop, expect):
        self.n = 0
        self.expect = expect
        self.done = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.n += len(data)
        if self.n >= self.expect and not self.done.done():
            self.done.set_result(self.n)


class Pump(asyncio.Protocol):
    """Writes ``total`` bytes in 256 KiB writes, honouring pause/resume."""

    def __init__(self, loop, total):
        self.loop = loop
        self.total = total
        self.sent = 0
        self.paused = False
        self.chunk = payload(256 * 1024)

    def connection_made(self, transport):
        self.transport = transport
        self.loop.call_soon(self.pump)

    def pump(self):
        while not self.paused and self.sent < self.total:
            n = min(len(self.chunk), self.total - self.sent)
            self.transport.write(self.chunk[:n])
            self.sent += n

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        self.loop.call_soon(self.pump)


async def one_way(loop, nbytes):
    """Send ``nbytes`` one way from a client transport to a server transport
    on ``loop``; returns when all arrived."""
    got = loop.create_future()

    def factory():
        c = Counter(loop, nbytes)
        got.set_result(c)
        return c

    server = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        t, _ = await loop.create_connection(lambda: Pump(loop, nbytes),
                                            *server.sockets[0].getsockname())
        counter = await got
        assert await counter.done == nbytes
        t.close()
        counter.transport.close()
    finally:
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------
# runtime_stats


def test_runtime_stats_shape(new_loop):
    """After a loop has used the runtime, runtime_stats() is a non-empty list
    with one dict per I/O thread: all the documented keys, int values >= 0,
    'thread' indexes 0..n-1."""
    loop = new_loop()
    assert run_on(loop, echo_through(loop, b"shape")) == b"shape"
    snap = stats()
    assert len(snap) >= 1
    for d in snap:
        assert isinstance(d, dict)
        missing = STAT_KEYS - set(d)
        assert not missing, f"missing keys {missing}"
        for k in STAT_KEYS:
            assert isinstance(d[k], int) and not isinstance(d[k], bool), (k, d[k])
            assert d[k] >= 0, (k, d[k])
    assert sorted(d["thread"] for d in snap) == list(range(len(snap)))


def test_counters_are_cumulative(new_loop):
    """Cumulative counters never go down across traffic and connection churn."""
    loop = new_loop()
    run_on(loop, echo_through(loop, b"warm up"))
    before = by_thread(stats())
    for _ in range(3):
        run_on(loop, echo_through(loop, payload(100_000)))
    after = by_thread(stats())
    for tid, b in before.items():
        a = after[tid]
        for k in CUMULATIVE:
            assert a[k] >= b[k], f"thread {tid}: {k} went from {b[k]} to {a[k]}"


def test_echoed_bytes_show_in_io_thread_counters(new_loop):
    """Bytes echoed between two transports of one loop are read by I/O
    threads (bytes_read grows by at least twice the payload: once at the
    server, once at the client) and written by them (bytes_written grows by
    at least the payload); accepts, commands and completions grow too."""
    loop = new_loop()
    run_on(loop, echo_through(loop, b"warm up"))
    data = payload(4 * 1024 * 1024)
    before = stats()
    assert run_on(loop, echo_through(loop, data)) == data
    after = stats()
    d = {k: total(after, k) - total(before, k) for k in CUMULATIVE}
    assert d["bytes_read"] >= 2 * len(data), d
    assert d["bytes_written"] >= len(data), d
    assert d["accepts"] >= 1, d
    assert d["commands"] > 0, d
    assert d["completions"] > 0, d


def test_idle_and_busy_threads_tell_apart(new_loop):
    """wait_ns counts a thread's time asleep, the wait in progress included;
    cpu_ns its CPU time.  An I/O thread left idle while the loop sleeps
    shows most of that time as waiting and spends no CPU on it; the thread
    that echoes 4 MB shows CPU."""
    loop = new_loop(io_threads=1)
    run_on(loop, echo_through(loop, b"start the pool"))
    idle = 0.3
    before = by_thread(stats())
    run_on(loop, asyncio.sleep(idle))
    after = by_thread(stats())
    waited = max(after[t]["wait_ns"] - before[t]["wait_ns"] for t in before)
    assert waited >= idle * 0.5e9, (before, after)
    before = after
    data = payload(4 * 1024 * 1024)
    assert run_on(loop, echo_through(loop, data)) == data
    after = by_thread(stats())
    assert max(after[t]["cpu_ns"] - before[t]["cpu_ns"] for t in before) > 0


def test_loop_counts_its_completion_batches(new_loop):
    """loop.completion_stats(): iterations that dispatched completions, how
    many, and the deepest such batch, with I/O threads and inline."""
    for threads in (1, 0):
        loop = new_loop(io_threads=threads)
        assert loop.completion_stats() == {"batches": 0, "completions": 0,
                                           "deepest_batch": 0}
        data = payload(1024 * 1024)
        assert run_on(loop, echo_through(loop, data)) == data
        c = loop.completion_stats()
        assert c["batches"] >= 1, c
        assert c["completions"] >= c["batches"] and c["completions"] >= 4, c
        assert 1 <= c["deepest_batch"] <= c["completions"], c


def test_transports_and_listeners_are_counted(new_loop):
    """While a server listens and connections are open, 'listeners' and
    'transports' count them; after everything closes they return to what
    they were."""
    loop = new_loop()
    run_on(loop, echo_through(loop, b"warm up"))

    async def main():
        base = await quiet_stats()
        server = await loop.create_server(EchoServer, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()
        conns = []
        for _ in range(10):
            t, p = await loop.create_connection(lambda: Collect(loop, 2), *addr)
            t.write(b"hi")
            await p.done
            conns.append((t, p))
        during = stats()
        assert total(during, "listeners") >= total(base, "listeners") + 1
        assert total(during, "transports") >= total(base, "transports") + 20
        for t, p in conns:
            t.close()
            await p.lost
        server.close()
        await server.wait_closed()
        end = loop.time() + 5
        while True:
            now = stats()
            if (total(now, "transports") == total(base, "transports")
                    and total(now, "listeners") == total(base, "listeners")):
                break
            assert loop.time() < end, (
                f"transports/listeners did not return to {total(base, 'transports')}/"
                f"{total(base, 'listeners')}: {now}")
            await asyncio.sleep(0.01)

    run_on(loop, main())


def test_io_threads_move_the_bytes(new_loop):
    """50 MB sent one way between two transports of one loop: the I/O threads
    read all of it (bytes_read) and wrote at least 90% of it
    (bytes_written; a direct send from the loop thread may cover a little)."""
    loop = new_loop()
    run_on(loop, echo_through(loop, b"warm up"))
    n = 50 * 1024 * 1024
    before = stats()
    run_on(loop, one_way(loop, n), timeout=60)
    after = stats()
    read = total(after, "bytes_read") - total(before, "bytes_read")
    written = total(after, "bytes_written") - total(before, "bytes_written")
    assert read >= n, read
    assert written >= n, written  # the loop thread's direct sends count too


def test_direct_sends_count_as_written(new_loop):
    """A light ping-pong, where the loop thread sends most messages itself
    (its I/O thread asleep, nothing else queued: stream_core.c's direct
    send): bytes_written still counts every byte both ends wrote."""
    loop = new_loop(io_threads=1)
    rounds, size = 200, 1024

    async def main():
        srv = await loop.create_server(EchoServer, "127.0.0.1", 0)
        r, w = await asyncio.open_connection(*srv.sockets[0].getsockname())
        msg = b"p" * size
        before = stats()
        for _ in range(rounds):
            w.write(msg)
            assert await r.readexactly(size) == msg
            await asyncio.sleep(0.001)  # the I/O thread goes to sleep
        after = stats()
        w.close()
        srv.close()
        await srv.wait_closed()
        return before, after

    before, after = run_on(loop, main())
    written = total(after, "bytes_written") - total(before, "bytes_written")
    read = total(after, "bytes_read") - total(before, "bytes_read")
    assert read >= 2 * rounds * size, read
    assert written >= 2 * rounds * size, written


# --------------------------------------------------------------------------
# io_threads


def test_io_threads_attribute(new_loop):
    """new_event_loop(io_threads=N) -> loop.io_threads == N, a read-only int;
    the pool then has at least N threads."""
    for n in (1, 2, 3):
        loop = new_loop(io_threads=n)
        assert loop.io_threads == n
        assert type(loop.io_threads) is int
        run_on(loop, echo_through(loop, b"x"))
        assert len(stats()) >= n
    with pytest.raises(AttributeError):
        loop.io_threads = 5
    assert loop.io_threads == 3


def test_default_io_threads():
    """Without io_threads a loop uses default_io_threads(), an int >= 0."""
    loop = mtloop.new_event_loop()
    try:
        assert type(loop.io_threads) is int
        assert loop.io_threads == mtloop.default_io_threads() >= 0
    finally:
        loop.close()


@pytest.mark.parametrize("bad", [-1, -100, 65])
def test_io_threads_out_of_range(bad):
    """io_threads negative or past the pool's maximum -> ValueError."""
    with pytest.raises(ValueError):
        mtloop.new_event_loop(io_threads=bad)


@pytest.mark.parametrize("bad", ["2", 2.0, [2]], ids=["str", "float", "list"])
def test_io_threads_must_be_int(bad):
    """io_threads that is not an int -> TypeError."""
    with pytest.raises(TypeError):
        mtloop.new_event_loop(io_threads=bad)


@pytest.mark.parametrize("n", [1, 2])
def test_connections_spread_over_io_threads(new_loop, n):
    """With io_threads=N and 20 connections (40 transports) open, exactly N
    I/O threads own more transports than before, none of them all (N=2)."""
    loop = new_loop(io_threads=n)
    run_on(loop, echo_through(loop, b"warm up"))

    async def main():
        base = by_thread(await quiet_stats())
        server = await loop.create_server(EchoServer, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()
        conns = []
        try:
            for _ in range(20):
                t, p = await loop.create_connection(lambda: Collect(loop, 2), *addr)
                t.write(b"hi")
                await p.done
                conns.append((t, p))
            now = by_thread(stats())
            grew = {tid: now[tid]["transports"] - base.get(tid, {"transports": 0})["transports"]
                    for tid in now}
            used = {tid: g for tid, g in grew.items() if g > 0}
            assert len(used) == n, f"io_threads={n}, transports added per thread: {grew}"
            assert sum(used.values()) >= 40
        finally:
            for t, p in conns:
                t.close()
                await p.lost
            server.close()
            await server.wait_closed()

    run_on(loop, main())


def _child_env(**extra):
    env = dict(os.environ)
    env.pop("MTLOOP_IO_THREADS", None)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(mtloop.__file__)))
    env["PYTHONPATH"] = pkg_parent + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_child(code, tmp_path, timeout=60, **env):
    """Run ``code`` in a fresh interpreter importing the same mtloop; returns
    the CompletedProcess (fails the test on a hang)."""
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            cwd=str(tmp_path), env=_child_env(**env), capture_output=True,
            timeout=timeout, text=True)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"child interpreter hung (> {timeout} s); "
                    f"output: {exc.stdout!r} {exc.stderr!r}")


def test_io_threads_from_environment(tmp_path):
    """$MTLOOP_IO_THREADS sets the default io_threads (0: inline); without it
    the default is the number of CPUs the process may use (its affinity
    mask, capped by its cgroup's CPU quota) less one (the loop thread's
    core), between 0 and 8."""
    code = """
        import os, mtloop
        loop = mtloop.new_event_loop()
        print(loop.io_threads)
        loop.close()
    """
    proc = run_child(code, tmp_path, MTLOOP_IO_THREADS="3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3"
    proc = run_child(code, tmp_path, MTLOOP_IO_THREADS="0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0"
    proc = run_child(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) == min(max(mtloop._mtloop.cpus_usable() - 1, 0), 8)
    assert 1 <= mtloop._mtloop.cpus_usable() <= len(os.sched_getaffinity(0))


def test_one_cpu_runs_inline(tmp_path):
    """A process that may run on one CPU only gets inline loops by default
    (io_threads 0: an I/O thread could only take turns with the loop
    thread), which serve connections and start no I/O thread."""
    code = """
        import asyncio, os, mtloop
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        loop = mtloop.new_event_loop()
        async def echo(r, w):
            w.write(await r.read(100)); await w.drain(); w.close()
        async def main():
            srv = await asyncio.start_server(echo, "127.0.0.1", 0)
            r, w = await asyncio.open_connection(*srv.sockets[0].getsockname())
            w.write(b"ping")
            got = await r.read(100)
            w.close(); srv.close(); await srv.wait_closed()
            return got
        got = loop.run_until_complete(main())
        print(mtloop.default_io_threads(), loop.io_threads, got, mtloop.runtime_stats())
        loop.close()
    """
    proc = run_child(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "0", "b'ping'", "[]"]


def _cpu_cgroup_parent():
    """(directory to make a child cgroup in, its version), or a skip."""
    for mount in ("/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"):
        if os.access(os.path.join(mount, "cpu.cfs_quota_us"), os.R_OK) and os.access(mount, os.W_OK):
            return mount, 1
    try:
        with open("/sys/fs/cgroup/cgroup.subtree_control") as f:
            if "cpu" in f.read().split() and os.access("/sys/fs/cgroup", os.W_OK):
                return "/sys/fs/cgroup", 2
    except OSError:
        pass
    pytest.skip("no writable cgroup with the cpu controller (needs root and cgroup v1's cpu "
                "mount or v2's cpu controller at /sys/fs/cgroup)")


@pytest.mark.parametrize("quota_us,usable", [(100_000, 1), (150_000, 2)])
def test_cgroup_cpu_quota_caps_the_default(tmp_path, quota_us, usable):
    """A process whose cgroup may use one CPU's worth of time (docker
    --cpus=1) sees every CPU in its affinity mask, but gets inline loops;
    with 1.5 CPUs' worth, 2 usable CPUs and one I/O thread."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to tell the quota from the affinity mask")
    parent, version = _cpu_cgroup_parent()
    group = os.path.join(parent, f"mtloop-test-{os.getpid()}")
    try:
        os.mkdir(group)
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup in {parent}: {exc}")
    try:
        if version == 1:
            with open(os.path.join(group, "cpu.cfs_period_us"), "w") as f:
                f.write("100000")
            with open(os.path.join(group, "cpu.cfs_quota_us"), "w") as f:
                f.write(str(quota_us))
        else:
            with open(os.path.join(group, "cpu.max"), "w") as f:
                f.write(f"{quota_us} 100000")
        code = f"""
            import os
            with open({os.path.join(group, "cgroup.procs")!r}, "w") as f:
                f.write(str(os.getpid()))
            import mtloop
            loop = mtloop.new_event_loop()
            print(len(os.sched_getaffinity(0)), mtloop._mtloop.cpus_usable(), loop.io_threads)
            loop.close()
        """
        proc = run_child(code, tmp_path)
        assert proc.returncode == 0, proc.stderr
        affinity, cpus, io_threads = map(int, proc.stdout.split())
        assert affinity >= 2
        assert cpus == usable
        assert io_threads == usable - 1
    finally:
        os.rmdir(group)


_MMAPPED_AFTER = """
    import ctypes, sys
    libc = ctypes.CDLL(None)
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = Info
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    if {imp}:
        import mtloop
    before = libc.mallinfo2().hblks
    block = libc.malloc(400_000)
    print(libc.mallinfo2().hblks - before)  # 1: the block came from mmap()
    libc.free(block)
"""


def test_import_raises_the_malloc_threshold(tmp_path):
    """Importing mtloop moves glibc's dynamic mmap threshold to 512 KiB, as
    the first free of a 512 KiB mmap()ed block would: a 400 KB block then
    comes from the heap.  MTLOOP_MALLOC_THRESHOLD=0 leaves malloc alone."""
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("needs glibc 2.33+ (mallinfo2)")
    raised = run_child(_MMAPPED_AFTER.format(imp=True), tmp_path)
    assert raised.returncode == 0, raised.stderr
    assert raised.stdout.strip() == "0"
    plain = run_child(_MMAPPED_AFTER.format(imp=False), tmp_path)
    left = run_child(_MMAPPED_AFTER.format(imp=True), tmp_path, MTLOOP_MALLOC_THRESHOLD="0")
    assert plain.returncode == 0 and left.returncode == 0, plain.stderr + left.stderr
    # Where this Python's own start-up left the threshold below 400 KB, only
    # mtloop's import moved it.
    assert left.stdout.strip() == plain.stdout.strip()


def test_inline_loop_moves_the_bytes_itself(new_loop):
    """io_threads=0: 4 MB echoed between two transports of the loop; every
    transport reports io_thread -1 (the loop's own runtime), no pool
    thread's counters move, and the data arrives whole."""
    loop = new_loop(io_threads=0)
    assert loop.io_threads == 0
    before = stats()
    data = payload(4 * 1024 * 1024)
    owners = set()

    async def main():
        class Echo(EchoServer):
            def connection_made(self, transport):
                owners.add(transport._core.io_thread)
                super().connection_made(transport)

        srv = await loop.create_server(Echo, "127.0.0.1", 0)
        r, w = await asyncio.open_connection(*srv.sockets[0].getsockname())
        owners.add(w.transport._core.io_thread)
        w.write(data)
        got = await r.readexactly(len(data))
        w.close()
        srv.close()
        await srv.wait_closed()
        return got

    assert loop.inline_stats() is None  # no transport yet
    assert run_on(loop, main()) == data
    assert owners == {-1}
    after = stats()
    assert [(d["thread"], d["bytes_read"]) for d in before] == \
        [(d["thread"], d["bytes_read"]) for d in after]
    own = loop.inline_stats()
    assert set(own) == STAT_KEYS - {"thread", "wakeups_sent", "wakeups_received",
                                    "cpu_ns", "wait_ns"} | {"reads_direct"}
    assert own["bytes_read"] >= 2 * len(data) and own["bytes_written"] >= len(data), own
    assert own["accepts"] == 1 and own["transports"] == 0 and own["listeners"] == 0, own
    # Two plain protocols moving 4 MB: their large reads go straight into
    # the bytes objects data_received() gets.
    assert own["reads_direct"] > 0, own
    assert new_loop(io_threads=1).inline_stats() is None


def test_inline_small_reads_go_through_records(new_loop):
    """io_threads=0: a plain protocol's small messages (1 KiB ping-pong) are
    read through records, batched in the wait: after a connection's first
    reads have sized its block down (two at most, from the 128 KiB a
    connection starts with), none is read directly; every message arrives
    whole."""
    loop = new_loop(io_threads=0)
    rounds = 200

    async def main():
        srv = await loop.create_server(EchoServer, "127.0.0.1", 0)
        r, w = await asyncio.open_connection(*srv.sockets[0].getsockname())
        got = []
        for i in range(rounds):
            msg = bytes([i % 251]) * 1024
            w.write(msg)
            got.append(await r.readexactly(len(msg)) == msg)
        w.close()
        srv.close()
        await srv.wait_closed()
        return got

    assert run_on(loop, main()) == [True] * rounds
    own = loop.inline_stats()
    assert own["bytes_read"] >= 2 * rounds * 1024, own
    assert own["reads_direct"] <= 2 * 2, own  # two connections' first reads


async def until(pred):
    while not pred():
        await asyncio.sleep(0.001)


def connect_clients(srv, n, size):
    """n blocking client sockets connected to `srv`, each with room for
    `size` bytes and more on its sending side, so that sendall() never
    waits for a loop that is not running."""
    clients = []
    for _ in range(n):
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * size)
        c.connect(srv.sockets[0].getsockname())
        clients.append(c)
    return clients


def test_inline_wait_bounds_the_reads_it_holds(new_loop):
    """io_threads=0: what one wait reads stays in records until the wait
    returns, so a wait that finds many connections readable ends early once
    it holds 8 MiB (io_thread.h, MT_INLINE_HELD_MAX) and the next wait reads
    the rest.  160 connections with 100 KB each waiting come through in
    more than one batch (loop.completion_stats()), every byte intact."""
    loop = new_loop(io_threads=0)
    n, size = 160, 100_000
    received = {}
    made = []

    class Count(asyncio.Protocol):
        def connection_made(self, transport):
            made.append(self)
            received[self] = 0

        def data_received(self, data):
            received[self] += len(data)

    async def main():
        srv = await loop.create_server(Count, "127.0.0.1", 0, backlog=n)
        clients = connect_clients(srv, n, size)
        try:
            await until(lambda: len(made) == n)
            # Small rounds first: libevent's epoll array grows (32 events at
            # first, doubled after each full wait) until one wait sees all.
            for r in range(1, 5):
                for c in clients:
                    c.sendall(b"x")
                await until(lambda: all(v == r for v in received.values()))
            before = loop.completion_stats()
            data = payload(size)
            for c in clients:
                c.sendall(data)  # the loop is not running: all wait in the kernel
            await until(lambda: all(v == 4 + size for v in received.values()))
            after = loop.completion_stats()
            return before, after
        finally:
            for c in clients:
                c.close()
            srv.close()
            await srv.wait_closed()

    before, after = run_on(loop, main())
    # Without the bound all of it comes in one batch (640 completions here).
    assert after["batches"] - before["batches"] >= 2, (before, after)
    assert after["deepest_batch"] < after["completions"] - before["completions"], (before, after)


def held_totals():
    stats = mtloop.runtime_stats()
    return (sum(t["bytes_read"] for t in stats), sum(t["held_back"] for t in stats))


def flood_a_busy_loop(loop, n, size, hold):
    """Runs on `loop`: a server with `n` connections, each of which sends
    `size` bytes while the loop thread is held up (in a callback) until its
    I/O thread parks a connection, then calls hold() there too.  Returns
    (bytes the I/O threads read meanwhile, parks, {protocol: (count, crc)})
    once everything arrived."""
    received = {}
    made = []

    class Crc(asyncio.Protocol):
        def connection_made(self, transport):
            made.append(self)
            received[self] = (0, 0)

        def data_received(self, data):
            count, crc = received[self]
            received[self] = (count + len(data), zlib.crc32(data, crc))

    async def main():
        srv = await loop.create_server(Crc, "127.0.0.1", 0, backlog=n)
        clients = connect_clients(srv, n, size)
        try:
            await until(lambda: len(made) == n)
            read0, held0 = held_totals()
            data = payload(size)
            for c in clients:
                c.sendall(data)
            # The loop thread stays here, popping nothing, until the I/O
            # thread parks a connection (without the bound it never does).
            deadline = time.monotonic() + 20
            while held_totals()[1] == held0 and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(0.2)  # room for reads that should not happen
            read1, held1 = held_totals()
            hold()
            await until(lambda: all(v[0] == size for v in received.values()))
            return read1 - read0, held1 - held0, received
        finally:
            for c in clients:
                c.close()
            srv.close()
            await srv.wait_closed()

    return run_on(loop, main(), timeout=60)


def test_io_thread_bounds_what_it_holds_for_a_busy_loop(new_loop):
    """With an I/O thread: while the loop thread is busy, the thread reads
    ahead for it into completions, but holds at most 8 MiB of them for that
    loop (runtime.h, MT_LANE_HELD_MAX).  The connections past the bound are
    parked (runtime_stats()'s held_back counts them) and resume once the
    loop has popped half: 160 connections with 100 KB each, sent while the
    loop is blocked, all arrive intact."""
    size, bound = 100_000, 8 * 1024 * 1024
    ahead, parked, received = flood_a_busy_loop(new_loop(io_threads=1), 160, size, lambda: None)
    assert parked > 0, ahead
    # One read past the bound at most (a 128 KiB block).
    assert ahead <= bound + 128 * 1024, (ahead, parked)
    want = zlib.crc32(payload(size))
    assert all(v == (size, want) for v in received.values())


def test_a_full_lane_holds_back_only_its_own_loop(new_loop):
    """The bound is per loop: while one loop's connections are parked on an
    I/O thread, another loop served by the same thread reads and writes as
    before (an echo of 4 MB), and the first loop then gets all of its data.
    (A thread that stopped reading for everyone would hang the second loop:
    the first one's thread may be waiting for it.)"""
    busy, other = new_loop(io_threads=1), new_loop(io_threads=1)
    size = 100_000
    parked = threading.Event()
    release = threading.Event()
    result = {}

    def hold():
        parked.set()
        release.wait(30)

    def run_busy():
        asyncio.set_event_loop(busy)
        try:
            result["busy"] = flood_a_busy_loop(busy, 160, size, hold)
        except BaseException as e:  # reported by the main thread
            result["error"] = e
            parked.set()

    th = threading.Thread(target=run_busy)
    th.start()
    try:
        assert parked.wait(40) and "error" not in result, result

        async def echo():
            async def serve(reader, writer):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                writer.close()

            srv = await asyncio.start_server(serve, "127.0.0.1", 0)
            reader, writer = await asyncio.open_connection(*srv.sockets[0].getsockname())
            data = payload(4_000_000)
            writer.write(data)
            writer.write_eof()
            back = await reader.read(-1)
            writer.close()
            srv.close()
            await srv.wait_closed()
            return back == data

        assert run_on(other, echo(), timeout=20)
    finally:
        release.set()
        th.join(60)
    assert "error" not in result, result
    ahead, n_parked, received = result["busy"]
    assert n_parked > 0
    want = zlib.crc32(payload(size))
    assert all(v == (size, want) for v in received.values())


def test_inline_buffered_protocol_reads_into_its_own_buffer(new_loop):
    """io_threads=0: a BufferedProtocol's bytes are read straight into the
    buffers its get_buffer() returns (inline_stats()'s reads_direct counts
    them), each buffer_updated(n) within the buffer just handed out, and 2 MB
    echoed through such a server come back whole, then EOF closes it."""
    loop = new_loop(io_threads=0)
    data = payload(2 * 1024 * 1024)
    updates = []

    class BufferedEcho(asyncio.BufferedProtocol):
        def connection_made(self, transport):
            self.transport = transport
            self.buf = bytearray(8192)
            self.closed = loop.create_future()

        def get_buffer(self, sizehint):
            return self.buf

        def buffer_updated(self, nbytes):
            updates.append(nbytes)
            self.transport.write(bytes(self.buf[:nbytes]))

        def connection_lost(self, exc):
            self.closed.set_result(exc)

    servers = []

    def factory():
        servers.append(BufferedEcho())
        return servers[-1]

    async def main():
        srv = await loop.create_server(factory, "127.0.0.1", 0)
        r, w = await asyncio.open_connection(*srv.sockets[0].getsockname())
        w.write(data)
        got = await r.readexactly(len(data))
        w.close()
        assert await asyncio.wait_for(servers[0].closed, 10) is None
        srv.close()
        await srv.wait_closed()
        return got

    assert run_on(loop, main()) == data
    assert sum(updates) == len(data) and max(updates) <= 8192
    own = loop.inline_stats()
    # The server's reads only: the client is a streams protocol.
    assert own["reads_direct"] >= len(data) // 8192, own


# --------------------------------------------------------------------------
# shutdown_runtime / interpreter exit


def test_shutdown_runtime_then_reuse(new_loop):
    """shutdown_runtime() with no loop using the runtime; a loop made
    afterwards works (a fresh pool starts) and shows up in runtime_stats()."""
    loop = new_loop(io_threads=2)
    run_on(loop, echo_through(loop, b"before"))
    loop.close()
    mtloop.shutdown_runtime()
    loop = new_loop(io_threads=2)
    assert run_on(loop, echo_through(loop, b"after shutdown")) == b"after shutdown"
    snap = stats()
    assert len(snap) >= 2
    assert total(snap, "bytes_read") >= 2 * len(b"after shutdown")


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_shutdown_runtime_with_open_transports_leaks_no_fd(new_loop):
    """shutdown_runtime() while transports are open: each gets
    connection_lost(ConnectionAbortedError), and once they are gone every
    descriptor they held is closed (the I/O thread's copy of a
    connection's fd is the one the pool's stop releases)."""
    loop = new_loop(io_threads=2)
    lost = []

    class Proto(asyncio.Protocol):
        def connection_lost(self, exc):
            lost.append(exc)

    async def main():
        server = await loop.create_server(Proto, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pairs = [await loop.create_connection(Proto, "127.0.0.1", port) for _ in range(8)]
        await asyncio.sleep(0.05)  # the server side's transports too
        before = _open_fds()
        mtloop.shutdown_runtime()
        deadline = loop.time() + 5
        while len(lost) < 16 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        server.close()
        await server.wait_closed()
        return before, pairs

    before, pairs = run_on(loop, main())
    assert len(lost) == 16, lost
    assert all(isinstance(exc, ConnectionAbortedError) for exc in lost), lost
    # 8 client and 8 server connections, each one descriptor, and the
    # listening socket, are gone.
    assert _open_fds() <= before - 17


def test_shutdown_runtime_stops_threads(tmp_path):
    """In a fresh process: the pool's threads exist after first use
    (/proc/self/task grows by at least io_threads), shutdown_runtime() makes
    them exit (their native ids leave /proc/self/task), and the next loop
    starts a pool again and works."""
    code = """
        import asyncio, os, sys, time, mtloop

        def tasks():
            return {int(t) for t in os.listdir("/proc/self/task")}

        def ntasks():
            return len(tasks())

        class Echo(asyncio.Protocol):
            def connection_made(self, t): self.t = t
            def data_received(self, d): self.t.write(d)

        async def echo(loop):
            server = await loop.create_server(Echo, "127.0.0.1", 0)
            r, w = await asyncio.open_connection(*server.sockets[0].getsockname())
            w.write(b"ping")
            got = await r.readexactly(4)
            w.close(); await w.wait_closed()
            server.close(); await server.wait_closed()
            return got

        t0 = ntasks()
        loop = mtloop.new_event_loop(io_threads=2)
        assert loop.run_until_complete(echo(loop)) == b"ping"
        t1 = ntasks()
        assert t1 >= t0 + 2, (t0, t1)
        pool = {s["native_id"] for s in mtloop.runtime_stats()}
        assert len(pool) >= 2 and pool <= tasks(), (pool, tasks())
        loop.close()
        mtloop.shutdown_runtime()
        # The pool's own threads are gone (counting all threads would also
        # count a sanitizer runtime's helper thread, started lazily).
        deadline = time.monotonic() + 5
        while pool & tasks() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not pool & tasks(), ("threads left after shutdown_runtime()", pool & tasks())
        assert mtloop.runtime_stats() == []
        loop = mtloop.new_event_loop(io_threads=2)
        assert loop.run_until_complete(echo(loop)) == b"ping"
        assert ntasks() >= t0 + 2
        assert len(mtloop.runtime_stats()) >= 2
        loop.close()
        print("ok")
    """
    proc = run_child(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.parametrize("how", ["loop-closed", "left-open", "sys-exit-inside-run"])
def test_interpreter_exit_with_running_pool(tmp_path, how):
    """A process that used the runtime exits cleanly (status 0, no fatal
    error, no hang) whether it closed its loop, left a server and
    connections open, or called sys.exit() from a coroutine."""
    code = """
        import asyncio, sys, mtloop
        HOW = %r

        class Echo(asyncio.Protocol):
            def connection_made(self, t): self.t = t
            def data_received(self, d): self.t.write(d)

        keep = []

        async def main(loop):
            server = await loop.create_server(Echo, "127.0.0.1", 0)
            r, w = await asyncio.open_connection(*server.sockets[0].getsockname())
            w.write(b"x" * 100000)
            await r.readexactly(100000)
            keep.extend([server, r, w])
            print("served", flush=True)
            if HOW == "sys-exit-inside-run":
                sys.exit(0)

        loop = mtloop.new_event_loop(io_threads=2)
        loop.run_until_complete(main(loop))
        if HOW == "loop-closed":
            keep[0].close()
            keep[2].close()
            loop.run_until_complete(asyncio.sleep(0.05))
            loop.close()
    """ % how
    proc = run_child(code, tmp_path, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "served"
    assert "Fatal Python error" not in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


# --------------------------------------------------------------------------
# fork


def _in_child(pipe_w, body):
    """Run ``body`` in the forked child; report through the pipe; never
    return (os._exit)."""
    code = 1
    try:
        body()
        msg = "ok"
        code = 0
    except BaseException:
        msg = traceback.format_exc()
    try:
        os.write(pipe_w, msg.encode()[:60000])
    finally:
        os._exit(code)


def _fork_and_check(body, timeout=30):
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        _in_child(w, body)
    os.close(w)
    chunks = []
    import select
    deadline = timeout
    while True:
        ready, _, _ = select.select([r], [], [], deadline)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            pytest.fail(f"forked child hung (> {timeout} s)")
        data = os.read(r, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    msg = b"".join(chunks).decode(errors="replace")
    assert os.WIFEXITED(status), f"child died: status {status}; {msg}"
    assert os.WEXITSTATUS(status) == 0 and msg == "ok", msg
    return msg


def test_fork_child_new_loop_works_old_loop_refuses():
    """After os.fork() in a process whose I/O threads are running: in the
    child a NEW mtloop loop serves an echo (fresh runtime), while running a
    loop created before the fork raises RuntimeError mentioning fork.  The
    parent's loop keeps working."""
    pre = mtloop.new_event_loop(io_threads=1)
    try:
        assert run_on(pre, echo_through(pre, b"before fork")) == b"before fork"

        def child():
            try:
                pre.call_soon(pre.stop)
                pre.run_forever()
            except RuntimeError as exc:
                assert "fork" in str(exc).lower(), f"RuntimeError without 'fork': {exc}"
            else:
                raise AssertionError("a loop from before the fork ran in the child")
            loop = mtloop.new_event_loop(io_threads=1)
            try:
                got = run_on(loop, echo_through(loop, b"in the child"), timeout=15)
                assert got == b"in the child", got
                assert len(mtloop.runtime_stats()) >= 1
            finally:
                loop.close()

        _fork_and_check(child)
        assert run_on(pre, echo_through(pre, b"parent after fork")) == b"parent after fork"
    finally:
        pre.close()


def test_fork_child_can_use_runtime_twice():
    """In the forked child two loops in turn work (the lazily recreated
    runtime stays usable), and the child exits normally."""
    warm = mtloop.new_event_loop()
    try:
        run_on(warm, echo_through(warm, b"warm"))
    finally:
        warm.close()

    def child():
        for i in range(2):
            loop = mtloop.new_event_loop(io_threads=2)
            try:
                got = run_on(loop, echo_through(loop, b"child %d" % i), timeout=15)
                assert got == b"child %d" % i
            finally:
                loop.close()

    _fork_and_check(child)


# --------------------------------------------------------------------------
# the loop thread does not move the bytes


def _task_io(tid=None):
    """(rchar, wchar) of one thread, or of the whole process if tid is None."""
    path = "/proc/self/io" if tid is None else f"/proc/self/task/{tid}/io"
    with open(path) as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["rchar"]), int(fields["wchar"])


def test_loop_thread_does_not_move_the_bytes(new_loop):
    """50 MB sent one way between two transports of one loop: the loop
    thread's own read/write byte counts (/proc/self/task/<tid>/io rchar +
    wchar) grow by far less than the payload (< 10%): the bytes were moved
    by the I/O threads.  Linux counts read/readv/write/writev in rchar/wchar
    but not recv/send/sendmsg, so the test skips unless (1) socket read()/
    write() in the loop thread are accounted (calibrated first) and (2) the
    transfer's reads show in the whole process's rchar (the transports use
    read-family calls); otherwise it would pass vacuously."""
    loop = new_loop()
    n = 50 * 1024 * 1024

    async def main():
        tid = threading.get_native_id()
        try:
            _task_io(tid)
        except (OSError, KeyError, ValueError) as exc:
            pytest.skip(f"/proc/self/task/<tid>/io is not readable: {exc}")
        # calibration: are socket read()/write() of this thread accounted?
        a, b = __import__("socket").socketpair()
        try:
            r0, w0 = _task_io(tid)
            blob = b"c" * 100_000
            os.write(a.fileno(), blob)
            got = 0
            while got < len(blob):
                got += len(os.read(b.fileno(), 1 << 20))
            r1, w1 = _task_io(tid)
        finally:
            a.close()
            b.close()
        if r1 - r0 < len(blob) or w1 - w0 < len(blob):
            pytest.skip("this kernel does not account socket read()/write() in "
                        "/proc/self/task/<tid>/io")
        await echo_through(loop, b"warm up")
        io_tids = [s["native_id"] for s in mtloop.runtime_stats()]
        pr0, pw0 = _task_io()
        r0, w0 = _task_io(tid)
        io0 = sum(_task_io(t)[0] for t in io_tids)
        await one_way(loop, n)
        io1 = sum(_task_io(t)[0] for t in io_tids)
        r1, w1 = _task_io(tid)
        pr1, pw1 = _task_io()
        if pr1 - pr0 < n:
            pytest.skip("the transports' reads do not show in the process's rchar "
                        "(recv() rather than read()?): the per-thread check would prove nothing")
        return (r1 - r0) + (w1 - w0), io1 - io0

    moved, io_read = run_on(loop, main(), timeout=60)
    assert moved < 0.1 * n, f"the loop thread read/wrote {moved} bytes of a {n}-byte transfer"
    # ...and the I/O threads (found by runtime_stats()'s native_id) did.
    assert io_read >= n, f"the I/O threads read {io_read} bytes of a {n}-byte transfer"


# ---- hardening (issue #9) ------------------------------------------------


def listening_socket(backlog=8):
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(backlog)
    lsock.setblocking(False)
    return lsock


async def recv_exactly(loop, sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def total_accepts():
    return sum(d["accepts"] for d in mtloop.runtime_stats())


# --------------------------------------------------------------------------
# 1. a transport used in a forked child


def _fork_child(body, timeout=15):
    """Run ``body()`` (returns a JSON-able value) in a forked child; return
    that value, or fail on a crash or hang."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # child: never returns
        code = 1
        try:
            os.close(r)
            msg = json.dumps({"ok": body()})
            code = 0
        except BaseException:
            msg = json.dumps({"error": traceback.format_exc()})
        try:
            os.write(w, msg.encode()[:60000])
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([r], [], [], max(left, 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"forked child hung (> {timeout} s)")
            data = os.read(r, 65536)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    raw = b"".join(chunks).decode(errors="replace")
    assert os.WIFEXITED(status), f"forked child died: status {status}; {raw}"
    result = json.loads(raw)
    assert "error" not in result, result["error"]
    return result["ok"]


# Defect: in a forked child an inherited transport still works: write()
# sends on the parent's socket (the direct-send path), and nothing raises
# RuntimeError, unlike running the inherited loop there.
def test_inherited_transport_refuses_use_in_forked_child(new_loop):
    loop = new_loop()
    lsock = listening_socket()

    async def connect():
        reader, writer = await asyncio.open_connection(*lsock.getsockname())
        peer, _ = await loop.sock_accept(lsock)
        writer.write(b"hello")
        assert await recv_exactly(loop, peer, 5) == b"hello"
        await asyncio.sleep(0.1)  # let the I/O thread go idle
        return reader, writer, peer

    reader, writer, peer = run_on(loop, connect())
    try:
        transport = writer.transport

        def child():
            results = {}

            def attempt(name, fn):
                try:
                    fn()
                except RuntimeError:
                    results[name] = "RuntimeError"
                except BaseException as exc:
                    results[name] = f"{type(exc).__name__}: {exc}"
                else:
                    results[name] = "no error"

            attempt("get_write_buffer_size", transport.get_write_buffer_size)
            attempt("pause_reading", transport.pause_reading)
            attempt("resume_reading", transport.resume_reading)
            attempt("transport.write", lambda: transport.write(b"x"))
            attempt("writer.write", lambda: writer.write(b"y"))
            attempt("close", transport.close)
            attempt("abort", transport.abort)
            return results

        results = _fork_child(child)
        problems = [f"{name} in the child: {results[name]}"
                    for name in ("get_write_buffer_size", "pause_reading", "resume_reading",
                                 "transport.write", "writer.write")
                    if results[name] != "RuntimeError"]
        problems += [f"{name} in the child: {results[name]}"
                     for name in ("close", "abort")
                     if results[name] not in ("RuntimeError", "no error")]

        async def check_parent():
            await asyncio.sleep(0.3)
            peer.setblocking(False)
            try:
                leaked = peer.recv(1 << 16)
            except BlockingIOError:
                leaked = None
            if leaked is not None:
                problems.append(f"the parent's peer received {leaked!r} from the child")
            writer.write(b"ping")
            got = await asyncio.wait_for(recv_exactly(loop, peer, 4), 5)
            if got != b"ping":
                problems.append(f"parent's transport after the fork: peer got {got!r}")
            await loop.sock_sendall(peer, b"pong")
            back = await asyncio.wait_for(reader.readexactly(4), 5)
            if back != b"pong":
                problems.append(f"parent's transport after the fork: read {back!r}")

        run_on(loop, check_parent())
        assert not problems, problems
    finally:
        writer.close()
        try:
            run_on(loop, writer.wait_closed(), timeout=5)
        except Exception:
            pass
        peer.close()
        lsock.close()


# --------------------------------------------------------------------------
# 2. accepting while the loop does not take the connections


CLIENTS = 300
ACCEPT_BOUND = 150  # the listen backlog: accepted ahead of the loop at most


class Quiet(asyncio.Protocol):
    pass


# Defect: the I/O thread accepts every pending connection while the loop
# thread is blocked (no ACCEPT completion consumed): no back-pressure, the
# kernel backlog is emptied into the loop's completion queue.  The bound is
# the backlog, as asyncio accepts up to `backlog` connections an iteration.
def test_accepts_bounded_while_loop_blocked(new_loop):
    loop = new_loop()
    server = run_on(loop, loop.create_server(Quiet, "127.0.0.1", 0, backlog=ACCEPT_BOUND))
    addr = server.sockets[0].getsockname()
    run_on(loop, asyncio.sleep(0.05))
    base = total_accepts()
    clients = []
    result = {}

    def connect_all():
        for _ in range(CLIENTS):
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.settimeout(5)
            try:
                c.connect(addr)
            except OSError:
                c.close()
                break
            clients.append(c)

    def block_loop_thread():
        t = threading.Thread(target=connect_all)
        t.start()
        deadline = time.monotonic() + 2.0
        while t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # time enough for an I/O thread to accept them all
        result["accepts"] = total_accepts() - base
        result["connected"] = len(clients)
        t.join(5)

    async def main():
        loop.call_soon(block_loop_thread)
        await asyncio.sleep(0.05)

    try:
        run_on(loop, main())
        assert result["connected"] >= ACCEPT_BOUND + 50, result
        assert result["accepts"] <= ACCEPT_BOUND, (
            f"{result['accepts']} of {result['connected']} connections accepted while the "
            f"loop thread was blocked (bound {ACCEPT_BOUND})")
    finally:
        for c in clients:
            c.close()
        server.close()
        run_on(loop, server.wait_closed(), timeout=10)
        run_on(loop, asyncio.sleep(0.1))


# --------------------------------------------------------------------------
# 3. a daemon thread using mtloop while the interpreter exits


_EXIT_CHILD = """
import atexit, os, sys, threading, time

state = {"exiting": False, "after": []}


def late():
    # Registered before mtloop is imported: runs after mtloop's own
    # exit-time shutdown_runtime().
    state["exiting"] = True
    time.sleep(0.5)
    import mtloop
    print("POOL", len(mtloop.runtime_stats()), flush=True)
    print("AFTER", json.dumps(sorted(set(state["after"]))), len(state["after"]), flush=True)


atexit.register(late)

import asyncio, json, socket
import mtloop

lsock = socket.socket()
lsock.bind(("127.0.0.1", 0))
lsock.listen(4096)
addr = lsock.getsockname()
started = threading.Event()


def daemon():
    loop = mtloop.new_event_loop()

    async def one():
        t, p = await loop.create_connection(asyncio.Protocol, *addr)
        t.abort()

    while True:
        exiting = state["exiting"]
        try:
            loop.run_until_complete(one())
            outcome = "connected"
        except BaseException as exc:
            outcome = type(exc).__name__
        if exiting:
            state["after"].append(outcome)
        started.set()
        time.sleep(0.01)


threading.Thread(target=daemon, daemon=True).start()
started.wait(10)
time.sleep(0.1)
print("MAIN EXITS", len(mtloop.runtime_stats()), flush=True)
"""


# Defect: after the exit-time shutdown_runtime(), a daemon thread's loop
# restarts the I/O pool (its connections keep succeeding) instead of
# getting RuntimeError.
def test_pool_not_restarted_after_exit_shutdown(tmp_path):
    proc = run_child(_EXIT_CHILD, tmp_path, timeout=30)
    out = proc.stdout
    assert "Fatal Python error" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 0, f"rc {proc.returncode}; {out!r}; {proc.stderr[-2000:]!r}"
    lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert "POOL" in lines, out
    after = lines.get("AFTER", "")
    assert lines["POOL"].strip() == "0", (
        f"I/O threads running after the exit-time shutdown: {lines['POOL'].strip()}; "
        f"the daemon's attempts after it: {after}")
    assert "connected" not in after, after


# --------------------------------------------------------------------------
# 4. a loop collected without close() while it has open transports


_GC_CHILD = """
import asyncio, gc, os, socket, sys, time, warnings
warnings.simplefilter("ignore", ResourceWarning)
import mtloop

N = 20
lsock = socket.socket()
lsock.bind(("127.0.0.1", 0))
lsock.listen(64)


def make_and_drop():
    loop = mtloop.new_event_loop()

    async def connect():
        conns = []
        for _ in range(N):
            conns.append(await loop.create_connection(asyncio.Protocol, *lsock.getsockname()))
        for t, p in conns:
            t.write(b"hello")
        await asyncio.sleep(0.1)
        return conns

    conns = loop.run_until_complete(connect())
    peers = []
    lsock.settimeout(5)
    for _ in range(N):
        peers.append(lsock.accept()[0])
    return peers  # the loop and its transports are dropped here, not closed


peers = make_and_drop()
gc.collect()
gc.collect()

closed = 0
for peer in peers:
    peer.settimeout(5)
    data = b""
    try:
        while True:
            chunk = peer.recv(65536)
            if not chunk:
                closed += 1
                break
            data += chunk
    except ConnectionResetError:
        closed += 1
    except socket.timeout:
        pass
print("PEERS_CLOSED", closed, N, flush=True)

# New descriptors right after: each must work and keep its bytes (an I/O
# thread still reading or closing an old fd number would take them).
pairs = [socket.socketpair() for _ in range(200)]
time.sleep(0.5)
bad = 0
for a, b in pairs:
    try:
        a.sendall(b"z")
        b.settimeout(2)
        if b.recv(1) != b"z":
            bad += 1
    except OSError:
        bad += 1
print("FDS_BAD", bad, len(pairs), flush=True)
for a, b in pairs:
    a.close()
    b.close()

# The runtime still serves a new loop.
loop = mtloop.new_event_loop()


async def echo():
    class Echo(asyncio.Protocol):
        def connection_made(self, t):
            self.t = t

        def data_received(self, d):
            self.t.write(d)

    server = await loop.create_server(Echo, "127.0.0.1", 0)
    r, w = await asyncio.open_connection(*server.sockets[0].getsockname())
    w.write(b"echo")
    got = await asyncio.wait_for(r.readexactly(4), 5)
    w.close()
    await w.wait_closed()
    server.close()
    await server.wait_closed()
    return got


print("ECHO", loop.run_until_complete(echo()), flush=True)
loop.close()
"""


# Checks a loop garbage-collected without close() while it has open
# transports: no crash or hang, the peers see the connections closed, new
# descriptors opened right after work, no libevent warning, the runtime
# still serves a new loop.
def test_loop_collected_with_open_transports(tmp_path):
    proc = run_child(_GC_CHILD, tmp_path, timeout=30)
    out = proc.stdout
    assert "Fatal Python error" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 0, f"rc {proc.returncode}; {out!r}; {proc.stderr[-2000:]!r}"
    lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    closed, n = map(int, lines["PEERS_CLOSED"].split())
    assert closed == n, f"only {closed} of {n} peers saw their connection closed"
    bad, total = map(int, lines["FDS_BAD"].split())
    assert bad == 0, f"{bad} of {total} new socketpairs misbehaved"
    assert lines["ECHO"].strip() == "b'echo'", out
    assert "[warn]" not in proc.stderr and "[err]" not in proc.stderr, proc.stderr[-2000:]
