"""The operator's `roomcast` command (issue 6), run as a subprocess the way an operator runs it,
against the test's Kafka, Redis and MySQL: `check`, `stats`, `token`. Plus the pure verdicts
behind `check`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import aiomysql
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from shared.auth import verify_token
from shared.kafka import ensure_topic
from shared.keys import Keys
from shared.migrate import migration_files
from shared.settings import Settings
from tests.conftest import ROOT
from tools import ops
from tools.localstack import free_port

pytestmark = pytest.mark.timeout(90)


def roomcast(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`roomcast ARGS` in a subprocess configured by `settings` (plus `env`)."""
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **settings.to_env(), **env})


def lines_by_dependency(stdout: str) -> dict[str, str]:
    return {line.split()[0]: line for line in stdout.splitlines() if line.strip()}


@pytest.fixture
async def ready(migrated: Settings) -> Settings:
    """Settings whose topic exists and whose database is migrated."""
    await ensure_topic(migrated)
    return migrated


# --------------------------------------------------------------------------- check


async def test_check_passes_against_working_services(ready: Settings) -> None:
    r = roomcast(ready, "check")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = lines_by_dependency(r.stdout)
    assert set(lines) == {"kafka", "redis", "mysql"}
    assert lines["kafka"].split()[1] == "ok", lines["kafka"]
    assert f"{ready.kafka_partitions} partitions" in lines["kafka"]
    assert lines["redis"].split()[1] in ("ok", "WARN"), lines["redis"]  # the machine's Redis runs without AOF
    latest = max(version for version, _, _ in migration_files())
    assert lines["mysql"].split()[1] == "ok" and f"schema version {latest}" in lines["mysql"], lines["mysql"]

    r = roomcast(ready, "check", "--json")
    assert r.returncode == 0, r.stderr
    assert {f["dependency"]: f["failed"] for f in json.loads(r.stdout)} == {"kafka": False, "redis": False,
                                                                            "mysql": False}


@pytest.mark.parametrize("down", [("kafka",), ("redis",), ("mysql",), ("kafka", "redis", "mysql")],
                         ids=["kafka", "redis", "mysql", "all"])
async def test_check_names_each_unreachable_dependency(ready: Settings, down: tuple[str, ...]) -> None:
    closed = {name: free_port() for name in down}  # nothing listens there
    updates = {}
    if "kafka" in closed:
        updates["kafka_bootstrap"] = f"127.0.0.1:{closed['kafka']}"
    if "redis" in closed:
        updates["redis_url"] = f"redis://127.0.0.1:{closed['redis']}/0"
    if "mysql" in closed:
        updates["mysql_dsn"] = f"mysql://root:@127.0.0.1:{closed['mysql']}/roomcast"
    started = time.monotonic()
    r = roomcast(ready.model_copy(update=updates), "check", "--timeout", "2")
    took = time.monotonic() - started
    assert r.returncode == 1, r.stdout + r.stderr
    lines = lines_by_dependency(r.stdout)
    for name in ("kafka", "redis", "mysql"):
        status = lines[name].split()[1]
        assert status == ("UNREACHABLE" if name in down else lines[name].split()[1]), lines[name]
        if name in down:
            assert str(closed[name]) in lines[name]  # says where it looked
        else:
            assert status in ("ok", "WARN"), lines[name]
    assert took < 15, f"check took {took:.1f}s"
    assert "Traceback" not in r.stderr, r.stderr


async def test_check_says_what_is_misconfigured(settings: Settings) -> None:
    # `settings` alone: no topic, no database. Nothing may be created by looking.
    r = roomcast(settings, "check")
    assert r.returncode == 1, r.stdout + r.stderr
    lines = lines_by_dependency(r.stdout)
    assert "MISCONFIGURED" in lines["kafka"] and "does not exist" in lines["kafka"], lines["kafka"]
    assert "MISCONFIGURED" in lines["mysql"] and "roomcast migrate" in lines["mysql"], lines["mysql"]
    r = roomcast(settings, "check")
    assert "does not exist" in lines_by_dependency(r.stdout)["kafka"]  # still: the check did not auto-create it

    await ensure_topic(settings)
    r = roomcast(settings, "check", KAFKA_PARTITIONS=str(settings.kafka_partitions * 2))
    kafka = lines_by_dependency(r.stdout)["kafka"]
    assert r.returncode == 1 and "MISCONFIGURED" in kafka and f"has {settings.kafka_partitions} partitions" in kafka


# --------------------------------------------------------------------------- stats


