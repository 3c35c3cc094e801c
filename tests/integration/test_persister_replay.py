"""The persister replaying a partition from the start of the log (its Redis mark is gone: a wiped
Redis, or a partition never applied), against real Kafka (Tansu) and Redis.

A fetch can show a partition's later batch an instant before the first one. Without a mark, the
first batch applied sets the mark, so records before it would never be applied: lost from storage
(seen once in `test_redis_restarted_or_wiped_under_load[wipe]`: the first message of each replayed
partition)."""

from __future__ import annotations

import aiomysql
import redis.asyncio as aioredis
from aiokafka import TopicPartition

from persister.service import Persister
from shared.kafka import ensure_topic, new_consumer
from shared.keys import Keys
from shared.message import Message
from shared.mover import Mover
from shared.rooms import RoomDirectory
from shared.settings import Settings
from tests.support import produce_messages

ROOM = "replayed-room"


async def test_a_replay_from_the_log_start_does_not_start_at_a_later_batch(
        migrated: Settings, redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    settings = migrated
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    tp = TopicPartition(settings.kafka_topic, keys.partition(ROOM))
    await ensure_topic(settings)
    await produce_messages(settings, tp, ROOM, 5)
    rooms = RoomDirectory(mysql)
    persister = Persister(settings, redis, Mover(redis, mysql, keys, rooms), rooms)
    persister.consumer = consumer = new_consumer(settings)
    await consumer.start()
    try:
        consumer.assign([tp])
        await persister.rewind(tp, None)  # as after a wiped Redis: no mark, replay from the start
        records = (await consumer.getmany(tp, timeout_ms=5000))[tp]
        assert [r.offset for r in records] == [0, 1, 2, 3, 4]

        await persister.apply_all({tp: records[1:]})  # a fetch that showed the second batch first

        assert await redis.llen(keys.msgs(ROOM)) == 0, "nothing applied past the missing first record"
        assert await redis.get(keys.applied(tp.partition)) is None
        assert await consumer.position(tp) == 0, "read again from the log's start"

        await persister.apply_all({tp: records})

        stored = await redis.lrange(keys.msgs(ROOM), 0, -1)
        assert [Message.from_entry(e).id for e in stored] == ["ID0", "ID1", "ID2", "ID3", "ID4"]
        assert await redis.get(keys.applied(tp.partition)) == b"4"
    finally:
        await consumer.stop()
