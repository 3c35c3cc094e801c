"""Workload `rebalance`: what a persister joining the group costs, for several partition counts.

    roomcast bench rebalance --cluster                        # 8, 32 and 128 partitions at 400 msgs/s
    roomcast bench rebalance --cluster --partitions 8,32 --rate 1000

For each partition count: a throwaway cluster (bench/cluster.py: Kafka, Redis, the persister, no
gateways) on a topic of that many partitions; records produced at --rate over 4 rooms per
partition (the gateways' record format, key = room); once the persister keeps up, a second
persister starts. Every 100 ms the applied marks (Redis) and end offsets (Kafka) are read.
Reported: `settled_s`, from the second persister's start (its process: Python's start-up is part
of joining) to the group being Stable with two members; `caught_up_s`, from its start until the
lag is back under --steady records; `pause_s`, the longest a partition with records waiting saw
its mark stand still; and `backlog`, the largest total lag meanwhile (produced, not yet applied).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import uvloop
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench.common import add_cluster_args, maybe_cluster, meta, table, write_json
from shared.kafka import new_consumer
from shared.keys import Keys
from shared.message import Message, new_message_id
from shared.redisconn import connect
from shared.settings import Settings
from tools.services import start_persister


async def produce(settings: Settings, rate: float, stop: asyncio.Event) -> None:
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    rooms: list[str] = []
    for i in range(100_000):  # 4 rooms per partition
        room = f"rebalance-{i}"
        if sum(keys.partition(r) == keys.partition(room) for r in rooms) < 4:
            rooms.append(room)
        if len(rooms) == 4 * settings.kafka_partitions:
            break
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True,
                                linger_ms=5)
    await producer.start()
    try:
        t0, sent = time.monotonic(), 0
        while not stop.is_set():
            room = rooms[sent % len(rooms)]
            msg = Message(new_message_id(), room, "bench", "x" * 100, int(time.time() * 1000), f"c{sent}")
            await producer.send(settings.kafka_topic, msg.kafka_value(), key=room.encode())
            sent += 1
            if (ahead := t0 + sent / rate - time.monotonic()) > 0:
                await asyncio.sleep(ahead)
    finally:
        await producer.stop()


class Lag:
    """Each partition's records not yet applied: Kafka's end offset - 1 - the applied mark."""

    def __init__(self, settings: Settings) -> None:
        self.keys = Keys(settings.redis_prefix, settings.kafka_partitions)
        self.redis = connect(settings, timeout_s=5, connect_timeout_s=3)
        self.consumer = new_consumer(settings)
        self.tps = [TopicPartition(settings.kafka_topic, p) for p in range(settings.kafka_partitions)]

    async def now(self) -> dict[int, tuple[int, int]]:
        """partition -> (mark, lag)."""
        ends = await self.consumer.end_offsets(self.tps)
        raw = await self.redis.mget([self.keys.applied(tp.partition) for tp in self.tps])
        marks = [-1 if m is None else int(m) for m in raw]
        return {tp.partition: (mark, max(0, ends[tp] - 1 - mark)) for tp, mark in zip(self.tps, marks, strict=True)}


async def group_state(admin: AIOKafkaAdminClient, group: str) -> tuple[str, int]:
    [response] = await admin.describe_consumer_groups([group])
    _, _, state, _, _, members, *_ = response.groups[0]
    return state, len(members)


async def measure(settings: Settings, a: argparse.Namespace, logs: Any) -> dict[str, Any]:
    lag = Lag(settings)
    await lag.consumer.start()
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    stop = asyncio.Event()
    producer = asyncio.create_task(produce(settings, a.rate, stop))
    second = None
    try:
        deadline = time.monotonic() + 120
        while sum(lg for _, lg in (await lag.now()).values()) > a.steady:  # the first persister keeps up
            assert time.monotonic() < deadline, "the first persister never caught up"
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)
        t0 = time.monotonic()
        second = start_persister(settings, logs, f"persister-2-{settings.kafka_partitions}")  # (no wait)
        settled = caught_up = None
        pause = 0.0
        backlog = 0
        last = await lag.now()
        since = {p: t0 for p in last}
        while caught_up is None or settled is None:
            now_t = time.monotonic()
            assert now_t - t0 < a.timeout, f"no steady state {a.timeout}s after the second persister started"
            state = await lag.now()
            for p, (mark, behind) in state.items():
                if mark != last[p][0] or behind == 0:
                    since[p] = now_t
                pause = max(pause, now_t - since[p])
            last = state
            total = sum(lg for _, lg in state.values())
            backlog = max(backlog, total)
            if settled is None and await group_state(admin, settings.kafka_persister_group) == ("Stable", 2):
                settled = now_t - t0
            if settled is not None and caught_up is None and total <= a.steady:
                caught_up = now_t - t0
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await producer
        if second is not None:
            second.stop()
        await admin.close()
        await lag.consumer.stop()
        await lag.redis.aclose()
    return {"partitions": settings.kafka_partitions, "rate": a.rate, "settled_s": round(settled, 2),
            "caught_up_s": round(caught_up, 2), "pause_s": round(pause, 2), "backlog": backlog}


def add_args(p: argparse.ArgumentParser) -> None:
    add_cluster_args(p)
    p.add_argument("--partitions", default="8,32,128", help="comma-separated partition counts")
    p.add_argument("--rate", type=float, default=400.0, help="records per second, all rooms")
    p.add_argument("--steady", type=int, default=50, help="total lag (records) that counts as keeping up")
    p.add_argument("--timeout", type=float, default=120.0)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if not args.cluster:
        raise SystemExit("rebalance starts its own persisters: give --cluster")
    args.url = ["-"]
    rows = []
    for n in (int(p) for p in args.partitions.split(",")):
        s = settings.model_copy(update={"kafka_partitions": n, "kafka_topic": f"bench.rebalance.{uuid.uuid4().hex[:8]}",
                                        "kafka_persister_group": f"persister-{uuid.uuid4().hex[:8]}"})
        with maybe_cluster(args, s, gateways=0) as cs:
            rows.append(uvloop.run(measure(cs, args, args.cluster_obj.work / "logs")))
        print(table(rows[-1:], list(rows[-1])), flush=True)
    print(table(rows, list(rows[0])))
    write_json(args.out, {"workload": "rebalance", **meta(), "runs": rows})
    return 0
