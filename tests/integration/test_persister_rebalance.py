"""A rebalance can revoke a partition while the persister's consume loop awaits Redis (a Redis
restart makes that wait seconds long). Afterwards the loop must let the partition go: neither
crash on it (a persister died so in the chaos fault test, with a KeyError) nor take it back."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiomysql
import pytest
import redis.asyncio as aioredis
from aiokafka import TopicPartition

from persister.service import Persister
from shared.kafka import Fetched, ensure_topic, fetch, new_consumer
from shared.keys import Keys
from shared.settings import Settings
from shared.store.mover import Mover
from shared.store.rooms import RoomDirectory
from tests.support import produce_messages

ROOM = "rebalanced-room"


@pytest.fixture
async def persister(migrated: Settings, redis: aioredis.Redis, mysql: aiomysql.Pool) -> AsyncIterator[Persister]:
    settings = migrated
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    rooms = RoomDirectory(mysql)
    p = Persister(settings, redis, Mover(redis, mysql, keys, rooms), rooms, new_consumer(settings))
    await ensure_topic(settings)
    await p.consumer.start()
    tp = TopicPartition(settings.kafka_topic, keys.partition(ROOM))
    p.consumer.assign([tp])
    await p.take_partitions([tp])
    yield p
    await p.consumer.stop()


def revoking_first(p: Persister, tp: TopicPartition, call: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """`call`, after the partition was revoked, as if a rebalance ran while Redis was awaited."""
    async def revoked_meanwhile(*args: Any) -> Any:
        assert p.consumer is not None
        p.consumer.assign([])
        p.drop_partitions([tp])
        return await call(*args)
    return revoked_meanwhile


def our_partition(p: Persister) -> TopicPartition:
    assert p.consumer is not None
    (tp,) = p.consumer.assignment()
    return tp


async def test_a_mark_check_lets_a_partition_revoked_meanwhile_go(persister: Persister) -> None:
    tp = our_partition(persister)
    assert tp.partition in persister.expected

    async def moved_mark(partition: int) -> int:
        return 41  # not what we expect: the check would rewind a partition it still owned

    persister.buffer.mark = revoking_first(persister, tp, moved_mark)  # type: ignore[method-assign]
    await persister.check_marks()

    assert tp.partition not in persister.expected


async def test_a_write_lets_a_partition_revoked_meanwhile_go(
        persister: Persister, migrated: Settings, redis: aioredis.Redis) -> None:
    tp = our_partition(persister)
    await produce_messages(migrated, tp, ROOM, 3)
    assert persister.consumer is not None
    read = Fetched(tp, [], 0, 0)
    while read.next_offset < 3:  # (the first fetch may bring the first record alone)
        for f in await fetch(persister.consumer, tp, timeout_ms=5000, max_records=None):
            read.messages += f.messages
            read.next_offset = f.next_offset
    assert [m.id for m in read.messages] == ["ID0", "ID1", "ID2"]
    persister.buffer.apply_many = revoking_first(  # type: ignore[method-assign]
        persister, tp, persister.buffer.apply_many)

    await persister.apply_all([read])

    keys = Keys(migrated.redis_prefix, migrated.kafka_partitions)
    assert await redis.get(keys.applied(tp.partition)) == b"2", "the write itself went through, consistently"
    assert tp.partition not in persister.expected, "a revoked partition is not taken back"
