"""Read marks: how far each user has read each room, kept where an echoed mark survives any crash.

The record is the compacted Kafka topic `chat.reads` (key = user + room, acks=all, partition =
the user's, so a user's marks share a partition and a Redis slot). The persister's reads consumer
(persister/reads.py) stores it in batches: MySQL `read_marks` first, then Redis. Redis holds, per
user, a hash room -> offset: a cache that is complete only once loaded from MySQL (field "" set).
Every write is "the greater of the two" (marks only move forward), so writes arriving in any
order, twice, or before a load, all end at the greatest mark. A hash Redis lost is loaded again
from MySQL on its next read; what MySQL has not got yet is still on its way from the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiomysql
import orjson
import redis.asyncio as aioredis

from shared.keys import Keys

LOADED = ""  # the hash field saying it holds every mark MySQL had (room names are never empty)
ROOMS_MAX = 1000  # rooms of read state per user: listed by `unread`, loaded in one query
HASH_TTL_S = 7 * 24 * 3600  # a user's hash leaves Redis after a week untouched (MySQL keeps it)

# KEYS[1] the user's hash; ARGV: ttl (s), then room, offset pairs. Each field becomes the greater of
# the stored and the given offset. Returns the offsets now stored, in argument order.
MERGE = """
local out = {}
for i = 2, #ARGV, 2 do
  local have = redis.call('HGET', KEYS[1], ARGV[i])
  if not have or tonumber(have) < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    have = ARGV[i + 1]
  end
  out[#out + 1] = have
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return out
"""
# The same, and the hash is complete (loaded from MySQL) afterwards.
LOAD = MERGE.replace("return out", "redis.call('HSET', KEYS[1], '', '1')\nreturn out")
# KEYS: the users' hashes, then the partition's applied mark; ARGV: ttl, the mark, then per key i
# the count of its pairs followed by the pairs. Stores the marks of one reads-topic batch and the
# partition's applied offset together (one script: Redis keeps both or neither).
APPLY = """
local a = 3
for k = 1, #KEYS - 1 do
  local n = tonumber(ARGV[a]); a = a + 1
  for i = 1, n do
    local room, off = ARGV[a], ARGV[a + 1]; a = a + 2
    local have = redis.call('HGET', KEYS[k], room)
    if not have or tonumber(have) < tonumber(off) then redis.call('HSET', KEYS[k], room, off) end
  end
  redis.call('EXPIRE', KEYS[k], ARGV[1])
end
redis.call('SET', KEYS[#KEYS], ARGV[2])
"""


@dataclass(frozen=True, slots=True)
class ReadMark:
    user: str
    room: str
    offset: int  # in the room's partition; -1: before its first record

    def key(self) -> bytes:
        """The record's key in chat.reads: compaction keeps the newest per (user, room)."""
        return orjson.dumps([self.user, self.room])

    def value(self) -> bytes:
        return orjson.dumps({"user": self.user, "room": self.room, "offset": self.offset})

    @classmethod
    def from_value(cls, raw: bytes) -> ReadMark:
        d = orjson.loads(raw)
        user, room, offset = d["user"], d["room"], d["offset"]
        if not isinstance(user, str) or not isinstance(room, str) or not isinstance(offset, int):
            raise ValueError("not a read mark")
        return cls(user, room, offset)


def greatest(marks: list[ReadMark]) -> list[ReadMark]:
    """One mark per (user, room): the greatest."""
    best: dict[tuple[str, str], ReadMark] = {}
    for m in marks:
        had = best.get((m.user, m.room))
        if had is None or m.offset > had.offset:
            best[(m.user, m.room)] = m
    return list(best.values())


async def store_in_mysql(pool: aiomysql.Pool, marks: list[ReadMark], now_ms: int, chunk: int = 500) -> None:
    """Multi-row upserts of `chunk` marks each, never moving a mark back."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        for i in range(0, len(marks), chunk):
            part = marks[i:i + chunk]
            rows: list[Any] = []
            for m in part:
                rows += [m.user, m.room, m.offset, now_ms]
            await cur.execute(
                "INSERT INTO read_marks (user_id, room, read_offset, updated_at) VALUES "
                + ",".join(["(%s,%s,%s,%s)"] * len(part))
                + " ON DUPLICATE KEY UPDATE updated_at = IF(VALUES(read_offset) > read_offset,"
                " VALUES(updated_at), updated_at), read_offset = GREATEST(read_offset, VALUES(read_offset))",
                rows)


async def load_from_mysql(pool: aiomysql.Pool, user: str) -> dict[str, int]:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT room, read_offset FROM read_marks WHERE user_id = %s "
                          "ORDER BY updated_at DESC LIMIT %s", (user, ROOMS_MAX))
        return {room: int(off) for room, off in await cur.fetchall()}


class ReadCache:
    """A user's marks in Redis, loaded from MySQL when Redis has not got all of them."""

    def __init__(self, redis: aioredis.Redis, pool: aiomysql.Pool, keys: Keys) -> None:
        self.redis = redis
        self.pool = pool
        self.keys = keys
        self._merge = redis.register_script(MERGE)
        self._load = redis.register_script(LOAD)

    async def marks(self, user: str) -> dict[str, int]:
        """Every room the user has read state in (at most ROOMS_MAX) -> offset."""
        raw = await self.redis.hgetall(self.keys.reads(user))  # (bounded: ROOMS_MAX + 1 fields)
        if LOADED.encode() not in raw:
            return await self._load_user(user)
        return _marks(raw)

    async def mark(self, user: str, room: str) -> tuple[int | None, int]:
        """The user's mark in `room` (None: none yet), and how many rooms the user has marks in."""
        key = self.keys.reads(user)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(key, [LOADED, room])
            pipe.hlen(key)
            (loaded, have), fields = await pipe.execute()
        if loaded is None:
            marks = await self._load_user(user)
            return marks.get(room), len(marks)
        return None if have is None else int(have), fields - 1

    async def merge(self, mark: ReadMark) -> int:
        """Store a mark the log acknowledged (the greater one wins); returns the stored offset."""
        [stored] = await self._merge(keys=[self.keys.reads(mark.user)], args=[HASH_TTL_S, mark.room, mark.offset])
        return int(stored)

    async def _load_user(self, user: str) -> dict[str, int]:
        from_db = await load_from_mysql(self.pool, user)
        args: list[Any] = [HASH_TTL_S]
        for room, off in from_db.items():
            args += [room, off]
        await self._load(keys=[self.keys.reads(user)], args=args)
        return _marks(await self.redis.hgetall(self.keys.reads(user)))


def _marks(raw: dict[Any, Any]) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in raw.items() if k}
