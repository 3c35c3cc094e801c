"""The lossless checker: after a run, compare what was sent with what was delivered and stored.

Every send ends in one outcome: acknowledged (an `Ack`: the id, cursor and ts the server gave it,
and the user and body it was sent with) or not (an `Unacked`: refused with a named error, or given
up after its timeout). A send without an ack may still have reached the log (no ack, no claim): it
may show up at most once, under one id, with the body it was sent with, and is never owed.

What subscribers received is checked as the server sent it (every frame, below any client-side
filtering). A subscriber's join point is the cursor of its `joined` frame: it is owed every message
acked in that room at a later position, once, in cursor order, with the body, user, ts, cursor and
client_msg_id it was acknowledged with. Cursors are "partition-offset"; a room lives in one
partition, so offsets order it.

What the sends cost is checked against what the fault may cost (`Allow`): error answers to send
attempts, each within a fault's window, and sends that ended without an ack (`check_sends`).

The checks are pure functions over plain data; `stored_messages` is the thin loader for storage.
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
KINDS = ("lost", "duplicated", "out_of_order", "unexpected", "changed")

MYSQL_MESSAGES = (  # (kind 0: messages; edit and delete events are rows too)
    "SELECT m.id, m.kafka_partition, m.kafka_offset, m.user_id, m.body, m.created_at, m.client_msg_id, "
    "m.edited_ts IS NOT NULL, m.deleted "
    "FROM messages m JOIN rooms r ON r.id = m.room_id WHERE r.name = %s AND m.kind = 0 ORDER BY m.kafka_offset"
)


@dataclass(frozen=True)
class Allow:
    """What a fault may cost the senders. `refusals`: error answers to send attempts (`unavailable`:
    the client tries again), each within the fault's window (from its start to `grace_s` after its
    end: a produce the fault caught fails by the producer's timeout); `unacked`: sends that end
    without an ack (refused for good, or given up)."""

    refusals: int = 0
    unacked: int = 0
    grace_s: float = 15.0


@dataclass(frozen=True, slots=True)
class Ack:
    room: str
    id: str
    cursor: str
    client_msg_id: str = ""
    ts: int = 0  # UTC ms at which the gateway accepted the send
    user: str = ""  # who sent it, and what: the ack frame does not repeat them
    body: str = ""

    @classmethod
    def from_frame(cls, frame: Mapping[str, Any], user: str, body: str) -> Ack:
        return cls(frame["room"], frame["id"], frame["cursor"], frame.get("client_msg_id", ""),
                   int(frame.get("ts", 0)), user, body)


@dataclass(frozen=True, slots=True)
class Unacked:
    """A send that got no ack: refused with a named error (`outcome`: its code), or given up after
    its timeout (`outcome`: "timeout")."""

    room: str
    user: str
    client_msg_id: str
    body: str
    outcome: str


@dataclass(frozen=True, slots=True)
class Copy:
    """One copy of a message: a `message` frame as a subscriber got it, a stored entry (`source`
    "redis" or "mysql") or a history item. A message edited since shows its latest body (`edited`);
    a deleted one is a tombstone (`deleted`: no body, user or client_msg_id)."""

    id: str
    cursor: str
    user: str = ""
    body: str = ""
    ts: int = 0
    cmid: str = ""
    source: str = ""
    edited: bool = False
    deleted: bool = False

    @classmethod
    def from_frame(cls, frame: Mapping[str, Any], source: str = "") -> Copy:
        return cls(frame["id"], frame["cursor"], frame.get("user", ""), frame.get("body", ""),
                   int(frame.get("ts", 0)), frame.get("cmid", ""), source, "edited_ts" in frame,
                   bool(frame.get("deleted")))

    @property
    def state(self) -> tuple[str, bool] | None:
        """What edits and deletes made of it: (body, edited), or None for a tombstone."""
        return None if self.deleted else (self.body, self.edited)


@dataclass
class Report:
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    unexpected: int = 0
    changed: int = 0  # a copy whose body, user, ts, cursor or client_msg_id is not what was acked
    examples: dict[str, list[str]] = field(default_factory=dict)  # kind -> a few offending ids

    @property
    def ok(self) -> bool:
        return not any(getattr(self, kind) for kind in KINDS)

    def count(self, kind: str, example: str, n: int = 1) -> None:
        setattr(self, kind, getattr(self, kind) + n)
        shown = self.examples.setdefault(kind, [])
        if len(shown) < EXAMPLES and example not in shown:
            shown.append(example)

    def __add__(self, other: Report) -> Report:
        total = Report(*(getattr(self, kind) + getattr(other, kind) for kind in KINDS))
        for kind, ids in (*self.examples.items(), *other.examples.items()):
            for example in ids:
                total.count(kind, example, 0)
        return total

    def __str__(self) -> str:
        line = " ".join(f"{kind}={getattr(self, kind)}" for kind in KINDS)
        shown = " ".join(f"{kind}:{','.join(ids)}" for kind, ids in self.examples.items() if ids)
        return f"{line} e.g. {shown}" if shown else line


def offset(cursor: str) -> int:
    """The offset of a 'partition-offset' cursor; "" (and anything unparsable) sorts first."""
    try:
        return int(cursor.partition("-")[2])
    except ValueError:
        return -1


class _Sends:
    """What was sent, to tell each copy's verdict: a copy of an acked message (as acked?), a copy
    of an unacked send (at most one id each, with its body), or nothing anyone sent."""

    def __init__(self, acked: Iterable[Ack], unacked: Iterable[Unacked]) -> None:
        self.by_id: dict[str, Ack] = {}  # (a resend's ack repeats the id: the first is kept)
        self.by_send: dict[tuple[str, str], Ack] = {}
        for ack in acked:
            self.by_id.setdefault(ack.id, ack)
            self.by_send.setdefault((ack.user, ack.client_msg_id), ack)
        # (a send refused, then acked on a retry, is acked)
        self.unacked = {(u.user, u.client_msg_id): u for u in unacked
                        if (u.user, u.client_msg_id) not in self.by_send}
        self.unacked_ids: dict[tuple[str, str], set[str]] = {}

    def judge(self, report: Report, room: str, copy: Copy) -> None:
        ack = self.by_id.get(copy.id)
        if ack is not None:
            if ack.room != room:
                report.count("unexpected", copy.id)
            elif _as_sent(copy) != _as_sent(Copy(ack.id, ack.cursor, ack.user, ack.body, ack.ts, ack.client_msg_id,
                                                 edited=copy.edited, deleted=copy.deleted)):
                report.count("changed", copy.id)
            return
        send = (copy.user, copy.cmid)
        if send in self.by_send:  # an acked send published again under another id
            report.count("duplicated", copy.id)
        elif (unacked := self.unacked.get(send)) is None or unacked.room != room:
            report.count("unexpected", copy.id)
        elif not (copy.edited or copy.deleted) and copy.body != unacked.body:
            report.count("changed", copy.id)
        else:
            self.unacked_ids.setdefault(send, set()).add(copy.id)

    def count_unacked_under_many_ids(self, report: Report) -> None:
        for ids in self.unacked_ids.values():
            if len(ids) > 1:
                report.count("duplicated", min(ids), len(ids) - 1)


def _as_sent(copy: Copy) -> tuple[object, ...]:
    """What of a copy must be as its send was acked: all of it; an edited one's body is an edit's
    (the final-state oracle judges it); a tombstone keeps only its position."""
    if copy.deleted:
        return (copy.cursor,)
    return (copy.user, copy.body if not copy.edited else None, copy.ts, copy.cursor, copy.cmid)


def check_delivery(
    acked: Mapping[str, Iterable[Ack]],
    received: Mapping[str, Mapping[str, Sequence[Copy]]],
    expected_rooms_of_subscriber: Mapping[str, Mapping[str, str]],
    since: int | None = None,
    until: int | None = None,
    unacked: Iterable[Unacked] = (),
) -> Report:
    """What each subscriber got against what was sent.

    acked: any grouping (by sender, by room) of the Acks the senders recorded.
    received: subscriber -> room -> the message frames it got there, in arrival order, all of them.
    expected_rooms_of_subscriber: subscriber -> room -> join cursor ("" = owed every acked message).
    since / until: only acks with since <= ts < until are owed (e.g. skip a warm-up, or sends
    still in flight when subscribers stopped); others may still be received without complaint.
    unacked: sends that got no ack; each may arrive once, in its room, under one id, with its body.
    """
    all_acks = [a for acks in acked.values() for a in acks]
    sends = _Sends(all_acks, unacked)
    owed: dict[str, list[Ack]] = {}  # room -> acks owed to its subscribers, one per id
    for ack in sends.by_id.values():
        if (since is None or ack.ts >= since) and (until is None or ack.ts < until):
            owed.setdefault(ack.room, []).append(ack)
    report = Report()
    for sub in sorted(set(received) | set(expected_rooms_of_subscriber)):
        joins, got = expected_rooms_of_subscriber.get(sub, {}), received.get(sub, {})
        for room in sorted(set(joins) | set(got)):
            _check_room(report, sends, room, got.get(room, ()), joins.get(room), owed.get(room, ()))
    sends.count_unacked_under_many_ids(report)
    return report


def _check_room(report: Report, sends: _Sends, room: str, got: Sequence[Copy], join: str | None,
                owed: Iterable[Ack]) -> None:
    """One subscriber in one room; join is None when it was not supposed to be in the room."""
    seen: set[str] = set()
    highest = -1
    for copy in got:
        if copy.id in seen:
            report.count("duplicated", copy.id)
            continue
        seen.add(copy.id)
        if join is None:
            report.count("unexpected", copy.id)
        else:
            sends.judge(report, room, copy)
        if offset(copy.cursor) <= highest:
            report.count("out_of_order", copy.id)
        highest = max(highest, offset(copy.cursor))
    if join is not None:
        for ack in owed:
            if offset(ack.cursor) > offset(join) and ack.id not in seen:
                report.count("lost", ack.id)


def stored_ids(stored: Iterable[Copy]) -> list[str]:
    """One id per stored copy. A message in Redis and MySQL at once is one copy (a crash between
    the insert and the trim, or a replay after a Redis wipe); twice within one store is two."""
    per_store: dict[str, Counter[str]] = {}
    for copy in stored:
        per_store.setdefault(copy.source, Counter())[copy.id] += 1
    copies: Counter[str] = Counter()
    for counts in per_store.values():
        copies |= counts  # element-wise max
    return list(copies.elements())


def check_storage(acked: Iterable[Ack], stored: Mapping[str, Sequence[Copy]], unacked: Iterable[Unacked] = ()
                  ) -> Report:
    """Every acked message stored exactly once in its room, as it was acknowledged; each store's
    copies of a room in cursor order; nothing else stored there but, at most once and under one id,
    the unacked sends (see check_delivery). `stored`: room -> its copies, each store's oldest first."""
    sends = _Sends(acked, unacked)
    rooms = {a.room for a in sends.by_id.values()} | set(stored)
    report = Report()
    for room in sorted(rooms):
        copies = stored.get(room, ())
        n = Counter(stored_ids(copies))
        for ack in sends.by_id.values():
            if ack.room == room and ack.id not in n:
                report.count("lost", ack.id)
        for msg_id, times in n.items():
            if times > 1:
                report.count("duplicated", msg_id, times - 1)
        highest: dict[str, int] = {}
        in_store: set[tuple[str, str]] = set()
        for copy in copies:
            sends.judge(report, room, copy)  # (every copy, in each store, is held to its send)
            if (copy.source, copy.id) in in_store:
                continue  # (a repeat: counted above)
            in_store.add((copy.source, copy.id))
            if offset(copy.cursor) <= highest.get(copy.source, -1):
                report.count("out_of_order", copy.id)
            highest[copy.source] = max(highest.get(copy.source, -1), offset(copy.cursor))
    sends.count_unacked_under_many_ids(report)
    return report


