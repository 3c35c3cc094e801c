"""What a record costs a gateway that has no member in its room (not a test).

    .venv/bin/python -m bench.skips                      # 100,000 records, 100 rooms, 8 partitions
    .venv/bin/python -m bench.skips --records 300000

Every gateway consumes every partition of the topic (gateway/fanout.py), so each record costs each
gateway something even when none of its clients is in the room. This starts Apache Kafka
(tools/localkafka.py) pinned to --broker-cpus, produces --records roomcast messages (100-byte
bodies, keyed by room, as gateways produce them), then runs the gateway's own fan-out loop
(gateway.fanout.Fanout on a real consumer, from the start of the log) pinned to --gen-cpus until it
has read every record, and reports the CPU that process spent per record (time.process_time: the
consumer's fetches, aiokafka's record parsing, the key check, and for local rooms the decode and
the frame), for three hubs:
- none: no room has a member here (every record skipped by its key);
- decode-all: the same, but every record decoded and framed (an upper bound of the fan-out before
  the key check, which decoded every record and framed those of local rooms);
- all: every room has one member here (a session that takes the frame and drops it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.cluster import parse_cpus
from gateway.fanout import Fanout
from gateway.hub import Hub
from gateway.tail import new_tail
from shared.auth import Identity
from shared.message import Message
from shared.settings import Settings
from tools import localstack
from tools.localkafka import KafkaCluster

TOPIC = "skips-bench"


class Sink:
    """A session that takes every frame and keeps none."""

    rooms: set[str]

    def __init__(self, user: str) -> None:
        self.identity = Identity(user, (), None)
        self.rooms = set()

    def deliver(self, room: str, offset: int, frame: str, wire: bytes | None = None) -> None:
        pass

    def stop_recovering(self, room: str) -> None:
        pass


async def produce(boot: str, args: argparse.Namespace) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=boot)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, args.partitions, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=boot, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        pending = []
        for i in range(args.records):
            room = f"room-{i % args.rooms}"
            msg = Message(f"m{i:012d}", room, f"user-{i % 1000}", "x" * 100, int(time.time() * 1000), f"c{i}")
            pending.append(await producer.send(TOPIC, msg.kafka_value(), key=room.encode()))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def consume_all(settings: Settings, args: argparse.Namespace, hub_kind: str) -> dict[str, Any]:
    hub = Hub()
    if hub_kind == "all":
        for r in range(args.rooms):
            hub.join(f"room-{r}", Sink(f"u{r}"))  # type: ignore[arg-type]
    fanout = Fanout(settings, hub, new_tail(settings))
    await fanout.start(at_beginning=True)
    if hub_kind == "decode-all":
        # decode every record, then find no member (the fan-out before the key check)
        hub.has_room_key = lambda key: True  # type: ignore[method-assign]
    ends = {p: await fanout.broker_end(p) for p in fanout.partitions}
    cpu0, t0 = time.process_time(), time.perf_counter()
    task = asyncio.create_task(fanout.run())
    while any(fanout.position(p) < end for p, end in ends.items()):  # noqa: ASYNC110 (a poll)
        await asyncio.sleep(0.02)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await fanout.stop()
    n = sum(ends.values())
    return {"hub": hub_kind, "records": n, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
            "us_per_record": round(cpu / n * 1e6, 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--rooms", type=int, default=100)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--reps", type=int, default=3, help="runs of each hub (alternating)")
    p.add_argument("--client", choices=("librdkafka", "aiokafka"), default="librdkafka", help="KAFKA_FANOUT_CLIENT")
    p.add_argument("--broker-cpus", type=parse_cpus, default={0})
    p.add_argument("--gen-cpus", type=parse_cpus, default={1})
    args = p.parse_args(argv)
    ports = localstack.free_ports(2)
    with tempfile.TemporaryDirectory(prefix="roomcast-skips-bench-") as work:
        os.sched_setaffinity(0, args.broker_cpus)  # (the broker inherits it)
        kafka = KafkaCluster.local(Path(work), Path(work) / "logs", [(ports[0], ports[1])])
        with kafka.start():
            os.sched_setaffinity(0, args.gen_cpus)
            settings = Settings(kafka_bootstrap=kafka.bootstrap, kafka_topic=TOPIC, kafka_fanout_client=args.client,
                                kafka_fetch_max_wait_ms=100)
            asyncio.run(produce(kafka.bootstrap, args))
            results = []
            for _ in range(args.reps):
                for kind in ("none", "decode-all", "all"):
                    results.append(asyncio.run(consume_all(settings, args, kind)))
                    print(results[-1], flush=True)
            for kind in ("none", "decode-all", "all"):
                per = sorted(r["us_per_record"] for r in results if r["hub"] == kind)
                print(f"{kind:>10}: {per[len(per) // 2]:.2f} µs of gateway CPU per record "
                      f"(median of {len(per)}: {per})")


if __name__ == "__main__":
    main()
