"""add_signal_handler / remove_signal_handler and SIGINT handling."""

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time

import pytest

from conftest import HANG_TIMEOUT, PY312

pytestmark = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal tests must run in the main thread",
)

# Bound on a loop that ignores a signal (only reached on failure).
FALLBACK = 2 * HANG_TIMEOUT


@pytest.fixture(autouse=True)
def restore_signal_state():
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)}
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    signal.set_wakeup_fd(wakeup)


@contextlib.contextmanager
def no_stray_keyboard_interrupt():
    """Turn a KeyboardInterrupt escaping the block into a test failure.

    A loop that does not react to SIGINT would otherwise let the interrupt
    surface later and abort the whole pytest session.
    """
    try:
        yield
        time.sleep(0)  # let a pending Python signal handler run here
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped outside the expected place")


def _kill_later(sig, started, delay=0.05):
    """Thread: once ``started`` is set, send ``sig`` to this process."""

    def target():
        if started.wait(HANG_TIMEOUT):
            # Let the loop block in its wait (cannot be observed); correctness
            # does not depend on this delay.
            time.sleep(delay)
            os.kill(os.getpid(), sig)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


# --------------------------------------------------------------------------
# add / remove


def test_signal_handler_called_in_loop(loop):
    fut = loop.create_future()

    def handler(*args):
        fut.set_result((args, threading.get_ident(), asyncio.get_running_loop()))

    loop.add_signal_handler(signal.SIGUSR1, handler, "a", 2)
    loop.call_soon(os.kill, os.getpid(), signal.SIGUSR1)
    args, tid, running = loop.run_until_complete(asyncio.wait_for(fut, HANG_TIMEOUT))
    assert args == ("a", 2)
    assert tid == threading.get_ident()
    assert running is loop


def test_signal_from_thread_wakes_loop_on_long_timer(loop):
    fut = loop.create_future()
    started = threading.Event()
    loop.add_signal_handler(signal.SIGUSR1, lambda: fut.set_result("signalled"))
    loop.call_soon(started.set)
    long_timer = loop.call_later(3600, lambda: None)
    t0 = time.monotonic()
    t = _kill_later(signal.SIGUSR1, started)
    res = loop.run_until_complete(asyncio.wait_for(fut, FALLBACK))
    elapsed = time.monotonic() - t0
    t.join(HANG_TIMEOUT)
    long_timer.cancel()
    assert res == "signalled"
    assert elapsed < HANG_TIMEOUT, "loop was not woken by the signal"


@pytest.mark.uvloop_xfail("uvloop only listens for signals while the loop runs: a signal "
                          "delivered before run_until_complete() is lost (the test would "
                          "wait for the hang timeout, so it is not run)", run=False)
def test_signal_received_while_loop_not_running(loop):
    fut = loop.create_future()
    loop.add_signal_handler(signal.SIGUSR1, lambda: fut.set_result("later"))
    os.kill(os.getpid(), signal.SIGUSR1)
    # delivered before the loop runs: the handler runs once it does
    assert loop.run_until_complete(asyncio.wait_for(fut, HANG_TIMEOUT)) == "later"


def test_replace_signal_handler(loop):
    calls = []
    fut = loop.create_future()
    loop.add_signal_handler(signal.SIGUSR1, calls.append, "old")
    loop.add_signal_handler(signal.SIGUSR1, lambda: (calls.append("new"), fut.set_result(None)))
    loop.call_soon(os.kill, os.getpid(), signal.SIGUSR1)
    loop.run_until_complete(asyncio.wait_for(fut, HANG_TIMEOUT))
    assert calls == ["new"]


def test_two_signals(loop):
    got = []
    fut = loop.create_future()

    def handler(name):
        got.append(name)
        if len(got) == 2:
            fut.set_result(None)

    loop.add_signal_handler(signal.SIGUSR1, handler, "usr1")
    loop.add_signal_handler(signal.SIGUSR2, handler, "usr2")
    loop.call_soon(os.kill, os.getpid(), signal.SIGUSR1)
    loop.call_soon(os.kill, os.getpid(), signal.SIGUSR2)
    loop.run_until_complete(asyncio.wait_for(fut, HANG_TIMEOUT))
    assert sorted(got) == ["usr1", "usr2"]


@pytest.mark.uvloop_xfail("uvloop's remove_signal_handler() on a loop that is not running "
                          "returns False and leaves its Python-level handler installed")
def test_remove_signal_handler(loop):
    assert loop.remove_signal_handler(signal.SIGUSR1) is False
    loop.add_signal_handler(signal.SIGUSR1, lambda: None)
    assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    assert loop.remove_signal_handler(signal.SIGUSR1) is True
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert loop.remove_signal_handler(signal.SIGUSR1) is False


@pytest.mark.uvloop_xfail("uvloop's remove_signal_handler() on a loop that is not running "
                          "returns False and leaves its Python-level handler installed")
