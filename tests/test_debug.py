"""Debug mode: set_debug/get_debug, PYTHONASYNCIODEBUG, slow callback warnings."""

import logging
import os
import subprocess
import sys
import time

import pytest

from conftest import HANG_TIMEOUT


def _expected_default_debug():
    return bool(sys.flags.dev_mode or (
        not sys.flags.ignore_environment and os.environ.get("PYTHONASYNCIODEBUG")))


def test_get_set_debug(loop):
    assert loop.get_debug() is _expected_default_debug()
    loop.set_debug(True)
    assert loop.get_debug() is True
    loop.set_debug(False)
    assert loop.get_debug() is False


def test_set_debug_while_running(loop):
    seen = []

    def cb():
        loop.set_debug(True)
        seen.append(loop.get_debug())
        loop.stop()

    loop.call_soon(cb)
    loop.run_forever()
    assert seen == [True]
    assert loop.get_debug() is True


def test_slow_callback_duration_default(loop):
    assert loop.slow_callback_duration == pytest.approx(0.1)
    loop.slow_callback_duration = 0.25
    assert loop.slow_callback_duration == pytest.approx(0.25)


def _child_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONASYNCIODEBUG", "PYTHONDEVMODE")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.update(extra)
    return env


def _child_get_debug(impl, tmp_path, args=(), **env):
    factory = {
        "asyncio": "asyncio.DefaultEventLoopPolicy().new_event_loop",
        "uvloop": "uvloop.new_event_loop",
        "mtloop": "mtloop.new_event_loop",
    }[impl.name]
    mod = factory.split(".")[0]
    code = (
        f"import asyncio, {mod}\n"
        f"loop = {factory}()\n"
        "print(loop.get_debug())\n"
        "loop.close()\n"
    )
    proc = subprocess.run(
        [sys.executable, *args, "-c", code],
        cwd=tmp_path, env=_child_env(**env), capture_output=True, text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_pythonasynciodebug_env(impl, tmp_path):
    assert _child_get_debug(impl, tmp_path, PYTHONASYNCIODEBUG="1") == "True"
    assert _child_get_debug(impl, tmp_path) == "False"


def test_dev_mode_enables_debug(impl, tmp_path):
    assert _child_get_debug(impl, tmp_path, args=("-X", "dev")) == "True"


def test_slow_callback_warning(loop, caplog):
    caplog.set_level(logging.WARNING, logger="asyncio")
    loop.set_debug(True)
    loop.slow_callback_duration = 0.01

    def slow_callback_xyz():
        end = time.monotonic() + 0.05
        while time.monotonic() < end:
            pass

    loop.call_soon(slow_callback_xyz)
    loop.call_soon(loop.stop)
    loop.run_forever()
    msgs = [r.getMessage() for r in caplog.records
            if r.name == "asyncio" and r.levelno == logging.WARNING]
    slow = [m for m in msgs if m.startswith("Executing") and "took" in m]
    assert len(slow) == 1, msgs
    assert "slow_callback_xyz" in slow[0]
    assert "seconds" in slow[0]


def test_slow_coroutine_step_warning(loop, caplog):
    caplog.set_level(logging.WARNING, logger="asyncio")
    loop.set_debug(True)
    loop.slow_callback_duration = 0.01

    async def slow_coro_xyz():
        end = time.monotonic() + 0.05
        while time.monotonic() < end:
            pass

    loop.run_until_complete(slow_coro_xyz())
    slow = [r.getMessage() for r in caplog.records
            if r.name == "asyncio" and r.getMessage().startswith("Executing")]
    assert len(slow) == 1
    assert "slow_coro_xyz" in slow[0] and "took" in slow[0]


def test_no_slow_callback_warning_without_debug(loop, caplog):
    caplog.set_level(logging.WARNING, logger="asyncio")
    loop.set_debug(False)
    loop.slow_callback_duration = 0.01

    def slow_callback():
        end = time.monotonic() + 0.03
        while time.monotonic() < end:
            pass

    loop.call_soon(slow_callback)
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert not [r for r in caplog.records if r.getMessage().startswith("Executing")]


def test_fast_callbacks_no_warning_in_debug(loop, caplog):
    caplog.set_level(logging.WARNING, logger="asyncio")
    loop.set_debug(True)
    loop.slow_callback_duration = HANG_TIMEOUT
    for _ in range(10):
        loop.call_soon(lambda: None)
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert not [r for r in caplog.records if r.getMessage().startswith("Executing")]


def test_debug_handle_repr_has_source(loop):
    loop.set_debug(True)

    def cb():
        pass

    h = loop.call_soon(cb)
    assert "cb" in repr(h)
    assert "created at" in repr(h) and "test_debug.py" in repr(h)
    h.cancel()


@pytest.mark.uvloop_xfail("uvloop drops the callback from the repr of a cancelled handle "
                          "even in debug mode ('<Handle cancelled created at ...>')")
def test_debug_cancelled_handle_repr_keeps_callback(loop):
    loop.set_debug(True)

    def cb():
        pass

    h = loop.call_soon(cb)
    h.cancel()
    # in debug mode the repr of a cancelled handle keeps the callback
    assert "cb" in repr(h)


def test_debug_unawaited_coroutine_warns_with_origin(loop):
    loop.set_debug(True)

    async def never_awaited_xyz():
        pass

    async def main():
        never_awaited_xyz()

    import gc
    with pytest.warns(RuntimeWarning, match="never_awaited_xyz.*was never awaited"):
        loop.run_until_complete(main())
        gc.collect()
