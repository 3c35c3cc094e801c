"""`roomcast simulate` on tiny workloads, against its own redis-server and the test MariaDB: the
counts the workload implies, and retention driven by the simulated clock."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomysql
import orjson
import pytest
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.mysql import create_pool
from shared.settings import Settings
from tools import localstack
from tools.simulate.run import Options, RunResult, Sim, run_policy
from tools.simulate.workload import DAY_S, RoomSpec, Workload

DAY_MS = DAY_S * 1000


@pytest.fixture
async def own_redis(tmp_path: Path, log_dir: Path) -> AsyncIterator[str]:
    """A redis-server of the test's own (the simulator reconfigures and forks it)."""
    port = localstack.free_port()
    proc = localstack.start_redis(port, tmp_path / "redis", log_dir)
    yield f"redis://127.0.0.1:{port}/0"
    proc.stop()


async def test_a_day_stores_every_message_once_and_counts_every_read(settings: Settings) -> None:
    w = Workload(users=10, msgs_per_user_day=30, rooms=4, short_lived=0, days=1, tick_s=600, seed=3)
    small = settings.model_copy(update={"buffer_cap": 20, "flush_chunk": 10, "history_limit_default": 5,
                                        "sweep_interval_s": 3600.0})
    opts = Options(w, small, policies=("message",), fork_window_s=0.0)

    run: RunResult = await run_policy(opts, "message", time.monotonic() + 60, None)

    (day,) = run.days
    c = run.consistency
    assert run.sent == day.sent == 10 * 30 == c.written
    assert c.in_redis + c.in_mysql == c.written and (c.in_both, c.repeated, c.missing) == (0, 0, 0)
    assert c.marks_at_end and c.unexpected_seeks == 0 and run.consistent
    assert day.memory.kinds["lists"].items == c.in_redis
    assert day.mysql_rows == c.in_mysql == day.flush.rows > 0  # one day: nothing is past the retention
    assert day.flush.statements * small.flush_chunk == day.flush.rows and day.sweep.rows == 0
    assert run.reads == sum(day.reads.values()) == c.written  # one read per message sent
    assert sum(sum(by.values()) for by in day.reads_by_depth.values()) == run.reads
    assert day.reads["redis"] > 0 and day.reads["mysql"] > 0
    assert set(day.latency) == set(day.reads)
    assert day.sweeps.passes == 24
    assert day.expired > 0  # the dedupe keys of all but the last simulated hour
    assert day.memory.kinds["sent"].keys < c.written / 6
    assert [r.window_s for r in run.rewrites] == [0.0, 0.0] and all(r.status == "ok" for r in run.rewrites)


ROOMS = [RoomSpec("busy", 1.0, 0, math.inf), RoomSpec("quiet", 0.05, 0, math.inf),
         RoomSpec("gone", 1.0, 0, DAY_S / 2)]  # "gone" is silent after the first half day


@pytest.mark.parametrize("policy", ["message", "list"])
async def test_the_simulated_clock_drives_retention(policy: str, migrated: Settings, own_redis: str) -> None:
    s = migrated.model_copy(update={
        "redis_url": own_redis, "sweep_policy": policy, "sweep_pause_s": 0.0, "sweep_interval_s": 3600.0,
        "redis_retention_s": DAY_S, "buffer_cap": 10_000, "flush_chunk": 100})  # no flush: only retention moves
    w = Workload(users=4, msgs_per_user_day=50, days=3, tick_s=300, reads_per_write=0)
    opts = Options(w, s, policies=(policy,), fork_window_s=0.0, rooms=ROOMS)
    redis = aioredis.from_url(own_redis)
    pool = await create_pool(s.mysql_dsn, 4)
    try:
        run = await Sim(s, opts, redis, pool, None).run(time.monotonic() + 60)
        cutoff = opts.start_ms + 3 * DAY_MS - DAY_MS  # what the last sweep (at the run's end) moves
        keys = Keys(s.redis_prefix, s.kafka_partitions)
        cached = {room.name: [orjson.loads(e)["ts"] for e in await redis.lrange(keys.msgs(room.name), 0, -1)]
                  for room in ROOMS}
        archived = await _archived(pool)
    finally:
        pool.close()
        await pool.wait_closed()
        await redis.aclose()

    assert run.consistent and run.sent == 3 * 200
    assert cached["gone"] == [] and archived["gone"]  # idle longer than the retention: left Redis whole
    assert all(ts < cutoff for ts in archived["gone"])
    for room in ("busy", "quiet"):
        assert all(ts < cutoff for ts in archived.get(room, []))
        assert cached[room] and cached[room] == sorted(cached[room])
    if policy == "message":  # everything older than the retention left Redis, the rest stayed
        assert all(ts >= cutoff for room in ("busy", "quiet") for ts in cached[room])
        assert archived["busy"] and archived["quiet"]
    else:  # active rooms keep their lists whole, old messages included
        assert "busy" not in archived and "quiet" not in archived
        assert min(cached["busy"]) < cutoff and min(cached["quiet"]) < cutoff
    assert sum(len(v) for v in cached.values()) + sum(len(v) for v in archived.values()) == run.sent


async def _archived(pool: aiomysql.Pool) -> dict[str, list[int]]:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT r.name, m.created_at FROM messages m JOIN rooms r ON r.id = m.room_id "
                          "ORDER BY m.kafka_offset")
        rows = await cur.fetchall()
    out: dict[str, list[int]] = {}
    for name, ts in rows:
        out.setdefault(str(name), []).append(int(ts))
    return out
