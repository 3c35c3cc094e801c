"""One policy's simulated run: the real persister, chunk mover, sweeper and history reader, ticked
by a simulated clock, on a Redis of its own (AOF on) and a MySQL database of its own.

Each tick of `tick_s` simulated seconds: the clock moves to the tick's end; the tick's sends get
their offsets (broker.SimLog) and go to `Persister.apply_all` as fetches of up to
`persister_batch_max` records; rooms past the cap are flushed with `Persister.flush_room` (the
Mover); dedupe keys whose simulated TTL ran out are deleted (expiry.py); then the tick's reads go
through the gateway's `HistoryReader`. Every `sweep_interval_s` new rooms are registered
(`Persister.register_new_rooms`) and the `Sweeper` makes one pass (its clock is the simulated one;
it does not pause between room chunks). Once a day, at `rewrite_hour`, a BGREWRITEAOF runs while
the ticks go on; at each day's end the day's figures are taken. What the code reads as time
(message ts, ULID ids, the sweeper's retention cutoff, the rooms table's created_at) comes from the
simulated clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import random
import tempfile
import time
from collections import defaultdict
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue
from typing import Protocol, cast
from urllib.parse import quote

import aiomysql
import redis.asyncio as aioredis
import uvloop
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.common import Progress, latency_summary
from gateway.history import HistoryReader
from persister.service import Persister
from shared.keys import Keys
from shared.message import Message
from shared.migrate import migrate
from shared.mysql import MysqlTarget, create_pool
from shared.settings import Settings
from shared.store.buffer import APPLY_BATCH, DONE_IF_SHORT, READ_RUN, TRIM_IF_HEAD
from shared.store.entry import Entry
from shared.store.mover import Mover
from shared.store.paging import MysqlNeed
from shared.store.rooms import RoomDirectory
from sweeper.service import Sweeper
from tools import localstack
from tools.simulate import measure
from tools.simulate.broker import SimConsumer, SimLog
from tools.simulate.expiry import Expiry
from tools.simulate.workload import DAY_S, PEAK_HOUR, RoomSpec, Traffic, Workload

START_MS = 1_767_571_200_000  # 2026-01-05 00:00 UTC, a Monday: the simulated clock's start
HOUR_MS = 3_600_000
SCRIPTS = {"APPLY_BATCH": APPLY_BATCH, "DONE_IF_SHORT": DONE_IF_SHORT, "TRIM_IF_HEAD": TRIM_IF_HEAD,
           "READ_RUN": READ_RUN}


class ProgressLine(Protocol):
    def update(self, text: str, every: float = 1.0) -> None: ...


class SimulationTimeout(Exception):
    """The run took longer than its time limit."""


class SimClock:
    """The simulated time, in the shape of time.time (seconds)."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> float:
        return self.now_ms / 1000


class CountingReader(HistoryReader):
    """The gateway's history reader, counting the MySQL queries it makes and the rows they return."""

    queries = 0
    rows = 0

    async def _older(self, room: str, need: MysqlNeed) -> list[Entry]:
        out = await super()._older(room, need)
        self.queries += 1
        self.rows += len(out)
        return out


@dataclass
class Options:
    workload: Workload
    settings: Settings  # the run replaces redis_url, redis_prefix, the database, sweep_policy, sweep_pause_s
    policies: tuple[str, ...] = ("message", "list")
    sample: int = 200  # keys of each kind measured with MEMORY USAGE per day
    rewrite_hour: int = PEAK_HOUR
    fork_window_s: float = 2.0  # how long the stretched rewrite of each day lasts (real seconds)
    time_limit_s: float = 3600.0  # per policy's run
    start_ms: int = START_MS
    progress: bool = True
    jobs: int = 2  # runs at once, each in its own process
    rooms: list[RoomSpec] | None = None  # instead of the workload's own (a test's hand-made rooms)


@dataclass
class Stores:
    statements: int = 0  # MySQL inserts of messages
    rows: int = 0


