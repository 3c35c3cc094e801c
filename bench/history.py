"""Workload `history`: latency of a history page served from Redis vs from MySQL.

    roomcast bench history --cluster
    roomcast bench history --url ws://127.0.0.1:8001 --requests 2000 --limit 50

Seeds one fresh room with --seed messages (produced straight into the topic, as the gateways do)
and waits until the persister has applied them and moved all but the newest (buffer cap) to MySQL.
Then, over one `roomcast_client.RoomcastClient` connection, --requests sequential requests of each
kind: the newest page (`history` without `before`: served from the room's Redis list) and a page
whose `before` cursor lies far below what Redis holds (served from MySQL). Reports p50/p95/p99/max
per kind (request -> answer, as the client sees it) and checks each page's size.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from typing import Any

import redis.asyncio as aioredis
import uvloop
from aiokafka import AIOKafkaProducer
from roomcast_client import RoomcastClient

from bench.common import Progress, Tokens, add_cluster_args, latency_summary, maybe_cluster, meta, table, write_json
from shared.cursor import Position
from shared.keys import Keys
from shared.message import Message, new_message_id
from shared.settings import Settings


async def seed(settings: Settings, room: str, n: int) -> list[Position]:
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futs = []
        for i in range(n):
            msg = Message(new_message_id(), room, "seeder", f"history message {i} " + "x" * 80,
                          int(time.time() * 1000), f"seed-{i}")
            futs.append(await producer.send(settings.kafka_topic, msg.kafka_value(), key=room.encode(),
                                            partition=keys.partition(room)))
        mds = await asyncio.gather(*futs)
    finally:
        await producer.stop()
    return [Position(md.partition, md.offset) for md in mds]


async def wait_persisted(settings: Settings, room: str, last: Position, limit_s: float = 120) -> int:
    """Until the persister applied `last` and the room's list is at most the cap; returns its length."""
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    r = aioredis.from_url(settings.redis_url)
    try:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            mark = await r.get(keys.applied(last.partition))
            length = int(await r.llen(keys.msgs(room)))
            if mark is not None and int(mark) >= last.offset and length <= settings.buffer_cap:
                return length
            await asyncio.sleep(0.2)
        raise TimeoutError("the persister did not apply and flush the seeded room in time")
    finally:
        await r.aclose()


async def main_async(a: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    room = f"hist-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    positions = await seed(settings, room, a.seed)
    in_redis = await wait_persisted(settings, room, positions[-1])
    print(f"seeded {room} with {a.seed} messages in {time.monotonic() - t0:.1f}s; {in_redis} in Redis, "
          f"{a.seed - in_redis} in MySQL", file=sys.stderr)
    # a `before` deep in the MySQL part: the page is the `limit` messages before it
    mysql_before = str(positions[max(a.limit, (a.seed - in_redis) // 2)])
    progress = Progress()
    out: dict[str, Any] = {"workload": "history", **meta(), "room": room, "seed": a.seed, "in_redis": in_redis,
                           "limit": a.limit, "requests": a.requests}
    rows = []
    async with RoomcastClient(a.url[0], Tokens(settings, "history").next(), reconnect=False) as c:
        for kind, before in (("redis", None), ("mysql", mysql_before)):
            for _ in range(min(20, a.requests)):  # warm-up (connections, pools, caches)
                await c.history(room, before=before, limit=a.limit)
            lat: list[int] = []
            sizes = set()
            t_kind = time.monotonic()
            for i in range(a.requests):
                t = time.monotonic_ns()
                page = await c.history(room, before=before, limit=a.limit)
                lat.append(time.monotonic_ns() - t)
                sizes.add(len(page.get("messages", [])))
                progress.update(f"[history {kind}] {i + 1:,}/{a.requests:,} requests")
            progress.done()
            row = {"source": kind, "before": before or "(newest)", "page_sizes": sorted(sizes),
                   "pages_per_s": round(a.requests / (time.monotonic() - t_kind), 1), **latency_summary(lat)}
            out[kind] = row
            rows.append(row)
    print(table(rows, ["source", "before", "page_sizes", "pages_per_s", "p50_ms", "p95_ms", "p99_ms", "max_ms"]))
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    add_cluster_args(p)
    p.add_argument("--seed", type=int, default=2000, help="messages seeded into the room")
    p.add_argument("--limit", type=int, default=50, help="messages per page")
    p.add_argument("--requests", type=int, default=1000, help="sequential requests per kind")


def run(args: argparse.Namespace, settings: Settings) -> int:
    with maybe_cluster(args, settings, gateways=1) as s:
        out = uvloop.run(main_async(args, s))
    write_json(args.out, out)
    return 0

