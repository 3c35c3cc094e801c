"""The mover against real Redis and MariaDB when MySQL refuses rows for their data: each refused row
is found and set aside (unarchived_messages, a metric, a log line), the rest of the chunk archived,
and the room's list trimmed past all of it; when MySQL is merely unreachable nothing is set aside."""

from __future__ import annotations

import dataclasses

import aiomysql
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from shared.errors import StoreUnavailable
from shared.keys import Keys
from shared.message import Message
from shared.mysql import MysqlTarget, create_pool
from shared.settings import Settings
from shared.store.mover import Mover
from shared.store.rooms import RoomDirectory
from tests.faults.proxy import TcpProxy
from tests.support_seed import Seeder, mysql_ids, redis_ids

ROOM = "mixed"


def set_aside() -> float:
    return REGISTRY.get_sample_value("roomcast_unarchived_messages_total") or 0.0


async def unarchived(pool: aiomysql.Pool) -> list[tuple[int, int, str, str]]:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT kafka_partition, kafka_offset, entry, error FROM unarchived_messages ORDER BY seq")
        return [(int(p), int(o), str(e), str(err)) for p, o, e, err in await cur.fetchall()]


async def test_rows_mysql_refuses_for_their_data_are_set_aside_and_the_rest_archived(
        migrated: Settings, redis: aioredis.Redis, mysql: aiomysql.Pool,
        caplog: pytest.LogCaptureFixture) -> None:
    seeder = Seeder(migrated, redis, mysql)
    msgs = seeder.messages(ROOM, range(1_000, 1_020))
    bad = {3: dataclasses.replace(msgs[3], user="u" * 300),  # longer than user_id VARCHAR(255)
           17: dataclasses.replace(msgs[17], ts=2**63)}  # past BIGINT (signed)
    msgs = [bad.get(i, m) for i, m in enumerate(msgs)]
    await seeder.register([ROOM])
    await seeder.to_redis({ROOM: msgs})
    keys = Keys(migrated.redis_prefix, migrated.kafka_partitions)
    before = set_aside()
    result = await Mover(redis, mysql, keys, RoomDirectory(mysql)).move_oldest(ROOM, 20)
    assert (result.moved, result.remaining) == (20, 0), "the whole chunk left the list"
    good = [m.id for i, m in enumerate(msgs) if i not in bad]
    assert (await mysql_ids(mysql))[ROOM] == good
    refused = await unarchived(mysql)
    assert [(p, o) for p, o, _, _ in refused] == [(m.position.partition, m.position.offset) for m in bad.values()
                                                  if m.position is not None]
    assert [Message.from_entry(e).id for _, _, e, _ in refused] == [m.id for m in bad.values()]
    assert "Data too long" in refused[0][3] and "Out of range" in refused[1][3]
    assert set_aside() - before == 2
    assert caplog.text.count("message set aside: MySQL refused it") == 2
    assert (await redis_ids(redis, keys, [ROOM]))[ROOM] == []


async def test_nothing_is_set_aside_while_mysql_is_unreachable(migrated: Settings, redis: aioredis.Redis,
                                                               mysql: aiomysql.Pool) -> None:
    seeder = Seeder(migrated, redis, mysql)
    msgs = seeder.messages(ROOM, range(1_000, 1_010))
    await seeder.register([ROOM])
    await seeder.to_redis({ROOM: msgs})
    target = MysqlTarget.from_dsn(migrated.mysql_dsn)
    proxy = await TcpProxy(target.host, target.port).start()
    pool = await create_pool(f"mysql://{target.user}:{target.password}@127.0.0.1:{proxy.port}/{target.database}")
    keys = Keys(migrated.redis_prefix, migrated.kafka_partitions)
    rooms = RoomDirectory(pool)
    await rooms.id(ROOM)  # (known: the move goes straight to the insert)
    await proxy.cut()
    try:
        with pytest.raises(StoreUnavailable):
            await Mover(redis, pool, keys, rooms).move_oldest(ROOM, 10)
    finally:
        pool.close()
        await pool.wait_closed()
        await proxy.close()
    assert await unarchived(mysql) == []
    assert (await redis_ids(redis, keys, [ROOM]))[ROOM] == [m.id for m in msgs], "kept for the next try"