def test_remove_sigint_handler_restores_default_int_handler(loop):
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    assert loop.remove_signal_handler(signal.SIGINT) is True
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_remove_signal_handler_while_running(loop):
    async def main():
        assert loop.remove_signal_handler(signal.SIGUSR1) is False
        loop.add_signal_handler(signal.SIGUSR1, lambda: None)
        assert loop.remove_signal_handler(signal.SIGUSR1) is True
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
        assert loop.remove_signal_handler(signal.SIGUSR1) is False
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        assert loop.remove_signal_handler(signal.SIGINT) is True
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    loop.run_until_complete(main())


def test_removed_handler_not_called(loop):
    calls = []

    async def main():
        fut = loop.create_future()
        loop.add_signal_handler(signal.SIGUSR1, calls.append, "removed")
        loop.add_signal_handler(signal.SIGUSR2, lambda: fut.set_result(None))
        loop.remove_signal_handler(signal.SIGUSR1)
        signal.signal(signal.SIGUSR1, lambda *a: calls.append("python-level"))
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR2)
        await fut

    loop.run_until_complete(asyncio.wait_for(main(), HANG_TIMEOUT))
    assert "removed" not in calls


@pytest.mark.uvloop_xfail("uvloop's close() leaves its Python-level signal handler "
                          "installed instead of restoring SIG_DFL")
def test_close_removes_signal_handlers(loop):
    loop.add_signal_handler(signal.SIGUSR1, lambda: None)
    loop.close()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_signal_handler_exception_goes_to_exception_handler(loop):
    contexts = []
    fut = loop.create_future()

    def exc_handler(lp, ctx):
        contexts.append(ctx)
        fut.set_result(None)

    def handler():
        raise ValueError("in signal handler")

    loop.set_exception_handler(exc_handler)
    loop.add_signal_handler(signal.SIGUSR1, handler)
    loop.call_soon(os.kill, os.getpid(), signal.SIGUSR1)
    loop.run_until_complete(asyncio.wait_for(fut, HANG_TIMEOUT))
    assert contexts[0]["message"].startswith("Exception in callback")
    assert isinstance(contexts[0]["exception"], ValueError)


# --------------------------------------------------------------------------
# misuse


@pytest.mark.parametrize("method", ["add_signal_handler", "remove_signal_handler"])
@pytest.mark.parametrize("sig", ["SIGUSR1", 1.5, None])
def test_signal_not_an_int(loop, method, sig):
    args = (sig, lambda: None) if method == "add_signal_handler" else (sig,)
    with pytest.raises(TypeError):
        getattr(loop, method)(*args)


@pytest.mark.parametrize("method", ["add_signal_handler", "remove_signal_handler"])
@pytest.mark.parametrize("sig", [0, -1, 1000, signal.NSIG])
def test_invalid_signal_number(loop, method, sig):
    args = (sig, lambda: None) if method == "add_signal_handler" else (sig,)
    with pytest.raises(ValueError):
        getattr(loop, method)(*args)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_uncatchable_signal(loop, sig):
    with pytest.raises(RuntimeError, match="cannot be caught"):
        loop.add_signal_handler(sig, lambda: None)
    assert loop.remove_signal_handler(sig) is False


async def _coro_handler():
    pass


def test_coroutine_function_handler(loop):
    with pytest.raises(TypeError, match="coroutines cannot be used with add_signal_handler"):
        loop.add_signal_handler(signal.SIGUSR1, _coro_handler)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_coroutine_object_handler(loop):
    coro = _coro_handler()
    try:
        with pytest.raises(TypeError, match="coroutines cannot be used with add_signal_handler"):
            loop.add_signal_handler(signal.SIGUSR1, coro)
    finally:
        coro.close()


def test_add_signal_handler_on_closed_loop(loop):
    loop.close()
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        loop.add_signal_handler(signal.SIGUSR1, lambda: None)


@pytest.mark.uvloop_xfail("uvloop raises ValueError('add_signal_handler() can only be called "
                          "from the main thread'); asyncio raises RuntimeError")
def test_add_signal_handler_from_other_thread(loop):
    errors = []

    def target():
        try:
            loop.add_signal_handler(signal.SIGUSR1, lambda: None)
        except BaseException as exc:  # noqa: B902
            errors.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join(HANG_TIMEOUT)
    assert len(errors) == 1
    assert isinstance(errors[0], RuntimeError), repr(errors[0])
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


@pytest.mark.uvloop_xfail("uvloop raises ValueError('add_signal_handler() can only be called "
                          "from the main thread'); asyncio raises RuntimeError")
def test_add_signal_handler_in_loop_running_in_other_thread(loop_factory):
    errors = []

    def target():
        lp = loop_factory()
        try:
            async def main():
                lp.add_signal_handler(signal.SIGUSR1, lambda: None)

            lp.run_until_complete(main())
        except BaseException as exc:  # noqa: B902
            errors.append(exc)
        finally:
            lp.close()

    t = threading.Thread(target=target)
    t.start()
    t.join(HANG_TIMEOUT)
    assert len(errors) == 1
    assert isinstance(errors[0], RuntimeError), repr(errors[0])


