"""create_future / create_task / task factories and asyncio Task & Future on the loop."""

import asyncio
import contextvars
import re
import sys

import pytest

from conftest import PY312, _asyncio_new_event_loop

cvar = contextvars.ContextVar("cvar", default="default")


# --------------------------------------------------------------------------
# create_future


def test_create_future(loop):
    fut = loop.create_future()
    assert asyncio.isfuture(fut)
    assert isinstance(fut, asyncio.Future)
    assert fut.get_loop() is loop
    assert not fut.done()
    fut.set_result(1)
    assert fut.result() == 1


def test_future_done_callbacks_run_via_loop(loop):
    fut = loop.create_future()
    calls = []
    fut.add_done_callback(lambda f: calls.append(f.result()))
    fut.set_result("x")
    assert calls == []  # scheduled with call_soon, not called synchronously
    loop.run_until_complete(asyncio.sleep(0))
    assert calls == ["x"]


def test_future_done_callback_context(loop):
    fut = loop.create_future()
    ctx = contextvars.copy_context()
    ctx.run(cvar.set, "cb-ctx")
    seen = []
    fut.add_done_callback(lambda f: seen.append(cvar.get()), context=ctx)
    fut.set_result(None)
    loop.run_until_complete(asyncio.sleep(0))
    assert seen == ["cb-ctx"]


def test_await_future_set_later(loop):
    async def main():
        fut = loop.create_future()
        loop.call_later(0.01, fut.set_result, "late")
        return await fut

    assert loop.run_until_complete(main()) == "late"


def test_await_future_exception(loop):
    async def main():
        fut = loop.create_future()
        loop.call_soon(fut.set_exception, KeyError("k"))
        return await fut

    with pytest.raises(KeyError):
        loop.run_until_complete(main())


def test_wrap_future_from_executor(loop):
    async def main():
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            cf = ex.submit(lambda: 99)
            return await asyncio.wrap_future(cf)

    assert loop.run_until_complete(main()) == 99


# --------------------------------------------------------------------------
# create_task


async def _value(v):
    await asyncio.sleep(0)
    return v


def test_create_task(loop):
    task = loop.create_task(_value(3))
    assert isinstance(task, asyncio.Task)
    assert task.get_loop() is loop
    assert loop.run_until_complete(task) == 3


def test_create_task_default_name(loop):
    task = loop.create_task(_value(1))
    assert re.fullmatch(r"Task-\d+", task.get_name())
    loop.run_until_complete(task)


def test_create_task_name(loop):
    task = loop.create_task(_value(1), name="my-task")
    assert task.get_name() == "my-task"
    assert "my-task" in repr(task)
    loop.run_until_complete(task)


def test_create_task_context(loop):
    ctx = contextvars.copy_context()
    ctx.run(cvar.set, "task-ctx")

    async def get():
        v = cvar.get()
        cvar.set("changed-in-task")
        return v

    task = loop.create_task(get(), context=ctx)
    assert loop.run_until_complete(task) == "task-ctx"
    assert ctx[cvar] == "changed-in-task"
    assert cvar.get() == "default"


def test_create_task_copies_current_context(loop):
    token = cvar.set("at-creation")
    try:
        async def get():
            return cvar.get()

        task = loop.create_task(get())
        cvar.set("after-creation")
        assert loop.run_until_complete(task) == "at-creation"
    finally:
        cvar.reset(token)


def test_create_task_not_a_coroutine(loop):
    with pytest.raises(TypeError):
        loop.create_task(42)


def test_create_task_on_closed_loop(loop):
    loop.close()
    coro = _value(1)
    try:
        with pytest.raises(RuntimeError, match="Event loop is closed"):
            loop.create_task(coro)
    finally:
        coro.close()


def test_task_factory(loop):
    assert loop.get_task_factory() is None
    created = []

    def factory(lp, coro, **kwargs):
        created.append((lp, kwargs))
        return asyncio.Task(coro, loop=lp, **kwargs)

    loop.set_task_factory(factory)
    assert loop.get_task_factory() is factory
    task = loop.create_task(_value(5), name="factory-made")
    assert loop.run_until_complete(task) == 5
    assert task.get_name() == "factory-made"
    assert created and created[0][0] is loop
    # asyncio.create_task / ensure_future go through the loop's factory too
    n = len(created)

    async def main():
        return await asyncio.create_task(_value(6))

    assert loop.run_until_complete(main()) == 6
    assert len(created) > n
    loop.set_task_factory(None)
    assert loop.get_task_factory() is None


def test_task_factory_with_context(loop):
    ctx = contextvars.copy_context()
    ctx.run(cvar.set, "factory-ctx")
    got = []

    def factory(lp, coro, **kwargs):
        got.append(kwargs.get("context"))
        return asyncio.Task(coro, loop=lp, **kwargs)

    loop.set_task_factory(factory)

    async def get():
        return cvar.get()

    assert loop.run_until_complete(loop.create_task(get(), context=ctx)) == "factory-ctx"
    assert got == [ctx]


