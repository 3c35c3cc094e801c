"""The protocol's light inbox and writable flag behave as the asyncio.Queue and Event they replace,
for what uvicorn uses of them."""

from __future__ import annotations

import asyncio

from gateway.wire import Flag, Inbox


async def test_inbox_hands_items_over_in_order_to_a_waiting_reader() -> None:
    inbox = Inbox()
    reader = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    assert not reader.done() and inbox.empty()
    inbox.put_nowait("a")
    inbox.put_nowait("b")
    assert await reader == "a"
    assert inbox.qsize() == 1 and not inbox.empty()
    assert await inbox.get() == "b"
    assert inbox.empty()


async def test_inbox_reader_cancelled_while_waiting_leaves_it_usable() -> None:
    inbox = Inbox()
    reader = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    inbox.put_nowait("x")  # (no waiter left to wake: must not raise)
    assert await inbox.get() == "x"


async def test_flag_wakes_every_waiter_when_set_and_not_before() -> None:
    flag = Flag()
    assert not flag.is_set()
    waiters = [asyncio.create_task(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    flag.set()
    assert await asyncio.gather(*waiters) == [True, True, True]
    flag.clear()
    assert not flag.is_set()
    late = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    assert not late.done()
    flag.set()
    assert await late is True
    assert await flag.wait() is True  # set: returns at once
