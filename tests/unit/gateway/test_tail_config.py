"""The fan-out reader's fetch settings reach librdkafka (the reader itself is tested on the broker:
tests/integration/test_log_start.py)."""

from __future__ import annotations

from gateway.tail import RdTail
from shared.settings import Settings


def test_fetch_batching_is_off_unless_set_and_its_wait_defaults_to_the_fetch_wait() -> None:
    default = RdTail(Settings(kafka_fetch_max_wait_ms=321))._config
    assert (default["fetch.min.bytes"], default["fetch.wait.max.ms"]) == (1, 321)
    batching = RdTail(Settings(kafka_fanout_fetch_min_bytes=65536, kafka_fanout_fetch_wait_ms=5))._config
    assert (batching["fetch.min.bytes"], batching["fetch.wait.max.ms"]) == (65536, 5)
