"""The test session's services, and per-test isolation.

Each backing service comes from an environment variable when it is set (KAFKA_BOOTSTRAP, REDIS_URL,
MYSQL_DSN: used as they are), else the session starts its own on free ports, in its own folders:
an Apache Kafka broker (KRaft, one node, jars from Maven Central: tools/localkafka.py), a
redis-server with AOF on, and a MariaDB. Nothing of the machine's is used or touched. A service that
cannot start is a failure, never a skip. Every test gets its own Kafka topic, Redis key prefix and
MySQL database, so tests never see each other's data.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomysql
import pytest
import redis.asyncio as aioredis

from shared.migrate import migrate
from shared.mysql import MysqlTarget, create_pool
from shared.settings import Settings
from tests.support import delete_keys, drop_database, isolated_settings
from tools import localstack
from tools.localkafka import KafkaCluster

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "test-output"


@pytest.fixture(scope="session")
def log_dir() -> Path:
    OUT.mkdir(exist_ok=True)
    d = OUT / "logs"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[str]:
    if os.environ.get("KAFKA_BOOTSTRAP"):
        yield os.environ["KAFKA_BOOTSTRAP"]
        return
    ports = localstack.free_ports(2)
    with KafkaCluster.local(tmp_path_factory.mktemp("kafka"), log_dir, [(ports[0], ports[1])]).start() as kafka:
        yield kafka.bootstrap


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    port = localstack.free_port()
    with localstack.start_redis(port, tmp_path_factory.mktemp("redis"), log_dir):
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture(scope="session")
def mysql_server_dsn(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[str]:
    """DSN of the server, without the database part (tests make their own databases)."""
    if os.environ.get("MYSQL_DSN"):
        t = MysqlTarget.from_dsn(os.environ["MYSQL_DSN"])
        yield f"mysql://{t.user}:{t.password}@{t.host}:{t.port}"
        return
    port = localstack.free_port()
    with localstack.start_mariadb(port, tmp_path_factory.mktemp("mariadb"), log_dir):
        yield f"mysql://root:@127.0.0.1:{port}"


@pytest.fixture
def settings(kafka_bootstrap: str, redis_url: str, mysql_server_dsn: str) -> Settings:
    """Settings isolated to this test: own topic, own key prefix, own database."""
    return isolated_settings(kafka_bootstrap, redis_url, mysql_server_dsn)


@pytest.fixture
async def migrated(settings: Settings) -> AsyncIterator[Settings]:
    """`settings` with its database created and migrated; dropped afterwards."""
    await migrate(settings.mysql_dsn)
    yield settings
    await drop_database(settings.mysql_dsn)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    """A client of the test Redis; this test's keys are deleted afterwards (bounded SCAN)."""
    client = aioredis.from_url(settings.redis_url)
    yield client
    await delete_keys(client, settings.redis_prefix)
    await client.aclose()


@pytest.fixture
async def mysql(migrated: Settings) -> AsyncIterator[aiomysql.Pool]:
    pool = await create_pool(migrated.mysql_dsn, 4)
    yield pool
    pool.close()
    await pool.wait_closed()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Fault tests last: they are the slowest and start their own services.
    items.sort(key=lambda it: "faults" in str(it.fspath))
