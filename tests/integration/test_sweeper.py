"""The sweeper against real Redis and MariaDB: both policies, kills, and two sweepers at once."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiomysql
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from shared.keys import Keys
from shared.message import Message
from shared.mysql import create_pool
from shared.settings import Settings
from shared.store.mover import Mover
from shared.store.rooms import RoomDirectory
from sweeper.service import Sweeper
from tests.support import eventually
from tests.support_seed import DAY_MS, Seeder, count_messages, mysql_ids, redis_ids
from tools.services import start_sweeper

ROOMS = 1000



@dataclass
class World:
    rooms: list[str]
    old: dict[str, list[Message]] = field(default_factory=dict)  # older than the retention
    new: dict[str, list[Message]] = field(default_factory=dict)

    @property
    def old_total(self) -> int:
        return sum(len(v) for v in self.old.values())

    def idle(self, room: str) -> bool:
        return not self.new[room]


async def seed_world(settings: Settings, redis: aioredis.Redis, mysql: aiomysql.Pool) -> World:
    """1,000 rooms: 0-4 messages older than the retention and 0-3 newer ones each; every 100th room
    has 230 old ones (three moves of flush_chunk)."""
    now = int(time.time() * 1000)
    seeder = Seeder(settings, redis, mysql)
    world = World([f"sw.{i:04d}" for i in range(ROOMS)])
    for i, room in enumerate(world.rooms):
        n_old = 230 if i % 100 == 7 else i % 5
        n_new = (i // 5) % 4
        ts = [now - 8 * DAY_MS - 10_000 + j for j in range(n_old)] + [now - DAY_MS + j for j in range(n_new)]
        msgs = seeder.messages(room, ts)
        world.old[room], world.new[room] = msgs[:n_old], msgs[n_old:]
    await seeder.register(world.rooms)
    await seeder.to_redis({r: world.old[r] + world.new[r] for r in world.rooms})
    return world


def new_sweeper(settings: Settings, redis: aioredis.Redis, pool: aiomysql.Pool, mover: Mover | None = None) -> Sweeper:
    rooms = RoomDirectory(pool)
    mover = mover or Mover(redis, pool, Keys(settings.redis_prefix, settings.kafka_partitions), rooms)
    return Sweeper(settings, redis, pool, mover, rooms)


async def assert_stores(settings: Settings, redis: aioredis.Redis, mysql: aiomysql.Pool,
                        in_redis: dict[str, list[Message]], in_mysql: dict[str, list[Message]]) -> None:
    """Redis and MySQL hold exactly the expected messages of every room, in order, each once."""
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    rooms = list(in_redis)
    got_redis = await redis_ids(redis, keys, rooms)
    got_mysql = await mysql_ids(mysql)
    for room in rooms:
        assert got_redis[room] == [m.id for m in in_redis[room]], room
        assert got_mysql.get(room, []) == [m.id for m in in_mysql[room]], room
    assert set(got_mysql) <= set(rooms)
    assert await count_messages(mysql) == sum(len(v) for v in in_mysql.values())
    pipe = redis.pipeline(transaction=False)
    for room in rooms:
        pipe.hget(keys.meta(room), "first_ts")
    for room, first_ts in zip(rooms, await pipe.execute(), strict=True):
        head = in_redis[room][0].ts if in_redis[room] else None
        assert (int(first_ts) if first_ts is not None else None) == head, room  # the trim keeps meta right


async def test_message_policy_moves_exactly_the_old_messages(settings: Settings, redis: aioredis.Redis,
                                                             mysql: aiomysql.Pool) -> None:
    s = settings.model_copy(update={"sweep_pause_s": 0.0})
    world = await seed_world(s, redis, mysql)
    stats = await new_sweeper(s, redis, mysql).sweep(asyncio.Event())
    assert stats.complete and stats.rooms_scanned == ROOMS and stats.chunks == 10
    assert stats.messages_moved == world.old_total
    await assert_stores(s, redis, mysql, world.new, world.old)
    again = await new_sweeper(s, redis, mysql).sweep(asyncio.Event())  # nothing left to do
    assert again.messages_moved == 0
    await assert_stores(s, redis, mysql, world.new, world.old)


async def test_list_policy_empties_idle_rooms_only(settings: Settings, redis: aioredis.Redis,
                                                   mysql: aiomysql.Pool) -> None:
    s = settings.model_copy(update={"sweep_pause_s": 0.0, "sweep_policy": "list"})
    world = await seed_world(s, redis, mysql)
    await new_sweeper(s, redis, mysql).sweep(asyncio.Event())
    in_redis = {r: ([] if world.idle(r) else world.old[r] + world.new[r]) for r in world.rooms}
    in_mysql = {r: (world.old[r] if world.idle(r) else []) for r in world.rooms}
    assert sum(1 for r in world.rooms if world.idle(r) and world.old[r]) > 100
    await assert_stores(s, redis, mysql, in_redis, in_mysql)


async def test_sweeper_process_killed_mid_sweep_then_rerun_is_exactly_once(
        settings: Settings, redis: aioredis.Redis, mysql: aiomysql.Pool, log_dir: Path) -> None:
    s = settings.model_copy(update={"sweep_pause_s": 0.05, "sweep_chunk": 10})  # 100 chunks: >5 s
    world = await seed_world(s, redis, mysql)
    proc = await asyncio.to_thread(start_sweeper, s, log_dir, f"sweeper-kill-{s.redis_prefix}", True)
    try:
        deadline = time.monotonic() + 30
        while await count_messages(mysql) == 0:
            assert proc.alive, "the sweeper ended before it moved anything"
            assert time.monotonic() < deadline, "the sweeper moved nothing"
            await asyncio.sleep(0.01)
        proc.kill()
    finally:
        await asyncio.to_thread(proc.stop)
    partial = await count_messages(mysql)
    assert 0 < partial < world.old_total, "killed mid-sweep"
    await new_sweeper(s.model_copy(update={"sweep_pause_s": 0.0}), redis, mysql).sweep(asyncio.Event())
    await assert_stores(s, redis, mysql, world.new, world.old)


def contended() -> float:
    return REGISTRY.get_sample_value("roomcast_sweeper_contended_moves_total") or 0.0


class CrashAfterInsert(Mover):
    """Dies (like a kill) between the MySQL insert and the Redis trim of its `crash_at`-th chunk."""

    def __init__(self, *args: object, crash_at: int) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.crash_at = crash_at

    async def insert(self, room: str, messages: list[Message]) -> None:
        await super().insert(room, messages)
        if self.insert_statements >= self.crash_at:  # from then on every move dies after its insert
            raise ConnectionResetError("killed between insert and trim")


async def test_crash_between_insert_and_trim_then_rerun_is_exactly_once(
        settings: Settings, redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    s = settings.model_copy(update={"sweep_pause_s": 0.0})
    world = await seed_world(s, redis, mysql)
    keys = Keys(s.redis_prefix, s.kafka_partitions)
    rooms = RoomDirectory(mysql)
    crashing = CrashAfterInsert(redis, mysql, keys, rooms, crash_at=300)
    try:
        await Sweeper(s, redis, mysql, crashing, rooms).sweep(asyncio.Event())
        raise AssertionError("the sweeper should have crashed")
    except ConnectionResetError:
        pass
    in_both = 0
    got_redis = await redis_ids(redis, keys, world.rooms)
    archived = {mid for ids in (await mysql_ids(mysql)).values() for mid in ids}
    for room in world.rooms:
        in_both += len(archived & set(got_redis[room]))
    assert in_both > 0, "the crash left a chunk in both stores"
    stats = await new_sweeper(s, redis, mysql).sweep(asyncio.Event())
    assert stats.complete
    await assert_stores(s, redis, mysql, world.new, world.old)


async def test_two_sweepers_at_once_are_exactly_once(settings: Settings, redis: aioredis.Redis,
                                                     mysql: aiomysql.Pool) -> None:
    s = settings.model_copy(update={"sweep_pause_s": 0.0, "flush_chunk": 10, "buffer_cap": 20})
    world = await seed_world(s, redis, mysql)
    redis2 = aioredis.from_url(s.redis_url)
    pool2 = await create_pool(s.mysql_dsn, 4)
    try:
        a, b = new_sweeper(s, redis, mysql), new_sweeper(s, redis2, pool2)
        contended_before = contended()
        stats = await asyncio.gather(a.sweep(asyncio.Event()), b.sweep(asyncio.Event()))
    finally:
        pool2.close()
        await pool2.wait_closed()
        await redis2.aclose()
    assert all(st.complete for st in stats)
    assert sum(st.messages_moved for st in stats) == world.old_total  # each trim counted once
    assert contended() > contended_before, "the two sweepers should have met on rooms"
    await assert_stores(s, redis, mysql, world.new, world.old)


def chunks_done() -> float:
    return REGISTRY.get_sample_value("roomcast_sweeper_chunk_seconds_count") or 0.0


async def test_stop_event_ends_a_sweep_promptly(settings: Settings, redis: aioredis.Redis,
                                                mysql: aiomysql.Pool) -> None:
    s = settings.model_copy(update={"sweep_pause_s": 5.0, "sweep_chunk": 10})
    await seed_world(s, redis, mysql)
    stop = asyncio.Event()
    before = chunks_done()
    task = asyncio.create_task(new_sweeper(s, redis, mysql).sweep(stop))

    async def first_chunk_done() -> bool:
        return chunks_done() > before

    await eventually(first_chunk_done, 30, every=0.01, what="the first chunk")  # now in the 5 s pause
    started = time.monotonic()
    stop.set()
    stats = await asyncio.wait_for(task, s.sweep_pause_s)
    assert time.monotonic() - started < s.sweep_pause_s / 2, "the pause was cut short, not waited out"
    assert not stats.complete and stats.chunks == 1


async def archived(pool: aiomysql.Pool, n: int) -> bool:
    return await count_messages(pool) >= n


async def test_continuous_mode_sweeps_every_interval_until_stopped(settings: Settings, redis: aioredis.Redis,
                                                                   mysql: aiomysql.Pool) -> None:
    s = settings.model_copy(update={"sweep_pause_s": 0.0, "sweep_interval_s": 0.1})
    seeder = Seeder(s, redis, mysql)
    old = int(time.time() * 1000) - 8 * DAY_MS
    await seeder.register(["cont.a", "cont.b"])
    first = seeder.messages("cont.a", range(old, old + 5))
    await seeder.to_redis({"cont.a": first})
    stop = asyncio.Event()
    task = asyncio.create_task(new_sweeper(s, redis, mysql).run_forever(stop))
    try:
        await eventually(lambda: archived(mysql, 5), timeout=10, every=0.02, what="first sweep")
        later = seeder.messages("cont.b", range(old, old + 3))  # arrives after the first sweep
        await seeder.to_redis({"cont.b": later})
        await eventually(lambda: archived(mysql, 8), timeout=10, every=0.02, what="a later sweep")
    finally:
        stop.set()
        await asyncio.wait_for(task, 2)
    await assert_stores(s, redis, mysql, {"cont.a": [], "cont.b": []}, {"cont.a": first, "cont.b": later})
