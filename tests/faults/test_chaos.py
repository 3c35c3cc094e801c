"""The faults of the other fault tests one after another under the same load, on the three-node
Kafka, in a seeded random order that holds every fault at least once: a gateway killed or drained
and started again on its port, the persister or the sweeper (retention 3 s: it moves messages to
MySQL all along) killed and started again, and outages of a few seconds while the next faults go
on: Redis killed, then restarted on its AOF; MySQL cut off, then back; a Kafka node killed, then
started again; a Kafka node cut off the network, then joined again. So services also start while
a dependency is away. The clients also edit (1 in 8 operations) and delete (1 in 16) their own
acknowledged messages. Afterwards nothing acknowledged is lost, duplicated or out of order,
delivered, stored, or paged back through history; and every acknowledged message ends as its
acknowledged edits and deletes make it (latest edit, or a tombstone) in the history paged back,
in Redis and MySQL, in a fresh resume from the start and in each client's live view (every frame
it got applied in order), with no deleted body left anywhere.

A failure names its seed and plan; `CHAOS_SEED=N` runs that plan again, `CHAOS_ROUNDS` sets its
length (default: each fault once; more rounds draw the extra faults at random).

Scale: `CHAOS_ROOMS` rooms (a client per room, each in two rooms) sending `CHAOS_RATE` msgs/s in
all. The default is what the whole suite can afford; `make test-chaos-scale` runs it at 200 rooms
and the highest rate this machine held (README, "Fault tests")."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiomysql
import orjson
import pytest
import redis.asyncio as aioredis
from roomcast_client import RoomcastClient

from shared.keys import Keys
from shared.mysql import MysqlTarget
from shared.settings import Settings
from tests.faults.conftest import Kafka3
from tests.faults.harness import Allow, Load, applied_to_the_end, history, run_load_through, small
from tests.faults.proxy import TcpProxy
from tests.support import Cluster, eventually, token
from tools import localstack
from tools.checker import check_storage, stored_messages
from tools.services import start_gateway, start_sweeper

FAULTS = ("kill_gateway", "drain_gateway", "kill_persister", "kill_sweeper", "restart_redis", "cut_mysql",
          "kill_broker", "cut_broker")


# Redis, Kafka nodes and MySQL come and go all through the run: sends are refused (`unavailable`) while
# Redis is away or a produce outlives a broker, and each client tries its pending sends again at its
# back-off, so refusals grow with the clients and the outages' length: 1.2 per fault and client seen
# at 40 clients (60 msgs/s), 3.6-5.3 at 200 clients (200-500 msgs/s). Each is acked in the end.
REFUSALS_PER_FAULT_AND_CLIENT = 15
EDITS, DELETES = 1 / 8, 1 / 16  # of the operations: the rest are sends


def scale() -> tuple[int, float]:
    """(rooms, msgs/s over all clients): CHAOS_ROOMS and CHAOS_RATE. The default keeps the test at
    about a minute of the suite's 20; `make test-chaos-scale` runs 200 rooms (README)."""
    return int(os.environ.get("CHAOS_ROOMS", "40")), float(os.environ.get("CHAOS_RATE", "60"))


ROOMS, RATE = scale()
CLIENTS = max(12, ROOMS)  # (each in two rooms: every room has two members)
# (the load's clients start, and the checks read every room's storage and history, in time that
# grows with the rooms)
pytestmark = [pytest.mark.faults, pytest.mark.timeout(420 + 3 * ROOMS)]


def chaos_plan(rng: random.Random, rounds: int) -> list[str]:
    """Every fault once, and `rounds` - len(FAULTS) more drawn at random, shuffled together."""
    plan = list(FAULTS) + [rng.choice(FAULTS) for _ in range(rounds - len(FAULTS))]
    rng.shuffle(plan)
    return plan


