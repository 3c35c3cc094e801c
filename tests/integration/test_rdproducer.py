"""The send path's producer on librdkafka (shared.rdproducer) against the real broker: a delivery
says where the record is, a record it cannot deliver fails its future by the time the producer has
stopped (its sender may send it again), and a cluster that does not answer fails the start."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError

from shared.kafka import ensure_topic, new_consumer, new_producer
from shared.rdproducer import DeliveryFailed, RdProducer
from shared.settings import Settings
from tools import localstack

pytestmark = pytest.mark.timeout(60)


async def test_a_delivery_gives_the_partition_and_offset_the_broker_wrote(settings: Settings) -> None:
    await ensure_topic(settings)
    producer = new_producer(settings.model_copy(update={"kafka_producer": "librdkafka"}))
    assert isinstance(producer, RdProducer)
    await producer.start()
    try:
        md = await (await producer.send(settings.kafka_topic, b"rdproducer-probe", key=b"r", partition=3))
    finally:
        await producer.stop()
    tp = TopicPartition(settings.kafka_topic, 3)
    consumer = new_consumer(settings)
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, md.offset)
        records = (await consumer.getmany(tp, timeout_ms=5000)).get(tp, [])
    finally:
        await consumer.stop()
    assert (md.partition, records[0].offset, records[0].value) == (3, md.offset, b"rdproducer-probe")


async def test_a_record_still_held_when_the_producer_stops_fails_its_future(settings: Settings) -> None:
    # A topic that does not exist (the broker creates none): the record waits for its metadata.
    producer = new_producer(settings.model_copy(update={"kafka_producer": "librdkafka",
                                                        "kafka_request_timeout_ms": 1000}))
    await producer.start()
    delivery = await producer.send("rdproducer-no-such-topic", b"held", key=b"r", partition=0)
    await asyncio.sleep(0.2)
    assert not delivery.done()
    await producer.stop()
    with pytest.raises(DeliveryFailed):
        delivery.result()
    assert issubclass(DeliveryFailed, KafkaError)  # (the send path catches aiokafka's KafkaError)
    await producer.stop()  # (a second stop does nothing)


async def test_a_cluster_that_does_not_answer_fails_the_start(settings: Settings) -> None:
    nobody = f"127.0.0.1:{localstack.free_ports(1)[0]}"
    producer = new_producer(settings.model_copy(update={"kafka_producer": "librdkafka", "kafka_bootstrap": nobody,
                                                        "kafka_request_timeout_ms": 500}))
    with pytest.raises(KafkaConnectionError):
        await producer.start()
