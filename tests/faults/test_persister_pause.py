"""Two persisters, and one of them paused (SIGSTOP: a long GC pause, a frozen VM, a stopped
container) for longer than its group session, under load: the group hands its partitions to the
other, which applies on from the stored marks. The paused one had a batch on its way to Redis
(held up in the network here: its Redis is behind a proxy the test blackholes, so the write is
in flight for sure), which Redis gets only after the other persister moved the partition's mark:
it must be refused (APPLY_BATCH compares the stored applied mark with the one the writer expects),
and the woken persister must rejoin the group. Nothing is lost or doubled in Redis or MySQL, nor
delivered twice."""

from __future__ import annotations

import asyncio
import hashlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiomysql
import pytest
import redis.asyncio as aioredis

from shared.settings import Settings
from shared.store.buffer import APPLY_BATCH
from tests.faults.harness import Allow, run_load_through, small
from tests.faults.proxy import TcpProxy
from tests.support import Cluster, eventually
from tools import localstack
from tools.localstack import Proc
from tools.services import scrape, start_persister

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

APPLY_SHA = hashlib.sha1(APPLY_BATCH.encode()).hexdigest().encode()  # (what EVALSHA and SCRIPT EXISTS name)


class Persister:
    def __init__(self, settings: Settings, log_dir: Path, name: str) -> None:
        self.port = localstack.free_port()
        self.proc: Proc = start_persister(settings, log_dir, f"{settings.redis_prefix}-{name}", metrics_port=self.port)

    async def metric(self, name: str) -> float:
        return (await asyncio.to_thread(scrape, f"http://127.0.0.1:{self.port}/metrics")).get(name, 0.0)

    async def owns(self) -> int:
        return int(await self.metric("roomcast_persister_partitions"))


@pytest.fixture
async def cluster(migrated: Settings, log_dir: Path) -> AsyncIterator[Cluster]:
    c = Cluster(small(migrated), log_dir).start(persister=False)
    yield c
    c.stop()


async def test_a_paused_persisters_write_is_refused_when_it_lands_and_nothing_is_lost_or_doubled(
        cluster: Cluster, log_dir: Path, redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    s = cluster.settings
    redis_at = urlsplit(s.redis_url)
    proxy = await TcpProxy(redis_at.hostname or "127.0.0.1", redis_at.port or 6379).start()
    via_proxy = f"redis://127.0.0.1:{proxy.port}{redis_at.path}"
    stale = Persister(s.model_copy(update={"redis_url": via_proxy}), log_dir, "persister-a")
    other = Persister(s, log_dir, "persister-b")
    try:
        async def both_own_some() -> bool:
            a, b = await stale.owns(), await other.owns()
            return a > 0 and b > 0 and a + b == s.kafka_partitions

        await eventually(both_own_some, 60, what="both persisters owning partitions")

        async def pause_with_a_write_in_flight() -> None:
            fenced = await stale.metric("roomcast_persister_fenced_batches_total")
            proxy.blackhole()

            async def a_write_on_its_way() -> bool:
                return any(APPLY_SHA in chunk for chunk in proxy.held)

            await eventually(a_write_on_its_way, 30, every=0.01, what="the persister's next batch held up")
            stale.proc.popen.send_signal(signal.SIGSTOP)
            try:
                async def other_owns_all() -> bool:
                    return await other.owns() == s.kafka_partitions

                await eventually(other_owns_all, 60, what="the group moving every partition to the other")
                applied = await other.metric("roomcast_persister_applied_total")

                async def other_applied_on() -> bool:  # (so every mark the paused one expects is stale)
                    return await other.metric("roomcast_persister_applied_total") >= applied + 4 * s.kafka_partitions

                await eventually(other_applied_on, 30, what="the other persister applying on")
                await proxy.restore()  # the stale write reaches Redis now
            finally:
                stale.proc.popen.send_signal(signal.SIGCONT)

            async def refused_and_rejoined() -> bool:
                refused = await stale.metric("roomcast_persister_fenced_batches_total") > fenced
                return refused and await stale.owns() > 0 and await other.owns() < s.kafka_partitions

            await eventually(refused_and_rejoined, 60, what="the stale write refused, and the woken persister back")

        await run_load_through(cluster, pause_with_a_write_in_flight, redis, mysql, Allow())  # (sends never wait)
        assert stale.proc.alive and other.proc.alive
    finally:
        for p in (stale, other):
            p.proc.popen.send_signal(signal.SIGCONT)
            p.proc.stop()
        await proxy.close()
