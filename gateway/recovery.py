"""Resuming a room from a cursor: replay exactly what the client missed, then continue live.

The order matters (the resume rule of docs/protocol.md: no gap, no repeat):
1. subscribe live first, holding live frames back;
2. note this node's fan-out position P of the room's partition: every record below P was fanned
   out before the subscription, every record from P on will arrive live (held);
3. wait, bounded, until the persister has applied the partition up to P - 1; if it does not
   (down or lagging), read what it has not applied straight from Kafka instead (all of the missed
   range while Redis is away);
4. read the stored messages with cursor < position < P: the Redis list from its newest end, then
   MySQL for the part older than the list (a mover inserts before it trims, so nothing falls
   between the two reads), or the log for that part while MySQL is away;
5. send `joined`, the replay (paced by the client's reading), then the held live frames, and
   switch the room to live without an await in between, so no live frame overtakes the replay.

A resume counts the stored entries and log records it read (its connection's budget is charged
with them: gateway/endpoint.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from gateway import metrics
from gateway.node import Node
from gateway.protocol import Err, dumps
from gateway.session import Session
from shared.cursor import CursorError, Position, join_point, parse_cursor
from shared.kafka import fetch, new_consumer
from shared.message import Message

WINDOW = 200  # list entries per LRANGE while walking back from the newest end


class ResumeUnavailable(Exception):
    pass


class LogTruncated(ResumeUnavailable):
    """Retention deleted the start of the range asked for."""

    def __init__(self, log_start: int) -> None:
        super().__init__(f"the log no longer holds offsets before {log_start}")
        self.log_start = log_start


class Reads:
    """Stored entries and log records a resume read, wherever they came from."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class PersisterBehind(Exception):
    """The persister has not applied the partition up to the join point (yet: `mark` None when it
    never applied any), or its mark cannot be read (Redis away: the whole missed range comes from
    the log)."""

    def __init__(self, mark: int | None, redis_away: bool = False) -> None:
        super().__init__(f"applied mark {mark}")
        self.mark = mark
        self.redis_away = redis_away


async def resume(node: Node, session: Session, room: str, cursor: str, fail: Callable[..., None],
                 presence: bool = False, read_state: dict[str, Any] | None = None) -> int:
    """Join `room` after `cursor` (see the module doc); the entries read to do it. `read_state`: the
    fields of `joined` about what the user has read (gateway/readstate.py)."""
    reads = Reads()
    try:
        await _resume(node, session, room, cursor, fail, reads, presence, read_state)
    finally:
        metrics.RESUME_READS.inc(reads.n)
    return reads.n


async def _resume(node: Node, session: Session, room: str, cursor: str, fail: Callable[..., None],
                  reads: Reads, presence: bool, read_state: dict[str, Any] | None) -> None:
    partition = node.keys.partition(room)
    try:
        after = parse_cursor(cursor)
    except CursorError:
        after = None
    valid = after is not None and after.partition == partition
    node.hub.join(room, session, presence)
    metrics.JOINS.inc()
    session.recovering[room] = []
    position = node.fanout.position(partition)
    replay: list[bytes] = []
    recovered = False
    if valid:
        assert after is not None
        try:
            try:
                await wait_applied(node, partition, position - 1)
                replay, recovered = await missed(node, room, after.offset, position, reads)
            except PersisterBehind as behind:
                replay, recovered = await missed_with_kafka(node, room, after.offset, position, behind, reads)
        except ResumeUnavailable as e:
            node.hub.leave(room, session)
            fail(Err.UNAVAILABLE, f"cannot resume {room} now: {e}; join again", room)
            return
    if room not in session.rooms:  # left while we were reading
        return
    session.push(dumps({"type": "joined", "room": room, "cursor": join_point(partition, position),
                        "recovered": recovered, **(read_state or {})}))
    await session.push_paced([(b'{"type":"message",' + entry[1:]).decode() for entry in replay])
    # Live frames held meanwhile follow the replay; no await between these pushes and going live.
    for _, frame in session.recovering.pop(room, []):
        session.push(frame)
    metrics.RESUMED.inc(len(replay))


async def wait_applied(node: Node, partition: int, offset: int) -> None:
    """Until the persister's applied mark of `partition` reaches `offset` (bounded)."""
    if offset < 0:
        return
    deadline = time.monotonic() + node.settings.recovery_wait_s
    key = node.keys.applied(partition)
    while True:
        try:
            raw = await node.redis.get(key)
        except (RedisError, OSError) as e:
            raise PersisterBehind(None, redis_away=True) from e
        mark = None if raw is None else int(raw)
        if mark is not None and mark >= offset:
            return
        if time.monotonic() > deadline:
            raise PersisterBehind(mark)
        await asyncio.sleep(0.02)


