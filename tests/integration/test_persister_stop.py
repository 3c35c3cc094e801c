"""A persister asked to stop while Redis does not answer stops (it used to retry Redis until it
was killed: its orchestrator's grace period, every time Redis was away during a deploy)."""

from __future__ import annotations

import asyncio
import time

from tests.faults.proxy import TcpProxy
from tests.support import Cluster


async def test_a_persister_stops_when_asked_while_redis_is_away(
        cluster_behind_a_redis_proxy: tuple[Cluster, TcpProxy]) -> None:
    cluster, redis_proxy = cluster_behind_a_redis_proxy
    assert cluster.persister is not None
    await redis_proxy.cut()
    await asyncio.sleep(1.5)  # its mark checks (every second) now retry Redis
    t0 = time.monotonic()
    code = await asyncio.to_thread(cluster.persister.stop, 10)
    assert code == 0, f"stopped by its own hand, not killed (exit {code})"
    assert time.monotonic() - t0 < 8
    assert "persister stopped" in cluster.persister.log_path.read_text()