async def stored_messages(redis: Any, mysql_pool: Any, keys: Keys, room: str) -> list[Copy]:
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
    out: list[Copy] = []
    for page in reversed(pages):
        for raw in page:
            fields = orjson.loads(raw)
            if "kind" not in fields:  # (an edit or delete event: not a message)
                out.append(Copy.from_frame(fields, "redis"))
    async with mysql_pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(MYSQL_MESSAGES, (room,))
        for msg_id, partition, off, user, body, ts, cmid, edited, deleted in await cur.fetchall():
            out.append(Copy(msg_id, f"{partition}-{off}", user, body, int(ts), cmid, "mysql", bool(edited),
                            bool(deleted)))
    return out


def check_sends(unacked: Sequence[Unacked], refusals: Sequence[float], windows: Sequence[tuple[float, float]],
                allow: Allow) -> list[str]:
    """What the sends cost beyond `allow` (empty: nothing). `refusals`: when each error answer to a
    send attempt came; `windows`: (start, end) of each fault, on the same clock."""
    outside = [t for t in refusals if not any(s <= t <= e + allow.grace_s for s, e in windows)]
    problems = []
    if len(refusals) > allow.refusals:
        problems.append(f"{len(refusals)} refusals, {allow.refusals} allowed")
    if outside:
        problems.append(f"{len(outside)} refusals outside the fault's window")
    if len(unacked) > allow.unacked:
        problems.append(f"{len(unacked)} sends without an ack, {allow.unacked} allowed, e.g. {list(unacked[:3])}")
    return problems