def test_task_factory_custom_future(loop):
    class MyTask(asyncio.Task):
        pass

    loop.set_task_factory(lambda lp, coro, **kw: MyTask(coro, loop=lp, **kw))
    task = loop.create_task(_value(1))
    assert isinstance(task, MyTask)
    loop.run_until_complete(task)


@pytest.mark.parametrize("bad", [1, "factory", object()])
def test_set_task_factory_not_callable(loop, bad):
    with pytest.raises(TypeError, match="task factory must be a callable or None"):
        loop.set_task_factory(bad)
    assert loop.get_task_factory() is None


@pytest.mark.skipif(not PY312, reason="asyncio.eager_task_factory is new in 3.12")
@pytest.mark.uvloop_xfail("on 3.13, uvloop's create_task() with asyncio.eager_task_factory "
                          "raises TypeError: factory() got an unexpected keyword "
                          "argument 'eager_start'",
                          condition=sys.version_info >= (3, 13))
def test_eager_task_factory(loop):
    loop.set_task_factory(asyncio.eager_task_factory)
    steps = []

    async def child():
        steps.append("child-start")
        await asyncio.sleep(0)
        steps.append("child-end")
        return "c"

    async def main():
        t = loop.create_task(child())
        steps.append("after-create")
        return await t

    coro = main()
    try:
        assert loop.run_until_complete(coro) == "c"
    finally:
        coro.close()
    assert steps == ["child-start", "after-create", "child-end"]


# --------------------------------------------------------------------------
# tasks: await, cancel, gather, wait_for, timeouts


def test_task_cancel(loop):
    events = []

    async def sleeper():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    async def main():
        t = loop.create_task(sleeper())
        await asyncio.sleep(0)
        assert t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert t.cancelled()
        assert not t.cancel()  # already done
        return "ok"

    assert loop.run_until_complete(main()) == "ok"
    assert events == ["cancelled"]


def test_task_cancel_message(loop):
    async def main():
        t = loop.create_task(asyncio.sleep(3600))
        await asyncio.sleep(0)
        t.cancel("the reason")
        try:
            await t
        except asyncio.CancelledError as exc:
            return exc.args

    assert loop.run_until_complete(main()) == ("the reason",)


def test_task_cancel_before_start(loop):
    started = []

    async def never():
        started.append(1)

    async def main():
        t = loop.create_task(never())
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

    loop.run_until_complete(main())
    assert started == []


def test_gather(loop):
    async def main():
        return await asyncio.gather(_value(1), _value(2), asyncio.sleep(0.01, 3))

    assert loop.run_until_complete(main()) == [1, 2, 3]


def test_gather_return_exceptions(loop):
    async def bad():
        raise ValueError("bad")

    async def main():
        return await asyncio.gather(_value(1), bad(), return_exceptions=True)

    res = loop.run_until_complete(main())
    assert res[0] == 1
    assert isinstance(res[1], ValueError)


def test_wait_for_timeout(loop):
    cancelled = []

    async def slow():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(slow(), 0.01)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(slow(), 0.01)
        return await asyncio.wait_for(_value("fast"), 10)

    assert loop.run_until_complete(main()) == "fast"
    assert cancelled == [True, True]


def test_asyncio_timeout_context_manager(loop):
    async def main():
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await asyncio.sleep(3600)
        async with asyncio.timeout(10) as cm:
            await asyncio.sleep(0)
        assert not cm.expired()
        when = loop.time() + 0.01
        with pytest.raises(TimeoutError):
            async with asyncio.timeout_at(when):
                await asyncio.sleep(3600)
        return "ok"

    assert loop.run_until_complete(main()) == "ok"


def test_task_group(loop):
    async def main():
        async with asyncio.TaskGroup() as tg:
            t1 = tg.create_task(_value(1))
            t2 = tg.create_task(asyncio.sleep(0.01, 2))
        return t1.result() + t2.result()

    assert loop.run_until_complete(main()) == 3


def test_task_group_error_cancels_siblings(loop):
    cancelled = []

    async def sibling():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def bad():
        await asyncio.sleep(0)
        raise ValueError("bad")

    async def main():
        async with asyncio.TaskGroup() as tg:
            tg.create_task(sibling())
            tg.create_task(bad())

    with pytest.raises(ExceptionGroup) as info:
        loop.run_until_complete(main())
    assert [type(e) for e in info.value.exceptions] == [ValueError]
    assert cancelled == [True]


def test_sleep_ordering(loop):
    order = []

    async def sleeper(delay, tag):
        await asyncio.sleep(delay)
        order.append(tag)

    async def main():
        await asyncio.gather(
            sleeper(0.03, "c"), sleeper(0.01, "a"), sleeper(0.02, "b"), sleeper(0, "zero")
        )

    loop.run_until_complete(main())
    assert order == ["zero", "a", "b", "c"]


