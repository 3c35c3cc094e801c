"""MySQL answering errors, under load: a row it refuses for its data (a poison record a producer
outside roomcast wrote: a user longer than its column), a deadlock, and a read-only server (what a
demoted primary answers during a failover). What cannot be stored is set aside visibly (the
unarchived_messages table, a metric, a log line) and its room flows on; a deadlock and a read-only
spell are waited out and retried, and set nothing aside."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomysql
import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from shared.keys import Keys
from shared.message import Message, new_message_id
from shared.migrate import migrate
from shared.mysql import MysqlTarget, create_pool
from shared.settings import Settings
from tests.faults.harness import Allow, applied_to_the_end, run_load_through, small
from tests.support import Cluster, eventually
from tools import localstack
from tools.checker import Unacked
from tools.services import scrape

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


async def produce(settings: Settings, messages: list[Message]) -> None:
    """Straight into the topic, as a producer outside roomcast would."""
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for m in messages:
            await producer.send_and_wait(settings.kafka_topic, m.kafka_value(), key=m.room.encode(),
                                         partition=keys.partition(m.room))
    finally:
        await producer.stop()


async def rows(pool: aiomysql.Pool, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(sql, args)
        return list(await cur.fetchall())


def persister_metric(cluster: Cluster, name: str) -> float:
    return scrape(f"{cluster.persister_http}/metrics").get(name, 0.0)


@pytest.fixture
def cluster(migrated: Settings, log_dir: Path) -> Iterator[Cluster]:
    c = Cluster(small(migrated), log_dir).start()
    yield c
    c.stop()


async def test_a_row_mysql_refuses_is_set_aside_and_its_room_flows_on(
        cluster: Cluster, redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    s = cluster.settings
    poison = Message(new_message_id(), "room-0", "m" * 300, "a user longer than user_id", int(time.time() * 1000),
                     "poison-1")  # (user_id is VARCHAR(255): the gateways never write a longer one)

    async def write_a_poison_record() -> None:
        await produce(s, [poison])

        async def set_aside() -> bool:
            return await asyncio.to_thread(persister_metric, cluster, "roomcast_unarchived_messages_total") == 1

        await eventually(set_aside, 60, what="the poison row set aside")

    foreign = [Unacked("room-0", poison.user, poison.client_msg_id, poison.body, "foreign")]
    load = await run_load_through(cluster, write_a_poison_record, redis, mysql, Allow(), foreign=foreign)
    [(offset, entry, error)] = await rows(mysql, "SELECT kafka_offset, entry, error FROM unarchived_messages")
    assert orjson.loads(entry)["id"] == poison.id and "Data too long for column 'user_id'" in error
    archived_past_it = await rows(mysql, "SELECT COUNT(*) FROM messages m JOIN rooms r ON r.id = m.room_id "
                                         "WHERE r.name = 'room-0' AND m.kafka_offset > %s", offset)
    assert archived_past_it[0][0] > 0, "room-0's archive went on past the row it could not take"
    assert sum(a.room == "room-0" for a in load.all_acks) > s.buffer_cap + s.flush_chunk
    assert cluster.persister is not None
    assert "message set aside: MySQL refused it" in cluster.persister.log_path.read_text()


@pytest.fixture
async def own_mariadb(tmp_path: Path, log_dir: Path, migrated: Settings) -> AsyncIterator[tuple[str, str]]:
    """A MariaDB of this test's own (it is made read-only: a global setting), with the database
    migrated; yields (the DSN of a user without SUPER, as services run, the root DSN)."""
    port = localstack.free_port()
    server = await asyncio.to_thread(localstack.start_mariadb, port, tmp_path / "mariadb", log_dir)
    database = MysqlTarget.from_dsn(migrated.mysql_dsn).database
    root = f"mysql://root:@127.0.0.1:{port}/{database}"
    try:
        await migrate(root)
        conn = await aiomysql.connect(**MysqlTarget.from_dsn(root).connect_kwargs())
        async with conn.cursor() as cur:
            await cur.execute("CREATE USER 'rc'@'127.0.0.1' IDENTIFIED BY 'rc-secret'")
            await cur.execute(f"GRANT ALL PRIVILEGES ON `{database}`.* TO 'rc'@'127.0.0.1'")
            await cur.execute("CREATE TABLE weight (i INT PRIMARY KEY)")  # (the deadlock's other side)
        conn.close()
        yield f"mysql://rc:rc-secret@127.0.0.1:{port}/{database}", root
    finally:
        await asyncio.to_thread(server.stop)


async def test_a_deadlock_and_a_read_only_server_are_waited_out_and_set_nothing_aside(
        migrated: Settings, own_mariadb: tuple[str, str], log_dir: Path, redis: aioredis.Redis) -> None:
    services_dsn, root_dsn = own_mariadb
    cluster = Cluster(small(migrated, mysql_dsn=services_dsn, log_json=True), log_dir).start()
    s = cluster.settings
    pool = await create_pool(root_dsn, 4)
    locked = [Message(new_message_id(), "locked", "tester", f"k{i}", int(time.time() * 1000) + i, f"k-{i}")
              for i in range(s.buffer_cap + s.flush_chunk)]  # (the persister's first flush: locked[:20])

    async def deadlock_then_read_only() -> None:
        # A deadlock: a heavier transaction holds the key of the flush's 11th row, the flush
        # (rows 1-10 in, holding their keys) waits for it, then it wants the first row's key.
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("INSERT INTO rooms (name, created_at) VALUES ('locked', 0)")
            await cur.execute("SELECT id FROM rooms WHERE name = 'locked'")
            (room_id,) = await cur.fetchone()
        insert = ("INSERT INTO messages (id, room_id, kafka_partition, kafka_offset, user_id, body, created_at) "
                  "VALUES (%s, %s, 0, 0, 'other', 'x', 0)")
        other = await aiomysql.connect(**{**MysqlTarget.from_dsn(root_dsn).connect_kwargs(), "autocommit": False})
        try:
            async with other.cursor() as cur:
                await cur.execute("INSERT INTO weight (i) VALUES " + ",".join(f"({i})" for i in range(1000)))
                await cur.execute(insert, (locked[10].id, room_id))
                await produce(s, locked)

                async def flush_waiting() -> bool:
                    return (await rows(pool, "SELECT COUNT(*) FROM information_schema.INNODB_TRX "
                                             "WHERE trx_state = 'LOCK WAIT'"))[0][0] >= 1

                await eventually(flush_waiting, 60, what="the flush waiting for the other transaction")
                await cur.execute(insert, (locked[0].id, room_id))  # the cycle: InnoDB rolls the lighter one back
            await other.rollback()
        finally:
            other.close()

        async def locked_archived() -> bool:
            return (await rows(pool, "SELECT COUNT(*) FROM messages WHERE room_id = %s", room_id))[0][0] >= 20

        await eventually(locked_archived, 60, what="the deadlocked flush retried")
        # A read-only server (the old primary of a failover): every write is refused for a while.
        errors = await asyncio.to_thread(persister_metric, cluster, "roomcast_persister_flush_errors_total")
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SET GLOBAL read_only = 1")
            try:
                async def refused() -> bool:
                    now = await asyncio.to_thread(persister_metric, cluster, "roomcast_persister_flush_errors_total")
                    return now >= errors + 3

                await eventually(refused, 60, what="flushes refused by the read-only server")
            finally:
                await cur.execute("SET GLOBAL read_only = 0")

    try:
        await run_load_through(cluster, deadlock_then_read_only, redis, pool, Allow())  # (sends never touch MySQL)
        await applied_to_the_end(s, redis)
        assert await rows(pool, "SELECT seq FROM unarchived_messages") == [], "nothing was set aside"
        assert cluster.persister is not None
        failures = [orjson.loads(line) for line in cluster.persister.log_path.read_text().splitlines()
                    if '"flush failed; will retry"' in line]
        assert any("1213" in f["error"] for f in failures), "the flush was the deadlock's victim, and was retried"
        assert any("1290" in f["error"] for f in failures), "the read-only server refused flushes, retried"

        async def all_locked_archived() -> bool:  # (past the cap: the rest stays in Redis)
            stored = await rows(pool, "SELECT m.id FROM messages m JOIN rooms r ON r.id = m.room_id WHERE r.name = "
                                      "'locked' ORDER BY m.kafka_offset")
            return [r[0] for r in stored] == [m.id for m in locked[:len(stored)]] and len(stored) >= 20

        await eventually(all_locked_archived, 30, what="the locked room archived in order")
    finally:
        cluster.stop()
        pool.close()
        await pool.wait_closed()
