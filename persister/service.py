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
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from persister import batching, metrics
from persister.backpressure import Backlog, Step
from persister.flushing import Backoff, FlushQueue
from persister.partitions import Partitions, resume_offset
from persister.reads import run_reads
from shared.errors import StoreUnavailable
from shared.kafka import Fetched, new_consumer, wait_for_topic
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
                 consumer: AIOKafkaConsumer, stop: asyncio.Event | None = None) -> None:
        self.s = settings
        self.stop = stop or asyncio.Event()
        self.keys = Keys(settings.redis_prefix, settings.kafka_partitions)
        self.buffer = RedisBuffer(redis, self.keys, settings.buffer_cap, settings.dedupe_ttl_s)
        self.mover = mover
        self.rooms = rooms
        self.consumer = consumer
        self.partitions = Partitions()
        self.flushes = FlushQueue(settings.buffer_cap)
        self.backlog = Backlog(settings.buffer_cap, settings.persister_backlog_budget)
        self.archived_events: set[int] = set()  # partitions with edits/deletes queued for MySQL
        self.replaying: set[int] = set()  # partitions read again into a Redis that lost them (rewound)

    @property
    def expected(self) -> Partitions:
        """The partitions owned, with the applied mark each is believed to have in Redis."""
        return self.partitions

    # --- partition ownership
    async def take_partitions(self, tps: Iterable[TopicPartition]) -> None:
        tps = list(tps)
        self.consumer.pause(*tps)  # nothing of these partitions is consumed before its seek
        for tp in tps:
            mark = await self._retry_redis(self.buffer.mark, tp.partition)
            self.partitions.take(tp.partition, mark)
            if mark is None:  # (a Redis that lost everything, or a partition never written to)
                self.replaying.add(tp.partition)
            await self.read_after(tp, mark)
            for room in await self._retry_redis(self.buffer.over_cap_rooms, tp.partition, 10_000):
                self.flushes.add(room)
            self.archived_events.add(tp.partition)  # (a previous owner may have left some)
            log.info("partition taken", extra={"partition": tp.partition, "mark": mark})
        metrics.OWNED.set(len(self.partitions))
        if not self.backlog.paused:
            self.consumer.resume(*tps)
        self.flushes.wakeup.set()

    def drop_partitions(self, tps: Iterable[TopicPartition]) -> None:
        self.partitions.drop(tp.partition for tp in tps)
        metrics.OWNED.set(len(self.partitions))

    async def read_after(self, tp: TopicPartition, mark: int | None) -> None:
        """Consume the partition from just after its applied mark, or from the log's start without one.
        (A mark + 1 that retention deleted resets to the log's start: `apply_all` reports the loss.)"""
        offset = resume_offset(mark)
        if offset is None:
            await self.consumer.seek_to_beginning(tp)
        else:
            self.consumer.seek(tp, offset)

    # --- the main loop
    async def consume(self) -> None:
        try:
            await self._consume()
        except Stopping:
            log.warning("stopping while Redis is unreachable (what is not applied is replayed by the next owner)")

    async def _consume(self) -> None:
        checked = committed = time.monotonic()
        uncommitted = False
        while not self.stop.is_set():
            if time.monotonic() - checked > 1.0:
                await self.check_marks()
                checked = time.monotonic()
            batch = await batching.gather(self.consumer, self.s.persister_batch_max, self.s.persister_linger_ms / 1000)
            ours = []
            for fetched in batch:
                if fetched.tp.partition in self.partitions:
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

    def _observe(self) -> None:
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is not None:
                metrics.LAG.labels(str(tp.partition)).set(self.partitions.lag(tp.partition, high))
        metrics.BUFFERED.set(self.flushes.buffered())

    async def check_marks(self) -> None:
        """Notice a Redis that lost data (restart without AOF, FLUSHALL) even when no records arrive."""
        for tp in self.consumer.assignment():
            if tp.partition in self.partitions:
                mark = await self._retry_redis(self.buffer.mark, tp.partition)
                # (a rebalance may have revoked it meanwhile: `partitions` holds only what we own)
                if self.partitions.moved(tp.partition, mark):
                    await self.rewind(tp, mark)

    async def rewind(self, tp: TopicPartition, mark: int | None) -> None:
        log.warning("applied mark moved; replaying from Kafka",
                    extra={"partition": tp.partition, "expected": self.partitions.expected(tp.partition),
                           "stored": mark})
        self.partitions.take(tp.partition, mark)
        self.replaying.add(tp.partition)
        await self.read_after(tp, mark)

    async def as_archived(self, fetched: Fetched) -> list[Message]:
        """A replayed batch's messages as the archive has them now (edited or deleted since), so a
        Redis rebuilt from the log shows no archived body deleted since while the replay catches up; until the
        partition's replay reaches the log's end as the last fetch saw it. Best effort: when MySQL
        does not answer, the rest of the replay goes as sent (the edits and deletes follow in the log)."""
        high = self.consumer.highwater(fetched.tp)
        if high is not None and fetched.next_offset >= high:
            self.replaying.discard(fetched.tp.partition)
        try:
            return await self.mover.archive.as_archived(fetched.messages)
        except StoreUnavailable as e:  # (not asked again for this replay: a wait per batch would stall it)
            self.replaying.discard(fetched.tp.partition)
            log.warning("replaying without the archive's state", extra={"error": repr(e.__cause__ or e)})
            return fetched.messages

    async def apply_all(self, batch: list[Fetched]) -> None:
        """Append every partition's messages, one script call each, all in one Redis round trip. The
        mark moves to the last record fetched, so records that are not messages are passed over once."""
        for fetched in batch:
            if skipped := self.partitions.skipped(fetched.tp.partition, fetched.first_offset):
                # They are not in Kafka any more: say so.
                metrics.LOG_SKIPPED.inc(skipped)
                log.error("records deleted by retention before they were applied",
                          extra={"partition": fetched.tp.partition, "from": fetched.first_offset - skipped,
                                 "to": fetched.first_offset - 1})
        for fetched in batch:
            if fetched.tp.partition in self.replaying and fetched.messages:
                fetched.messages = await self.as_archived(fetched)
        results = await self._retry_redis(self.buffer.apply_many, [
            (f.tp.partition, self.partitions.expected(f.tp.partition), f.messages, f.next_offset - 1)
            for f in batch])
        for fetched, res in zip(batch, results, strict=True):
            await self._applied(fetched.tp, fetched.messages, res)

    async def _applied(self, tp: TopicPartition, messages: list[Message], res: Applied) -> None:
        if res.rewind:
            metrics.FENCED.inc()
        if tp.partition not in self.partitions:  # revoked during the write (the script kept it consistent)
            return
        if res.rewind:
            await self.rewind(tp, res.mark)
            return
        self.partitions.applied(tp.partition, res.mark)
        metrics.APPLIED.inc(len(messages))
        for room, length in res.lengths.items():
            if self.flushes.note(room, length):
                self.backlog.note(room, length)
        if res.archived_events:
            self.archived_events.add(tp.partition)
        if self.flushes or self.archived_events:
            self.flushes.wakeup.set()

    def _pause_or_resume(self) -> None:
        metrics.BACKLOG.set(self.backlog.total())
        step = self.backlog.step()
        if step is Step.PAUSE:
            log.warning("backlog budget reached; pausing consumption", extra={"backlog": self.backlog.total()})
            self.consumer.pause(*self.consumer.assignment())
        elif step is Step.RESUME:
            log.info("backlog below budget; resuming")
            self.consumer.resume(*self.consumer.assignment())

    # --- flushing to MySQL, in chunks, off the consume path
    async def flush_loop(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        while not stop.is_set():
            if self.archived_events:
                try:
                    await self.apply_archived_events()
                except Exception as e:  # MySQL or Redis away: they stay queued, tried again next time round
                    metrics.FLUSH_ERRORS.inc()
                    log.warning("edits and deletes for MySQL not applied; will retry", extra={"error": repr(e)})
            if not self.flushes:
                self.flushes.wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.flushes.wakeup.wait(), timeout=1.0)
                await self.register_new_rooms()
                continue
            room = self.flushes.pop()
            try:
                await self.flush_room(room)
                backoff.ok()
            except Exception as e:  # MySQL or Redis away: keep buffering, retry later
                self.flushes.add(room)
                metrics.FLUSH_ERRORS.inc()
                wait = backoff.failed()
                log.warning("flush failed; will retry",
                            extra={"room": room, "error": repr(e.__cause__ or e), "retry_in": wait})
                await asyncio.sleep(wait)

    async def flush_room(self, room: str) -> None:
        length = await self.buffer.length(room)
        while self.buffer.excess(length):
            with metrics.FLUSH_SECONDS.time():
                res = await self.mover.move_oldest(room, self.s.flush_chunk)
            metrics.FLUSHED.inc(res.moved)
            metrics.FLUSH_BATCH.observe(res.moved)
            length = await self.buffer.length(room)
            self.backlog.note(room, length)
        length = await self.buffer.done_if_short(room)
        self.backlog.note(room, length)
        self.flushes.note(room, length)

    async def apply_archived_events(self) -> None:
        """Apply the edits and deletes whose messages were archived already (APPLY_BATCH queued
        them, in log order) to MySQL, a bounded batch per partition at a time; an edit that finds its
        message deleted is blanked in Redis too."""
        for partition in list(self.archived_events):
            if partition not in self.partitions:
                self.archived_events.discard(partition)
                continue
            raw = await self.buffer.archived_events(partition, self.s.flush_chunk)
            if not raw:
                self.archived_events.discard(partition)
                continue
            for edit in await self.mover.archive.apply_events([Message.from_entry(r) for r in raw]):
                await self.buffer.blank_edit(edit)
            await self.buffer.drop_archived_events(partition, raw)

    async def register_new_rooms(self) -> None:
        for partition in self.partitions:
            try:
                names = await self.buffer.new_rooms(partition, 500)
                if names:
                    await self.rooms.ids(names)
                    await self.buffer.registered(partition, names)
            except Exception as e:
                log.warning("room registration failed; will retry", extra={"error": repr(e.__cause__ or e)})
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
                log.warning("redis unavailable; retrying", extra={"error": repr(e.__cause__ or e), "retry_in": delay})
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
    consumer = new_consumer(settings, group_id=settings.kafka_persister_group, max_poll_records=None)
    p = Persister(settings, redis, mover, rooms, consumer, stop)
    consumer.subscribe([settings.kafka_topic], listener=_Rebalance(p))
    await consumer.start()
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
        await consumer.stop()
        pool.close()
        await pool.wait_closed()
        await redis.aclose()
        log.info("persister stopped")
