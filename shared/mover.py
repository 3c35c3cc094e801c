"""Moving the oldest chunk of a room's Redis list to MySQL: the one operation that archives.

Used by the persister's flush (list past its cap) and by the sweeper (retention), so its
crash-safety lives here once:

1. LRANGE the oldest n entries (bounded by the chunk size);
2. insert them into MySQL in one multi-row insert that skips known ids (the unique message id makes a repeat a
   no-op, so a crash between 2 and 3 only causes a harmless re-insert next time);
3. trim exactly those entries, and only if the list still starts with them (a Lua script): when two
   movers meet on a room, the second finds its chunk gone and trims nothing it did not archive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomysql
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.message import Message
from shared.rooms import RoomDirectory

# KEYS: list, meta. ARGV: n, first entry, last entry. Returns the new length, or -1 when the list
# no longer starts with the chunk that was archived.
TRIM_IF_HEAD = """
local n = tonumber(ARGV[1])
if redis.call('LINDEX', KEYS[1], 0) ~= ARGV[2] or redis.call('LINDEX', KEYS[1], n - 1) ~= ARGV[3] then
  return -1
end
redis.call('LTRIM', KEYS[1], n, -1)
local head = redis.call('LINDEX', KEYS[1], 0)
if head then
  redis.call('HSET', KEYS[2], 'first_ts', cjson.decode(head)['ts'])
else
  redis.call('HDEL', KEYS[2], 'first_ts')
end
return redis.call('LLEN', KEYS[1])
"""

INSERT_SQL = (
    "INSERT INTO messages "
    "(id, room_id, kafka_partition, kafka_offset, user_id, client_msg_id, body, created_at) VALUES "
)
# Ignore rows already archived without INSERT IGNORE, whose duplicate warnings cost a round trip.
ON_DUPLICATE = " ON DUPLICATE KEY UPDATE id = id"


@dataclass
class MoveResult:
    moved: int  # entries archived and trimmed by this call
    remaining: int  # list length afterwards (-1: another mover got there first)


class Mover:
    def __init__(self, redis: aioredis.Redis, pool: aiomysql.Pool, keys: Keys, rooms: RoomDirectory) -> None:
        self._redis = redis
        self._pool = pool
        self._keys = keys
        self._rooms = rooms
        self._trim = redis.register_script(TRIM_IF_HEAD)
        self.insert_statements = 0  # MySQL statements that wrote messages (batching is asserted on it)
        self.rows_inserted = 0

    async def move_oldest(
        self, room: str, limit: int, keep: Callable[[Message], bool] | None = None
    ) -> MoveResult:
        """Archive up to `limit` of the room's oldest entries; with `keep`, stop at the first entry
        it wants to keep in Redis (e.g. one newer than the retention)."""
        list_key = self._keys.msgs(room)
        raw: list[Any] = await self._redis.lrange(list_key, 0, limit - 1)
        chunk: list[tuple[Any, Message]] = []
        for item in raw:
            msg = Message.from_entry(item)
            if keep is not None and keep(msg):
                break
            chunk.append((item, msg))
        if not chunk:
            return MoveResult(0, len(raw))
        await self.insert(room, [m for _, m in chunk])
        remaining = await self._trim(
            keys=[list_key, self._keys.meta(room)], args=[len(chunk), chunk[0][0], chunk[-1][0]]
        )
        return MoveResult(len(chunk) if remaining >= 0 else 0, int(remaining))

    async def insert(self, room: str, messages: list[Message]) -> None:
        """One multi-row insert; rows already archived are ignored (unique message id)."""
        room_id = await self._rooms.id(room)
        params: list[object] = []
        for m in messages:
            assert m.position is not None
            params += [m.id, room_id, m.position.partition, m.position.offset, m.user,
                       m.client_msg_id, m.body, m.ts]
        sql = INSERT_SQL + ",".join(["(%s,%s,%s,%s,%s,%s,%s,%s)"] * len(messages)) + ON_DUPLICATE
        async with self._pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(sql, params)
            self.insert_statements += 1
            self.rows_inserted += cur.rowcount  # 1 per new row, 0 per duplicate
