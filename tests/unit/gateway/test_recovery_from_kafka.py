"""A resume that reads the log (the persister is behind, or MySQL is away) gets every record of the
range, even when a fetch shows a later batch first (Tansu can; the fan-out and the persister guard
against it too), and is refused rather than incomplete when retention deleted the range's start."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition

from gateway import recovery
from shared.keys import Keys
from shared.message import Message
from shared.settings import Settings

ROOM = "r"


class LogWithALateFirstBatch:  # the unit's edge: a consumer over offsets 0..4 of one partition
    def __init__(self, partition: int, log_start: int = 0) -> None:
        self.partition = partition
        self.log_start = log_start
        self.position = 0
        self.first_fetch = True
        self.seeks: list[int] = []

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def assign(self, tps: list[TopicPartition]) -> None: ...

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.log_start for tp in tps}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append(offset)
        self.position = offset

    async def getmany(self, tp: TopicPartition, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        offsets = list(range(max(self.position, self.log_start), 5))
        if self.first_fetch:  # the batch holding offsets 0-1 shows up after the next one
            self.first_fetch = False
            offsets = [o for o in offsets if o >= 2]
        self.position = 5
        return {tp: [self.record(o) for o in offsets]}

    def record(self, offset: int) -> SimpleNamespace:
        msg = Message(f"ID{offset}", ROOM, "alice", f"m{offset}", 1_764_000_000_000 + offset, f"c{offset}")
        return SimpleNamespace(offset=offset, value=msg.kafka_value(), partition=self.partition)


async def test_a_fetch_that_shows_a_later_batch_first_is_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(recovery_wait_s=5.0)
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    log = LogWithALateFirstBatch(keys.partition(ROOM))
    monkeypatch.setattr(recovery, "new_consumer", lambda *a, **kw: log)

    entries = await recovery.from_kafka(SimpleNamespace(settings=settings, keys=keys), ROOM, 0, 5)  # type: ignore[arg-type]

    assert [Message.from_entry(e).id for e in entries] == ["ID0", "ID1", "ID2", "ID3", "ID4"]
    assert log.seeks == [0, 0], "sought back to the missing offset"


async def test_a_range_the_log_no_longer_holds_is_refused_not_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(recovery_wait_s=5.0, kafka_gap_wait_ms=100)
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    log = LogWithALateFirstBatch(keys.partition(ROOM), log_start=2)  # retention deleted offsets 0-1
    monkeypatch.setattr(recovery, "new_consumer", lambda *a, **kw: log)

    with pytest.raises(recovery.ResumeUnavailable, match="no longer holds offset 0"):
        await recovery.from_kafka(SimpleNamespace(settings=settings, keys=keys), ROOM, 0, 5)  # type: ignore[arg-type]
    assert await recovery.from_kafka(SimpleNamespace(settings=settings, keys=keys), ROOM, 2, 5) != []  # type: ignore[arg-type]
