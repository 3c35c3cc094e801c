"""tools.localkafka: the broker's configuration (pure), and a real node from Kafka's jars that keeps
what it acknowledged through a kill -9 and a restart on its data."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tools import localstack as ls
from tools.localkafka import KafkaCluster, KafkaNode, broker_properties, kafka_version, new_cluster_id

pytestmark = pytest.mark.timeout(180)


def nodes(n: int) -> list[KafkaNode]:
    return [KafkaNode(i, 9090 + 2 * i, 9091 + 2 * i, Path(f"/d/{i}")) for i in range(1, n + 1)]


def test_one_node_replicates_nothing_and_three_keep_two_copies_of_every_ack() -> None:
    (one,) = nodes(1)
    single = broker_properties(one, [one])
    assert single["controller.quorum.voters"] == "1@127.0.0.1:9093"
    assert (single["default.replication.factor"], single["min.insync.replicas"]) == ("1", "1")
    three = nodes(3)
    props = broker_properties(three[1], three)
    assert props["controller.quorum.voters"] == "1@127.0.0.1:9093,2@127.0.0.1:9095,3@127.0.0.1:9097"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:9094,CONTROLLER://127.0.0.1:9095"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9094"
    assert (props["default.replication.factor"], props["min.insync.replicas"]) == ("3", "2")
    assert props["offsets.topic.replication.factor"] == props["transaction.state.log.replication.factor"] == "3"
    assert props["unclean.leader.election.enable"] == "false"
    assert props["auto.create.topics.enable"] == "false"
    assert broker_properties(three[0], three, {"min.insync.replicas": "3"})["min.insync.replicas"] == "3"


def test_cluster_ids_look_like_kafkas_and_the_version_is_the_poms() -> None:
    ids = {new_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", i) and not i.startswith("-") for i in ids)
    assert re.fullmatch(r"\d+\.\d+\.\d+", kafka_version())


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[KafkaCluster]:
    ports = ls.free_ports(2)
    c = KafkaCluster.local(tmp_path / "kafka", tmp_path / "log", [(ports[0], ports[1])])
    yield c
    c.stop()


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for v in values:
            await producer.send_and_wait(topic, v, partition=0)
    finally:
        await producer.stop()


async def consume(bootstrap: str, topic: str, n: int, group: str | None = None) -> list[bytes]:
    """Read ``n`` records: from the start (no group) or from the group's committed offset."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest",
                                enable_auto_commit=False, session_timeout_ms=2000, heartbeat_interval_ms=300)
    await consumer.start()
    out: list[bytes] = []
    try:
        if group is None:
            consumer.assign([TopicPartition(topic, 0)])
        else:
            consumer.subscribe([topic])
        async with asyncio.timeout(30):
            while len(out) < n:
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    out += [m.value for m in batch if m.value is not None]
        if group is not None:
            await consumer.commit()
    finally:
        await consumer.stop()
    return out


async def test_a_node_keeps_records_and_offsets_through_kill9_and_restart(cluster: KafkaCluster) -> None:
    cluster.start()
    node = cluster.nodes[0]
    with pytest.raises(ls.LocalStackError, match="already in use"):
        KafkaCluster.local(cluster.base.parent / "other", cluster.log_dir, [(node.port, node.controller_port)]).start()
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("t.local", 1, 1)])
    finally:
        await admin.close()
    await produce(cluster.bootstrap, "t.local", [b"a", b"b"])
    assert await consume(cluster.bootstrap, "t.local", 2, group="g") == [b"a", b"b"]  # commits offset 2

    cluster.kill(node.node_id)
    assert not ls.port_open(node.host, node.port)
    cluster.start_node(node.node_id)  # on the same data; formatting again is a no-op
    await produce(cluster.bootstrap, "t.local", [b"c"])
    assert await consume(cluster.bootstrap, "t.local", 3) == [b"a", b"b", b"c"]
    assert await consume(cluster.bootstrap, "t.local", 1, group="g") == [b"c"]  # committed offset kept

    cluster.stop()
    assert not ls.port_open(node.host, node.port)


def test_a_data_folder_of_other_nodes_is_refused(cluster: KafkaCluster) -> None:
    cluster.prepare()
    ports = ls.free_ports(2)
    other = KafkaCluster.local(cluster.base, cluster.log_dir, [(ports[0], ports[1])])
    with pytest.raises(ls.LocalStackError, match=r"remove .* to start afresh"):
        other.prepare()
