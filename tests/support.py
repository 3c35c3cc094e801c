"""Helpers shared by the integration, end-to-end and fault tests."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomysql
import orjson
import redis.asyncio as aioredis
import websockets
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from pydantic import SecretStr
from websockets.asyncio.client import ClientConnection

from shared.auth import mint_token
from shared.keys import Keys
from shared.message import Message
from shared.mysql import MysqlTarget
from shared.settings import Settings
from tools import haproxy, localstack
from tools.localstack import Proc
from tools.services import scrape, start_gateway, start_persister


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0, every: float = 0.1,
                     what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(every)
    raise AssertionError(f"{what} not reached within {timeout}s")


@dataclass
class Cluster:
    """Two gateway processes and a persister, on free ports, for one test's settings."""

    settings: Settings
    log_dir: Path
    gateways: list[Proc] = field(default_factory=list)
    persister: Proc | None = None
    persister_metrics: int = 0
    hosts: list[str] = field(default_factory=list)  # each gateway's address
    persister_host: str = localstack.LOCALHOST

    def start(self, gateways: int = 2, persister: bool = True) -> Cluster:
        for _ in range(gateways):
            self.add_gateway()
        if persister:
            self.start_persister()
        return self

    def add_gateway(self, settings: Settings | None = None, wrap: Sequence[str] = (), **env: str) -> Proc:
        """One more gateway (with `settings` of its own, e.g. in a network namespace: `wrap`; `env`:
        more of its environment, e.g. METRICS_PORT)."""
        settings = settings or self.settings
        port = localstack.free_port()
        proc = start_gateway(settings, port, self.log_dir, name=f"{settings.redis_prefix}-gw{port}", wrap=wrap, **env)
        self.gateways.append(proc)
        self.hosts.append(settings.host)
        return proc

    def start_persister(self, settings: Settings | None = None, wrap: Sequence[str] = ()) -> Proc:
        """The persister (with `settings` of its own, e.g. in a network namespace: `wrap`)."""
        settings = settings or self.settings
        self.persister_metrics = self.persister_metrics or localstack.free_port()
        self.persister = start_persister(settings, self.log_dir, name=f"{settings.redis_prefix}-persister",
                                         metrics_port=self.persister_metrics, wrap=wrap)
        self.persister_host = settings.host
        return self.persister

    @property
    def persister_http(self) -> str:
        return f"http://{self.persister_host}:{self.persister_metrics}"

    def url(self, i: int) -> str:
        return f"ws://{self.hosts[i]}:{self.gateways[i].ports[0]}"

    def http(self, i: int) -> str:
        return f"http://{self.hosts[i]}:{self.gateways[i].ports[0]}"

    def stop(self) -> None:
        for p in [*self.gateways, *([self.persister] if self.persister else [])]:
            p.stop()

    def resumed(self, i: int) -> Counter[str]:
        """Messages gateway i replayed on resumes so far, by the store that served them (its metric)."""
        metrics = scrape(f"{self.http(i)}/metrics")
        return Counter({source: int(metrics[f'roomcast_gateway_resumed_messages_total{{source="{source}"}}'])
                        for source in ("redis", "mysql", "kafka")})


@dataclass
class Lb:
    """HAProxy with the production config (deploy/haproxy/haproxy.cfg) in front of a Cluster's
    gateways, on a free port; `overrides` change a directive's value (short timeouts)."""

    proc: Proc
    port: int
    admin: Path

    @classmethod
    def start(cls, cluster: Cluster, work: Path, **overrides: str) -> Lb:
        port = localstack.free_port()
        admin = haproxy.admin_socket(work)
        config = work / "haproxy.cfg"
        ports = [g.ports[0] for g in cluster.gateways]
        config.write_text(haproxy.render(port, ports, admin, {k.replace("_", " "): v for k, v in overrides.items()}))
        proc = haproxy.start_haproxy(config, port, admin, cluster.log_dir, f"{cluster.settings.redis_prefix}-haproxy")
        lb = cls(proc, port, admin)
        localstack.wait_until(lambda: all(s.status == "UP" for s in lb.servers().values()),
                              "every gateway UP in HAProxy", 15, lb.proc)
        return lb

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def servers(self) -> dict[str, haproxy.ServerStat]:
        return haproxy.servers(self.admin)

    def server(self, gateway: Proc) -> haproxy.ServerStat:
        return self.servers()[haproxy.server_name(gateway.ports[0])]

    async def wait_status(self, gateway: Proc, status: str, timeout: float = 15.0) -> float:
        """Until HAProxy shows `gateway` with `status` (UP, DOWN); when it was first seen so."""
        async def seen() -> bool:
            return (await asyncio.to_thread(self.server, gateway)).status == status

        await eventually(seen, timeout, every=0.05, what=f"{gateway.name} {status} in HAProxy")
        return time.monotonic()

    def stop(self) -> None:
        self.proc.stop()


