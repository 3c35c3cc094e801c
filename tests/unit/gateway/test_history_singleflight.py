"""Single-flight: concurrent identical history misses share one MySQL query."""

from __future__ import annotations

import asyncio

import pytest

from gateway.history import SingleFlight


async def test_concurrent_calls_with_one_key_share_one_execution() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    calls = 0
    release = asyncio.Event()

    async def work() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return 42

    waiters = [asyncio.create_task(flights.do("k", work)) for _ in range(10)]
    other = asyncio.create_task(flights.do("other", work))
    await asyncio.sleep(0.01)
    assert calls == 2 and len(flights) == 2
    release.set()
    assert await asyncio.gather(*waiters, other) == [42] * 11
    assert len(flights) == 0  # nothing cached afterwards
    assert await flights.do("k", work) == 42
    assert calls == 3


async def test_failure_reaches_every_waiter_and_is_not_cached() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    release = asyncio.Event()

    async def boom() -> int:
        await release.wait()
        raise RuntimeError("mysql down")

    waiters = [asyncio.create_task(flights.do("k", boom)) for _ in range(3)]
    await asyncio.sleep(0.01)
    release.set()
    for w in waiters:
        with pytest.raises(RuntimeError):
            await w
    assert len(flights) == 0


async def test_a_cancelled_waiter_does_not_cancel_the_others() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    release = asyncio.Event()

    async def work() -> int:
        await release.wait()
        return 7

    first = asyncio.create_task(flights.do("k", work))
    second = asyncio.create_task(flights.do("k", work))
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.sleep(0.01)
    release.set()
    assert await second == 7
    assert first.cancelled()
