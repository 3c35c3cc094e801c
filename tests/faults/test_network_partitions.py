"""Network partitions, not resets: a service cut from Kafka by a blackhole (its packets go
unanswered: no reset, no error, only its own timeouts tell), for longer than the request timeout,
under load; and latency on the MySQL path. The service runs in a host of its own on the fault
tests' network (an Outpost), its Redis and MySQL reachable through proxies, Kafka not."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomysql
import pytest
import redis.asyncio as aioredis
from roomcast_client import RoomcastClient

from shared.mysql import MysqlTarget
from shared.settings import Settings
from tests.faults.conftest import Kafka3, Outpost
from tests.faults.harness import Allow, Load, applied_to_the_end, run_load_through, small
from tests.faults.proxy import TcpProxy
from tests.support import Cluster, eventually, token
from tools.checker import Copy, check_delivery
from tools.services import scrape

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

CUT_S = 12.0  # past the request timeout (5 s) and the produce timeout (10 s)


def ready(http: str) -> bool:
    try:
        with urllib.request.urlopen(f"{http}/readyz", timeout=3) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class Resumer:
    """A member that leaves a room and comes back with its cursor while a fault is on: what it
    received is checked like any member's (every frame, as sent)."""

    def __init__(self, settings: Settings, url: str, room: str) -> None:
        self.room, self.frames, self.cursor = room, list[Copy](), ""
        self.settings, self.url = settings, url
        self.client: RoomcastClient | None = None
        self.joined: dict[str, Any] = {}

    def _record(self, frame: dict[str, Any]) -> None:
        if frame.get("type") == "message":
            self.frames.append(Copy.from_frame(frame))

    async def leave(self) -> None:
        async with RoomcastClient(self.url, token(self.settings, "resumer")) as c:
            self.cursor = (await c.join(self.room))["cursor"]

    async def resume(self) -> None:
        self.client = RoomcastClient(self.url, token(self.settings, "resumer"), on_frame=self._record,
                                     on_message=lambda _: None, request_timeout=30)
        await self.client.start()
        joined = self.joined = await self.client.join(self.room, self.cursor)
        assert joined["recovered"] is True, joined

    def check(self, load: Load) -> None:
        report = check_delivery(load.acked, {"resumer": {self.room: self.frames}},
                                {"resumer": {self.room: self.cursor}}, unacked=load.unacked)
        assert report.ok, f"the resumed member: {report}"

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


@pytest.fixture
def cluster(migrated: Settings, kafka3: Kafka3, outpost: Outpost, log_dir: Path) -> Iterator[Cluster]:
    """Gateway 0 in the outpost, gateway 1 and the persister beside Kafka."""
    settings = small(kafka3.settings(migrated))
    c = Cluster(settings, log_dir)
    c.add_gateway(outpost.settings(settings), wrap=outpost.wrap)
    c.add_gateway()
    c.start_persister()
    yield c
    c.stop()


