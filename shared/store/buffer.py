"""The Redis buffer: each room's list of its newest stored entries, its meta hash, the partition's
applied mark and work lists (rooms over the cap, rooms not yet registered in MySQL), and every
script that reads or writes them. The persister appends a partition's batch atomically with its
applied mark (APPLY_BATCH); gateways read pages and resume ranges (READ_RUN); movers take a list's
oldest entries and trim exactly those (TRIM_IF_HEAD). Any Redis failure is StoreUnavailable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.errors import StoreUnavailable
from shared.keys import Keys
from shared.message import Message
from shared.redisconn import run_scripts
from shared.store import claims
from shared.store.entry import DELETE, EDIT, MESSAGE, Entry, parse
from shared.store.entry import LUA as ENTRY_LUA
from shared.store.paging import NO_BOUND, RunEnd

# "Is this room's list over the cap": the one rule, here and in the scripts below.
OVER_CAP_LUA = """
local function over_cap(len, cap) return len > tonumber(cap) end
"""


KINDS = {MESSAGE: 0, EDIT: 1, DELETE: 2}  # a record's kind in APPLY_BATCH's rows


def excess(length: int, cap: int) -> int:
    """Messages past the cap in a list of `length` (0: not over it)."""
    return max(0, length - cap)


# Edits and deletes in a room's list (the Lua side of shared.store.entry's states). `locate` finds
# the entry at an offset by bisection (the list is in offset order); `scrub_edits` blanks the edits
# of a deleted message from list index `from` on, in windows (string.find first: most entries are
# not those edits). Bounded by the list's length: cap + chunk while MySQL keeps up. Every change of
# an entry in place counts in the room's meta (`edits`): a mover trims a chunk only if none
# happened since it read it (TRIM_IF_HEAD).
EVENTS_LUA = """
local function tombstone(e)
  local t = {id = e['id'], room = e['room'], ts = e['ts'], cursor = e['cursor'], deleted = true}
  if e['kind'] then t['kind'], t['target'], t['toff'] = e['kind'], e['target'], e['toff'] end
  return cjson.encode(t)
end
local function set_entry(key, meta, i, raw)
  redis.call('LSET', key, i, raw)
  redis.call('HINCRBY', meta, 'edits', 1)
end
local function locate(key, toff)
  local n = redis.call('LLEN', key)
  if n == 0 then return nil, true end
  local function off(i) return entry_offset(redis.call('LINDEX', key, i)) end
  if toff < off(0) then return nil, true end
  local lo, hi = 0, n - 1
  if off(hi) < toff then return nil, false end
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if off(mid) < toff then lo = mid + 1 else hi = mid end
  end
  if off(lo) == toff then return lo, false end
  return nil, false
end
local function scrub_edits(key, meta, from, id)
  local pat = '"target":"' .. id .. '"'
  local n, i = redis.call('LLEN', key), from
  while i < n do
    local items = redis.call('LRANGE', key, i, i + 199)
    for j = 1, #items do
      if string.find(items[j], pat, 1, true) then
        local e = cjson.decode(items[j])
        if e['kind'] == 'edit' and e['target'] == id and not e['deleted'] then
          set_entry(key, meta, i + j - 1, tombstone(e))
        end
      end
    end
    i = i + 200
  end
