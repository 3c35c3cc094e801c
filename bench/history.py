"""Workload `history`: latency of a history page served from Redis vs from MySQL.

    roomcast bench history --cluster
    roomcast bench history --url ws://127.0.0.1:8001 --requests 2000 --limit 50
    roomcast bench history --cluster --rate 200 --fanout-rate 400        # under load (issue 21)

Seeds one fresh room with --seed messages (produced straight into the topic, as the gateways do)
and waits until the persister has applied them and moved all but the newest (buffer cap) to MySQL.
Then, over one `roomcast_client.RoomcastClient` connection, --requests sequential requests of each
kind: the newest page (`history` without `before`: served from the room's Redis list) and a page
whose `before` cursor lies far below what Redis holds (served from MySQL). Reports p50/p95/p99/max
per kind (request -> answer, as the client sees it) and checks each page's size.

With --rate: open loop instead. Page k is sent at t0 + k/rate (not when an earlier one answered),
for --duration s, on connection k mod --clients; the connections are spread over the gateways,
and each carries one kind, alternately (half the rate Redis pages, half MySQL pages, at the same
time) and one room of its own (answers are matched to requests by room, and a connection's
requests run concurrently in the gateway). MySQL pages walk `before` cursors over the archived
part, so the gateway's single-flight of identical MySQL reads does not share them. Latency is
request -> answer; `late_p99_ms` is how late the generator sent (its own loop's delay).
With --fanout-rate as well, the fanout workload (bench/fanout.py: 50 rooms x 10 subscribers,
100-byte bodies) runs at that rate through the same gateways during the pages, and its own
latency and deliveries are reported with them; --cluster then starts two gateways, as
`bench fanout --cluster` does.
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

from bench import fanout
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


async def sequential(a: argparse.Namespace, settings: Settings) -> dict[str, Any]:
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


class Pager:
    """One connection asking for pages of one kind in its own room, open loop."""

    def __init__(self, client: RoomcastClient, kind: str, room: str, befores: list[str | None]) -> None:
        self.client, self.kind, self.room, self.befores = client, kind, room, befores
        self.lat: list[int] = []
        self.late: list[int] = []
        self.sizes: set[int] = set()
        self.errors = 0
        self.sent = 0

    def before(self) -> str | None:
        return self.befores[self.sent % len(self.befores)]

    async def page(self, due_ns: int, limit: int) -> None:
        t = time.monotonic_ns()
        self.late.append(t - due_ns)
        before = self.before()
        self.sent += 1
        try:
            page = await self.client.history(self.room, before=before, limit=limit)
        except Exception:  # (a timeout or an error frame: counted, the run goes on)
            self.errors += 1
            return
        self.lat.append(time.monotonic_ns() - t)
        self.sizes.add(len(page.get("messages", [])))


async def seed_rooms(a: argparse.Namespace, settings: Settings) -> tuple[list[str], list[list[Position]], int]:
    """One room per client, seeded at once; returns the rooms, their positions, and how many of
    each room's messages are in Redis."""
    rooms = [f"hist-{uuid.uuid4().hex[:8]}" for _ in range(a.clients)]
    positions = await asyncio.gather(*(seed(settings, room, a.seed) for room in rooms))
    in_redis = max(await asyncio.gather(*(wait_persisted(settings, room, pos[-1])
                                          for room, pos in zip(rooms, positions, strict=True))))
    return rooms, list(positions), in_redis


async def paced(pagers: list[Pager], rate: float, duration: float, limit: int, progress: Progress) -> float:
    """Page k on pagers[k mod n] at t0 + k/rate; returns the seconds from t0 to the last answer."""
    total = max(1, round(rate * duration))
    tasks: set[asyncio.Task[None]] = set()
    t0 = time.monotonic_ns()
    for k in range(total):
        due = t0 + round(k * 1e9 / rate)
        wait = (due - time.monotonic_ns()) / 1e9
        if wait > 0:
            await asyncio.sleep(wait)
        task = asyncio.create_task(pagers[k % len(pagers)].page(due, limit))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        progress.update(f"[history {rate:,.0f} pages/s] {(time.monotonic_ns() - t0) / 1e9:5.1f}s sent {k + 1:,}")
    await asyncio.gather(*tasks)
    progress.done()
    return (time.monotonic_ns() - t0) / 1e9


