"""Redis failover to a replica that is behind, under load: the replication link goes quiet (a
blackholed proxy: a SIGSTOPped replica would not do, it reads what its socket buffered once woken)
while writes go on, the primary is killed, the replica promoted by hand (REPLICAOF NO ONE), and
the services' proxy re-pointed at it. It lacks the newest appends, applied marks, send claims and
acks: the persister sees its marks go back and rebuilds all of it from Kafka. A resend of a message
whose claim was lost is not stored twice; one resent after the rebuild gets its first ack again."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiomysql
import pytest
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.settings import Settings
from tests.faults.harness import Allow, applied_to_the_end, run_load_through, small
from tests.faults.proxy import TcpProxy
from tests.support import Cluster, Peer, eventually, token
from tools import localstack
from tools.checker import stored_ids, stored_messages
from tools.localstack import Proc

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


class Pair:
    """A primary and its replica (AOF on both), replicating through a proxy (`link`), and the proxy
    every service reaches Redis through."""

    def __init__(self, primary: Proc, replica: Proc, link: TcpProxy, proxy: TcpProxy) -> None:
        self.primary, self.replica, self.link, self.proxy = primary, replica, link, proxy

    def client(self, proc: Proc) -> aioredis.Redis:
        return aioredis.from_url(f"redis://127.0.0.1:{proc.ports[0]}/0")

    async def in_sync(self) -> None:
        primary, replica = self.client(self.primary), self.client(self.replica)
        try:
            async def caught_up() -> bool:
                mine, theirs = await primary.info("replication"), await replica.info("replication")
                return (theirs.get("master_link_status") == "up"
                        and theirs.get("slave_repl_offset") == mine.get("master_repl_offset"))

            await eventually(caught_up, 30, what="the replica in sync")
        finally:
            await primary.aclose()
            await replica.aclose()

    async def marks(self, proc: Proc, keys: Keys) -> list[int]:
        client = self.client(proc)
        try:
            return [int(m or -1) for m in await client.mget([keys.applied(p) for p in range(keys.partitions)])]
        finally:
            await client.aclose()

    async def promote_replica(self) -> None:
        replica = self.client(self.replica)
        try:
            await replica.execute_command("REPLICAOF", "NO", "ONE")
        finally:
            await replica.aclose()
        self.proxy.target = ("127.0.0.1", self.replica.ports[0])
        await self.proxy.cut()  # every service reconnects, to the new primary
        await self.proxy.restore()


@pytest.fixture
async def pair(tmp_path: Path, log_dir: Path) -> AsyncIterator[Pair]:
    p, r = localstack.free_ports(2)
    primary = localstack.start_redis(p, tmp_path / "primary", log_dir, name=f"redis-{p}")
    link = await TcpProxy("127.0.0.1", p).start()
    replica = localstack.start_redis(r, tmp_path / "replica", log_dir, name=f"redis-{r}",
                                     extra_args=["--replicaof", "127.0.0.1", str(link.port)])
    proxy = await TcpProxy("127.0.0.1", p).start()
    try:
        yield Pair(primary, replica, link, proxy)
    finally:
        for proxy_ in (proxy, link):
            await proxy_.close()
        for proc in (primary, replica):
            proc.stop()


async def test_a_replica_that_is_behind_is_promoted_and_what_it_lacks_is_rebuilt_from_kafka(
        migrated: Settings, pair: Pair, log_dir: Path, mysql: aiomysql.Pool) -> None:
    settings = small(migrated, redis_url=f"redis://127.0.0.1:{pair.proxy.port}/0")
    cluster = Cluster(settings, log_dir).start()
    redis = aioredis.from_url(settings.redis_url)
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    dave = await Peer.connect(cluster.url(0), token(settings, "dave"))
    first: dict[str, dict[str, object]] = {}
    again: dict[str, dict[str, object]] = {}
    marks: dict[str, list[int]] = {}  # each partition's applied mark, on the primary at its end, on the replica

    async def send(peer: Peer, cmid: str) -> dict[str, object]:
        """Sent until acked (again after each `unavailable`, as a client does)."""
        for _ in range(100):
            n = len(peer.frames)
            await peer.send({"type": "send", "room": "claims", "client_msg_id": cmid, "body": f"{cmid} body"})
            answer = await peer.wait_for(
                lambda f: f["type"] in ("ack", "error") and f.get("client_msg_id", f.get("ref")) == cmid, 30, start=n)
            if answer["type"] == "ack":
                return answer
            assert answer["code"] == "unavailable", answer
            await asyncio.sleep(0.2)
        raise AssertionError(f"{cmid} never acked")

    async def fail_over_to_a_lagging_replica() -> None:
        assert cluster.persister is not None
        await pair.in_sync()
        pair.link.blackhole()  # from now on the replica gets none of the writes
        for cmid in ("lost-1", "lost-2"):
            first[cmid] = await send(dave, cmid)  # acked: their claims (and acks) are on the primary only
        await asyncio.sleep(1)
        cluster.persister.popen.send_signal(signal.SIGSTOP)  # (so lost-1's resend comes before the rebuild)
        try:
            marks["primary"] = await pair.marks(pair.primary, keys)
            pair.primary.kill()
            await pair.link.cut()  # (what it held back never arrives)
            await pair.promote_replica()
            marks["replica"] = await pair.marks(pair.replica, keys)
            again["lost-1"] = await send(dave, "lost-1")  # its claim is gone, not rebuilt yet
        finally:
            cluster.persister.popen.send_signal(signal.SIGCONT)
        await applied_to_the_end(settings, redis)  # the persister replayed what the replica lacked
        again["lost-2"] = await send(dave, "lost-2")

    try:
        # Sends are refused while no primary answers (claims live in Redis: 10 in each of 3 runs); each
        # is acked in the end.
        await run_load_through(cluster, fail_over_to_a_lagging_replica, redis, mysql, Allow(refusals=200))
        assert any(r < p for r, p in zip(marks["replica"], marks["primary"], strict=True)), \
            f"the promoted replica was behind: marks {marks}"
        assert again["lost-2"] == first["lost-2"], "the claim was rebuilt from Kafka: the resend got the first ack"
        await applied_to_the_end(settings, redis)

        async def each_stored_once() -> bool:
            copies = await stored_messages(redis, mysql, keys, "claims")
            lost_1 = stored_ids([c for c in copies if c.cmid == "lost-1"])
            lost_2 = stored_ids([c for c in copies if c.cmid == "lost-2"])
            # (lost-1 under the first id or its resend's: whichever the dedupe record named when the
            # persister replayed it; docs/protocol.md, resends)
            return len(lost_1) == 1 and lost_1[0] in {first["lost-1"]["id"], again["lost-1"]["id"]} \
                and lost_2 == [first["lost-2"]["id"]]

        await eventually(each_stored_once, 30, what="each resent message stored once")
        print(f"marks (primary at its end, promoted replica): {marks}; lost-1 acked as {first['lost-1']['id']}, "
              f"its resend as {again['lost-1']['id']}")
    finally:
        await dave.close()
        cluster.stop()
        await redis.aclose()
