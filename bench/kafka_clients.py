"""A Kafka client's CPU per record, aiokafka against librdkafka (confluent-kafka), as a gateway uses
it (not a test).

    .venv/bin/python -m bench.kafka_clients                      # produce: 200/s (one gateway's share at 400)
    .venv/bin/python -m bench.kafka_clients --workload tail      # the fan-out's consumer at the tail
    .venv/bin/python -m bench.kafka_clients --rate 1000 --rounds 5

Starts Apache Kafka (tools/localkafka.py) pinned to --broker-cpus and a topic of 8 partitions, then
runs each client in turn, --rounds times alternating, each in a fresh process pinned to --gen-cpus,
and reports that process's CPU time per record (every thread: librdkafka does its I/O on threads
of its own) over --seconds after a second of warm-up. 200-byte values keyed by one of 50 rooms.

- produce: the process sends --rate records per second with the gateway's producer
  (shared.kafka.new_producer, KAFKA_PRODUCER=aiokafka or librdkafka: acks=all, idempotent,
  linger 0), each send awaited to its acknowledgement in its own task, as a gateway awaits it; also
  the ack latency. The issue's bar for a different client on the send path: 1.5x.
- tail: this script produces --rate records per second while the process reads all 8 partitions
  at the tail (fetch wait 500 ms, as the fan-out) and counts them: aiokafka's getmany (the fan-out's
  call), or a librdkafka Consumer whose `consume` runs on a thread and hands each batch to the loop.

(confluent_kafka.aio.AIOProducer, the library's own asyncio wrapper, is not measured: it holds
sends for up to a second to produce them in batches of up to 1,000 (ack p99 9.6 s here), and with
batch_size=1 and no buffer timeout its sends never completed.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.cluster import parse_cpus
from shared.kafka import all_partitions, new_consumer, new_producer
from shared.settings import Settings
from tools import localstack
from tools.localkafka import KafkaCluster

TOPIC = "kafka-clients-bench"
PARTITIONS = 8
CLIENTS = ("aiokafka", "librdkafka")
WARM_UP_S = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=("produce", "tail"), default="produce")
    p.add_argument("--rate", type=int, default=200, help="records per second")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", default=",".join(CLIENTS))
    p.add_argument("--broker-cpus", type=parse_cpus, default={0})
    p.add_argument("--gen-cpus", type=parse_cpus, default={1})
    p.add_argument("--child", choices=CLIENTS, help=argparse.SUPPRESS)
    p.add_argument("--bootstrap", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings(client: str, boot: str) -> Settings:
    return Settings(kafka_bootstrap=boot, kafka_producer=client, kafka_topic=TOPIC, name="kafka-clients-bench")


async def paced(rate: int, count: int, send: Any) -> None:
    """Start `send(i)` at `rate` per second (open loop), `count` times; wait for all of them."""
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    for i in range(count):
        if (ahead := start + i / rate - time.perf_counter()) > 0:
            await asyncio.sleep(ahead)
        task = asyncio.create_task(send(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.wait(set(tasks))


async def produce_child(client: str, boot: str, rate: int, seconds: float) -> dict[str, float]:
    producer = new_producer(settings(client, boot))
    await producer.start()
    latencies: list[float] = []

    async def send(i: int, record: bool) -> None:
        t0 = time.perf_counter()
        await (await producer.send(TOPIC, b"x" * 200, key=b"room%d" % (i % 50), partition=i % PARTITIONS))
        if record:
            latencies.append(time.perf_counter() - t0)

    await paced(rate, int(rate * WARM_UP_S), lambda i: send(i, False))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await paced(rate, int(rate * seconds), lambda i: send(i, True))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await producer.stop()
    latencies.sort()
    n = len(latencies)
    return {"records": n, "cpu_us_per_record": cpu / n * 1e6, "cpu_pct": 100 * cpu / wall,
            "p50_ms": latencies[n // 2] * 1e3, "p99_ms": latencies[int(n * 0.99)] * 1e3}


async def tail_child(client: str, boot: str, seconds: float) -> dict[str, float]:
    """Count the records arriving at the tail of every partition; CPU over `seconds` after warm-up."""
    got = 0
    stop = asyncio.Event()
    if client == "aiokafka":
        consumer = new_consumer(settings(client, boot))
        await consumer.start()
        consumer.assign(await all_partitions(consumer, TOPIC))
        await consumer.seek_to_end()

        async def read() -> None:
            nonlocal got
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=1000)
                got += sum(len(records) for records in batch.values())
        reader = asyncio.create_task(read())
        close: Any = consumer.stop
    else:
        from confluent_kafka import OFFSET_END, Consumer
        from confluent_kafka import TopicPartition as RdPartition
        rd = Consumer({"bootstrap.servers": boot, "group.id": "kafka-clients-bench", "enable.auto.commit": False,
                       "fetch.wait.max.ms": 500})
        rd.assign([RdPartition(TOPIC, p, OFFSET_END) for p in range(PARTITIONS)])
        loop = asyncio.get_running_loop()
        halt = threading.Event()

        def counted(n: int) -> None:
            nonlocal got
            got += n

        def read_rd() -> None:
            while not halt.is_set():
                if records := rd.consume(500, 0.5):
                    loop.call_soon_threadsafe(counted, len(records))
        thread = threading.Thread(target=read_rd, daemon=True)
        thread.start()
        reader = None

        async def close() -> None:
            halt.set()
            await asyncio.to_thread(thread.join)
            rd.close()
    await asyncio.sleep(WARM_UP_S)
    got0, cpu0, wall0 = got, time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    n, cpu, wall = got - got0, time.process_time() - cpu0, time.perf_counter() - wall0
    stop.set()
    if reader is not None:
        await reader
    await close()
    return {"records": n, "cpu_us_per_record": cpu / max(n, 1) * 1e6, "cpu_pct": 100 * cpu / wall}


def child_main(args: argparse.Namespace) -> None:
    os.sched_setaffinity(0, args.gen_cpus)
    if args.workload == "produce":
        result = asyncio.run(produce_child(args.child, args.bootstrap, args.rate, args.seconds))
    else:
        result = asyncio.run(tail_child(args.child, args.bootstrap, args.seconds))
    print(json.dumps(result))


@contextlib.contextmanager
def local_kafka(cpus: set[int]) -> Iterator[str]:
    """A one-node Kafka pinned to `cpus` with the bench's topic; yields its bootstrap address."""
    ports = localstack.free_ports(2)
    with tempfile.TemporaryDirectory(prefix="roomcast-kafka-clients-bench-") as work:
        mine = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cpus)  # (the broker inherits it)
        kafka = KafkaCluster.local(Path(work), Path(work) / "logs", [(ports[0], ports[1])])
        with kafka.start():
            os.sched_setaffinity(0, mine)
            asyncio.run(create_topic(kafka.bootstrap))
            yield kafka.bootstrap


