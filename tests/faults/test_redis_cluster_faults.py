"""A Redis Cluster primary killed under load: its replica is promoted (asynchronous replication, so
it may lack the newest appends, marks and send claims) and nothing acknowledged is lost, stored or
delivered twice: the persister sees its applied mark go back and replays that from Kafka."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiomysql
import pytest
from redis.exceptions import RedisError

from shared.keys import Keys
from shared.redisconn import connect
from shared.settings import Settings
from tests.faults.harness import Allow, run_load_through, small
from tests.support import Cluster
from tools import localstack

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


@pytest.fixture
def redis_cluster(tmp_path: Path, log_dir: Path) -> Iterator[list[localstack.Proc]]:
    ports = localstack.free_ports(12)
    procs = localstack.start_redis_cluster(list(zip(ports[:6], ports[6:], strict=True)), tmp_path, log_dir)
    yield procs
    for proc in procs:
        proc.stop()


async def test_a_primary_killed_and_its_replica_promoted_loses_nothing(
        migrated: Settings, redis_cluster: list[localstack.Proc], log_dir: Path, mysql: aiomysql.Pool) -> None:
    settings = small(migrated, redis_url=f"redis://127.0.0.1:{redis_cluster[0].ports[0]}/0", redis_cluster=True)
    redis = connect(settings, timeout_s=5, connect_timeout_s=3)
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    cluster = Cluster(settings, log_dir).start()

    async def kill_the_primary_of_room_0() -> None:
        await redis.initialize()  # type: ignore[attr-defined]
        node = redis.get_node_from_key(keys.msgs("room-0"))  # type: ignore[attr-defined]
        victim = next(p for p in redis_cluster if p.ports[0] == node.port)
        victim.kill()

        async def promoted() -> bool:
            try:
                await redis.nodes_manager.initialize()  # type: ignore[attr-defined]  (the slot map, anew)
                return bool(redis.get_node_from_key(keys.msgs("room-0")).port != node.port)  # type: ignore[attr-defined]
            except RedisError:  # the slot is uncovered until a replica takes over
                return False

        deadline = asyncio.get_running_loop().time() + 30
        while not await promoted():
            assert asyncio.get_running_loop().time() < deadline, "no replica was promoted"
            await asyncio.sleep(0.5)

    try:
        # Sends to the dead primary's slots are refused until its replica takes over (29 in a run).
        await run_load_through(cluster, kill_the_primary_of_room_0, redis, mysql, Allow(refusals=300))
    finally:
        cluster.stop()
        await redis.aclose()
