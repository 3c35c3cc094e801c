"""Load for the fault tests: clients on every node stream messages into a few rooms while a test
breaks something; afterwards the checker compares every send's outcome with what the server sent
each client (every frame, below the client library's own filtering) and with what is stored.

Every send ends acked, refused with a named error, or given up after SEND_TIMEOUT_S; each fault
test says what its fault may cost (`Allow`) and fails beyond that."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomysql
import redis.asyncio as aioredis
from aiokafka import TopicPartition
from roomcast_client import RoomcastClient, RoomcastError, apply

from shared.auth import mint_token
from shared.kafka import new_consumer
from shared.keys import Keys
from shared.settings import Settings
from tests.support import Cluster, eventually
from tools.checker import (
    Ack,
    Allow,
    Copy,
    Report,
    Unacked,
    check_delivery,
    check_sends,
    check_storage,
    offset,
    stored_messages,
)

SEND_TIMEOUT_S = 60.0  # a send not acked by then is given up (the client stops trying it)
STARTING_AT_ONCE = 10  # clients connecting and joining at a time
RESUME_ROOMS = 50  # rooms per connection of the fresh resume (under max_rooms_per_conn)

# A message's final state, as every path must show it in the end: (body, edited), or None: deleted.
State = tuple[str, bool] | None


@dataclass(frozen=True, slots=True)
class Change:
    """An edit or delete of one of the member's own acked messages (`target`), and its outcome:
    "acked" (`cursor`: the event's position), "timeout" or the code it was refused with."""

    kind: str  # "edit" or "delete"
    target: Ack
    client_msg_id: str
    body: str  # (an edit's new body; "" for a delete)
    outcome: str
    cursor: str = ""


@dataclass
class Member:
    name: str
    client: RoomcastClient
    rooms: list[str]
    joined: dict[str, str] = field(default_factory=dict)  # room -> cursor at the first join
    frames: dict[str, list[Copy]] = field(default_factory=dict)  # room -> message frames, as sent
    acks: list[Ack] = field(default_factory=list)
    unacked: list[Unacked] = field(default_factory=list)
    refusals: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, code) per error answer
    latencies: list[float] = field(default_factory=list)
    sent: int = 0  # sends started
    raw: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # room -> message/edit/delete frames, as sent
    mine: list[Ack] = field(default_factory=list)  # its acked messages it may still edit or delete
    busy: set[str] = field(default_factory=set)  # ids of its messages with an edit or delete in flight
    changes: list[Change] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)  # joined and message frames as they came (for failure messages)


