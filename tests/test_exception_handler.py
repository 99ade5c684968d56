"""Exception handler API, default handler logging, exceptions in callbacks."""

import asyncio
import gc
import logging

import pytest

from conftest import PY312, HANG_TIMEOUT


def run_one_iteration(loop):
    loop.stop()
    loop.run_forever()


def error_records(caplog):
    return [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]


# --------------------------------------------------------------------------
# set/get


def test_exception_handler_get_set(loop):
    assert loop.get_exception_handler() is None

    def handler(lp, ctx):
        pass

    loop.set_exception_handler(handler)
    assert loop.get_exception_handler() is handler
    loop.set_exception_handler(None)
    assert loop.get_exception_handler() is None


@pytest.mark.parametrize("bad", [1, "handler", object()])
def test_set_exception_handler_not_callable(loop, bad):
    with pytest.raises(TypeError, match="A callable object or None is expected"):
        loop.set_exception_handler(bad)
    assert loop.get_exception_handler() is None


# --------------------------------------------------------------------------
# exceptions in callbacks


class MyError(Exception):
    pass


def _raiser():
    raise MyError("from callback")


def test_exception_in_callback_goes_to_handler(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append((lp, ctx)))
    h = loop.call_soon(_raiser)
    after = []
    loop.call_soon(after.append, "still running")
    run_one_iteration(loop)
    assert after == ["still running"]
    assert len(contexts) == 1
    lp, ctx = contexts[0]
    assert lp is loop
    assert ctx["message"].startswith("Exception in callback")
    assert "_raiser" in ctx["message"]
    assert isinstance(ctx["exception"], MyError)
    assert ctx["handle"] is h


def test_exception_in_timer_callback_goes_to_handler(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))
    done = loop.create_future()
    h = loop.call_later(0.001, _raiser)
    loop.call_later(0.02, done.set_result, None)
    loop.run_until_complete(done)
    assert len(contexts) == 1
    assert contexts[0]["message"].startswith("Exception in callback")
    assert isinstance(contexts[0]["exception"], MyError)
    assert contexts[0]["handle"] is h


def test_exception_in_threadsafe_callback_goes_to_handler(loop):
    import threading

    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))
    t = threading.Thread(target=lambda: loop.call_soon_threadsafe(_raiser))
    t.start()
    t.join(HANG_TIMEOUT)
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert len(contexts) == 1
    assert isinstance(contexts[0]["exception"], MyError)


def test_default_handler_logs_callback_exception(loop, caplog):
    caplog.set_level(logging.ERROR, logger="asyncio")
    loop.call_soon(_raiser)
    run_one_iteration(loop)
    recs = error_records(caplog)
    assert len(recs) == 1
    rec = recs[0]
    assert rec.getMessage().startswith("Exception in callback")
    assert "_raiser" in rec.getMessage()
    assert rec.exc_info is not None and rec.exc_info[0] is MyError
    assert "from callback" in caplog.text


def test_default_exception_handler_direct(loop, caplog):
    caplog.set_level(logging.ERROR, logger="asyncio")
    try:
        raise MyError("direct")
    except MyError as exc:
        err = exc
    loop.default_exception_handler(
        {"message": "custom message", "exception": err, "extra_key": 123})
    recs = error_records(caplog)
    assert len(recs) == 1
    msg = recs[0].getMessage()
    assert msg.startswith("custom message")
    assert "extra_key: 123" in msg
    assert recs[0].exc_info[1] is err


def test_default_exception_handler_without_message(loop, caplog):
    caplog.set_level(logging.ERROR, logger="asyncio")
    loop.default_exception_handler({})
    recs = error_records(caplog)
    assert len(recs) == 1
    assert recs[0].getMessage().startswith("Unhandled exception in event loop")


def test_call_exception_handler_default_logs(loop, caplog):
    caplog.set_level(logging.ERROR, logger="asyncio")
    loop.call_exception_handler({"message": "hello from test"})
    recs = error_records(caplog)
    assert [r.getMessage() for r in recs] == ["hello from test"]
    assert not recs[0].exc_info


def test_call_exception_handler_custom(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append((lp, ctx)))
    ctx = {"message": "custom", "foo": "bar"}
    loop.call_exception_handler(ctx)
    assert contexts == [(loop, ctx)]


