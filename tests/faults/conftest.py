"""The fault tests' Kafka: three nodes (RF 3, min ISR 2, no unclean election), each a host in a
network namespace of its own so a test can cut one off the network, shared by the fault tests of
a session. A test that breaks it leaves it mended (`kafka3` heals it afterwards)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from shared.mysql import MysqlTarget
from shared.settings import Settings
from tests.faults.netns import HostNet
from tests.faults.proxy import TcpProxy
from tools.localkafka import KafkaCluster, KafkaNode

# Faster failure detection than production's defaults (9 s broker session, 30 s replica lag), so
# a failover takes ~3 s and fits inside a producer request timeout of 5 s. Production keeps the
# defaults: there a failover can refuse sends for longer, and clients resend (docs: deploy/README).
FAULT_BROKER = {
    "broker.session.timeout.ms": "3000",
    "broker.heartbeat.interval.ms": "500",
    "replica.lag.time.max.ms": "5000",
}


@dataclass
class Kafka3:
    cluster: KafkaCluster
    net: HostNet
    cut: set[int] = field(default_factory=set)
    silent_towards: set[int] = field(default_factory=set)  # hosts every node drops its packets to

    @property
    def bootstrap(self) -> str:
        return self.cluster.bootstrap

    def settings(self, base: Settings) -> Settings:
        return base.model_copy(update={"kafka_bootstrap": self.bootstrap, "kafka_replication": 3})

    def cut_off(self, node_id: int) -> None:
        self.net.cut(node_id)
        self.cut.add(node_id)

    def rejoin(self, node_id: int) -> None:
        self.net.join(node_id)
        self.cut.discard(node_id)

    def cut_from(self, host: int) -> None:
        """A partition between Kafka and one host of the network (an Outpost): every node drops what
        it sends there, so the host's connects and requests go unanswered (no reset, no error)."""
        for node in self.cluster.nodes:
            self.net.blackhole(node.node_id, host)
        self.silent_towards.add(host)

    def reach(self, host: int) -> None:
        for node in self.cluster.nodes:
            self.net.unblackhole(node.node_id, host)
        self.silent_towards.discard(host)

    async def leader_of(self, tp: TopicPartition) -> int:
        """The node leading `tp` now (asked again until the cluster names one)."""
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(KafkaError):  # (a node that just died may still be asked)
                for p in await self._partitions(tp.topic):
                    if p["partition"] == tp.partition and p["leader"] in self.alive():
                        return int(p["leader"])
            if time.monotonic() > deadline:
                raise AssertionError(f"no leader for {tp}:\n{self.cluster.describe()}")
            await asyncio.sleep(0.2)

    async def wait_isr(self, tp: TopicPartition, size: int, timeout: float = 30.0) -> None:
        """Until `tp`'s in-sync replicas are `size` (a dead node is dropped once it is fenced)."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(KafkaError):
                if any(p["partition"] == tp.partition and len(p["isr"]) == size  # type: ignore[arg-type]
                       for p in await self._partitions(tp.topic)):
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{tp} ISR never {size}:\n{self.cluster.describe()}")
            await asyncio.sleep(0.2)

    async def wait_in_sync(self, topic: str, timeout: float = 60.0) -> None:
        """Until every partition of `topic` has all three replicas in sync."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(KafkaError):
                if all(len(p["isr"]) == 3 for p in await self._partitions(topic)):  # type: ignore[arg-type]
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic} not in sync after {timeout}s:\n{self.cluster.describe()}")
            await asyncio.sleep(0.3)

    def alive(self) -> set[int]:
        return {n.node_id for n in self.cluster.nodes if self.cluster.running(n.node_id) and n.node_id not in self.cut}

    async def _partitions(self, topic: str) -> list[dict[str, object]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=",".join(self.cluster.node(i).address for i in self.alive()),
                                    request_timeout_ms=5000)
        await admin.start()
        try:
            [described] = await admin.describe_topics([topic])
            return list(described["partitions"])
        finally:
            await admin.close()

    def heal(self) -> None:
        for node_id in list(self.cut):
            self.rejoin(node_id)
        for host in list(self.silent_towards):
            self.reach(host)
        for node in self.cluster.nodes:
            if not self.cluster.running(node.node_id):
                self.cluster.start_node(node.node_id)


@pytest.fixture(scope="session")
def kafka3_session(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[Kafka3]:
    net = HostNet(3).up()
    base = tmp_path_factory.mktemp("kafka3")
    nodes = [KafkaNode(i, 9092, 9093, base / f"node-{i}", host=net.address(i), netns=net.namespace(i))
             for i in range(1, 4)]
    cluster = KafkaCluster(nodes, base, log_dir, heap="384m", extra=FAULT_BROKER)
    try:
        cluster.start()
        yield Kafka3(cluster, net)
    finally:
        cluster.stop()
        net.down()


@pytest.fixture
async def kafka3(kafka3_session: Kafka3) -> AsyncIterator[Kafka3]:
    """The three-node cluster, whole again after the test (nodes started, links up)."""
    kafka3_session.heal()
    yield kafka3_session
    await asyncio.to_thread(kafka3_session.heal)


@dataclass
class Outpost:
    """A host of its own on the fault tests' network, for a service to run in (`wrap` its command):
    it reaches Kafka over the network, and Redis and MySQL through proxies in the root namespace, so
    Kafka can be cut from it alone (`kafka.cut_from(outpost.host)`) while its stores stay reachable."""

    kafka: Kafka3
    host: int
    redis: TcpProxy
    mysql: TcpProxy

    @property
    def address(self) -> str:
        return self.kafka.net.address(self.host)

    @property
    def wrap(self) -> list[str]:
        return ["ip", "netns", "exec", self.kafka.net.namespace(self.host)]

    def settings(self, base: Settings) -> Settings:
        """`base` (the fault tests' Kafka already) for a service in this host."""
        mysql = MysqlTarget.from_dsn(base.mysql_dsn)
        via = self.kafka.net.bridge_address
        return base.model_copy(update={
            "host": self.address, "redis_url": f"redis://{via}:{self.redis.port}/{urlsplit(base.redis_url).path[1:]}",
            "mysql_dsn": f"mysql://{mysql.user}:{mysql.password}@{via}:{self.mysql.port}/{mysql.database}"})


@pytest.fixture
async def outpost(kafka3: Kafka3, migrated: Settings) -> AsyncIterator[Outpost]:
    """A new host on the fault tests' network, with proxies to this test's Redis and MySQL."""
    redis_at, mysql_at = urlsplit(migrated.redis_url), MysqlTarget.from_dsn(migrated.mysql_dsn)
    via = kafka3.net.bridge_address
    redis = await TcpProxy(redis_at.hostname or "127.0.0.1", redis_at.port or 6379, host=via).start()
    mysql = await TcpProxy(mysql_at.host, mysql_at.port, host=via).start()
    host = await asyncio.to_thread(kafka3.net.add_host)
    try:
        yield Outpost(kafka3, host, redis, mysql)
    finally:
        kafka3.reach(host)
        kafka3.net.remove_host(host)
        await redis.close()
        await mysql.close()
