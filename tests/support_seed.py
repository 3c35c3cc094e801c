"""Seeding rooms straight into Redis and MySQL, in the formats the persister writes (no Kafka).

Messages get increasing offsets per partition (a room's messages are ordered by offset) and the
timestamps the test injects. Redis: the room's list of `Message.entry()` items, and its meta hash
(first_ts = oldest entry's ts, last_ts = newest, reg = 1). MySQL: rooms registered through
RoomDirectory, archived rows through the Mover's own multi-row insert.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import aiomysql
import redis.asyncio as aioredis

from shared.cursor import Position
from shared.keys import Keys
from shared.message import Message, new_message_id
from shared.settings import Settings
from shared.store.mover import Mover
from shared.store.rooms import RoomDirectory

DAY_MS = 24 * 3600 * 1000


class Seeder:
    def __init__(self, settings: Settings, redis: aioredis.Redis, pool: aiomysql.Pool) -> None:
        self.keys = Keys(settings.redis_prefix, settings.kafka_partitions)
        self.redis = redis
        self.rooms = RoomDirectory(pool)
        self.mover = Mover(redis, pool, self.keys, self.rooms)
        self._next: dict[int, int] = defaultdict(int)  # partition -> next offset

    def messages(self, room: str, timestamps: Iterable[int], body: str = "hello", gap: int = 1) -> list[Message]:
        """Messages of `room`, one per timestamp, at increasing offsets (`gap` apart: positions are
        not dense, other rooms share the partition)."""
        p = self.keys.partition(room)
        out = []
        for i, ts in enumerate(timestamps):
            off = self._next[p]
            self._next[p] = off + gap
            out.append(Message(new_message_id(), room, f"u{i % 7}", f"{body} {i}", ts, f"c-{off}", Position(p, off)))
        return out

    async def register(self, rooms: Sequence[str]) -> dict[str, int]:
        ids: dict[str, int] = {}
        for i in range(0, len(rooms), 500):
            ids.update(await self.rooms.ids(rooms[i:i + 500]))
        return ids

    async def to_redis(self, by_room: dict[str, list[Message]], batch: int = 200) -> None:
        """Append each room's messages to its list and set its meta, pipelined `batch` rooms a time."""
        items = [(room, msgs) for room, msgs in by_room.items() if msgs]
        for i in range(0, len(items), batch):
            pipe = self.redis.pipeline(transaction=False)
            for room, msgs in items[i:i + batch]:
                pipe.rpush(self.keys.msgs(room), *[m.entry() for m in msgs])
                pipe.hsetnx(self.keys.meta(room), "first_ts", msgs[0].ts)
                pipe.hset(self.keys.meta(room), mapping={"last_ts": msgs[-1].ts, "reg": 1})
            await pipe.execute()

    async def to_mysql(self, room: str, msgs: Sequence[Message], batch: int = 500) -> None:
        for i in range(0, len(msgs), batch):
            await self.mover.insert(room, list(msgs[i:i + batch]))


async def redis_ids(redis: aioredis.Redis, keys: Keys, rooms: Sequence[str]) -> dict[str, list[str]]:
    """Every room's list as message ids, oldest first (tests only: reads whole, short lists)."""
    pipe = redis.pipeline(transaction=False)
    for room in rooms:
        pipe.lrange(keys.msgs(room), 0, -1)
    lists = await pipe.execute()
    return {room: [Message.from_entry(raw).id for raw in items] for room, items in zip(rooms, lists, strict=True)}


async def mysql_ids(pool: aiomysql.Pool) -> dict[str, list[str]]:
    """Every archived message id by room name, in offset order."""
    out: dict[str, list[str]] = defaultdict(list)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT r.name, m.id FROM messages m JOIN rooms r ON r.id = m.room_id "
                          "ORDER BY m.room_id, m.kafka_offset")
        for name, mid in await cur.fetchall():
            out[name].append(mid)
    return out


async def count_messages(pool: aiomysql.Pool) -> int:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT COUNT(*) FROM messages")
        (n,) = await cur.fetchone()
    return int(n)
