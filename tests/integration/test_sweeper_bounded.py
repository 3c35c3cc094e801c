"""While the sweeper moves 100,000 messages, every Redis command stays small and fast.

Runs its own redis-server (free port, temp dir) so MONITOR and the SLOWLOG threshold see only this
test: every command of the sweep is recorded with `redis-cli monitor` and checked for its size, and
SLOWLOG at 10 ms holds at most a few in a thousand commands, none over 100 ms.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import aiomysql
import pytest
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.settings import Settings
from shared.store.mover import Mover
from shared.store.rooms import RoomDirectory
from sweeper.service import Sweeper
from tests.support_seed import DAY_MS, Seeder, count_messages
from tools import localstack

ROOMS, PER_ROOM = 1000, 100
ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"')
# What a sweep may send: the meta batch, bounded list reads, the Mover's read and trim scripts (and
# the commands they run: HGET reads the room's count of entries edited in place), script loading,
# and what redis-py says when it connects.
ALLOWED = {b"HMGET", b"HGET", b"LRANGE", b"EVALSHA", b"EVAL", b"SCRIPT", b"LINDEX", b"LTRIM", b"HSET", b"HDEL",
           b"LLEN", b"HELLO", b"CLIENT", b"PING", b"SELECT", b"ECHO"}

pytestmark = pytest.mark.timeout(120)


def parse_monitor(path: Path) -> list[list[bytes]]:
    """[[COMMAND, arg, ...]] from `redis-cli monitor` output (quoted, escaped arguments)."""
    out = []
    for line in path.read_bytes().splitlines():
        if b"] " not in line:
            continue
        args = ARG.findall(line.split(b"] ", 1)[1])
        if args:
            out.append([args[0].upper(), *args[1:]])
    return out


async def test_sweeping_100k_messages_keeps_every_command_bounded(
        settings: Settings, mysql: aiomysql.Pool, tmp_path: Path, log_dir: Path) -> None:
    port = localstack.free_port()
    server = await asyncio.to_thread(localstack.start_redis, port, tmp_path / "redis", log_dir, False)
    s = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0", "sweep_pause_s": 0.0})
    redis = aioredis.from_url(s.redis_url)
    monitor: subprocess.Popen[bytes] | None = None
    try:
        await redis.config_set("slowlog-log-slower-than", 10_000)
        await redis.config_set("slowlog-max-len", 1024)
        seeder = Seeder(s, redis, mysql)
        rooms = [f"big.{i:04d}" for i in range(ROOMS)]
        base = int(time.time() * 1000) - 8 * DAY_MS
        await seeder.register(rooms)
        for i in range(0, ROOMS, 100):
            await seeder.to_redis({r: seeder.messages(r, range(base, base + PER_ROOM)) for r in rooms[i:i + 100]})
        await redis.slowlog_reset()

        log = tmp_path / "monitor.log"
        monitor = await asyncio.to_thread(start_monitor, port, log)
        await _wait_for_marker(redis, log, f"start-{uuid.uuid4().hex}")

        keys = Keys(s.redis_prefix, s.kafka_partitions)
        walked = RoomDirectory(mysql)
        sweeper = Sweeper(s, redis, mysql, Mover(redis, mysql, keys, walked), walked)
        started = time.monotonic()
        stats = await sweeper.sweep(asyncio.Event())
        took = time.monotonic() - started
        await _wait_for_marker(redis, log, f"end-{uuid.uuid4().hex}")
        monitor.terminate()
        await asyncio.to_thread(monitor.wait, 10)

        assert stats.complete and stats.messages_moved == ROOMS * PER_ROOM
        assert await count_messages(mysql) == ROOMS * PER_ROOM

        commands = await asyncio.to_thread(parse_monitor, log)
        # Each command's work is bounded (below); its time is too, but a loaded machine can preempt
        # redis-server in the middle of any command: a few in a thousand may pass 10 ms, none 100 ms.
        slow = await redis.slowlog_get(1024)
        assert len(slow) <= max(3, len(commands) // 1000), f"{len(slow)} commands took over 10 ms: {slow[:3]}"
        assert all(entry["duration"] < 100_000 for entry in slow), f"a command took over 100 ms: {slow}"
        names = Counter(c[0] for c in commands)
        assert set(names) <= ALLOWED, names
        assert names[b"LRANGE"] >= ROOMS
        for cmd in commands:
            name, args = cmd[0], cmd[1:]
            if name == b"LRANGE":
                start, stop = int(args[1]), int(args[2])
                assert 0 <= start <= stop and stop - start + 1 <= s.flush_chunk, cmd
            elif name == b"LTRIM":  # removes the first n entries: n bounded by the chunk
                assert int(args[1]) <= s.flush_chunk and args[2] == b"-1", cmd
            elif name == b"LINDEX":
                assert int(args[1]) < s.flush_chunk, cmd
            elif name == b"HMGET":
                assert len(args) == 3, cmd
            elif name == b"EVALSHA":
                assert len(args) <= 8, cmd  # sha, numkeys, two keys, n, the chunk's two ends, edits
        print(f"\nswept {ROOMS * PER_ROOM} messages in {took:.1f}s; commands: {dict(names)}")
    finally:
        if monitor is not None and monitor.poll() is None:
            monitor.kill()
            monitor.wait()
        await redis.aclose()
        await asyncio.to_thread(server.stop)


def start_monitor(port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(["redis-cli", "-p", str(port), "monitor"], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


async def _wait_for_marker(redis: aioredis.Redis, log: Path, marker: str) -> None:
    """Send ECHO marker until MONITOR's output shows it (the monitor is attached / caught up)."""
    for _ in range(500):
        await redis.echo(marker)
        await asyncio.sleep(0.02)
        if marker.encode() in await asyncio.to_thread(log.read_bytes):
            return
    raise AssertionError("redis-cli monitor did not record the marker")
