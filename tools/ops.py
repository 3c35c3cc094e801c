"""What `roomcast check` and `roomcast stats` ask of a deployment's Kafka, Redis and MySQL.

Every question has a short timeout and a typed answer. The verdicts (is this topic, this Redis
config, this schema right?) are pure functions of what was read, so they are easy to test; the
readers around them are thin. Nothing here reads the environment: callers pass `Settings`.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiomysql
import pymysql
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError, KafkaError

from shared.keys import Keys
from shared.migrate import migration_files
from shared.mysql import MysqlTarget
from shared.redisconn import connect
from shared.settings import Settings

OK, WARN, MISCONFIGURED, UNREACHABLE = "ok", "WARN", "MISCONFIGURED", "UNREACHABLE"
FAILED = frozenset({MISCONFIGURED, UNREACHABLE})
DEFAULT_TIMEOUT_S = 3.0
STATS_CHUNK = 1000  # rooms per MySQL page, and LLENs per Redis pipeline, in `stats`

# MySQL client errors that mean "no server answered", as opposed to "a server said no".
_MYSQL_UNREACHABLE = frozenset({2002, 2003, 2006, 2013})

T = TypeVar("T")


class Unreachable(Exception):
    """A dependency did not answer (in time)."""


class Misconfigured(Exception):
    """A dependency answered but is not set up the way roomcast needs."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of `roomcast check`: a dependency, its verdict and why."""

    dependency: str  # kafka | redis | mysql
    status: str  # ok | WARN | MISCONFIGURED | UNREACHABLE
    target: str  # where we looked (passwords hidden)
    detail: str

    @property
    def failed(self) -> bool:
        return self.status in FAILED


# --------------------------------------------------------------------------- pure verdicts


