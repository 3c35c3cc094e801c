"""History pages: the newest part from the room's Redis list, the older part from MySQL.

The decisions (which page, what to ask MySQL, how to stitch) are pure, in gateway.history_plan;
this module does the reads. Redis is read first, then MySQL: a mover inserts into MySQL before it
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
import pymysql
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway import metrics
from gateway.history_plan import (
    EMPTY,
    BadRequest,
    Entry,
    HistoryError,
    MysqlNeed,
    Page,
    Unavailable,
    dedupe,
    make_page,
    parse_entry,
    plan,
    resolve_before,
    resolve_limit,
    stitch,
)
from gateway.protocol import Err
from shared.cursor import Position
from shared.keys import Keys
from shared.message import Message
from shared.settings import Settings
from shared.validation import valid_room

# KEYS: the room's list. ARGV: exclusive offset bound ('' = newest page), window w (limit + 1).
# Returns {at_head, entry, ...}: the up to w newest entries with offset < bound, oldest first, read
# atomically; at_head = 1 when they start at the list's first entry. The bound's index is found
# by probing a few entries (LINDEX): galloping from the tail, where pages usually are, then
# bisecting; so a list that grew long (MySQL down) is never read whole.
READ_RUN = """
local key, w = KEYS[1], tonumber(ARGV[2])
local n = redis.call('LLEN', key)
local hi = n
if ARGV[1] ~= '' and n > 0 then
  local bound = tonumber(ARGV[1])
  local function off(i)
    local cursor = cjson.decode(redis.call('LINDEX', key, i))['cursor']
    return tonumber(string.match(cursor, '(%d+)$'))
  end
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
local out = {start == 0 and 1 or 0}
if hi > start then
  local items = redis.call('LRANGE', key, start, hi - 1)
  for i = 1, #items do out[i + 1] = items[i] end
end
return out
"""

# A range read backwards on (room_id, kafka_offset): it touches only the rows it returns. The room id
# comes from a subquery on the unique name, so no lookup round trip and no cache of ids is needed.
_COLUMNS = ("SELECT id, kafka_partition, kafka_offset, user_id, client_msg_id, body, created_at FROM messages "
            "WHERE room_id = (SELECT id FROM rooms WHERE name = %s)")
OLDER_SQL = _COLUMNS + " AND kafka_offset < %s ORDER BY kafka_offset DESC LIMIT %s"
NEWEST_SQL = _COLUMNS + " ORDER BY kafka_offset DESC LIMIT %s"

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
        self._pool = pool
        self._timeout = mysql_timeout_s
        self._read_run = redis.register_script(READ_RUN)
        self.flights: SingleFlight[tuple[str, int | None, int], list[Entry]] = SingleFlight()

    async def page(self, room: str, before: str | None, limit: int | None) -> Page:
        """The page of up to `limit` messages before cursor `before` (newest page when absent).
        Raises BadRequest or Unavailable."""
        if not valid_room(room):
            raise BadRequest(Err.BAD_FRAME, "room: 1-64 characters of A-Z a-z 0-9 _ . -")
        n = resolve_limit(limit, self._s.history_limit_default, self._s.history_limit_max)
        bound = resolve_before(before, self._keys.partition(room))
        if bound is not None and bound <= 0:
            return EMPTY
        try:
            res = await self._read_run(keys=[self._keys.msgs(room)], args=["" if bound is None else bound, n + 1])
        except (RedisError, OSError) as e:
            raise Unavailable("message buffer unavailable") from e
        run = [parse_entry(raw) for raw in res[1:]]
        decision = plan(bound, run, bool(res[0]), n)
        if isinstance(decision, Page):
            return decision
        need = decision
        try:
            older = await self.flights.do((room, need.before, need.count), lambda: self._older(room, need))
        except Unavailable:
            if not run:
                raise
            # MySQL away: the page Redis can give, shorter but with `next`, so the client pages on later
            metrics.HISTORY_PARTIAL_PAGES.inc()
            return make_page(dedupe(run), n, older=True)
        return stitch(run, older, need, n)

    async def _older(self, room: str, need: MysqlNeed) -> list[Entry]:
        """MySQL's newest `need.count` messages of the room older than `need.before`, newest first."""
        metrics.HISTORY_MYSQL_QUERIES.inc()
        sql, args = ((NEWEST_SQL, (room, need.count)) if need.before is None
                     else (OLDER_SQL, (room, need.before, need.count)))
        try:
            async with asyncio.timeout(self._timeout), self._pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute(sql, args)
                rows = await cur.fetchall()
        except (pymysql.err.Error, OSError, TimeoutError) as e:
            raise Unavailable("message archive unavailable") from e
        out = []
        for mid, part, off, user, cmid, body, ts in rows:
            raw = Message(mid, room, user, body, int(ts), cmid, Position(int(part), int(off))).entry()
            out.append(Entry(int(off), mid, f"{part}-{off}", raw))
        return out


class _HasHistory(Protocol):
    history: HistoryReader


async def history_frame(node: _HasHistory, room: str, before: str | None, limit: int | None,
                        fail: Callable[..., None]) -> str:
    """The `history` frame's JSON, or "" after `fail(code, reason)`."""
    try:
        page = await node.history.page(room, before, limit)
    except HistoryError as e:
        fail(e.code, e.reason)
        return ""
    return page.body(room, frame=True).decode()
