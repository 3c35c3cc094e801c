"""The broker alone (not a test): Apache Kafka's CPU over time at a constant produce rate.

    .venv/bin/python -m bench.broker                         # 400 msgs/s, 3 tail consumers, 60 s
    .venv/bin/python -m bench.broker --consumers 0           # the same without consumers
    .venv/bin/python -m bench.broker --linger 20             # fewer, larger batches
    .venv/bin/python -m bench.broker --nodes 3               # three nodes, RF 3, min ISR 2

Starts Kafka (tools/localkafka.py, as the benchmarks and tests run it) pinned to --broker-cpus,
creates a topic, then produces 200-byte records at --rate (one idempotent producer, acks=all, the
gateway's settings) while --consumers consumers read every partition at the tail (the fan-out
consumer's settings; two gateways and the persister make three). Prints the broker's CPU% for
every --every seconds.

Why: roomcast's benchmarks put the broker on the server core; this shows its share by itself, and
that it stays flat as the log grows (the earlier test broker's cost grew with it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path

import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.cluster import parse_cpus
from tools import localstack
from tools.localkafka import KafkaCluster

TOPIC = "broker-bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=int, default=400, help="records per second")
    p.add_argument("--seconds", type=int, default=60)
    p.add_argument("--every", type=int, default=10, help="report the broker's CPU every N seconds")
    p.add_argument("--consumers", type=int, default=3)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--linger", type=int, default=0, help="the producer's linger_ms")
    p.add_argument("--fetch-wait", type=int, default=500, help="the consumers' fetch_max_wait_ms")
    p.add_argument("--nodes", type=int, choices=(1, 3), default=1)
    p.add_argument("--broker-cpus", type=parse_cpus, default={0})
    p.add_argument("--gen-cpus", type=parse_cpus, default={1})
    return p.parse_args(argv)


async def tail(boot: str, args: argparse.Namespace, stop: asyncio.Event) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=boot, fetch_max_wait_ms=args.fetch_wait,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    consumer.assign([TopicPartition(TOPIC, p) for p in range(args.partitions)])
    got = 0
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200)
            got += sum(len(records) for records in batch.values())
    finally:
        await consumer.stop()
    return got


def busy_s(procs: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs)


async def produce(boot: str, args: argparse.Namespace, broker: list[psutil.Process]) -> tuple[int, list[float]]:
    producer = AIOKafkaProducer(bootstrap_servers=boot, acks="all", enable_idempotence=True, linger_ms=args.linger)
    await producer.start()
    sent, cpu = 0, []
    start = time.perf_counter()
    mark, cpu0 = start, busy_s(broker)
    try:
        while (now := time.perf_counter()) - start < args.seconds:
            if (ahead := start + sent / args.rate - now) > 0:
                await asyncio.sleep(ahead)
            await producer.send(TOPIC, b"x" * 200, key=b"room%d" % (sent % 50))
            sent += 1
            if now - mark >= args.every:
                busy = busy_s(broker)
                cpu.append(100 * (busy - cpu0) / (now - mark))
                mark, cpu0 = now, busy
                print(f"  {now - start:4.0f} s: broker {cpu[-1]:.0f} %", flush=True)
    finally:
        await producer.stop()
    return sent, cpu


async def measure(boot: str, args: argparse.Namespace, broker: list[psutil.Process]) -> None:
    """(`broker`: its processes, one per node; their CPU is summed.)"""
    admin = AIOKafkaAdminClient(bootstrap_servers=boot)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, args.partitions, args.nodes)])
    finally:
        await admin.close()
    stop = asyncio.Event()
    consumers = [asyncio.create_task(tail(boot, args, stop)) for _ in range(args.consumers)]
    sent, cpu = await produce(boot, args, broker)
    stop.set()
    got = await asyncio.gather(*consumers)
    print(f"{args.nodes} node(s): rate {args.rate}/s, {args.consumers} consumers, {args.partitions} partitions, "
          f"linger {args.linger} ms, fetch wait {args.fetch_wait} ms: sent {sent}, consumed {sum(got)}; "
          f"broker CPU % per {args.every} s: {' '.join(f'{c:.0f}' for c in cpu)}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ports = localstack.free_ports(2 * args.nodes)
    with tempfile.TemporaryDirectory(prefix="roomcast-broker-bench-") as work:
        os.sched_setaffinity(0, args.broker_cpus)  # (the broker inherits it)
        kafka = KafkaCluster.local(Path(work), Path(work) / "logs", list(zip(ports[::2], ports[1::2], strict=True)))
        with kafka.start():
            os.sched_setaffinity(0, args.gen_cpus)
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(measure(kafka.bootstrap, args, [psutil.Process(p.pid) for p in kafka.procs.values()]))


if __name__ == "__main__":
    main()
