"""The hub: rooms and their members, and closing sessions when their tokens expire."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.hub import Hub
from gateway.protocol import Close
from gateway.session import Session
from shared.auth import Identity

pytestmark = pytest.mark.timeout(10)


class NullSocket:
    async def send_text(self, data: str) -> None:
        pass

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        pass


def session(user: str = "ann", expires_at: float | None = None) -> Session:
    return Session(Identity(user, ("*",), expires_at), NullSocket(), 10)


async def until_closed(s: Session) -> None:
    async with asyncio.timeout(3):
        while s.close_code is None:
            await asyncio.sleep(0.01)


async def test_a_message_reaches_the_members_of_its_room_only() -> None:
    hub = Hub()
    a, b, c = session("a"), session("b"), session("c")
    for s in (a, b, c):
        hub.add(s)
    hub.join("r", a)
    hub.join("r", b)
    hub.join("other", c)
    assert hub.publish("r", 1, "m1") == 2
    assert (a.queued, b.queued, c.queued) == (1, 1, 0)
    hub.leave("r", b)
    assert hub.publish("r", 2, "m2") == 1
    hub.drop(a)
    assert hub.publish("r", 3, "m3") == 0 and not hub.has_room("r")
    assert hub.room_count == 1 and a.rooms == set()


async def test_sessions_are_closed_1008_when_their_token_expires_idle_or_not() -> None:
    hub = Hub()
    now = time.time()
    soon, later, never = session("soon", now + 0.2), session("later", now + 1.2), session("never")
    for s in (later, soon, never):  # (the later one first: the timer moves to the earlier second)
        hub.add(s)
    await until_closed(soon)
    assert (soon.close_code, soon.close_reason) == (Close.BAD_TOKEN, "token expired")
    assert time.time() >= now + 0.2, "never before the token's exp"
    assert later.close_code is None
    await until_closed(later)
    assert never.close_code is None


async def test_a_session_that_ended_is_not_closed_by_its_expiry_and_an_empty_second_is_skipped() -> None:
    hub = Hub()
    now = time.time()
    gone, stays = session("gone", now + 0.1), session("stays", now + 1.1)
    hub.add(gone)
    hub.add(stays)
    hub.drop(gone)
    await until_closed(stays)
    assert gone.close_code is None


async def test_a_token_expired_by_the_time_it_is_added_is_closed_at_once() -> None:
    hub = Hub()
    late = session("late", time.time() - 0.5)
    hub.add(late)
    assert (late.close_code, late.close_reason) == (Close.BAD_TOKEN, "token expired")
    assert not hub._expiring


async def test_many_sessions_share_one_ticker_and_churn_does_not_grow_it() -> None:
    hub = Hub()
    exp = time.time() + 3600
    for i in range(1000):  # a client reconnecting over and over with the same token
        s = session(f"u{i}", exp + (i % 2))
        hub.add(s)
        hub.drop(s)
    kept = [session(f"k{i}", exp) for i in range(100)]
    for s in kept:
        hub.add(s)
    assert len(hub._expiring) == 1 and hub._ticker is not None
    for s in kept:
        hub.drop(s)
    assert not hub._expiring and not hub.sessions
    async with asyncio.timeout(3):  # it stops at its next tick: no token is waiting
        while hub._ticker is not None:
            await asyncio.sleep(0.05)


def test_a_users_first_join_and_last_leave_of_a_room_are_told_once() -> None:
    hub = Hub()
    heard: list[tuple[str, str, bool]] = []
    hub.on_member = lambda room, user, joined: heard.append((room, user, joined))
    tab1, tab2, other = session("ann"), session("ann"), session("bob")
    for s in (tab1, tab2, other):
        hub.add(s)
    hub.join("lobby", tab1, presence=True)
    hub.join("lobby", tab2)
    hub.join("lobby", tab1)  # again, now without presence events
    hub.join("lobby", other)
    assert heard == [("lobby", "ann", True), ("lobby", "bob", True)]
    assert hub.watching("lobby") == set() and hub.user_sessions("ann") == {tab1, tab2}
    hub.leave("lobby", tab1)
    assert heard[2:] == []  # ann's other tab is still in
    hub.drop(tab2)
    hub.leave("lobby", tab2)  # (left already: nothing more)
    assert heard[2:] == [("lobby", "ann", False)]
    assert hub.members() == [("lobby", "bob")] and hub.user_sessions("ann") == {tab1}  # (still connected)
