"""The Redis client every service uses: one server, or a Redis Cluster (REDIS_CLUSTER=true, with
REDIS_URL naming any of its nodes).

Every key a script or a batch touches carries its Kafka partition's hash tag (shared.keys), so
each script call stays in one slot and runs unchanged on a cluster. What differs is batching: a
cluster client's pipeline refuses scripts, so there the calls of a batch go out concurrently (each
to its slot's node) instead of in one pipeline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from shared.settings import Settings


def connect(settings: Settings, *, timeout_s: float, connect_timeout_s: float) -> aioredis.Redis:
    if settings.redis_cluster:
        cluster = RedisCluster.from_url(settings.redis_url, socket_timeout=timeout_s,
                                        socket_connect_timeout=connect_timeout_s)
        # (the commands and scripts roomcast uses have the same API on both clients)
        return cast(aioredis.Redis, cluster)
    # Blocking: a burst (thousands of clients joining after a gateway died) waits for a connection
    # rather than failing with MaxConnectionsError past the pool's size.
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=settings.redis_pool_max, timeout=timeout_s,
        socket_timeout=timeout_s, socket_connect_timeout=connect_timeout_s)
    return aioredis.Redis.from_pool(pool)


def is_cluster(redis: aioredis.Redis) -> bool:
    return isinstance(redis, RedisCluster)


async def run_scripts(redis: aioredis.Redis, calls: Sequence[tuple[AsyncScript, list[str], list[Any]]]) -> list[Any]:
    """Each (script, keys, args) call, in one round trip: a pipeline (no MULTI: each script is
    atomic on its own) on one server, concurrent calls on a cluster. Results in call order."""
    if len(calls) == 1 or is_cluster(redis):
        return list(await asyncio.gather(*(script(keys=keys, args=args) for script, keys, args in calls)))
    async with redis.pipeline(transaction=False) as pipe:
        for script, keys, args in calls:
            await script(keys=keys, args=args, client=pipe)
        return list(await pipe.execute())
