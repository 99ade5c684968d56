"""Helpers shared by the pipe and subprocess tests (test_pipes.py,
test_subprocess.py)."""

import asyncio
import gc
import os
import threading


def open_fds():
    """The process's open descriptors.  Collects garbage first: what earlier
    tests left to the collector is not the calling test's."""
    gc.collect()
    return set(os.listdir("/proc/self/fd"))


def run_on_new_thread(loop_factory, make_coro, timeout=20):
    """Runs make_coro() to completion on a fresh loop in a new thread and
    returns its result (or raises what it raised)."""
    result = {}

    def in_thread():
        loop = loop_factory()
        try:
            result["value"] = loop.run_until_complete(asyncio.wait_for(make_coro(), timeout))
        except BaseException as exc:  # raised again on the test's thread
            result["error"] = exc
        finally:
            loop.close()

    t = threading.Thread(target=in_thread)
    t.start()
    t.join(timeout + 10)
    assert not t.is_alive(), "the loop's thread did not finish"
    if "error" in result:
        raise result["error"]
    return result["value"]
