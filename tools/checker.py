"""The lossless checker: after a run, compare what was acknowledged with what was delivered and stored.

The checks are pure functions over plain data; `stored_messages` is the thin loader for storage.
A subscriber's join point is the cursor of its `joined` frame: it is owed every message acked in
that room at a later position. Cursors are "partition-offset"; a room lives in one partition, so
offsets order it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from shared.keys import Keys

EXAMPLES = 5  # ids kept per kind of problem
LRANGE_CHUNK = 500

MYSQL_MESSAGES = (
    "SELECT m.id, m.kafka_partition, m.kafka_offset FROM messages m JOIN rooms r ON r.id = m.room_id "
    "WHERE r.name = %s ORDER BY m.kafka_offset"
)

Received = Sequence[tuple[str, str]]  # (message id, cursor) in the order one subscriber got them
Stored = tuple[str, str, str]  # (message id, cursor, "redis" | "mysql")


@dataclass(frozen=True, slots=True)
class Ack:
    room: str
    id: str
    cursor: str
    client_msg_id: str = ""
    ts: int = 0  # UTC ms at which the gateway accepted the send

    @classmethod
    def from_frame(cls, frame: Mapping[str, Any]) -> Ack:
        return cls(frame["room"], frame["id"], frame["cursor"], frame.get("client_msg_id", ""),
                   int(frame.get("ts", 0)))


@dataclass
class Report:
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    unexpected: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)  # kind -> a few offending ids

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.out_of_order or self.unexpected)

    def count(self, kind: str, example: str, n: int = 1) -> None:
        setattr(self, kind, getattr(self, kind) + n)
        shown = self.examples.setdefault(kind, [])
        if len(shown) < EXAMPLES and example not in shown:
            shown.append(example)

    def __add__(self, other: Report) -> Report:
        total = Report(self.lost + other.lost, self.duplicated + other.duplicated,
                       self.out_of_order + other.out_of_order, self.unexpected + other.unexpected)
        for kind, ids in (*self.examples.items(), *other.examples.items()):
            for example in ids:
                total.count(kind, example, 0)
        return total

    def __str__(self) -> str:
        line = (f"lost={self.lost} duplicated={self.duplicated} out_of_order={self.out_of_order} "
                f"unexpected={self.unexpected}")
        shown = " ".join(f"{kind}:{','.join(ids)}" for kind, ids in self.examples.items() if ids)
        return f"{line} e.g. {shown}" if shown else line


def offset(cursor: str) -> int:
    """The offset of a 'partition-offset' cursor; "" (and anything unparsable) sorts first."""
    try:
        return int(cursor.partition("-")[2])
    except ValueError:
        return -1


def check_delivery(
    acked: Mapping[str, Iterable[Ack]],
    received: Mapping[str, Mapping[str, Received]],
    expected_rooms_of_subscriber: Mapping[str, Mapping[str, str]],
    since: int | None = None,
    until: int | None = None,
    maybe: Mapping[str, str] | None = None,
) -> Report:
    """What each subscriber got against what was acked.

    acked: any grouping (by sender, by room) of the Acks the senders recorded.
    received: subscriber -> room -> [(message id, cursor)] in arrival order.
    expected_rooms_of_subscriber: subscriber -> room -> join cursor ("" = owed every acked message).
    since / until: only acks with since <= ts < until are owed (e.g. skip a warm-up, or sends
    still in flight when subscribers stopped); others may still be received without complaint.
    maybe: id -> room of messages no ack names that may still arrive (once, in their room): sends
    whose sender gave up on the ack (no ack, no claim) can have reached Kafka all the same.
    """
    rooms_of: dict[str, str] = {}  # acked id -> its room (a resend's ack repeats the id)
    owed: dict[str, list[Ack]] = {}  # room -> acks owed to its subscribers, one per id
    for ack in (a for acks in acked.values() for a in acks):
        if ack.id in rooms_of:
            continue
        rooms_of[ack.id] = ack.room
        if (since is None or ack.ts >= since) and (until is None or ack.ts < until):
            owed.setdefault(ack.room, []).append(ack)
    allowed = {**(maybe or {}), **rooms_of}  # id -> the room it may arrive in
    report = Report()
    for sub in sorted(set(received) | set(expected_rooms_of_subscriber)):
        joins, got = expected_rooms_of_subscriber.get(sub, {}), received.get(sub, {})
        for room in sorted(set(joins) | set(got)):
            _check_room(report, room, got.get(room, ()), joins.get(room), owed.get(room, ()), allowed)
    return report


def _check_room(report: Report, room: str, got: Received, join: str | None, owed: Iterable[Ack],
                allowed: Mapping[str, str]) -> None:
    """One subscriber in one room; join is None when it was not supposed to be in the room;
    allowed: id -> the room it may arrive in (acked, or `maybe`)."""
    seen: set[str] = set()
    highest = -1
    for msg_id, cursor in got:
        if msg_id in seen:
            report.count("duplicated", msg_id)
            continue
        seen.add(msg_id)
        if join is None or allowed.get(msg_id) != room:
            report.count("unexpected", msg_id)
        if offset(cursor) <= highest:
            report.count("out_of_order", msg_id)
        highest = max(highest, offset(cursor))
    if join is not None:
        for ack in owed:
            if offset(ack.cursor) > offset(join) and ack.id not in seen:
                report.count("lost", ack.id)


def stored_ids(stored: Iterable[Stored]) -> list[str]:
    """One id per stored copy. A message in Redis and MySQL at once is one copy (a crash between
    the insert and the trim, or a replay after a Redis wipe); twice within one store is two."""
    per_store: dict[str, Counter[str]] = {}
    for msg_id, _, source in stored:
        per_store.setdefault(source, Counter())[msg_id] += 1
    copies: Counter[str] = Counter()
    for counts in per_store.values():
        copies |= counts  # element-wise max
    return list(copies.elements())


def check_storage(
    acked_ids_by_room: Mapping[str, Iterable[str]], stored_ids_by_room: Mapping[str, Iterable[str]],
    maybe: Mapping[str, str] | None = None,
) -> Report:
    """Every acked id stored exactly once in its room, and nothing else stored there but, at most
    once, the `maybe` ones (id -> room; see check_delivery)."""
    report = Report()
    maybe = maybe or {}
    for room in sorted(set(acked_ids_by_room) | set(stored_ids_by_room)):
        acked = set(acked_ids_by_room.get(room, ()))
        copies = Counter(stored_ids_by_room.get(room, ()))
        for msg_id in acked - copies.keys():
            report.count("lost", msg_id)
        for msg_id, n in copies.items():
            if n > 1:
                report.count("duplicated", msg_id, n - 1)
            if msg_id not in acked and maybe.get(msg_id) != room:
                report.count("unexpected", msg_id)
    return report


async def stored_messages(redis: Any, mysql_pool: Any, keys: Keys, room: str) -> list[Stored]:
    """The room's stored messages, Redis then MySQL, each oldest first.

    Run it once writers are quiet. Redis is paged from the newest end, so a mover trimming the
    head meanwhile cannot shift pages under us; what it trims was inserted into MySQL before the
    trim, and MySQL is read afterwards.
    """
    key, end = keys.msgs(room), -1
    pages: list[list[bytes]] = []
    while True:
        page: list[bytes] = await redis.lrange(key, end - LRANGE_CHUNK + 1, end)
        pages.append(page)
        if len(page) < LRANGE_CHUNK:
            break
        end -= LRANGE_CHUNK
    out: list[Stored] = []
    for page in reversed(pages):
        for raw in page:
            entry = orjson.loads(raw)
            out.append((entry["id"], entry["cursor"], "redis"))
    async with mysql_pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(MYSQL_MESSAGES, (room,))
        for msg_id, partition, off in await cur.fetchall():
            out.append((msg_id, f"{partition}-{off}", "mysql"))
    return out
