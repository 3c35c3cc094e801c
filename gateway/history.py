"""History pages: the newest part from the room's Redis list, the older part from MySQL.

The decisions (which page, what to ask MySQL, how to stitch) are pure, in shared.store.paging;
this module does the reads, through the store. Redis is read first, then MySQL: a mover inserts into MySQL before it
trims Redis, so whatever leaves Redis after our read is already in MySQL when we ask it. History
reads never write to Redis (old pages are not cached back). Concurrent identical MySQL reads share
one query (single-flight). While MySQL is away, a page that Redis can start is served short, with
its `next` cursor; only a page wholly older than the list fails `unavailable`. Both the WebSocket
`history` frame and REST use `HistoryReader.page`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import aiomysql
import redis.asyncio as aioredis

from gateway import metrics
from shared.errors import BadRequest, Err, RoomcastError, StoreUnavailable
from shared.keys import Keys
from shared.settings import Settings
from shared.store.archive import Archive
from shared.store.buffer import RedisBuffer
from shared.store.entry import Entry, dedupe
from shared.store.paging import EMPTY, MysqlNeed, Page, make_page, plan, resolve_before, resolve_limit, stitch
from shared.validation import valid_room

FILL_ROUNDS = 3  # older reads that fill a page whose edits and deletes were left out
K = TypeVar("K")
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """Concurrent calls with the same key share one execution of the work and its outcome.

    The work runs in its own task: a caller that gives up (cancelled) does not cancel it for the
    others. Nothing is cached once the work is done.
    """

    def __init__(self) -> None:
        self._calls: dict[K, asyncio.Task[V]] = {}

    def __len__(self) -> int:
        return len(self._calls)

    async def do(self, key: K, work: Callable[[], Awaitable[V]]) -> V:
        task = self._calls.get(key)
        if task is None:

            async def run() -> V:
                return await work()

            task = asyncio.ensure_future(run())
            self._calls[key] = task
            task.add_done_callback(lambda t: self._forget(key, t))
        return await asyncio.shield(task)

    def _forget(self, key: K, task: asyncio.Task[V]) -> None:
        if self._calls.get(key) is task:
            del self._calls[key]


class HistoryReader:
    """Builds history pages for one gateway node; holds the single-flight of MySQL reads."""

    def __init__(self, settings: Settings, keys: Keys, redis: aioredis.Redis, pool: aiomysql.Pool,
                 mysql_timeout_s: float = 5.0) -> None:
        self._s = settings
        self._keys = keys
        self.buffer = RedisBuffer(redis, keys)
        self.archive = Archive(pool, read_timeout_s=mysql_timeout_s)
        self.flights: SingleFlight[tuple[str, int | None, int], list[Entry]] = SingleFlight()

    async def page(self, room: str, before: str | None, limit: int | None) -> Page:
        """The page of up to `limit` messages before cursor `before` (newest page when absent), as
        they are now (edited, or tombstones). Edits and deletes are records of the room but not
        messages: they are left out, and the page is filled from older records (at most FILL_ROUNDS
        more reads; a page can still be shorter than `limit`, `next` says whether older records
        exist). Raises BadRequest or StoreUnavailable."""
        page = await self._page(room, before, limit)
        if not any(e.event for e in page.entries):
            return page
        n = resolve_limit(limit, self._s.history_limit_default, self._s.history_limit_max)
        kept = [e for e in page.entries if not e.event]
        for _ in range(FILL_ROUNDS):
            if len(kept) >= n or page.next is None:
                break
            try:
                page = await self._page(room, page.next, n - len(kept))
            except StoreUnavailable:  # (what we have, with its `next`: the client pages on later)
                break
            kept = [e for e in page.entries if not e.event] + kept
        return Page(kept, page.next)

    async def _page(self, room: str, before: str | None, limit: int | None) -> Page:
        if not valid_room(room):
            raise BadRequest(Err.BAD_FRAME, "room: 1-64 characters of A-Z a-z 0-9 _ . -")
        n = resolve_limit(limit, self._s.history_limit_default, self._s.history_limit_max)
        bound = resolve_before(before, self._keys.partition(room))
        if bound is not None and bound <= 0:
            return EMPTY
        run, end = await self.buffer.read_run(room, bound, n + 1)
        decision = plan(bound, run, end, n)
        if isinstance(decision, Page):
            return decision
        need = decision
        try:
            older = await self.flights.do((room, need.before, need.count), lambda: self._older(room, need))
        except StoreUnavailable:
            if not run:
                raise
            # MySQL away: the page Redis can give, shorter but with `next`, so the client pages on later
            metrics.HISTORY_PARTIAL_PAGES.inc()
            return make_page(dedupe(run), n, older=True)
        return stitch(run, older, need, n)

    async def _older(self, room: str, need: MysqlNeed) -> list[Entry]:
        metrics.HISTORY_MYSQL_QUERIES.inc()
        return await self.archive.older(room, need)


class _HasHistory(Protocol):
    history: HistoryReader


async def history_frame(node: _HasHistory, room: str, before: str | None, limit: int | None,
                        fail: Callable[..., None]) -> str:
    """The `history` frame's JSON, or "" after `fail(code, reason)`."""
    try:
        page = await node.history.page(room, before, limit)
    except RoomcastError as e:
        fail(e.code, e.reason)
        return ""
    return page.body(room, frame=True).decode()
