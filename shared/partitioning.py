"""Which Kafka partition a room lives in: the Kafka default partitioner (murmur2 of the key).

The gateway produces with key=room and lets the client library pick the partition; the persister,
the sweeper and the Redis key schema must agree with that choice, so all of them ask this module.
"""

from __future__ import annotations

from functools import lru_cache

from aiokafka.partitioner import murmur2


@lru_cache(maxsize=65536)
def partition_of(room: str, partitions: int) -> int:
    return (murmur2(room.encode()) & 0x7FFFFFFF) % partitions
