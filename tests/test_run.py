"""run_forever / run_until_complete / stop / close / is_running / is_closed."""

import asyncio
import gc
import threading
import time

import pytest

from conftest import HANG_TIMEOUT, _asyncio_new_event_loop

ALREADY_RUNNING_MSG = ("uvloop's message is 'this event loop is already running.' (lower "
                       "case), not asyncio's 'This event loop is already running'")
ANOTHER_LOOP_MSG = "Cannot run the event loop while another loop is running"


def test_isinstance_abstract_event_loop(loop, impl):
    assert isinstance(loop, asyncio.AbstractEventLoop)
    assert isinstance(loop, impl.loop_class)


def test_initial_state(loop):
    assert not loop.is_running()
    assert not loop.is_closed()
    repr(loop)


def test_stop_before_run_forever_runs_one_iteration(loop):
    calls = []

    def first():
        calls.append("first")
        loop.call_soon(calls.append, "scheduled-by-first")

    loop.call_soon(first)
    loop.call_soon(calls.append, "second")
    loop.stop()
    loop.run_forever()
    # everything already scheduled ran; what they scheduled did not
    assert calls == ["first", "second"]
    assert not loop.is_running()
    # the stop request was consumed: the next run_forever needs a new stop()
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert calls == ["first", "second", "scheduled-by-first"]


def test_stop_before_run_forever_with_nothing_scheduled(loop):
    loop.stop()
    loop.run_forever()  # returns after a single (empty) iteration
    assert not loop.is_running()


@pytest.mark.uvloop_xfail("uvloop keeps running callbacks scheduled during the iteration in "
                          "which stop() was called, instead of leaving them for the next run")
def test_stop_inside_callback_finishes_current_iteration(loop):
    calls = []

    def a():
        calls.append("a")
        loop.stop()
        loop.call_soon(calls.append, "next-iteration")

    loop.call_soon(a)
    loop.call_soon(calls.append, "b")  # same iteration as a: still runs
    loop.run_forever()
    assert calls == ["a", "b"]
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert calls == ["a", "b", "next-iteration"]


def test_stop_twice_is_harmless(loop):
    loop.call_soon(loop.stop)
    loop.call_soon(loop.stop)
    loop.run_forever()
    calls = []
    loop.call_soon(calls.append, 1)
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert calls == [1]


def test_run_forever_repeatedly(loop):
    for i in range(20):
        calls = []
        loop.call_soon(calls.append, i)
        loop.call_soon(loop.stop)
        loop.run_forever()
        assert calls == [i]


def test_stop_from_timer(loop):
    calls = []
    loop.call_later(0.01, loop.stop)
    loop.call_later(3600, calls.append, "never")
    loop.run_forever()
    assert calls == []


def test_is_running_inside_and_outside(loop):
    seen = []

    def cb():
        seen.append(loop.is_running())
        seen.append(asyncio.get_running_loop() is loop)
        seen.append(asyncio.get_event_loop() is loop)
        loop.stop()

    assert not loop.is_running()
    loop.call_soon(cb)
    loop.run_forever()
    assert seen == [True, True, True]
    assert not loop.is_running()
    assert asyncio._get_running_loop() is None


def test_get_running_loop_in_coroutine(loop):
    async def main():
        return asyncio.get_running_loop(), asyncio.get_event_loop(), loop.is_running()

    running, current, is_running = loop.run_until_complete(main())
    assert running is loop
    assert current is loop
    assert is_running is True


def test_run_until_complete_result(loop):
    async def main():
        await asyncio.sleep(0)
        return "result"

    assert loop.run_until_complete(main()) == "result"
    assert not loop.is_running()


def test_run_until_complete_exception(loop):
    class MyError(Exception):
        pass

    async def main():
        await asyncio.sleep(0)
        raise MyError("boom")

    with pytest.raises(MyError, match="boom"):
        loop.run_until_complete(main())
    assert not loop.is_running()
    # still usable
    assert loop.run_until_complete(asyncio.sleep(0, "ok")) == "ok"


def test_run_until_complete_future(loop):
    fut = loop.create_future()
    loop.call_soon(fut.set_result, 5)
    assert loop.run_until_complete(fut) == 5


def test_run_until_complete_done_future(loop):
    fut = loop.create_future()
    fut.set_result("done")
    assert loop.run_until_complete(fut) == "done"


def test_run_until_complete_awaitable(loop):
    class Awaitable:
        def __await__(self):
            return (yield from asyncio.sleep(0, "awaited").__await__())

    assert loop.run_until_complete(Awaitable()) == "awaited"


def test_run_until_complete_task(loop):
    async def main():
        return 7

    task = loop.create_task(main())
    assert loop.run_until_complete(task) == 7
    assert task.done()


def test_run_until_complete_cancelled_future(loop):
    fut = loop.create_future()
    loop.call_soon(fut.cancel)
    with pytest.raises(asyncio.CancelledError):
        loop.run_until_complete(fut)


def test_run_until_complete_not_awaitable(loop):
    with pytest.raises(TypeError):
        loop.run_until_complete(42)