async def missed(node: Node, room: str, after: int, before: int, reads: Reads) -> tuple[list[bytes], bool]:
    """Stored entries of `room` with after < offset < before, oldest first, and whether that is
    all of them (False when more than `resume_max_messages` were missed)."""
    limit = node.settings.resume_max_messages
    newer: list[list[bytes]] = []  # windows of the list, newest window first
    count = 0
    oldest_in_redis: int | None = None
    reached = False
    start = -WINDOW
    try:
        while not reached:
            window: list[Any] = await node.redis.lrange(node.keys.msgs(room), start, start + WINDOW - 1)
            reads.n += len(window)
            keep = []
            for entry in window:
                off = _offset(entry)
                if oldest_in_redis is None or off < oldest_in_redis:
                    oldest_in_redis = off
                if off <= after:
                    reached = True
                elif off < before:
                    keep.append(entry)
            newer.append(keep)
            count += len(keep)
            if count > limit:
                return [], False
            if len(window) < WINDOW:
                break
            start -= WINDOW
    except (RedisError, OSError) as e:
        raise ResumeUnavailable("history store unreachable") from e
    older: list[bytes] = []
    if not reached:
        upper = before if oldest_in_redis is None else oldest_in_redis
        try:
            older = await from_mysql(node, room, after, upper, limit - count + 1)
            reads.n += len(older)
        except ResumeUnavailable:  # MySQL away: the log holds the range too, unless it is too long
            if upper - after - 1 > node.settings.resume_kafka_max_records:
                raise
            older = await from_kafka(node, room, after + 1, upper, reads)
        if count + len(older) > limit:
            return [], False
    entries = older + [e for window in reversed(newer) for e in window]
    seen: set[bytes] = set()
    out = []
    for entry in entries:  # a message can be in both stores for a moment (moved, not yet trimmed)
        msg_id = orjson.loads(entry)["id"].encode()
        if msg_id not in seen:
            seen.add(msg_id)
            out.append(entry)
    return out, True


async def missed_with_kafka(node: Node, room: str, after: int, before: int, behind: PersisterBehind,
                            reads: Reads) -> tuple[list[bytes], bool]:
    """The persister is behind (or down): what it applied comes from storage as usual, the rest
    (mark, before) straight from Kafka, so a resume never depends on the persister being up."""
    mark = behind.mark
    start = max(after, -1 if mark is None else mark) + 1
    if before - start > node.settings.resume_kafka_max_records:
        raise ResumeUnavailable("too many records to read from the log (the persister is behind or Redis away)")
    stored: list[bytes] = []
    if mark is not None and mark > after:
        stored, complete = await missed(node, room, after, mark + 1, reads)
        if not complete:
            return [], False
    complete = True
    try:
        recent = await from_kafka(node, room, start, before, reads)
    except LogTruncated as gone:
        if behind.redis_away:  # what the log no longer holds is stored, but unreadable now
            raise
        # The persister never applied what retention deleted: it is gone. Replay what is left, honestly.
        recent, complete = await from_kafka(node, room, gone.log_start, before, reads), False
    if len(stored) + len(recent) > node.settings.resume_max_messages:
        return [], False
    known = {orjson.loads(e)["id"] for e in stored}
    return stored + [e for e in recent if orjson.loads(e)["id"] not in known], complete


async def from_kafka(node: Node, room: str, start: int, end: int, reads: Reads) -> list[bytes]:
    """The room's records at offsets [start, end) of its partition: a short-lived assign + seek.
    Raises LogTruncated when retention has deleted `start` already (never skips silently)."""
    if start >= end:
        return []
    tp = TopicPartition(node.settings.kafka_topic, node.keys.partition(room))
    consumer = new_consumer(node.settings, group_id=None, fetch_max_wait_ms=50)
    out: list[bytes] = []
    seen: set[str] = set()
    try:
        await consumer.start()
        consumer.assign([tp])
        log_start = (await consumer.beginning_offsets([tp]))[tp]
        if log_start > start:
            raise LogTruncated(log_start)
        consumer.seek(tp, start)
        deadline = time.monotonic() + node.settings.recovery_wait_s
        position = start
        while position < end:
            if time.monotonic() > deadline:
                raise ResumeUnavailable(f"reading the log took too long (offset {position} of [{start}, {end}))")
            for fetched in await fetch(consumer, tp, timeout_ms=500, max_records=5000):
                position = fetched.next_offset
                reads.n += len(fetched.messages)
                for msg in fetched.messages:
                    assert msg.position is not None
                    if msg.position.offset < end and msg.room == room and msg.id not in seen:
                        seen.add(msg.id)  # (a resend that reached Kafka twice has one id: first copy wins)
                        out.append(msg.entry())
    except KafkaError as e:
        raise ResumeUnavailable("the log is unreachable") from e
    finally:
        await consumer.stop()
    return out


async def from_mysql(node: Node, room: str, after: int, before: int, limit: int) -> list[bytes]:
    try:
        async with node.mysql.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT m.id, m.kafka_partition, m.kafka_offset, m.user_id, m.body, m.created_at, m.client_msg_id "
                "FROM messages m JOIN rooms r ON r.id = m.room_id "
                "WHERE r.name = %s AND m.kafka_offset > %s AND m.kafka_offset < %s "
                "ORDER BY m.kafka_offset LIMIT %s",
                (room, after, before, limit),
            )
            rows = await cur.fetchall()
    except Exception as e:  # MySQL down: the resume cannot be complete
        raise ResumeUnavailable("archive unreachable") from e
    return [Message(r[0], room, r[3], r[4], int(r[5]), r[6], Position(int(r[1]), int(r[2]))).entry() for r in rows]


def _offset(entry: bytes) -> int:
    cursor: str = orjson.loads(entry)["cursor"]
    return int(cursor.rsplit("-", 1)[1])
