"""The send-dedupe key in Redis: a claim while the send is in flight, then the ack a resend gets.

Real Redis; the producer is the unit's edge (a fake that fails or acknowledges on cue), so the
ambiguous case can be staged: a produce the gateway gave up on that Kafka (and the persister) had.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError
from aiokafka.structs import RecordMetadata

from gateway.publisher import AckWriter, Publisher
from shared.errors import Unavailable
from shared.keys import Keys
from shared.settings import Settings
from shared.store.claims import PENDING, RETRY

PERSISTER_ACK = b'{"type":"ack","client_msg_id":"k-1","id":"FIRST-COPY","room":"r","cursor":"0-0","ts":1}'


class FakeProducer:  # the unit's edge: what the publisher hands records to
    def __init__(self, refuse: bool = False) -> None:
        self.records: list[bytes] = []
        self.deliveries: list[asyncio.Future[Any]] = []
        self.refuse = refuse  # raise from send(): the record was never taken

    async def send(self, topic: str, value: bytes, key: bytes, partition: int) -> asyncio.Future[Any]:
        if self.refuse:
            raise KafkaConnectionError("not connected")
        self.records.append(value)
        delivery: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.deliveries.append(delivery)
        return delivery


def sent_key(settings: Settings) -> str:
    return Keys(settings.redis_prefix, settings.kafka_partitions).sent("r", "alice", "k-1")


async def send(settings: Settings, redis: aioredis.Redis,
               producer: FakeProducer | None = None) -> tuple[FakeProducer, Awaitable[bytes]]:
    producer, ack, _ = await send_with(settings, redis, producer)
    return producer, ack


async def send_with(settings: Settings, redis: aioredis.Redis, producer: FakeProducer | None = None
                    ) -> tuple[FakeProducer, Awaitable[bytes], Publisher]:
    producer = producer or FakeProducer()
    publisher = Publisher(settings, producer, redis)
    return producer, await publisher.send("alice", "r", "k-1", "hello"), publisher


async def send_that_times_out(settings: Settings, redis: aioredis.Redis,
                              meanwhile: Callable[[], Awaitable[object]] | None = None) -> FakeProducer:
    producer, ack = await send(settings, redis)
    assert (await redis.get(sent_key(settings))).startswith(PENDING)
    if meanwhile is not None:
        await meanwhile()
    producer.deliveries[0].set_exception(KafkaTimeoutError())
    with pytest.raises(Unavailable):  # no ack for a produce Kafka did not acknowledge
        await ack
    return producer


def record(value: bytes) -> dict[str, Any]:
    return orjson.loads(value)  # type: ignore[no-any-return]


async def a_resend_is_published(settings: Settings, redis: aioredis.Redis) -> dict[str, Any]:
    """A resend now is published once, acknowledged, and its ack recorded for a later resend;
    returns the record it published."""
    resend, pending, publisher = await send_with(settings, redis)
    assert len(resend.records) == 1
    resend.deliveries[0].set_result(RecordMetadata("t", 3, TopicPartition("t", 3), 41, 1, 0, 0))
    ack = await pending
    assert b'"cursor":"3-41"' in ack
    await publisher.close()  # (writes the gathered ack now)
    assert await redis.get(sent_key(settings)) == ack, "recorded for a later resend"
    assert record(ack)["id"] == record(resend.records[0])["id"]
    return record(resend.records[0])


async def test_a_produce_given_up_on_keeps_the_stored_copys_ack_for_the_resend(
        settings: Settings, redis: aioredis.Redis) -> None:
    # Kafka had the record after all and the persister stored it (recording its ack over the claim),
    # but the gateway's wait ended in an error: the client is told to send again.
    await send_that_times_out(settings, redis, lambda: redis.set(sent_key(settings), PERSISTER_ACK))
    assert await redis.get(sent_key(settings)) == PERSISTER_ACK, "the stored copy's ack survives"

    resend, ack = await send(settings, redis)  # (on another node)
    assert await ack == PERSISTER_ACK
    assert resend.records == [], "not published twice"


async def test_a_resend_after_a_failed_produce_publishes_the_same_id_and_ts(
        settings: Settings, redis: aioredis.Redis) -> None:
    # The failed produce may still have reached Kafka (a broker that wrote it and died before
    # answering): whenever the resend is published, both copies are one message to the persister,
    # MySQL, the fan-out and the client (a new id was a second message: the durable chaos test).
    first = record((await send_that_times_out(settings, redis)).records[0])
    assert (await redis.get(sent_key(settings))).startswith(RETRY)
    assert await redis.ttl(sent_key(settings)) > settings.dedupe_ttl_s - 5, "kept for the dedupe window"

    await asyncio.sleep(0.01)  # (a new send would get a later ts)
    resent = await a_resend_is_published(settings, redis)
    assert (resent["id"], resent["ts"], resent["body"]) == (first["id"], first["ts"], first["body"])


async def test_a_resend_waits_while_another_takes_over_the_failed_claim(
        settings: Settings, redis: aioredis.Redis) -> None:
    await send_that_times_out(settings, redis)
    taker, taken = await send(settings, redis)
    waiter, waiting = await send(settings, redis)  # (a third attempt meanwhile, on another node)
    assert (len(taker.records), len(waiter.records)) == (1, 0), "one attempt in flight at a time"
    taker.deliveries[0].set_result(RecordMetadata("t", 3, TopicPartition("t", 3), 41, 1, 0, 0))
    first, second = await asyncio.gather(taken, waiting)
    assert first == second and b'"cursor":"3-41"' in first


async def test_the_persister_records_its_ack_over_a_failed_claim(
        settings: Settings, redis: aioredis.Redis) -> None:
    # The late copy is stored: its ack replaces the retry claim, and a resend gets it unpublished.
    await send_that_times_out(settings, redis)
    await redis.set(sent_key(settings), PERSISTER_ACK, xx=True)  # (what APPLY_BATCH does: not an ack yet)
    resend, ack = await send(settings, redis)
    assert await ack == PERSISTER_ACK
    assert resend.records == []


async def test_the_gateways_ack_is_written_over_its_claim_but_never_over_a_recorded_ack(
        settings: Settings, redis: aioredis.Redis) -> None:
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    claimed, recorded, taken = (keys.sent("r", user, "k-1") for user in ("alice", "bob", "eve"))
    await redis.set(claimed, PENDING + b"A|1")
    await redis.set(recorded, PERSISTER_ACK)
    await redis.set(taken, PENDING + b"B|1")  # (our claim failed and another attempt took it over)
    writer = AckWriter(redis, ttl_s=60)
    writer.put(claimed, PENDING + b"A|1", b"gateway-ack-1")
    writer.put(recorded, PENDING + b"X|1", b"gateway-ack-2")
    writer.put(taken, PENDING + b"C|1", b"gateway-ack-3")
    await asyncio.sleep(AckWriter.GATHER_S * 3)  # (its own gathering time: no close needed)
    assert await redis.get(claimed) == b"gateway-ack-1"
    assert 0 < await redis.ttl(claimed) <= 60
    assert await redis.get(recorded) == PERSISTER_ACK
    assert await redis.get(taken) == PENDING + b"B|1"


async def test_closing_the_ack_writer_writes_what_it_gathered_without_waiting(
        settings: Settings, redis: aioredis.Redis) -> None:
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    claims = [keys.sent("r", "carol", f"k-{i}") for i in range(3)]
    for key in claims:
        await redis.set(key, PENDING + b"A|1")
    writer = AckWriter(redis, ttl_s=60)
    writer.GATHER_S = 30.0  # (a close must not wait it out)
    for i, key in enumerate(claims):
        writer.put(key, PENDING + b"A|1", b"ack-%d" % i)
        await asyncio.sleep(0.01)  # (the writer is gathering when the close comes)
    async with asyncio.timeout(5):
        await writer.close()
    assert [await redis.get(key) for key in claims] == [b"ack-0", b"ack-1", b"ack-2"]
    await writer.close()  # (nothing left: returns at once)


async def test_a_record_the_producer_refused_releases_its_claim_at_once(
        settings: Settings, redis: aioredis.Redis) -> None:
    with pytest.raises(Unavailable):  # (never handed over: it cannot reach Kafka)
        await send(settings, redis, FakeProducer(refuse=True))
    assert (await redis.get(sent_key(settings))).startswith(RETRY)
    await a_resend_is_published(settings, redis)


async def test_a_produce_the_gateway_stopped_waiting_for_keeps_its_claim_until_the_producer_answers(
        settings: Settings, redis: aioredis.Redis) -> None:
    # A broker outage: the producer holds the record until the broker is back, longer than the
    # gateway waits. The record reaches Kafka then, so a resend meanwhile must get its ack.
    settings = settings.model_copy(update={"kafka_request_timeout_ms": 100})
    producer, ack, publisher = await send_with(settings, redis)
    with pytest.raises(Unavailable):
        await ack  # (the gateway waits twice the request timeout)
    await asyncio.sleep(0.5)  # the record is still the producer's
    assert (await redis.get(sent_key(settings))).startswith(PENDING)

    resend, resent = await send(settings, redis)  # (on another node: waits for the first copy's ack)
    producer.deliveries[0].set_result(RecordMetadata("t", 3, TopicPartition("t", 3), 41, 1, 0, 0))
    assert b'"cursor":"3-41"' in await resent
    assert resend.records == [], "not published twice"
    await publisher.close()
