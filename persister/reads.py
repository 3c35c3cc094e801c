"""The reads consumer: chat.reads (compacted read marks) -> MySQL `read_marks`, then Redis, in batches.

Its own consumer group (`<persister group>.reads`), so it runs in every persister process and the
partitions spread over them. Per batch: one multi-row upsert per 500 marks, then one Redis script
per partition that merges the marks and records the partition's applied offset, then the Kafka
commit. A crash anywhere replays from the last commit (every write keeps the greater mark, so a
replay changes nothing). MySQL before Redis: a hash Redis holds is never ahead of MySQL on what the
consumer wrote, so reloading a lost hash from MySQL loses nothing. A Redis that lost its last
second (restart with AOF everysec) shows an applied offset below ours: those records are read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiomysql
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import Counter
from redis.exceptions import RedisError

from shared.keys import Keys
from shared.reads import APPLY, HASH_TTL_S, ReadMark, greatest, store_in_mysql
from shared.redisconn import run_scripts
from shared.settings import Settings

log = logging.getLogger("roomcast.persister.reads")
T = TypeVar("T")

APPLIED = Counter("roomcast_persister_read_marks_total", "Read marks stored (MySQL and Redis)")
SCRIPT_MAX = 500  # users' hashes per Redis script call
CHECK_INTERVAL_S = 1.0


class ReadsConsumer:
    def __init__(self, settings: Settings, consumer: AIOKafkaConsumer, redis: aioredis.Redis,
                 pool: aiomysql.Pool, stop: asyncio.Event) -> None:
        self.s = settings
        self.consumer = consumer
        self.redis = redis
        self.pool = pool
        self.stop = stop
        self.keys = Keys(settings.redis_prefix, settings.kafka_partitions)
        self.expected: dict[int, int | None] = {}  # partition -> applied offset we wrote to Redis
        self._apply = redis.register_script(APPLY)

    async def run(self) -> None:
        checked = time.monotonic()
        while not self.stop.is_set():
            if time.monotonic() - checked > CHECK_INTERVAL_S:
                await self.check_marks()
                checked = time.monotonic()
            batch = await self.gather()
            if batch:
                await self.store(batch)

    async def gather(self) -> dict[TopicPartition, list[Any]]:
        got = await self.consumer.getmany(timeout_ms=500, max_records=5000)
        if got and self.s.reads_linger_ms:
            await asyncio.sleep(self.s.reads_linger_ms / 1000)
            for tp, records in (await self.consumer.getmany(timeout_ms=0, max_records=5000)).items():
                got.setdefault(tp, []).extend(records)
        return {tp: records for tp, records in got.items() if records}

    async def store(self, batch: dict[TopicPartition, list[Any]]) -> None:
        per_partition: dict[int, list[ReadMark]] = {}
        for tp, records in batch.items():
            marks = []
            for r in records:
                try:
                    marks.append(ReadMark.from_value(r.value))
                except (ValueError, KeyError, TypeError):
                    log.error("undecodable read mark skipped", extra={"partition": r.partition, "offset": r.offset})
            per_partition[tp.partition] = greatest(marks)
        every = greatest([m for marks in per_partition.values() for m in marks])
        if every:
            await self._retry(store_in_mysql, self.pool, every, int(time.time() * 1000))
        calls = []
        for tp, records in batch.items():
            marks = [m for m in per_partition[tp.partition] if self.keys.partition(m.user) == tp.partition]
            by_user: dict[str, list[ReadMark]] = defaultdict(list)
            for m in marks:
                by_user[m.user].append(m)
            users = list(by_user)
            for i in range(0, max(1, len(users)), SCRIPT_MAX):
                part = users[i:i + SCRIPT_MAX]
                args: list[Any] = [HASH_TTL_S, records[-1].offset]
                for user in part:
                    args.append(len(by_user[user]))
                    for m in by_user[user]:
                        args += [m.room, m.offset]
                calls.append((self._apply, [*(self.keys.reads(u) for u in part),
                                            self.keys.reads_applied(tp.partition)], args))
        await self._retry(run_scripts, self.redis, calls)
        for tp, records in batch.items():
            self.expected[tp.partition] = records[-1].offset
        APPLIED.inc(len(every))
        with contextlib.suppress(KafkaError):  # (the next batch commits again)
            await self.consumer.commit({tp: records[-1].offset + 1 for tp, records in batch.items()})

    async def check_marks(self) -> None:
        """Read again what a Redis that lost its last writes no longer has."""
        for partition, mine in list(self.expected.items()):
            raw = await self._retry(self.redis.get, self.keys.reads_applied(partition))
            stored = None if raw is None else int(raw)
            if mine is not None and stored is not None and stored < mine and partition in self.expected:
                log.warning("reads applied mark went back; reading again",
                            extra={"partition": partition, "expected": mine, "stored": stored})
                self.consumer.seek(TopicPartition(self.s.kafka_reads_topic, partition), stored + 1)
                self.expected[partition] = stored

    async def _retry(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        delay = 0.05
        while True:
            try:
                return await fn(*args)
            except (RedisError, OSError, aiomysql.Error) as e:
                if self.stop.is_set():
                    raise
                log.warning("read marks not stored; retrying", extra={"error": repr(e), "retry_in": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, reads: ReadsConsumer) -> None:
        self.reads = reads

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        for tp in revoked:
            self.reads.expected.pop(tp.partition, None)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        for tp in assigned:
            self.reads.expected[tp.partition] = None  # (known after our first write)


async def run_reads(settings: Settings, consumer: AIOKafkaConsumer, redis: aioredis.Redis, pool: aiomysql.Pool,
                    stop: asyncio.Event) -> None:
    """Consume chat.reads until `stop`; the consumer is started and stopped here."""
    reads = ReadsConsumer(settings, consumer, redis, pool, stop)
    consumer.subscribe([settings.kafka_reads_topic], listener=_Rebalance(reads))
    await consumer.start()
    try:
        await reads.run()
    finally:
        await consumer.stop()
