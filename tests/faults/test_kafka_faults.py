"""Apache Kafka's faults under load, on three nodes (RF 3, min ISR 2): the partition leader killed,
two of three brokers killed, a rolling restart, and a broker cut off the network. Each ends with
nothing acknowledged lost, nothing stored or delivered twice, and each room's order kept (the
checker, against what the clients were acknowledged)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiomysql
import pytest
import redis.asyncio as aioredis
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from shared.kafka import new_consumer
from shared.keys import Keys
from shared.settings import Settings
from tests.faults.conftest import Kafka3
from tests.faults.harness import Allow, run_load_through, small
from tests.support import Cluster, Peer, token
from tools.checker import Unacked, check_storage, stored_messages


async def set_topic_config(kafka3: Kafka3, topic: str, name: str, value: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka3.bootstrap)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, {name: value})])
    finally:
        await admin.close()


async def end_offset(settings: Settings, tp: TopicPartition) -> int:
    consumer = new_consumer(settings)
    await consumer.start()
    try:
        return int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

# What each fault may cost the senders (refusals: `unavailable` answers, each within the fault's window;
# the client sends a refused send again, and every send must end acked). Measured in one run each:
# leader killed 0 (the producer retries on the new leader within its timeout), two of three killed 506,
# rolling restart 0 (controlled shutdowns move leaders first), leader cut off 12.
ALLOW_LEADER_KILLED = Allow()
ALLOW_TWO_KILLED = Allow(refusals=2000)
ALLOW_ROLLING_RESTART = Allow()
ALLOW_LEADER_CUT_OFF = Allow(refusals=300)


@pytest.fixture
def cluster(migrated: Settings, kafka3: Kafka3, log_dir: Path) -> Iterator[Cluster]:
    c = Cluster(small(kafka3.settings(migrated)), log_dir).start()
    yield c
    c.stop()


def busiest_partition(settings: Settings) -> TopicPartition:
    """The partition of the load's first room (the harness's rooms are room-0 .. room-3)."""
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    return TopicPartition(settings.kafka_topic, keys.partition("room-0"))


async def test_the_partition_leader_killed_under_load_loses_nothing(
        cluster: Cluster, kafka3: Kafka3, redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    tp = busiest_partition(cluster.settings)
    async def kill_the_leader() -> None:
        leader = await kafka3.leader_of(tp)
        kafka3.cluster.kill(leader)
        assert await kafka3.leader_of(tp) != leader, "another replica took over"
        await asyncio.sleep(2)
        await asyncio.to_thread(kafka3.cluster.start_node, leader)

    await run_load_through(cluster, kill_the_leader, redis, mysql, ALLOW_LEADER_KILLED)
    await kafka3.wait_in_sync(tp.topic)


async def test_two_of_three_brokers_killed_refuse_sends_and_traffic_resumes_when_one_returns(
        cluster: Cluster, kafka3: Kafka3, redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    async def kill_two() -> None:
        leader = await kafka3.leader_of(busiest_partition(cluster.settings))
        other = next(n for n in (1, 2, 3) if n != leader)
        for node in (leader, other):
            kafka3.cluster.kill(node)
        peer = await Peer.connect(cluster.url(1), token(cluster.settings, "probe"))
        try:
            # (a room of its own: a refused send may still be written once the replicas are back)
            await peer.send({"type": "send", "room": "probe", "client_msg_id": "probe-1", "body": "alone?"})
            answer = await peer.wait_for(lambda f: f["type"] in ("ack", "error"), timeout=20)
            assert (answer["type"], answer["code"]) == ("error", "unavailable"), answer
        finally:
            await peer.close()
        await asyncio.sleep(2)
        await asyncio.to_thread(kafka3.cluster.start_node, other)

    # Every send is acknowledged in the end (the client sends a refused one again); the refusals all
    # come while one broker is alive, or from produces caught by the kill (failed by the timeout).
    load = await run_load_through(cluster, kill_two, redis, mysql, ALLOW_TWO_KILLED)
    assert load.outcomes()["refusals:unavailable"] > 0, "sends were refused (unavailable) while one broker was alive"
    # The probe's refused send may still have been written when the replicas came back: once at most.
    keys = Keys(cluster.settings.redis_prefix, cluster.settings.kafka_partitions)
    probe = check_storage([], {"probe": await stored_messages(redis, mysql, keys, "probe")},
                          [Unacked("probe", "probe", "probe-1", "alone?", "unavailable")])
    assert probe.ok, f"the probe's refused send: {probe}"


async def test_too_few_in_sync_replicas_refuse_a_send_with_unavailable_never_an_ack(
        cluster: Cluster, kafka3: Kafka3) -> None:
    """NOT_ENOUGH_REPLICAS: the topic wants three copies of every record (min ISR 3 here) and one
    node is down; the controller is alive, so the leader refuses the write: the client is told
    `unavailable` and gets no ack; the record is not in the log."""
    settings = cluster.settings
    await set_topic_config(kafka3, settings.kafka_topic, "min.insync.replicas", "3")
    peer = await Peer.connect(cluster.url(0), token(settings, "ann"))
    try:
        await peer.join("room-0")
        tp = busiest_partition(settings)
        leader = await kafka3.leader_of(tp)
        victim = next(n for n in (1, 2, 3) if n != leader)
        kafka3.cluster.kill(victim)
        await kafka3.wait_isr(tp, 2)
        await peer.send({"type": "send", "room": "room-0", "client_msg_id": "k-1", "body": "not now"})
        refused = await peer.wait_for(lambda f: f["type"] in ("ack", "error"), timeout=20)
        assert (refused["type"], refused["code"], refused["ref"]) == ("error", "unavailable", "k-1"), refused
        assert await end_offset(settings, tp) == 0, "nothing was written"
    finally:
        await peer.close()


async def test_a_rolling_restart_under_load_loses_nothing(
        cluster: Cluster, kafka3: Kafka3, redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    topic = cluster.settings.kafka_topic

    async def roll() -> None:
        for node in (1, 2, 3):
            await asyncio.to_thread(kafka3.cluster.stop_node, node)  # controlled shutdown
            await asyncio.to_thread(kafka3.cluster.start_node, node)
            await kafka3.wait_in_sync(topic)

    await run_load_through(cluster, roll, redis, mysql, ALLOW_ROLLING_RESTART)


async def test_a_leader_cut_off_the_network_loses_nothing(
        cluster: Cluster, kafka3: Kafka3, redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    tp = busiest_partition(cluster.settings)

    async def partition_the_leader() -> None:
        leader = await kafka3.leader_of(tp)
        kafka3.cut_off(leader)  # no reset: its connections hang until the clients' timeouts
        assert await kafka3.leader_of(tp) != leader, "the others elected a new leader"
        await asyncio.sleep(8)
        kafka3.rejoin(leader)

    await run_load_through(cluster, partition_the_leader, redis, mysql, ALLOW_LEADER_CUT_OFF)
    await kafka3.wait_in_sync(tp.topic)
