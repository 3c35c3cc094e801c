"""The MySQL archive: the `messages` table (rows keyed by the message id, ordered in a room by
Kafka offset; edits and deletes are rows too, and each message row holds its current state).
Writes come from the mover, and from the persister's flush loop for edits and deletes of messages
archived already (`apply_events`); reads are history pages, resume ranges, the lookup of a message
to edit, and the sweeper's walk over `rooms`. Any MySQL failure is StoreUnavailable.

Two copies of a message's state can meet (a mover archiving an entry read before an edit changed
it, while the edit reached MySQL by another way): every write keeps the newer state, a delete for
good and else the greater `rev` (the offset of the edit that made the state).

A write refused for its rows' data raises StoreRefused (else StoreUnavailable); rows refused so
are set aside in `unarchived_messages` (shared/store/mover.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiomysql
import pymysql
from pymysql.err import DataError, IntegrityError, MySQLError

from shared.cursor import Position
from shared.errors import StoreRefused, StoreUnavailable
from shared.message import Message
from shared.store.entry import DELETE, EDIT, MESSAGE, Entry, parse
from shared.store.paging import MysqlNeed
from shared.store.rooms import RoomDirectory

INSERT_SQL = (
    "INSERT INTO messages (id, room_id, kafka_partition, kafka_offset, user_id, client_msg_id, body, created_at, "
    "kind, target_id, target_offset, edited_ts, rev, deleted) VALUES "
)
ROW = "(" + ",".join(["%s"] * 14) + ")"
# A row archived already keeps the newer state (assignments run left to right: `deleted` and `rev`
# are read before they change). No INSERT IGNORE: its duplicate warnings cost a round trip.
_GONE = "(deleted = 1 OR VALUES(deleted) = 1)"
_NEWER = "VALUES(rev) > rev"
ON_DUPLICATE = (f" ON DUPLICATE KEY UPDATE body = IF({_GONE}, '', IF({_NEWER}, VALUES(body), body)),"
                f" user_id = IF({_GONE}, '', user_id), client_msg_id = IF({_GONE}, '', client_msg_id),"
                f" edited_ts = IF({_NEWER}, VALUES(edited_ts), edited_ts), rev = GREATEST(rev, VALUES(rev)),"
                " deleted = GREATEST(deleted, VALUES(deleted))")
KINDS = {MESSAGE: 0, EDIT: 1, DELETE: 2}
KIND_NAMES = {v: k for k, v in KINDS.items()}

# An edit or delete of an archived message (kind = 0 excludes an event row of the same id).
EDIT_SQL = ("UPDATE messages SET body = %s, edited_ts = %s, rev = %s "
            "WHERE id = %s AND kind = 0 AND deleted = 0 AND rev < %s")
BLANK = "body = '', user_id = '', client_msg_id = '', deleted = 1"
DELETE_SQL = f"UPDATE messages SET {BLANK} WHERE id = %s"
DELETE_EDITS_SQL = f"UPDATE messages SET {BLANK} WHERE target_id = %s AND kind = 1"
DELETED_SQL = "SELECT deleted FROM messages WHERE id = %s AND kind = 0"
STATES_SQL = "SELECT id, body, edited_ts, rev, deleted FROM messages WHERE kind = 0 AND id IN "
# Unique by position: setting a message aside again (a crash before the trim) is a no-op.
SET_ASIDE_SQL = (
    "INSERT INTO unarchived_messages (room_id, kafka_partition, kafka_offset, entry, error, set_aside_at) "
    "VALUES (%s, %s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE kafka_offset = kafka_offset"
)
CHECK_CONSTRAINT_FAILED = (3819, 4025)  # MySQL's and MariaDB's (pymysql calls them OperationalError)

# A range read backwards on (room_id, kafka_offset): it touches only the rows it returns. The room id
# comes from a subquery on the unique name, so no lookup round trip and no cache of ids is needed.
_SELECT = ("SELECT id, kafka_partition, kafka_offset, user_id, client_msg_id, body, created_at, kind, target_id, "
           "target_offset, edited_ts, rev, deleted FROM messages ")
_COLUMNS = _SELECT + "WHERE room_id = (SELECT id FROM rooms WHERE name = %s) AND kafka_offset > %s"
FIND_SQL = _SELECT + "WHERE id = %s AND kind = 0 AND room_id = (SELECT id FROM rooms WHERE name = %s)"
OLDER_SQL = _COLUMNS + " AND kafka_offset < %s ORDER BY kafka_offset DESC LIMIT %s"
NEWEST_SQL = _COLUMNS + " ORDER BY kafka_offset DESC LIMIT %s"

# A room's messages by others in an offset range, counted up to a limit (read state's unread count).
COUNT_SQL = ("SELECT COUNT(*) FROM (SELECT 1 FROM messages WHERE room_id = (SELECT id FROM rooms WHERE name = %s) "
             "AND kafka_offset > %s AND kafka_offset < %s AND user_id <> %s AND kind = 0 AND deleted = 0 "
             "ORDER BY kafka_offset LIMIT %s) t")

ROOMS_SQL = "SELECT id, name FROM rooms WHERE id > %s ORDER BY id LIMIT %s"


def refused_for_its_data(e: BaseException) -> bool:
    """MySQL refused the rows themselves: trying them again cannot help. (A deadlock, a lock wait, a
    read-only server or a lost connection can: those are not.)"""
    return isinstance(e, DataError | IntegrityError) or (
        isinstance(e, MySQLError) and bool(e.args) and e.args[0] in CHECK_CONSTRAINT_FAILED)


class Archive:
    def __init__(self, pool: aiomysql.Pool, rooms: RoomDirectory | None = None, read_timeout_s: float = 5.0) -> None:
        self._pool = pool
        self.rooms = rooms or RoomDirectory(pool)
        self._timeout = read_timeout_s
        self.insert_statements = 0  # MySQL statements that wrote messages (batching is asserted on it)
        self.rows_inserted = 0

    @contextlib.asynccontextmanager
    async def _cursor(self, read: bool = True) -> AsyncIterator[aiomysql.Cursor]:
        """A cursor; reads are bounded by the timeout (a writer waits: the data stays in Redis)."""
        try:
            async with (asyncio.timeout(self._timeout if read else None), self._pool.acquire() as conn,
                        conn.cursor() as cur):
                yield cur
        except (pymysql.err.Error, OSError, TimeoutError) as e:
            if not read and refused_for_its_data(e):
                raise StoreRefused(str(e)) from e
            raise StoreUnavailable("message archive unavailable") from e

    async def insert(self, room: str, messages: Sequence[Message]) -> None:
        """One multi-row insert; rows already archived are ignored (unique message id)."""
        room_id = await self.rooms.id(room)
        params: list[object] = []
        for m in messages:
            assert m.position is not None
            params += [m.id, room_id, m.position.partition, m.position.offset, m.user, m.client_msg_id, m.body,
                       m.ts, KINDS[m.kind], m.target or None, m.target_offset if m.is_event else None,
                       m.edited_ts, m.rev, int(m.deleted)]
        sql = INSERT_SQL + ",".join([ROW] * len(messages)) + ON_DUPLICATE
        async with self._cursor(read=False) as cur:
            await cur.execute(sql, params)
            self.insert_statements += 1
            self.rows_inserted += cur.rowcount  # 1 per new row, 0 per duplicate

    async def set_aside(self, room: str, at: Position, entry: bytes, why: str, now_ms: int) -> None:
        """Keep a message MySQL refused (its stored entry, whole, and MySQL's reason) out of the way."""
        room_id = await self.rooms.id(room)
        async with self._cursor(read=False) as cur:
            await cur.execute(SET_ASIDE_SQL, (room_id, at.partition, at.offset, entry.decode(), why[:512], now_ms))

    async def older(self, room: str, need: MysqlNeed) -> list[Entry]:
        """The newest `need.count` messages of the room with need.after < offset < need.before,
        newest first."""
        sql, args = ((NEWEST_SQL, (room, need.after, need.count)) if need.before is None
                     else (OLDER_SQL, (room, need.after, need.before, need.count)))
        async with self._cursor() as cur:
            await cur.execute(sql, args)
            rows = await cur.fetchall()
        return [parse(_message(room, row).entry()) for row in rows]

    async def find(self, room: str, msg_id: str) -> Message | None:
        """The archived message `msg_id` of `room` as it is now (None: not archived)."""
        async with self._cursor() as cur:
            await cur.execute(FIND_SQL, (msg_id, room))
            row = await cur.fetchone()
        return None if row is None else _message(room, row)

    async def as_archived(self, messages: Sequence[Message]) -> list[Message]:
        """`messages` (as sent), each archived one as the archive has it now (edited, or deleted): a
        persister replaying the log into an empty Redis stores what is current, not what was sent."""
        ids = [m.id for m in messages if not m.is_event]
        if not ids:
            return list(messages)
        async with self._cursor() as cur:
            await cur.execute(STATES_SQL + "(" + ",".join(["%s"] * len(ids)) + ")", ids)
            states = {row[0]: row[1:] for row in await cur.fetchall()}
        out = []
        for m in messages:
            if (state := states.get(m.id)) is not None:
                body, edited_ts, rev, deleted = state
                m = dataclasses.replace(m, body=body, edited_ts=edited_ts, rev=int(rev), deleted=bool(deleted),
                                        user="" if deleted else m.user)
            out.append(m)
        return out

    async def apply_events(self, events: Sequence[Message]) -> list[Message]:
        """Apply edits and deletes (in log order) to their archived messages, in one transaction; a
        delete blanks the message and its edits. Returns the edits that found their message deleted
        (a delete got there first): their stored copies must be blanked too. Applying twice changes
        nothing."""
        late: list[Message] = []
        async with self._cursor(read=False) as cur:
            await cur.execute("BEGIN")
            for e in events:
                assert e.position is not None
                if e.kind == DELETE:
                    await cur.execute(DELETE_SQL, (e.target,))
                    await cur.execute(DELETE_EDITS_SQL, (e.target,))
                    continue
                await cur.execute(EDIT_SQL, (e.body, e.ts, e.position.offset, e.target, e.position.offset))
                if not cur.rowcount:
                    await cur.execute(DELETED_SQL, (e.target,))
                    row = await cur.fetchone()
                    if row is not None and row[0]:
                        await cur.execute(DELETE_SQL, (e.id,))
                        late.append(e)
            await cur.execute("COMMIT")
        return late

    async def count_others(self, room: str, after: int, before: int, user: str, limit: int) -> int:
        """How many of the room's messages with after < offset < before are not `user`'s, at most `limit`."""
        async with self._cursor() as cur:
            await cur.execute(COUNT_SQL, (room, after, before, user, limit))
            (n,) = await cur.fetchone()
        return int(n)

    async def rooms_after(self, after_id: int, count: int) -> list[tuple[int, str]]:
        """The next `count` rooms by id after `after_id` (a walk over every room, in chunks)."""
        async with self._cursor() as cur:
            await cur.execute(ROOMS_SQL, (after_id, count))
            return [(int(rid), str(name)) for rid, name in await cur.fetchall()]


def _message(room: str, row: Any) -> Message:
    """A row of _SELECT's columns as the message (or event) it stores."""
    mid, part, off, user, cmid, body, ts, kind, target, toff, edited_ts, rev, deleted = row
    return Message(mid, room, user, body, int(ts), cmid, Position(int(part), int(off)), KIND_NAMES[int(kind)],
                   target or "", -1 if toff is None else int(toff), None if edited_ts is None else int(edited_ts),
                   int(rev), bool(deleted))
