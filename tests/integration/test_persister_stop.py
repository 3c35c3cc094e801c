"""A persister asked to stop while Redis does not answer stops (it used to retry Redis until it
was killed: its orchestrator's grace period, every time Redis was away during a deploy)."""

from __future__ import annotations

import asyncio

from tests.faults.proxy import TcpProxy
from tests.support import Cluster, eventually
from tools.services import scrape


async def test_a_persister_stops_when_asked_while_redis_is_away(
        cluster_behind_a_redis_proxy: tuple[Cluster, TcpProxy]) -> None:
    cluster, redis_proxy = cluster_behind_a_redis_proxy
    assert cluster.persister is not None
    await redis_proxy.cut()

    async def retrying_redis() -> bool:  # its mark checks (every second) now retry Redis
        metrics = await asyncio.to_thread(scrape, f"http://127.0.0.1:{cluster.persister_metrics}/metrics")
        return metrics["roomcast_persister_redis_errors_total"] > 0

    await eventually(retrying_redis, 30, what="the persister retrying Redis")
    # Given 20 s before it is killed: a persister still retrying Redis then would be, not stopping.
    code = await asyncio.to_thread(cluster.persister.stop, 20)
    assert code == 0, f"stopped by its own hand, not killed (exit {code})"
    assert "persister stopped" in cluster.persister.log_path.read_text()
