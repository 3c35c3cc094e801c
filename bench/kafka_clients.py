"""A Kafka client's CPU per record, aiokafka against librdkafka (confluent-kafka), as a gateway uses
it (not a test).

    .venv/bin/python -m bench.kafka_clients                      # produce: 200/s (one gateway's share at 400)
    .venv/bin/python -m bench.kafka_clients --workload tail      # the fan-out's consumer at the tail
    .venv/bin/python -m bench.kafka_clients --rate 1000 --rounds 5

Starts Apache Kafka (tools/localkafka.py) pinned to --broker-cpus and a topic of 8 partitions, then
runs each client in turn, --rounds times alternating, each in a fresh process pinned to --gen-cpus,
and reports that process's CPU time per record (every thread: librdkafka does its I/O on threads
of its own) over --seconds after a second of warm-up. 200-byte values keyed by one of 50 rooms.

- produce: the process sends --rate records per second, each send awaited to its acknowledgement
  in its own task, as a gateway awaits it; also the ack latency. aiokafka: the gateway's producer
  (shared.kafka.new_producer: acks=all, idempotent, linger 0); librdkafka: confluent_kafka.Producer
  with the same settings, a thread polling for delivery reports that resolves each record's asyncio
  future on the loop (RdSender). The issue's bar for a different client on the send path: 1.5x, and
  the fault suite passing unchanged (it did not: bench/README.md).
- tail: this script produces --rate records per second while the process reads all 8 partitions
  at the tail with the gateway fan-out's reader (gateway.tail.new_tail, KAFKA_FANOUT_CLIENT=aiokafka
  or librdkafka; fetch wait 500 ms) and counts them, no room wanted (the client's cost: fetching,
  and each record's key checked).

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
from confluent_kafka import Producer

from bench.cluster import create_topic, parse_cpus
from gateway.tail import new_tail
from shared.kafka import new_producer
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


def settings(boot: str) -> Settings:
    return Settings(kafka_bootstrap=boot, kafka_topic=TOPIC, name="kafka-clients-bench")


class RdSender:
    """confluent_kafka.Producer with the gateway producer's settings; send() -> delivery future."""

    def __init__(self, boot: str) -> None:
        self.producer = Producer({"bootstrap.servers": boot, "acks": "all", "enable.idempotence": True,
                                  "linger.ms": 0, "socket.nagle.disable": True})
        self.loop = asyncio.get_running_loop()
        self.halt = threading.Event()
        self.poller = threading.Thread(target=self.poll, daemon=True)
        self.poller.start()

    def poll(self) -> None:
        while not self.halt.is_set():
            self.producer.poll(0.1)

    async def send(self, value: bytes, key: bytes, partition: int) -> asyncio.Future[Any]:
        future = self.loop.create_future()

        def delivered(err: Any, msg: Any) -> None:  # (on the polling thread)
            self.loop.call_soon_threadsafe(settle, future, err, msg)
        self.producer.produce(TOPIC, value, key, partition=partition, on_delivery=delivered)
        return future

    async def stop(self) -> None:
        await asyncio.to_thread(self.producer.flush, 10)
        self.halt.set()
        await asyncio.to_thread(self.poller.join)


def settle(future: asyncio.Future[Any], err: Any, msg: Any) -> None:
    if not future.done():
        if err is not None:
            future.set_exception(RuntimeError(err.str()))
        else:
            future.set_result((msg.partition(), msg.offset()))


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
    if client == "aiokafka":
        aio = new_producer(settings(boot))
        await aio.start()

        async def send(value: bytes, key: bytes, partition: int) -> asyncio.Future[Any]:
            return await aio.send(TOPIC, value, key=key, partition=partition)
        stop = aio.stop
    else:
        rd = RdSender(boot)
        send, stop = rd.send, rd.stop
    latencies: list[float] = []

    async def one(i: int, record: bool) -> None:
        t0 = time.perf_counter()
        await (await send(b"x" * 200, b"room%d" % (i % 50), i % PARTITIONS))
        if record:
            latencies.append(time.perf_counter() - t0)

    await paced(rate, int(rate * WARM_UP_S), lambda i: one(i, False))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await paced(rate, int(rate * seconds), lambda i: one(i, True))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await stop()
    latencies.sort()
    n = len(latencies)
    return {"records": n, "cpu_us_per_record": cpu / n * 1e6, "cpu_pct": 100 * cpu / wall,
            "p50_ms": latencies[n // 2] * 1e3, "p99_ms": latencies[int(n * 0.99)] * 1e3}


async def tail_child(client: str, boot: str, seconds: float) -> dict[str, float]:
    """The fan-out's reader of the log (gateway.tail) at the tail of every partition, no room wanted
    (the client's cost: fetching, and each record's key checked); CPU over `seconds` after warm-up."""
    tail = new_tail(settings(boot).model_copy(update={"kafka_fanout_client": client}))
    await tail.start()
    got = 0
    halt = asyncio.Event()

    async def read() -> None:
        nonlocal got
        while not halt.is_set():
            got += sum(f.next_offset - f.first_offset for f in await tail.fetch(lambda key: False))
    reader = asyncio.create_task(read())
    await asyncio.sleep(WARM_UP_S)
    got0, cpu0, wall0 = got, time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    n, cpu, wall = got - got0, time.process_time() - cpu0, time.perf_counter() - wall0
    halt.set()
    await reader
    await tail.stop()
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
            asyncio.run(create_topic(kafka.bootstrap, TOPIC, PARTITIONS))
            yield kafka.bootstrap


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