class Chaos:
    def __init__(self, cluster: Cluster, sweeper: localstack.Proc, redis: localstack.Proc, redis_port: int,
                 redis_data: Path, mysql: TcpProxy, kafka: Kafka3, log_dir: Path, rng: random.Random) -> None:
        self.cluster = cluster
        self.sweeper = sweeper
        self.redis = redis
        self.redis_port = redis_port
        self.redis_data = redis_data
        self.mysql = mysql
        self.kafka = kafka
        self.log_dir = log_dir
        self.rng = rng
        self.background: set[asyncio.Task[None]] = set()
        self.redis_lock = asyncio.Lock()
        self.mysql_lock = asyncio.Lock()
        self.broker_lock = asyncio.Lock()  # one Kafka node away at a time: the other two keep the quorum
        self.done: list[str] = []

    async def run(self, plan: list[str]) -> None:
        for name in plan:
            step: Callable[[], Awaitable[None]] = getattr(self, name)
            await step()
            self.done.append(name)
            await asyncio.sleep(self.rng.uniform(0.5, 2.0))
        await asyncio.gather(*self.background)
        assert not self.crashed(), f"services died on their own: {self.crashed()}"

    def crashed(self) -> list[str]:
        assert self.cluster.persister is not None
        return [p.name for p in [*self.cluster.gateways, self.cluster.persister, self.sweeper] if not p.alive]

    async def kill_gateway(self) -> None:
        await self._restart_gateway(signal.SIGKILL)

    async def drain_gateway(self) -> None:
        await self._restart_gateway(signal.SIGTERM)

    async def _restart_gateway(self, sig: signal.Signals) -> None:
        i = self.rng.randrange(len(self.cluster.gateways))
        victim = self.cluster.gateways[i]
        victim.popen.send_signal(sig)
        await asyncio.to_thread(victim.popen.wait, 30)
        await asyncio.sleep(self.rng.uniform(0.2, 1.0))
        self.cluster.gateways[i] = await asyncio.to_thread(
            start_gateway, self.cluster.settings, victim.ports[0], self.log_dir, victim.name)

    async def kill_persister(self) -> None:
        assert self.cluster.persister is not None
        self.cluster.persister.kill()
        await asyncio.sleep(self.rng.uniform(0.2, 1.0))
        await asyncio.to_thread(self.cluster.start_persister)

    async def kill_sweeper(self) -> None:
        self.sweeper.kill()
        await asyncio.sleep(self.rng.uniform(0.2, 1.0))
        self.sweeper = start_sweeper(self.cluster.settings, self.log_dir, self.sweeper.name)

    async def restart_redis(self) -> None:
        async def up() -> None:
            self.redis = await asyncio.to_thread(localstack.start_redis, self.redis_port, self.redis_data,
                                                 self.log_dir)

        await self._outage(self.redis_lock, self._kill_redis, up)

    async def _kill_redis(self) -> None:
        self.redis.kill()

    async def kill_broker(self) -> None:
        node = self.rng.choice([n.node_id for n in self.kafka.cluster.nodes])

        async def down() -> None:
            self.kafka.cluster.kill(node)

        async def up() -> None:
            await asyncio.to_thread(self.kafka.cluster.start_node, node)

        await self._outage(self.broker_lock, down, up)

    async def cut_broker(self) -> None:
        node = self.rng.choice([n.node_id for n in self.kafka.cluster.nodes])

        async def down() -> None:
            self.kafka.cut_off(node)

        async def up() -> None:
            self.kafka.rejoin(node)

        await self._outage(self.broker_lock, down, up)

    async def cut_mysql(self) -> None:
        await self._outage(self.mysql_lock, self.mysql.cut, self.mysql.restore)

    async def _outage(self, lock: asyncio.Lock, down: Callable[[], Awaitable[None]],
                      up: Callable[[], Awaitable[None]]) -> None:
        """`down()` now, `up()` a few seconds later while the next faults go on (one outage of a
        service at a time: a second waits for the first to end)."""
        await lock.acquire()
        await down()

        async def up_later() -> None:
            try:
                await asyncio.sleep(self.rng.uniform(1.0, 5.0))
                await up()
            finally:
                lock.release()

        task = asyncio.create_task(up_later())
        self.background.add(task)
        task.add_done_callback(self.background.discard)


@pytest.fixture
async def mysql_proxy(migrated: Settings) -> AsyncIterator[TcpProxy]:
    target = MysqlTarget.from_dsn(migrated.mysql_dsn)
    proxy = await TcpProxy(target.host, target.port).start()
    yield proxy
    await proxy.close()


def test_every_plan_holds_every_fault() -> None:
    for seed in range(50):
        plan = chaos_plan(random.Random(seed), len(FAULTS) + seed % 4)
        assert set(plan) == set(FAULTS) and len(plan) == len(FAULTS) + seed % 4