@dataclass
class SweepDay:
    passes: int = 0
    rooms_visited_max: int = 0
    rooms_moved_max: int = 0
    moved: int = 0
    moved_max: int = 0  # in one pass
    seconds_max: float = 0.0
    slowest: measure.Slowest = field(default_factory=measure.Slowest)


@dataclass
class Day:
    day: int
    sent: int
    body_bytes: int
    reads: dict[str, int]  # source -> reads: redis (no MySQL query), mysql (rows from it), mysql_empty
    reads_by_depth: dict[str, dict[str, int]]  # newest | recent | deep -> source -> reads
    latency: dict[str, dict[str, float | None]]  # source -> p50/p95/p99/max in ms
    memory: measure.Memory
    mysql_rows: int
    flush: Stores
    sweep: Stores
    sweeps: SweepDay
    slowest: dict[str, measure.Slowest]  # persister | reader -> the day's longest command
    expired: int  # dedupe keys deleted by their simulated TTL


@dataclass
class Hour:
    hour: int
    used: int
    dataset: int
    sweep_moved: int
    flush_rows: int
    reads: int
    redis_reads: int


@dataclass
class Consistency:
    written: int
    in_redis: int
    in_mysql: int
    in_both: int
    repeated: int  # ids found twice in one store
    missing: int  # written, in neither store
    marks_at_end: bool  # every partition's applied mark is its last offset
    unexpected_seeks: int  # seeks other than the first one of each partition (gaps, rewinds)

    @property
    def ok(self) -> bool:
        return (self.in_redis + self.in_mysql == self.written and not (self.in_both or self.repeated or self.missing)
                and self.marks_at_end and not self.unexpected_seeks)


@dataclass
class RunResult:
    policy: str
    seconds: float
    cpu_seconds: float  # of the simulator's process (the services' code runs in it), not Redis's or MySQL's
    sent: int
    reads: int
    days: list[Day]
    hours: list[Hour]
    rewrites: list[measure.Rewrite]
    consistency: Consistency
    consistent: bool
    redis_version: str


class _DayAcc:
    def __init__(self) -> None:
        self.sent = self.body_bytes = 0
        self.reads: dict[str, int] = defaultdict(int)
        self.by_depth: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.latency_ns: dict[str, list[int]] = defaultdict(list)
        self.sweeps = SweepDay()
        self.slowest = {"persister": measure.Slowest(), "reader": measure.Slowest()}
        self.expired = 0