def redact(url: str) -> str:
    """`url` with any password replaced by ***."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def judge_topic(topic: str, partitions: int | None, retention_ms: int | None, settings: Settings) -> tuple[str, str]:
    """The topic exists with the configured partition count, and keeps messages longer than
    Redis may hold them alone (otherwise a Redis loss could not be replayed from Kafka)."""
    if partitions is None:
        return MISCONFIGURED, f"topic {topic!r} does not exist (`roomcast up` or the kafka-topic Job creates it)"
    if partitions != settings.kafka_partitions:
        return MISCONFIGURED, (f"topic {topic!r} has {partitions} partitions, KAFKA_PARTITIONS says "
                               f"{settings.kafka_partitions}: rooms would map to the wrong partitions")
    need_ms = settings.redis_retention_s * 1000
    shown = f"topic {topic!r}, {partitions} partitions"
    if retention_ms is None:
        return WARN, f"{shown}; retention.ms unknown, cannot verify it exceeds Redis retention ({_days(need_ms)})"
    if 0 <= retention_ms <= need_ms:
        return MISCONFIGURED, (f"{shown}; retention.ms {_days(retention_ms)} must exceed Redis retention "
                               f"{_days(need_ms)}, or a Redis loss cannot be replayed from Kafka")
    return OK, f"{shown}, retention {'unlimited' if retention_ms < 0 else _days(retention_ms)}"


def judge_redis_config(config: Mapping[str, str]) -> tuple[str, str]:
    """Redis is a buffer that must not forget: AOF on, and never evict (docs/redis.md)."""
    appendonly = config.get("appendonly", "?")
    policy = config.get("maxmemory-policy", "?")
    maxmemory = int(config.get("maxmemory", "0") or 0)
    facts = f"appendonly {appendonly}, maxmemory {_bytes(maxmemory)}, maxmemory-policy {policy}"
    if policy != "noeviction" and maxmemory > 0:
        return MISCONFIGURED, f"{facts}: at the limit Redis evicts buffered messages; set maxmemory-policy noeviction"
    problems = []
    if appendonly != "yes":
        problems.append("appendonly is off: a Redis restart loses the buffer (replayed from Kafka while it still "
                        "has it)")
    if policy != "noeviction":
        problems.append("maxmemory-policy would evict buffered messages once a maxmemory is set")
    if maxmemory == 0:
        problems.append("no maxmemory: Redis can grow until the OS kills it")
    return (WARN, f"{facts}; " + "; ".join(problems)) if problems else (OK, facts)


def judge_schema(database: str, applied: set[int], known: Sequence[tuple[int, str]]) -> tuple[str, str]:
    """Every migration this code knows is applied (and no unknown one, which means newer code)."""
    pending = [name for version, name in known if version not in applied]
    latest = max(applied, default=0)
    if pending:
        return MISCONFIGURED, (f"database {database!r} at schema version {latest}, pending "
                               f"{', '.join(pending)}: run `roomcast migrate`")
    unknown = sorted(applied - {v for v, _ in known})
    if unknown:
        return WARN, f"database {database!r} has migrations this code does not know ({unknown}): newer release?"
    return OK, f"database {database!r}, schema version {latest}"


def partition_lag(applied: int | None, log_start: int, high_water: int) -> int:
    """Records of a partition the persister has not applied yet. `applied` is its mark (the highest
    offset applied; None: nothing yet), `high_water` the offset the next record will get."""
    next_needed = log_start if applied is None else max(applied + 1, log_start)
    return max(0, high_water - next_needed)


def _days(ms: int) -> str:
    return f"{ms / 86_400_000:g} d"


def _bytes(n: int) -> str:
    if n == 0:
        return "0 (unlimited)"
    for unit, size in (("gb", 1 << 30), ("mb", 1 << 20), ("kb", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


# --------------------------------------------------------------------------- readers


def _kafka_admin(settings: Settings, timeout_s: float) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                               request_timeout_ms=int(timeout_s * 1000))


async def kafka_topic_state(settings: Settings, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int | None, int | None]:
    """(partition count or None if the topic is missing, retention.ms or None if unknown).

    Reads the metadata of every topic: asking for one by name would let a broker with topic
    auto-creation create it (with its default partition count).
    """
    admin = _kafka_admin(settings, timeout_s)
    try:
        await admin.start()
        topics = {t["topic"]: t for t in await admin.describe_topics(None)}
        meta = topics.get(settings.kafka_topic)
        if meta is None:
            return None, None
        partitions = len(meta["partitions"])
        try:
            [resp] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, settings.kafka_topic)])
            entries = resp.to_object()["resources"][0]["config_entries"]
            values = {e["config_names"]: e["config_value"] for e in entries}
            retention = int(values["retention.ms"]) if values.get("retention.ms") else None
        except (KafkaError, KeyError, IndexError, ValueError):
            retention = None
        return partitions, retention
    finally:
        await admin.close()


async def check_kafka(settings: Settings, timeout_s: float = DEFAULT_TIMEOUT_S) -> Finding:
    target = settings.kafka_bootstrap
    try:
        partitions, retention = await _bounded(kafka_topic_state(settings, timeout_s), timeout_s * 2)
    except (Unreachable, KafkaConnectionError, OSError) as e:
        return Finding("kafka", UNREACHABLE, target, _reason(e))
    except KafkaError as e:
        return Finding("kafka", MISCONFIGURED, target, _reason(e))
    status, detail = judge_topic(settings.kafka_topic, partitions, retention, settings)
    return Finding("kafka", status, target, detail)


def _redis_client(settings: Settings, timeout_s: float) -> aioredis.Redis:
    return connect(settings, timeout_s=timeout_s, connect_timeout_s=timeout_s)


async def check_redis(settings: Settings, timeout_s: float = DEFAULT_TIMEOUT_S) -> Finding:
    target = redact(settings.redis_url)
    client = _redis_client(settings, timeout_s)
    try:
        await _bounded(client.ping(), timeout_s)
        try:
            config: dict[str, str] = {}
            for name in ("appendonly", "maxmemory-policy", "maxmemory"):
                raw: Mapping[Any, Any] = await _bounded(client.config_get(name), timeout_s)
                config.update({_text(k): _text(v) for k, v in raw.items()})
        except redis_errors.ResponseError as e:
            return Finding("redis", WARN, target, f"PING ok, but CONFIG GET refused ({e}): AOF and eviction "
                                                  "policy not verified")
    except (redis_errors.AuthenticationError, redis_errors.AuthorizationError) as e:
        return Finding("redis", MISCONFIGURED, target, _reason(e))
    except (Unreachable, redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as e:
        return Finding("redis", UNREACHABLE, target, _reason(e))
    except redis_errors.RedisError as e:  # NOAUTH, wrong database number, ...
        return Finding("redis", MISCONFIGURED, target, _reason(e))
    finally:
        await client.aclose()
    status, detail = judge_redis_config(config)
    return Finding("redis", status, target, detail)


async def _mysql_connect(target: MysqlTarget, timeout_s: float, with_db: bool) -> aiomysql.Connection:
    return await _bounded(aiomysql.connect(connect_timeout=timeout_s, **target.connect_kwargs(with_db=with_db)),
                          timeout_s + 1)


async def check_mysql(settings: Settings, timeout_s: float = DEFAULT_TIMEOUT_S) -> Finding:
    target = MysqlTarget.from_dsn(settings.mysql_dsn)
    where = f"{target.host}:{target.port}"
    try:
        conn = await _mysql_connect(target, timeout_s, with_db=False)
    except Exception as e:
        return Finding("mysql", _mysql_status(e), where, _reason(e))
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT VERSION()")
            version = (await cur.fetchone())[0]
            await cur.execute("SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (target.database,))
            if await cur.fetchone() is None:
                return Finding("mysql", MISCONFIGURED, where,
                               f"database {target.database!r} does not exist: run `roomcast migrate`")
            await cur.execute("SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s "
                              "AND TABLE_NAME = 'schema_migrations'", (target.database,))
            if await cur.fetchone() is None:
                return Finding("mysql", MISCONFIGURED, where,
                               f"database {target.database!r} has no schema: run `roomcast migrate`")
            await cur.execute(f"SELECT version FROM `{_ident(target.database)}`.schema_migrations")
            applied = {int(row[0]) for row in await cur.fetchall()}
    except Exception as e:
        return Finding("mysql", _mysql_status(e), where, _reason(e))
    finally:
        conn.close()
    status, detail = judge_schema(target.database, applied, [(v, n) for v, n, _ in migration_files()])
    return Finding("mysql", status, where, f"{detail} ({version})")


def _mysql_status(e: BaseException) -> str:
    if isinstance(e, pymysql.err.OperationalError) and e.args and e.args[0] in _MYSQL_UNREACHABLE:
        return UNREACHABLE
    if isinstance(e, Unreachable | OSError):
        return UNREACHABLE
    return MISCONFIGURED  # e.g. 1045 access denied


async def check_all(settings: Settings, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Finding]:
    """The three checks, concurrently: a few seconds in all even when everything is down."""
    return list(await asyncio.gather(check_kafka(settings, timeout_s), check_redis(settings, timeout_s),
                                     check_mysql(settings, timeout_s)))


def format_findings(findings: Sequence[Finding]) -> str:
    return "\n".join(f"{f.dependency:<6} {f.status:<13} {f.target:<28} {f.detail}" for f in findings)


# --------------------------------------------------------------------------- stats


@dataclass(slots=True)
class PartitionStats:
    partition: int
    applied: int | None  # the persister's applied mark in Redis (None: nothing applied yet)
    log_start: int
    high_water: int | None  # None: the broker did not say in time
    lag: int | None


@dataclass(slots=True)
class Stats:
    topic: str
    rooms: int | None = None  # rows in MySQL `rooms`
    unregistered_rooms: int | None = None  # seen in Redis, not in `rooms` yet (counted apart)
    buffered_messages: int | None = None  # sum of the rooms' Redis lists
    mysql_messages: int | None = None
    lag_total: int | None = None
    partitions: list[PartitionStats] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # dependency -> why its numbers are missing

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Progress:
    """A one-line progress bar on a terminal (stderr), redrawn at most 10 times a second;
    silent when the stream is not a terminal, so pipes and `--json` stay clean."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.label, self.done = max(total, 0), label, 0
        self._drawn = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._drawn >= 0.1:
            self._drawn = now
            self.stream.write("\r" + self.line())
            self.stream.flush()

    def line(self, width: int = 30) -> str:
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        bar = "#" * int(frac * width)
        return f"{self.label} [{bar:<{width}}] {self.done:,}/{self.total:,} ({frac:.0%})"

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\r" + " " * len(self.line()) + "\r")
            self.stream.flush()


