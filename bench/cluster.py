"""A throwaway cluster for one benchmark run, pinned like the peer harness.

    .venv/bin/python -m bench.cluster                   # start, print URLs/PIDs/env, wait for Ctrl-C
    .venv/bin/python -m bench.cluster --env-file /tmp/rc.env --fetch-wait 25

Starts, on 127.0.0.1 free ports: an Apache Kafka node, our own redis-server (AOF on, everysec),
the MySQL database `roomcast_bench` on the configured MariaDB (MYSQL_DSN's server; created,
migrated and emptied), two gateways and the persister. Every server is started while this process
is pinned to the server CPUs (default CPU 0), so the children inherit that affinity (threads
included); afterwards this process moves to the generator CPUs (default CPU 1). The local MariaDB
is not ours and is not pinned (it is the machine's shared server).

Bench settings: the per-user send rate limit is lifted (the generator's senders are paced by the
workload, not by the limit), the JWT secret is random for the run.

Before it reports ready, the broker is warmed (`--warm-up S`, default 30; 0: a cold broker): the
generator's CPU produces and consumes records on a topic of its own for S seconds. A fresh JVM runs
Kafka's code interpreted until its JIT has compiled it: at 400 msgs/s the broker's CPU fell from 43 %
to 20 % of a core over the first ~80 s, and p50 / p99 from 14.6 / 65 ms to 2.7 / 24 ms (bench/README).
A broker in service has long been warm.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from confluent_kafka import OFFSET_END
from confluent_kafka import Consumer as RdConsumer
from confluent_kafka import TopicPartition as RdPartition
from pydantic import SecretStr

from shared.migrate import migrate
from shared.mysql import MysqlTarget
from shared.settings import Settings
from tools import localstack
from tools.localkafka import KafkaCluster
from tools.localstack import LOCALHOST, Proc
from tools.services import start_gateway, start_persister

BENCH_DB = "roomcast_bench"
WARM_UP_TOPIC = "bench.warm-up"
WARM_UP_S = 30.0
STOP_ORDER = ["gateway", "persister", "kafka", "redis"]


def parse_cpus(text: str) -> set[int]:
    """'0' / '0,1' / '0-1' -> {0, 1}."""
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def bench_settings(base: Settings | None = None, **updates: Any) -> Settings:
    base = base or Settings()
    target = MysqlTarget.from_dsn(base.mysql_dsn)
    dsn = urlunsplit(urlsplit(base.mysql_dsn)._replace(path=f"/{BENCH_DB}"))
    defaults: dict[str, Any] = dict(
        mysql_dsn=dsn if target.database != BENCH_DB else base.mysql_dsn,
        jwt_secret=SecretStr(secrets.token_urlsafe(48)),
        send_rate_per_s=1e6, send_burst=1_000_000, max_conns_per_user=100_000,
        kafka_session_timeout_ms=6000, kafka_heartbeat_interval_ms=1000,
        log_level="WARNING", drain_grace_s=1.0, drain_delay_s=0.0,  # no load balancer in front
    )
    defaults.update(updates)
    return base.model_copy(update=defaults)


@contextlib.contextmanager
def pinned(cpus: set[int]) -> Iterator[None]:
    """This thread on `cpus` meanwhile: the processes it starts inherit them (threads included)."""
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, own)


@dataclass
class Cluster:
    settings: Settings
    work: Path
    server_cpus: set[int] = field(default_factory=lambda: {0})
    procs: dict[str, Proc] = field(default_factory=dict)
    gateway_ports: list[int] = field(default_factory=list)
    persister_metrics_port: int = 0

    @property
    def urls(self) -> list[str]:
        return [f"ws://{LOCALHOST}:{p}" for p in self.gateway_ports]

    @property
    def persister_metrics(self) -> str:
        return f"http://{LOCALHOST}:{self.persister_metrics_port}/metrics"

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def gateway_pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items() if name.startswith("gateway")}

    def start_persister(self) -> Proc:
        """Start the persister (again, after a stop: a fresh process, its metrics from zero), pinned
        like the other servers; returns once its metrics answer."""
        self.persister_metrics_port = localstack.free_port()
        with pinned(self.server_cpus):
            proc = start_persister(self.settings, self.work / "logs", metrics_port=self.persister_metrics_port)
        self.procs["persister"] = proc
        return proc

    def env(self) -> dict[str, str]:
        return self.settings.to_env()

    def stop(self) -> None:
        for name in sorted(self.procs, key=lambda n: STOP_ORDER.index(n.split("-")[0])):
            proc = self.procs.pop(name)
            with contextlib.suppress(Exception):
                proc.stop(30)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _empty_bench_db(settings: Settings) -> None:
    target = MysqlTarget.from_dsn(settings.mysql_dsn)
    if "bench" not in target.database:
        raise SystemExit(f"refusing to empty {target.database!r}: the bench database name must contain 'bench'")
    asyncio.run(migrate(settings.mysql_dsn))
    conn = localstack.mysql_connect(target.host, target.port, target.user, target.password, database=target.database)
    try:
        with conn.cursor() as cur:
            cur.execute("DELETE FROM messages")
            cur.execute("DELETE FROM rooms")
        conn.commit()
    finally:
        conn.close()


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def warm_broker(bootstrap: str, seconds: float, partitions: int = 8, readers: int = 4) -> int:
    """The cluster's kind of traffic on WARM_UP_TOPIC for `seconds`, so the broker's JIT has compiled
    its paths: small idempotent acks=all produce requests, consumer groups at the tail (fetches that
    wait for the next record, offset commits), librdkafka readers. Returns the records read."""
    await create_topic(bootstrap, WARM_UP_TOPIC, partitions)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=0)
    consumers = [AIOKafkaConsumer(WARM_UP_TOPIC, bootstrap_servers=bootstrap, group_id=f"{WARM_UP_TOPIC}-{i}",
                                  enable_auto_commit=False) for i in range(readers)]
    await producer.start()
    for c in consumers:
        await c.start()
    deadline = time.monotonic() + seconds

    async def produce(partition: int) -> int:
        while time.monotonic() < deadline:
            await producer.send_and_wait(WARM_UP_TOPIC, b"x" * 100, partition=partition)
            await asyncio.sleep(0.001)
        return 0

    async def consume(consumer: AIOKafkaConsumer) -> int:
        got = 0
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            got += sum(len(records) for records in batches.values())
            if batches:
                await consumer.commit()
        return got

    def tail(reader: int) -> int:  # as the gateways' fan-out reads (librdkafka, partitions assigned)
        got = 0
        c = RdConsumer({"bootstrap.servers": bootstrap, "group.id": f"{WARM_UP_TOPIC}-tail-{reader}",
                        "enable.auto.commit": False, "socket.nagle.disable": True})
        c.assign([RdPartition(WARM_UP_TOPIC, i, OFFSET_END) for i in range(partitions)])
        try:
            while time.monotonic() < deadline:
                got += len(c.consume(1000, 0.2))
        finally:
            c.close()
        return got

    try:
        read = await asyncio.gather(*(consume(c) for c in consumers), *(produce(i) for i in range(partitions)),
                                    *(asyncio.to_thread(tail, i) for i in range(2)))
    finally:
        await producer.stop()
        for c in consumers:
            await c.stop()
    return sum(read)


def start_cluster(settings: Settings | None = None, *, server_cpus: set[int] | None = None,
                  gen_cpus: set[int] | None = None, gateways: int = 2, persister: bool = True,
                  work: Path | None = None, out: Any = None, warm_up_s: float = WARM_UP_S,
                  **updates: Any) -> Cluster:
    """Start everything (see the module doc); returns once every piece answers."""
    def say(text: str) -> None:
        print(text, file=sys.stderr if out is None else out, flush=True)
    server_cpus = server_cpus if server_cpus is not None else {0}
    gen_cpus = gen_cpus if gen_cpus is not None else {1}
    work = work or Path(tempfile.mkdtemp(prefix="roomcast-bench-"))
    logs = work / "logs"
    kafka_port, controller_port, redis_port = localstack.free_ports(3)
    s = bench_settings(settings, kafka_bootstrap=f"{LOCALHOST}:{kafka_port}",
                       redis_url=f"redis://{LOCALHOST}:{redis_port}/0", **updates)
    cluster = Cluster(s, work, server_cpus)
    own = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, server_cpus)  # children inherit it
        t0 = time.monotonic()
        kafka = KafkaCluster.local(work / "kafka", logs, [(kafka_port, controller_port)]).start()
        cluster.procs.update({f"kafka-{i}": proc for i, proc in kafka.procs.items()})
        cluster.procs["redis"] = localstack.start_redis(redis_port, work / "redis", logs, appendonly=True)
        _empty_bench_db(s)
        if persister:
            cluster.start_persister()
        for i in range(gateways):
            port = localstack.free_port()
            name = f"gateway-{'abcdefgh'[i]}"
            cluster.procs[name] = start_gateway(s, port, logs, name=name)
            cluster.gateway_ports.append(port)
        say(f"cluster up in {time.monotonic() - t0:.1f}s: gateways {cluster.urls}, kafka {s.kafka_bootstrap}, "
            f"redis {s.redis_url}, mysql {MysqlTarget.from_dsn(s.mysql_dsn).database}; pids {cluster.pids()}; "
            f"servers on CPU {sorted(server_cpus)}, logs {logs}")
    except BaseException:
        cluster.stop()
        raise
    finally:
        os.sched_setaffinity(0, gen_cpus or own)
    if warm_up_s > 0:
        try:  # (on a thread of its own: the caller may be running an event loop)
            with ThreadPoolExecutor(1) as pool:
                records = pool.submit(asyncio.run, warm_broker(s.kafka_bootstrap, warm_up_s)).result()
        except BaseException:
            cluster.stop()
            raise
        say(f"broker warmed for {warm_up_s:.0f} s ({records:,} records on {WARM_UP_TOPIC})")
    return cluster


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server-cpus", type=parse_cpus, default={0})
    p.add_argument("--fetch-wait", type=int, default=None, help="KAFKA_FETCH_MAX_WAIT_MS for every consumer")
    p.add_argument("--env-file", type=Path, help="write `export NAME=value` lines of the cluster's settings here")
    p.add_argument("--warm-up", type=float, default=WARM_UP_S, help="seconds of traffic to warm the broker; 0: cold")
    args = p.parse_args(argv)
    updates: dict[str, Any] = {}
    if args.fetch_wait is not None:
        updates["kafka_fetch_max_wait_ms"] = args.fetch_wait
    cluster = start_cluster(server_cpus=args.server_cpus, gen_cpus=os.sched_getaffinity(0),
                            warm_up_s=args.warm_up, **updates)
    with cluster:
        if args.env_file:
            args.env_file.write_text("".join(f"export {k}='{v}'\n" for k, v in cluster.env().items()))
        print(" ".join(cluster.urls))
        for name, pid in cluster.pids().items():
            print(f"{name}={pid}")
        print(f"JWT_SECRET={cluster.settings.jwt_secret.get_secret_value()}", flush=True)
        stop = False

        def on_signal(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not stop and all(proc.alive for proc in cluster.procs.values()):
            time.sleep(0.5)
        dead = [n for n, proc in cluster.procs.items() if not proc.alive]
        if dead:
            print(f"died: {dead}; see {cluster.work / 'logs'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
