"""mtloop.run / asyncio.run(loop_factory=) / asyncio.Runner / EventLoopPolicy."""

import asyncio
import sys

import pytest

from conftest import PY312


async def _info(result="result"):
    loop = asyncio.get_running_loop()
    return loop, loop.get_debug(), result


def test_impl_run(impl):
    """asyncio.run / uvloop.run / mtloop.run."""
    loop, debug, result = impl.run(_info())
    assert isinstance(loop, impl.loop_class)
    assert isinstance(loop, asyncio.AbstractEventLoop)
    assert result == "result"
    assert loop.is_closed()
    assert asyncio._get_running_loop() is None


def test_impl_run_debug(impl):
    loop, debug, _ = impl.run(_info(), debug=True)
    assert debug is True
    loop, debug, _ = impl.run(_info(), debug=False)
    assert debug is False


def test_impl_run_propagates_exception(impl):
    async def fail():
        raise LookupError("boom")

    with pytest.raises(LookupError, match="boom"):
        impl.run(fail())


@pytest.mark.uvloop_xfail("on 3.12+, uvloop.run() called from a running loop leaves its "
                          "'run.<locals>.wrapper' coroutine un-awaited (RuntimeWarning)",
                          condition=sys.version_info >= (3, 12))
def test_impl_run_inside_running_loop(impl, loop):
    """Like asyncio.run(): a clean RuntimeError, no loop created or left behind."""
    import gc
    import warnings

    async def main():
        coro = _info()
        try:
            with pytest.raises(RuntimeError, match="cannot be called from a running event loop"):
                impl.run(coro)
        finally:
            coro.close()
        return True

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert loop.run_until_complete(main())
        gc.collect()
    unawaited = [str(w.message) for w in caught if "was never awaited" in str(w.message)]
    assert unawaited == []


def test_impl_run_cancels_leftover_tasks_and_finalizes(impl):
    state = {}

    async def agen():
        try:
            yield 1
            yield 2
        finally:
            state["agen_finalized"] = True

    async def leftover():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            state["leftover_cancelled"] = True
            raise

    async def main():
        loop = asyncio.get_running_loop()
        asyncio.ensure_future(leftover())
        g = agen()
        await g.__anext__()
        state["agen"] = g
        await asyncio.sleep(0)
        state["executor_thread"] = await loop.run_in_executor(None, lambda: 1)
        return loop

    loop = impl.run(main())
    assert state["leftover_cancelled"] is True
    assert state["agen_finalized"] is True
    assert loop.is_closed()


@pytest.mark.skipif(not PY312, reason="asyncio.run(loop_factory=...) is new in 3.12")
def test_asyncio_run_loop_factory(loop_factory, impl):
    loop, debug, result = asyncio.run(_info("via asyncio.run"), loop_factory=loop_factory)
    assert isinstance(loop, impl.loop_class)
    assert result == "via asyncio.run"
    assert loop.is_closed()
    loop, debug, _ = asyncio.run(_info(), loop_factory=loop_factory, debug=True)
    assert debug is True


def test_asyncio_runner_loop_factory(loop_factory, impl):
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner_loop = runner.get_loop()
        assert isinstance(runner_loop, impl.loop_class)
        loop1, _, r1 = runner.run(_info(1))
        loop2, _, r2 = runner.run(_info(2))
        assert loop1 is loop2 is runner_loop
        assert (r1, r2) == (1, 2)
        # a context is shared between runs
    assert runner_loop.is_closed()


def test_asyncio_runner_debug(loop_factory):
    with asyncio.Runner(loop_factory=loop_factory, debug=True) as runner:
        _, debug, _ = runner.run(_info())
    assert debug is True


def test_runner_shares_context(loop_factory):
    import contextvars

    var = contextvars.ContextVar("var", default=0)

    async def inc():
        var.set(var.get() + 1)
        return var.get()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        assert runner.run(inc()) == 1
        assert runner.run(inc()) == 2


@pytest.fixture
def restore_policy():
    old = asyncio.get_event_loop_policy()
    yield
    asyncio.set_event_loop_policy(old)


def test_event_loop_policy_new_event_loop(impl, restore_policy):
    asyncio.set_event_loop_policy(impl.policy_class())
    assert isinstance(asyncio.get_event_loop_policy(), impl.policy_class)
    loop = asyncio.new_event_loop()
    try:
        assert isinstance(loop, impl.loop_class)
        assert isinstance(loop, asyncio.AbstractEventLoop)
        assert loop.run_until_complete(asyncio.sleep(0, "policy")) == "policy"
    finally:
        loop.close()


