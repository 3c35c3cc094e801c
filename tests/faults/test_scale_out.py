"""Scale-out under load, on the three-node Kafka and a Redis Cluster: from 2 gateways and 1
persister, a third gateway and a second and third persister join; then one of each leaves
(SIGTERM: drained). The removed gateway's clients resume elsewhere, the new gateway serves its
own, nothing is lost, doubled or reordered, and after each rebalance the persisters' lag returns
to near zero. Each rebalance's pause (the longest a partition with records waiting saw its applied
mark stand still) is printed."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiomysql
import pytest
from aiokafka import TopicPartition

from shared.kafka import new_consumer
from shared.keys import Keys
from shared.redisconn import connect
from shared.settings import Settings
from tests.faults.conftest import Kafka3
from tests.faults.harness import Allow, run_load_through, small
from tests.support import Cluster, Peer, token
from tools import localstack, ops
from tools.localstack import Proc
from tools.services import start_persister

pytestmark = [pytest.mark.faults, pytest.mark.timeout(420)]

PARTITIONS = 8


@pytest.fixture
def redis_cluster(tmp_path: Path, log_dir: Path) -> Iterator[list[Proc]]:
    ports = localstack.free_ports(12)
    procs = localstack.start_redis_cluster(list(zip(ports[:6], ports[6:], strict=True)), tmp_path, log_dir)
    yield procs
    for proc in procs:
        proc.stop()


class MarkWatch:
    """Polls every partition's applied mark (Redis) and end offset (Kafka) every 100 ms; a pause is
    how long a partition with records waiting went without its mark moving."""

    def __init__(self, settings: Settings) -> None:
        self.keys = Keys(settings.redis_prefix, settings.kafka_partitions)
        self.redis = connect(settings, timeout_s=5, connect_timeout_s=3)
        self.consumer = new_consumer(settings)
        self.tps = [TopicPartition(settings.kafka_topic, p) for p in range(settings.kafka_partitions)]
        self.longest = 0.0
        self._since: dict[int, float] = {}
        self._last: dict[int, bytes | None] = {}

    async def run(self, stop: asyncio.Event) -> None:
        await self.consumer.start()
        try:
            while not stop.is_set():
                ends = await self.consumer.end_offsets(self.tps)
                marks = await self.redis.mget_nonatomic([self.keys.applied(tp.partition) for tp in self.tps])  # type: ignore[attr-defined]
                now = time.monotonic()
                for tp, mark in zip(self.tps, marks, strict=True):
                    behind = ends[tp] - 1 > (-1 if mark is None else int(mark))
                    if mark != self._last.get(tp.partition) or not behind:
                        self._since[tp.partition] = now
                    self._last[tp.partition] = mark
                    self.longest = max(self.longest, now - self._since.setdefault(tp.partition, now))
                await asyncio.sleep(0.1)
        finally:
            await self.consumer.stop()

    def take(self) -> float:
        longest, self.longest = self.longest, 0.0
        return longest


async def lag_settles(settings: Settings, bound: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        lag = (await ops.gather_stats(settings, 5)).lag_total
        if lag is not None and lag <= bound:
            return lag
        assert time.monotonic() < deadline, f"persister lag {lag} still over {bound} after {timeout}s"
        await asyncio.sleep(0.3)


async def test_gateways_and_persisters_join_and_leave_under_load(
        migrated: Settings, kafka3: Kafka3, redis_cluster: list[Proc], log_dir: Path, mysql: aiomysql.Pool,
        capsys: pytest.CaptureFixture[str]) -> None:
    settings = small(kafka3.settings(migrated), kafka_partitions=PARTITIONS, redis_cluster=True,
                     redis_url=f"redis://127.0.0.1:{redis_cluster[0].ports[0]}/0", drain_grace_s=2.0)
    cluster = Cluster(settings, log_dir).start()
    persisters: list[Proc] = [p for p in [cluster.persister] if p is not None]
    watch = MarkWatch(settings)
    stop_watch = asyncio.Event()
    pauses: list[tuple[str, float, int]] = []

    async def step(what: str, change: object) -> None:
        watch.take()
        await asyncio.to_thread(change)  # type: ignore[arg-type]
        await asyncio.sleep(2)
        lag = await lag_settles(settings, bound=50)
        pauses.append((what, watch.take(), lag))

    def add_persister() -> None:
        n = len(persisters) + 1
        persisters.append(start_persister(settings, log_dir, f"{settings.redis_prefix}-persister{n}",
                                          metrics_port=localstack.free_port()))

    def remove_persister() -> None:
        victim = persisters.pop(0)
        victim.popen.send_signal(signal.SIGTERM)
        assert victim.popen.wait(30) == 0, "a persister asked to stop leaves the group cleanly"

    async def scale() -> None:
        await lag_settles(settings, bound=50)  # (the first persister's own join is not a scale-out step)
        await step("gateway 3 joins", cluster.add_gateway)
        newcomer = await Peer.connect(cluster.url(2), token(settings, "newcomer"))
        try:
            await newcomer.join("room-0")
            await newcomer.wait_for(lambda f: f["type"] == "message", timeout=10)  # the new node fans out
        finally:
            await newcomer.close()
        await step("persister 2 joins", add_persister)
        await step("persister 3 joins", add_persister)

        def remove_gateway() -> None:
            victim, _ = cluster.gateways.pop(0), cluster.hosts.pop(0)
            victim.popen.send_signal(signal.SIGTERM)
            victim.popen.wait(30)

        await step("gateway 1 leaves (drained)", remove_gateway)
        await step("persister 1 leaves", remove_persister)

    watcher = asyncio.create_task(watch.run(stop_watch))
    try:
        # (a send in flight on the gateway being drained may be refused: 1 in a run)
        load = await run_load_through(cluster, scale, watch.redis, mysql, Allow(refusals=20), rate=5.0)
        assert sum(m.client.reconnects for m in load.members) > 0, "the drained gateway's clients moved"
    finally:
        stop_watch.set()
        await watcher
        await watch.redis.aclose()
        for proc in persisters:
            proc.stop()
        cluster.stop()
    with capsys.disabled():
        for what, pause, lag in pauses:
            print(f"\nscale-out: {what}: longest pause of a partition's applied mark {pause:.1f} s, "
                  f"lag after {lag} records")
