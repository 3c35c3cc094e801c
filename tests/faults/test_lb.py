"""Issue 26: roomcast behind a real load balancer. HAProxy runs the production config
(deploy/haproxy/haproxy.cfg, rendered with this test's ports) in front of gateway processes, and
every client knows only HAProxy's address: a gateway killed, drained, or cut off from Kafka, and a
connection left idle longer than HAProxy's idle timeout."""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiomysql
import orjson
import pytest
import redis.asyncio as aioredis
import websockets
from roomcast_client import RoomcastClient

from shared.settings import Settings
from tests.faults.harness import Load, small
from tests.faults.proxy import TcpProxy
from tests.support import Cluster, Lb, Peer, eventually, token
from tools import localstack
from tools.localkafka import KafkaCluster
from tools.localstack import Proc
from tools.services import start_gateway

pytestmark = [pytest.mark.faults, pytest.mark.timeout(150)]

KILLS = 3


@pytest.fixture
async def behind_lb(migrated: Settings, log_dir: Path, tmp_path: Path) -> AsyncIterator[tuple[Cluster, Lb]]:
    """Two gateways and a persister, HAProxy in front."""
    cluster = Cluster(small(migrated), log_dir)
    lb: Lb | None = None
    try:
        cluster.start()
        lb = Lb.start(cluster, tmp_path)
        yield cluster, lb
    finally:
        if lb is not None:
            lb.stop()
        cluster.stop()


async def restart(cluster: Cluster, i: int) -> Proc:
    """Gateway i again, on its port (HAProxy knows it by its address)."""
    port = cluster.gateways[i].ports[0]
    cluster.gateways[i] = await asyncio.to_thread(
        start_gateway, cluster.settings, port, cluster.log_dir, f"{cluster.settings.redis_prefix}-gw{port}")
    return cluster.gateways[i]


