"""The Kafka topic, the client factories every service uses, and the one way records are read.

Topics are created explicitly with the configured partition count; producers are idempotent with
acks=all (a retry after a lost answer or a leader change is not written twice).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from prometheus_client import Counter
from tenacity import AsyncRetrying, before_sleep_log, retry_if_exception_type, stop_after_delay, wait_exponential

from shared.message import Message
from shared.settings import Settings

log = logging.getLogger(__name__)
UNDECODABLE = Counter("roomcast_undecodable_records_total", "Kafka records that are not roomcast messages (skipped)")


def topic_specs(settings: Settings) -> list[NewTopic]:
    """Every topic roomcast uses, as it is created. All have the messages topic's partition count, so
    a room's (or a user's) partition is the same number in each."""
    safe = {"min.insync.replicas": str(min(2, settings.kafka_replication)),
            "unclean.leader.election.enable": "false"}
    n, rf = settings.kafka_partitions, settings.kafka_replication
    return [
        # min ISR 2 with three replicas: an acknowledged record (acks=all) is on two brokers at least
        NewTopic(settings.kafka_topic, n, rf,
                 topic_configs={"retention.ms": str(settings.kafka_topic_retention_ms), **safe}),
        # ephemeral: produced with acks=1, read from the end, never replayed
        NewTopic(settings.kafka_signals_topic, n, rf,
                 topic_configs={"retention.ms": str(settings.kafka_signals_retention_ms)}),
        # the latest read mark of each (user, room) is kept for ever; an echoed mark is on two brokers
        NewTopic(settings.kafka_reads_topic, n, rf, topic_configs={"cleanup.policy": "compact", **safe}),
    ]


async def ensure_topic(settings: Settings) -> None:
    """Create the topics (topic_specs) that do not exist yet (idempotent)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                                request_timeout_ms=settings.kafka_request_timeout_ms)
    await admin.start()
    try:
        topics = await admin.list_topics()
        for topic in topic_specs(settings):
            if topic.name in topics:
                continue
            try:
                await admin.create_topics([topic])
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()


def startup_retrying(settings: Settings, *errors: type[BaseException]) -> AsyncRetrying:
    """A start-up step tried again on `errors`, for up to KAFKA_STARTUP_WAIT_S: a gateway or persister
    started during a broker fault comes up when the broker is back instead of exiting into its
    orchestrator's growing crash-loop back-off."""
    return AsyncRetrying(retry=retry_if_exception_type(errors), wait=wait_exponential(multiplier=0.2, max=5),
                         stop=stop_after_delay(settings.kafka_startup_wait_s),
                         before_sleep=before_sleep_log(log, logging.WARNING), reraise=True)


async def wait_for_topic(settings: Settings) -> None:
    """ensure_topic, tried again while the broker does not answer (startup_retrying)."""
    async for attempt in startup_retrying(settings, KafkaError, OSError):
        with attempt:
            await ensure_topic(settings)


def new_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
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


@dataclass
class Fetched:
    """One partition's records of a fetch, decoded: the fan-out, the persister and a resume read the
    log through this, so a record that is not a roomcast message is skipped the same way by all."""

    tp: TopicPartition
    messages: list[Message]
    first_offset: int  # of the first record fetched, decodable or not
    next_offset: int  # after the last record fetched


def decode(tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]],
           wanted: Callable[[bytes | None], bool] | None = None) -> Fetched:
    """The records as messages; with `wanted`, only those whose key (the room) it accepts are
    decoded at all: the rest cost the key check alone."""
    messages = []
    for r in records:
        if wanted is not None and not wanted(r.key):
            continue
        if (msg := decode_one(r.value, r.partition, r.offset)) is not None:
            messages.append(msg)
    return Fetched(tp, messages, records[0].offset, records[-1].offset + 1)


def decode_one(value: bytes | None, partition: int, offset: int) -> Message | None:
    """The record as a message; None (counted, logged) when it is not a roomcast message."""
    try:
        return Message.from_kafka(value, partition, offset)  # type: ignore[arg-type]  # (None: undecodable)
    except (ValueError, KeyError, TypeError):  # a producer outside roomcast: never a crash loop
        UNDECODABLE.inc()
        log.error("undecodable record skipped", extra={"partition": partition, "offset": offset})
        return None


async def fetch(consumer: AIOKafkaConsumer, *tps: TopicPartition, timeout_ms: int, max_records: int | None,
                wanted: Callable[[bytes | None], bool] | None = None) -> list[Fetched]:
    """The next records of the consumer's partitions (or of `tps`), per partition, decoded (those
    `wanted` accepts by key, when given)."""
    batch = await consumer.getmany(*tps, timeout_ms=timeout_ms, max_records=max_records)
    return [decode(tp, records, wanted) for tp, records in batch.items() if records]
