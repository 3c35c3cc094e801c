"""Roomcast on a Redis Cluster (3 primaries, 3 replicas, redis-server in cluster mode): the
gateways, the persister and the sweeper with REDIS_CLUSTER=true. Every script and batch stays in one
slot (a CROSSSLOT error would fail a send, an append or a move: none may appear in any log), the
sweeper's walk and `roomcast stats` / `check` work across slots, and every message is delivered,
buffered, flushed and swept exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomysql
import pytest

from shared.keys import Keys
from shared.redisconn import connect
from shared.settings import Settings
from tests.support import Cluster, Peer, delete_keys, eventually, token
from tools import localstack, ops
from tools.checker import stored_ids, stored_messages
from tools.services import start_sweeper

pytestmark = pytest.mark.timeout(180)

ROOMS = [f"cluster-room-{i}" for i in range(12)]  # spread over every partition, so over every primary


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[list[localstack.Proc]]:
    ports = localstack.free_ports(12)
    procs = localstack.start_redis_cluster(list(zip(ports[:6], ports[6:], strict=True)),
                                           tmp_path_factory.mktemp("redis-cluster"), log_dir)
    yield procs
    for proc in procs:
        proc.stop()


@pytest.fixture
async def on_cluster(migrated: Settings, redis_cluster: list[localstack.Proc]) -> AsyncIterator[Settings]:
    s = migrated.model_copy(update={
        "redis_url": f"redis://127.0.0.1:{redis_cluster[0].ports[0]}/0", "redis_cluster": True,
        "buffer_cap": 20, "flush_chunk": 10, "redis_retention_s": 2, "sweep_interval_s": 0.5, "send_burst": 1000})
    yield s
    client = connect(s, timeout_s=5, connect_timeout_s=3)
    for node in client.get_primaries():  # type: ignore[attr-defined]
        await delete_keys(client.get_redis_connection(node), s.redis_prefix)  # type: ignore[attr-defined]
    await client.aclose()


async def test_gateways_persister_and_sweeper_work_on_a_redis_cluster(
        on_cluster: Settings, log_dir: Path, mysql: aiomysql.Pool) -> None:
    s = on_cluster
    cluster = Cluster(s, log_dir).start()
    sweeper = start_sweeper(s, log_dir, f"{s.redis_prefix}-sweeper")
    redis = connect(s, timeout_s=5, connect_timeout_s=3)
    keys = Keys(s.redis_prefix, s.kafka_partitions)
    try:
        assert len({keys.partition(r) for r in ROOMS}) == s.kafka_partitions
        sender = await Peer.connect(cluster.url(0), token(s, "alice"))
        reader = await Peer.connect(cluster.url(1), token(s, "bob"))
        for room in ROOMS:
            assert (await reader.join(room))["type"] == "joined"
        for i in range(30):  # past the cap in every room: the persister flushes, the sweeper moves the rest
            for room in ROOMS:  # (a round at a time: a connection has a bounded number of sends in flight)
                await sender.send({"type": "send", "room": room, "client_msg_id": f"{room}-{i}", "body": f"m{i}"})
            await eventually(lambda i=i: _done(sender, (i + 1) * len(ROOMS)), 30, what=f"round {i} acknowledged")
        acked: dict[str, list[str]] = {r: [] for r in ROOMS}
        for ack in sorted(sender.acks(), key=lambda a: int(a["cursor"].split("-")[1])):
            acked[ack["room"]].append(ack["id"])
        await eventually(lambda: _done(reader, 30 * len(ROOMS), "message"), 30, what="every message delivered")
        for room in ROOMS:
            assert [m["id"] for m in reader.messages(room)] == acked[room], room

        async def all_stored_once_and_swept() -> bool:
            for room in ROOMS:
                if stored_ids(await stored_messages(redis, mysql, keys, room)) != acked[room]:
                    return False
            return [await redis.llen(keys.msgs(r)) for r in ROOMS] == [0] * len(ROOMS)  # retention 2 s: all in MySQL

        await eventually(all_stored_once_and_swept, 60, what="stored once, then swept to MySQL")
        stats = await ops.gather_stats(s, 10)
        assert not stats.errors, stats.errors
        assert stats.rooms == len(ROOMS) and stats.buffered_messages == 0 and stats.lag_total == 0
        findings = {f.dependency: f for f in await ops.check_all(s, 10)}
        assert not findings["redis"].failed, findings["redis"]
        for proc in [*cluster.gateways, cluster.persister, sweeper]:
            assert proc is not None and "CROSSSLOT" not in proc.log_path.read_text(), proc.name
        for p in (sender, reader):
            await p.close()
    finally:
        await redis.aclose()
        sweeper.stop()
        cluster.stop()


async def _done(peer: Peer, n: int, kind: str = "ack") -> bool:
    await asyncio.sleep(0)
    return sum(1 for f in peer.frames if f["type"] == kind) >= n


def test_keys_of_one_partition_share_a_slot() -> None:
    from redis.crc import key_slot

    keys = Keys("rc", 8)
    for room in ROOMS:
        p = keys.partition(room)
        slots = {key_slot(k.encode()) for k in (keys.applied(p), keys.new_rooms(p), keys.over_cap(p),
                                               keys.seen(p, 0), keys.msgs(room), keys.meta(room),
                                               keys.sent(room, "u", "c"))}
        assert len(slots) == 1, room