async def test_a_killed_gateways_clients_resume_through_the_lb_and_nothing_is_lost(
        behind_lb: tuple[Cluster, Lb], redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    """Each gateway in turn is SIGKILLed under load, then started again. Its clients reconnect to
    HAProxy's port, land on the live gateway and resume from their cursors; afterwards every
    acknowledged message was delivered to every member once and is stored. Timed clients (the
    client library's defaults) measure from the kill to their resumed join's answer."""
    cluster, lb = behind_lb
    load = Load(cluster.settings, [lb.url], clients=12, rooms=4, rate=5)
    timed = [RoomcastClient([lb.url], token(cluster.settings, f"timed-{i}")) for i in range(8)]
    samples: list[float] = []
    try:
        await load.start()
        for client in timed:
            await client.start()
            await client.join("room-0")
        for kill in range(KILLS):
            i = kill % 2
            victim = cluster.gateways[i]
            assert lb.server(victim).current > 0, "leastconn put clients on every gateway"
            reconnects = [c.reconnects for c in timed]
            t0 = time.monotonic()
            victim.kill()
            # A join of a joined room is answered by the next `joined` of that room: for a client
            # of the dead gateway, the answer to the re-join (with its last cursor) that it sends
            # on its new connection.
            results = await asyncio.gather(*(_joined_after(c, t0) for c in timed))
            moved = [took for c, n, (_, took) in zip(timed, reconnects, results, strict=True) if c.reconnects > n]
            assert moved, "a timed client was on the killed gateway"
            assert all(frame.get("recovered") is True for frame, _ in results), results
            samples += moved
            survivor, everyone = cluster.gateways[1 - i], len(load.members) + len(timed)

            async def all_on_the_survivor(g: Proc = survivor, n: int = everyone) -> bool:
                return (await asyncio.to_thread(lb.server, g)).current == n

            await eventually(all_on_the_survivor, 15, what="every client on the live gateway")
            await restart(cluster, i)
            await lb.wait_status(cluster.gateways[i], "UP")
        await load.stop_sending()
        await load.drain(60)
        assert load.total_acked > 100
        assert sum(m.client.reconnects for m in load.members) >= KILLS
        delivery = load.delivery()
        assert delivery.ok, f"delivery: {delivery} ({load.describe()}) missing: {load.missing()}"
        storage = await load.storage(redis, mysql)
        assert storage.ok, f"storage: {storage}"
        assert all(c.gaps == 0 for c in timed)
    finally:
        for client in timed:
            await client.close()
        await load.close()
    print(f"\nreconnect-and-resume through HAProxy after a gateway kill: {len(samples)} clients over {KILLS} kills, "
          f"median {statistics.median(samples) * 1000:.0f} ms, max {max(samples) * 1000:.0f} ms")
    assert max(samples) < 5.0


async def _joined_after(client: RoomcastClient, t0: float) -> tuple[dict[str, object], float]:
    frame = await client.join("room-0")
    return frame, time.monotonic() - t0


async def test_a_draining_gateway_leaves_the_rotation_before_it_closes_its_clients_1012(
        migrated: Settings, log_dir: Path, tmp_path: Path, redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    """SIGTERM: the gateway's /readyz turns 503 at once and HAProxy takes it out (DOWN) while its
    clients are still connected; only DRAIN_DELAY_S later are they closed with 1012, and every
    reconnect goes to the other gateway: HAProxy sends the drained one no connection at all."""
    settings = small(migrated, drain_delay_s=Settings().drain_delay_s)  # the production delay
    cluster = Cluster(settings, log_dir).start()
    lb = Lb.start(cluster, tmp_path)
    load = Load(settings, [lb.url], clients=12, rooms=4, rate=5)
    victim, survivor = cluster.gateways
    watchers: list[tuple[Peer, bool]] = []  # and whether it went to the victim
    try:
        await load.start()
        while not any(on_victim for _, on_victim in watchers) or len(watchers) < 4:
            before = lb.server(victim).current
            peer = await Peer.connect(lb.url, token(settings, f"watcher-{len(watchers)}"))
            watchers.append((peer, lb.server(victim).current > before))
        on_victim = [p for p, there in watchers if there]
        elsewhere = [p for p, there in watchers if not there]
        sessions, routed = lb.server(victim).current, lb.server(victim).total
        closed_at: list[float] = []
        closes = [asyncio.create_task(_closed(p, closed_at)) for p in on_victim]

        t_term = time.monotonic()
        victim.popen.send_signal(signal.SIGTERM)
        t_down = await lb.wait_status(victim, "DOWN", timeout=settings.drain_delay_s)
        assert not closed_at and victim.alive, "the gateway closed clients before HAProxy took it out"
        assert lb.server(victim).current == sessions, "its clients are still connected to it"
        await asyncio.wait_for(asyncio.gather(*closes), settings.drain_delay_s + 10)
        assert all(p.closed_code == 1012 for p in on_victim), [p.closed_code for p in on_victim]
        assert min(closed_at) - t_term >= settings.drain_delay_s - 0.2
        assert t_down < min(closed_at)
        assert await asyncio.to_thread(victim.popen.wait, 30) in (0, -signal.SIGTERM)

        async def all_back() -> bool:
            return (await asyncio.to_thread(lb.server, survivor)).current == len(load.members) + len(elsewhere)

        await eventually(all_back, 15, what="every client reconnected to the survivor")
        assert lb.server(victim).total == routed, "HAProxy sent the drained gateway a connection"
        for p in elsewhere:
            assert p.closed_code is None and (await p.join("still-here"))["type"] == "joined"
        await load.stop_sending()
        await load.drain(60)
        assert sum(m.client.reconnects for m in load.members) >= 1
        delivery = load.delivery()
        assert delivery.ok, f"delivery: {delivery} ({load.describe()}) missing: {load.missing()}"
        storage = await load.storage(redis, mysql)
        assert storage.ok, f"storage: {storage}"
    finally:
        for p, _ in watchers:
            await p.close()
        await load.close()
        lb.stop()
        cluster.stop()


async def _closed(peer: Peer, at: list[float]) -> None:
    await peer._reader
    at.append(time.monotonic())


@pytest.fixture
async def kafka_with_a_cuttable_way_in(tmp_path: Path, log_dir: Path) -> AsyncIterator[tuple[str, TcpProxy]]:
    """A Kafka node of this test's own with two ways in: its usual listener (bootstrap returned),
    and a second one whose advertised address is a TCP proxy, so a client that bootstraps through
    the proxy sends everything through it, and the test can cut that client off Kafka alone."""
    port, proxied, controller = localstack.free_ports(3)
    proxy = TcpProxy("127.0.0.1", proxied)
    listeners = f"PLAINTEXT://127.0.0.1:{port},VIA_PROXY://127.0.0.1:{proxied},CONTROLLER://127.0.0.1:{controller}"
    kafka = KafkaCluster.local(tmp_path / "kafka", log_dir, [(port, controller)], heap="384m", extra={
        "listeners": listeners,
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port},VIA_PROXY://127.0.0.1:{proxy.port}",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,VIA_PROXY:PLAINTEXT",
    })
    await asyncio.to_thread(kafka.start)
    await proxy.start()
    try:
        yield kafka.bootstrap, proxy
    finally:
        await proxy.close()
        await asyncio.to_thread(kafka.stop)


def readyz(gateway: Proc) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway.ports[0]}/readyz", timeout=3) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, orjson.loads(e.read())


