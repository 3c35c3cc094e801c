"""The sweeper: moves what is older than the retention from the rooms' Redis lists to MySQL.

One sweep walks `rooms` by primary key, `sweep_chunk` rooms per query. Per chunk it reads the
rooms' metadata hashes in one pipelined HMGET batch (never the lists), decides per room
(sweeper.policy), and moves with the shared Mover, `flush_chunk` entries per call, until the room
is done; then it pauses `sweep_pause_s`. Every Redis command touches at most `flush_chunk`
entries. The Mover's conditional trim makes a second sweeper, the persister's flush, or a rerun
after a kill harmless: a chunk is trimmed only if the list still starts with it, and MySQL ignores
rows it already has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiomysql
import pymysql
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.errors import StoreUnavailable
from shared.keys import Keys
from shared.message import Message
from shared.mysql import create_pool
from shared.redisconn import connect
from shared.settings import Settings
from shared.store.archive import Archive
from shared.store.buffer import RedisBuffer
from shared.store.mover import Mover
from shared.store.rooms import RoomDirectory
from sweeper import metrics
from sweeper.policy import Action, Decision, decide, parse_meta

log = logging.getLogger("roomcast.sweeper")

PARALLEL_ROOMS = 4  # rooms of a chunk moved at once (each move is one bounded insert + one trim)
MAX_CONTENDED = 50  # consecutive moves lost to another mover before a room is left to the next sweep

# Failures of a store: a sweep stops and the next one (or the CronJob's retry) starts over.
STORE_ERRORS: tuple[type[BaseException], ...] = (StoreUnavailable, RedisError, OSError, pymysql.err.Error,
                                                 TimeoutError)


@dataclass
class SweepStats:
    rooms_scanned: int = 0
    rooms_moved: int = 0
    messages_moved: int = 0
    chunks: int = 0
    seconds: float = 0.0
    complete: bool = False  # False: stopped before the last room


class Sweeper:
    def __init__(self, settings: Settings, redis: aioredis.Redis, pool: aiomysql.Pool, mover: Mover,
                 rooms: RoomDirectory | None = None, clock: Callable[[], float] = time.time,
                 parallel: int = PARALLEL_ROOMS) -> None:
        self.s = settings
        self.parallel = parallel
        self.keys = Keys(settings.redis_prefix, settings.kafka_partitions)
        self.buffer = RedisBuffer(redis, self.keys)
        self.archive = Archive(pool, rooms)
        self.mover = mover
        self.rooms = rooms
        self.clock = clock

    async def sweep(self, stop: asyncio.Event) -> SweepStats:
        """One pass over every room; returns early (complete=False) when `stop` is set."""
        stats = SweepStats()
        started = time.monotonic()
        after = 0
        while not stop.is_set():
            chunk_started = time.monotonic()
            rows = await self.archive.rooms_after(after, self.s.sweep_chunk)
            if not rows:
                stats.complete = True
                break
            after = rows[-1][0]
            await self._sweep_chunk(rows, stats, stop)
            stats.chunks += 1
            metrics.CHUNK_SECONDS.observe(time.monotonic() - chunk_started)
            if len(rows) < self.s.sweep_chunk:
                stats.complete = not stop.is_set()
                break
            await _sleep(stop, self.s.sweep_pause_s)
        stats.seconds = time.monotonic() - started
        return stats

    async def _sweep_chunk(self, rows: list[tuple[int, str]], stats: SweepStats, stop: asyncio.Event) -> None:
        metas = await self.buffer.metas([name for _, name in rows])
        if self.rooms is not None:
            self.rooms.remember({name: rid for rid, name in rows})
        now_ms = int(self.clock() * 1000)
        stats.rooms_scanned += len(rows)
        metrics.ROOMS_SCANNED.inc(len(rows))
        work = []
        for (_, name), (first_ts, last_ts) in zip(rows, metas, strict=True):
            decision = decide(parse_meta(first_ts, last_ts), now_ms, self.s.redis_retention_s, self.s.sweep_policy)
            if decision.action is not Action.NOTHING:
                work.append((name, decision))
        if not work:
            return
        queue = iter(work)

        async def worker() -> None:  # a few rooms at a time: MySQL commits overlap, the load stays bounded
            for name, decision in queue:
                if stop.is_set():
                    return
                try:
                    moved = await self.sweep_room(name, decision, stop)
                except (ValueError, KeyError, TypeError) as e:  # an entry that does not decode: skip the room
                    metrics.ROOM_ERRORS.inc()
                    log.error("room skipped: unreadable entry", extra={"room": name, "error": repr(e)})
                    continue
                if moved:
                    stats.rooms_moved += 1
                    stats.messages_moved += moved
                    metrics.ROOMS_MOVED.inc()

        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(min(self.parallel, len(work))):
                    tg.create_task(worker())
        except BaseExceptionGroup as group:  # the first failure (the others were cancelled or alike)
            raise group.exceptions[0] from None

    async def sweep_room(self, room: str, decision: Decision, stop: asyncio.Event) -> int:
        """Move the room's entries past the retention, one bounded chunk per call; returns how many.

        Under both policies a move stops at the first entry younger than the cutoff: for an idle room
        (MOVE_ALL) that is the whole list, except a message that arrived since the metadata was read,
        which stays cached."""
        cutoff = decision.cutoff_ms

        def keep(m: Message) -> bool:
            return m.ts >= cutoff

        moved = contended = 0
        while not stop.is_set():
            res = await self.mover.move_oldest(room, self.s.flush_chunk, keep)
            moved += res.moved
            metrics.MESSAGES_MOVED.inc(res.moved)
            if res.remaining < 0:  # another mover trimmed the list first: read its head again
                metrics.CONTENDED.inc()
                contended += 1
                if contended >= MAX_CONTENDED:
                    log.warning("room left for the next sweep: other movers keep winning", extra={"room": room})
                    break
                continue
            contended = 0
            if res.remaining == 0 or res.moved < self.s.flush_chunk:  # emptied, or reached a kept entry
                break
        return moved

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Sweep every `sweep_interval_s` until `stop`; a failed sweep is logged and retried."""
        while not stop.is_set():
            try:
                await self.sweep_logged(stop)
            except STORE_ERRORS as e:
                log.warning("sweep failed; next one in the interval", extra={"error": repr(e.__cause__ or e)})
            await _sleep(stop, self.s.sweep_interval_s)

    async def sweep_logged(self, stop: asyncio.Event) -> SweepStats:
        try:
            stats = await self.sweep(stop)
        except BaseException:
            metrics.SWEEPS.labels("failed").inc()
            raise
        metrics.SWEEPS.labels("complete" if stats.complete else "stopped").inc()
        if stats.complete:
            metrics.SWEEP_SECONDS.set(stats.seconds)
            metrics.LAST_SUCCESS.set(time.time())
        log.info("sweep done" if stats.complete else "sweep stopped",
                 extra={"rooms": stats.rooms_scanned, "rooms_moved": stats.rooms_moved,
                        "moved": stats.messages_moved, "seconds": round(stats.seconds, 3),
                        "policy": self.s.sweep_policy})
        return stats


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    if seconds > 0 and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)


async def run(settings: Settings, stop: asyncio.Event, once: bool = False) -> None:
    redis = connect(settings, timeout_s=10, connect_timeout_s=5)
    pool = await create_pool(settings.mysql_dsn, min(settings.mysql_pool_max, PARALLEL_ROOMS + 1))
    try:
        rooms = RoomDirectory(pool)
        mover = Mover(redis, pool, Keys(settings.redis_prefix, settings.kafka_partitions), rooms)
        sweeper = Sweeper(settings, redis, pool, mover, rooms)
        log.info("sweeper started", extra={"policy": settings.sweep_policy, "once": once})
        if once:
            await sweeper.sweep_logged(stop)
        else:
            await sweeper.run_forever(stop)
    finally:
        pool.close()
        await pool.wait_closed()
        await redis.aclose()
        log.info("sweeper stopped")