async def create_topic(boot: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=boot)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1)])
    finally:
        await admin.close()


async def one_round(args: argparse.Namespace, client: str, boot: str) -> dict[str, float]:
    """One child run; in the tail workload this process produces meanwhile (on the broker's CPUs)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.kafka_clients", "--workload", args.workload, "--child", client,
        "--bootstrap", boot, "--rate", str(args.rate), "--seconds", str(args.seconds),
        "--gen-cpus", ",".join(map(str, sorted(args.gen_cpus))), stdout=asyncio.subprocess.PIPE)
    producing = None
    if args.workload == "tail":
        producing = asyncio.create_task(produce_until(boot, args.rate, child))
    out, _ = await child.communicate()
    if producing is not None:
        await producing
    if child.returncode:
        raise SystemExit(f"the {client} run failed (exit {child.returncode})")
    result: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def produce_until(boot: str, rate: int, child: asyncio.subprocess.Process) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=boot, acks="all", enable_idempotence=True, linger_ms=0)
    await producer.start()
    try:
        start, i = time.perf_counter(), 0
        while child.returncode is None:
            if (ahead := start + i / rate - time.perf_counter()) > 0:
                await asyncio.sleep(ahead)
            await producer.send(TOPIC, b"x" * 200, key=b"room%d" % (i % 50), partition=i % PARTITIONS)
            i += 1
    finally:
        await producer.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    clients = args.clients.split(",")
    results: dict[str, list[dict[str, float]]] = {c: [] for c in clients}
    with local_kafka(args.broker_cpus) as boot:
        os.sched_setaffinity(0, args.broker_cpus)  # (the tail workload's producer: off the measured CPUs)
        for round_ in range(args.rounds):
            for client in clients:
                r = asyncio.run(one_round(args, client, boot))
                results[client].append(r)
                acks = f", ack p50 {r['p50_ms']:.2f} / p99 {r['p99_ms']:.2f} ms" if "p99_ms" in r else ""
                print(f"round {round_ + 1} {client:11} {r['cpu_us_per_record']:7.1f} us CPU/record "
                      f"({r['cpu_pct']:.1f} % of a core, {r['records']:,} records){acks}", flush=True)
    base = statistics.median(r["cpu_us_per_record"] for r in results[clients[0]])
    print(f"\n{args.workload}, {args.rate} records/s, {args.seconds:g} s x {args.rounds} rounds, medians:")
    for client in clients:
        cpu = statistics.median(r["cpu_us_per_record"] for r in results[client])
        print(f"  {client:11} {cpu:7.1f} us CPU/record  {base / cpu:.2f}x {clients[0]}")


if __name__ == "__main__":
    main()
