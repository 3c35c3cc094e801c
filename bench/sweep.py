"""Sweeper benchmark (not a test): seed N rooms, sweep once, report speed and Redis latency.

    .venv/bin/python bench/sweep.py                      # 100,000 rooms, own redis-server
    .venv/bin/python bench/sweep.py --rooms 10000
    .venv/bin/python bench/sweep.py --redis-url redis://127.0.0.1:6390/0 --mysql-dsn mysql://root:@127.0.0.1:3306/roomcast_bench

Seeds every room with `--new` messages inside the retention and `--old-fraction` of the rooms with
`--old` messages past it, registers the rooms in MySQL, then runs one sweep (policy "message") and
prints: total sweep time, rooms/s, messages moved, MySQL rows/s, and the Redis command latency
during the sweep as the server measured it (SLOWLOG at threshold 0, drained atomically with
MULTI/SLOWLOG GET/SLOWLOG RESET/EXEC every 0.2 s). Latency is only sampled on a redis-server this
script started (the default) or with --slowlog, since it changes the server's slowlog settings.

The MySQL database (default `roomcast_bench`) is created and migrated if missing, and its `rooms`
and `messages` tables are emptied first: the name must contain "bench".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import aiomysql
import pymysql
import redis.asyncio as aioredis

from shared.cursor import Position
from shared.keys import Keys
from shared.message import Message, new_message_id
from shared.migrate import migrate
from shared.mysql import MysqlTarget, create_pool
from shared.settings import Settings
from shared.store.mover import Mover
from shared.store.rooms import RoomDirectory
from sweeper.service import Sweeper
from tools import localstack

DAY_MS = 24 * 3600 * 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rooms", type=int, default=100_000)
    p.add_argument("--old", type=int, default=5, help="messages past the retention in a room that has old ones")
    p.add_argument("--old-fraction", type=float, default=0.5, help="share of rooms with old messages")
    p.add_argument("--new", type=int, default=2, help="messages inside the retention, every room")
    p.add_argument("--body-bytes", type=int, default=100)
    p.add_argument("--redis-url", default="", help="default: start an own redis-server on a free port")
    p.add_argument("--mysql-dsn", default="mysql://root:@127.0.0.1:3306/roomcast_bench")
    p.add_argument("--slowlog", action="store_true", help="sample latency on --redis-url too (changes its config)")
    p.add_argument("--sweep-chunk", type=int, default=100)
    p.add_argument("--flush-chunk", type=int, default=100)
    p.add_argument("--pause", type=float, default=0.0, help="sweep_pause_s (production default 0.05)")
    return p.parse_args(argv)


async def reset_mysql(dsn: str) -> None:
    target = MysqlTarget.from_dsn(dsn)
    if "bench" not in target.database:
        sys.exit(f"refusing to empty tables of {target.database!r}: use a database named *bench*")
    await migrate(dsn)
    conn = await aiomysql.connect(**target.connect_kwargs())
    try:
        async with conn.cursor() as cur:
            await cur.execute("TRUNCATE TABLE messages")
            await cur.execute("TRUNCATE TABLE rooms")
    finally:
        conn.close()


async def seed(args: argparse.Namespace, s: Settings, redis: aioredis.Redis, pool: aiomysql.Pool) -> tuple[int, int]:
    """Returns (old messages, all messages)."""
    keys = Keys(s.redis_prefix, s.kafka_partitions)
    directory = RoomDirectory(pool, max_cached=10_000)
    now = int(time.time() * 1000)
    body = "x" * args.body_bytes
    next_offset = [0] * s.kafka_partitions
    old_every = max(1, round(1 / args.old_fraction)) if args.old_fraction > 0 else 0
    old_total = total = 0
    batch = 1000
    for lo in range(0, args.rooms, batch):
        names = [f"bench.{i:07d}" for i in range(lo, min(lo + batch, args.rooms))]
        await directory.ids(names)
        pipe = redis.pipeline(transaction=False)
        for i, room in enumerate(names, start=lo):
            n_old = args.old if old_every and i % old_every == 0 else 0
            ts = [now - 8 * DAY_MS + j for j in range(n_old)] + [now - DAY_MS + j for j in range(args.new)]
            if not ts:
                continue
            p = keys.partition(room)
            entries = []
            for j, t in enumerate(ts):
                off = next_offset[p]
                next_offset[p] += 1
                entries.append(Message(new_message_id(), room, f"user{j % 10}", body, t, f"c{off}",
                                       Position(p, off)).entry())
            pipe.rpush(keys.msgs(room), *entries)
            pipe.hset(keys.meta(room), mapping={"first_ts": ts[0], "last_ts": ts[-1], "reg": 1})
            old_total += n_old
            total += len(ts)
        await pipe.execute()
    return old_total, total


async def drain_slowlog(redis: aioredis.Redis, into: list[tuple[int, str]]) -> None:
    pipe = redis.pipeline(transaction=True)
    pipe.slowlog_get(1_000_000)
    pipe.slowlog_reset()
    entries, _ = await pipe.execute()
    for e in entries:
        cmd = e["command"]
        name = (cmd.split(b" ", 1)[0] if isinstance(cmd, bytes) else str(cmd).split(" ", 1)[0])
        name = name.decode() if isinstance(name, bytes) else name
        if name.upper() not in ("SLOWLOG", "MULTI", "EXEC"):
            into.append((int(e["duration"]), name.upper()))


async def sample_slowlog(redis: aioredis.Redis, into: list[tuple[int, str]], done: asyncio.Event) -> None:
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 0.2)
        await drain_slowlog(redis, into)


def pct(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] if sorted_values else 0


async def main(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore", category=pymysql.err.Warning)  # MySQL notes (IF NOT EXISTS, IGNORE)
    own: localstack.Proc | None = None
    tmp = tempfile.TemporaryDirectory(prefix="roomcast-bench-")
    redis_url = args.redis_url
    if not redis_url:
        port = localstack.free_port()
        own = localstack.start_redis(port, Path(tmp.name) / "data", Path(tmp.name) / "logs", appendonly=False)
        redis_url = f"redis://127.0.0.1:{port}/0"
    s = Settings(redis_url=redis_url, mysql_dsn=args.mysql_dsn, redis_prefix="bench", sweep_chunk=args.sweep_chunk,
                 flush_chunk=args.flush_chunk, buffer_cap=max(200, args.flush_chunk), sweep_pause_s=args.pause,
                 sweep_policy="message", log_json=False)
    redis = aioredis.from_url(redis_url)
    pool: aiomysql.Pool | None = None
    try:
        await reset_mysql(args.mysql_dsn)
        pool = await create_pool(args.mysql_dsn, 4)
        mem0 = (await redis.info("memory"))["used_memory"]
        t0 = time.monotonic()
        old_total, total = await seed(args, s, redis, pool)
        mem1 = (await redis.info("memory"))["used_memory"]
        print(f"seeded {args.rooms:,} rooms, {total:,} messages ({old_total:,} past retention) "
              f"in {time.monotonic() - t0:.1f}s; Redis used_memory +{(mem1 - mem0) / 2**20:.1f} MiB "
              f"= {(mem1 - mem0) / max(total, 1):.0f} B per message incl. per-room meta "
              f"({args.body_bytes} B bodies)")

        latencies: list[tuple[int, str]] = []
        sampling = own is not None or args.slowlog
        done = asyncio.Event()
        sampler = None
        if sampling:
            await redis.config_set("slowlog-log-slower-than", 0)
            await redis.config_set("slowlog-max-len", 1_000_000)
            await redis.slowlog_reset()
            sampler = asyncio.create_task(sample_slowlog(redis, latencies, done))

        walked = RoomDirectory(pool)
        mover = Mover(redis, pool, Keys(s.redis_prefix, s.kafka_partitions), walked)
        sweeper = Sweeper(s, redis, pool, mover, walked)
        t0 = time.monotonic()
        stats = await sweeper.sweep(asyncio.Event())
        took = time.monotonic() - t0
        done.set()
        if sampler is not None:
            await sampler

        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SELECT COUNT(*) FROM messages")
            (rows,) = await cur.fetchone()
        assert stats.complete and rows == old_total == stats.messages_moved, (stats, rows, old_total)
        print(f"sweep: {took:.2f}s for {stats.rooms_scanned:,} rooms ({stats.chunks:,} chunks, pause "
              f"{args.pause}s) = {stats.rooms_scanned / took:,.0f} rooms/s; moved {stats.messages_moved:,} "
              f"messages from {stats.rooms_moved:,} rooms in {mover.insert_statements:,} inserts = "
              f"{rows / took:,.0f} MySQL rows/s")
        if latencies:
            us = sorted(d for d, _ in latencies)
            by_cmd: dict[str, list[int]] = {}
            for d, name in latencies:
                by_cmd.setdefault(name, []).append(d)
            print(f"redis commands during the sweep: {len(us):,}; latency (server, us): p50 {pct(us, 0.5)}, "
                  f"p99 {pct(us, 0.99)}, p99.9 {pct(us, 0.999)}, max {us[-1]}, mean {statistics.fmean(us):.1f}")
            for name, ds in sorted(by_cmd.items(), key=lambda kv: -len(kv[1])):
                ds.sort()
                print(f"  {name:8} n={len(ds):>9,}  p99 {pct(ds, 0.99):>5} us  max {ds[-1]:>6} us")
        else:
            print("redis latency: not sampled (external Redis; pass --slowlog to sample it)")
    finally:
        if pool is not None:
            pool.close()
            await pool.wait_closed()
        with contextlib.suppress(Exception):
            await redis.aclose()
        if own is not None:
            own.stop()
        tmp.cleanup()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
