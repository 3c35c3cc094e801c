"""The persister's Redis side: append a partition's batch atomically with its applied mark."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.message import Message
from shared.redisconn import run_scripts

# One call per partition batch; every key carries the partition's hash tag.
# KEYS: applied, newrooms, overcap, then every key the messages touch, each once.
# ARGV: expected mark ('' when unknown), cap, seen ttl, sent ttl, the batch as ONE msgpack
# pair: the rooms, each [room, list, meta], and the messages, each [offset, entry, ts, room, id,
# ack, seen, sent] (room: its index in the rooms; list, meta, seen, sent: their index in KEYS).
# One argument instead of ten per message: packing thousands of arguments was most of the
# persister's CPU, and Redis unpacks the array for less than it saves (bench/README.md). What is
# per room or per seen set (its last ts, its registration, the cap check, the set's expiry) is
# written once per batch, not once per message. ARGV[6]: the fetch's last offset ('' if unknown): the
# mark moves past records that were not messages too.
# Returns {status, mark, room1, len1, room2, len2, ...}; status 0 = applied, 1 = the stored mark is
# not the one expected (Redis lost data or another persister moved it): nothing applied, seek to mark+1.
# A message is skipped when its id was appended already (a producer retry's copy) or when its
# sender's (user, client_msg_id) is already acknowledged under another id (a resend that reached
# Kafka twice). The ack is recorded over any claim (gateway.publisher: a value that is not an ack
# frame, which starts with '{'), so a resend after a gateway crash finds the first ack.
APPLY_BATCH = """
local stored = redis.call('GET', KEYS[1])
if ARGV[1] ~= '' and stored ~= ARGV[1] then
  return {1, stored or ''}
end
local mark = tonumber(stored or '-1')
local cap = tonumber(ARGV[2])
local batch = cmsgpack.unpack(ARGV[5])
local rooms = batch[1]
local lens, last_ts, seens = {}, {}, {}
for _, m in ipairs(batch[2]) do
  local off = m[1]
  if off > mark then
    mark = off
    local entry, ts, r, id, ack, seen, sent = m[2], m[3], m[4], m[5], m[6], KEYS[m[7]], KEYS[m[8]]
    local first_ack = redis.call('GET', sent)
    local acked = first_ack and string.sub(first_ack, 1, 1) == '{'
    local resent = acked and not string.find(first_ack, id, 1, true)
    if not resent and redis.call('SADD', seen, id) == 1 then
      seens[seen] = true
      if not acked then redis.call('SET', sent, ack, 'EX', ARGV[4]) end
      local len = redis.call('RPUSH', KEYS[rooms[r][2]], entry)
      if len == 1 then redis.call('HSET', KEYS[rooms[r][3]], 'first_ts', ts) end
      lens[r], last_ts[r] = len, ts
    end
  end