async def test_a_gateway_cut_off_from_kafka_is_taken_out_and_gets_no_new_clients(
        migrated: Settings, log_dir: Path, tmp_path: Path,
        kafka_with_a_cuttable_way_in: tuple[str, TcpProxy]) -> None:
    """A gateway whose Kafka goes through a proxy that is cut would accept clients and deliver
    nothing to them. Its fan-out hears no fetch answer for READY_STALL_S, /readyz turns 503,
    HAProxy takes it out, and new clients all go to the other gateway, where they talk. Once
    Kafka answers it again it is ready, and back in the rotation."""
    bootstrap, proxy = kafka_with_a_cuttable_way_in
    settings = migrated.model_copy(update={"kafka_bootstrap": bootstrap, "ready_stall_s": 2.0})
    cluster = Cluster(settings, log_dir)
    lb: Lb | None = None
    clients: list[RoomcastClient] = []
    try:
        healthy = cluster.add_gateway()
        port = localstack.free_port()
        deaf = await asyncio.to_thread(start_gateway, settings.model_copy(
            update={"kafka_bootstrap": f"127.0.0.1:{proxy.port}"}), port, log_dir, f"{settings.redis_prefix}-deaf")
        cluster.gateways.append(deaf)
        cluster.hosts.append(settings.host)
        lb = Lb.start(cluster, tmp_path)

        await proxy.cut()
        await lb.wait_status(deaf, "DOWN", timeout=20)
        status, body = await asyncio.to_thread(readyz, deaf)
        assert status == 503 and "no fetch answered by the broker" in str(body["reason"]), body
        routed = lb.server(deaf).total

        for i in range(6):
            client = RoomcastClient([lb.url], token(settings, f"newcomer-{i}"))
            clients.append(client)
            await client.start()
            await client.join("lobby")
        assert lb.server(deaf).total == routed, "HAProxy sent a new client to the deaf gateway"
        assert lb.server(healthy).current == len(clients)
        ack = await clients[0].send("lobby", "can everyone hear me?")

        async def heard(c: RoomcastClient) -> None:
            async with asyncio.timeout(10):
                async for m in c:
                    if m["id"] == ack["id"]:
                        return

        await asyncio.gather(*(heard(c) for c in clients))

        await proxy.restore()
        await lb.wait_status(deaf, "UP", timeout=30)
        assert (await asyncio.to_thread(readyz, deaf))[0] == 200
    finally:
        for client in clients:
            await client.close()
        if lb is not None:
            lb.stop()
        cluster.stop()


@pytest.mark.parametrize("pings", [True, False], ids=["gateway-pings", "no-pings"])
async def test_an_idle_websocket_through_the_lb_lives_on_the_gateways_pings(
        migrated: Settings, log_dir: Path, tmp_path: Path, pings: bool) -> None:
    """HAProxy cuts a WebSocket idle for `timeout tunnel` (here 2 s). The gateway pings every
    PING_INTERVAL_S (here 0.5 s) and the client answers, so a client that says nothing for three
    times that timeout is still connected and answered; without the pings it is cut."""
    tunnel_s = 2.0
    settings = migrated.model_copy(update={"ping_interval_s": 0.5 if pings else 60.0})
    cluster = Cluster(settings, log_dir).start(gateways=1, persister=False)
    lb = Lb.start(cluster, tmp_path, timeout_tunnel=f"{tunnel_s:g}s")
    try:
        # This client never pings: only the gateway's pings (and the client's pongs) cross.
        ws = await websockets.connect(f"{lb.url}/ws?v=1&token={token(settings, 'quiet')}", ping_interval=None)
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(ws.wait_closed(), 3 * tunnel_s + 0.5)
        except TimeoutError:
            pass
        if pings:
            assert ws.close_code is None, f"cut after {time.monotonic() - t0:.1f}s idle"
            await ws.send('{"type":"ping"}')
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "pong"
            await ws.close()
        else:
            assert ws.close_code is not None, "HAProxy never cut the idle connection: the test proves nothing"
            assert tunnel_s - 0.2 < time.monotonic() - t0 < 2 * tunnel_s
    finally:
        lb.stop()
        cluster.stop()
