"""call_soon_threadsafe from other threads and from the loop's own thread."""

import asyncio
import contextvars
import threading
import time

import pytest

from conftest import HANG_TIMEOUT


def _start_threads(n, target, *args):
    threads = [threading.Thread(target=target, args=(i,) + args, daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def _join(threads):
    for t in threads:
        t.join(HANG_TIMEOUT)
        assert not t.is_alive(), "worker thread hung"


def _many_threads_many_calls(loop, nthreads, ncalls):
    results = {i: [] for i in range(nthreads)}
    total = nthreads * ncalls
    count = [0]
    done = loop.create_future()
    loop_thread = []

    def cb(tid, i):
        loop_thread.append(threading.get_ident())
        results[tid].append(i)
        count[0] += 1
        if count[0] == total:
            done.set_result(None)

    go = threading.Event()

    def worker(tid):
        go.wait(HANG_TIMEOUT)
        for i in range(ncalls):
            loop.call_soon_threadsafe(cb, tid, i)

    threads = _start_threads(nthreads, worker)
    loop.call_soon(go.set)
    try:
        loop.run_until_complete(asyncio.wait_for(done, 30))
    finally:
        go.set()
        _join(threads)
    for tid in range(nthreads):
        assert results[tid] == list(range(ncalls)), f"thread {tid}: lost or reordered calls"
    assert set(loop_thread) == {threading.get_ident()}


def test_many_threads_many_calls(loop):
    _many_threads_many_calls(loop, nthreads=8, ncalls=2000)


@pytest.mark.stress
def test_many_threads_many_calls_stress(loop):
    _many_threads_many_calls(loop, nthreads=32, ncalls=50000)


def test_threadsafe_before_loop_runs(loop):
    calls = []

    def worker(tid):
        loop.call_soon_threadsafe(calls.append, tid)

    _join(_start_threads(4, worker))
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert sorted(calls) == [0, 1, 2, 3]


def test_threadsafe_returns_cancellable_handle(loop):
    calls = []
    handles = []

    def worker(tid):
        handles.append(loop.call_soon_threadsafe(calls.append, "x"))

    _join(_start_threads(1, worker))
    handles[0].cancel()
    assert handles[0].cancelled()
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert calls == []


def test_threadsafe_wakes_loop_sleeping_on_long_timer(loop):
    """A loop blocked waiting for a far timer must wake for call_soon_threadsafe."""
    woken = []
    failures = []
    rounds = 5
    events = [threading.Event() for _ in range(rounds)]
    loop_running = threading.Event()

    def on_wake(i):
        woken.append((i, threading.get_ident()))
        events[i].set()

    def worker():
        try:
            if not loop_running.wait(HANG_TIMEOUT):
                failures.append("loop never started")
                return
            for i in range(rounds):
                # Give the loop time to go back to sleep on the long timer
                # (there is no way to observe that it is blocked); this only
                # makes the wake-up path likely, correctness is checked by the
                # event below.
                time.sleep(0.05)
                loop.call_soon_threadsafe(on_wake, i)
                if not events[i].wait(HANG_TIMEOUT):
                    failures.append(f"callback {i} not run within {HANG_TIMEOUT}s: loop not woken")
                    break
        finally:
            loop.call_soon_threadsafe(loop.stop)

    long_timer = loop.call_later(3600, lambda: None)
    # bounded fallback, so a loop that is never woken does not hang the test
    fallback = loop.call_later(3 * HANG_TIMEOUT, loop.stop)
    loop.call_soon(loop_running.set)
    t = threading.Thread(target=worker, daemon=True)
    t.start()
    loop.run_forever()
    t.join(HANG_TIMEOUT)
    long_timer.cancel()
    fallback.cancel()
    assert failures == []
    assert [i for i, _ in woken] == list(range(rounds))
    assert {tid for _, tid in woken} == {threading.get_ident()}


def test_threadsafe_wakes_loop_without_any_timer(loop):
    loop_running = threading.Event()
    fut = loop.create_future()

    def worker():
        loop_running.wait(HANG_TIMEOUT)
        time.sleep(0.05)  # let the loop block (not synchronisation: see above)
        loop.call_soon_threadsafe(fut.set_result, "woken")

    loop.call_soon(loop_running.set)
    t = threading.Thread(target=worker, daemon=True)
    t.start()
    assert loop.run_until_complete(asyncio.wait_for(fut, HANG_TIMEOUT)) == "woken"
    t.join(HANG_TIMEOUT)


def test_threadsafe_future_set_from_thread_wakes_awaiter(loop):
    async def main():
        fut = loop.create_future()

        def worker():
            loop.call_soon_threadsafe(fut.set_result, 42)

        t = threading.Thread(target=worker)
        t.start()
        result = await fut
        t.join(HANG_TIMEOUT)
        return result

    assert loop.run_until_complete(asyncio.wait_for(main(), HANG_TIMEOUT)) == 42


def test_threadsafe_from_loop_thread_keeps_fifo_with_call_soon(loop):
    calls = []
    loop.call_soon(calls.append, 1)
    h = loop.call_soon_threadsafe(calls.append, 2)
    loop.call_soon(calls.append, 3)
    loop.call_soon_threadsafe(calls.append, 4)
    assert not h.cancelled()
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert calls == [1, 2, 3, 4]


def test_threadsafe_from_inside_callback(loop):
    calls = []

    def cb():
        calls.append("cb")
        loop.call_soon_threadsafe(calls.append, "threadsafe")
        loop.call_soon_threadsafe(loop.stop)

    loop.call_soon(cb)
    loop.call_later(HANG_TIMEOUT, loop.stop)
    loop.run_forever()
    assert calls == ["cb", "threadsafe"]


def test_threadsafe_context(loop):
    var = contextvars.ContextVar("var", default="default")
    ctx = contextvars.copy_context()
    ctx.run(var.set, "thread-ctx")
    seen = []
    fut = loop.create_future()

    def cb():
        seen.append(var.get())
        fut.set_result(None)

    def worker():
        loop.call_soon_threadsafe(cb, context=ctx)

    t = threading.Thread(target=worker)
    t.start()
    loop.run_until_complete(asyncio.wait_for(fut, HANG_TIMEOUT))
    t.join(HANG_TIMEOUT)
    assert seen == ["thread-ctx"]


def test_threadsafe_on_closed_loop_from_thread(loop):
    loop.close()
    errors = []

    def worker():
        try:
            loop.call_soon_threadsafe(lambda: None)
        except BaseException as exc:  # noqa: B902
            errors.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    t.join(HANG_TIMEOUT)
    assert len(errors) == 1
    assert isinstance(errors[0], RuntimeError)
    assert "Event loop is closed" in str(errors[0])


def test_run_coroutine_threadsafe(loop):
    async def coro(x):
        await asyncio.sleep(0)
        return x * 2

    results = []
    loop_running = threading.Event()

    def worker():
        loop_running.wait(HANG_TIMEOUT)
        cf = asyncio.run_coroutine_threadsafe(coro(21), loop)
        results.append(cf.result(HANG_TIMEOUT))
        loop.call_soon_threadsafe(loop.stop)

    loop.call_soon(loop_running.set)
    loop.call_later(3 * HANG_TIMEOUT, loop.stop)
    t = threading.Thread(target=worker)
    t.start()
    loop.run_forever()
    t.join(HANG_TIMEOUT)
    assert results == [42]


def _threadsafe_vs_close(loop, nthreads, ncalls_before_close):
    """Threads hammer call_soon_threadsafe while the loop runs, stops and closes.

    Each thread must end with RuntimeError('Event loop is closed') and nothing
    else (no crash, no other exception)."""
    outcome = {}
    ran = [0]
    enough = loop.create_future()
    go = threading.Event()
    stop = threading.Event()

    def cb():
        ran[0] += 1
        if ran[0] >= ncalls_before_close and not enough.done():
            enough.set_result(None)

    def worker(tid):
        go.wait(HANG_TIMEOUT)
        try:
            n = 0
            while not stop.is_set():
                loop.call_soon_threadsafe(cb)
                n += 1
                if n % 16 == 0:
                    time.sleep(0)  # yield the GIL so the loop thread keeps up
            outcome[tid] = "never saw the loop closed"
        except RuntimeError as exc:
            outcome[tid] = str(exc)
        except BaseException as exc:  # noqa: B902
            outcome[tid] = repr(exc)

    threads = _start_threads(nthreads, worker)
    go.set()
    try:
        loop.run_until_complete(asyncio.wait_for(enough, HANG_TIMEOUT))
    finally:
        loop.close()
        for t in threads:
            t.join(HANG_TIMEOUT)
        stop.set()
        _join(threads)
    assert len(outcome) == nthreads
    assert all(v == "Event loop is closed" for v in outcome.values()), outcome


def test_threadsafe_racing_close(loop):
    _threadsafe_vs_close(loop, nthreads=4, ncalls_before_close=1000)


@pytest.mark.stress
def test_threadsafe_racing_close_stress(loop_factory):
    for _ in range(30):
        _threadsafe_vs_close(loop_factory(), nthreads=8, ncalls_before_close=5000)
