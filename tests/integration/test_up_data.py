"""`roomcast up` says at start-up what earlier runs left in its database."""

from __future__ import annotations

import aiomysql

from shared.settings import Settings
from tools.up import earlier_data


async def test_earlier_data_is_named_with_how_to_start_empty(migrated: Settings, mysql: aiomysql.Pool) -> None:
    assert earlier_data(migrated.mysql_dsn) is None, "a new database: nothing to say"
    async with mysql.acquire() as conn, conn.cursor() as cur:
        await cur.execute("INSERT INTO rooms (name, created_at) VALUES ('a', 1), ('b', 1)")
        await cur.execute("INSERT INTO messages (id, room_id, kafka_partition, kafka_offset, user_id, body, created_at)"
                          " SELECT 'ID0', id, 0, 0, 'u', 'x', 1 FROM rooms WHERE name = 'a'")
    said = earlier_data(migrated.mysql_dsn)
    database = migrated.mysql_dsn.rsplit("/", 1)[1]
    assert said is not None
    assert f"database {database!r} holds 2 rooms and 1 archived messages from earlier runs" in said
    assert said.endswith(f"/{database}_fresh make run") and "MYSQL_DSN=mysql://" in said, said
