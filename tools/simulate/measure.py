"""What Redis and MySQL say about themselves, read by the simulator on its own Redis and database.

- Memory: INFO memory, and per kind of key (room lists, meta hashes, sent acks, seen sets, marks,
  work lists) the count of keys (SCAN) and MEMORY USAGE ... SAMPLES 0 (exact) on a random sample
  of each kind, scaled by the count. For lists also the payload (the entries' bytes, LRANGE on the
  sampled lists) and the entries of every list (LLEN), so a list's bytes split into payload and
  structure.
- The longest command: SLOWLOG at a threshold of SLOWLOG_US, drained (GET + RESET in one MULTI) after each phase
  of a tick, so every command is attributed to the phase (persister, reader, sweeper) that sent it.
- Copy-on-write of a fork: BGREWRITEAOF, then INFO persistence until it is done: the child's
  `aof_last_cow_size` (its private dirty pages at the end: the pages the parent wrote meanwhile,
  plus the child's own) and `latest_fork_usec`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiomysql
import orjson
import redis.asyncio as aioredis

KINDS = ("lists", "meta", "sent", "seen", "marks", "worklists")
SLOWLOG_MAX = 100_000
REWRITE_POLL_S = 0.002
SLOWLOG_US = 10  # commands faster than this are not logged (reading every entry back cost more than the tick)


def kind_of(key: bytes) -> str:
    """Which shared.keys.Keys method made the key (room names cannot contain ':')."""
    k = key.decode()
    if k.endswith(":msgs"):
        return "lists"
    if k.endswith(":meta"):
        return "meta"
    if ":sent:" in k:
        return "sent"
    if ":seen:" in k:
        return "seen"
    if k.endswith(":applied"):
        return "marks"
    return "worklists"


@dataclass
class KeyKind:
    keys: int = 0
    sampled: int = 0
    sampled_bytes: int = 0  # MEMORY USAGE of the sampled keys
    items: int = 0  # list entries / set members, over every key of the kind (lists, seen sets)
    sampled_items: int = 0
    sampled_payload: int = 0  # lists: bytes of the sampled lists' entries

    @property
    def bytes(self) -> float:
        """Estimated MEMORY USAGE of every key of the kind."""
        return self.sampled_bytes / self.sampled * self.keys if self.sampled else 0.0


@dataclass
class Memory:
    used: int
    dataset: int
    overhead: int
    startup: int
    rss: int
    fragmentation: float
    kinds: dict[str, KeyKind] = field(default_factory=dict)


async def memory(redis: aioredis.Redis, sample: int, rng: random.Random) -> Memory:
    by_kind: dict[str, list[bytes]] = {k: [] for k in KINDS}
    async for key in redis.scan_iter(count=1000):
        by_kind[kind_of(key)].append(key)
    kinds = {}
    for name, keys in by_kind.items():
        keys.sort()  # SCAN's order is Redis's; the sample should depend on the seed alone
        picked = rng.sample(keys, min(sample, len(keys)))
        kind = KeyKind(keys=len(keys), sampled=len(picked))
        pipe = redis.pipeline(transaction=False)
        for key in picked:
            pipe.memory_usage(key, samples=0)
        kind.sampled_bytes = sum(int(b or 0) for b in await pipe.execute())
        if name in ("lists", "seen"):
            pipe = redis.pipeline(transaction=False)
            for key in keys:
                if name == "lists":
                    pipe.llen(key)
                else:
                    pipe.scard(key)
            counts = [int(n) for n in await pipe.execute()]
            kind.items = sum(counts)
            chosen = set(picked)
            kind.sampled_items = sum(n for key, n in zip(keys, counts, strict=True) if key in chosen)
        if name == "lists":
            pipe = redis.pipeline(transaction=False)
            for key in picked:
                pipe.lrange(key, 0, -1)
            kind.sampled_payload = sum(len(e) for entries in await pipe.execute() for e in entries)
        kinds[name] = kind
    info = await redis.info("memory")
    return Memory(int(info["used_memory"]), int(info["used_memory_dataset"]), int(info["used_memory_overhead"]),
                  int(info["used_memory_startup"]), int(info["used_memory_rss"]),
                  float(info["mem_fragmentation_ratio"]), kinds)


@dataclass
class Slowest:
    us: int = 0
    command: str = ""

    def add(self, other: Slowest) -> None:
        if other.us > self.us:
            self.us, self.command = other.us, other.command


# Commands only the simulator sends (roomcast's services never do), left out of the longest command.
OWN_COMMANDS = frozenset({"INFO", "CONFIG", "DBSIZE", "BGREWRITEAOF", "SLOWLOG", "MULTI", "EXEC", "UNLINK", "MEMORY",
                          "SCAN", "SCARD"})


class SlowLog:
    """The longest command since the last `take`; scripts are named by their SHA."""

    def __init__(self, scripts: dict[str, str]) -> None:
        self.scripts = scripts  # sha -> name

    async def start(self, redis: aioredis.Redis) -> None:
        await redis.config_set("slowlog-log-slower-than", SLOWLOG_US)
        await redis.config_set("slowlog-max-len", SLOWLOG_MAX)
        await redis.slowlog_reset()

    async def take(self, redis: aioredis.Redis) -> Slowest:
        pipe = redis.pipeline(transaction=True)
        pipe.slowlog_get(SLOWLOG_MAX)
        pipe.slowlog_reset()
        entries, _ = await pipe.execute()
        out = Slowest()
        for e in entries:
            if int(e["duration"]) > out.us and (name := self._name(e["command"])).split(" ")[0] not in OWN_COMMANDS:
                out.us, out.command = int(e["duration"]), name
        return out

    def _name(self, command: Any) -> str:
        words = (command.decode(errors="replace") if isinstance(command, bytes) else str(command)).split(" ", 2)
        name = words[0].upper()
        if name == "EVALSHA" and len(words) > 1:
            return f"EVALSHA {self.scripts.get(words[1], words[1][:8])}"
        return name


@dataclass
class Rewrite:
    """One BGREWRITEAOF while the simulated traffic goes on."""

    day: int
    window_s: float  # 0: the child ran at its own speed; else it was slowed down to last about this long
    used: int  # used_memory when it started
    dataset: int
    keys: int
    cow: int = 0  # aof_last_cow_size: what the fork cost on top of used_memory
    fork_us: int = 0
    seconds: float = 0.0  # the child's run, as polled every REWRITE_POLL_S
    messages: int = 0  # messages sent while it ran
    status: str = ""


class RewriteProbe:
    """One rewrite at a time: `start` forks it and a task polls INFO persistence until it ends."""

    def __init__(self) -> None:
        self.current: Rewrite | None = None
        self._watch: asyncio.Task[Rewrite] | None = None

    async def start(self, redis: aioredis.Redis, day: int, window_s: float, sent: Callable[[], int]) -> None:
        """BGREWRITEAOF; with `window_s`, the child sleeps between keys (rdb-key-save-delay, the setting
        Redis's own tests slow a fork with) so that it lasts about that long: the fork window of a
        bigger dataset, over which the parent's writes are copied page by page."""
        info = await redis.info("memory")
        keys = int(await redis.dbsize())
        self.current = Rewrite(day, window_s, int(info["used_memory"]), int(info["used_memory_dataset"]), keys)
        delay_us = round(window_s * 1e6 / max(keys, 1)) if window_s else 0
        await redis.config_set("rdb-key-save-delay", delay_us)
        t0, sent0 = time.monotonic(), sent()
        await redis.bgrewriteaof()  # (the child is forked before this answers: it keeps the delay it saw)
        await redis.config_set("rdb-key-save-delay", 0)
        self._watch = asyncio.create_task(self._until_done(redis, self.current, t0, sent0, sent))

    async def _until_done(self, redis: aioredis.Redis, r: Rewrite, t0: float, sent0: int,
                          sent: Callable[[], int]) -> Rewrite:
        while True:
            info = await redis.info("persistence")
            if not (int(info["aof_rewrite_in_progress"]) or int(info["aof_rewrite_scheduled"])):
                break
            await asyncio.sleep(REWRITE_POLL_S)
        r.seconds, r.messages = time.monotonic() - t0, sent() - sent0
        r.cow = int(info["aof_last_cow_size"])
        r.status = str(info["aof_last_bgrewrite_status"])
        r.fork_us = int((await redis.info("stats"))["latest_fork_usec"])
        return r

    async def finished(self, wait: bool = False) -> Rewrite | None:
        """The rewrite, once it has ended (with `wait`: once it ends); None while it runs or when none ran."""
        if self._watch is None or not (wait or self._watch.done()):
            return None
        r = await self._watch
        self._watch = self.current = None
        return r


async def mysql_rows(pool: aiomysql.Pool) -> int:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT COUNT(*) FROM messages")
        (n,) = await cur.fetchone()
    return int(n)


async def mysql_ids(pool: aiomysql.Pool) -> list[str]:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT id FROM messages")
        return [str(i) for (i,) in await cur.fetchall()]


async def redis_ids(redis: aioredis.Redis) -> list[str]:
    """The ids of every entry of every room list (the simulator's own Redis: SCAN and whole lists)."""
    out = []
    async for key in redis.scan_iter(match="*:msgs", count=1000):
        out += [orjson.loads(e)["id"] for e in await redis.lrange(key, 0, -1)]
    return out
