"""Fixtures shared by the integration tests that run a whole cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from shared.settings import Settings
from tests.faults.proxy import TcpProxy
from tests.support import Cluster


@pytest.fixture
def small_buffer(migrated: Settings) -> Settings:
    """Small cap and chunk so a few hundred messages exercise the flush to MySQL."""
    return migrated.model_copy(update={"buffer_cap": 20, "flush_chunk": 10, "send_burst": 1000,
                                        "recovery_wait_s": 2.0})


@pytest.fixture
def cluster(small_buffer: Settings, log_dir: Path) -> Iterator[Cluster]:
    """Two gateway processes and a persister with `small_buffer` settings."""
    c = Cluster(small_buffer, log_dir).start()
    yield c
    c.stop()


@pytest.fixture
async def cluster_behind_a_redis_proxy(small_buffer: Settings,
                                       log_dir: Path) -> AsyncIterator[tuple[Cluster, TcpProxy]]:
    """A cluster whose every process reaches Redis through a proxy the test can cut."""
    redis_at = urlsplit(small_buffer.redis_url)
    proxy = await TcpProxy(redis_at.hostname or "127.0.0.1", redis_at.port or 6379).start()
    settings = small_buffer.model_copy(update={"redis_url": f"redis://127.0.0.1:{proxy.port}{redis_at.path}"})
    c = Cluster(settings, log_dir).start()
    try:
        yield c, proxy
    finally:
        await proxy.close()
        c.stop()
