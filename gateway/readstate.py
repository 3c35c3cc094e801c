"""Read state on the gateway: taking a user's read mark (forward only, acknowledged by the log
before it is echoed), and counting what a user has not read.

A count is bounded work: the room's Redis list from its newest end, window by window, until the
read mark or COUNT_MAX + 1 unread; then, only if the list did not reach back to the mark, one
indexed MySQL count over the older part, itself limited to what is still missing. A user's own
messages are not unread. Counts stop at COUNT_MAX (`more`: there are more). While MySQL does not
answer, a count is what Redis holds, with `more` set: at least that many.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiomysql
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from gateway.presence import Presence
from gateway.signals import Signals
from shared.cursor import Position
from shared.errors import BadRequest, Err, StoreUnavailable, Unavailable
from shared.keys import Keys
from shared.reads import ROOMS_MAX, ReadCache, ReadMark
from shared.settings import Settings
from shared.store.archive import Archive
from shared.store.buffer import RedisBuffer
from shared.store.entry import Entry

log = logging.getLogger("roomcast.gateway.reads")

COUNT_MAX = 1000
WINDOW = 200  # list entries per read
COUNTS_AT_ONCE = 8  # rooms of one `unread` answer counted concurrently
STORE_ERRORS = (StoreUnavailable, RedisError, OSError, aiomysql.Error)  # (the read-mark cache raises the last three)
NO_UPPER = 2**63 - 1


class ReadState:
    def __init__(self, settings: Settings, keys: Keys, redis: aioredis.Redis, mysql: aiomysql.Pool,
                 producer: AIOKafkaProducer, signals: Signals, presence: Presence) -> None:
        self.s = settings
        self.keys = keys
        self.producer = producer
        self.signals = signals
        self.presence = presence
        self.cache = ReadCache(redis, mysql, keys)
        self.buffer = RedisBuffer(redis, keys)
        self.archive = Archive(mysql)
        self._timeout = settings.kafka_request_timeout_ms / 1000 * 2

    def cursor(self, room: str, offset: int) -> str:
        return str(Position(self.keys.partition(room), offset))

    # --- marks
    async def read(self, user: str, room: str, offset: int, conn: str) -> int:
        """Move the user's mark in `room` to `offset` unless it is there already; the mark now held.
        BadRequest: read state in ROOMS_MAX rooms already; Unavailable: the log did not take the
        mark (nothing is echoed)."""
        try:
            current, rooms = await self.cache.mark(user, room)
        except STORE_ERRORS:  # the stores keep the greater mark anyway: take it without the check
            current, rooms = None, 0
        if current is not None and offset <= current:
            return current
        if current is None and rooms >= ROOMS_MAX:
            raise BadRequest(Err.LIMIT, f"read state is kept for at most {ROOMS_MAX} rooms per user")
        mark = ReadMark(user, room, offset)
        try:
            delivery = await self.producer.send(self.s.kafka_reads_topic, mark.value(), key=mark.key(),
                                                partition=self.keys.partition(user))
            await asyncio.wait_for(delivery, self._timeout)
        except (KafkaError, OSError, TimeoutError) as e:
            raise Unavailable(f"broker unavailable: {type(e).__name__}") from e
        try:
            stored = await self.cache.merge(mark)
            receipt = await self.presence.count(room) <= self.s.receipts_max_online
        except (RedisError, OSError):  # the reads consumer stores it in Redis too
            stored, receipt = offset, False
        self.signals.publish(room, {"k": "read", "user": user, "cursor": self.cursor(room, stored),
                                    "receipt": receipt, "from": conn})
        return stored

    # --- counts
    async def room_state(self, user: str, room: str) -> dict[str, Any]:
        """`read_cursor`, `unread` and `unread_more` of a `joined` frame; {} when the stores are away."""
        try:
            mark, _ = await self.cache.mark(user, room)
            count, more = await self.count(user, room, mark)
        except STORE_ERRORS as e:
            log.warning("read state unavailable", extra={"error": repr(e)})
            return {}
        return {"read_cursor": None if mark is None else self.cursor(room, mark), "unread": count,
                "unread_more": more}

    async def unread(self, user: str) -> list[dict[str, Any]]:
        """Every room the user has read state in, by name, with its count."""
        marks = await self.cache.marks(user)
        rooms = sorted(marks)
        newest = await self.buffer.newest(rooms)
        gate = asyncio.Semaphore(COUNTS_AT_ONCE)

        async def one(room: str, last: Entry | None) -> tuple[int, bool]:
            if last is not None and last.offset <= marks[room]:
                return 0, False  # read up to the newest message: nothing to count
            async with gate:
                return await self.count(user, room, marks[room])

        counts = await asyncio.gather(*(one(r, last) for r, last in zip(rooms, newest, strict=True)))
        return [{"room": r, "count": n, "more": more, "read_cursor": self.cursor(r, marks[r])}
                for r, (n, more) in zip(rooms, counts, strict=True)]

    async def count(self, user: str, room: str, after: int | None) -> tuple[int, bool]:
        """Messages of others in `room` after offset `after` (None: all), at most COUNT_MAX; and
        whether there are more."""
        after = -1 if after is None else after
        n, below, walked = 0, NO_UPPER, 0
        start = -WINDOW
        while True:
            window = await self.buffer.window(room, start, WINDOW)
            for entry in reversed(window):
                if entry.offset >= below:  # (the list moved between two reads: seen already)
                    continue
                below = entry.offset
                if entry.offset <= after:
                    return n, False
                if entry.user != user and not entry.event and not entry.deleted:  # (a message to read)
                    n += 1
                    if n > COUNT_MAX:
                        return COUNT_MAX, True
            walked += len(window)
            if len(window) < WINDOW:
                break
            if walked > 2 * (COUNT_MAX + self.s.buffer_cap):  # (a user's own messages are walked over too)
                return n, True
            start -= WINDOW
        try:
            n += await self.archive.count_others(room, after, below, user, COUNT_MAX + 1 - n)
        except StoreUnavailable as e:
            log.warning("unread count without MySQL", extra={"room": room, "error": repr(e.__cause__)})
            return n, True
        return (COUNT_MAX, True) if n > COUNT_MAX else (n, False)