class Peer:
    """A raw v1 protocol client for tests that need frame-level control."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self._new = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self.closed_code: int | None = None

    @classmethod
    async def connect(cls, url: str, token: str) -> Peer:
        return cls(await websockets.connect(f"{url}/ws?v=1&token={token}", max_size=2**22))

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.frames.append(orjson.loads(raw))
                self._new.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed_code = self.ws.close_code
            self._new.set()

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps(frame).decode())

    async def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0,
                       start: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = start
        while True:
            for f in self.frames[seen:]:
                if pred(f):
                    return f
            seen = len(self.frames)
            if self._reader.done():
                raise AssertionError(f"connection closed ({self.closed_code}) while waiting")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching frame within {timeout}s; last: {self.frames[-3:]}")
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), remaining)
            except TimeoutError:
                pass

    async def join(self, room: str, cursor: str | None = None) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "join", "room": room}
        if cursor is not None:
            frame["cursor"] = cursor
        n = len(self.frames)
        await self.send(frame)
        return await self.wait_for(lambda f: f.get("room") == room and f["type"] in ("joined", "error"), start=n)

    def messages(self, room: str | None = None) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == "message" and (room is None or f["room"] == room)]

    def acks(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == "ack"]

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.gather(self._reader, return_exceptions=True)


def isolated_settings(kafka_bootstrap: str, redis_url: str, mysql_server_dsn: str, **overrides: Any) -> Settings:
    """Settings with their own topic, consumer group, key prefix and database. Consumer sessions are
    short (the test brokers allow them: tools/localkafka.py), so a killed persister's partitions
    move within seconds."""
    tag = f"t_{uuid.uuid4().hex[:10]}"
    base: dict[str, Any] = dict(
        kafka_bootstrap=kafka_bootstrap, kafka_topic=f"roomcast.{tag}",
        kafka_signals_topic=f"roomcast.{tag}.signals", kafka_reads_topic=f"roomcast.{tag}.reads",
        kafka_persister_group=f"persister.{tag}",
        kafka_partitions=4, kafka_session_timeout_ms=2000,
        kafka_heartbeat_interval_ms=300, redis_url=redis_url, redis_prefix=tag,
        mysql_dsn=f"{mysql_server_dsn}/rc_{tag}",
        jwt_secret=SecretStr(f"test-secret-{uuid.uuid4().hex}{uuid.uuid4().hex}"),  # 64+ bytes: fit for HS512
        log_json=False,
        drain_delay_s=0.0,  # no load balancer in front (tests/faults/test_lb.py starts one)
    )
    return Settings(**{**base, **overrides})


async def drop_database(dsn: str) -> None:
    t = MysqlTarget.from_dsn(dsn)
    conn = await aiomysql.connect(**t.connect_kwargs(with_db=False))
    async with conn.cursor() as cur:
        await cur.execute(f"DROP DATABASE IF EXISTS `{t.database}`")
    conn.close()


async def delete_keys(client: aioredis.Redis, prefix: str) -> None:
    """Every key under `prefix:`, in bounded SCAN pages and DEL batches."""
    batch: list[bytes] = []
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            await client.delete(*batch)
            batch.clear()
    if batch:
        await client.delete(*batch)


async def produce_messages(settings: Settings, tp: TopicPartition, room: str, n: int) -> None:
    """`n` messages of `room` (ids ID0, ID1, ...) straight into partition `tp`, one acknowledged
    send at a time, as a gateway would produce them."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(n):
            msg = Message(f"ID{i}", room, "alice", f"m{i}", 1_764_000_000_000 + i, f"c{i}")
            await (await producer.send(tp.topic, msg.kafka_value(), key=room.encode(), partition=tp.partition))
    finally:
        await producer.stop()


async def delete_before(settings: Settings, tp: TopicPartition, offset: int) -> None:
    """Move the partition's log start to `offset`, as retention does (Kafka's DeleteRecords)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_records({tp: RecordsToDelete(before_offset=offset)}, timeout_ms=10_000)
    finally:
        await admin.close()


def partition_of(settings: Settings, room: str) -> TopicPartition:
    return TopicPartition(settings.kafka_topic, Keys(settings.redis_prefix, settings.kafka_partitions).partition(room))


def token(settings: Settings, user: str, **kw: Any) -> str:
    return mint_token(settings, user, **kw)


def offset(cursor: str) -> int:
    return int(cursor.split("-", 1)[1])


def rest_history(http: str, room: str, tok: str, limit: int) -> list[dict[str, Any]]:
    """Every message of `room` through the REST history (`http`: a gateway), paged back `limit` at
    a time, oldest first."""
    out: list[dict[str, Any]] = []
    before = ""
    while True:
        req = urllib.request.Request(f"{http}/rooms/{room}/messages?limit={limit}&before={before}",
                                     headers={"Authorization": f"Bearer {tok}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            page = json.loads(r.read())
        out = page["messages"] + out
        if page["next"] is None:
            return out
        before = page["next"]
