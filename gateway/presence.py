"""Who is online in a room, across gateways: the truth in Redis, kept by every gateway for its own
connections, lapsing when a gateway dies.

Per room (keys tagged by the room's partition, shared/keys.py):
- `online`: sorted set user -> when the user's presence lapses (ms), the greatest over gateways;
- `onames`: the same users scored 0, so ZRANGE lists them by name (the `presence` answer);
- `ogw:<user>`: sorted set gateway -> lapse, the gateways holding a connection of the user there.

A user is online while a connection of theirs is joined to the room on any gateway. The hub tells
us when a user's first connection on this node joins a room and when the last one leaves; those
become one script each (JOIN: add this gateway, online if new; LEAVE: drop it, offline if no other
gateway holds the user), queued and sent in order, one pipeline per round. Every REFRESH_S this
node rewrites the lapse of every (room, user) it holds (one script per partition and 500 pairs)
and reaps the rooms it has members in: users whose lapse passed (their gateway died) are removed,
and offline is announced by whichever gateway removed them. A `presence` request reaps its room
first, so it never lists a dead gateway's users for longer than the lapse.

Costs: a join or leave is one script of O(log n) on sorted sets of the room's n users; a presence
answer is at most 1,000 names plus a count (no whole-set reads at any size); the refresh is O(p)
per REFRESH_S for the p (room, user) pairs this node holds; the reap O(r) per REFRESH_S for its r
rooms, each a bounded ZRANGEBYSCORE. A gateway's users lapse LAPSE_S after its last refresh and
are reaped within REFRESH_S after that: offline within 3/4 of PRESENCE_TTL_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway import metrics
from gateway.hub import Hub
from gateway.signals import Signals
from shared.keys import Keys
from shared.redisconn import run_scripts
from shared.settings import Settings

log = logging.getLogger("roomcast.gateway.presence")

LIST_MAX = 1000  # names in a presence answer
REAP_MAX = 100  # lapsed users removed per room per script call
REFRESH_MAX = 500  # (room, user) pairs per refresh script
PIPELINE_MAX = 200  # script calls per round trip

# KEYS: online, onames, ogw. ARGV: gateway, lapse (ms), key ttl (ms), user. 1 when the user came online.
JOIN = """
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[1], 'GT', ARGV[2], ARGV[4])
local new = redis.call('ZADD', KEYS[2], 'NX', 0, ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return new
"""
# KEYS: online, onames, ogw. ARGV: gateway, now (ms), user. 1 when the user went offline.
LEAVE = """
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[3]) > 0 then return 0 end
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[1], ARGV[3])
return redis.call('ZREM', KEYS[2], ARGV[3])
"""
# KEYS: online, onames, ogw of each pair. ARGV: gateway, lapse, key ttl, then each pair's user.
# Returns the numbers (1-based) of the pairs whose user was not listed (Redis lost it): online again.
REFRESH = """
local back = {}
for i = 1, #ARGV - 3 do
  local online, onames, ogw, user = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i], ARGV[i + 3]
  redis.call('ZADD', ogw, ARGV[2], ARGV[1])
  redis.call('PEXPIRE', ogw, ARGV[3])
  redis.call('ZADD', online, 'GT', ARGV[2], user)
  if redis.call('ZADD', onames, 'NX', 0, user) == 1 then back[#back + 1] = i end
  redis.call('PEXPIRE', online, ARGV[3])
  redis.call('PEXPIRE', onames, ARGV[3])
end
return back
"""
# KEYS: online, onames. ARGV: now (ms), most to remove. Returns the users removed (lapsed).
REAP = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, user in ipairs(gone) do
  redis.call('ZREM', KEYS[1], user)
  redis.call('ZREM', KEYS[2], user)
end
return gone
"""
# KEYS: online, onames. ARGV: now, most to reap, most to list. Returns {reaped, listed, count}.
QUERY = REAP.replace("return gone", """
return {gone, redis.call('ZRANGE', KEYS[2], 0, tonumber(ARGV[3]) - 1), redis.call('ZCARD', KEYS[2])}""")


def _ms() -> int:
    return int(time.time() * 1000)


class Presence:
    def __init__(self, settings: Settings, keys: Keys, redis: aioredis.Redis, hub: Hub, signals: Signals) -> None:
        self.s = settings
        self.keys = keys
        self.redis = redis
        self.hub = hub
        self.signals = signals
        self.gateway = signals.node
        self.refresh_s = settings.presence_ttl_s / 4
        self.lapse_ms = int(settings.presence_ttl_s * 1000 / 2)
        self.key_ttl_ms = int(settings.presence_ttl_s * 2000)
        self._ops: list[tuple[bool, str, str]] = []  # (joined, room, user) in the order they happened
        self._writer: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._join = redis.register_script(JOIN)
        self._leave = redis.register_script(LEAVE)
        self._refresh = redis.register_script(REFRESH)
        self._reap = redis.register_script(REAP)
        self._query = redis.register_script(QUERY)
        hub.on_member = self.on_member

    def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick(), name="presence")

    async def close(self) -> None:
        """Shutdown: write what is queued; this node's users leave (no wait for their lapse)."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        self._ops += [(False, room, user) for room, user in self.hub.members()]
        if self._ops and self._writer is None:
            self._writer = asyncio.create_task(self._write())
        if self._writer is not None:
            await asyncio.wait({self._writer}, timeout=5)

    # --- this node's members
    def on_member(self, room: str, user: str, joined: bool) -> None:
        self._ops.append((joined, room, user))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(), name="presence-writer")

    async def _write(self) -> None:
        try:
            while self._ops:
                ops, self._ops = self._ops, []
                for i in range(0, len(ops), PIPELINE_MAX):
                    await self._write_ops(ops[i:i + PIPELINE_MAX])
        finally:
            self._writer = None

    async def _write_ops(self, ops: list[tuple[bool, str, str]]) -> None:
        now = _ms()
        calls = []
        for joined, room, user in ops:
            keys = [self.keys.online(room), self.keys.online_names(room), self.keys.user_gateways(room, user)]
            if joined:
                calls.append((self._join, keys, [self.gateway, now + self.lapse_ms, self.key_ttl_ms, user]))
            else:
                calls.append((self._leave, keys, [self.gateway, now, user]))
        try:
            results = await run_scripts(self.redis, calls)
        except (RedisError, OSError) as e:  # the refresh and the reaper put it right later
            metrics.PRESENCE_ERRORS.inc()
            log.warning("presence not written", extra={"error": repr(e), "ops": len(ops)})
            return
        for (joined, room, user), changed in zip(ops, results, strict=True):
            if changed:
                self._announce(room, user, joined)

    def _announce(self, room: str, user: str, online: bool) -> None:
        self.signals.publish(room, {"k": "presence", "user": user, "state": "online" if online else "offline"})

    # --- refresh and reap, every REFRESH_S
    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
                await self.reap(self.hub.rooms())
            except (RedisError, OSError) as e:
                metrics.PRESENCE_ERRORS.inc()
                log.warning("presence refresh failed", extra={"error": repr(e)})

    async def refresh(self) -> None:
        by_partition: dict[int, list[tuple[str, str]]] = defaultdict(list)
        for room, user in self.hub.members():
            by_partition[self.keys.partition(room)].append((room, user))
        lapse = _ms() + self.lapse_ms
        calls, batches = [], []
        for pairs in by_partition.values():
            for i in range(0, len(pairs), REFRESH_MAX):
                part = pairs[i:i + REFRESH_MAX]
                keys: list[str] = []
                for room, user in part:
                    keys += [self.keys.online(room), self.keys.online_names(room), self.keys.user_gateways(room, user)]
                calls.append((self._refresh, keys, [self.gateway, lapse, self.key_ttl_ms, *(u for _, u in part)]))
                batches.append(part)
        for i in range(0, len(calls), PIPELINE_MAX):
            results = await run_scripts(self.redis, calls[i:i + PIPELINE_MAX])
            for part, back in zip(batches[i:i + PIPELINE_MAX], results, strict=True):
                for n in back:
                    room, user = part[int(n) - 1]
                    self._announce(room, user, True)

    async def reap(self, rooms: list[str]) -> None:
        now = _ms()
        for i in range(0, len(rooms), PIPELINE_MAX):
            part = rooms[i:i + PIPELINE_MAX]
            results = await run_scripts(self.redis, [
                (self._reap, [self.keys.online(r), self.keys.online_names(r)], [now, REAP_MAX]) for r in part])
            for room, gone in zip(part, results, strict=True):
                for user in gone:
                    self._announce(room, _text(user), False)

    # --- questions
    async def query(self, room: str) -> tuple[list[str], int]:
        """The room's online users by name (at most LIST_MAX) and how many there are."""
        gone, users, count = await self._query(keys=[self.keys.online(room), self.keys.online_names(room)],
                                               args=[_ms(), REAP_MAX, LIST_MAX])
        for user in gone:
            self._announce(room, _text(user), False)
        return [_text(u) for u in users], int(count)

    async def count(self, room: str) -> int:
        return int(await self.redis.zcard(self.keys.online_names(room)))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
