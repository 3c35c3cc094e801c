"""Issue 3, faults 1, 2 and 7: a gateway killed or drained under load, and a client too slow to read."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiomysql
import orjson
import pytest
import redis.asyncio as aioredis
import websockets

from shared.settings import Settings
from tests.faults.harness import Allow, Load, run_load_through
from tests.support import Cluster, Peer, eventually, token
from tools.services import scrape

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]


@pytest.fixture
async def cluster(migrated: Settings, log_dir: Path) -> AsyncIterator[Cluster]:
    c = Cluster(migrated.model_copy(update={"buffer_cap": 50, "flush_chunk": 25, "drain_grace_s": 5.0}),
                log_dir).start()
    yield c
    c.stop()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
async def test_a_gateway_dies_or_drains_under_load_and_nothing_is_lost(
        cluster: Cluster, sig: signal.Signals, redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    observer = await Peer.connect(cluster.url(0), token(cluster.settings, "observer"))

    async def stop_gateway_0() -> None:
        victim = cluster.gateways[0]
        victim.popen.send_signal(sig)
        code = await asyncio.to_thread(victim.popen.wait, 30)
        if sig == signal.SIGTERM:
            # uvicorn re-raises the signal once its graceful shutdown is complete
            assert code in (0, -signal.SIGTERM)
            assert "gateway stopped" in victim.log_path.read_text(), "a drained gateway shuts down in order"
            await asyncio.wait_for(observer._reader, 10)
            assert observer.closed_code == 1012, "clients are told to reconnect elsewhere"

    # Its clients reconnect to the survivor, resume and resend. A drained gateway answers what it
    # took first: nobody is refused anything. A killed one leaves the claims of the sends it had in
    # flight pending for their TTL (produce timeout + 5 s: it may have published them); a resend
    # waits that out, then is refused `unavailable` once and publishes anew (1-3 in a run).
    claim_ttl = cluster.settings.kafka_request_timeout_ms / 1000 * 2 + 5  # (gateway/publisher.py)
    allow = Allow() if sig == signal.SIGTERM else Allow(refusals=20, grace_s=claim_ttl + 10)
    try:
        load = await run_load_through(cluster, stop_gateway_0, redis, mysql, allow, clients=20)
        assert sum(m.client.reconnects for m in load.members) >= 1
        assert load.total_acked > 100
    finally:
        await observer.close()


async def test_a_client_too_slow_to_read_is_closed_4008_and_resumes_without_loss(
        migrated: Settings, log_dir: Path) -> None:
    settings = migrated.model_copy(update={"send_queue_max": 100, "send_burst": 100_000,
                                           "send_rate_per_s": 100_000.0, "ping_interval_s": 300.0})
    cluster = Cluster(settings, log_dir).start(gateways=2)
    load = Load(settings, [cluster.url(0), cluster.url(1)], clients=6, rooms=2, rate=5)
    try:
        await load.start()
        sock = socket.create_connection(("127.0.0.1", cluster.gateways[0].ports[0]))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow = await websockets.connect(f"{cluster.url(0)}/ws?v=1&token={token(settings, 'slow')}",
                                        sock=sock, max_queue=1, max_size=2**20, ping_interval=None)
        await slow.send(orjson.dumps({"type": "join", "room": "flood"}).decode())
        flooder = await Peer.connect(cluster.url(1), token(settings, "flooder"))
        body = "x" * 2000
        # Flood until the gateway gives up on the slow client: how much the kernel buffers first
        # depends on its socket autotuning. 200 sends in flight at a time (the gateway allows 256).
        for batch in range(40):
            for i in range(batch * 200, batch * 200 + 200):
                await flooder.send({"type": "send", "room": "flood", "client_msg_id": f"f{i}", "body": body})

            async def acked(n: int = batch * 200 + 200) -> bool:
                return len(flooder.acks()) == n

            await eventually(acked, 30, what="flood acked")
            await asyncio.sleep(0.2)
            if scrape(f"{cluster.http(0)}/metrics")["roomcast_gateway_slow_disconnects_total"] >= 1:
                break
        else:
            raise AssertionError("the slow client was never closed")
        flooded = len(flooder.acks())
        # Now read: the backlog that reached the socket, then the 4008 close.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 2**20)
        first: list[dict] = []
        with pytest.raises(websockets.ConnectionClosed):
            async with asyncio.timeout(60):
                async for raw in slow:
                    frame = orjson.loads(raw)
                    if frame["type"] == "message":
                        first.append(frame)
        assert slow.close_code == 4008
        assert 0 < len(first) < flooded
        again = await Peer.connect(cluster.url(1), token(settings, "slow"))
        joined = await again.join("flood", cursor=first[-1]["cursor"])
        assert joined["recovered"] is True

        async def caught_up() -> bool:
            return len(again.messages("flood")) >= flooded - len(first)

        await eventually(caught_up, 30, what="slow client caught up")
        ids = [f["id"] for f in first] + [f["id"] for f in again.messages("flood")]
        assert sorted(ids) == sorted(a["id"] for a in flooder.acks()) and len(ids) == len(set(ids))
        await load.stop_sending()
        await load.drain(30)
        assert load.delivery().ok, str(load.delivery())
        load.check_sends(Allow())
        assert sum(m.client.reconnects for m in load.members) == 0, "nobody else was disconnected"
        for p in (flooder, again):
            await p.close()
    finally:
        await load.close()
        cluster.stop()
