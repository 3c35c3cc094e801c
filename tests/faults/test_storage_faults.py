"""Issue 3, faults 3-6 and 9: the persister killed, Redis restarted or wiped, MySQL cut off, services
started before the broker, and a record produced twice (the broker's own faults:
test_kafka_faults.py). Each ends with the checker at 0 lost, 0 duplicated,
0 out of order, against what the clients were acknowledged."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomysql
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from roomcast_client import RoomcastClient

from shared.keys import Keys
from shared.message import Message, new_message_id
from shared.mysql import MysqlTarget
from shared.settings import Settings
from tests.faults.harness import Allow, run_load_through, small
from tests.faults.proxy import TcpProxy
from tests.support import Cluster, Peer, eventually, token
from tools import localstack
from tools.localkafka import KafkaCluster
from tools.services import scrape, start_gateway, start_persister, wait_http_ok

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


@pytest.fixture
def cluster_factory(log_dir: Path) -> Iterator[list[Cluster]]:
    made: list[Cluster] = []
    yield made
    for c in made:
        c.stop()


async def test_persister_killed_mid_batch_and_restarted(
        migrated: Settings, log_dir: Path, cluster_factory: list[Cluster],
        redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    cluster = Cluster(small(migrated), log_dir).start()
    cluster_factory.append(cluster)

    async def kill_and_restart() -> None:
        for _ in range(3):
            assert cluster.persister is not None
            cluster.persister.kill()
            await asyncio.sleep(0.7)
            await asyncio.to_thread(cluster.start_persister)
            await asyncio.sleep(0.7)

    await run_load_through(cluster, kill_and_restart, redis, mysql, Allow())  # sends never wait for it


@pytest.fixture
async def own_redis(tmp_path: Path, log_dir: Path) -> AsyncIterator[tuple[localstack.Proc, int, Path]]:
    port = localstack.free_port()
    proc = localstack.start_redis(port, tmp_path / "redis", log_dir)
    yield proc, port, tmp_path / "redis"
    proc.stop()


@pytest.mark.parametrize("how", ["restart", "wipe"])
async def test_redis_restarted_or_wiped_under_load(
        migrated: Settings, log_dir: Path, cluster_factory: list[Cluster], mysql: aiomysql.Pool,
        own_redis: tuple[localstack.Proc, int, Path], how: str) -> None:
    proc, port, data = own_redis
    settings = small(migrated, redis_url=f"redis://127.0.0.1:{port}/0")
    cluster = Cluster(settings, log_dir).start()
    cluster_factory.append(cluster)
    client = aioredis.from_url(settings.redis_url)
    holder = {"proc": proc}

    async def fault() -> None:
        if how == "restart":  # kill -9 and start again on the same AOF
            holder["proc"].kill()
            await asyncio.sleep(1)
            holder["proc"] = await asyncio.to_thread(localstack.start_redis, port, data, log_dir)
        else:  # everything gone at once: the persister must replay from Kafka
            await client.flushall()

    try:
        # Sends claim their client_msg_id in Redis first: refused `unavailable` while it is down (184
        # refusals in a run); a wipe refuses nothing.
        await run_load_through(cluster, fault, client, mysql, Allow(refusals=800) if how == "restart" else Allow())
    finally:
        if holder["proc"] is not proc:
            holder["proc"].stop()
        await client.aclose()
    if how == "wipe":
        assert cluster.persister is not None
        assert "replaying from Kafka" in cluster.persister.log_path.read_text()


async def test_mysql_cut_off_for_30s_buffers_in_redis_then_catches_up(
        migrated: Settings, log_dir: Path, cluster_factory: list[Cluster],
        redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    target = MysqlTarget.from_dsn(migrated.mysql_dsn)
    proxy = await TcpProxy(target.host, target.port).start()
    via_proxy = f"mysql://{target.user}:{target.password}@127.0.0.1:{proxy.port}/{target.database}"
    settings = small(migrated, mysql_dsn=via_proxy, persister_backlog_budget=300)
    cluster = Cluster(settings, log_dir).start()
    cluster_factory.append(cluster)
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    longest = {"len": 0}

    async def outage() -> None:
        await proxy.cut()
        for _ in range(30):
            await asyncio.sleep(1)
            for room in (f"room-{i}" for i in range(4)):
                longest["len"] = max(longest["len"], await redis.llen(keys.msgs(room)))
        metrics = scrape(f"http://127.0.0.1:{cluster.persister_metrics}/metrics")
        assert metrics["roomcast_persister_flush_errors_total"] > 0
        await proxy.restore()

    try:
        await run_load_through(cluster, outage, redis, mysql, Allow(), rate=8.0)  # sends never touch MySQL
    finally:
        await proxy.close()
    assert longest["len"] > settings.buffer_cap, "Redis kept buffering past the cap while MySQL was away"
    assert cluster.persister is not None
    log = cluster.persister.log_path.read_text()
    assert "pausing consumption" in log and "resuming" in log, "the backlog budget paused consuming"


async def test_services_start_and_chat_and_resume_go_on_while_mysql_is_away(
        migrated: Settings, log_dir: Path, cluster_factory: list[Cluster],
        redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    """A restart during a MySQL outage (a crashed pod, a deploy) must not keep a service down, and
    chat goes on through Kafka and Redis: live delivery, and a resume, whose part older than the
    room's Redis list comes from the log while the archive is away. The archive catches up after."""
    target = MysqlTarget.from_dsn(migrated.mysql_dsn)
    proxy = await TcpProxy(target.host, target.port).start()
    await proxy.cut()  # MySQL refuses every connection
    via_proxy = f"mysql://{target.user}:{target.password}@127.0.0.1:{proxy.port}/{target.database}"
    settings = small(migrated, mysql_dsn=via_proxy)
    cluster = Cluster(settings, log_dir).start()
    cluster_factory.append(cluster)
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    try:
        async with RoomcastClient([cluster.url(0)], token(settings, "ann")) as ann, \
                RoomcastClient([cluster.url(1)], token(settings, "bob")) as bob:
            async with RoomcastClient([cluster.url(1)], token(settings, "cat")) as cat:
                cursor = (await cat.join("lobby"))["cursor"]  # then cat goes away
            await bob.join("lobby")
            await ann.join("lobby")
            sent = [(await ann.send("lobby", f"m{i}"))["id"] for i in range(settings.buffer_cap + 10)]
            assert await next_ids(bob, len(sent)) == sent, "live chat went on without MySQL"

            async def all_buffered() -> bool:
                return await redis.llen(keys.msgs("lobby")) == len(sent)

            await eventually(all_buffered, 30, what="the persister buffering every message in Redis")
            async with RoomcastClient([cluster.url(0)], token(settings, "cat")) as cat:
                joined = await cat.join("lobby", cursor)  # older than the list: MySQL's part, or the log's
                assert joined["recovered"] is True
                assert await next_ids(cat, len(sent)) == sent, "the resume replayed what cat missed"
            quiet = [(await ann.send("quiet", f"q{i}"))["id"] for i in range(3)]

            async def quiet_buffered() -> bool:
                return await redis.llen(keys.msgs("quiet")) == len(quiet)

            await eventually(quiet_buffered, 30, what="the quiet room buffered")
            page = await bob.history("quiet")  # Redis's part of the page, and a cursor to page on later
            assert [m["id"] for m in page["messages"]] == quiet and page["next"] == page["messages"][0]["cursor"]

            await proxy.restore()

            async def archived() -> bool:
                async with mysql.acquire() as conn, conn.cursor() as cur:
                    await cur.execute("SELECT COUNT(*) FROM messages")
                    (n,) = await cur.fetchone()
                return bool(n >= settings.flush_chunk)

            await eventually(archived, 30, what="the oldest chunk moved to MySQL once it was back")
            page = await bob.history("lobby", limit=len(sent))
            assert [m["id"] for m in page["messages"]] == sent
    finally:
        await proxy.close()


