"""A user's connection count and send rate, held across every gateway through Redis.

Connections: each gateway keeps, in the user's hash, its own count of the user's connections (field
= the gateway's id, new for every process), and renews its entry in the gateways' sorted set every
GATEWAY_LEASE_S / 3. A handshake's script sums the counts of the gateways whose entry is current
(dropping the others' fields), refuses at MAX_CONNS_PER_USER, and adds one. So a gateway that was
SIGKILLed stops counting within GATEWAY_LEASE_S without anyone cleaning up after it, and what a
gateway costs Redis does not grow with its connections: a script per handshake and per close, one
renewal per interval. Redis's clock decides (gateway clocks may differ).

Sends: a user's budget is one GCRA value in Redis (when the bucket would next be empty: a token
bucket of SEND_BURST refilled at SEND_RATE_PER_S). A gateway takes sends from it in batches, each
round trip asking for what the sends waiting for an answer need plus SEND_LEASE more, and spends
them itself: a steady sender costs one Redis round trip per SEND_LEASE sends, asked for ahead (when
what is held runs out), so a send is decided on arrival, as with a local bucket, and rarely waits
for Redis; a burst waits for one round trip. A refusal carries the wait, and the gateway refuses on
its own until then. Error bound: of the sends that arrive within any interval t, a user gets at
most SEND_BURST + SEND_RATE_PER_S * t + N * SEND_LEASE accepted across N gateways (what each gateway
held beyond its waiting sends when the interval began); a gateway drops what it holds when the
user's last connection to it closes (the user may then get up to SEND_LEASE fewer, never more).

When Redis cannot be reached, a new connection is counted by its gateway alone (so each gateway
allows MAX_CONNS_PER_USER meanwhile) and written to Redis by the next renewal that succeeds; a send
needs Redis anyway (its dedupe claim), so it is answered `unavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.errors import Unavailable
from shared.keys import Keys
from shared.settings import Settings

log = logging.getLogger("roomcast.gateway")

NOW_MS = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
# KEYS: the user's hash, the gateways' set; ARGV: this gateway's id, the limit, how long the hash
# must live at least (ms: past the connection's token expiry, when the gateway closes it). 1: counted.
CONNECT = NOW_MS + """
local counts = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #counts, 2 do
  local gw = counts[i]
  if gw == ARGV[1] or tonumber(redis.call('ZSCORE', KEYS[2], gw) or 0) > now then
    total = total + tonumber(counts[i + 1])
  else
    redis.call('HDEL', KEYS[1], gw)
  end