end
"""

# One call per partition batch; every key carries the partition's hash tag.
# KEYS: applied, newrooms, overcap, archived events, then every key the messages touch, each once.
# ARGV: expected mark ('' when unknown), cap, seen ttl, sent ttl, the batch as ONE msgpack
# pair: the rooms, each [room, list, meta], and the messages, each [offset, entry, ts, room, id,
# ack, seen, sent, kind, target, target offset, body] (room: its index in the rooms; list, meta, seen,
# sent: their index in KEYS; kind: 0 message, 1 edit, 2 delete).
# One argument instead of ten per message: packing thousands of arguments was most of the
# persister's CPU, and Redis unpacks the array for less than it saves (bench/README.md). What is
# per room or per seen set (its last ts, its registration, the cap check, the set's expiry) is
# written once per batch, not once per message. ARGV[6]: the fetch's last offset ('' if unknown): the
# mark moves past records that were not messages too.
# Returns {status, mark, archived, room1, len1, room2, len2, ...}; status 0 = applied, 1 = the stored
# mark is not the one expected (Redis lost data or another persister moved it): nothing applied, seek
# to mark+1; archived: events queued for MySQL.
# An edit or delete is applied to its message where the list holds it (a deleted message's edits are
# blanked too; an edit of a deleted message is stored blank), or queued on the archived-events list
# when the message is older than the list (the flush loop applies it to MySQL); then appended like
# a message, at its own position.
# A message is skipped when its id was appended already (a producer retry's copy) or when its
# sender's (user, client_msg_id) is already acknowledged under another id (a resend that reached
# Kafka twice). The ack is recorded over any claim (claims.LUA: a value that is not an ack frame), so
# a resend after a gateway crash finds the first ack.
APPLY_BATCH = OVER_CAP_LUA + claims.LUA + ENTRY_LUA + EVENTS_LUA + """
local function apply_event(key, meta, m)
  local kind, target, toff, off = m[9], m[10], m[11], m[1]
  local i, archived = locate(key, toff)
  if archived then
    redis.call('RPUSH', KEYS[4], m[2])
    if kind == 2 then scrub_edits(key, meta, 0, target) end
    return m[2], 1
  end
  if not i then return m[2], 0 end
  local t = cjson.decode(redis.call('LINDEX', key, i))
  if t['id'] ~= target or t['kind'] then return m[2], 0 end
  if t['deleted'] then
    if kind == 1 then return tombstone(cjson.decode(m[2])), 0 end
  elseif kind == 1 then
    if off <= (t['rev'] or -1) then return m[2], 0 end  -- (a replay: a newer edit is there already)
    t['body'], t['edited_ts'], t['rev'] = m[12], tonumber(m[3]), off
    set_entry(key, meta, i, cjson.encode(t))
  else
    set_entry(key, meta, i, tombstone(t))
    scrub_edits(key, meta, i + 1, target)
  end
  return m[2], 0
end
local stored = redis.call('GET', KEYS[1])
if ARGV[1] ~= '' and stored ~= ARGV[1] then
  return {1, stored or ''}
end
local mark = tonumber(stored or '-1')
local cap = ARGV[2]
local batch = cmsgpack.unpack(ARGV[5])
local rooms = batch[1]
local lens, last_ts, seens, archived = {}, {}, {}, 0
for _, m in ipairs(batch[2]) do
  local off = m[1]
  if off > mark then
    mark = off
    local entry, ts, r, id, ack, seen, sent = m[2], m[3], m[4], m[5], m[6], KEYS[m[7]], KEYS[m[8]]
    local first_ack = redis.call('GET', sent)
    local acked = first_ack and is_ack(first_ack)
    local resent = acked and not string.find(first_ack, id, 1, true)
    if not resent and redis.call('SADD', seen, id) == 1 then
      seens[seen] = true
      if not acked then redis.call('SET', sent, ack, 'EX', ARGV[4]) end
      if m[9] ~= 0 then
        local queued
        entry, queued = apply_event(KEYS[rooms[r][2]], KEYS[rooms[r][3]], m)
        archived = archived + queued
      end
      local len = redis.call('RPUSH', KEYS[rooms[r][2]], entry)
      if len == 1 then redis.call('HSET', KEYS[rooms[r][3]], 'first_ts', ts) end
      lens[r], last_ts[r] = len, ts
    end
  end
