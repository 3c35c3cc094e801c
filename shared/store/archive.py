"""The MySQL archive: the `messages` table (rows keyed by the message id, ordered in a room by
Kafka offset). Writes come from the mover only; reads are history pages, resume ranges and the
sweeper's walk over `rooms`. Any MySQL failure is StoreUnavailable, but a write refused for its
rows' data: StoreRefused. Rows refused so are set aside in `unarchived_messages` (shared/store/mover.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import aiomysql
import pymysql
from pymysql.err import DataError, IntegrityError, MySQLError

from shared.cursor import Position
from shared.errors import StoreRefused, StoreUnavailable
from shared.message import Message
from shared.store.entry import Entry
from shared.store.paging import MysqlNeed
from shared.store.rooms import RoomDirectory

INSERT_SQL = (
    "INSERT INTO messages "
    "(id, room_id, kafka_partition, kafka_offset, user_id, client_msg_id, body, created_at) VALUES "
)
# Ignore rows already archived without INSERT IGNORE, whose duplicate warnings cost a round trip.
ON_DUPLICATE = " ON DUPLICATE KEY UPDATE id = id"
# Unique by position: setting a message aside again (a crash before the trim) is a no-op.
SET_ASIDE_SQL = (
    "INSERT INTO unarchived_messages (room_id, kafka_partition, kafka_offset, entry, error, set_aside_at) "
    "VALUES (%s, %s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE kafka_offset = kafka_offset"
)
CHECK_CONSTRAINT_FAILED = (3819, 4025)  # MySQL's and MariaDB's (pymysql calls them OperationalError)

# A range read backwards on (room_id, kafka_offset): it touches only the rows it returns. The room id
# comes from a subquery on the unique name, so no lookup round trip and no cache of ids is needed.
_COLUMNS = ("SELECT id, kafka_partition, kafka_offset, user_id, client_msg_id, body, created_at FROM messages "
            "WHERE room_id = (SELECT id FROM rooms WHERE name = %s) AND kafka_offset > %s")
OLDER_SQL = _COLUMNS + " AND kafka_offset < %s ORDER BY kafka_offset DESC LIMIT %s"
NEWEST_SQL = _COLUMNS + " ORDER BY kafka_offset DESC LIMIT %s"

# A room's messages by others in an offset range, counted up to a limit (read state's unread count).
COUNT_SQL = ("SELECT COUNT(*) FROM (SELECT 1 FROM messages WHERE room_id = (SELECT id FROM rooms WHERE name = %s) "
             "AND kafka_offset > %s AND kafka_offset < %s AND user_id <> %s ORDER BY kafka_offset LIMIT %s) t")

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
            params += [m.id, room_id, m.position.partition, m.position.offset, m.user,
                       m.client_msg_id, m.body, m.ts]
        sql = INSERT_SQL + ",".join(["(%s,%s,%s,%s,%s,%s,%s,%s)"] * len(messages)) + ON_DUPLICATE
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
        out = []
        for mid, part, off, user, cmid, body, ts in rows:
            raw = Message(mid, room, user, body, int(ts), cmid, Position(int(part), int(off))).entry()
            out.append(Entry(int(off), mid, f"{part}-{off}", raw, user))
        return out

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
