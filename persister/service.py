"""The persister: Kafka (consumer group) -> Redis lists, oldest chunks -> MySQL.

Exactly-once into Redis comes from the per-partition applied mark, written by the same script
as the appends: replayed offsets are skipped, and whenever the stored mark is not the one this
process expects (Redis restarted and lost data, or the partition moved) it seeks to mark + 1.
Kafka offsets are committed after Redis has the batch, for lag monitoring; the mark is the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from persister import metrics
from persister.reads import run_reads
from shared.errors import StoreUnavailable
from shared.kafka import Fetched, fetch, new_consumer, wait_for_topic
from shared.keys import Keys
from shared.message import Message
from shared.mysql import create_pool
from shared.redisconn import connect
from shared.runner import crash_on_failure
from shared.settings import Settings
from shared.store.buffer import Applied, RedisBuffer
from shared.store.mover import Mover
from shared.store.rooms import RoomDirectory

log = logging.getLogger("roomcast.persister")
T = TypeVar("T")

# Offsets are committed for lag monitoring only (the applied mark in Redis is the truth), so at most
# this often: a commit per fetch was a broker request per fetch.
COMMIT_INTERVAL_S = 1.0


class Stopping(Exception):
    """Asked to stop while Redis does not answer: the consume loop ends instead of waiting for it."""


class Persister:
    def __init__(self, settings: Settings, redis: aioredis.Redis, mover: Mover, rooms: RoomDirectory,
                 stop: asyncio.Event | None = None) -> None:
        self.s = settings
        self.stop = stop or asyncio.Event()
        self.keys = Keys(settings.redis_prefix, settings.kafka_partitions)
        self.buffer = RedisBuffer(redis, self.keys, settings.buffer_cap, settings.dedupe_ttl_s)
        self.mover = mover
        self.rooms = rooms
        self.consumer: AIOKafkaConsumer | None = None
        self.expected: dict[int, int | None] = {}  # partition -> applied mark we believe Redis holds
        self.to_flush: set[str] = set()
        self.backlog: dict[str, int] = {}  # room -> messages past the cap (MySQL slow or down)
        self.lengths: dict[str, int] = {}  # room -> its list length, as last seen
        self.flush_wakeup = asyncio.Event()
        self.paused = False

    # --- partition ownership
    async def take_partitions(self, tps: Iterable[TopicPartition]) -> None:
        assert self.consumer is not None
        tps = list(tps)
        self.consumer.pause(*tps)  # nothing of these partitions is consumed before its seek
        for tp in tps:
            mark = await self._retry_redis(self.buffer.mark, tp.partition)
            self.expected[tp.partition] = mark
            await self.read_after(tp, mark)
            for room in await self._retry_redis(self.buffer.over_cap_rooms, tp.partition, 10_000):
                self.to_flush.add(room)
            log.info("partition taken", extra={"partition": tp.partition, "mark": mark})
        if not self.paused:
            self.consumer.resume(*tps)
        self.flush_wakeup.set()

    def drop_partitions(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self.expected.pop(tp.partition, None)

    async def read_after(self, tp: TopicPartition, mark: int | None) -> None:
        """Consume the partition from just after its applied mark, or from the log's start without one.
        (A mark + 1 that retention deleted resets to the log's start: `apply_all` reports the loss.)"""
        assert self.consumer is not None
        if mark is None:
            await self.consumer.seek_to_beginning(tp)
        else:
            self.consumer.seek(tp, mark + 1)

    # --- the main loop
    async def consume(self) -> None:
        try:
            await self._consume()
        except Stopping:
            log.warning("stopping while Redis is unreachable (what is not applied is replayed by the next owner)")

    async def _consume(self) -> None:
        assert self.consumer is not None
        checked = committed = time.monotonic()
        uncommitted = False
        while not self.stop.is_set():
            if time.monotonic() - checked > 1.0:
                await self.check_marks()
                checked = time.monotonic()
            batch = await self.gather()
            ours = []
            for fetched in batch:
                if fetched.tp.partition in self.expected:
                    ours.append(fetched)
                elif fetched.tp in self.consumer.assignment():  # fetched before its seek: read it again
                    self.consumer.seek(fetched.tp, fetched.first_offset)
            if ours:
                await self.apply_all(ours)
            uncommitted = uncommitted or bool(batch)
            if uncommitted and time.monotonic() - committed >= COMMIT_INTERVAL_S:
                with contextlib.suppress(KafkaError):
                    await self.consumer.commit()
                committed, uncommitted = time.monotonic(), False
            self._pause_or_resume()
            self._observe()

    async def gather(self) -> list[Fetched]:
        """The next batch: what one fetch returned plus what arrives within PERSISTER_LINGER_MS, applied
        in one Redis round trip (at low rates a fetch brings a record or two, and a round trip per
        partition per fetch cost more than the appends; the linger delays nothing but storage)."""
        assert self.consumer is not None
        most = self.s.persister_batch_max
        batch = {f.tp: f for f in await fetch(self.consumer, timeout_ms=200, max_records=most)}
        n = sum(f.next_offset - f.first_offset for f in batch.values())
        if not batch or n >= most:
            return list(batch.values())
        await asyncio.sleep(self.s.persister_linger_ms / 1000)
        for later in await fetch(self.consumer, timeout_ms=0, max_records=most - n):
            had = batch.get(later.tp)
            if had is not None and later.first_offset == had.next_offset:
                had.messages.extend(later.messages)
                had.next_offset = later.next_offset
            else:  # new, or the partition was sought meanwhile: the later read is the current one
                batch[later.tp] = later
        return list(batch.values())

    def _observe(self) -> None:
        assert self.consumer is not None
        for tp in self.consumer.assignment():
            high, mark = self.consumer.highwater(tp), self.expected.get(tp.partition)
            if high is not None:
                metrics.LAG.labels(str(tp.partition)).set(max(0, high - (-1 if mark is None else mark) - 1))
        metrics.BUFFERED.set(sum(self.lengths.values()))

    async def check_marks(self) -> None:
        """Notice a Redis that lost data (restart without AOF, FLUSHALL) even when no records arrive."""
        assert self.consumer is not None
        for tp in self.consumer.assignment():
            if tp.partition in self.expected:
                mark = await self._retry_redis(self.buffer.mark, tp.partition)
                # (a rebalance may have revoked it meanwhile: `expected` holds only what we own)
                if tp.partition in self.expected and mark != self.expected[tp.partition]:
                    await self.rewind(tp, mark)

    async def rewind(self, tp: TopicPartition, mark: int | None) -> None:
        assert self.consumer is not None
        log.warning("applied mark moved; replaying from Kafka",
                    extra={"partition": tp.partition, "expected": self.expected.get(tp.partition), "stored": mark})
        self.expected[tp.partition] = mark
        await self.read_after(tp, mark)

    async def apply_all(self, batch: list[Fetched]) -> None:
        """Append every partition's messages, one script call each, all in one Redis round trip. The
        mark moves to the last record fetched, so records that are not messages are passed over once."""
        for fetched in batch:
            mark = self.expected.get(fetched.tp.partition)
            if mark is not None and fetched.first_offset > mark + 1:
                # Offsets of our topic are dense: only retention (the persister was behind for longer
                # than the topic keeps records) skips some. They are not in Kafka any more: say so.
                metrics.LOG_SKIPPED.inc(fetched.first_offset - mark - 1)
                log.error("records deleted by retention before they were applied",
                          extra={"partition": fetched.tp.partition, "from": mark + 1, "to": fetched.first_offset - 1})
        results = await self._retry_redis(self.buffer.apply_many, [
            (f.tp.partition, self.expected.get(f.tp.partition), f.messages, f.next_offset - 1) for f in batch])
        for fetched, res in zip(batch, results, strict=True):
            await self._applied(fetched.tp, fetched.messages, res)

    async def _applied(self, tp: TopicPartition, messages: list[Message], res: Applied) -> None:
        if tp.partition not in self.expected:  # revoked during the write (the script kept it consistent)
            return
        if res.rewind:
            await self.rewind(tp, res.mark)
            return
        self.expected[tp.partition] = res.mark
        metrics.APPLIED.inc(len(messages))
        self.lengths.update(res.lengths)
        for room, length in res.lengths.items():
            if length > self.s.buffer_cap:
                self.to_flush.add(room)
                self.backlog[room] = length - self.s.buffer_cap
        if self.to_flush:
            self.flush_wakeup.set()

    def _pause_or_resume(self) -> None:
        assert self.consumer is not None
        over = sum(self.backlog.values()) > self.s.persister_backlog_budget
        metrics.BACKLOG.set(sum(self.backlog.values()))
        if over and not self.paused:
            log.warning("backlog budget reached; pausing consumption", extra={"backlog": sum(self.backlog.values())})
            self.consumer.pause(*self.consumer.assignment())
            self.paused = True
        elif not over and self.paused:
            log.info("backlog below budget; resuming")
            self.consumer.resume(*self.consumer.assignment())
            self.paused = False

    # --- flushing to MySQL, in chunks, off the consume path
    async def flush_loop(self, stop: asyncio.Event) -> None:
        delay = 0.1
        while not stop.is_set():
            if not self.to_flush:
                self.flush_wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.flush_wakeup.wait(), timeout=1.0)
                await self.register_new_rooms()
                continue
            room = self.to_flush.pop()
            try:
                await self.flush_room(room)
                delay = 0.1
            except Exception as e:  # MySQL or Redis away: keep buffering, retry later
                self.to_flush.add(room)
                metrics.FLUSH_ERRORS.inc()
                log.warning("flush failed; will retry", extra={"room": room, "error": repr(e), "retry_in": delay})
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)

    async def flush_room(self, room: str) -> None:
        length = await self.buffer.length(room)
        while length > self.s.buffer_cap:
            with metrics.FLUSH_SECONDS.time():
                res = await self.mover.move_oldest(room, self.s.flush_chunk)
            metrics.FLUSHED.inc(res.moved)
            metrics.FLUSH_BATCH.observe(res.moved)
            length = await self.buffer.length(room)
            self.backlog[room] = max(0, length - self.s.buffer_cap)
        length = await self.buffer.done_if_short(room)
        self.lengths[room] = length
        if length <= self.s.buffer_cap:
            self.backlog.pop(room, None)
        else:
            self.to_flush.add(room)

    async def register_new_rooms(self) -> None:
        for partition in list(self.expected):
            try:
                names = await self.buffer.new_rooms(partition, 500)
                if names:
                    await self.rooms.ids(names)
                    await self.buffer.registered(partition, names)
            except Exception as e:
                log.warning("room registration failed; will retry", extra={"error": repr(e)})
                return

    async def _retry_redis(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        delay = 0.05
        while True:
            try:
                return await fn(*args)
            except StoreUnavailable as e:
                if self.stop.is_set():
                    raise Stopping from e
                metrics.REDIS_ERRORS.inc()
                log.warning("redis unavailable; retrying", extra={"error": repr(e), "retry_in": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, persister: Persister) -> None:
        self.p = persister

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.p.drop_partitions(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.p.take_partitions(assigned)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    await wait_for_topic(settings)
    redis = connect(settings, timeout_s=10, connect_timeout_s=5)
    pool = await create_pool(settings.mysql_dsn, settings.mysql_pool_max)
    rooms = RoomDirectory(pool)
    mover = Mover(redis, pool, Keys(settings.redis_prefix, settings.kafka_partitions), rooms)
    metrics.bind_mover(mover)
    p = Persister(settings, redis, mover, rooms, stop)
    p.consumer = new_consumer(settings, group_id=settings.kafka_persister_group, max_poll_records=None)
    p.consumer.subscribe([settings.kafka_topic], listener=_Rebalance(p))
    await p.consumer.start()
    flusher = asyncio.create_task(p.flush_loop(stop), name="flush")
    crash_on_failure(flusher, stop)
    reads_consumer = new_consumer(settings, group_id=f"{settings.kafka_persister_group}.reads")
    reads = asyncio.create_task(run_reads(settings, reads_consumer, redis, pool, stop), name="reads")
    crash_on_failure(reads, stop)
    log.info("persister started", extra={"topic": settings.kafka_topic})
    try:
        await p.consume()
    finally:
        for task in (flusher, reads):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await p.consumer.stop()
        pool.close()
        await pool.wait_closed()
        await redis.aclose()
        log.info("persister stopped")
