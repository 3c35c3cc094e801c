"""Load for the fault tests: clients on every node stream messages into a few rooms while a test
breaks something; afterwards the checker compares acks, deliveries and storage."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiomysql
import redis.asyncio as aioredis
from roomcast_client import RoomcastClient

from shared.auth import mint_token
from shared.keys import Keys
from shared.settings import Settings
from tests.support import Cluster
from tools.checker import Ack, Report, check_delivery, check_storage, offset, stored_ids, stored_messages


@dataclass
class Member:
    name: str
    client: RoomcastClient
    rooms: list[str]
    joined: dict[str, str] = field(default_factory=dict)  # room -> cursor at the first join
    received: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    acks: list[Ack] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


class Load:
    """`clients` clients split over `urls`, each in two of `rooms` rooms, each sending `rate` msgs/s."""

    def __init__(self, settings: Settings, urls: list[str], clients: int = 20, rooms: int = 4,
                 rate: float = 5.0) -> None:
        self.settings = settings
        self.urls = urls
        self.rooms = [f"room-{i}" for i in range(rooms)]
        self.n = clients
        self.rate = rate
        self.members: list[Member] = []
        self._senders: list[asyncio.Task[None]] = []
        self._seq = itertools.count()
        self.errors: list[BaseException] = []
        self.bodies: dict[str, str] = {}  # message id -> body, of every message received
        self.given_up: dict[str, str] = {}  # body -> room, of sends that never got an ack

    async def start(self) -> None:
        for i in range(self.n):
            urls = self.urls[i % len(self.urls):] + self.urls[: i % len(self.urls)]
            name = f"user-{i}"
            rooms = [self.rooms[i % len(self.rooms)], self.rooms[(i + 1) % len(self.rooms)]]
            member = Member(name, None, rooms)  # type: ignore[arg-type]
            member.client = RoomcastClient(urls, mint_token(self.settings, name), backoff_base=0.1,
                                           backoff_max=1.0, request_timeout=3.0,
                                           on_message=self._collector(member))
            await member.client.start()
            for room in rooms:
                joined = await member.client.join(room)
                member.joined[room] = joined["cursor"]
            self.members.append(member)
        self._senders = [asyncio.create_task(self._send_loop(m)) for m in self.members]

    def _collector(self, member: Member) -> Any:
        def on_message(frame: dict[str, Any]) -> None:
            member.received.setdefault(frame["room"], []).append((frame["id"], frame["cursor"]))
            self.bodies[frame["id"]] = frame["body"]
        return on_message

    async def _send_loop(self, m: Member) -> None:
        interval = 1.0 / self.rate
        in_flight: set[asyncio.Task[None]] = set()
        try:
            while True:
                k = next(self._seq)
                task = asyncio.create_task(self._send_one(m, m.rooms[k % 2], k))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                await asyncio.sleep(interval)
        except asyncio.CancelledError:
            # stop starting new sends; the ones in flight finish (the client retries them)
            if in_flight:
                await asyncio.wait(in_flight, timeout=60)
            raise

    async def _send_one(self, m: Member, room: str, k: int) -> None:
        t0 = time.monotonic()
        try:
            ack = await asyncio.wait_for(m.client.send(room, f"{m.name}:{k}"), 60)
        except Exception as e:  # a send that never got an ack promises nothing; note why
            self.errors.append(e)
            self.given_up[f"{m.name}:{k}"] = room
            return
        m.acks.append(Ack.from_frame(ack))
        m.latencies.append(time.monotonic() - t0)

    async def stop_sending(self) -> None:
        for t in self._senders:
            t.cancel()
        await asyncio.gather(*self._senders, return_exceptions=True)

    @property
    def acked(self) -> dict[str, list[Ack]]:
        return {m.name: m.acks for m in self.members}

    def owed(self) -> int:
        """Deliveries still missing (each member, each of its rooms, acks after its join)."""
        by_room: dict[str, set[str]] = {}
        for m in self.members:
            for a in m.acks:
                by_room.setdefault(a.room, set()).add(a.id)
        missing = 0
        for m in self.members:
            for room in m.rooms:
                got = {i for i, _ in m.received.get(room, [])}
                missing += len(by_room.get(room, set()) - got)
        return missing

    async def drain(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.owed() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    def maybe(self) -> dict[str, str]:
        """id -> room of the messages received whose send was given up on (it may have reached Kafka
        all the same): allowed once, never owed."""
        return {msg_id: self.given_up[body] for msg_id, body in self.bodies.items() if body in self.given_up}

    def delivery(self) -> Report:
        return check_delivery(self.acked, {m.name: m.received for m in self.members},
                              {m.name: m.joined for m in self.members}, maybe=self.maybe())

    async def storage(self, redis: aioredis.Redis, mysql: aiomysql.Pool, timeout: float = 60.0) -> Report:
        """Storage against the acks, once the persister has had time to catch up."""
        keys = Keys(self.settings.redis_prefix, self.settings.kafka_partitions)
        by_room = self.acked_by_room()
        deadline = time.monotonic() + timeout
        while True:
            stored = {r: stored_ids(await stored_messages(redis, mysql, keys, r)) for r in self.rooms}
            report = check_storage(by_room, stored, self.maybe())
            if report.ok or time.monotonic() > deadline:
                return report
            await asyncio.sleep(0.5)

    def acked_by_room(self) -> dict[str, set[str]]:
        by_room: dict[str, set[str]] = {r: set() for r in self.rooms}
        for m in self.members:
            for a in m.acks:
                by_room[a.room].add(a.id)
        return by_room

    def missing(self) -> str:
        """Per member and room, the acked offsets it never received (for failure messages)."""
        acks = {a.id: a for m in self.members for a in m.acks}
        out = []
        for m in self.members:
            for room in m.rooms:
                got = {i for i, _ in m.received.get(room, [])}
                since = offset(m.joined.get(room, ""))
                lost = sorted(offset(a.cursor) for a in acks.values()
                              if a.room == room and a.id not in got and offset(a.cursor) > since)
                if lost:
                    last = max((offset(c) for _, c in m.received.get(room, [])), default=-1)
                    out.append(f"{m.name}/{room}: {len(lost)} at {lost[0]}..{lost[-1]} (got up to {last})")
        return "; ".join(out)

    def unacked(self) -> str:
        """Received ids no ack named, with the body they carry and the id that body was acked with."""
        acked = {a.id for m in self.members for a in m.acks}
        acked_body = {self.bodies.get(a.id): a.id for m in self.members for a in m.acks}
        out = [f"{msg_id} {body!r} (acked as {acked_body.get(body)})"
               for msg_id, body in self.bodies.items() if msg_id not in acked]
        return "; ".join(out[:5])

    def describe(self) -> str:
        """Per client: reconnects, resume gaps, unmatched errors (for failure messages)."""
        return "; ".join(f"{m.name}: reconnects={m.client.reconnects} gaps={m.client.gaps} "
                         f"errors={m.client.errors}" for m in self.members
                         if m.client.reconnects or m.client.gaps or m.client.errors)

    @property
    def total_acked(self) -> int:
        return sum(len(m.acks) for m in self.members)

    async def close(self) -> None:
        await self.stop_sending()
        for m in self.members:
            with contextlib.suppress(Exception):
                await m.client.close()


def small(settings: Settings, **extra: object) -> Settings:
    return settings.model_copy(update={"buffer_cap": 40, "flush_chunk": 20, **extra})


async def run_load_through(cluster: Cluster, fault: Callable[[], Awaitable[None]], redis: aioredis.Redis,
                           mysql: aiomysql.Pool, rate: float = 5.0) -> Load:
    """Stream from 12 clients over every node, run `fault()` meanwhile, then check everything."""
    load = Load(cluster.settings, [cluster.url(i) for i in range(len(cluster.gateways))],
                clients=12, rooms=4, rate=rate)
    await load.start()
    try:
        await asyncio.sleep(1.5)
        await fault()
        await asyncio.sleep(1.5)
        await load.stop_sending()
        await load.drain(90)
        assert load.total_acked > 50
        delivery = load.delivery()
        assert delivery.ok, (f"delivery: {delivery} ({load.describe()}) missing: {load.missing()} "
                             f"unacked: {load.unacked()}")
        storage = await load.storage(redis, mysql, timeout=90)
        assert storage.ok, f"storage: {storage}"
    finally:
        await load.close()
    return load