async def test_faults_in_a_random_order_lose_nothing(
        migrated: Settings, log_dir: Path, tmp_path: Path, mysql: aiomysql.Pool, mysql_proxy: TcpProxy,
        kafka3: Kafka3) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    plan = chaos_plan(rng, int(os.environ.get("CHAOS_ROUNDS", len(FAULTS))))
    migrated = kafka3.settings(migrated)
    redis_port = localstack.free_port()
    redis_proc = localstack.start_redis(redis_port, tmp_path / "redis", log_dir)
    target = MysqlTarget.from_dsn(migrated.mysql_dsn)
    # A room's list holds ~6 s of its messages and retention is 3 s: the sweeper moves messages to
    # MySQL all along, and the persister's cap flushes do when the sweeper is down or behind.
    settings = small(migrated, redis_url=f"redis://127.0.0.1:{redis_port}/0", drain_grace_s=2.0,
                     mysql_dsn=f"mysql://{target.user}:{target.password}@127.0.0.1:{mysql_proxy.port}/"
                               f"{target.database}",
                     buffer_cap=100, flush_chunk=50, redis_retention_s=3, sweep_interval_s=1.0, log_json=True)
    cluster = Cluster(settings, log_dir).start(gateways=3)
    sweeper = start_sweeper(settings, log_dir, f"{settings.redis_prefix}-sweeper")
    chaos = Chaos(cluster, sweeper, redis_proc, redis_port, tmp_path / "redis", mysql_proxy, kafka3, log_dir, rng)
    client = aioredis.from_url(settings.redis_url)
    try:
        load = await run_load_through(cluster, lambda: chaos.run(plan), client, mysql,
                                      Allow(refusals=REFUSALS_PER_FAULT_AND_CLIENT * CLIENTS * len(plan)),
                                      rate=RATE / CLIENTS, clients=CLIENTS, rooms=ROOMS, edits=EDITS,
                                      deletes=DELETES)
        async with RoomcastClient([cluster.url(0)], token(settings, "reader")) as reader:
            paged = {room: await history(reader, room) for room in load.rooms}
        # (in order, each once, as acknowledged: pages that overlapped or skipped would show)
        report = check_storage(load.all_acks, paged, load.unacked)
        assert report.ok, f"history paged back: {report}"
        await final_states_agree(load, client, mysql, cluster.url(1))
        assert not chaos.crashed(), f"services died on their own: {chaos.crashed()}"
    except BaseException as e:
        e.add_note(f"CHAOS_SEED={seed}: plan {plan}, done {chaos.done}")
        raise
    finally:
        await client.aclose()
        cluster.stop()
        chaos.sweeper.stop()
        chaos.redis.stop()
    assert chaos.done == plan


async def final_states_agree(load: Load, redis: aioredis.Redis, mysql: aiomysql.Pool, url: str) -> None:
    """Once the persister has applied every record (to Redis, and the edits and deletes it queued
    for MySQL), every path shows each acked message as its acked edits and deletes left it; no
    deleted body is stored."""
    keys = Keys(load.settings.redis_prefix, load.settings.kafka_partitions)
    await applied_to_the_end(load.settings, redis)

    async def archived_events_applied() -> bool:
        return not any([await redis.llen(keys.archived_events(p)) for p in range(load.settings.kafka_partitions)])

    await eventually(archived_events_applied, 60, every=0.5, what="the edits and deletes queued for MySQL applied")
    async with RoomcastClient([url], token(load.settings, "reader")) as reader:
        paged = {room: await history(reader, room) for room in load.rooms}
    outcomes = load.outcomes()
    assert outcomes["edit:acked"] > 0 and outcomes["delete:acked"] > 0, f"no edits or deletes: {outcomes}"
    states = load.final_states()
    print(f"final states: {len(states)} messages, {sum(None in s for s in states.values())} deleted, "
          f"{sum(any(s and s[1] for s in ss) for ss in states.values())} edited, "
          f"{sum(len(ss) > 1 for ss in states.values())} with a change that got no ack")
    load.check_final("history paged back", {c.id: c.state for copies in paged.values() for c in copies})
    stored = [c for room in load.rooms for c in await stored_messages(redis, mysql, keys, room)]
    for source in ("redis", "mysql"):
        copies = {c.id: c.state for c in stored if c.source == source}
        load.check_final(f"stored in {source}", copies, set(copies) & set(load.final_states()))
    load.check_final("a fresh resume from the start", await load.resumed(url))
    for name, (view, owed) in load.live_views().items():
        load.check_final(f"{name}'s live view", view, owed)
    gone = load.deleted_bodies()
    assert gone, "no message ended deleted"
    for room in load.rooms:
        left = [e for e in await redis.lrange(keys.msgs(room), 0, -1) if orjson.loads(e).get("body") in gone]
        assert not left, f"a deleted body in Redis: {left[:3]}"
    async with mysql.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT body FROM messages WHERE body <> ''")
        assert not {row[0] for row in await cur.fetchall()} & gone, "a deleted body in MySQL"
