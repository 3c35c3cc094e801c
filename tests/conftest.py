"""Service discovery for the tests, and per-test isolation.

Each backing service is found in this order: an explicit environment variable (KAFKA_BOOTSTRAP,
REDIS_URL, MYSQL_DSN) -> a Docker engine (testcontainers; Kafka only, when one answers) -> a local
process: Tansu (memory) started for the session on a free port, the machine's Redis on 6379 and
MariaDB on 3306. A missing service is a failure, never a skip. Every test gets its own Kafka topic,
Redis key prefix and MySQL database, so tests never see each other's data.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomysql
import pytest
import redis.asyncio as aioredis

from shared import localstack
from shared.migrate import migrate
from shared.mysql import MysqlTarget, create_pool
from shared.settings import Settings
from tests.support import delete_keys, drop_database, isolated_settings

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "test-output"


def _docker_answers() -> bool:
    """A Docker engine answers its /_ping (checked by hand: no client objects left open)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            if not os.path.exists(host[7:]):
                return False
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(2)
            sock.connect(host[7:])
        elif host.startswith("tcp://"):
            h, _, p = host[6:].partition(":")
            sock = socket.create_connection((h, int(p or 2375)), timeout=2)
        else:
            return False
        with sock:
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in sock.recv(1024)
    except OSError:
        return False


@pytest.fixture(scope="session")
def log_dir() -> Path:
    OUT.mkdir(exist_ok=True)
    d = OUT / "logs"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="session")
def kafka_bootstrap(log_dir: Path) -> Iterator[str]:
    if os.environ.get("KAFKA_BOOTSTRAP"):
        yield os.environ["KAFKA_BOOTSTRAP"]
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer  # type: ignore[import-untyped]

        with KafkaContainer() as kafka:
            yield kafka.get_bootstrap_server()
        return
    port = localstack.free_port()
    proc = localstack.start_tansu_memory(port, log_dir)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def kafka_idempotence() -> bool:
    """Tansu lacks InitProducerId; Apache Kafka (env or container) has it."""
    return bool(os.environ.get("KAFKA_BOOTSTRAP")) and os.environ.get("KAFKA_IDEMPOTENCE", "") == "true"


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    return url


@pytest.fixture(scope="session")
def mysql_server_dsn() -> str:
    """DSN of the server, without the database part (tests make their own databases)."""
    dsn = os.environ.get("MYSQL_DSN", "mysql://root:@127.0.0.1:3306/test")
    t = MysqlTarget.from_dsn(dsn)
    return f"mysql://{t.user}:{t.password}@{t.host}:{t.port}"


@pytest.fixture
def settings(kafka_bootstrap: str, redis_url: str, mysql_server_dsn: str, kafka_idempotence: bool) -> Settings:
    """Settings isolated to this test: own topic, own key prefix, own database."""
    return isolated_settings(kafka_bootstrap, redis_url, mysql_server_dsn, kafka_idempotence)


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