ProgressFactory = Callable[[int, str], Progress]


async def gather_stats(settings: Settings, timeout_s: float = DEFAULT_TIMEOUT_S,
                       progress: ProgressFactory = Progress) -> Stats:
    """Rooms, buffered and archived messages, and the persister's lag per partition. A dependency
    that does not answer leaves its numbers None and its reason in `errors`."""
    stats = Stats(topic=settings.kafka_topic)
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    redis = _redis_client(settings, timeout_s)
    try:
        conn = await _mysql_connect(MysqlTarget.from_dsn(settings.mysql_dsn), timeout_s, with_db=True)
    except Exception as e:
        stats.errors["mysql"] = _reason(e)
        conn = None
    try:
        if conn is not None:
            await _mysql_counts(conn, stats)
            if stats.rooms is not None:
                await _buffered(conn, redis, keys, stats, progress(stats.rooms, "rooms"))
        await _redis_partition_counts(redis, settings, stats)
        await _kafka_lag(settings, timeout_s, stats)
    finally:
        if conn is not None:
            conn.close()
        await redis.aclose()
    return stats


async def _mysql_counts(conn: aiomysql.Connection, stats: Stats) -> None:
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT COUNT(*) FROM rooms")
            stats.rooms = int((await cur.fetchone())[0])
            await cur.execute("SELECT COUNT(*) FROM messages")
            stats.mysql_messages = int((await cur.fetchone())[0])
    except pymysql.err.Error as e:
        stats.errors["mysql"] = _reason(e)