def test_event_loop_policy_asyncio_run(impl, restore_policy):
    asyncio.set_event_loop_policy(impl.policy_class())
    loop, _, _ = asyncio.run(_info())
    assert isinstance(loop, impl.loop_class)


def test_event_loop_policy_set_get_event_loop(impl, restore_policy):
    policy = impl.policy_class()
    asyncio.set_event_loop_policy(policy)
    loop = policy.new_event_loop()
    try:
        policy.set_event_loop(loop)
        assert policy.get_event_loop() is loop
        assert asyncio.get_event_loop_policy().get_event_loop() is loop
    finally:
        policy.set_event_loop(None)
        loop.close()


def test_impl_module_api(impl):
    if impl.name == "asyncio":
        pytest.skip("API of the third-party loops only")
    mod = impl.module
    assert callable(mod.new_event_loop)
    assert issubclass(mod.Loop, asyncio.AbstractEventLoop)
    assert issubclass(mod.EventLoopPolicy, asyncio.AbstractEventLoopPolicy)
    loop = mod.new_event_loop()
    try:
        assert type(loop) is mod.Loop or isinstance(loop, mod.Loop)
    finally:
        loop.close()


@pytest.mark.skipif(sys.version_info < (3, 12), reason="loop_factory on asyncio.run")
def test_asyncio_run_loop_factory_with_tasks(loop_factory):
    async def main():
        return sum(await asyncio.gather(*(asyncio.sleep(0.001, i) for i in range(100))))

    assert asyncio.run(main(), loop_factory=loop_factory) == sum(range(100))


# --------------------------------------------------------------------------
# mtloop's own options through run() and the policy (uvloop.run()'s shape)


def test_mtloop_run_hands_its_options_to_the_loop_factory():
    """mtloop.run(io_threads=, **kwargs): the keywords reach the loop factory,
    new_event_loop by default or the caller's."""
    import mtloop

    async def threads():
        return asyncio.get_running_loop().io_threads

    assert mtloop.run(threads(), io_threads=0) == 0
    assert mtloop.run(threads(), io_threads=2, spin_us=10) == 2
    seen = []

    def factory(**kwargs):
        seen.append(kwargs)
        return mtloop.new_event_loop(**kwargs)

    assert mtloop.run(threads(), loop_factory=factory, io_threads=1, native_tls=False) == 1
    assert seen == [{"io_threads": 1, "native_tls": False}]
    mtloop.run(threads(), loop_factory=factory)
    assert seen[-1] == {}


def _run_expecting(exc_type, match, coro_factory, **kwargs):
    """mtloop.run() fails with exc_type, and the coroutine it was handed is
    closed (no 'never awaited' warning)."""
    import gc
    import warnings

    import mtloop

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(exc_type, match=match):
            mtloop.run(coro_factory(), **kwargs)
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
    assert asyncio._get_running_loop() is None


def test_mtloop_run_refuses_a_loop_that_is_not_mtloop():
    _run_expecting(TypeError, "non-mtloop event loop", lambda: _info(),
                   loop_factory=asyncio.new_event_loop)


def test_mtloop_run_reports_the_factory_errors():
    _run_expecting(ValueError, "io_threads must be between 0 and", lambda: _info(),
                   io_threads=-1)
    _run_expecting(TypeError, "unexpected keyword argument 'threads'", lambda: _info(),
                   threads=1)


def test_mtloop_run_wants_a_coroutine():
    import mtloop

    with pytest.raises(ValueError, match="a coroutine was expected"):
        mtloop.run(asyncio.sleep)


def test_mtloop_policy_makes_loops_with_its_options(restore_policy):
    import mtloop

    policy = mtloop.EventLoopPolicy(io_threads=0, spin_us=5)
    asyncio.set_event_loop_policy(policy)
    loop, _, _ = asyncio.run(_info())
    assert isinstance(loop, mtloop.Loop) and loop.io_threads == 0
    with pytest.raises(TypeError):
        mtloop.EventLoopPolicy(threads=1)
    bad = mtloop.EventLoopPolicy(io_threads=99)
    with pytest.raises(ValueError, match="io_threads must be between 0 and"):
        bad.new_event_loop()