def test_run_until_complete_stopped_before_future_completed(loop):
    fut = loop.create_future()
    loop.call_soon(loop.stop)
    with pytest.raises(RuntimeError, match="Event loop stopped before Future completed."):
        loop.run_until_complete(fut)
    assert not fut.done()
    assert not loop.is_running()
    # the future can still be completed by a later run
    loop.call_soon(fut.set_result, 1)
    assert loop.run_until_complete(fut) == 1


def test_run_until_complete_stopped_before_coroutine_completed(loop):
    async def main():
        loop.stop()
        await asyncio.sleep(3600)

    task = loop.create_task(main())
    with pytest.raises(RuntimeError, match="Event loop stopped before Future completed."):
        loop.run_until_complete(task)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        loop.run_until_complete(task)


def test_run_until_complete_future_of_other_loop(loop):
    other = _asyncio_new_event_loop()
    try:
        fut = other.create_future()
        with pytest.raises(ValueError, match="The future belongs to a different loop"):
            loop.run_until_complete(fut)
    finally:
        other.close()
    assert not loop.is_running()


def test_run_until_complete_future_of_same_factory_other_loop(loop, loop_factory):
    other = loop_factory()
    try:
        fut = other.create_future()
        with pytest.raises(ValueError, match="The future belongs to a different loop"):
            loop.run_until_complete(fut)
    finally:
        other.close()


@pytest.mark.uvloop_xfail(ALREADY_RUNNING_MSG)
def test_run_forever_while_running(loop):
    errors = []

    def cb():
        try:
            loop.run_forever()
        except RuntimeError as exc:
            errors.append(exc)
        loop.stop()

    loop.call_soon(cb)
    loop.run_forever()
    assert len(errors) == 1
    assert "This event loop is already running" in str(errors[0])
    assert not loop.is_running()


@pytest.mark.uvloop_xfail(ALREADY_RUNNING_MSG)
def test_run_until_complete_while_running(loop):
    async def inner():
        return 1

    async def main():
        coro = inner()
        try:
            with pytest.raises(RuntimeError, match="This event loop is already running"):
                loop.run_until_complete(coro)
        finally:
            coro.close()
        return "still fine"

    assert loop.run_until_complete(main()) == "still fine"
    assert not loop.is_running()


@pytest.mark.parametrize("inner_kind", ["same-implementation", "stock-asyncio"])
def test_run_while_other_loop_runs_in_thread(loop, loop_factory, inner_kind):
    inner = loop_factory() if inner_kind == "same-implementation" else _asyncio_new_event_loop()
    try:
        async def main():
            # A done future: should the check be missing, the call returns
            # (and the test fails) instead of hanging.
            fut = inner.create_future()
            fut.set_result(None)
            with pytest.raises(RuntimeError, match=ANOTHER_LOOP_MSG):
                inner.run_until_complete(fut)
            assert not inner.is_running()
            # run_forever last: CPython 3.13.0's run_forever() clears the
            # running-loop registry when this check fails.
            inner.call_soon(inner.stop)
            with pytest.raises(RuntimeError, match=ANOTHER_LOOP_MSG):
                inner.run_forever()
            assert not inner.is_running()
            return "ok"

        assert loop.run_until_complete(main()) == "ok"
    finally:
        inner.close()


def test_stock_loop_refuses_to_run_inside_this_loop(loop):
    """The running-loop registry is shared: asyncio sees our loop as running."""
    stock = _asyncio_new_event_loop()
    try:
        def cb():
            coro = asyncio.sleep(0)
            try:
                with pytest.raises(RuntimeError, match="another loop is running"):
                    stock.run_until_complete(coro)
            finally:
                coro.close()
                loop.stop()

        loop.call_soon(cb)
        loop.run_forever()
    finally:
        stock.close()


def test_this_loop_refuses_to_run_inside_stock_loop(loop):
    stock = _asyncio_new_event_loop()
    try:
        async def main():
            fut = loop.create_future()
            fut.set_result(None)
            with pytest.raises(RuntimeError, match="another loop is running"):
                loop.run_until_complete(fut)
            loop.call_soon(loop.stop)
            with pytest.raises(RuntimeError, match="another loop is running"):
                loop.run_forever()
            return True

        assert stock.run_until_complete(main())
    finally:
        stock.close()
    assert not loop.is_running()


def test_loops_in_different_threads(loop_factory):
    results = []

    def thread_main():
        lp = loop_factory()
        try:
            results.append(lp.run_until_complete(asyncio.sleep(0.01, threading.get_ident())))
        finally:
            lp.close()

    threads = [threading.Thread(target=thread_main) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_TIMEOUT)
    assert sorted(results) == sorted(t.ident for t in threads)


def test_close_running_loop(loop):
    errors = []

    def cb():
        try:
            loop.close()
        except RuntimeError as exc:
            errors.append(exc)
        loop.stop()

    loop.call_soon(cb)
    loop.run_forever()
    assert len(errors) == 1
    assert "Cannot close a running event loop" in str(errors[0])
    assert not loop.is_closed()


