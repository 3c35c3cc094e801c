"""Where a fan-out starts on the real test broker: after a batch of several records, ListOffsets on
Tansu points at the batch's first record + 1; the fan-out must start past the whole batch, or a
starting gateway delivers old records as new."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer, TopicPartition

from shared.kafka import ensure_topic, new_consumer, offsets_now
from shared.settings import Settings


async def test_offsets_now_is_past_a_batch_of_several_records(migrated: Settings) -> None:
    await ensure_topic(migrated)
    tp = TopicPartition(migrated.kafka_topic, 0)
    producer = AIOKafkaProducer(bootstrap_servers=migrated.kafka_bootstrap, acks="all", linger_ms=50)
    await producer.start()
    try:
        pending = [await producer.send(tp.topic, b"x", partition=0) for _ in range(5)]  # one batch (linger)
        sent = await asyncio.gather(*pending)
    finally:
        await producer.stop()
    assert [md.offset for md in sent] == [0, 1, 2, 3, 4]
    consumer = new_consumer(migrated)
    await consumer.start()
    try:
        consumer.assign([tp])
        assert await offsets_now(consumer, [tp]) == {tp: 5}
    finally:
        await consumer.stop()
