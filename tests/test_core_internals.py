"""mtloop-only checks of the C core's bookkeeping (no reference loop has these)."""

import asyncio

import mtloop


def run_one_iteration(loop):
    loop.call_soon(loop.stop)
    loop.run_forever()


def test_cancelled_timers_are_compacted_when_they_are_the_majority():
    loop = mtloop.new_event_loop()
    try:
        # An earliest live timer keeps the cancelled ones off the heap's head,
        # so only compaction (not trimming the head) can remove them.
        keep = [loop.call_later(1000 + i, lambda: None) for i in range(400)]
        doomed = [loop.call_later(2000 + i, lambda: None) for i in range(600)]
        for h in doomed:
            h.cancel()
        assert loop._mt_timer_count == 1000
        assert loop._timer_cancelled_count == 600
        run_one_iteration(loop)
        assert loop._mt_timer_count == 400
        assert loop._timer_cancelled_count == 0
        assert all(h._scheduled for h in keep)
        assert not any(h._scheduled for h in doomed)
    finally:
        loop.close()


def test_cancelled_timers_at_the_head_are_dropped_without_compaction():
    loop = mtloop.new_event_loop()
    try:
        early = [loop.call_later(100 + i, lambda: None) for i in range(10)]
        later = loop.call_later(500, lambda: None)
        for h in early:
            h.cancel()
        run_one_iteration(loop)
        assert loop._mt_timer_count == 1
        assert loop._timer_cancelled_count == 0
        assert later._scheduled
    finally:
        loop.close()


def test_close_releases_queued_handles():
    loop = mtloop.new_event_loop()
    loop.call_soon(lambda: None)
    loop.call_later(10, lambda: None)
    assert loop._mt_ready_count == 1 and loop._mt_timer_count == 1
    loop.close()
    assert loop._mt_ready_count == 0 and loop._mt_timer_count == 0


def test_handles_are_the_stock_classes():
    loop = mtloop.new_event_loop()
    try:
        assert type(loop.call_soon(lambda: None)) is asyncio.Handle
        assert type(loop.call_later(1, lambda: None)) is asyncio.TimerHandle
    finally:
        loop.close()