class Load:
    """`clients` clients split over `urls`, each in two of `rooms` rooms, each sending `rate` msgs/s;
    of those operations, the fractions `edits` and `deletes` change one of its own acked messages."""

    def __init__(self, settings: Settings, urls: list[str], clients: int = 20, rooms: int = 4,
                 rate: float = 5.0, edits: float = 0.0, deletes: float = 0.0) -> None:
        self.settings = settings
        self.edits, self.deletes = edits, deletes
        self.urls = urls
        self.rooms = [f"room-{i}" for i in range(rooms)]
        self.n = clients
        self.rate = rate
        self.members: list[Member] = []
        self._senders: list[asyncio.Task[None]] = []
        self._seq = itertools.count()
        self.windows: list[tuple[float, float]] = []  # (start, end) of each fault, monotonic
        self.foreign: list[Unacked] = []  # written into its rooms by the test itself, not by its clients
        self.started = self.stopped = 0.0  # when sending started and stopped, monotonic

    async def start(self) -> None:
        """Connect and join every client (a few at a time: 200 one by one take a while), then send."""
        at_once = asyncio.Semaphore(STARTING_AT_ONCE)
        self.members = list(await asyncio.gather(*(self._member(i, at_once) for i in range(self.n))))
        self.started = time.monotonic()
        self._senders = [asyncio.create_task(self._send_loop(m)) for m in self.members]

    async def _member(self, i: int, at_once: asyncio.Semaphore) -> Member:
        urls = self.urls[i % len(self.urls):] + self.urls[: i % len(self.urls)]
        name = f"user-{i}"
        rooms = [self.rooms[i % len(self.rooms)], self.rooms[(i + 1) % len(self.rooms)]]
        member = Member(name, None, rooms)  # type: ignore[arg-type]
        member.client = RoomcastClient(urls, mint_token(self.settings, name), backoff_base=0.1,
                                       backoff_max=1.0, request_timeout=3.0,
                                       on_message=_ignore, on_frame=self._recorder(member))
        async with at_once:
            await member.client.start()
            for room in rooms:
                joined = await member.client.join(room)
                member.joined[room] = joined["cursor"]
        return member

    @staticmethod
    def _recorder(member: Member) -> Callable[[dict[str, Any]], None]:
        def on_frame(frame: dict[str, Any]) -> None:
            kind = frame.get("type")
            if kind in ("message", "edit", "delete"):
                member.raw.setdefault(frame["room"], []).append(frame)
            if kind == "message":
                member.frames.setdefault(frame["room"], []).append(Copy.from_frame(frame))
                member.trace.append(f"{frame['room']} {frame['cursor']} {frame['id']}")
            elif kind == "joined":
                member.trace.append(f"joined {frame['room']} at {frame['cursor']} recovered={frame.get('recovered')} "
                                    f"(connection {member.client.reconnects + 1})")
            elif kind == "error" and str(frame.get("ref", "")).startswith(f"{member.name}-"):
                member.refusals.append((time.monotonic(), frame["code"]))
            elif kind == "error":  # (a join's, or one without a ref)
                member.trace.append(f"error {frame.get('code')} ref={frame.get('ref')} ({frame.get('reason')}) "
                                    f"(connection {member.client.reconnects + 1})")
        return on_frame

    async def _send_loop(self, m: Member) -> None:
        """`rate` sends a second on a fixed schedule (a loop that falls behind sends late, and the
        achieved rate shows it: `pace`)."""
        interval = 1.0 / self.rate
        in_flight: set[asyncio.Task[None]] = set()
        due = time.monotonic() + random.uniform(0, interval)  # (the clients' sends spread over the interval)
        try:
            while True:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                due += interval
                k = next(self._seq)
                roll, free = random.random(), [a for a in m.mine if a.id not in m.busy]
                if free and roll < self.deletes + self.edits:
                    kind = "delete" if roll < self.deletes else "edit"
                    task = asyncio.create_task(self._change(m, kind, random.choice(free), k))
                else:
                    room = m.rooms[m.sent % 2]  # (its own count: clients on a fixed schedule take turns in a
                    m.sent += 1                 # fixed order, so the parity of k would pin each to one room)
                    task = asyncio.create_task(self._send_one(m, room, k))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        except asyncio.CancelledError:
            # stop starting new sends; the ones in flight finish (the client retries them)
            if in_flight:
                await asyncio.wait(in_flight)
            raise

    async def _send_one(self, m: Member, room: str, k: int) -> None:
        cmid, body = f"{m.name}-{k}", f"{m.name}:{k}"
        t0 = time.monotonic()
        try:
            ack = await asyncio.wait_for(m.client.send(room, body, client_msg_id=cmid), SEND_TIMEOUT_S)
        except TimeoutError:
            m.unacked.append(Unacked(room, m.name, cmid, body, "timeout"))
            return
        except RoomcastError as e:
            m.unacked.append(Unacked(room, m.name, cmid, body, e.code))
            return
        m.acks.append(Ack.from_frame(ack, m.name, body))
        m.mine.append(m.acks[-1])
        m.latencies.append(time.monotonic() - t0)

    async def _change(self, m: Member, kind: str, target: Ack, k: int) -> None:
        """Edit or delete `target`. A message whose change got no ack is left alone afterwards (that
        change may or may not have happened: the oracle allows either)."""
        cmid, body = f"{m.name}-{k}", f"{target.body} edit {k}" if kind == "edit" else ""
        m.busy.add(target.id)
        if kind == "delete":
            m.mine.remove(target)
        change = (m.client.edit(target.room, target.id, body, client_msg_id=cmid) if kind == "edit"
                  else m.client.delete(target.room, target.id, client_msg_id=cmid))
        try:
            ack = await asyncio.wait_for(change, SEND_TIMEOUT_S)
        except (TimeoutError, RoomcastError) as e:
            m.changes.append(Change(kind, target, cmid, body, getattr(e, "code", "timeout")))
            if target in m.mine:
                m.mine.remove(target)
            return
        finally:
            m.busy.discard(target.id)
        m.changes.append(Change(kind, target, cmid, body, "acked", ack["cursor"]))

    async def stop_sending(self) -> None:
        if self._senders and not self.stopped:
            self.stopped = time.monotonic()
        for t in self._senders:
            t.cancel()
        await asyncio.gather(*self._senders, return_exceptions=True)

    def pace(self) -> str:
        """The rate asked for and the rate the sends started at, and the ack latency (for the log)."""
        took = (self.stopped or time.monotonic()) - self.started
        sent = sum(m.sent for m in self.members)
        latencies = sorted(x for m in self.members for x in m.latencies) or [0.0]
        p50, p99 = (latencies[int(q * (len(latencies) - 1))] for q in (0.5, 0.99))
        return (f"{self.n} clients in {len(self.rooms)} rooms: asked {self.rate * self.n:.0f} msgs/s, sent "
                f"{sent} in {took:.0f} s ({sent / max(took, 1e-9):.0f} msgs/s); ack latency p50 {p50 * 1000:.0f} ms, "
                f"p99 {p99 * 1000:.0f} ms, max {latencies[-1]:.1f} s")

    @contextlib.asynccontextmanager
    async def fault(self) -> Any:
        """Marks the fault's window: refusals are allowed inside it only (see Allow)."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.windows.append((start, time.monotonic()))

    @property
    def acked(self) -> dict[str, list[Ack]]:
        return {m.name: m.acks for m in self.members}

    @property
    def all_acks(self) -> list[Ack]:
        return [a for m in self.members for a in m.acks]

    @property
    def unacked(self) -> list[Unacked]:
        """Every send that got no ack, and what the test wrote itself (each may show up once)."""
        return [u for m in self.members for u in m.unacked] + self.foreign

    def unacked_changes(self) -> list[Unacked]:
        """Every edit and delete that got no ack, as the sends without one (Allow.unacked counts both)."""
        return [Unacked(c.target.room, m.name, c.client_msg_id, c.body, c.outcome)
                for m in self.members for c in m.changes if c.outcome != "acked"]

    def final_states(self) -> dict[str, set[State]]:
        """Every acked message's final state, as its acked edits and deletes make it in cursor order
        (a delete final), or also as a change without an ack could have left it."""
        changes = sorted(((offset(c.cursor), c) for m in self.members for c in m.changes if c.outcome == "acked"),
                         key=lambda oc: oc[0])
        final: dict[str, State] = {a.id: (a.body, False) for a in self.all_acks}
        for _, c in changes:
            if final[c.target.id] is not None:
                final[c.target.id] = (c.body, True) if c.kind == "edit" else None
        allowed = {msg_id: {state} for msg_id, state in final.items()}
        for m in self.members:
            for c in m.changes:
                if c.outcome != "acked" and final[c.target.id] is not None:
                    allowed[c.target.id].add((c.body, True) if c.kind == "edit" else None)
        return allowed

    def deleted_bodies(self) -> set[str]:
        """Every body a message deleted for sure had (sent or edited in): none may be left anywhere."""
        gone = {msg_id for msg_id, states in self.final_states().items() if states == {None}}
        bodies = {a.body for a in self.all_acks if a.id in gone}
        return bodies | {c.body for m in self.members for c in m.changes if c.target.id in gone and c.body}

    def wrong(self, view: dict[str, State], ids: set[str] | None = None) -> list[tuple[str, object, set[State]]]:
        """The acked messages of `ids` (default all) that `view` does not show in a final state the
        oracle allows: (id, as shown, as allowed)."""
        allowed = self.final_states()
        return [(msg_id, view.get(msg_id, "missing"), allowed[msg_id])
                for msg_id in sorted(allowed if ids is None else ids)
                if view.get(msg_id, "missing") not in allowed[msg_id]]

    def check_final(self, what: str, view: dict[str, State], ids: set[str] | None = None) -> None:
        wrong = self.wrong(view, ids)
        assert not wrong, (f"{what}: {len(wrong)} of {len(self.all_acks if ids is None else ids)} not as the "
                           f"oracle has them, e.g. {wrong[:3]}")

    def live_views(self) -> dict[str, tuple[dict[str, State], set[str]]]:
        """Per member: every frame it got applied in order, and the acked messages it is owed."""
        out = {}
        for m in self.members:
            messages: dict[str, dict[str, Any]] = {}
            for room in m.rooms:
                for frame in m.raw.get(room, []):
                    apply(messages, frame)
            owed = {a.id for a in self.all_acks if a.room in m.rooms and offset(a.cursor) > offset(m.joined[a.room])}
            out[m.name] = (state_of(messages), owed)
        return out

    async def resumed(self, url: str, timeout: float = 60.0) -> dict[str, State]:
        """Every room replayed to a fresh client from the earliest join cursor, every frame applied
        in order, once the replay has reached every room's last acked message or change."""
        start = {room: min((m.joined[room] for m in self.members if room in m.joined), key=offset)
                 for room in self.rooms}
        last: dict[str, int] = {}
        for cursor, room in [(a.cursor, a.room) for a in self.all_acks] + [
                (c.cursor, c.target.room) for m in self.members for c in m.changes if c.outcome == "acked"]:
            last[room] = max(last.get(room, -1), offset(cursor))
        frames: dict[str, list[dict[str, Any]]] = {}

        def on_frame(frame: dict[str, Any]) -> None:
            if frame.get("type") in ("message", "edit", "delete"):
                frames.setdefault(frame["room"], []).append(frame)

        tok = mint_token(self.settings, "resumer")
        clients = [RoomcastClient([url], tok, on_message=_ignore, on_frame=on_frame)
                   for _ in range(0, len(self.rooms), RESUME_ROOMS)]
        try:
            for i, client in enumerate(clients):
                await client.start()
                for room in self.rooms[i * RESUME_ROOMS:(i + 1) * RESUME_ROOMS]:
                    joined = await client.join(room, cursor=start[room])
                    assert joined["recovered"] is True, f"the resume of {room} from {start[room]}: {joined}"

            async def replayed() -> bool:
                return all(any(offset(f["cursor"]) >= last[room] for f in frames.get(room, []))
                           for room in last)

            await eventually(replayed, timeout, what="the fresh resume replayed to every room's last change")
        finally:
            for client in clients:
                await client.close()
        messages: dict[str, dict[str, Any]] = {}
        for room_frames in frames.values():
            for frame in room_frames:
                apply(messages, frame)
        return state_of(messages)

    def owed(self) -> int:
        """Deliveries still missing (each member, each of its rooms, acks after its join)."""
        by_room: dict[str, set[str]] = {}
        for a in self.all_acks:
            by_room.setdefault(a.room, set()).add(a.id)
        missing = 0
        for m in self.members:
            for room in m.rooms:
                got = {c.id for c in m.frames.get(room, [])}
                missing += len(by_room.get(room, set()) - got)
        return missing

    async def drain(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.owed() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    def delivery(self) -> Report:
        return check_delivery(self.acked, {m.name: m.frames for m in self.members},
                              {m.name: m.joined for m in self.members}, unacked=self.unacked)

    async def storage(self, redis: aioredis.Redis, mysql: aiomysql.Pool, timeout: float = 60.0) -> Report:
        """Storage against the sends, once the persister has had time to catch up."""
        keys = Keys(self.settings.redis_prefix, self.settings.kafka_partitions)
        deadline = time.monotonic() + timeout
        while True:
            stored = {r: await stored_messages(redis, mysql, keys, r) for r in self.rooms}
            report = check_storage(self.all_acks, stored, self.unacked)
            if report.ok or time.monotonic() > deadline:
                return report
            await asyncio.sleep(0.5)

    def outcomes(self) -> Counter[str]:
        """Every send's outcome ("acked", "timeout" or the code it was refused with), and every error
        answer to an attempt ("refusals:<code>"; the client tried `unavailable` ones again)."""
        out: Counter[str] = Counter(acked=len(self.all_acks))
        out.update(u.outcome for m in self.members for u in m.unacked)
        out.update(f"{c.kind}:{c.outcome}" for m in self.members for c in m.changes)
        out.update(f"refusals:{code}" for m in self.members for _, code in m.refusals)
        return out

    def check_sends(self, allow: Allow) -> None:
        """Fails when the fault cost more than `allow` (a refusal outside every window counts as one
        too many)."""
        line = f"sends: {dict(sorted(self.outcomes().items()))}"
        print(line)
        problems = check_sends([u for m in self.members for u in m.unacked] + self.unacked_changes(),
                               [t for m in self.members for t, _ in m.refusals], self.windows, allow)
        assert not problems, f"{line}: {'; '.join(problems)}; allowed {allow}"

    def missing(self) -> str:
        """Per member and room, the acked offsets it never received (for failure messages)."""
        acks = {a.id: a for a in self.all_acks}
        out = []
        for m in self.members:
            for room in m.rooms:
                got = {c.id for c in m.frames.get(room, [])}
                since = offset(m.joined.get(room, ""))
                lost = sorted(offset(a.cursor) for a in acks.values()
                              if a.room == room and a.id not in got and offset(a.cursor) > since)
                if lost:
                    last = max((offset(c.cursor) for c in m.frames.get(room, [])), default=-1)
                    out.append(f"{m.name}/{room}: {len(lost)} at {lost[0]}..{lost[-1]} (got up to {last})")
        return "; ".join(out)

    def around(self, report: Report) -> str:
        """What the members got around the first duplicated and the first lost id (failure messages)."""
        out = []
        [copied, *_] = report.examples.get("duplicated", [""])
        for m in self.members:
            where = [i for i, line in enumerate(m.trace) if copied and line.endswith(copied)]
            if len(where) > 1:
                out.append(f"{m.name} got it twice: {m.trace[max(0, where[0] - 3):where[-1] + 1][:40]}")
                break
        lost = {a.id: a for a in self.all_acks}.get(report.examples.get("lost", [""])[0])
        for m in self.members if lost is not None else ():
            if lost is not None and lost.room in m.rooms and all(c.id != lost.id for c in m.frames.get(lost.room, [])):
                lines = [line for line in m.trace
                         if line.split()[0] == lost.room or line.startswith(("joined", "error"))]
                out.append(f"{m.name} never got {lost.id} at {lost.cursor}: last frames {lines[-12:]}")
                break
        return "; ".join(out)

    def describe(self) -> str:
        """Per client: reconnects, resume gaps, repeats it dropped, unmatched errors (for failure messages)."""
        shown = [f"{m.name}: reconnects={m.client.reconnects} gaps={m.client.gaps} "
                 f"dropped={m.client.duplicates_dropped} errors={m.client.errors}" for m in self.members
                 if m.client.reconnects or m.client.gaps or m.client.errors or m.client.duplicates_dropped]
        return "; ".join(shown[:10]) + (f"; and {len(shown) - 10} more" if len(shown) > 10 else "")

    @property
    def total_acked(self) -> int:
        return len(self.all_acks)

    async def close(self) -> None:
        await self.stop_sending()
        for m in self.members:
            with contextlib.suppress(Exception):
                await m.client.close()


def state_of(messages: dict[str, dict[str, Any]]) -> dict[str, State]:
    """id -> final state of messages as the client library's apply() leaves them."""
    return {msg_id: None if m.get("deleted") else (m["body"], "edited_ts" in m) for msg_id, m in messages.items()}


def _ignore(frame: dict[str, Any]) -> None:
    """Messages are recorded as the server sent them (on_frame); the client's own stream is unused."""


async def applied_to_the_end(settings: Settings, redis: aioredis.Redis, timeout: float = 60.0) -> None:
    """Until the persister has applied every partition up to its log's end (nothing stuck)."""
    tps = [TopicPartition(settings.kafka_topic, p) for p in range(settings.kafka_partitions)]
    consumer = new_consumer(settings)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)

    async def reached() -> bool:
        marks = [await redis.get(keys.applied(tp.partition)) for tp in tps]
        return all(ends[tp] == 0 or (m is not None and int(m) >= ends[tp] - 1)
                   for m, tp in zip(marks, tps, strict=True))

    await eventually(reached, timeout, what="every partition applied to its log's end")