async def test_a_gateway_cut_from_kafka_refuses_sends_says_not_ready_and_delivers_everything_after(
        cluster: Cluster, kafka3: Kafka3, outpost: Outpost, redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    """Its sends wait out the produce timeout and are refused `unavailable` (the client sends them
    again: each is acked once in the end), /readyz says 503 while the producer fails, and its
    clients miss nothing: the fan-out picks up where it stopped."""
    async def cut_gateway_0() -> None:
        kafka3.cut_from(outpost.host)
        t0 = time.monotonic()

        async def not_ready() -> bool:
            return not await asyncio.to_thread(ready, cluster.http(0))

        await eventually(not_ready, CUT_S + 10, what="the cut gateway saying it is not ready")
        await asyncio.sleep(max(0.0, CUT_S - (time.monotonic() - t0)))
        kafka3.reach(outpost.host)

        async def ready_again() -> bool:
            return await asyncio.to_thread(ready, cluster.http(0))

        await eventually(ready_again, 60, what="the gateway ready again")

    # Refused while cut, and up to a claim's TTL after (a resend waits for a send still pending).
    load = await run_load_through(cluster, cut_gateway_0, redis, mysql, Allow(refusals=1000, grace_s=30.0))
    assert load.outcomes()["refusals:unavailable"] > 0, "the cut gateway's sends were refused meanwhile"


@pytest.fixture
def persister_cut_off(migrated: Settings, kafka3: Kafka3, outpost: Outpost, log_dir: Path) -> Iterator[Cluster]:
    """Two gateways beside Kafka, the persister in the outpost."""
    settings = small(kafka3.settings(migrated))
    c = Cluster(settings, log_dir).start(persister=False)
    c.start_persister(outpost.settings(settings), wrap=outpost.wrap)
    yield c
    c.stop()


async def test_a_persister_cut_from_kafka_catches_up_and_meanwhile_a_resume_reads_the_gap_from_the_log(
        persister_cut_off: Cluster, kafka3: Kafka3, outpost: Outpost, redis: aioredis.Redis,
        mysql: aiomysql.Pool) -> None:
    cluster = persister_cut_off
    resumer = Resumer(cluster.settings, cluster.url(1), "room-0")
    await resumer.leave()

    async def cut_the_persister() -> None:
        kafka3.cut_from(outpost.host)
        t0 = time.monotonic()
        await asyncio.sleep(2)  # messages it never applies
        before = cluster.resumed(1)
        await resumer.resume()  # (waits RECOVERY_WAIT_S for the persister, then reads the log)
        assert (cluster.resumed(1) - before)["kafka"] > 0, "what the persister had not applied came from the log"
        await asyncio.sleep(max(0.0, CUT_S - (time.monotonic() - t0)))
        kafka3.reach(outpost.host)

    try:
        load = await run_load_through(cluster, cut_the_persister, redis, mysql, Allow())  # (sends never wait for it)
        resumer.check(load)
        await applied_to_the_end(cluster.settings, redis)
        assert cluster.persister is not None and cluster.persister.alive
    finally:
        await resumer.close()


@pytest.fixture
async def slow_mysql(migrated: Settings, log_dir: Path) -> AsyncIterator[tuple[Cluster, TcpProxy]]:
    """Every service reaches MySQL through a proxy that can add latency."""
    target = MysqlTarget.from_dsn(migrated.mysql_dsn)
    proxy = await TcpProxy(target.host, target.port).start()
    settings = small(migrated, mysql_dsn=f"mysql://{target.user}:{target.password}@127.0.0.1:{proxy.port}/"
                                         f"{target.database}")
    c = Cluster(settings, log_dir).start()
    try:
        yield c, proxy
    finally:
        c.stop()
        await proxy.close()


async def test_latency_on_the_mysql_path_slows_flushes_and_resumes_and_loses_nothing(
        slow_mysql: tuple[Cluster, TcpProxy], redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    cluster, proxy = slow_mysql
    latency = 0.2  # each way, per chunk: a MySQL round trip takes 0.4 s or more
    resumer = Resumer(cluster.settings, cluster.url(0), "room-0")
    await resumer.leave()

    async def slow_down_mysql() -> None:
        proxy.latency = latency
        metrics = f"http://127.0.0.1:{cluster.persister_metrics}/metrics"
        flushed = (await asyncio.to_thread(scrape, metrics))["roomcast_persister_flushed_messages_total"]

        async def flushed_through_it() -> bool:  # (and a chunk of room-0, part of the resumer's gap)
            now = (await asyncio.to_thread(scrape, metrics))["roomcast_persister_flushed_messages_total"]
            async with mysql.acquire() as conn, conn.cursor() as cur:
                await cur.execute("SELECT COUNT(*) FROM messages m JOIN rooms r ON r.id = m.room_id "
                                  "WHERE r.name = %s", (resumer.room,))
                (archived,) = await cur.fetchone()
            return now >= flushed + 3 * cluster.settings.flush_chunk and archived >= cluster.settings.flush_chunk

        await eventually(flushed_through_it, 60, what="flushes through the slow path")
        before, t0 = cluster.resumed(0), time.monotonic()
        await resumer.resume()
        took = time.monotonic() - t0
        served = cluster.resumed(0) - before
        assert served["mysql"] > 0, (f"the older part of the gap came from MySQL: {served}, from {resumer.cursor}: "
                                     f"{resumer.joined}, {len(resumer.frames)} frames")
        assert took >= 2 * latency, f"the resume read MySQL through the slow path ({took:.2f} s)"
        proxy.latency = 0.0

    try:
        load = await run_load_through(cluster, slow_down_mysql, redis, mysql, Allow())  # (sends never touch MySQL)
        resumer.check(load)
    finally:
        await resumer.close()