end
if ARGV[6] ~= '' and tonumber(ARGV[6]) > mark then mark = tonumber(ARGV[6]) end
for seen in pairs(seens) do redis.call('EXPIRE', seen, ARGV[3]) end
local out = {0, tostring(mark)}
for r, len in pairs(lens) do
  local room, meta = rooms[r][1], KEYS[rooms[r][3]]
  redis.call('HSET', meta, 'last_ts', last_ts[r])
  if redis.call('HSETNX', meta, 'reg', '1') == 1 then redis.call('SADD', KEYS[2], room) end
  if len > cap then redis.call('SADD', KEYS[3], room) end
  out[#out + 1] = room
  out[#out + 1] = len
end
redis.call('SET', KEYS[1], mark)
return out
"""

# KEYS: list, overcap. ARGV: cap, room. Drops the room from the flush work list once it is short.
DONE_IF_SHORT = """
local len = redis.call('LLEN', KEYS[1])
if len <= tonumber(ARGV[1]) then redis.call('SREM', KEYS[2], ARGV[2]) end
return len
"""


@dataclass
class Applied:
    mark: int | None  # the partition's applied offset after the call (None: nothing ever applied)
    rewind: bool  # the stored mark differed from the expected one; nothing was applied
    lengths: dict[str, int]  # room -> list length after the appends


def _int_or_none(raw: Any) -> int | None:
    if raw in (None, b"", ""):
        return None
    return int(raw)


def _names(raw: Any) -> list[str]:
    return [r.decode() if isinstance(r, bytes) else str(r) for r in raw or ()]


class RedisBuffer:
    def __init__(self, redis: aioredis.Redis, keys: Keys, cap: int, dedupe_ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._cap = cap
        self._ttl = dedupe_ttl_s
        self._apply = redis.register_script(APPLY_BATCH)
        self._done_if_short = redis.register_script(DONE_IF_SHORT)

    async def mark(self, partition: int) -> int | None:
        return _int_or_none(await self._redis.get(self._keys.applied(partition)))

    async def apply(self, partition: int, expected: int | None, messages: list[Message],
                    last: int | None = None) -> Applied:
        return (await self.apply_many([(partition, expected, messages, last)]))[0]

    async def apply_many(self, batches: list[tuple[int, int | None, list[Message], int | None]]) -> list[Applied]:
        """One APPLY_BATCH call per (partition, expected mark, messages, last offset fetched), in one
        round trip (each call is atomic on its own, and touches only its partition's slot)."""
        calls = [(self._apply, *self._apply_call(*batch)) for batch in batches]
        return [_applied(res) for res in await run_scripts(self._redis, calls)]

    def _apply_call(self, partition: int, expected: int | None, messages: list[Message],
                    last: int | None) -> tuple[list[str], list[Any]]:
        k = self._keys
        keys = [k.applied(partition), k.new_rooms(partition), k.over_cap(partition)]
        index: dict[str, int] = {}

        def key(name: str) -> int:
            """Its 1-based index in KEYS (added on first use)."""
            if (i := index.get(name)) is None:
                keys.append(name)
                i = index[name] = len(keys)
            return i

        rooms: list[tuple[str, int, int]] = []  # [room, list, meta]
        room_index: dict[str, int] = {}  # room -> its 1-based index in rooms
        rows = []
        for m in messages:
            assert m.position is not None and m.position.partition == partition
            if (r := room_index.get(m.room)) is None:
                rooms.append((m.room, key(k.msgs(m.room)), key(k.meta(m.room))))
                r = room_index[m.room] = len(rooms)
            rows.append((m.position.offset, m.entry(), str(m.ts), r, m.id, m.ack(),
                         key(k.seen(partition, m.ts)), key(k.sent(m.room, m.user, m.client_msg_id))))
        # (use_bin_type=False: Redis's cmsgpack predates msgpack's bin type; bytes go as raw strings)
        packed = msgpack.packb((rooms, rows), use_bin_type=False)
        return keys, ["" if expected is None else str(expected), self._cap, self._ttl, self._ttl, packed,
                      "" if last is None else str(last)]

    async def done_if_short(self, room: str) -> int:
        p = self._keys.partition(room)
        return int(await self._done_if_short(keys=[self._keys.msgs(room), self._keys.over_cap(p)],
                                             args=[self._cap, room]))

    async def over_cap_rooms(self, partition: int, count: int) -> list[str]:
        return _names(await self._redis.srandmember(self._keys.over_cap(partition), count))

    async def new_rooms(self, partition: int, count: int) -> list[str]:
        return _names(await self._redis.srandmember(self._keys.new_rooms(partition), count))

    async def registered(self, partition: int, rooms: list[str]) -> None:
        if rooms:
            await self._redis.srem(self._keys.new_rooms(partition), *rooms)

    async def length(self, room: str) -> int:
        return int(await self._redis.llen(self._keys.msgs(room)))


def _applied(res: list[Any]) -> Applied:
    status, mark = int(res[0]), _int_or_none(res[1])
    return Applied(mark, status == 1, {res[i].decode(): int(res[i + 1]) for i in range(2, len(res), 2)})