async def next_ids(client: RoomcastClient, n: int) -> list[str]:
    got: list[str] = []
    async with asyncio.timeout(30):
        async for frame in client:
            got.append(frame["id"])
            if len(got) == n:
                break
    return got


async def test_a_gateway_and_persister_started_before_the_broker_come_up_when_it_does(
        migrated: Settings, log_dir: Path, tmp_path: Path, redis: aioredis.Redis) -> None:
    port, controller = localstack.free_ports(2)
    settings = migrated.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{port}"})
    broker = KafkaCluster.local(tmp_path / "kafka", log_dir, [(port, controller)])
    gateway = start_gateway(settings, localstack.free_port(), log_dir, f"{settings.redis_prefix}-early-gw", wait=False)
    persister = start_persister(settings, log_dir, f"{settings.redis_prefix}-early-persister")
    try:
        await asyncio.sleep(3)
        assert gateway.alive and persister.alive, "they wait for the broker instead of exiting"
        await asyncio.to_thread(broker.start)
        await asyncio.to_thread(wait_http_ok, f"http://127.0.0.1:{gateway.ports[0]}/readyz", gateway)
        async with RoomcastClient([f"ws://127.0.0.1:{gateway.ports[0]}"], token(settings, "ann")) as ann:
            await ann.join("early")
            await ann.send("early", "first")
        keys = Keys(settings.redis_prefix, settings.kafka_partitions)

        async def stored() -> bool:
            return await redis.llen(keys.msgs("early")) == 1

        await eventually(stored, 30, what="the persister storing the first message")
    finally:
        gateway.stop()
        persister.stop()
        broker.stop()


async def readyz(cluster: Cluster, i: int) -> int:
    def get() -> int:
        try:
            with urllib.request.urlopen(f"{cluster.http(i)}/readyz", timeout=3) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    return await asyncio.to_thread(get)


async def test_a_record_produced_twice_is_delivered_and_stored_once(
        migrated: Settings, log_dir: Path, cluster_factory: list[Cluster],
        redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    from tools.checker import stored_ids, stored_messages

    cluster = Cluster(migrated, log_dir).start()
    cluster_factory.append(cluster)
    subs = [await Peer.connect(cluster.url(i), token(migrated, f"watcher{i}")) for i in (0, 1)]
    for s in subs:
        await s.join("dup-room")
    msg = Message(new_message_id(), "dup-room", "mallory", "twice", int(time.time() * 1000), "k-1")
    producer = AIOKafkaProducer(bootstrap_servers=migrated.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        partition = Keys(migrated.redis_prefix, migrated.kafka_partitions).partition("dup-room")
        for _ in range(2):  # what a producer retry without idempotence can do
            await producer.send_and_wait(migrated.kafka_topic, msg.kafka_value(), key=b"dup-room",
                                         partition=partition)
    finally:
        await producer.stop()
    for s in subs:
        await s.wait_for(lambda f: f["type"] == "message")
    await asyncio.sleep(1)
    for s in subs:
        assert [m["id"] for m in s.messages("dup-room")] == [msg.id]
        await s.close()
    keys = Keys(migrated.redis_prefix, migrated.kafka_partitions)

    async def once() -> bool:
        return stored_ids(await stored_messages(redis, mysql, keys, "dup-room")) == [msg.id]

    await eventually(once, 20, what="stored once")