end
if total >= tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
"""
RELEASE = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
"""
# This gateway's count of the user, as it knows it (after Redis missed some changes). ARGV: id, count, ttl ms.
SET_COUNT = """
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
"""
# KEYS: the gateways' set; ARGV: this gateway's id, the lease (ms). 1 when its entry was still current
# (else other gateways may have dropped its counts: it writes them again).
RENEW = NOW_MS + """
local current = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or 0) > now
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if current then return 1 end
return 0
"""
# GCRA. KEYS: the user's budget; ARGV: microseconds per send, burst, sends wanted.
# Returns {sends granted, microseconds until one is available (when none was)}.
TAKE_SENDS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or 0), now)
local free = math.floor((now + burst * interval - tat) / interval)
if free < 1 then return {0, math.ceil(tat - (burst - 1) * interval - now)} end
local n = math.min(free, tonumber(ARGV[3]))
tat = tat + n * interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000))
return {n, 0}
"""
TOKEN_MARGIN_MS = 60_000  # a user's hash outlives the tokens of the connections it counts by this much
SYNC_CHUNK = 500  # users written per pipeline when this gateway's counts must be written again


class Count(enum.Enum):
    CLUSTER = "counted by every gateway"
    LOCAL = "counted by this gateway alone (Redis did not answer)"
    REFUSED = "too many connections"


@dataclass(slots=True)
class UserState:
    """A user with connections on this node: their count here and the sends taken for them."""

    connections: int = 0
    until: float = 0.0  # the latest token expiry among those connections (unix s)
    sends: int = 0  # taken from the user's budget, not spent yet (first for the waiting sends)
    waiting: int = 0  # sends that arrived here and wait for Redis's answer
    refused_until: float = 0.0  # (monotonic) Redis found the budget empty: refuse without asking until then
    short: bool = False  # the last answer brought fewer sends than asked: the budget is (nearly) empty
    next_slot: float = 0.0  # (monotonic) while short: when the budget frees the send after those waiting
    lease: asyncio.Future[float] | None = None  # a request for sends in flight


class Quota:
    def __init__(self, settings: Settings, keys: Keys, redis: aioredis.Redis) -> None:
        self.s = settings
        self.keys = keys
        self.redis = redis
        self.id = f"{settings.name}/{uuid.uuid4().hex[:12]}"  # a new one per process
        self._connect = redis.register_script(CONNECT)
        self._release = redis.register_script(RELEASE)
        self._set_count = redis.register_script(SET_COUNT)
        self._renew = redis.register_script(RENEW)
        self._take_sends = redis.register_script(TAKE_SENDS)
        self._interval_us = 1e6 / settings.send_rate_per_s
        self._lease = min(settings.send_lease, settings.send_burst)
        self._stale: set[str] = set()  # users whose count in Redis may be wrong
        self._tasks: set[asyncio.Task[None]] = set()

    # --- connections
    async def connect(self, user: str, expires_at: float | None) -> Count:
        """Count one more connection of `user` across the gateways (the caller counted it here)."""
        try:
            counted = await self._connect(keys=[self.keys.conns(user), self.keys.gateways()],
                                          args=[self.id, self.s.max_conns_per_user, self._ttl_ms(expires_at)])
        except (RedisError, OSError):
            self._stale.add(user)
            return Count.LOCAL
        return Count.CLUSTER if counted else Count.REFUSED

    def disconnected(self, user: str, count: Count) -> None:
        """A connection that `connect` counted has closed (the caller uncounted it here)."""
        if count is Count.CLUSTER:
            self._spawn(self._released(user))
        else:
            self._stale.add(user)

    async def _released(self, user: str) -> None:
        try:
            await self._release(keys=[self.keys.conns(user)], args=[self.id])
        except (RedisError, OSError):
            self._stale.add(user)

    async def renew_forever(self, users: Mapping[str, UserState]) -> None:
        """Keep this gateway's counts current (run as a task for the node's life)."""
        every = self.s.gateway_lease_s / 3
        lease_ms = max(1, int(self.s.gateway_lease_s * 1000))
        while True:
            try:
                current = await self._renew(keys=[self.keys.gateways()], args=[self.id, lease_ms])
                stale, self._stale = self._stale | (set() if current else set(users)), set()
                await self._write_counts(stale, users)
            except (RedisError, OSError) as e:
                log.warning("cannot renew this gateway's connection counts in Redis: %s", e)
            await asyncio.sleep(every)

    async def _write_counts(self, stale: set[str], users: Mapping[str, UserState]) -> None:
        todo = list(stale)
        try:
            for i in range(0, len(todo), SYNC_CHUNK):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for user in todo[i:i + SYNC_CHUNK]:
                        state = users.get(user)
                        count, until = (state.connections, state.until) if state is not None else (0, None)
                        await self._set_count(keys=[self.keys.conns(user)], args=[self.id, count, self._ttl_ms(until)],
                                              client=pipe)
                    await pipe.execute()
        except BaseException:
            self._stale |= stale
            raise

    async def retire(self) -> None:
        """Shutdown: this gateway's counts stop counting now (its connections are closed)."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        with contextlib.suppress(RedisError, OSError):
            await self.redis.zrem(self.keys.gateways(), self.id)

    def _ttl_ms(self, expires_at: float | None) -> int:
        left = (expires_at - time.time()) * 1000 if expires_at else self.s.token_ttl_s * 1000
        return int(max(0, left) + TOKEN_MARGIN_MS)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- sends
    def admit(self, user: str, state: UserState) -> float | None:
        """A send arrived: 0.0 when it may go (taken from what this gateway holds beyond what the
        sends waiting here were promised), the seconds to wait when the budget was found empty
        lately, or None: it waits for Redis's answer (take_send) with the sends before it. Asks for
        the next sends ahead, when what is held runs out, so a steady sender rarely waits."""
        if state.sends > state.waiting:
            state.sends -= 1
            if state.sends <= state.waiting:
                self._ask(user, state)
            return 0.0
        now = time.monotonic()
        if (wait := max(state.refused_until, state.next_slot) - now) > 0:
            return wait
        if state.waiting - state.sends >= self.s.send_burst:  # more wait already than a full budget holds
            return self._interval_us / 1e6
        if state.short:  # the budget gives a send per interval now: this one waits for the next
            state.next_slot = now + self._interval_us / 1e6
        state.waiting += 1
        self._ask(user, state)
        return None

    async def take_send(self, user: str, state: UserState) -> float:
        """For a send `admit` left waiting: 0 when it may go, else the seconds until one could.
        Raises Unavailable when Redis does not answer."""
        try:
            while True:  # (until an answer brings a send not taken by the waiters before us, or a refusal)
                if state.sends > 0:
                    state.sends -= 1
                    return 0.0
                if (wait := state.refused_until - time.monotonic()) > 0:
                    return wait
                self._ask(user, state)
                assert state.lease is not None
                await asyncio.shield(state.lease)
        finally:
            state.waiting -= 1

    async def take(self, user: str, state: UserState) -> float:
        """One send's admission, asking Redis when `admit` cannot decide: 0 when it may go, else the
        seconds to wait. Raises Unavailable when Redis does not answer."""
        wait = self.admit(user, state)
        return await self.take_send(user, state) if wait is None else wait

    def forgo(self, state: UserState, waiting: int) -> None:
        """`waiting` sends that `admit` left waiting were dropped (their connection closed): what
        was taken for them is not kept beyond a lease's worth."""
        state.waiting -= waiting
        state.sends = min(state.sends, state.waiting + self._lease)

    def _ask(self, user: str, state: UserState) -> None:
        """Ask Redis for what the waiting sends need and a lease's worth more (once at a time)."""
        if state.lease is None:
            want = min(self.s.send_burst, max(1, state.waiting + self._lease - state.sends))
            state.lease = asyncio.ensure_future(self._take(user, state, want))
            state.lease.add_done_callback(_retrieved)  # (nobody may be waiting for it)

    async def _take(self, user: str, state: UserState, want: int) -> float:
        try:
            granted, wait_us = await self._take_sends(keys=[self.keys.send_budget(user)],
                                                      args=[self._interval_us, self.s.send_burst, want])
        except (RedisError, OSError) as e:
            raise Unavailable("rate limit store unavailable") from e
        finally:
            state.lease = None
        state.sends += int(granted)
        state.short = granted < want
        if granted:
            return 0.0
        state.refused_until = time.monotonic() + int(wait_us) / 1e6
        return int(wait_us) / 1e6


def _retrieved(future: asyncio.Future[float]) -> None:
    if not future.cancelled():
        future.exception()


class Senders:
    """The send budgets of users publishing over REST on this node (a user's share taken from Redis,
    as a connection's): the most recent SENDERS_MAX, so a lease taken ahead serves the next publish."""

    SENDERS_MAX = 10_000

    def __init__(self) -> None:
        self._states: OrderedDict[str, UserState] = OrderedDict()

    def state(self, user: str) -> UserState:
        state = self._states.pop(user, None) or UserState()
        self._states[user] = state
        if len(self._states) > self.SENDERS_MAX:
            self._states.popitem(last=False)
        return state
