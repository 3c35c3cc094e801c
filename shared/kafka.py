"""The Kafka topic and the client factories every service uses.

Correct on Apache Kafka and on Tansu (../shared/KAFKA.md): idempotence is a setting, topics are
created explicitly with the configured partition count, and "now" is found by time, not by the end
offsets Tansu gets wrong.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from tenacity import AsyncRetrying, before_sleep_log, retry_if_exception_type, stop_after_delay, wait_exponential

from shared.settings import Settings

log = logging.getLogger(__name__)


async def ensure_topic(settings: Settings) -> None:
    """Create the topic with the configured partitions if it does not exist (idempotent)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                                request_timeout_ms=settings.kafka_request_timeout_ms)
    await admin.start()
    try:
        topics = await admin.list_topics()
        if settings.kafka_topic in topics:
            return
        topic = NewTopic(settings.kafka_topic, settings.kafka_partitions, settings.kafka_replication,
                         topic_configs={"retention.ms": str(settings.kafka_topic_retention_ms)})
        try:
            await admin.create_topics([topic])
        except TopicAlreadyExistsError:
            pass
    finally:
        await admin.close()


async def wait_for_topic(settings: Settings) -> None:
    """ensure_topic, tried again while the broker does not answer, for up to KAFKA_STARTUP_WAIT_S: a
    gateway or persister started during a broker outage comes up when the broker is back instead of
    exiting into its orchestrator's growing crash-loop back-off."""
    retrying = AsyncRetrying(retry=retry_if_exception_type((KafkaError, OSError)),
                             wait=wait_exponential(multiplier=0.2, max=5),
                             stop=stop_after_delay(settings.kafka_startup_wait_s),
                             before_sleep=before_sleep_log(log, logging.WARNING), reraise=True)
    async for attempt in retrying:
        with attempt:
            await ensure_topic(settings)


def new_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        enable_idempotence=settings.kafka_idempotence,
        linger_ms=settings.kafka_linger_ms,
        request_timeout_ms=settings.kafka_request_timeout_ms,
        client_id=f"roomcast-{settings.name}",
    )


def new_consumer(settings: Settings, group_id: str | None = None, **overrides: object) -> AIOKafkaConsumer:
    kw: dict[str, object] = dict(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
        request_timeout_ms=max(settings.kafka_request_timeout_ms, settings.kafka_session_timeout_ms + 5000),
        client_id=f"roomcast-{settings.name}",
    )
    kw.update(overrides)
    return AIOKafkaConsumer(**kw)


async def all_partitions(consumer: AIOKafkaConsumer, topic: str, timeout_s: float = 30) -> list[TopicPartition]:
    deadline = time.monotonic() + timeout_s
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return [TopicPartition(topic, p) for p in sorted(parts)]
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {topic!r} has no partitions after {timeout_s}s")
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.1)


async def high_water_marks(consumer: AIOKafkaConsumer, tps: list[TopicPartition],
                           timeout_s: float) -> dict[TopicPartition, int | None]:
    """Each partition's high-water mark as a fetch response reports it (None where none answered
    within `timeout_s`); every partition is left sought to ListOffsets' answer. ListOffsets ("latest",
    `end_offsets`) cannot be trusted for it on Tansu: in memory storage it points a batch early, and
    after a restart of its S3 storage it was seen far behind (1 or 6 for a partition of 13 records).
    The fetch starts at that answer, so it reads little. `consumer` must not have fetched yet."""
    for tp, offset in (await consumer.end_offsets(tps)).items():
        consumer.seek(tp, offset)
    deadline = time.monotonic() + timeout_s
    while any(consumer.highwater(tp) is None for tp in tps) and time.monotonic() < deadline:
        await consumer.getmany(*tps, timeout_ms=100, max_records=1)  # (what it returns is old: dropped)
    return {tp: consumer.highwater(tp) for tp in tps}


async def offsets_now(consumer: AIOKafkaConsumer, tps: list[TopicPartition],
                      timeout_s: float = 30.0) -> dict[TopicPartition, int]:
    """The offset each partition's next new record will get: where a fan-out starts. (ListOffsets'
    answer sent a gateway started after a Tansu restart back over the whole log.)"""
    highs = await high_water_marks(consumer, tps, timeout_s)
    now = {tp: high for tp, high in highs.items() if high is not None}
    if len(now) < len(tps):
        raise TimeoutError(f"no fetch answered within {timeout_s}s for {[tp for tp in tps if tp not in now]}")
    return now


class GapGuard:
    """Records of our topic have dense offsets (no transactions, no compaction), so a fetch that
    skips offsets is a fault of the fetch, not of the log (Tansu can show a partition's next batch
    an instant before the one below it): cut the batch at the gap and have the caller read again
    from there, for as long as `wait_s` from the first sight of that gap. Only a gap still there
    after that is accepted (logged as an error): its records are then skipped by this reader."""

    def __init__(self, wait_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._wait_s = wait_s
        self._clock = clock
        self._seen: dict[int, tuple[int, float]] = {}  # partition -> (gap's first offset, first seen)

    def cut(self, partition: int, expected: int | None, offsets: list[int]) -> tuple[int, int | None]:
        """(how many leading records to use, the offset to read again from, or None)."""
        seen = self._seen.get(partition)
        if seen is not None and expected is not None and expected > seen[0]:
            del self._seen[partition]  # the gap filled: a later sight of it (after a seek back) waits anew
        prev = None if expected is None else expected - 1
        for i, off in enumerate(offsets):
            if prev is not None and off > prev + 1:
                missing, now = prev + 1, self._clock()
                first = self._seen.get(partition)
                if first is None or first[0] != missing:
                    self._seen[partition] = (missing, now)
                    log.warning("a fetch skipped offsets; reading them again",
                                extra={"partition": partition, "expected": missing, "got": off})
                    return i, missing
                if now - first[1] < self._wait_s:
                    return i, missing
                del self._seen[partition]
                log.error("offsets still missing; skipping them",
                          extra={"partition": partition, "from": missing, "to": off - 1, "waited_s": self._wait_s})
            prev = off if prev is None else max(prev, off)
        return len(offsets), None
