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
5. send `joined`, the replay (paced by the client's reading; messages as they are now, with the
   edits and deletes of the range: shared.store.events), then the held live frames, and
   switch the room to live without an await in between, so no live frame overtakes the replay.

A resume counts the stored entries and log records it read (its connection's budget is charged
with them: gateway/endpoint.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from gateway import metrics
from gateway.logreader import LogTruncated, Reads, read_room
from gateway.node import Node
from gateway.protocol import Err, dumps
from gateway.session import Session
from shared.cursor import CursorError, join_point, parse_cursor
from shared.errors import StoreUnavailable, Unavailable
from shared.message import Message
from shared.store.entry import dedupe, parse
from shared.store.events import as_now
from shared.store.paging import MysqlNeed, log_start, plan, stitch

Replay = list[tuple[str, bytes]]  # (the store that served it: "redis", "mysql" or "kafka", stored entry), oldest first


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
    if valid and after is not None and after.offset >= position:
        session.skip_through(room, after.offset)  # (its last gateway fanned out further than this one)
    replay: Replay = []
    recovered = False
    if valid:
        assert after is not None
        try:
            try:
                await wait_applied(node, partition, position - 1)
                replay, recovered = await missed(node, room, after.offset, position, reads)
            except PersisterBehind as behind:
                replay, recovered = await missed_with_kafka(node, room, after.offset, position, behind, reads)
        except Unavailable as e:
            node.hub.leave(room, session)
            fail(Err.UNAVAILABLE, f"cannot resume {room} now: {e}; join again", room)
            return
    if room not in session.rooms:  # left while we were reading
        return
    session.push(dumps({"type": "joined", "room": room, "cursor": join_point(partition, position),
                        "recovered": recovered, **(read_state or {})}))
    await session.push_paced([m.frame().decode() for m in as_now([Message.from_entry(raw) for _, raw in replay])])
    # Live frames held meanwhile follow the replay; no await between these pushes and going live.
    for _, frame in session.recovering.pop(room, []):
        session.push(frame)
    for source, n in Counter(source for source, _ in replay).items():
        metrics.RESUMED.labels(source).inc(n)


async def wait_applied(node: Node, partition: int, offset: int) -> None:
    """Until the persister's applied mark of `partition` reaches `offset` (bounded)."""
    if offset < 0:
        return
    deadline = time.monotonic() + node.settings.recovery_wait_s
    while True:
        try:
            mark = await node.buffer.mark(partition)
        except StoreUnavailable as e:
            raise PersisterBehind(None, redis_away=True) from e
        if mark is not None and mark >= offset:
            return
        if time.monotonic() > deadline:
            raise PersisterBehind(mark)
        await asyncio.sleep(0.02)


async def missed(node: Node, room: str, after: int, before: int, reads: Reads) -> tuple[Replay, bool]:
    """Stored entries of `room` with after < offset < before, oldest first, and whether that is
    all of them (False when more than `resume_max_messages` were missed): a history page of the
    range (shared.store.paging), whose MySQL part comes from the log while MySQL is away."""
    limit = node.settings.resume_max_messages
    run, end = await node.buffer.read_run(room, before, limit + 1, after)
    reads.n += len(run)
    page = plan(before, run, end, limit, after)
    older_from, older_ids = "mysql", set[str]()
    if isinstance(page, MysqlNeed):
        need = page
        try:
            older = await node.archive.older(room, need)
            reads.n += len(older)
        except StoreUnavailable:  # MySQL away: the log holds the range too, unless it is too long
            upper = before if need.before is None else need.before
            if upper - after - 1 > node.settings.resume_kafka_max_records:
                raise
            logged = await read_room(node.settings, node.keys.partition(room), room, after + 1, upper, reads)
            older, older_from = dedupe(parse(raw) for raw in logged)[::-1], "kafka"
        older_ids = {e.id for e in older}
        page = stitch(run, older, need, limit)
    if page.next is not None:
        return [], False
    # (a message in both stores is taken from the older one)
    return [(older_from if e.id in older_ids else "redis", e.raw) for e in page.entries], True


async def missed_with_kafka(node: Node, room: str, after: int, before: int, behind: PersisterBehind,
                            reads: Reads) -> tuple[Replay, bool]:
    """The persister is behind (or down): what it applied comes from storage as usual, the rest
    (mark, before) straight from Kafka, so a resume never depends on the persister being up."""
    mark = behind.mark
    start = log_start(after, mark)
    if before - start > node.settings.resume_kafka_max_records:
        raise Unavailable("too many records to read from the log (the persister is behind or Redis away)")
    stored: Replay = []
    if mark is not None and mark > after:
        stored, complete = await missed(node, room, after, mark + 1, reads)
        if not complete:
            return [], False
    complete = True
    partition = node.keys.partition(room)
    try:
        recent = await read_room(node.settings, partition, room, start, before, reads)
    except LogTruncated as gone:
        if behind.redis_away:  # what the log no longer holds is stored, but unreadable now
            raise
        # The persister never applied what retention deleted: it is gone. Replay what is left, honestly.
        recent, complete = await read_room(node.settings, partition, room, gone.log_start, before, reads), False
    source = {parse(raw).id: store for store, raw in stored}
    replay = dedupe(parse(raw) for raw in [*(raw for _, raw in stored), *recent])
    if len(replay) > node.settings.resume_max_messages:
        return [], False
    return [(source.get(e.id, "kafka"), e.raw) for e in replay], complete