def test_close_twice(loop):
    loop.close()
    assert loop.is_closed()
    loop.close()
    assert loop.is_closed()


def test_run_on_closed_loop(loop):
    loop.close()
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        loop.run_forever()
    coro = asyncio.sleep(0)
    try:
        with pytest.raises(RuntimeError, match="Event loop is closed"):
            loop.run_until_complete(coro)
    finally:
        coro.close()


@pytest.mark.uvloop_xfail("uvloop's stop() raises RuntimeError('Event loop is closed') on a "
                          "closed loop; asyncio's stop() just sets a flag")
def test_stop_on_closed_loop_is_harmless(loop):
    loop.close()
    loop.stop()


def test_closed_loop_repr(loop):
    loop.close()
    repr(loop)


def test_close_after_run(loop):
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    assert loop.is_closed()
    assert not loop.is_running()


@pytest.mark.uvloop_xfail("uvloop emits no ResourceWarning('unclosed event loop') when an "
                          "unclosed loop is garbage collected")
def test_unclosed_loop_warns(loop_factory):
    lp = loop_factory()
    with pytest.warns(ResourceWarning, match="unclosed event loop"):
        del lp
        gc.collect()


def test_many_loops_created_and_closed(loop_factory):
    for _ in range(50):
        lp = loop_factory()
        lp.run_until_complete(asyncio.sleep(0))
        lp.close()


@pytest.mark.stress
def test_many_loops_created_and_closed_stress(loop_factory):
    for _ in range(2000):
        lp = loop_factory()
        lp.run_until_complete(asyncio.sleep(0))
        lp.close()


def test_base_exception_from_coroutine(loop):
    class MyBase(BaseException):
        pass

    async def main():
        await asyncio.sleep(0)
        raise MyBase()

    with pytest.raises(MyBase):
        loop.run_until_complete(main())
    assert not loop.is_running()
    assert loop.run_until_complete(asyncio.sleep(0, 1)) == 1


def test_keyboard_interrupt_from_coroutine(loop):
    async def main():
        await asyncio.sleep(0)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loop.run_until_complete(main())
    assert not loop.is_running()
    assert loop.run_until_complete(asyncio.sleep(0, 1)) == 1


def test_timers_survive_between_runs(loop):
    calls = []
    loop.call_later(0.02, calls.append, "timer")
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert calls == []
    fut = loop.create_future()
    loop.call_later(0.03, fut.set_result, None)
    loop.run_until_complete(asyncio.wait_for(fut, HANG_TIMEOUT))
    assert calls == ["timer"]


def test_timer_due_while_not_running_fires_on_next_run(loop):
    calls = []
    loop.call_later(0.001, calls.append, "due")
    end = time.monotonic() + 0.01
    while time.monotonic() < end:  # let the timer become due while stopped
        pass
    loop.call_soon(loop.stop)
    loop.run_forever()
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert calls == ["due"]


def test_loop_run_in_other_thread_then_main_thread(loop):
    """A loop may be created in one thread and run in another, then back."""
    started = threading.Event()
    errors = []

    def thread_main():
        try:
            loop.call_soon(started.set)
            loop.run_forever()
        except BaseException as exc:  # noqa: B902
            errors.append(exc)

    t = threading.Thread(target=thread_main)
    t.start()
    assert started.wait(HANG_TIMEOUT)

    async def in_loop(x):
        await asyncio.sleep(0.001)
        return threading.get_ident(), x

    cf = asyncio.run_coroutine_threadsafe(in_loop(21), loop)
    tid, x = cf.result(HANG_TIMEOUT)
    assert (tid, x) == (t.ident, 21)
    assert loop.is_running()
    loop.call_soon_threadsafe(loop.stop)
    t.join(HANG_TIMEOUT)
    assert not t.is_alive()
    assert errors == []
    assert not loop.is_running()
    # and now in the main thread
    tid, x = loop.run_until_complete(in_loop(2))
    assert (tid, x) == (threading.get_ident(), 2)


def test_loop_created_in_thread_run_in_main(loop_factory):
    box = []
    t = threading.Thread(target=lambda: box.append(loop_factory()))
    t.start()
    t.join(HANG_TIMEOUT)
    lp = box[0]
    try:
        fut = lp.create_future()
        lp.call_later(0.001, fut.set_result, "ok")
        assert lp.run_until_complete(fut) == "ok"
    finally:
        lp.close()


def test_closed_loop_is_garbage_collected(loop_factory):
    import weakref

    lp = loop_factory()

    async def main():
        await asyncio.sleep(0.001)
        await lp.run_in_executor(None, int)
        return asyncio.current_task()

    lp.call_soon(lambda: None)
    lp.call_later(3600, lambda: None)
    lp.run_until_complete(main())
    lp.run_until_complete(lp.shutdown_default_executor())
    lp.close()
    ref = weakref.ref(lp)
    del lp
    gc.collect()
    assert ref() is None, "a closed loop is kept alive (reference leak or uncollectable cycle)"
