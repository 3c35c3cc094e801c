"""Moving the oldest chunk of a room's Redis list to MySQL: the one operation that archives.

Used by the persister's flush (list past its cap) and by the sweeper (retention), so its
crash-safety lives here once:

1. read the oldest n entries (bounded by the chunk size);
2. insert them into MySQL in one multi-row insert that skips known ids (the unique message id makes a repeat a
   no-op, so a crash between 2 and 3 only causes a harmless re-insert next time);
3. trim exactly those entries, and only if the list still starts with them (a Lua script): when two
   movers meet on a room, the second finds its chunk gone and trims nothing it did not archive; when
   an edit or delete changed an entry of the chunk meanwhile, nothing is trimmed and the next move
   archives the entry as it is now (the archive's upsert keeps the newer state).

A row MySQL refuses for its data (a field longer than its column: a record a producer outside
roomcast wrote) would fail its chunk on every try while the room's list grows: such rows are found
by halving the chunk, and set aside in `unarchived_messages` (counted, logged) before the trim.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiomysql
import redis.asyncio as aioredis
from prometheus_client import Counter

from shared.errors import StoreRefused
from shared.keys import Keys
from shared.message import Message
from shared.store.archive import Archive
from shared.store.buffer import RedisBuffer
from shared.store.rooms import RoomDirectory

log = logging.getLogger("roomcast.mover")
SET_ASIDE = Counter("roomcast_unarchived_messages_total",
                    "Messages MySQL refused for their data, set aside in unarchived_messages")


@dataclass
class MoveResult:
    moved: int  # entries archived and trimmed by this call
    remaining: int  # list length afterwards (-1: another mover got there first)


class Mover:
    def __init__(self, redis: aioredis.Redis, pool: aiomysql.Pool, keys: Keys, rooms: RoomDirectory) -> None:
        self._buffer = RedisBuffer(redis, keys)
        self.archive = Archive(pool, rooms)

    @property
    def insert_statements(self) -> int:
        return self.archive.insert_statements

    @property
    def rows_inserted(self) -> int:
        return self.archive.rows_inserted

    async def move_oldest(
        self, room: str, limit: int, keep: Callable[[Message], bool] | None = None
    ) -> MoveResult:
        """Archive up to `limit` of the room's oldest entries; with `keep`, stop at the first entry
        it wants to keep in Redis (e.g. one newer than the retention)."""
        oldest = await self._buffer.oldest(room, limit)
        raw = oldest.entries
        chunk: list[bytes] = []
        messages: list[Message] = []
        for item in raw:
            msg = Message.from_entry(item)
            if keep is not None and keep(msg):
                break
            chunk.append(item)
            messages.append(msg)
        if not chunk:
            return MoveResult(0, len(raw))
        await self.archive_or_set_aside(room, chunk, messages)
        remaining = await self._buffer.trim_if_head(room, chunk, oldest.edits)
        return MoveResult(len(chunk) if remaining >= 0 else 0, remaining)

    async def insert(self, room: str, messages: list[Message]) -> None:
        await self.archive.insert(room, messages)

    async def archive_or_set_aside(self, room: str, chunk: list[bytes], messages: list[Message]) -> None:
        """Insert the chunk's messages; the rows MySQL refuses for their data are found by halving
        it, and set aside. Any other error (MySQL away, a deadlock, read-only) is raised: the move is
        tried again later, whole."""
        try:
            await self.insert(room, messages)
        except StoreRefused as e:
            if len(chunk) == 1:
                await self.set_aside(room, chunk[0], messages[0], e)
                return
            half = len(chunk) // 2
            await self.archive_or_set_aside(room, chunk[:half], messages[:half])
            await self.archive_or_set_aside(room, chunk[half:], messages[half:])

    async def set_aside(self, room: str, entry: bytes, msg: Message, why: StoreRefused) -> None:
        assert msg.position is not None
        await self.archive.set_aside(room, msg.position, entry, why.reason, int(time.time() * 1000))
        SET_ASIDE.inc()
        log.error("message set aside: MySQL refused it", extra={
            "room": room, "partition": msg.position.partition, "offset": msg.position.offset,
            "error": why.reason[:200]})