class Sim:
    def __init__(self, s: Settings, opts: Options, redis: aioredis.Redis, pool: aiomysql.Pool,
                 progress: ProgressLine | None) -> None:
        self.s, self.opts, self.redis, self.pool, self.progress = s, opts, redis, pool, progress
        self.w = opts.workload
        self.clock = SimClock(opts.start_ms)
        keys = Keys(s.redis_prefix, s.kafka_partitions)
        self.keys = keys
        self.traffic = Traffic(self.w, opts.start_ms, s.redis_retention_s, s.history_limit_default, opts.rooms)
        self.log = SimLog(s.kafka_topic, keys)
        self.tps = [TopicPartition(s.kafka_topic, p) for p in range(s.kafka_partitions)]
        self.consumer = SimConsumer(self.tps)
        flush_rooms = RoomDirectory(pool, clock=self.clock)
        self.flush_mover = Mover(redis, pool, keys, flush_rooms)
        self.persister = Persister(s, redis, self.flush_mover, flush_rooms, cast(AIOKafkaConsumer, self.consumer))
        sweep_rooms = RoomDirectory(pool, clock=self.clock)
        self.sweep_mover = Mover(redis, pool, keys, sweep_rooms)
        self.sweeper = Sweeper(s, redis, pool, self.sweep_mover, sweep_rooms, clock=self.clock)
        self.reader = CountingReader(s, keys, redis, pool)
        self.expiry = Expiry(s.dedupe_ttl_s)
        self.slowlog = measure.SlowLog({hashlib.sha1(src.encode()).hexdigest(): name for name, src in SCRIPTS.items()})
        self.rewrite = measure.RewriteProbe()
        self.rng = random.Random(f"{self.w.seed}-samples")
        self.written: set[str] = set()
        self.days: list[Day] = []
        self.hours: list[Hour] = []
        self.rewrites: list[measure.Rewrite] = []
        self.acc = _DayAcc()
        self.hour_acc = Hour(0, 0, 0, 0, 0, 0, 0)
        self._flushed_rows = 0
        self.never = asyncio.Event()  # the sweeper's stop: never set

    async def run(self, deadline: float) -> RunResult:
        started, cpu = time.monotonic(), time.process_time()
        await self.redis.config_set("auto-aof-rewrite-percentage", 0)  # rewrites come when measured
        await self.slowlog.start(self.redis)
        await self.persister.take_partitions(self.tps)
        first_seeks = len(self.consumer.seeks)
        tick_ms, start = self.w.tick_s * 1000, self.opts.start_ms
        interval_ms = round(self.s.sweep_interval_s * 1000)
        next_sweep = start + interval_ms
        for tick in range(self.w.days * DAY_S // self.w.tick_s):
            t0, t1 = start + tick * tick_ms, start + (tick + 1) * tick_ms
            self.clock.now_ms = t1
            await self._tick(t0, t1)
            while next_sweep <= t1:
                await self._sweep()
                next_sweep += interval_ms
            await self._rewrite(t1 - start)
            if (t1 - start) % HOUR_MS == 0:
                await self._end_hour((t1 - start) // HOUR_MS, started, deadline)
            if (t1 - start) % (DAY_S * 1000) == 0:
                await self._end_day((t1 - start) // (DAY_S * 1000))
        if (done := await self.rewrite.finished(wait=True)) is not None:
            self.rewrites.append(done)
        check = await self._consistency(len(self.consumer.seeks) - first_seeks)
        version = str((await self.redis.info("server"))["redis_version"])
        return RunResult(self.s.sweep_policy, time.monotonic() - started, time.process_time() - cpu,
                         self.traffic.sent, self.traffic.asked,
                         self.days, self.hours, self.rewrites, check, check.ok, version)

    async def _tick(self, t0: int, t1: int) -> None:
        sent = self.log.append(self.traffic.sends(t0, t1))
        self.traffic.record(sent)
        for fetch in self.log.fetches(sent, self.s.persister_batch_max):
            await self.persister.apply_all(fetch)
        while self.persister.flushes:
            await self.persister.flush_room(self.persister.flushes.pop())
        self.acc.slowest["persister"].add(await self.slowlog.take(self.redis))
        self._note_sent(sent, t1)
        self.acc.expired += await self.expiry.expire(self.redis, t1)
        for read in self.traffic.reads(t1, len(sent)):
            q0, r0 = self.reader.queries, self.reader.rows
            t = time.perf_counter_ns()
            await self.reader.page(read.room, read.before, None)
            ns = time.perf_counter_ns() - t
            source = "redis" if self.reader.queries == q0 else "mysql" if self.reader.rows > r0 else "mysql_empty"
            self.acc.reads[source] += 1
            self.acc.by_depth[read.depth][source] += 1
            self.acc.latency_ns[source].append(ns)
            self.hour_acc.reads += 1
            self.hour_acc.redis_reads += int(source == "redis")
        self.acc.slowest["reader"].add(await self.slowlog.take(self.redis))

    def _note_sent(self, sent: list[Message], now_ms: int) -> None:
        dedupe = set()
        for m in sent:
            assert m.position is not None
            self.written.add(m.id)
            self.acc.body_bytes += len(m.body.encode())
            dedupe.add(self.keys.sent(m.room, m.user, m.client_msg_id))
            dedupe.add(self.keys.seen(m.position.partition, m.ts))
        self.acc.sent += len(sent)
        self.expiry.touch(sorted(dedupe), now_ms)

    async def _sweep(self) -> None:
        # (the persister registers new rooms within a second; here once before each pass suffices)
        await self.persister.register_new_rooms()
        self.acc.slowest["persister"].add(await self.slowlog.take(self.redis))
        stats = await self.sweeper.sweep(self.never)
        slowest = await self.slowlog.take(self.redis)
        d = self.acc.sweeps
        d.passes += 1
        d.rooms_visited_max = max(d.rooms_visited_max, stats.rooms_scanned)
        d.rooms_moved_max = max(d.rooms_moved_max, stats.rooms_moved)
        d.moved += stats.messages_moved
        d.moved_max = max(d.moved_max, stats.messages_moved)
        d.seconds_max = max(d.seconds_max, stats.seconds)
        d.slowest.add(slowest)
        self.hour_acc.sweep_moved += stats.messages_moved

    async def _rewrite(self, since_start_ms: int) -> None:
        """At rewrite_hour a rewrite at Redis's own speed, an hour later one stretched to fork_window_s."""
        if (done := await self.rewrite.finished()) is not None:
            self.rewrites.append(done)
        hour, day = since_start_ms % (DAY_S * 1000) // HOUR_MS, since_start_ms // (DAY_S * 1000) + 1
        if since_start_ms % HOUR_MS == 0 and hour - self.opts.rewrite_hour in (0, 1):
            if (done := await self.rewrite.finished(wait=True)) is not None:
                self.rewrites.append(done)
            window = self.opts.fork_window_s if hour > self.opts.rewrite_hour else 0.0
            await self.rewrite.start(self.redis, day, window, lambda: self.traffic.sent)

    async def _end_hour(self, hour: int, started: float, deadline: float) -> None:
        info = await self.redis.info("memory")
        h = self.hour_acc
        h.hour, h.used, h.dataset = hour, int(info["used_memory"]), int(info["used_memory_dataset"])
        h.flush_rows = self.flush_mover.rows_inserted - self._flushed_rows
        self._flushed_rows = self.flush_mover.rows_inserted
        self.hours.append(h)
        self.hour_acc = Hour(0, 0, 0, 0, 0, 0, 0)
        elapsed = time.monotonic() - started
        if self.progress is not None:
            reads = sum(x.reads for x in self.hours)
            hit = sum(x.redis_reads for x in self.hours) / reads if reads else 0.0
            self.progress.update(
                f"[{self.s.sweep_policy}] day {(hour - 1) // 24 + 1}/{self.w.days} {(hour - 1) % 24 + 1:02d}:00 "
                f"sent {self.traffic.sent:,} Redis-only reads {hit:.0%} {h.used / 1e6:.1f} MB {elapsed:.0f} s",
                every=0.5)
        if time.monotonic() > deadline:
            raise SimulationTimeout(f"time limit reached at simulated hour {hour} of the {self.s.sweep_policy} run")

    async def _end_day(self, day: int) -> None:
        a = self.acc
        mem = await measure.memory(self.redis, self.opts.sample, self.rng)
        await self.slowlog.take(self.redis)
        flushed = Stores(self.flush_mover.insert_statements, self.flush_mover.rows_inserted)
        swept = Stores(self.sweep_mover.insert_statements, self.sweep_mover.rows_inserted)
        for before in self.days:
            flushed.statements -= before.flush.statements
            flushed.rows -= before.flush.rows
            swept.statements -= before.sweep.statements
            swept.rows -= before.sweep.rows
        self.days.append(Day(
            day, a.sent, a.body_bytes, dict(a.reads), {k: dict(v) for k, v in a.by_depth.items()},
            {k: latency_summary(v) for k, v in a.latency_ns.items()}, mem, await measure.mysql_rows(self.pool),
            flushed, swept, a.sweeps, a.slowest, a.expired))
        self.acc = _DayAcc()

    async def _consistency(self, extra_seeks: int) -> Consistency:
        in_redis, in_mysql = await measure.redis_ids(self.redis), await measure.mysql_ids(self.pool)
        r, m = set(in_redis), set(in_mysql)
        expected = self.persister.partitions.expected
        marks = all(expected(p) == (n - 1 if n else None) for p, n in enumerate(self.log.next))
        return Consistency(len(self.written), len(in_redis), len(in_mysql), len(r & m),
                           len(in_redis) - len(r) + len(in_mysql) - len(m), len(self.written - r - m), marks,
                           extra_seeks)


def database_dsn(server_dsn: str, database: str) -> str:
    t = MysqlTarget.from_dsn(server_dsn)
    return f"mysql://{quote(t.user, safe='')}:{quote(t.password, safe='')}@{t.host}:{t.port}/{database}"


async def drop_database(dsn: str) -> None:
    t = MysqlTarget.from_dsn(dsn)
    conn = await aiomysql.connect(**t.connect_kwargs(with_db=False))
    try:
        async with conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS `{t.database}`")
    finally:
        conn.close()


async def run_policy(opts: Options, policy: str, deadline: float, progress: ProgressLine | None) -> RunResult:
    """One run on a fresh Redis (started here, AOF on, in a temporary folder) and a fresh database
    on the MYSQL_DSN server (dropped afterwards)."""
    with tempfile.TemporaryDirectory(prefix="roomcast-sim-") as tmp:
        port = localstack.free_port()
        proc = localstack.start_redis(port, Path(tmp) / "data", Path(tmp) / "logs")
        dsn = database_dsn(opts.settings.mysql_dsn, f"roomcast_sim_{os.getpid()}_{policy}")
        s = opts.settings.model_copy(update={
            "redis_url": f"redis://{localstack.LOCALHOST}:{port}/0", "redis_prefix": "sim", "mysql_dsn": dsn,
            "sweep_policy": policy, "sweep_pause_s": 0.0})
        redis = aioredis.from_url(s.redis_url)
        pool: aiomysql.Pool | None = None
        try:
            await migrate(dsn)
            pool = await create_pool(dsn, 4)
            return await Sim(s, opts, redis, pool, progress).run(deadline)
        finally:
            if pool is not None:
                pool.close()
                await pool.wait_closed()
            await redis.aclose()
            await drop_database(dsn)
            proc.stop()


class QueuedProgress:
    """A child process's progress line, sent to the parent that shows every run's."""

    def __init__(self, queue: Queue[tuple[str, str]], policy: str) -> None:
        self.queue, self.policy = queue, policy
        self._last = 0.0

    def update(self, text: str, every: float = 1.0) -> None:
        if time.monotonic() - self._last >= every:
            self._last = time.monotonic()
            self.queue.put((self.policy, text))


def _child(opts: Options, policy: str, seconds: float, queue: Queue[tuple[str, str]] | None) -> RunResult:
    progress = None if queue is None else QueuedProgress(queue, policy)
    return uvloop.run(run_policy(opts, policy, time.monotonic() + seconds, progress))


def simulate(opts: Options) -> list[RunResult]:
    """Every policy's run: one process each (they share nothing), `jobs` at a time."""
    jobs = max(1, min(opts.jobs, len(opts.policies)))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        queue = manager.Queue() if opts.progress else None
        futures = [pool.submit(_child, opts, p, opts.time_limit_s, queue) for p in opts.policies]
        if queue is not None:
            _show_progress(queue, futures)
        return [f.result() for f in futures]


def _show_progress(queue: Queue[tuple[str, str]], futures: list[Future[RunResult]]) -> None:
    progress = Progress()
    lines: dict[str, str] = {}
    while not all(f.done() for f in futures):
        try:
            policy, text = queue.get(timeout=0.5)
        except Empty:
            continue
        lines[policy] = text
        progress.update("  |  ".join(lines.values()), every=0.5)
    progress.done()


async def mysql_version(settings: Settings) -> str:
    target = MysqlTarget.from_dsn(settings.mysql_dsn)
    conn = await aiomysql.connect(**target.connect_kwargs(with_db=False))
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT VERSION()")
            (version,) = await cur.fetchone()
    finally:
        conn.close()
    return str(version)
