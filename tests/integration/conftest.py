"""Fixtures shared by the integration tests that run a whole cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.settings import Settings
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
