"""Issue 6: every service's /metrics parses as Prometheus text and shows the operator's metrics."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from shared.settings import Settings
from tests.support import Cluster, Peer, eventually, token
from tools import localstack
from tools.services import start_sweeper, wait_http_ok


def families(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


async def test_metrics_of_every_service_after_a_small_run(migrated: Settings, log_dir: Path) -> None:
    settings = migrated.model_copy(update={"buffer_cap": 10, "flush_chunk": 5})
    cluster = Cluster(settings, log_dir).start()
    sweeper_port = localstack.free_port()
    sweeper = start_sweeper(settings, log_dir, name=f"{settings.redis_prefix}-sweeper", metrics_port=sweeper_port)
    try:
        await asyncio.to_thread(wait_http_ok, f"http://127.0.0.1:{sweeper_port}/metrics", sweeper)
        p = await Peer.connect(cluster.url(0), token(settings, "ops"))
        await p.join("metrics-room")
        for i in range(30):
            await p.send({"type": "send", "room": "metrics-room", "client_msg_id": f"m{i}", "body": "x"})

        async def delivered() -> bool:
            return len(p.messages("metrics-room")) == 30

        await eventually(delivered, 20, what="30 messages")
        gw = families(f"{cluster.http(0)}/metrics")
        for name in ("roomcast_gateway_connections", "roomcast_gateway_joins_total",
                     "roomcast_gateway_messages_in_total", "roomcast_gateway_messages_out_total",
                     "roomcast_gateway_send_ack_seconds_bucket", "roomcast_gateway_fanout_queue_frames",
                     "roomcast_gateway_slow_disconnects_total", "roomcast_gateway_fanout_lag_records"):
            assert name in gw, name
        assert gw["roomcast_gateway_messages_in_total"][0][1] == 30
        assert gw["roomcast_gateway_connections"][0][1] == 1
        assert {labels["partition"] for labels, _ in gw["roomcast_gateway_fanout_lag_records"]} == {
            str(i) for i in range(settings.kafka_partitions)}

        async def flushed() -> bool:
            m = families(f"http://127.0.0.1:{cluster.persister_metrics}/metrics")
            return (m.get("roomcast_persister_flushed_messages_total", [({}, 0)])[0][1] >= 20
                    and m["roomcast_persister_buffered_messages"][0][1] <= settings.buffer_cap)

        await eventually(flushed, 20, what="flushes")
        pm = families(f"http://127.0.0.1:{cluster.persister_metrics}/metrics")
        for name in ("roomcast_persister_applied_total", "roomcast_persister_lag_records",
                     "roomcast_persister_buffered_messages", "roomcast_persister_flush_batch_size_bucket",
                     "roomcast_persister_flush_seconds_bucket", "roomcast_persister_flush_errors_total",
                     "roomcast_persister_mysql_insert_statements"):
            assert name in pm, name
        assert pm["roomcast_persister_applied_total"][0][1] == 30
        sm = families(f"http://127.0.0.1:{sweeper_port}/metrics")
        assert any(name.startswith("roomcast_sweeper_") for name in sm), sorted(sm)[:20]
        await p.close()
    finally:
        sweeper.stop()
        cluster.stop()
