"""run_in_executor, set_default_executor, shutdown_default_executor."""

import asyncio
import concurrent.futures
import threading

import pytest


def _ident(x=None):
    return threading.get_ident(), threading.current_thread().name, x


def test_run_in_default_executor(loop):
    async def main():
        return await loop.run_in_executor(None, _ident, "arg")

    tid, _name, arg = loop.run_until_complete(main())
    assert tid != threading.get_ident()
    assert arg == "arg"


def test_run_in_executor_returns_asyncio_future(loop):
    async def main():
        fut = loop.run_in_executor(None, _ident)
        assert asyncio.isfuture(fut)
        assert fut.get_loop() is loop
        return await fut

    loop.run_until_complete(main())


def test_run_in_executor_exception(loop):
    def fail():
        raise KeyError("in thread")

    async def main():
        await loop.run_in_executor(None, fail)

    with pytest.raises(KeyError, match="in thread"):
        loop.run_until_complete(main())


def test_run_in_explicit_executor(loop):
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="explicit-pool") as ex:
        async def main():
            return await asyncio.gather(*(loop.run_in_executor(ex, _ident, i) for i in range(5)))

        results = loop.run_until_complete(main())
    assert [r[2] for r in results] == list(range(5))
    assert all(r[1].startswith("explicit-pool") for r in results)
    assert len({r[0] for r in results}) == 1


def test_run_in_executor_many_concurrent(loop):
    async def main():
        return await asyncio.gather(*(loop.run_in_executor(None, pow, i, 2) for i in range(200)))

    assert loop.run_until_complete(main()) == [i * i for i in range(200)]


def test_run_in_executor_cancel(loop):
    release = threading.Event()

    async def main():
        fut = loop.run_in_executor(None, release.wait, 10)
        await asyncio.sleep(0)
        fut.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fut
        release.set()

    try:
        loop.run_until_complete(main())
    finally:
        release.set()


async def _coro_func():
    pass


def test_run_in_executor_coroutine_function_in_debug(loop):
    loop.set_debug(True)
    with pytest.raises(TypeError, match="coroutines cannot be used with run_in_executor"):
        loop.run_in_executor(None, _coro_func)


def test_run_in_executor_on_closed_loop(loop):
    loop.close()
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        loop.run_in_executor(None, _ident)


def test_set_default_executor(loop):
    ex = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="my-default")
    try:
        loop.set_default_executor(ex)

        async def main():
            return await loop.run_in_executor(None, _ident)

        _tid, name, _ = loop.run_until_complete(main())
        assert name.startswith("my-default")
    finally:
        ex.shutdown(wait=True)


@pytest.mark.uvloop_xfail("uvloop's set_default_executor() accepts any executor instead of "
                          "raising TypeError for a non-ThreadPoolExecutor")
@pytest.mark.parametrize("bad", ["object", "process-pool"])
def test_set_default_executor_not_thread_pool(loop, bad):
    if bad == "object":
        executor = object()
    else:
        executor = concurrent.futures.ProcessPoolExecutor(1)
    try:
        with pytest.raises(TypeError, match="executor must be ThreadPoolExecutor"):
            loop.set_default_executor(executor)
    finally:
        if bad != "object":
            executor.shutdown(wait=True)


def test_shutdown_default_executor(loop):
    ex = concurrent.futures.ThreadPoolExecutor(2)
    loop.set_default_executor(ex)

    async def main():
        await loop.run_in_executor(None, _ident)
        await loop.shutdown_default_executor()

    loop.run_until_complete(main())
    # the executor was shut down and joined
    with pytest.raises(RuntimeError):
        ex.submit(_ident)
    # the loop refuses to use the default executor any more
    with pytest.raises(RuntimeError, match="Executor shutdown has been called"):
        loop.run_in_executor(None, _ident)
    # explicit executors still work
    with concurrent.futures.ThreadPoolExecutor(1) as other:
        loop.run_until_complete(loop.run_in_executor(other, _ident))


def test_shutdown_default_executor_without_executor(loop):
    loop.run_until_complete(loop.shutdown_default_executor())
    with pytest.raises(RuntimeError, match="Executor shutdown has been called"):
        loop.run_in_executor(None, _ident)


def test_shutdown_default_executor_waits_for_running_job(loop):
    release = threading.Event()
    finished = []

    async def main():
        started = asyncio.Event()

        def job():
            loop.call_soon_threadsafe(started.set)
            release.wait(10)
            finished.append(True)

        fut = loop.run_in_executor(None, job)
        await started.wait()
        loop.call_later(0.01, release.set)
        await loop.shutdown_default_executor()
        # shutdown joined the worker thread, so the job has finished
        assert finished == [True]
        return await fut

    try:
        loop.run_until_complete(asyncio.wait_for(main(), 10))
    finally:
        release.set()


def test_close_shuts_down_default_executor(loop):
    ex = concurrent.futures.ThreadPoolExecutor(1)
    loop.set_default_executor(ex)
    loop.run_until_complete(loop.run_in_executor(None, _ident))
    loop.close()
    with pytest.raises(RuntimeError):
        ex.submit(_ident)