def test_custom_handler_can_defer_to_default(loop, caplog):
    caplog.set_level(logging.ERROR, logger="asyncio")
    seen = []

    def handler(lp, ctx):
        seen.append(ctx["message"])
        lp.default_exception_handler(ctx)

    loop.set_exception_handler(handler)
    loop.call_soon(_raiser)
    run_one_iteration(loop)
    assert len(seen) == 1
    assert len(error_records(caplog)) == 1


def test_exception_in_handler_is_logged_not_raised(loop, caplog):
    caplog.set_level(logging.ERROR, logger="asyncio")

    def bad_handler(lp, ctx):
        raise RuntimeError("handler is broken")

    loop.set_exception_handler(bad_handler)
    loop.call_soon(_raiser)
    after = []
    loop.call_soon(after.append, 1)
    run_one_iteration(loop)  # must not raise
    assert after == [1]
    recs = error_records(caplog)
    assert len(recs) == 1
    assert "Unhandled error in exception handler" in recs[0].getMessage()
    assert recs[0].exc_info[0] is RuntimeError
    # direct call_exception_handler does not raise either
    loop.call_exception_handler({"message": "x"})
    assert len(error_records(caplog)) == 2


@pytest.mark.skipif(not PY312, reason="the handler runs in the handle's context since 3.12")
def test_exception_handler_runs_in_handle_context(loop):
    import contextvars

    var = contextvars.ContextVar("var", default="default")
    ctx = contextvars.copy_context()
    ctx.run(var.set, "handle-ctx")
    seen = []
    loop.set_exception_handler(lambda lp, c: seen.append(var.get()))
    loop.call_soon(_raiser, context=ctx)
    run_one_iteration(loop)
    assert seen == ["handle-ctx"]


def test_exception_handler_context_for_never_retrieved_future(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))
    fut = loop.create_future()
    fut.set_exception(MyError("never retrieved"))
    del fut
    gc.collect()
    assert len(contexts) == 1
    assert "exception was never retrieved" in contexts[0]["message"]
    assert isinstance(contexts[0]["exception"], MyError)
    assert "future" in contexts[0]


def test_exception_handler_context_for_never_retrieved_task(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))

    async def fail():
        raise MyError("task failed")

    task = loop.create_task(fail())
    loop.run_until_complete(asyncio.sleep(0.001))
    assert task.done()
    del task
    gc.collect()
    assert len(contexts) == 1
    assert "Task exception was never retrieved" in contexts[0]["message"]
    assert isinstance(contexts[0]["exception"], MyError)


# --------------------------------------------------------------------------
# KeyboardInterrupt / SystemExit


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_in_callback_propagates(loop, exc_type):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))

    def cb():
        raise exc_type()

    loop.call_soon(cb)
    loop.call_later(HANG_TIMEOUT, loop.stop)  # fallback only
    with pytest.raises(exc_type):
        loop.run_forever()
    assert contexts == []
    assert not loop.is_running()
    assert asyncio._get_running_loop() is None
    # the loop is still usable afterwards
    assert loop.run_until_complete(asyncio.sleep(0.001, "usable")) == "usable"
    calls = []
    loop.call_soon(calls.append, 1)
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert calls == [1]


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_in_timer_propagates_from_run_until_complete(loop, exc_type):
    def cb():
        raise exc_type()

    async def main():
        loop.call_later(0.001, cb)
        await asyncio.sleep(3600)

    task = loop.create_task(main())
    with pytest.raises(exc_type):
        loop.run_until_complete(task)
    assert not loop.is_running()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        loop.run_until_complete(task)


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_keeps_remaining_callbacks(loop, exc_type):
    """Callbacks queued behind the raising one are not lost."""
    calls = []

    def cb():
        raise exc_type()

    loop.call_soon(cb)
    loop.call_soon(calls.append, "after")
    with pytest.raises(exc_type):
        loop.run_forever()
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert calls == ["after"]


def test_keyboard_interrupt_in_handler_propagates(loop):
    def handler(lp, ctx):
        raise KeyboardInterrupt

    loop.set_exception_handler(handler)
    loop.call_soon(_raiser)
    with pytest.raises(KeyboardInterrupt):
        loop.run_forever()
    assert not loop.is_running()
