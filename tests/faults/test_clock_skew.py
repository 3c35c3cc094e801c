"""Clock skew between two gateways, +5 s and -5 s (libfaketime: Debian's faketime), under load, with
a 3 s Redis retention (the sweeper moves messages to MySQL all along, and is the only mover here).
A message's `ts` is its gateway's clock, so the two gateways' messages interleave 10 s apart in ts;
order is the log's (cursor) on every path, and retention goes by ts: nothing leaves Redis before its
ts is older than the retention, and nothing stays longer than the retention plus twice the skew
(an old message waits behind a younger one: sweeper/policy.py), plus a sweep interval."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiomysql
import pytest
import redis.asyncio as aioredis
from roomcast_client import RoomcastClient

from shared.keys import Keys
from shared.settings import Settings
from tests.faults.harness import Allow, history, run_load_through, small
from tests.support import Cluster, eventually, token
from tools.checker import check_storage, stored_messages
from tools.localstack import Proc, require_binary
from tools.services import start_sweeper

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

SKEW_S = 5
RETENTION_S = 3
SWEEP_S = 1.0


def skewed(by: int) -> list[str]:
    """The command to run a process under: its wall clock `by` seconds off (its monotonic clock true)."""
    return ["env", "DONT_FAKE_MONOTONIC=1", str(require_binary("faketime")), "-f", f"{by:+d}s"]


@pytest.fixture
def cluster(migrated: Settings, log_dir: Path) -> Iterator[tuple[Cluster, Proc]]:
    settings = small(migrated, buffer_cap=10_000, flush_chunk=100, redis_retention_s=RETENTION_S,
                     sweep_interval_s=SWEEP_S, sweep_pause_s=0.0)
    c = Cluster(settings, log_dir)
    # (their fan-out on aiokafka: librdkafka's timers do not work under libfaketime at all, its
    # requests fail at once, and no real clock skew does that; the skew under test is the wall clock's)
    c.add_gateway(wrap=skewed(+SKEW_S), KAFKA_FANOUT_CLIENT="aiokafka")
    c.add_gateway(wrap=skewed(-SKEW_S), KAFKA_FANOUT_CLIENT="aiokafka")
    c.start_persister()
    sweeper = start_sweeper(settings, log_dir, f"{settings.redis_prefix}-sweeper")
    yield c, sweeper
    sweeper.stop()
    c.stop()


async def test_gateways_five_seconds_apart_keep_order_and_retention(
        cluster: tuple[Cluster, Proc], redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    c, sweeper = cluster
    s = c.settings
    keys = Keys(s.redis_prefix, s.kafka_partitions)
    late = RETENTION_S + 2 * SKEW_S + SWEEP_S + 2  # (2 s for a loaded machine)
    samples: list[str] = []

    async def watch_retention() -> None:
        async with RoomcastClient(c.url(0), token(s, "fast")) as fast, \
                RoomcastClient(c.url(1), token(s, "slow")) as slow:
            ahead, behind = await fast.send("clocks", "from +5 s"), await slow.send("clocks", "from -5 s")
        assert ahead["ts"] - behind["ts"] >= 2 * SKEW_S * 1000 - 1000, "the gateways' clocks are 10 s apart"

        async def moved_some() -> bool:
            return any(m.source == "mysql" for m in await stored_messages(redis, mysql, keys, "room-0"))

        await eventually(moved_some, 30, what="the sweeper moving messages to MySQL")
        for _ in range(10):  # the stores against the (true) clock, now and then
            now_ms = time.time() * 1000
            for room in ("room-0", "room-1", "room-2", "room-3"):
                for copy in await stored_messages(redis, mysql, keys, room):
                    age_s = (now_ms - copy.ts) / 1000
                    if copy.source == "mysql" and age_s < RETENTION_S - 0.5:
                        samples.append(f"{copy.id} in MySQL at {age_s:.1f} s old")
                    if copy.source == "redis" and age_s > late:
                        samples.append(f"{copy.id} still in Redis at {age_s:.1f} s old")
            await asyncio.sleep(1)

    load = await run_load_through(c, watch_retention, redis, mysql, Allow())
    assert not samples, f"retention went wrong: {samples[:5]}"
    async with RoomcastClient(c.url(1), token(s, "reader")) as reader:
        paged = {room: await history(reader, room) for room in load.rooms}
    report = check_storage(load.all_acks, paged, load.unacked)  # (cursor order, each once, as acked)
    assert report.ok, f"history paged back: {report}"
    assert sweeper.alive
