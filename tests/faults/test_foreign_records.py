"""Records a producer outside roomcast wrote into the topic, under load: garbage bytes and valid JSON
of the wrong shape, in every partition. Every reader skips them with a metric and a log line (the
gateways' fan-out and the persister), none crashes or loops, no partition stalls behind them, and
the chat around them goes on: the oracle holds delivery and storage to the acks as ever."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiomysql
import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer, TopicPartition

from shared.settings import Settings
from tests.faults.harness import Allow, applied_to_the_end, run_load_through, small
from tests.support import Cluster, eventually
from tools.services import scrape

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

LIKE = {"id": "01M8YPFN1Q6RDJ8FE9ZP536S6F", "room": "room-0", "user": "mallory", "body": "hi", "ts": 1796326544439,
        "cmid": "m-1"}
FOREIGN = [  # per partition
    b"\xff\xfe\x00 not json", b"", b"null", b"[1, 2, 3]", b'{"hello": "world"}',
    orjson.dumps({**LIKE, "body": {"$gt": ""}}), orjson.dumps({**LIKE, "ts": "soon"}), orjson.dumps({**LIKE, "id": 7}),
    orjson.dumps({**LIKE, "room": "no such room!"}),
]


@pytest.fixture
def cluster(migrated: Settings, log_dir: Path) -> Iterator[Cluster]:
    c = Cluster(small(migrated), log_dir).start()
    yield c
    c.stop()


def undecodable(url: str) -> float:
    return scrape(url).get("roomcast_undecodable_records_total", 0.0)


async def test_records_of_a_producer_outside_roomcast_are_skipped_and_chat_goes_on(
        cluster: Cluster, redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    s = cluster.settings
    urls = [f"{cluster.http(i)}/metrics" for i in range(len(cluster.gateways))]
    urls.append(f"http://127.0.0.1:{cluster.persister_metrics}/metrics")
    tps = [TopicPartition(s.kafka_topic, p) for p in range(s.kafka_partitions)]
    sent = len(FOREIGN) * len(tps)

    async def produce_foreign_records() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for tp in tps:
                for value in FOREIGN:
                    await producer.send_and_wait(tp.topic, value, key=b"room-0", partition=tp.partition)
        finally:
            await producer.stop()

        async def every_reader_skipped_them() -> bool:
            counts = await asyncio.gather(*(asyncio.to_thread(undecodable, url) for url in urls))
            return all(n >= sent for n in counts)

        await eventually(every_reader_skipped_them, 30, what="the gateways and the persister skipping each record")

    # The load goes on around them: nothing refused, nothing foreign delivered or stored.
    await run_load_through(cluster, produce_foreign_records, redis, mysql, Allow())
    for proc in [*cluster.gateways, cluster.persister]:
        assert proc is not None and proc.alive, f"{proc.name} died"
        assert "undecodable record skipped" in proc.log_path.read_text(), f"{proc.name} logged no skip"
    # No partition stalls behind them: the persister's applied marks reach each log's end.
    await applied_to_the_end(s, redis, timeout=30)