async def _buffered(conn: aiomysql.Connection, redis: aioredis.Redis, keys: Keys, stats: Stats,
                    bar: Progress) -> None:
    """Walk `rooms` by primary key, one LLEN pipeline per page: bounded work per round trip."""
    total, last_id = 0, 0
    try:
        while True:
            async with conn.cursor() as cur:
                await cur.execute("SELECT id, name FROM rooms WHERE id > %s ORDER BY id LIMIT %s",
                                  (last_id, STATS_CHUNK))
                rows = await cur.fetchall()
            if not rows:
                break
            async with redis.pipeline(transaction=False) as pipe:
                for _, name in rows:
                    pipe.llen(keys.msgs(name))
                total += sum(int(n) for n in await pipe.execute())
            last_id = int(rows[-1][0])
            bar.update(len(rows))
        stats.buffered_messages = total
    except (pymysql.err.Error, redis_errors.RedisError, OSError) as e:
        stats.errors["redis" if isinstance(e, redis_errors.RedisError) else "mysql"] = _reason(e)
    finally:
        bar.close()


async def _redis_partition_counts(redis: aioredis.Redis, settings: Settings, stats: Stats) -> None:
    """Applied marks and not-yet-registered rooms, per partition (one pipeline)."""
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for p in range(settings.kafka_partitions):
                pipe.get(keys.applied(p))
                pipe.scard(keys.new_rooms(p))
            res = await pipe.execute()
    except (redis_errors.RedisError, OSError) as e:
        stats.errors["redis"] = _reason(e)
        return
    stats.unregistered_rooms = sum(int(n) for n in res[1::2])
    stats.partitions = [PartitionStats(p, None if raw is None else int(raw), 0, None, None)
                        for p, raw in enumerate(res[0::2])]


async def _kafka_lag(settings: Settings, timeout_s: float, stats: Stats) -> None:
    """Lag of the persister's applied marks against each partition's end offset."""
    if not stats.partitions:  # no marks without Redis: lag would be meaningless
        stats.partitions = [PartitionStats(p, None, 0, None, None) for p in range(settings.kafka_partitions)]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=100,
                                request_timeout_ms=int(timeout_s * 1000) + 1000,
                                max_partition_fetch_bytes=64 * 1024)
    try:
        await _bounded(consumer.start(), timeout_s * 2)
        tps = [TopicPartition(settings.kafka_topic, p.partition) for p in stats.partitions]
        consumer.assign(tps)
        starts = await _bounded(consumer.beginning_offsets(tps), timeout_s)
        highs: dict[TopicPartition, int | None] = dict(await _bounded(consumer.end_offsets(tps), timeout_s))
    except (Unreachable, KafkaError, OSError) as e:
        stats.errors["kafka"] = _reason(e)
        return
    finally:
        await consumer.stop()
    for p, tp in zip(stats.partitions, tps, strict=True):
        p.log_start, p.high_water = starts[tp], highs[tp]
        if p.high_water is not None and "redis" not in stats.errors:
            p.lag = partition_lag(p.applied, p.log_start, p.high_water)
    lags = [p.lag for p in stats.partitions]
    stats.lag_total = None if any(lag is None for lag in lags) else sum(lag for lag in lags if lag is not None)


def format_stats(stats: Stats) -> str:
    def n(v: int | None) -> str:
        return "?" if v is None else f"{v:,}"

    lines = [
        f"rooms                {n(stats.rooms)}"
        + (f" (+{n(stats.unregistered_rooms)} in Redis, not yet in MySQL)" if stats.unregistered_rooms else ""),
        f"buffered in Redis    {n(stats.buffered_messages)} messages",
        f"archived in MySQL    {n(stats.mysql_messages)} messages",
        f"persister lag        {n(stats.lag_total)} records (topic {stats.topic!r})",
        "  partition      applied   high-water          lag",
    ]
    for p in stats.partitions:
        applied = "-" if p.applied is None else f"{p.applied:,}"
        lines.append(f"  {p.partition:>9} {applied:>12} {n(p.high_water):>12} {n(p.lag):>12}")
    lines += [f"{dep}: UNREACHABLE or failed: {why}" for dep, why in stats.errors.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------- helpers


async def _bounded(aw: Awaitable[T], timeout_s: float) -> T:
    try:
        return await asyncio.wait_for(aw, timeout_s)
    except TimeoutError as e:
        raise Unreachable(f"no answer within {timeout_s:g}s") from e


def _reason(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.replace("\n", " ")[:300]


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _ident(name: str) -> str:
    return name.replace("`", "")