async def under_load(a: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    if a.clients < 2 or a.clients % 2:
        raise SystemExit("--clients: an even number (half Redis pagers, half MySQL pagers)")
    t0 = time.monotonic()
    rooms, positions, in_redis = await seed_rooms(a, settings)
    archived = a.seed - in_redis
    print(f"seeded {len(rooms)} rooms with {a.seed} messages each in {time.monotonic() - t0:.1f}s; {in_redis} "
          f"in Redis, {archived} in MySQL", file=sys.stderr)
    load = None
    if a.fanout_rate:
        load = fanout.Fanout(fanout.load_args(a.url, a.watch, rate=a.fanout_rate), settings)
        await load.start()
    out: dict[str, Any] = {"workload": "history", **meta(), "rooms": rooms, "seed": a.seed, "in_redis": in_redis,
                           "limit": a.limit, "rate": a.rate, "clients": a.clients, "duration_s": a.duration,
                           "fanout_rate": a.fanout_rate}
    clients = [RoomcastClient(a.url[i % len(a.url)], Tokens(settings, "history").next(), reconnect=False,
                              request_timeout=30) for i in range(a.clients)]
    pagers = []
    for i, (client, room, pos) in enumerate(zip(clients, rooms, positions, strict=True)):
        if i % 2 == 0:
            pagers.append(Pager(client, "redis", room, [None]))
        else:  # every `before` with a full page of archived messages below it
            pagers.append(Pager(client, "mysql", room, [str(p) for p in pos[a.limit:archived]]))
    try:
        await asyncio.gather(*(c.start() for c in clients))
        for pager in pagers:  # warm-up (connections, pools, caches)
            for _ in range(20):
                await pager.client.history(pager.room, before=pager.before(), limit=a.limit)
                pager.sent += 1
        for pager in pagers:
            pager.sent = 0
        progress = Progress()
        if load is not None:
            await load.settle()
            load_step, took_s = await asyncio.gather(load.step(a.fanout_rate, a.duration),
                                                     paced(pagers, a.rate, a.duration, a.limit, progress))
            out["fanout"] = load_step
        else:
            took_s = await paced(pagers, a.rate, a.duration, a.limit, progress)
    finally:
        if load is not None:
            await load.close()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    rows = []
    for kind in ("redis", "mysql"):
        mine = [p for p in pagers if p.kind == kind]
        lat = [ns for p in mine for ns in p.lat]
        late = sorted(ns for p in mine for ns in p.late)
        row: dict[str, Any] = {
            "source": kind, "pages": len(lat), "errors": sum(p.errors for p in mine),
            "page_sizes": sorted({n for p in mine for n in p.sizes}), "pages_per_s": round(len(lat) / took_s, 1),
            **latency_summary(lat), "late_p99_ms": latency_summary(late)["p99_ms"]}
        if load is not None:
            step = out["fanout"]
            row |= {"fanout_p99_ms": step["p99_ms"], "fanout_delivered": step["delivered"],
                    "fanout_lost": step["lost"]}
        out[kind] = row
        rows.append(row)
    print(table(rows, ["source", "pages", "errors", "page_sizes", "pages_per_s", "p50_ms", "p95_ms", "p99_ms",
                       "max_ms", "late_p99_ms", "fanout_p99_ms", "fanout_delivered", "fanout_lost"]))
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    add_cluster_args(p)
    p.add_argument("--seed", type=int, default=2000, help="messages seeded into the room")
    p.add_argument("--limit", type=int, default=50, help="messages per page")
    p.add_argument("--requests", type=int, default=1000, help="sequential requests per kind")
    p.add_argument("--rate", type=float, default=0,
                   help="pages/s over both kinds, open loop, on --clients connections (0: sequential)")
    p.add_argument("--clients", type=int, default=10, help="with --rate: connections (half per kind)")
    p.add_argument("--duration", type=float, default=20, help="with --rate: seconds of paging")
    p.add_argument("--fanout-rate", type=float, default=0,
                   help="with --rate: run the fanout workload at this many msgs/s during the pages")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.fanout_rate and not args.rate:
        raise SystemExit("--fanout-rate goes with --rate")
    with maybe_cluster(args, settings, gateways=2 if args.fanout_rate else 1) as s:
        out = uvloop.run(under_load(args, s) if args.rate else sequential(args, s))
    write_json(args.out, out)
    return 0

