"""Async generator hooks and shutdown_asyncgens."""

import asyncio
import gc
import sys

import pytest

from conftest import HANG_TIMEOUT


def test_asyncgen_hooks_installed_while_running_and_restored(loop):
    def my_firstiter(agen):
        pass

    def my_finalizer(agen):
        pass

    old = sys.get_asyncgen_hooks()
    sys.set_asyncgen_hooks(firstiter=my_firstiter, finalizer=my_finalizer)
    try:
        async def main():
            return sys.get_asyncgen_hooks()

        inside = loop.run_until_complete(main())
        assert inside.firstiter is not None and inside.firstiter is not my_firstiter
        assert inside.finalizer is not None and inside.finalizer is not my_finalizer
        after = sys.get_asyncgen_hooks()
        assert after.firstiter is my_firstiter
        assert after.finalizer is my_finalizer
    finally:
        sys.set_asyncgen_hooks(*old)


def test_asyncgen_hooks_restored_after_exception(loop):
    before = sys.get_asyncgen_hooks()

    async def main():
        raise ValueError

    with pytest.raises(ValueError):
        loop.run_until_complete(main())
    assert sys.get_asyncgen_hooks() == before


def test_shutdown_asyncgens_finalizes_pending_generators(loop):
    finalized = []

    async def agen(tag):
        try:
            yield 1
            yield 2
        finally:
            await asyncio.sleep(0)  # finalisation may await
            finalized.append(tag)

    gens = []

    async def main():
        for tag in ("a", "b"):
            g = agen(tag)
            gens.append(g)
            assert await g.__anext__() == 1

    loop.run_until_complete(main())
    assert finalized == []
    loop.run_until_complete(loop.shutdown_asyncgens())
    assert sorted(finalized) == ["a", "b"]


def test_shutdown_asyncgens_with_no_generators(loop):
    assert loop.run_until_complete(loop.shutdown_asyncgens()) is None


def test_shutdown_asyncgens_error_goes_to_exception_handler(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))

    async def agen():
        try:
            yield 1
        finally:
            raise ZeroDivisionError("in finally")

    gens = []

    async def main():
        g = agen()
        gens.append(g)
        await g.__anext__()

    loop.run_until_complete(main())
    loop.run_until_complete(loop.shutdown_asyncgens())
    assert len(contexts) == 1
    assert "an error occurred during closing of asynchronous generator" in contexts[0]["message"]
    assert isinstance(contexts[0]["exception"], ZeroDivisionError)
    assert contexts[0]["asyncgen"] is gens[0]


def test_asyncgen_garbage_collected_while_running_is_finalized(loop):
    async def main():
        closed = asyncio.Event()

        async def agen():
            try:
                yield 1
                yield 2
            finally:
                closed.set()

        g = agen()
        await g.__anext__()
        del g
        gc.collect()
        # the finalizer hook schedules aclose() on the loop
        await asyncio.wait_for(closed.wait(), HANG_TIMEOUT)
        return True

    assert loop.run_until_complete(main())


def test_asyncgen_iterated_after_shutdown_warns(loop):
    async def agen():
        yield 1

    loop.run_until_complete(loop.shutdown_asyncgens())

    async def main():
        g = agen()
        try:
            await g.__anext__()
        finally:
            await g.aclose()

    with pytest.warns(ResourceWarning, match="was scheduled after loop.shutdown_asyncgens"):
        loop.run_until_complete(main())


def test_async_for_and_comprehension(loop):
    async def agen(n):
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    async def main():
        out = [x async for x in agen(5)]
        async for x in agen(2):
            out.append(x)
        return out

    assert loop.run_until_complete(main()) == [0, 1, 2, 3, 4, 0, 1]