async def test_stats_json_counts_rooms_buffers_archive_and_lag(
    ready: Settings, redis: aioredis.Redis, mysql: aiomysql.Pool
) -> None:
    s, keys = ready, Keys(ready.redis_prefix, ready.kafka_partitions)
    buffered = {"r-alpha": 5, "r-beta": 0, "r-gamma": 7}
    async with mysql.acquire() as conn, conn.cursor() as cur:
        await cur.executemany("INSERT INTO rooms (name, created_at) VALUES (%s, 0)", [(r,) for r in buffered])
        await cur.execute("SELECT id FROM rooms WHERE name = 'r-alpha'")
        (room_id,) = await cur.fetchone()
        await cur.executemany(
            "INSERT INTO messages (id, room_id, kafka_partition, kafka_offset, user_id, body, created_at) "
            "VALUES (%s, %s, 0, %s, 'u', 'b', 0)", [(f"{i:026d}", room_id, i) for i in range(2)])
    for room, n in buffered.items():
        if n:
            await redis.rpush(keys.msgs(room), *[b"{}"] * n)
    await redis.sadd(keys.new_rooms(2), "r-not-yet-registered")
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for partition, count in ((0, 3), (1, 2)):
            for _ in range(count):
                await producer.send_and_wait(s.kafka_topic, b"x", partition=partition)
    finally:
        await producer.stop()
    await redis.set(keys.applied(0), 1)  # offsets 0 and 1 applied, 2 not yet: lag 1; partition 1: lag 2

    r = roomcast(s, "stats", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    stats = json.loads(r.stdout)
    assert stats["errors"] == {}
    assert (stats["rooms"], stats["buffered_messages"], stats["mysql_messages"]) == (3, 12, 2)
    assert stats["unregistered_rooms"] == 1
    parts = {p["partition"]: p for p in stats["partitions"]}
    assert len(parts) == s.kafka_partitions
    assert (parts[0]["applied"], parts[0]["high_water"], parts[0]["lag"]) == (1, 3, 1)
    assert (parts[1]["applied"], parts[1]["high_water"], parts[1]["lag"]) == (None, 2, 2)
    assert all(parts[p]["lag"] == 0 for p in range(2, s.kafka_partitions))
    assert stats["lag_total"] == 3
    assert r.stderr == ""  # no progress bar when stderr is not a terminal

    r = roomcast(s, "stats")
    assert r.returncode == 0 and "buffered in Redis    12 messages" in r.stdout, r.stdout


async def test_stats_reports_an_unreachable_dependency(ready: Settings, mysql: aiomysql.Pool) -> None:
    async with mysql.acquire() as conn, conn.cursor() as cur:
        await cur.execute("INSERT INTO rooms (name, created_at) VALUES ('r-one', 0)")
    r = roomcast(ready.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}), "stats", "--json")
    assert r.returncode == 1
    stats = json.loads(r.stdout)
    assert set(stats["errors"]) == {"redis"}, stats["errors"]
    assert stats["rooms"] == 1 and stats["buffered_messages"] is None and stats["lag_total"] is None
    assert all(p["high_water"] == 0 and p["lag"] is None for p in stats["partitions"])


def test_progress_bar_draws_only_on_a_terminal() -> None:
    shown = io.StringIO()
    bar = ops.Progress(2500, "rooms", stream=shown, enabled=True)
    bar.update(1000)
    assert "rooms [" in shown.getvalue() and "1,000/2,500 (40%)" in shown.getvalue()
    bar.close()
    hidden = io.StringIO()  # StringIO is not a tty
    bar = ops.Progress(10, "rooms", stream=hidden)
    bar.update(10)
    bar.close()
    assert hidden.getvalue() == ""


# --------------------------------------------------------------------------- token


def test_token_prints_only_a_token_that_verifies(settings: Settings) -> None:
    r = roomcast(settings, "token", "alice")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.count("\n") == 1 and r.stdout.endswith("\n")
    assert verify_token(settings, r.stdout.strip()).user == "alice"


# --------------------------------------------------------------------------- the verdicts


@pytest.mark.parametrize(("config", "status"), [
    ({"appendonly": "yes", "maxmemory-policy": "noeviction", "maxmemory": "536870912"}, ops.OK),
    ({"appendonly": "no", "maxmemory-policy": "noeviction", "maxmemory": "536870912"}, ops.WARN),
    ({"appendonly": "yes", "maxmemory-policy": "noeviction", "maxmemory": "0"}, ops.WARN),
    ({"appendonly": "yes", "maxmemory-policy": "allkeys-lru", "maxmemory": "0"}, ops.WARN),
    ({"appendonly": "yes", "maxmemory-policy": "allkeys-lru", "maxmemory": "536870912"}, ops.MISCONFIGURED),
])
def test_redis_config_verdict(config: dict[str, str], status: str) -> None:
    assert ops.judge_redis_config(config)[0] == status


def test_topic_verdict() -> None:
    s = Settings(kafka_partitions=8, redis_retention_s=7 * 86400)
    assert ops.judge_topic("t", None, None, s)[0] == ops.MISCONFIGURED
    assert ops.judge_topic("t", 4, 14 * 86_400_000, s)[0] == ops.MISCONFIGURED
    assert ops.judge_topic("t", 8, 7 * 86_400_000, s)[0] == ops.MISCONFIGURED  # must exceed Redis retention
    assert ops.judge_topic("t", 8, 14 * 86_400_000, s)[0] == ops.OK
    assert ops.judge_topic("t", 8, -1, s)[0] == ops.OK  # unlimited
    assert ops.judge_topic("t", 8, None, s)[0] == ops.WARN


def test_schema_verdict_and_lag() -> None:
    known = [(1, "0001_initial.sql"), (2, "0002_more.sql")]
    assert ops.judge_schema("db", {1, 2}, known)[0] == ops.OK
    assert ops.judge_schema("db", {1}, known) == (ops.MISCONFIGURED, "database 'db' at schema version 1, pending "
                                                                     "0002_more.sql: run `roomcast migrate`")
    assert ops.judge_schema("db", {1, 2, 3}, known)[0] == ops.WARN
    assert ops.partition_lag(None, 0, 0) == 0
    assert ops.partition_lag(None, 5, 9) == 4  # nothing applied: everything still in the log
    assert ops.partition_lag(8, 0, 9) == 0
    assert ops.partition_lag(3, 0, 9) == 5
    assert ops.partition_lag(3, 6, 9) == 3  # the log no longer starts at mark + 1
    assert ops.redact("mysql://u:secret@h:3306/db") == "mysql://u:***@h:3306/db"