def test_sleep_zero_yields(loop):
    order = []

    async def worker(tag):
        for i in range(3):
            order.append((tag, i))
            await asyncio.sleep(0)

    async def main():
        await asyncio.gather(worker("a"), worker("b"))

    loop.run_until_complete(main())
    assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]


def test_sleep_result(loop):
    assert loop.run_until_complete(asyncio.sleep(0.001, result="r")) == "r"


def test_wait_first_completed(loop):
    async def main():
        fast = loop.create_task(asyncio.sleep(0.01, "fast"))
        slow = loop.create_task(asyncio.sleep(3600, "slow"))
        done, pending = await asyncio.wait({fast, slow}, return_when=asyncio.FIRST_COMPLETED)
        assert done == {fast}
        assert pending == {slow}
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)
        return fast.result()

    assert loop.run_until_complete(main()) == "fast"


def test_as_completed(loop):
    async def main():
        aws = [asyncio.sleep(d, d) for d in (0.03, 0.01, 0.02)]
        return [await f for f in asyncio.as_completed(aws)]

    assert loop.run_until_complete(main()) == [0.01, 0.02, 0.03]


def test_shield(loop):
    async def main():
        inner = loop.create_task(asyncio.sleep(0.01, "inner"))
        outer = asyncio.ensure_future(asyncio.shield(inner))
        await asyncio.sleep(0)
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
        return await inner

    assert loop.run_until_complete(main()) == "inner"


def test_current_task_and_all_tasks(loop):
    async def main():
        me = asyncio.current_task()
        other = loop.create_task(asyncio.sleep(3600))
        tasks = asyncio.all_tasks()
        assert me in tasks and other in tasks
        assert asyncio.all_tasks(loop) == tasks
        other.cancel()
        await asyncio.gather(other, return_exceptions=True)
        return me

    task = loop.create_task(main())
    assert loop.run_until_complete(task) is task
    assert asyncio.current_task(loop) is None


def test_ensure_future_uses_running_loop(loop):
    async def main():
        t = asyncio.ensure_future(_value(1))
        assert t.get_loop() is loop
        return await t

    assert loop.run_until_complete(main()) == 1


def test_task_on_other_loop_future(loop):
    """Awaiting a future bound to another loop fails the task with RuntimeError."""
    other = _asyncio_new_event_loop()
    try:
        fut = other.create_future()

        async def main():
            await fut

        with pytest.raises(RuntimeError, match="attached to a different loop"):
            loop.run_until_complete(main())
    finally:
        other.close()


def test_pending_task_destroyed_warning(loop):
    """'Task was destroyed but it is pending!' reaches the loop's exception handler."""
    import gc

    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))

    async def forever():
        await loop.create_future()

    task = loop.create_task(forever())
    loop.run_until_complete(asyncio.sleep(0))
    del task
    gc.collect()
    msgs = [c["message"] for c in contexts]
    assert any("Task was destroyed but it is pending" in m for m in msgs), msgs


def test_many_tasks(loop):
    async def main():
        return sum(await asyncio.gather(*(_value(i) for i in range(2000))))

    assert loop.run_until_complete(main()) == sum(range(2000))


def test_queue_producer_consumer(loop):
    async def main():
        q = asyncio.Queue(maxsize=4)
        out = []

        async def producer():
            for i in range(100):
                await q.put(i)
            await q.put(None)

        async def consumer():
            while (item := await q.get()) is not None:
                out.append(item)

        await asyncio.gather(producer(), consumer())
        return out

    assert loop.run_until_complete(main()) == list(range(100))


def test_event_lock_condition_semaphore(loop):
    async def main():
        ev = asyncio.Event()
        lock = asyncio.Lock()
        sem = asyncio.Semaphore(2)
        cond = asyncio.Condition()
        log = []

        async def waiter(i):
            await ev.wait()
            async with sem:
                async with lock:
                    log.append(i)
                    await asyncio.sleep(0)

        async def notified():
            async with cond:
                await cond.wait()
                log.append("notified")

        tasks = [asyncio.ensure_future(waiter(i)) for i in range(5)]
        nt = asyncio.ensure_future(notified())
        await asyncio.sleep(0)
        ev.set()
        await asyncio.gather(*tasks)
        async with cond:
            cond.notify_all()
        await nt
        return log

    log = loop.run_until_complete(main())
    assert sorted(x for x in log if x != "notified") == list(range(5))
    assert log[-1] == "notified"


def test_debug_enables_coroutine_origin_tracking(loop):
    loop.set_debug(True)

    async def main():
        return sys.get_coroutine_origin_tracking_depth()

    assert loop.run_until_complete(main()) > 0
    assert sys.get_coroutine_origin_tracking_depth() == 0
