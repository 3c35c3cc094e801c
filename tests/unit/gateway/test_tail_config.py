"""The fan-out reader's fetch settings reach librdkafka (the reader itself is tested on the broker:
tests/integration/test_log_start.py), and through a child process's environment."""

from __future__ import annotations

import pytest

from gateway.tail import RdTail
from shared.settings import Settings


def test_fetch_batching_is_off_unless_set_and_its_wait_defaults_to_the_fetch_wait() -> None:
    default = RdTail(Settings(kafka_fetch_max_wait_ms=321))._config
    assert (default["fetch.min.bytes"], default["fetch.wait.max.ms"]) == (1, 321)
    batching = RdTail(Settings(kafka_fanout_fetch_min_bytes=65536, kafka_fanout_fetch_wait_ms=5))._config
    assert (batching["fetch.min.bytes"], batching["fetch.wait.max.ms"]) == (65536, 5)


def test_the_settings_pass_to_a_child_process_and_back_unchanged_when_a_setting_is_unset(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for unset, value in ((True, None), (False, 7)):
        s = Settings(kafka_fanout_fetch_wait_ms=value)
        env = s.to_env()
        assert ("KAFKA_FANOUT_FETCH_WAIT_MS" not in env) is unset
        for key, text in env.items():
            monkeypatch.setenv(key, text)
        monkeypatch.delenv("KAFKA_FANOUT_FETCH_WAIT_MS", raising=False)
        if not unset:
            monkeypatch.setenv("KAFKA_FANOUT_FETCH_WAIT_MS", env["KAFKA_FANOUT_FETCH_WAIT_MS"])
        assert Settings().kafka_fanout_fetch_wait_ms == value