async def history(client: RoomcastClient, room: str) -> list[Copy]:
    """The room's messages, oldest first, from paging its history back from the newest page."""
    pages: list[list[Copy]] = []
    before = None
    while True:
        page = await client.history(room, before=before, limit=100)
        pages.append([Copy.from_frame(m, "history") for m in page["messages"]])
        if page["next"] is None:
            break
        before = page["next"]
    return [m for ms in reversed(pages) for m in ms]


def small(settings: Settings, **extra: object) -> Settings:
    return settings.model_copy(update={"buffer_cap": 40, "flush_chunk": 20, **extra})


async def run_load_through(cluster: Cluster, fault: Callable[[], Awaitable[None]], redis: aioredis.Redis,
                           mysql: aiomysql.Pool, allow: Allow, rate: float = 5.0, clients: int = 12,
                           rooms: int = 4, foreign: Sequence[Unacked] = (), edits: float = 0.0,
                           deletes: float = 0.0) -> Load:
    """Stream from `clients` clients over every node, run `fault()` meanwhile, then check everything:
    delivery, storage, and what the fault cost the senders (`allow`). `foreign`: messages the fault
    writes into the load's rooms itself (no ack: each may show up once). `edits`, `deletes`: the
    fractions of the load's operations that change its own messages (see Load)."""
    load = Load(cluster.settings, [cluster.url(i) for i in range(len(cluster.gateways))],
                clients=clients, rooms=rooms, rate=rate, edits=edits, deletes=deletes)
    load.foreign.extend(foreign)
    await load.start()
    try:
        await asyncio.sleep(1.5)
        async with load.fault():
            await fault()
        await asyncio.sleep(1.5)
        await load.stop_sending()
        print(load.pace())
        await load.drain(90)
        assert load.total_acked > 50
        quiet = sorted(set(load.rooms) - {a.room for a in load.all_acks})
        assert not quiet, f"rooms the load never wrote into: {quiet[:10]}"
        delivery = load.delivery()
        assert delivery.ok, (f"delivery: {delivery} ({load.describe()}) missing: {load.missing()} "
                             f"{load.around(delivery)}")
        storage = await load.storage(redis, mysql, timeout=90)
        assert storage.ok, f"storage: {storage}"
        load.check_sends(allow)
    finally:
        await load.close()
    return load
