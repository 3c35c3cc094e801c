"""A produce whose answer was lost: the broker wrote the record, the gateway was told it failed (a
broker that died before answering). The client's resend, published again, must not become a second
message. Real Kafka, Redis and MariaDB, gateway and persister processes; the first attempt's
publisher runs here, its producer the unit's edge (a real producer whose answer is dropped)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiomysql
import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError
from roomcast_client import RoomcastClient

from gateway.publisher import Publisher
from shared.errors import Unavailable
from shared.kafka import new_consumer, new_producer
from shared.keys import Keys
from shared.settings import Settings
from tests.support import Cluster, Peer, eventually, offset, token
from tools.checker import stored_ids, stored_messages

pytestmark = pytest.mark.timeout(120)

ROOM = "lost-answer"


class AnswerLost:
    """A real producer whose answer never arrives: the record is in Kafka, the caller sees a timeout."""

    def __init__(self, settings: Settings) -> None:
        self.producer = new_producer(settings)

    async def send(self, topic: str, value: bytes, key: bytes, partition: int) -> asyncio.Future[Any]:
        await (await self.producer.send(topic, value, key=key, partition=partition))
        lost: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        lost.set_exception(KafkaTimeoutError())
        return lost


async def records_of_the_room(settings: Settings, through: str) -> list[dict[str, Any]]:
    """The records of ROOM's partition from its start through the cursor `through`, in offset order."""
    tp = TopicPartition(settings.kafka_topic, Keys(settings.redis_prefix, settings.kafka_partitions).partition(ROOM))
    consumer = new_consumer(settings)
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, 0)
        records: dict[int, dict[str, Any]] = {}
        async with asyncio.timeout(10):  # (the test's own topic: the room's offsets are 0, 1, 2, ...)
            while missing := [o for o in range(offset(through) + 1) if o not in records]:
                if records and max(records) > missing[0]:  # (a fetch showed a later batch first)
                    consumer.seek(tp, missing[0])
                for r in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                    records[r.offset] = orjson.loads(r.value)
        return [records[o] for o in range(offset(through) + 1)]
    finally:
        await consumer.stop()


async def test_a_resend_after_a_lost_answer_is_delivered_and_stored_once(
        migrated: Settings, log_dir: Path, redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    cluster = Cluster(migrated, log_dir).start(gateways=1, persister=False)  # (storage comes later)
    lost = AnswerLost(migrated)
    await lost.producer.start()
    try:
        bob = await Peer.connect(cluster.url(0), token(migrated, "bob"))
        assert (await bob.join(ROOM))["type"] == "joined"
        with pytest.raises(Unavailable):  # the first attempt: Kafka has it, the gateway was told it failed
            await (await Publisher(migrated, lost, redis).send("alice", ROOM, "k-1", "hello"))

        async with RoomcastClient(cluster.url(0), token(migrated, "alice")) as alice:
            ack = await alice.send(ROOM, "hello", client_msg_id="k-1")  # the client's resend
            marker = await alice.send(ROOM, "after")
        copies = [r for r in await records_of_the_room(migrated, marker["cursor"]) if r["cmid"] == "k-1"]
        assert len(copies) == 2, "the resend was published again (the first answer was lost)"
        assert copies[0]["id"] == copies[1]["id"] == ack["id"] and copies[0]["ts"] == copies[1]["ts"] == ack["ts"]

        await bob.wait_for(lambda f: f.get("id") == marker["id"])  # (the fan-out is past both copies)
        assert [m["body"] for m in bob.messages(ROOM)] == ["hello", "after"], "delivered once"

        cluster.start_persister()
        keys = Keys(migrated.redis_prefix, migrated.kafka_partitions)

        async def both_applied() -> bool:
            return marker["id"] in stored_ids(await stored_messages(redis, mysql, keys, ROOM))

        await eventually(both_applied, 30, what="the persister applies the room")
        assert stored_ids(await stored_messages(redis, mysql, keys, ROOM)) == [ack["id"], marker["id"]]
        await bob.close()
    finally:
        await lost.producer.stop()
        cluster.stop()


class SlowHandOver:
    """A real producer that takes `hand_over_s` to take a record (a full batch waiting for a leader)
    and answers `late_s` after that (the record reached Kafka, the answer came late)."""

    def __init__(self, settings: Settings, hand_over_s: float, late_s: float) -> None:
        self.producer = new_producer(settings)
        self.hand_over_s, self.late_s = hand_over_s, late_s

    async def send(self, topic: str, value: bytes, key: bytes, partition: int) -> asyncio.Future[Any]:
        await asyncio.sleep(self.hand_over_s)
        metadata = await (await self.producer.send(topic, value, key=key, partition=partition))
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(self.late_s, answer.set_result, metadata)
        return answer


async def test_a_slow_hand_over_keeps_the_claim_so_a_resend_is_not_a_second_copy(
        migrated: Settings, log_dir: Path, redis: aioredis.Redis) -> None:
    """The wait for a produce's answer counts from the claim: the claim (TTL: produce timeout + 5 s)
    is renewed before it lapses even when the hand-over took longer than the margin. A claim that
    lapsed let the client's resend publish a second copy under a new id (seen with two of three
    brokers down: sends waited ~5 s for room in a full batch)."""
    cluster = Cluster(migrated, log_dir).start(gateways=1, persister=False)
    fast = migrated.model_copy(update={"kafka_request_timeout_ms": 1000})  # produce timeout 2 s, claim TTL 7 s
    slow = SlowHandOver(fast, hand_over_s=5.5, late_s=4.0)  # answered 9.5 s after the claim
    await slow.producer.start()
    publisher = Publisher(fast, slow, redis)
    try:
        first = await publisher.send("alice", ROOM, "k-2", "slow")
        with pytest.raises(Unavailable):  # no answer within the produce timeout: the client is told to resend
            await first
        async with RoomcastClient(cluster.url(0), token(migrated, "alice")) as alice:
            ack = await alice.send(ROOM, "slow", client_msg_id="k-2")  # the resend, while the first is pending
            marker = await alice.send(ROOM, "after")
        copies = [r for r in await records_of_the_room(migrated, marker["cursor"]) if r["cmid"] == "k-2"]
        assert [c["id"] for c in copies] == [ack["id"]], "one copy: the resend waited for the first one's answer"
    finally:
        await publisher.close()
        await slow.producer.stop()
        cluster.stop()