# --------------------------------------------------------------------------
# SIGINT with the default handler


def _prepare_sigint():
    signal.signal(signal.SIGINT, signal.default_int_handler)


def test_sigint_interrupts_run_forever(loop):
    _prepare_sigint()
    started = threading.Event()
    loop.call_soon(started.set)
    loop.call_later(3600, lambda: None)
    loop.call_later(FALLBACK, loop.stop)
    with no_stray_keyboard_interrupt():
        t0 = time.monotonic()
        t = _kill_later(signal.SIGINT, started)
        with pytest.raises(KeyboardInterrupt):
            loop.run_forever()
        elapsed = time.monotonic() - t0
        t.join(HANG_TIMEOUT)
    assert elapsed < HANG_TIMEOUT, "SIGINT did not interrupt the loop promptly"
    assert not loop.is_running()
    # the loop is still usable
    assert loop.run_until_complete(asyncio.sleep(0.001, "usable")) == "usable"


def test_sigint_interrupts_run_until_complete(loop):
    _prepare_sigint()
    started = threading.Event()

    async def main():
        started.set()
        await asyncio.sleep(FALLBACK)
        return "not interrupted"

    task = loop.create_task(main())
    with no_stray_keyboard_interrupt():
        t0 = time.monotonic()
        t = _kill_later(signal.SIGINT, started)
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(task)
        elapsed = time.monotonic() - t0
        t.join(HANG_TIMEOUT)
    assert elapsed < HANG_TIMEOUT, "SIGINT did not interrupt the loop promptly"
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        loop.run_until_complete(task)


def test_sigint_with_signal_handler_installed(loop):
    """With add_signal_handler(SIGINT) the loop's handler runs instead."""
    fut = loop.create_future()
    started = threading.Event()
    loop.add_signal_handler(signal.SIGINT, lambda: fut.set_result("handled"))
    loop.call_soon(started.set)
    with no_stray_keyboard_interrupt():
        t = _kill_later(signal.SIGINT, started)
        assert loop.run_until_complete(asyncio.wait_for(fut, FALLBACK)) == "handled"
        t.join(HANG_TIMEOUT)
    loop.remove_signal_handler(signal.SIGINT)


def _sigint_main(state):
    async def main():
        state["loop"] = asyncio.get_running_loop()
        started = threading.Event()
        state["thread"] = _kill_later(signal.SIGINT, started)
        started.set()
        try:
            await asyncio.sleep(FALLBACK)
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise
        return "not interrupted"

    return main()


def test_sigint_runner_cancels_main_task(impl):
    _prepare_sigint()
    state = {}
    with no_stray_keyboard_interrupt():
        t0 = time.monotonic()
        with asyncio.Runner(loop_factory=impl.new_event_loop) as runner:
            with pytest.raises(KeyboardInterrupt):
                runner.run(_sigint_main(state))
            elapsed = time.monotonic() - t0
            assert isinstance(state["loop"], impl.loop_class)
        state["thread"].join(HANG_TIMEOUT)
    assert state.get("cancelled") is True
    assert elapsed < HANG_TIMEOUT
    # Runner restores the default SIGINT handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.skipif(not PY312, reason="asyncio.run(loop_factory=...) is new in 3.12")
def test_sigint_asyncio_run_cancels_main_task(impl):
    _prepare_sigint()
    state = {}
    with no_stray_keyboard_interrupt():
        with pytest.raises(KeyboardInterrupt):
            asyncio.run(_sigint_main(state), loop_factory=impl.new_event_loop)
        state["thread"].join(HANG_TIMEOUT)
    assert state.get("cancelled") is True
    assert isinstance(state["loop"], impl.loop_class)
    assert state["loop"].is_closed()


def test_sigint_impl_run_cancels_main_task(impl):
    """The implementation's own run() (asyncio.run / uvloop.run / mtloop.run)."""
    _prepare_sigint()
    state = {}
    with no_stray_keyboard_interrupt():
        with pytest.raises(KeyboardInterrupt):
            impl.run(_sigint_main(state))
        state["thread"].join(HANG_TIMEOUT)
    assert state.get("cancelled") is True
    assert isinstance(state["loop"], impl.loop_class)


@pytest.mark.skipif(sys.platform != "linux", reason="Linux signal delivery semantics")
def test_signal_burst_handled(loop):
    """Sending SIGUSR1 many times with a handler installed never kills us."""
    count = [0]
    fut = loop.create_future()

    def handler():
        count[0] += 1
        if count[0] >= 1 and not fut.done():
            fut.set_result(None)

    loop.add_signal_handler(signal.SIGUSR1, handler)

    def burst():
        for _ in range(20):
            os.kill(os.getpid(), signal.SIGUSR1)

    loop.call_soon(burst)
    loop.run_until_complete(asyncio.wait_for(fut, HANG_TIMEOUT))
    assert count[0] >= 1