end
if ARGV[6] ~= '' and tonumber(ARGV[6]) > mark then mark = tonumber(ARGV[6]) end
for seen in pairs(seens) do redis.call('EXPIRE', seen, ARGV[3]) end
local out = {0, tostring(mark), archived}
for r, len in pairs(lens) do
  local room, meta = rooms[r][1], KEYS[rooms[r][3]]
  redis.call('HSET', meta, 'last_ts', last_ts[r])
  if redis.call('HSETNX', meta, 'reg', '1') == 1 then redis.call('SADD', KEYS[2], room) end
  if over_cap(len, cap) then redis.call('SADD', KEYS[3], room) end
  out[#out + 1] = room
  out[#out + 1] = len
end
redis.call('SET', KEYS[1], mark)
return out
"""

# KEYS: list, overcap. ARGV: cap, room. Drops the room from the flush work list once it is short.
DONE_IF_SHORT = OVER_CAP_LUA + """
local len = redis.call('LLEN', KEYS[1])
if not over_cap(len, ARGV[1]) then redis.call('SREM', KEYS[2], ARGV[2]) end
return len
"""


# KEYS: the room's list. ARGV: exclusive offset bound ('' = newest), window w, and optionally an
# exclusive lower bound `after`. Returns {end, entry, ...}: the up to w newest entries with
# after < offset < bound, oldest first, read atomically; end (paging.RunEnd) = 1 when they start at
# the list's first entry, 2 when entries at or below `after` precede them, else 0. The bounds'
# indexes are found by probing a few entries (LINDEX): galloping from the tail, where pages usually
# are, then bisecting; so a list that grew long (MySQL down) is never read whole.
READ_RUN = ENTRY_LUA + """
local key, w = KEYS[1], tonumber(ARGV[2])
local n = redis.call('LLEN', key)
local function off(i) return entry_offset(redis.call('LINDEX', key, i)) end
local hi = n
if ARGV[1] ~= '' and n > 0 then
  local bound = tonumber(ARGV[1])
  if off(0) >= bound then
    hi = 0
  elseif off(n - 1) >= bound then
    local lo, step = 0, w
    hi = n - 1
    while true do
      local i = n - 1 - step
      if i <= lo then break end
      if off(i) >= bound then hi = i; step = step * 2 else lo = i; break end
    end
    while hi - lo > 1 do
      local mid = math.floor((lo + hi) / 2)
      if off(mid) >= bound then hi = mid else lo = mid end
    end
  end
end
local start = math.max(hi - w, 0)
local ends = start == 0 and 1 or 0
if ARGV[3] and hi > start and off(start) <= tonumber(ARGV[3]) then
  local after, lo, up = tonumber(ARGV[3]), start, hi
  while up - lo > 1 do
    local mid = math.floor((lo + up) / 2)
    if off(mid) > after then up = mid else lo = mid end
  end
  start, ends = up, 2
elseif ARGV[3] and start > 0 and off(start - 1) <= tonumber(ARGV[3]) then
  ends = 2
end
local out = {ends}
if hi > start then
  local items = redis.call('LRANGE', key, start, hi - 1)
  for i = 1, #items do out[i + 1] = items[i] end
end
return out
"""

# KEYS: list, meta. ARGV: count. Returns {edits, entry, ...}: the room's `count` oldest entries and
# its count of entries changed in place so far (OLDEST and TRIM_IF_HEAD bracket a move).
OLDEST = """
local out = {redis.call('HGET', KEYS[2], 'edits') or ''}
local items = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
for i = 1, #items do out[i + 1] = items[i] end
return out
"""

# KEYS: list, meta. ARGV: n, first entry, last entry, the edits count read with them (OLDEST).
# Returns the new length, or -1 when the list no longer starts with the chunk that was archived
# (another mover got there first), or an edit or delete changed an entry in place since it was
# read (the next move archives the entry as it is now).
TRIM_IF_HEAD = ENTRY_LUA + """
local n = tonumber(ARGV[1])
if redis.call('LINDEX', KEYS[1], 0) ~= ARGV[2] or redis.call('LINDEX', KEYS[1], n - 1) ~= ARGV[3]
    or (redis.call('HGET', KEYS[2], 'edits') or '') ~= ARGV[4] then
  return -1
end
redis.call('LTRIM', KEYS[1], n, -1)
local head = redis.call('LINDEX', KEYS[1], 0)
if head then
  redis.call('HSET', KEYS[2], 'first_ts', entry_ts(head))
else
  redis.call('HDEL', KEYS[2], 'first_ts')
end
return redis.call('LLEN', KEYS[1])
"""


# KEYS: the archived-events list. ARGV: the entries taken from its head. Drops them if it still
# starts with them (applying one twice changes nothing; this only keeps the list short).
DROP_IF_HEAD = """
local head = redis.call('LRANGE', KEYS[1], 0, #ARGV - 1)
if #head ~= #ARGV then return 0 end
for i = 1, #ARGV do
  if head[i] ~= ARGV[i] then return 0 end
end
redis.call('LTRIM', KEYS[1], #ARGV, -1)
return 1
"""

# KEYS: the room's list, meta. ARGV: an edit's offset. Blanks the edit where the list holds it (its
# message was deleted before it: the archive found that out).
BLANK_EDIT = ENTRY_LUA + EVENTS_LUA + """
local i = locate(KEYS[1], tonumber(ARGV[1]))
if i then
  local e = cjson.decode(redis.call('LINDEX', KEYS[1], i))
  if e['kind'] == 'edit' and not e['deleted'] then set_entry(KEYS[1], KEYS[2], i, tombstone(e)) end
end
"""

# KEYS: the room's list. ARGV: a message id. Returns the message's entry (not an event), or false;
# read from the newest end in windows (edits are mostly of recent messages).
FIND = """
local key, id = KEYS[1], ARGV[1]
local pat = '"id":"' .. id .. '"'
local hi = redis.call('LLEN', key) - 1
while hi >= 0 do
  local lo = math.max(0, hi - 199)
  local items = redis.call('LRANGE', key, lo, hi)
  for j = #items, 1, -1 do
    if string.find(items[j], pat, 1, true) then
      local e = cjson.decode(items[j])
      if e['id'] == id and not e['kind'] then return items[j] end
    end
  end
  hi = lo - 1
end
return false
"""


@contextlib.contextmanager
def _answering() -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as e:
        raise StoreUnavailable("message buffer unavailable") from e


@dataclass
class Chunk:
    entries: list[bytes]  # oldest first
    edits: bytes  # the room's count of entries changed in place when they were read


@dataclass
class Applied:
    mark: int | None  # the partition's applied offset after the call (None: nothing ever applied)
    rewind: bool  # the stored mark differed from the expected one; nothing was applied
    lengths: dict[str, int]  # room -> list length after the appends
    archived_events: int = 0  # edits and deletes queued for MySQL (their messages are archived)


def _int_or_none(raw: Any) -> int | None:
    if raw in (None, b"", ""):
        return None
    return int(raw)


def _names(raw: Any) -> list[str]:
    return [r.decode() if isinstance(r, bytes) else str(r) for r in raw or ()]


class RedisBuffer:
    """`cap` and `dedupe_ttl_s` matter to the persister's appends only."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, cap: int = 0, dedupe_ttl_s: int = 0) -> None:
        self._redis = redis
        self._keys = keys
        self._cap = cap
        self._ttl = dedupe_ttl_s
        self._apply = redis.register_script(APPLY_BATCH)
        self._done_if_short = redis.register_script(DONE_IF_SHORT)
        self._read_run = redis.register_script(READ_RUN)
        self._oldest = redis.register_script(OLDEST)
        self._trim = redis.register_script(TRIM_IF_HEAD)
        self._drop_if_head = redis.register_script(DROP_IF_HEAD)
        self._blank_edit = redis.register_script(BLANK_EDIT)
        self._find = redis.register_script(FIND)

    def excess(self, length: int) -> int:
        return excess(length, self._cap)

    async def mark(self, partition: int) -> int | None:
        """The partition's applied mark: the highest Kafka offset in Redis (None: nothing applied)."""
        with _answering():
            return _int_or_none(await self._redis.get(self._keys.applied(partition)))

    async def read_run(self, room: str, before: int | None, window: int, after: int = NO_BOUND
                       ) -> tuple[list[Entry], RunEnd]:
        """READ_RUN: the up to `window` newest entries with after < offset < before, oldest first."""
        args: list[Any] = ["" if before is None else before, window]
        if after != NO_BOUND:
            args.append(after)
        with _answering():
            res = await self._read_run(keys=[self._keys.msgs(room)], args=args)
        return [parse(raw) for raw in res[1:]], RunEnd(int(res[0]))

    async def window(self, room: str, start: int, count: int) -> list[Entry]:
        """The up to `count` entries from list index `start` on (negative: from the newest end), oldest first."""
        with _answering():
            raw: list[Any] = await self._redis.lrange(self._keys.msgs(room), start, start + count - 1)
        return [parse(r) for r in raw]

    async def newest(self, rooms: Sequence[str]) -> list[Entry | None]:
        """Each room's newest entry (None: its list is empty), in one pipeline."""
        with _answering():
            pipe = self._redis.pipeline(transaction=False)
            for name in rooms:
                pipe.lindex(self._keys.msgs(name), -1)
            return [None if raw is None else parse(raw) for raw in await pipe.execute()]

    async def oldest(self, room: str, count: int) -> Chunk:
        """The room's `count` oldest entries (and what a trim of them must find unchanged)."""
        with _answering():
            res: list[Any] = await self._oldest(keys=[self._keys.msgs(room), self._keys.meta(room)], args=[count])
        return Chunk(res[1:], res[0])

    async def trim_if_head(self, room: str, chunk: Sequence[bytes], edits: bytes | str) -> int:
        """Drop `chunk` from the list's head if the list still starts with it and no entry was edited
        in place since it was read (`edits`: the Chunk's); the new length, or -1."""
        with _answering():
            return int(await self._trim(keys=[self._keys.msgs(room), self._keys.meta(room)],
                                        args=[len(chunk), chunk[0], chunk[-1], edits]))

    async def find(self, room: str, msg_id: str) -> Message | None:
        """The message `msg_id` of `room` as the list holds it now (None: not in the list)."""
        with _answering():
            raw = await self._find(keys=[self._keys.msgs(room)], args=[msg_id])
        return Message.from_entry(raw) if raw else None

    async def archived_events(self, partition: int, count: int) -> list[bytes]:
        """The oldest `count` edits and deletes queued for MySQL (APPLY_BATCH), as stored entries."""
        with _answering():
            raw: list[Any] = await self._redis.lrange(self._keys.archived_events(partition), 0, count - 1)
        return raw

    async def drop_archived_events(self, partition: int, applied: Sequence[bytes]) -> None:
        with _answering():
            await self._drop_if_head(keys=[self._keys.archived_events(partition)], args=list(applied))

    async def blank_edit(self, edit: Message) -> None:
        """Blank an edit that found its message deleted, where the room's list holds it."""
        assert edit.position is not None
        with _answering():
            await self._blank_edit(keys=[self._keys.msgs(edit.room), self._keys.meta(edit.room)],
                                   args=[edit.position.offset])

    async def metas(self, rooms: Sequence[str]) -> list[tuple[Any, Any]]:
        """(first_ts, last_ts) of each room's meta hash, raw, in one pipeline."""
        with _answering():
            pipe = self._redis.pipeline(transaction=False)
            for name in rooms:
                pipe.hmget(self._keys.meta(name), "first_ts", "last_ts")
            return [(first, last) for first, last in await pipe.execute()]

    async def apply(self, partition: int, expected: int | None, messages: list[Message],
                    last: int | None = None) -> Applied:
        return (await self.apply_many([(partition, expected, messages, last)]))[0]

    async def apply_many(self, batches: list[tuple[int, int | None, list[Message], int | None]]) -> list[Applied]:
        """One APPLY_BATCH call per (partition, expected mark, messages, last offset fetched), in one
        round trip (each call is atomic on its own, and touches only its partition's slot)."""
        calls = [(self._apply, *self._apply_call(*batch)) for batch in batches]
        with _answering():
            results = await run_scripts(self._redis, calls)
        return [_applied(res) for res in results]

    def _apply_call(self, partition: int, expected: int | None, messages: list[Message],
                    last: int | None) -> tuple[list[str], list[Any]]:
        k = self._keys
        keys = [k.applied(partition), k.new_rooms(partition), k.over_cap(partition), k.archived_events(partition)]
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
                         key(k.seen(partition, m.ts)), key(k.sent(m.room, m.user, m.client_msg_id)),
                         KINDS[m.kind], m.target, m.target_offset, m.body if m.kind == EDIT else ""))
        # (use_bin_type=False: Redis's cmsgpack predates msgpack's bin type; bytes go as raw strings)
        packed = msgpack.packb((rooms, rows), use_bin_type=False)
        return keys, ["" if expected is None else str(expected), self._cap, self._ttl, self._ttl, packed,
                      "" if last is None else str(last)]

    async def done_if_short(self, room: str) -> int:
        """Drop the room from the flush work list if its list is within the cap; its length."""
        p = self._keys.partition(room)
        with _answering():
            return int(await self._done_if_short(keys=[self._keys.msgs(room), self._keys.over_cap(p)],
                                                 args=[self._cap, room]))

    async def over_cap_rooms(self, partition: int, count: int) -> list[str]:
        with _answering():
            return _names(await self._redis.srandmember(self._keys.over_cap(partition), count))

    async def new_rooms(self, partition: int, count: int) -> list[str]:
        with _answering():
            return _names(await self._redis.srandmember(self._keys.new_rooms(partition), count))

    async def registered(self, partition: int, rooms: list[str]) -> None:
        if rooms:
            with _answering():
                await self._redis.srem(self._keys.new_rooms(partition), *rooms)

    async def length(self, room: str) -> int:
        with _answering():
            return int(await self._redis.llen(self._keys.msgs(room)))


def _applied(res: list[Any]) -> Applied:
    status, mark = int(res[0]), _int_or_none(res[1])
    if status == 1:
        return Applied(mark, True, {})
    return Applied(mark, False, {res[i].decode(): int(res[i + 1]) for i in range(3, len(res), 2)}, int(res[2]))
