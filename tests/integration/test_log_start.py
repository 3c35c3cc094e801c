"""Where a reader starts in the log, on the real broker: a starting fan-out at the end of every
partition (nothing old delivered as new; a start before the topic exists waits for it), and readers
that ask for offsets retention has deleted (Kafka's DeleteRecords moves the log start as retention
does): the persister reports what it never applied instead of pretending, and stores what the log
still holds."""

from __future__ import annotations

import asyncio

import aiomysql
import pytest
import redis.asyncio as aioredis
from aiokafka import TopicPartition

from gateway.fanout import Fanout
from gateway.hub import Hub
from gateway.tail import new_tail
from persister import metrics
from persister.service import Persister
from shared.kafka import ensure_topic, fetch, new_consumer
from shared.keys import Keys
from shared.message import Message
from shared.settings import Settings
from shared.store.mover import Mover
from shared.store.rooms import RoomDirectory
from tests.support import delete_before, produce_messages

ROOM = "log-start-room"


@pytest.mark.parametrize("client", ["librdkafka", "aiokafka"])
async def test_a_starting_fanout_begins_at_the_end_of_every_partition(migrated: Settings, client: str) -> None:
    s = migrated.model_copy(update={"kafka_fanout_client": client})
    await ensure_topic(s)
    keys = Keys(s.redis_prefix, s.kafka_partitions)
    tp = TopicPartition(s.kafka_topic, keys.partition(ROOM))
    await produce_messages(s, tp, ROOM, 5)
    fanout = Fanout(s, Hub(), new_tail(s))
    await fanout.start()
    try:
        assert fanout.positions == {p: 5 if p == tp.partition else 0 for p in range(s.kafka_partitions)}
        assert fanout.lag() == 0 and await fanout.broker_end(tp.partition) == 5
    finally:
        await fanout.stop()


async def test_a_fanout_starting_before_its_topic_is_there_waits_for_it(migrated: Settings) -> None:
    # (the start asks the broker again while it cannot answer: a gateway restarted in the chaos test
    # during a broker fault once exited on "Broker handle destroyed" instead)
    s = migrated.model_copy(update={"kafka_topic": f"{migrated.kafka_topic}-late", "kafka_fanout_client": "librdkafka"})
    fanout = Fanout(s, Hub(), new_tail(s))
    starting = asyncio.create_task(fanout.start())
    await asyncio.sleep(1.5)
    assert not starting.done(), "started without its topic"
    await ensure_topic(s)
    await asyncio.wait_for(starting, 30)
    try:
        assert fanout.positions == dict.fromkeys(range(s.kafka_partitions), 0)
    finally:
        await fanout.stop()


async def test_a_persister_behind_the_log_start_stores_what_is_left_and_counts_what_is_gone(
        migrated: Settings, redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    keys = Keys(migrated.redis_prefix, migrated.kafka_partitions)
    tp = TopicPartition(migrated.kafka_topic, keys.partition(ROOM))
    await ensure_topic(migrated)
    await produce_messages(migrated, tp, ROOM, 6)
    rooms = RoomDirectory(mysql)
    persister = Persister(migrated, redis, Mover(redis, mysql, keys, rooms), rooms, new_consumer(migrated))
    consumer = persister.consumer
    await consumer.start()
    try:
        consumer.assign([tp])
        await persister.rewind(tp, None)
        first = await fetch(consumer, tp, timeout_ms=5000, max_records=2)
        await persister.apply_all(first)  # ID0, ID1 applied: the mark is 1
        assert await redis.get(keys.applied(tp.partition)) == b"1"

        await delete_before(migrated, tp, 4)  # retention took offsets 0-3 before 2 and 3 were applied
        skipped_before = metrics.LOG_SKIPPED._value.get()
        await persister.rewind(tp, 1)  # as a restarted persister does: seek to mark + 1 (deleted)
        rest = await fetch(consumer, tp, timeout_ms=5000, max_records=100)
        assert [f.first_offset for f in rest] == [4], "read from the log's new start"
        await persister.apply_all(rest)

        stored = [Message.from_entry(e).id for e in await redis.lrange(keys.msgs(ROOM), 0, -1)]
        assert stored == ["ID0", "ID1", "ID4", "ID5"]
        assert await redis.get(keys.applied(tp.partition)) == b"5"
        assert metrics.LOG_SKIPPED._value.get() - skipped_before == 2, "offsets 2 and 3 were lost: counted"
    finally:
        await consumer.stop()
